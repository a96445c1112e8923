//! `tandemadm status` data, shaped like `drbdsetup status --json` (documented in
//! docs/STATUS.md): one object per resource with devices and connections.

use serde::{Deserialize, Serialize};

use super::Resource;
use crate::state::{ConnState, DiskState, ReplState, Role};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SyncProgressView {
    pub total_bytes: u64,
    pub done_bytes: u64,
    #[serde(rename = "percent-done")]
    pub percent_done: f64,
    #[serde(rename = "speed-bytes-per-s")]
    pub speed_bytes_per_s: u64,
    #[serde(rename = "eta-s")]
    pub eta_s: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct PeerStatus {
    pub peer_node_id: u8,
    pub name: String,
    pub connection_state: ConnState,
    pub peer_role: Role,
    pub replication_state: ReplState,
    pub peer_disk_state: DiskState,
    /// Bytes that still differ (the resync's remaining work).
    pub out_of_sync_bytes: u64,
    pub percent_in_sync: f64,
    pub sync: Option<SyncProgressView>,
    /// Online verify in progress against this peer.
    pub verify: Option<SyncProgressView>,
    /// Blocks the last completed verify found different.
    pub last_verify_out_of_sync_blocks: Option<u64>,
    pub last_error: Option<String>,
    /// The peer is a diskless tiebreaker (DRBD's `peer-client:yes`).
    #[serde(default)]
    pub peer_client: bool,
    /// For a tiebreaker peer: whether its vote counts for us now (it vouches for our data
    /// generation; see docs/SEMANTICS.md).
    #[serde(default)]
    pub tiebreaker_vote: Option<bool>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ResourceStatus {
    pub name: String,
    pub node_id: u8,
    pub role: Role,
    pub disk_state: DiskState,
    pub size_bytes: u64,
    pub current_uuid: String,
    pub history_uuids: Vec<String>,
    pub crashed_primary: bool,
    pub protocol: String,
    pub io_engine: String,
    pub writes: u64,
    pub written_bytes: u64,
    pub reads: u64,
    pub resync_sent_bytes: u64,
    pub resync_received_bytes: u64,
    pub concurrent_write_conflicts: u64,
    /// Application writes that waited for a peer's connection handshake to finish.
    #[serde(default)]
    pub handshake_waits: u64,
    /// Whether this node has quorum (always true with `quorum = off`).
    pub quorum: bool,
    /// This node is a diskless tiebreaker (DRBD's `client:yes`).
    #[serde(default)]
    pub client: bool,
    pub connections: Vec<PeerStatus>,
}

impl Resource {
    pub fn status(&self) -> ResourceStatus {
        use std::sync::atomic::Ordering::Relaxed;
        let g = self.generation();
        let dirty: std::collections::BTreeMap<_, _> = self
            .settings
            .peers
            .iter()
            .map(|(id, _)| (*id, self.bitmap_dirty_bytes(*id)))
            .collect();
        let quorum = self.has_quorum();
        let vouching = self.tiebreaker_votes();
        let inner = self.inner.lock();
        let connections = inner
            .peers
            .iter()
            .map(|(id, p)| {
                let view = |s: &super::SyncProgress| {
                    let secs = s.started.elapsed().as_secs_f64().max(1e-3);
                    let speed = (s.done_bytes as f64 / secs) as u64;
                    let left = s.total_bytes.saturating_sub(s.done_bytes);
                    SyncProgressView {
                        total_bytes: s.total_bytes,
                        done_bytes: s.done_bytes,
                        percent_done: if s.total_bytes == 0 {
                            100.0
                        } else {
                            (s.done_bytes as f64 * 1000.0 / s.total_bytes as f64).floor() / 10.0
                        },
                        speed_bytes_per_s: speed,
                        eta_s: (speed > 0).then(|| left / speed),
                    }
                };
                let sync = p.sync.as_ref().map(view);
                let verify = p.verify.as_ref().map(view);
                let connected = p.conn.is_some();
                let peer_disk = match (&p.state, connected) {
                    (Some(s), true) => s.disk,
                    _ => DiskState::DUnknown,
                };
                let out_of_sync = match (&sync, p.repl) {
                    (Some(s), _) => s.total_bytes - s.done_bytes.min(s.total_bytes),
                    (None, ReplState::Established) => 0,
                    (None, _) if peer_disk == DiskState::Inconsistent => self.usable_bytes,
                    // Disconnected: what our bitmap says the peer is missing.
                    _ => dirty.get(id).copied().unwrap_or(0),
                };
                PeerStatus {
                    peer_node_id: id.0,
                    name: p.name.clone(),
                    connection_state: p.conn_state,
                    peer_role: match (&p.state, connected) {
                        (Some(s), true) => s.role,
                        _ => Role::Unknown,
                    },
                    replication_state: if p.awaiting_source && p.repl == ReplState::Established {
                        ReplState::WFBitMapT
                    } else {
                        p.repl
                    },
                    peer_disk_state: peer_disk,
                    out_of_sync_bytes: out_of_sync,
                    percent_in_sync: if self.usable_bytes == 0 {
                        100.0
                    } else {
                        100.0
                            - (out_of_sync as f64 * 1000.0 / self.usable_bytes as f64).ceil() / 10.0
                    },
                    sync,
                    verify,
                    last_verify_out_of_sync_blocks: p.last_verify_oos_blocks,
                    last_error: p.last_error.clone(),
                    peer_client: self.is_tiebreaker(*id),
                    tiebreaker_vote: vouching.get(id).copied(),
                }
            })
            .collect();
        ResourceStatus {
            name: self.settings.name.clone(),
            node_id: self.settings.node_id.0,
            role: inner.role,
            disk_state: inner.disk,
            size_bytes: self.usable_bytes,
            current_uuid: format!("{:016X}", g.current),
            history_uuids: g.history.iter().map(|h| format!("{h:016X}")).collect(),
            crashed_primary: g.crashed,
            protocol: format!("{:?}", self.settings.protocol),
            io_engine: self.backing.engine_name().to_string(),
            writes: self.stats.writes.load(Relaxed),
            written_bytes: self.stats.written_bytes.load(Relaxed),
            reads: self.stats.reads.load(Relaxed),
            resync_sent_bytes: self.stats.resync_sent_bytes.load(Relaxed),
            resync_received_bytes: self.stats.resync_received_bytes.load(Relaxed),
            concurrent_write_conflicts: self.stats.conflicts.load(Relaxed),
            handshake_waits: self.stats.handshake_waits.load(Relaxed),
            quorum,
            client: self.settings.diskless,
            connections,
        }
    }
}
