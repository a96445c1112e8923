//! Client protocol on the daemon's Unix socket: bincode 2 messages in `tandem_common::frame`
//! frames on `Channel::LockClient`. The client opens with `Hello`; the daemon answers
//! `Welcome` (or `Error` and closes). Everything after that is asynchronous: requests carry
//! a client-chosen `ReqId`, replies and callbacks arrive in log order.
//!
//! Versions: 1 = initial protocol.

use crate::node::{CoreStatus, MemberChange};
use crate::table::{EndReason, LockError, ResourceView};
use crate::types::{FencingToken, Flags, LockId, Lvb, Mode, ReqId, SessionId};
use serde::{Deserialize, Serialize};
use tandem_common::NodeId;

pub const CLIENT_PROTOCOL_MIN: u16 = 1;
pub const CLIENT_PROTOCOL_MAX: u16 = 1;
/// Largest client frame either side accepts (a lock listing can be long).
pub const MAX_CLIENT_FRAME_BYTES: u32 = 8 << 20;
/// Largest request frame the daemon accepts from a client.
pub const MAX_REQUEST_FRAME_BYTES: u32 = 64 << 10;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ClientRequest {
    Hello {
        min_version: u16,
        max_version: u16,
        /// Shown in `tandem-lockctl locks`; at most 64 characters are kept.
        client: String,
        /// False for status-only connections, which work without quorum.
        open_session: bool,
    },
    Lock {
        req: ReqId,
        lockspace: String,
        resource: Vec<u8>,
        mode: Mode,
        flags: Flags,
    },
    Convert {
        req: ReqId,
        lock: LockId,
        mode: Mode,
        flags: Flags,
        lvb: Option<Lvb>,
    },
    Unlock {
        req: ReqId,
        lock: LockId,
        lvb: Option<Lvb>,
    },
    Cancel {
        req: ReqId,
        lock: LockId,
    },
    /// Cancels this session's pending request `target` (e.g. a lock that took too long).
    CancelRequest {
        req: ReqId,
        target: ReqId,
    },
    FenceAck {
        req: ReqId,
        node: NodeId,
    },
    RecoveryDone {
        req: ReqId,
        node: NodeId,
        lockspace: String,
    },
    Member {
        req: ReqId,
        change: MemberChange,
    },
    Status {
        req: ReqId,
    },
    Locks {
        req: ReqId,
        lockspace: String,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ClientReply {
    Welcome {
        version: u16,
        session: Option<SessionId>,
    },
    /// Completion callback for a lock or conversion.
    Granted {
        req: ReqId,
        lock: LockId,
        mode: Mode,
        token: FencingToken,
        lvb: Lvb,
        lvb_valid: bool,
    },
    Failed {
        req: ReqId,
        lock: Option<LockId>,
        error: LockError,
    },
    /// Blocking callback: give up or lower `lock`; someone wants `wanted`.
    Blocking {
        lock: LockId,
        wanted: Mode,
    },
    Unlocked {
        req: ReqId,
        lock: LockId,
    },
    Done {
        req: ReqId,
    },
    Status {
        req: ReqId,
        status: CoreStatus,
    },
    Locks {
        req: ReqId,
        resources: Vec<ResourceView>,
    },
    /// The session ended without the client asking (node declared down, daemon restarted or
    /// resynchronised). Every lock it held is void; the connection closes.
    Ended {
        reason: EndReason,
    },
    /// A protocol error; the daemon closes the connection after sending it.
    Error {
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_common::frame::{decode_from_buf, encode, Channel};

    #[test]
    fn every_message_round_trips() {
        let reqs = vec![
            ClientRequest::Hello {
                min_version: 1,
                max_version: 1,
                client: "t".into(),
                open_session: true,
            },
            ClientRequest::Lock {
                req: ReqId(1),
                lockspace: "c:f".into(),
                resource: vec![0, 1, 255],
                mode: Mode::EX,
                flags: Flags::NOQUEUE,
            },
            ClientRequest::Convert {
                req: ReqId(2),
                lock: LockId(3),
                mode: Mode::PR,
                flags: Flags::QUECVT,
                lvb: Some([5; 32]),
            },
            ClientRequest::Unlock {
                req: ReqId(3),
                lock: LockId(3),
                lvb: None,
            },
            ClientRequest::Cancel {
                req: ReqId(4),
                lock: LockId(3),
            },
            ClientRequest::CancelRequest {
                req: ReqId(10),
                target: ReqId(1),
            },
            ClientRequest::FenceAck {
                req: ReqId(5),
                node: NodeId(2),
            },
            ClientRequest::RecoveryDone {
                req: ReqId(6),
                node: NodeId(2),
                lockspace: "c:f".into(),
            },
            ClientRequest::Member {
                req: ReqId(7),
                change: MemberChange::AddVoter(NodeId(4)),
            },
            ClientRequest::Status { req: ReqId(8) },
            ClientRequest::Locks {
                req: ReqId(9),
                lockspace: "c:f".into(),
            },
        ];
        for r in reqs {
            let f = encode(Channel::LockClient, &r).unwrap();
            let (back, _): (ClientRequest, usize) =
                decode_from_buf(&f, Channel::LockClient, MAX_REQUEST_FRAME_BYTES)
                    .unwrap()
                    .unwrap();
            assert_eq!(back, r);
        }
        let replies = vec![
            ClientReply::Granted {
                req: ReqId(1),
                lock: LockId(2),
                mode: Mode::CW,
                token: FencingToken(9),
                lvb: [1; 32],
                lvb_valid: false,
            },
            ClientReply::Failed {
                req: ReqId(1),
                lock: None,
                error: LockError::Invalid("x".into()),
            },
            ClientReply::Blocking {
                lock: LockId(1),
                wanted: Mode::EX,
            },
            ClientReply::Ended {
                reason: EndReason::NodeDown,
            },
        ];
        for r in replies {
            let f = encode(Channel::LockClient, &r).unwrap();
            let (back, _): (ClientReply, usize) =
                decode_from_buf(&f, Channel::LockClient, MAX_CLIENT_FRAME_BYTES)
                    .unwrap()
                    .unwrap();
            assert_eq!(back, r);
        }
    }

    #[test]
    fn garbage_never_panics() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(7);
        let good = encode(
            Channel::LockClient,
            &ClientRequest::Status { req: ReqId(1) },
        )
        .unwrap();
        for _ in 0..5000 {
            let mut buf = good.clone();
            for _ in 0..rng.gen_range(1..4) {
                let i = rng.gen_range(0..buf.len());
                buf[i] = rng.gen();
            }
            let _ = decode_from_buf::<ClientRequest>(&buf, Channel::LockClient, 1 << 16);
            let junk: Vec<u8> = (0..rng.gen_range(0..64)).map(|_| rng.gen()).collect();
            let _ = tandem_common::frame::decode_payload::<ClientRequest>(&junk);
        }
    }
}
