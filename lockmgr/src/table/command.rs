//! The lock table's inputs (`Command`, the Raft log entry payload) and outputs (`Effect`,
//! delivered to clients by the node owning the session), plus the errors that cross the wire.

use crate::types::{FencingToken, Flags, LockId, Lvb, Mode, ReqId, SessionId};
use serde::{Deserialize, Serialize};
use tandem_common::NodeId;

/// Raft log entry payload. Session commands carry the client's request id so that a
/// proposal re-sent after a leader change is applied once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    OpenSession {
        session: SessionId,
        client: String,
    },
    CloseSession {
        session: SessionId,
    },
    Lock {
        session: SessionId,
        req: ReqId,
        lockspace: String,
        resource: Vec<u8>,
        mode: Mode,
        flags: Flags,
    },
    Convert {
        session: SessionId,
        req: ReqId,
        lock: LockId,
        mode: Mode,
        flags: Flags,
        /// Written to the resource when lowering from PW/EX.
        lvb: Option<Lvb>,
    },
    Unlock {
        session: SessionId,
        req: ReqId,
        lock: LockId,
        /// Written to the resource when releasing a PW/EX lock.
        lvb: Option<Lvb>,
    },
    Cancel {
        session: SessionId,
        req: ReqId,
        lock: LockId,
    },
    /// Cancels the still-pending request `target` of this session (a client does not know
    /// the lock id of a new request until it is granted).
    CancelRequest {
        session: SessionId,
        req: ReqId,
        target: ReqId,
    },
    /// The leader stopped hearing from `node`: its sessions end and their granted locks are
    /// orphaned. `fenced` is set when quorum eviction already guarantees the node cannot act.
    NodeDown {
        node: NodeId,
        fenced: bool,
    },
    /// A daemon started with a new incarnation: sessions of its earlier incarnations are dead
    /// (their clients saw the socket close), so their locks are orphaned and already fenced.
    NodeRestart {
        node: NodeId,
        incarnation: u64,
    },
    /// Operator or Pacemaker confirmed `node` is fenced.
    FenceAck {
        session: SessionId,
        req: ReqId,
        node: NodeId,
    },
    /// A survivor replayed `node`'s journal for `lockspace`: purge its orphans there.
    RecoveryDone {
        session: SessionId,
        req: ReqId,
        node: NodeId,
        lockspace: String,
    },
}

/// Why a request failed; crosses the wire to clients.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum LockError {
    #[error("the session is not open (closed, evicted or never opened)")]
    NoSession,
    #[error("no such lock")]
    UnknownLock,
    #[error("the lock belongs to another session")]
    NotOwner,
    #[error("the request would block and NOQUEUE was given")]
    WouldBlock,
    #[error("conversion deadlock: this conversion was cancelled")]
    Deadlock,
    #[error("the request was cancelled")]
    Cancelled,
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("the lock already has a request in progress")]
    Busy,
    #[error("the lock has no request in progress to cancel")]
    NotPending,
    #[error("the lock is not granted")]
    NotGranted,
    #[error("node {0} is up; fence-ack applies to failed nodes")]
    NodeNotDown(NodeId),
    #[error("node {0} is not fenced yet; run fence-ack first")]
    NodeNotFenced(NodeId),
    #[error("session refused: {0}")]
    Refused(String),
    /// The session holds the maximum number of locks (the limit); nothing was changed.
    #[error("too many locks: this session already holds the maximum of {0}; release some first")]
    TooManyLocks(u64),
    /// The whole lock table is at its maximum (the limit); nothing was changed.
    #[error("the lock table is full ({0} locks); release locks or close idle clients")]
    TableFull(u64),
}

/// Why a session ended without the client closing it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndReason {
    Closed,
    NodeDown,
    Restarted,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Effect {
    SessionOpened {
        session: SessionId,
    },
    SessionEnded {
        session: SessionId,
        reason: EndReason,
    },
    /// Completion callback: a request or conversion was granted.
    Granted {
        session: SessionId,
        req: ReqId,
        lock: LockId,
        mode: Mode,
        token: FencingToken,
        lvb: Lvb,
        lvb_valid: bool,
    },
    Failed {
        session: SessionId,
        req: ReqId,
        lock: Option<LockId>,
        error: LockError,
    },
    /// Blocking callback: `lock` stands in the way of a request for `wanted`.
    Blocking {
        session: SessionId,
        lock: LockId,
        wanted: Mode,
    },
    Unlocked {
        session: SessionId,
        req: ReqId,
        lock: LockId,
    },
    /// An administrative command (fence-ack, recovery-done) succeeded.
    Done {
        session: SessionId,
        req: ReqId,
    },
}

impl Effect {
    pub fn session(&self) -> SessionId {
        match self {
            Effect::SessionOpened { session }
            | Effect::SessionEnded { session, .. }
            | Effect::Granted { session, .. }
            | Effect::Failed { session, .. }
            | Effect::Blocking { session, .. }
            | Effect::Unlocked { session, .. }
            | Effect::Done { session, .. } => *session,
        }
    }
}
