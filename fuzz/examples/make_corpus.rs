//! Regenerates the seed corpus: `cargo run --example make_corpus` (in fuzz/).

use std::path::Path;
use tandem_common::frame::{self, Channel};
use tandem_common::NodeId;
use tandem_fuzz::fs_image::{self, encode_patch};
use tandem_replicator::meta::format::{PeerSlot, Superblock};
use tandem_replicator::proto::{AckMode, PeerMsg, PeerState};
use tandem_replicator::state::{DiskState, Role};

fn put(target: &str, name: &str, data: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), data).unwrap();
}

fn main() {
    let msgs = [
        PeerMsg::State(PeerState {
            role: Role::Primary,
            disk: DiskState::UpToDate,
            current_uuid: 0x1234,
            history_uuids: [1, 2],
            usable_size_bytes: 1 << 20,
            protocol: tandem_common::config::Protocol::C,
            allow_two_primaries: true,
            crashed_primary: false,
            sync_target: false,
            bitmap_uuid_for_you: 0,
            discard_my_data: false,
            changes_bytes: 0,
            primary_at_loss: false,
            crashed_extents: None,
            dirty_runs: None,
        }),
        PeerMsg::Write {
            seq: 1,
            offset: 4096,
            data: vec![7; 64],
            fua: true,
            ack: AckMode::Write,
            missing: vec![],
        },
        PeerMsg::Flush { seq: 2 },
        PeerMsg::SyncData {
            seq: 3,
            offset: 0,
            data: vec![1; 32],
        },
        PeerMsg::SyncDone {
            current: 5,
            history: [4, 3],
            third_peers: vec![tandem_replicator::proto::ThirdPeerView {
                node: NodeId(3),
                bitmap_uuid: 4,
                runs: Some(vec![(0, 4096)]),
            }],
            crashed_primary: true,
            crashed_extents: Some(vec![0]),
        },
        PeerMsg::Topology { seq: 4 },
        PeerMsg::TopologyAck { seq: 4 },
        PeerMsg::PeerAck {
            seq: 1,
            lost: vec![NodeId(3)],
        },
        PeerMsg::Ping,
    ];
    for (i, m) in msgs.iter().enumerate() {
        put(
            "replication_frame",
            &format!("msg{i}"),
            &frame::encode(Channel::Replication, m).unwrap(),
        );
    }
    let hello = tandem_common::auth::ClientHello {
        magic: *b"TANDEM\0\x01",
        service: "replication".into(),
        min_version: 1,
        max_version: 1,
        node_id: NodeId(1),
        target: "www".into(),
        nonce: [9; 32],
    };
    put(
        "handshake_frame",
        "hello",
        &frame::encode(Channel::Handshake, &hello).unwrap(),
    );
    put(
        "handshake_frame",
        "refused",
        &frame::encode(
            Channel::Handshake,
            &tandem_common::auth::ServerMsg::Refused { reason: "x".into() },
        )
        .unwrap(),
    );
    let mut req = Vec::new();
    req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    req.extend_from_slice(&1u16.to_be_bytes());
    req.extend_from_slice(&1u16.to_be_bytes());
    req.extend_from_slice(&7u64.to_be_bytes());
    req.extend_from_slice(&4096u64.to_be_bytes());
    req.extend_from_slice(&512u32.to_be_bytes());
    put("nbd_request", "write", &req);
    let mut go = 3u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"www");
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&3u16.to_be_bytes());
    put("nbd_request", "go", &go);
    let sb = Superblock {
        flags: 1,
        seq: 2,
        usable_size_bytes: 1 << 20,
        backing_size_bytes: 2 << 20,
        node_id: NodeId(1),
        disk_state: DiskState::UpToDate,
        current_uuid: 77,
        history_uuids: [5, 0],
        resource: "www".into(),
        peers: vec![PeerSlot {
            node_id: NodeId(2),
            bitmap_uuid: 0,
            primary_at_loss: false,
        }],
        md_offset: 1 << 20,
        al_offset: 8192,
        bitmap_offset: 40960,
        bitmap_bytes_per_peer: 4096,
    };
    put("replicator_metadata", "slot", &sb.encode());
    put(
        "cluster_config",
        "example.toml",
        br#"[cluster]
name = "web"
secret = "change-me-long-secret"
[[node]]
name = "node1"
id = 1
address = "10.0.0.1"
[[node]]
name = "node2"
id = 2
address = "10.0.0.2"
[[resource]]
name = "www"
size = "64MiB"
allow-two-primaries = true
[resource.on.node1]
disk = "/tmp/a.img"
[resource.on.node2]
disk = "/tmp/b.img"
"#,
    );
    fs_image_seeds();
    journal_seeds();
    lock_peer_seeds();
}

/// Patches for the populated image: each seed aims at one metadata structure, most of them
/// resealed so they reach the checks behind the block checksum.
fn fs_image_seeds() {
    let base = fs_image::fsck_base();
    let sb = fs_image::superblock(&base.image);
    let meta_index = |b: u64| base.meta.iter().position(|&m| m == b).unwrap() as u16;
    let first_of = |ty: tandem_fs::format::BlockType| {
        base.meta
            .iter()
            .position(|&b| {
                let blk = &base.image[b as usize * fs_image::BS..];
                tandem_fs::format::peek_type(blk) == Some(ty as u16)
            })
            .unwrap() as u16
    };
    use tandem_fs::format::BlockType;
    put("fs_image_fsck", "pristine", &[]);
    put(
        "fs_image_fsck",
        "sb-journal-count",
        &encode_patch(0, 128, true, &1u32.to_le_bytes()),
    );
    put(
        "fs_image_fsck",
        "root-nlink",
        &encode_patch(meta_index(sb.root_block), 36, true, &7u32.to_le_bytes()),
    );
    put(
        "fs_image_fsck",
        "rg-free",
        &encode_patch(meta_index(sb.rg_start), 44, true, &3u32.to_le_bytes()),
    );
    put(
        "fs_image_fsck",
        "bitmap-bits",
        &encode_patch(first_of(BlockType::Bitmap), 40, true, &[0xff]),
    );
    put(
        "fs_image_fsck",
        "dirleaf-torn",
        &encode_patch(first_of(BlockType::DirLeaf), 60, false, &[b'Z'; 4]),
    );
    put(
        "fs_image_fsck",
        "extent-leaf",
        &encode_patch(first_of(BlockType::ExtentLeaf), 48, true, &[0x40; 8]),
    );
    put(
        "fs_image_fsck",
        "xattr",
        &encode_patch(first_of(BlockType::Xattr), 30, true, &[0x01, 0x02]),
    );
    put(
        "fs_image_fsck",
        "journal-dirty",
        &encode_patch(meta_index(sb.journal_start), 40, true, &[0; 4]),
    );
    let mut two = encode_patch(meta_index(sb.root_block) + 1, 40, true, &[0xff; 8]);
    two.extend(encode_patch(0x8000 | 700, 0, false, &[0xaa; 16]));
    put("fs_image_fsck", "inode-size-and-data", &two);
}

/// Mode byte (bit 0: replay by mount) and patches inside the journal, aimed at the logged
/// transactions.
fn journal_seeds() {
    let base = fs_image::journal_base();
    // Selector of log position `pos` (see `JournalBase::pick`).
    let sel = |pos: u64| (pos - base.tail + 1) as u16;
    let last = base.txs.last().unwrap();
    let with_mode = |mode: u8, patch: Vec<u8>| {
        let mut v = vec![mode];
        v.extend(patch);
        v
    };
    put("fs_journal_replay", "recover", &[0]);
    put("fs_journal_replay", "mount", &[1]);
    put(
        "fs_journal_replay",
        "torn-last-commit",
        &with_mode(
            0,
            encode_patch(sel(last.pos + last.used - 1), 60, false, &[0xff]),
        ),
    );
    put(
        "fs_journal_replay",
        "desc-count-resealed",
        &with_mode(
            1,
            encode_patch(sel(base.txs[2].pos), 48, true, &99u32.to_le_bytes()),
        ),
    );
    put(
        "fs_journal_replay",
        "image-resealed",
        &with_mode(
            0,
            encode_patch(sel(base.txs[1].pos + 1), 200, true, &[1, 2, 3]),
        ),
    );
    put(
        "fs_journal_replay",
        "commit-crc",
        &with_mode(
            1,
            encode_patch(
                sel(base.txs[0].pos + base.txs[0].used - 1),
                52,
                true,
                &[0; 4],
            ),
        ),
    );
    put(
        "fs_journal_replay",
        "header-seq",
        &with_mode(0, encode_patch(0, 24, true, &(base.seq + 1).to_le_bytes())),
    );
    put(
        "fs_journal_replay",
        "past-the-end",
        &with_mode(
            1,
            encode_patch(
                sel(last.pos + last.used),
                0,
                false,
                &[0x54, 0x4e, 0x44, 0x4d, 8, 0],
            ),
        ),
    );
}

/// Raft messages as a peer sends them, framed and bare.
fn lock_peer_seeds() {
    use protobuf::Message as _;
    use raft::prelude::{Entry, Message, MessageType, Snapshot};
    use tandem_lockmgr::daemon::peer::PeerFrame;
    use tandem_lockmgr::node::Probe;
    let mut append = Message::default();
    append.set_msg_type(MessageType::MsgAppend);
    append.from = 1;
    append.to = 2;
    append.term = 3;
    append.log_term = 3;
    append.index = 10;
    append.commit = 9;
    let mut e = Entry::default();
    e.set_data(b"\x01batch".to_vec().into());
    e.term = 3;
    e.index = 11;
    append.mut_entries().push(e);
    let mut heartbeat = Message::default();
    heartbeat.set_msg_type(MessageType::MsgHeartbeat);
    heartbeat.from = 1;
    heartbeat.to = 3;
    heartbeat.term = 3;
    heartbeat.set_context(b"ctx".to_vec().into());
    let mut snap = Message::default();
    snap.set_msg_type(MessageType::MsgSnapshot);
    snap.from = 1;
    snap.to = 2;
    let mut s = Snapshot::default();
    s.set_data(vec![1u8; 40].into());
    s.mut_metadata().index = 20;
    s.mut_metadata().term = 3;
    s.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
    snap.set_snapshot(s);
    for (name, m) in [
        ("append", &append),
        ("heartbeat", &heartbeat),
        ("snapshot", &snap),
    ] {
        let bytes = m.write_to_bytes().unwrap();
        put("lock_peer_message", &format!("{name}.pb"), &bytes);
        put(
            "lock_peer_message",
            &format!("{name}.frame"),
            &frame::encode(Channel::LockPeer, &PeerFrame::Raft(bytes)).unwrap(),
        );
    }
    let mut two = frame::encode(Channel::LockPeer, &PeerFrame::Probe(Probe::Ping(5))).unwrap();
    two.extend(frame::encode(Channel::LockPeer, &PeerFrame::Probe(Probe::Pong(5))).unwrap());
    put("lock_peer_message", "probes", &two);
}
