//! Regenerates the seed corpus: `cargo run --example make_corpus` (in fuzz/).

use std::path::Path;
use tandem_common::frame::{self, Channel};
use tandem_common::NodeId;
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
            primary_since_ms: 0,
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
}
