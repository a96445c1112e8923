//! The replica's interface types: tuning, the durable sink it writes through, errors,
//! liveness probes, what `process()` returns, and the status it reports.

use crate::log_cache::{LogCache, LogRecord};
use crate::table::Effect;
use raft::prelude::Message;
use serde::{Deserialize, Serialize};
use tandem_common::NodeId;

/// Tuning of one replica; all durations in ticks.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub id: NodeId,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Re-propose an unapplied command after this long (leader change, lost message).
    pub retry_ticks: u64,
    /// A node that hears no leader this long ends its own sessions (clients must stop).
    pub self_fence_ticks: u64,
    /// The leader declares a voter down after hearing nothing from it this long. Must exceed
    /// `self_fence_ticks + election_ticks` so a cut-off node always fences itself first.
    pub node_dead_ticks: u64,
    pub snapshot_every_entries: u64,
    /// With at least three voters a declared-down node is considered fenced by quorum loss.
    pub quorum_fencing: bool,
    /// Witnesses vote and store the log but serve no clients.
    pub witness: bool,
    /// Election timeout range `[min, max)` in ticks; `None` = raft-rs default
    /// `[election, 2 * election)`. The simulation pins it because raft-rs draws the timeout
    /// from the thread RNG, which would make runs unreproducible.
    pub election_ticks_range: Option<(usize, usize)>,
}

impl CoreConfig {
    pub fn new(id: NodeId, election_ticks: usize, heartbeat_ticks: usize) -> Self {
        let e = election_ticks as u64;
        Self {
            id,
            election_ticks,
            heartbeat_ticks,
            retry_ticks: e,
            self_fence_ticks: 4 * e,
            node_dead_ticks: 8 * e,
            snapshot_every_entries: 10_000,
            quorum_fencing: true,
            witness: false,
            election_ticks_range: None,
        }
    }
}

/// Where durable records go: a WAL file in the daemon, a kept copy in the simulation.
pub trait LogSink {
    fn write(&mut self, rec: &LogRecord) -> Result<(), SinkError>;
    /// Makes every earlier write durable (one fsync for the whole Ready: group commit).
    fn sync(&mut self) -> Result<(), SinkError>;
    /// Called after a snapshot record: the sink may rewrite itself from `log` to drop
    /// compacted entries.
    fn compact(&mut self, log: &LogCache) -> Result<(), SinkError>;
}

#[derive(Debug, thiserror::Error)]
#[error("durable log failure: {0}")]
pub struct SinkError(pub String);

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("log record does not fit the log: {0}")]
    Log(#[from] crate::log_cache::LogCacheError),
    #[error("snapshot is unreadable: {0}")]
    Snapshot(String),
    #[error("the replica stopped after an earlier durable-log failure")]
    Poisoned,
}

/// Liveness probes beside Raft. A follower pings its leader every heartbeat interval and
/// trusts its sessions only while the leader answers: round-trip evidence, so a one-way cut
/// (leader hears nothing, follower still hears heartbeats) cannot leave a follower's
/// clients holding locks that the leader has already declared orphaned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Probe {
    /// Sent at the sender's tick `0`.
    Ping(u64),
    /// Echo of a `Ping`, only from a node that is leader when it receives the ping.
    Pong(u64),
}

/// What one `process()` produced.
#[derive(Debug, Default)]
pub struct Output {
    pub messages: Vec<Message>,
    pub probes: Vec<(NodeId, Probe)>,
    /// Effects for sessions of this node's current incarnation, in log order.
    pub effects: Vec<Effect>,
}

/// A membership change requested by an operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberChange {
    AddVoter(NodeId),
    AddLearner(NodeId),
    Remove(NodeId),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeHealth {
    pub node: NodeId,
    pub up: bool,
    pub fenced: bool,
    pub orphaned_locks: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CoreStatus {
    pub id: NodeId,
    pub role: String,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_index: u64,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    pub sessions: usize,
    pub last_token: u64,
    pub nodes: Vec<NodeHealth>,
}
