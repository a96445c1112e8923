//! Fuzz entry points: one function per parser. Each must never panic on any input, and
//! where a parse succeeds it checks an invariant (re-encoding round-trips). The cargo-fuzz
//! targets in `fuzz_targets/` call these; `tests/corpus.rs` replays the committed corpus
//! plus seeded random inputs through them on the stable toolchain.

pub mod fs_image;

use tandem_common::frame::{self, Channel};
use tandem_replicator::meta::format::Superblock;
use tandem_replicator::nbd::proto as nbd;
use tandem_replicator::proto::{self, PeerMsg};

/// Replication frames after authentication.
pub fn replication_frame(data: &[u8]) {
    if let Ok(Some((msg, used))) = proto::decode_frame(data) {
        assert!(used <= data.len());
        let again = frame::encode(Channel::Replication, &msg).expect("decoded messages encode");
        let (back, _): (PeerMsg, usize) = proto::decode_frame(&again)
            .expect("re-encoded frame decodes")
            .expect("complete frame");
        assert_eq!(back, msg);
    }
}

/// The unauthenticated handshake: the only thing a stranger can make us parse.
pub fn handshake_frame(data: &[u8]) {
    let _ = frame::decode_from_buf::<tandem_common::auth::ClientHello>(
        data,
        Channel::Handshake,
        tandem_common::auth::MAX_HANDSHAKE_FRAME,
    );
    let _ = frame::decode_from_buf::<tandem_common::auth::ServerMsg>(
        data,
        Channel::Handshake,
        tandem_common::auth::MAX_HANDSHAKE_FRAME,
    );
}

/// NBD transmission request headers and GO/INFO option payloads.
pub fn nbd_request(data: &[u8]) {
    if data.len() >= 28 {
        let header: &[u8; 28] = data[..28].try_into().expect("28 bytes");
        if let Ok(r) = nbd::parse_request(header) {
            assert_eq!(r.handle.to_be_bytes(), data[8..16]);
        }
    }
    if let Ok((name, infos)) = nbd::parse_go(data) {
        assert_eq!(4 + name.len() + 2 + infos.len() * 2, data.len());
    }
}

/// Replicator metadata superblock slots.
pub fn replicator_metadata(data: &[u8]) {
    let mut slot = data.to_vec();
    slot.resize(tandem_replicator::meta::format::SLOT_BYTES, 0);
    if let Ok(sb) = Superblock::decode(&slot) {
        assert_eq!(Superblock::decode(&sb.encode()).expect("round trip"), sb);
    }
    let _ = Superblock::decode(data);
}

/// cluster.toml text.
pub fn cluster_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = tandem_common::ClusterConfig::parse(text);
    }
}

/// Lock-manager client frames (the lock manager's own entry point).
pub fn lock_client_frames(data: &[u8]) {
    tandem_lockmgr::fuzzing::client_frames(data);
}

/// Lock-manager write-ahead log records.
pub fn lock_wal(data: &[u8]) {
    tandem_lockmgr::fuzzing::wal_bytes(data);
}

/// Lock-table commands applied to the state machine.
pub fn lock_table_commands(data: &[u8]) {
    tandem_lockmgr::fuzzing::table_commands(data);
}

/// Filesystem superblock.
pub fn fs_superblock(data: &[u8]) {
    let mut block = data.to_vec();
    block.resize(4096, 0);
    if let Ok(sb) = tandem_fs::format::Superblock::decode(&block) {
        let again = sb.encode(4096);
        assert!(
            tandem_fs::format::Superblock::decode(&again).is_ok(),
            "re-encoded superblock must decode"
        );
    }
    let _ = tandem_fs::format::Superblock::decode(data);
}

/// Any filesystem metadata block: header, type, checksum and home-block checks.
pub fn fs_metadata_block(data: &[u8]) {
    let mut block = data.to_vec();
    block.resize(4096, 0);
    for ty in 1..=10u16 {
        if let Some(t) = tandem_fs::format::BlockType::from_u16(ty) {
            let _ = tandem_fs::format::check(&block, t, 7);
            let _ = tandem_fs::format::check(data, t, 7);
        }
    }
    let _ = tandem_fs::format::peek_type(data);
}

/// A POSIX ACL xattr value (what setxattr hands the filesystem, and what fsck reads back):
/// whatever parses must re-encode to the same bytes, and chmod, the create mask and the
/// mode it implies must keep it valid.
pub fn fs_posix_acl(data: &[u8]) {
    use tandem_fs::acl::Acl;
    let Ok(a) = Acl::parse(data) else { return };
    assert_eq!(
        a.to_bytes(),
        data,
        "a parsed ACL re-encodes to its own bytes"
    );
    let mode = data
        .first()
        .map_or(0o644, |&b| 0o100000 | u32::from(b) << 1);
    let (m, equiv) = a.equiv_mode(mode);
    assert_eq!(m & !0o777, mode & !0o777, "only permission bits change");
    if equiv {
        assert_eq!(
            a.entries().len(),
            3,
            "an equivalent ACL is the three base entries"
        );
    }
    let mut c = a.clone();
    c.chmod(m);
    assert!(
        Acl::parse(&c.to_bytes()).is_ok(),
        "chmod keeps the ACL valid"
    );
    let mut d = a.clone();
    let (cm, _) = d.create_masq(mode);
    assert_eq!(cm & !0o777, mode & !0o777);
    assert!(
        Acl::parse(&d.to_bytes()).is_ok(),
        "the create mask keeps it valid"
    );
    let _ = a.permits(1000, &[1000, 50], 0, 0, 6);
}

/// A whole filesystem image with byte patches (see `fs_image::apply_patches`): fsck -n must
/// not panic, and an image it calls clean must mount and read back consistently.
pub fn fs_image_fsck(data: &[u8]) {
    fs_image::image_fsck(data);
}

/// A journal of committed, un-checkpointed transactions with byte patches inside the
/// journal: replay (by `Journal::recover` or mount) stops cleanly at the first damaged
/// transaction and leaves exactly the state of the intact prefix.
pub fn fs_journal_replay(data: &[u8]) {
    fs_image::journal_replay(data);
}

/// Raft peer traffic after authentication: `PeerFrame` frames on the lock-peer channel, a
/// bare frame payload, and a bare protobuf raft `Message` (what a `PeerFrame::Raft` holds).
/// Whatever decodes must re-encode to something that decodes to the same value.
pub fn lock_peer_message(data: &[u8]) {
    use tandem_lockmgr::daemon::peer::{PeerFrame, MAX_PEER_FRAME_BYTES};
    fn check_frame(f: &PeerFrame) {
        let again = frame::encode(Channel::LockPeer, f).expect("decoded peer frames encode");
        let (back, used): (PeerFrame, usize) =
            frame::decode_from_buf(&again, Channel::LockPeer, MAX_PEER_FRAME_BYTES)
                .expect("re-encoded peer frame decodes")
                .expect("complete frame");
        assert_eq!(used, again.len());
        assert_eq!(&back, f);
        if let PeerFrame::Raft(bytes) = f {
            check_raft(bytes);
        }
    }
    fn check_raft(bytes: &[u8]) {
        use protobuf::Message as _;
        use raft::prelude::Message;
        let reencode = |m: &Message| -> Message {
            let bytes = m.write_to_bytes().expect("decoded raft message encodes");
            Message::parse_from_bytes(&bytes).expect("re-encoded raft message decodes")
        };
        if let Ok(first) = Message::parse_from_bytes(bytes) {
            // Not `first == second`: rust-protobuf 2 lets a repeated singular sub-message
            // replace the earlier one and leaves an empty-but-present unknown-field map
            // behind, which compares unequal to the absent one a re-parse gives.
            let second = reencode(&first);
            assert_eq!(first.compute_size(), second.compute_size());
            assert_eq!(reencode(&second), second);
        }
    }
    let mut at = 0;
    while at < data.len() {
        match frame::decode_from_buf::<PeerFrame>(
            &data[at..],
            Channel::LockPeer,
            MAX_PEER_FRAME_BYTES,
        ) {
            Ok(Some((f, used))) => {
                check_frame(&f);
                at += used;
            }
            Ok(None) | Err(_) => break,
        }
    }
    if let Ok(f) = frame::decode_payload::<PeerFrame>(data) {
        check_frame(&f);
    }
    check_raft(data);
}

/// A fuzz entry point.
pub type Target = fn(&[u8]);

/// Every target by name, for the corpus replay.
pub const TARGETS: &[(&str, Target)] = &[
    ("replication_frame", replication_frame),
    ("handshake_frame", handshake_frame),
    ("nbd_request", nbd_request),
    ("replicator_metadata", replicator_metadata),
    ("cluster_config", cluster_config),
    ("lock_client_frames", lock_client_frames),
    ("lock_wal", lock_wal),
    ("lock_table_commands", lock_table_commands),
    ("fs_superblock", fs_superblock),
    ("fs_metadata_block", fs_metadata_block),
    ("fs_image_fsck", fs_image_fsck),
    ("fs_journal_replay", fs_journal_replay),
    ("fs_posix_acl", fs_posix_acl),
    ("lock_peer_message", lock_peer_message),
];
