//! Fuzz entry points: one function per parser. Each must never panic on any input, and
//! where a parse succeeds it checks an invariant (re-encoding round-trips). The cargo-fuzz
//! targets in `fuzz_targets/` call these; `tests/corpus.rs` replays the committed corpus
//! plus seeded random inputs through them on the stable toolchain.

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

/// Every target by name, for the corpus replay.
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("replication_frame", replication_frame),
    ("handshake_frame", handshake_frame),
    ("nbd_request", nbd_request),
    ("replicator_metadata", replicator_metadata),
    ("cluster_config", cluster_config),
];
