//! Peer wire protocol (after the `tandem_common::auth` handshake), carried in
//! `Channel::Replication` frames. One enum, grouped by phase; every variant round-trips
//! (tests below). Bump `PROTO_VERSION` on any change and document it in docs/PROTOCOL.md.
//!
//! Version history:
//! - 1: initial protocol (state exchange, protocol A/B/C writes, flush, full resync).
//! - 2: `PeerState.primary_at_loss` replaces `primary_since_ms` (split-brain recovery
//!   by discard-younger/older-primary).
//! - 3: `SyncDone.third_peers` (the target inherits the source's view of its other
//!   peers) and `Topology`/`TopologyAck` (a join is confirmed by the neighbours before
//!   it completes, so a writer mints before it writes past a node that joined its
//!   generation through a third node), `PeerAck` (a receiver keeps a write unconfirmed
//!   until the writer says every target has it) and `SyncDone.crashed_primary` /
//!   `crashed_extents`.

use serde::{Deserialize, Serialize};
use tandem_common::config::Protocol;

use crate::state::{DiskState, Role};

pub const SERVICE: &str = "replication";
pub const PROTO_VERSION: u16 = 3;
/// Largest data payload in one message; NBD requests above this are split.
pub const MAX_DATA_BYTES: usize = 32 << 20;
/// Frame limit: data plus generous room for the header fields.
pub const MAX_FRAME_BYTES: u32 = (MAX_DATA_BYTES + 4096) as u32;

/// What the sender of a write wants back (set by the Primary's protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AckMode {
    /// Protocol A: nothing.
    None,
    /// Protocol B: `RecvAck` as soon as the message is received.
    Recv,
    /// Protocol C: `WriteAck` once written to the peer's disk.
    Write,
}

impl From<Protocol> for AckMode {
    fn from(p: Protocol) -> Self {
        match p {
            Protocol::A => AckMode::None,
            Protocol::B => AckMode::Recv,
            Protocol::C => AckMode::Write,
        }
    }
}

/// What a sync source knows of one of its other peers, sent with `SyncDone`: the target
/// now holds the source's data, so that peer lacks relative to the target what it lacks
/// relative to the source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThirdPeerView {
    pub node: tandem_common::NodeId,
    /// The source's bitmap generation for that peer (0 = none).
    pub bitmap_uuid: u64,
    /// The source's bitmap for that peer as byte runs; `None` = too many, treat as all.
    pub runs: Option<Vec<(u64, u64)>>,
}

/// A node's view of itself, sent on connect and on every change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerState {
    pub role: Role,
    pub disk: DiskState,
    pub current_uuid: u64,
    pub history_uuids: [u64; 2],
    pub usable_size_bytes: u64,
    pub protocol: Protocol,
    pub allow_two_primaries: bool,
    pub crashed_primary: bool,
    /// This node is receiving a resync from some peer (others must not start one).
    pub sync_target: bool,
    /// The generation the sender's dirty bitmap for the receiver counts from (0 = none).
    pub bitmap_uuid_for_you: u64,
    /// `connect --discard-my-data` was given: the sender wants to become sync target.
    pub discard_my_data: bool,
    /// Bytes the sender changed that the receiver lacks (its bitmap for the receiver).
    pub changes_bytes: u64,
    /// The sender was Primary the last time it was connected to the receiver (before
    /// this connection): which side was the Primary before a split brain.
    pub primary_at_loss: bool,
    /// A crashed Primary's activity log: the 4 MiB extents that may differ (None = unknown).
    pub crashed_extents: Option<Vec<u64>>,
    /// The sender's bitmap for the receiver as byte runs (blocks the sender changed that
    /// the receiver lacks); `None` when there are too many runs to send (treat as all).
    /// A sync source resyncs these too, so a target's own changes are overwritten.
    pub dirty_runs: Option<Vec<(u64, u64)>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMsg {
    // --- state ---
    State(PeerState),
    /// The sender minted a new current generation while connected to us (another peer
    /// was missing): adopt it, our data is identical.
    Uuids {
        current: u64,
        history: [u64; 2],
        /// The peers the sender minted it for (missing): receivers start tracking them.
        missing: Vec<tandem_common::NodeId>,
    },
    /// `new-current-uuid --clear-bitmap`: both sides are empty, take this generation and
    /// become UpToDate without a sync.
    NewCurrentUuid {
        uuid: u64,
    },
    // --- application I/O (sequence numbers are per resource, per sender) ---
    Write {
        seq: u64,
        offset: u64,
        // serde_bytes: one memcpy instead of a serde call per byte.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        fua: bool,
        ack: AckMode,
        /// Peers the writer cannot reach: the receiver tracks this write for them too.
        missing: Vec<tandem_common::NodeId>,
    },
    Zero {
        seq: u64,
        offset: u64,
        len: u64,
        fua: bool,
        ack: AckMode,
        missing: Vec<tandem_common::NodeId>,
    },
    Flush {
        seq: u64,
    },
    RecvAck {
        seq: u64,
    },
    WriteAck {
        seq: u64,
    },
    NegAck {
        seq: u64,
        reason: String,
    },
    // --- resync ---
    SyncStart {
        total_bytes: u64,
    },
    SyncData {
        seq: u64,
        offset: u64,
        // serde_bytes: same bytes on the wire as a plain Vec<u8> under bincode, but one
        // memcpy instead of a serde call per byte (was most of a resync's CPU).
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    SyncDone {
        current: u64,
        history: [u64; 2],
        /// The source's bitmaps for its peers other than the target.
        third_peers: Vec<ThirdPeerView>,
        /// The source is a crashed Primary whose other peers lack its hot extents yet:
        /// they may hold writes nobody acknowledged, and the target now has them too, so
        /// it takes the same doubt (an equal-generation survivor's copy wins).
        crashed_primary: bool,
        /// Those extents (4 MiB each); `None` = unknown, the whole volume.
        crashed_extents: Option<Vec<u64>>,
    },
    /// Writer → each target that acknowledged write `seq`: every target has it, except
    /// `lost` (those failed it; the receiver tracks the blocks for them). Until this
    /// arrives the receiver keeps the write unconfirmed, and marks it for the writer's
    /// other targets and the writer if the writer goes first (DRBD's peer acks).
    PeerAck {
        seq: u64,
        lost: Vec<tandem_common::NodeId>,
    },
    /// A node next to the sender joined the sender's generation (a resync to it is about
    /// to finish, or it connected without one): mint a new current generation before the
    /// next write that misses a peer, then answer `TopologyAck` — after every write that
    /// did not mint has been sent, so the sender tracks those for the joining node.
    Topology {
        seq: u64,
    },
    TopologyAck {
        seq: u64,
    },
    // --- online verify ---
    /// Checksum these blocks (after everything queued before this message).
    VerifyRequest {
        seq: u64,
        offset: u64,
        len: u64,
    },
    /// crc32 of each 4 KiB block of the requested range.
    VerifyReply {
        seq: u64,
        crcs: Vec<u32>,
    },
    // --- diskless reads (after on-io-error = detach) ---
    /// Read these bytes for me (after everything queued before this message).
    ReadRequest {
        seq: u64,
        offset: u64,
        len: u32,
    },
    ReadReply {
        seq: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        error: Option<String>,
    },
    // --- liveness ---
    Ping,
    Pong,
}

impl PeerMsg {
    /// Short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            PeerMsg::State(_) => "State",
            PeerMsg::Uuids { .. } => "Uuids",
            PeerMsg::NewCurrentUuid { .. } => "NewCurrentUuid",
            PeerMsg::Write { .. } => "Write",
            PeerMsg::Zero { .. } => "Zero",
            PeerMsg::Flush { .. } => "Flush",
            PeerMsg::RecvAck { .. } => "RecvAck",
            PeerMsg::WriteAck { .. } => "WriteAck",
            PeerMsg::NegAck { .. } => "NegAck",
            PeerMsg::SyncStart { .. } => "SyncStart",
            PeerMsg::SyncData { .. } => "SyncData",
            PeerMsg::SyncDone { .. } => "SyncDone",
            PeerMsg::Topology { .. } => "Topology",
            PeerMsg::PeerAck { .. } => "PeerAck",
            PeerMsg::TopologyAck { .. } => "TopologyAck",
            PeerMsg::VerifyRequest { .. } => "VerifyRequest",
            PeerMsg::VerifyReply { .. } => "VerifyReply",
            PeerMsg::ReadRequest { .. } => "ReadRequest",
            PeerMsg::ReadReply { .. } => "ReadReply",
            PeerMsg::Ping => "Ping",
            PeerMsg::Pong => "Pong",
        }
    }
}

/// Decodes one peer frame from a buffer: the fuzz target's entry point.
pub fn decode_frame(
    buf: &[u8],
) -> Result<Option<(PeerMsg, usize)>, tandem_common::frame::FrameError> {
    tandem_common::frame::decode_from_buf(
        buf,
        tandem_common::frame::Channel::Replication,
        MAX_FRAME_BYTES,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_common::frame::{encode, Channel};

    fn rt(m: PeerMsg) {
        let f = encode(Channel::Replication, &m).unwrap();
        let (back, used) = decode_frame(&f).unwrap().unwrap();
        assert_eq!(back, m);
        assert_eq!(used, f.len());
    }

    #[test]
    fn every_variant_round_trips() {
        rt(PeerMsg::State(PeerState {
            role: Role::Primary,
            disk: DiskState::UpToDate,
            current_uuid: 1,
            history_uuids: [2, 3],
            usable_size_bytes: 1 << 20,
            protocol: Protocol::C,
            allow_two_primaries: true,
            crashed_primary: false,
            sync_target: false,
            bitmap_uuid_for_you: 0,
            discard_my_data: false,
            changes_bytes: 0,
            primary_at_loss: false,
            crashed_extents: Some(vec![1, 5]),
            dirty_runs: Some(vec![(0, 4096)]),
        }));
        rt(PeerMsg::Uuids {
            current: 5,
            history: [6, 7],
            missing: vec![],
        });
        rt(PeerMsg::NewCurrentUuid { uuid: 9 });
        rt(PeerMsg::Write {
            seq: 1,
            offset: 4096,
            data: vec![1; 10],
            fua: true,
            ack: AckMode::Write,
            missing: vec![tandem_common::NodeId(3)],
        });
        rt(PeerMsg::Zero {
            seq: 2,
            offset: 0,
            len: 8192,
            fua: false,
            ack: AckMode::Recv,
            missing: vec![],
        });
        rt(PeerMsg::Flush { seq: 3 });
        rt(PeerMsg::RecvAck { seq: 3 });
        rt(PeerMsg::WriteAck { seq: 3 });
        rt(PeerMsg::NegAck {
            seq: 3,
            reason: "EIO".into(),
        });
        rt(PeerMsg::SyncStart { total_bytes: 10 });
        rt(PeerMsg::SyncData {
            seq: 4,
            offset: 0,
            data: vec![0; 3],
        });
        rt(PeerMsg::SyncDone {
            current: 1,
            history: [0, 0],
            third_peers: vec![
                ThirdPeerView {
                    node: tandem_common::NodeId(3),
                    bitmap_uuid: 7,
                    runs: Some(vec![(0, 4096)]),
                },
                ThirdPeerView {
                    node: tandem_common::NodeId(4),
                    bitmap_uuid: 0,
                    runs: None,
                },
            ],
            crashed_primary: true,
            crashed_extents: Some(vec![2, 5]),
        });
        rt(PeerMsg::Topology { seq: 9 });
        rt(PeerMsg::PeerAck {
            seq: 10,
            lost: vec![tandem_common::NodeId(2)],
        });
        rt(PeerMsg::TopologyAck { seq: 9 });
        rt(PeerMsg::VerifyRequest {
            seq: 1,
            offset: 0,
            len: 8192,
        });
        rt(PeerMsg::VerifyReply {
            seq: 1,
            crcs: vec![1, 2],
        });
        rt(PeerMsg::ReadRequest {
            seq: 4,
            offset: 0,
            len: 4096,
        });
        rt(PeerMsg::ReadReply {
            seq: 4,
            data: vec![5; 8],
            error: None,
        });
        rt(PeerMsg::Ping);
        rt(PeerMsg::Pong);
    }

    #[test]
    fn random_bytes_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..2000 {
            let len = rng.gen_range(0..256);
            let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            let _ = decode_frame(&bytes);
        }
    }
}
