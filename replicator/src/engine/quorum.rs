//! Quorum of a resource on this node: who votes, and the tiebreaker's side of it (see
//! `tiebreak.rs` for the rules). A disk node counts itself, its connected disk peers and
//! the tiebreakers that vouch for its generation; a tiebreaker counts its connections.

use std::time::Duration;

use tandem_common::config::Quorum;
use tandem_common::NodeId;

use super::sync::SessionEnd;
use super::tiebreak::{self, DiskNode, Own, Tiebreaker};
use super::{Conn, Resource};
use crate::proto::PeerMsg;
use crate::state::DiskState;

/// How long a write waits for a tiebreaker to confirm our new generation before it fails
/// for lack of quorum. A confirmation takes one round trip; this covers a busy peer.
const TIEBREAK_CONFIRM: Duration = Duration::from_secs(5);

impl Resource {
    /// Nodes needed for quorum (0 = quorum off). Tiebreakers are members and count.
    pub fn quorum_needed(&self) -> usize {
        let total = 1 + self.settings.peers.len();
        match self.settings.quorum {
            Quorum::Off => 0,
            Quorum::Majority => total / 2 + 1,
            Quorum::All => total,
            Quorum::Nodes(n) => n as usize,
        }
    }

    pub fn is_tiebreaker(&self, peer: NodeId) -> bool {
        self.settings.tiebreakers.contains(&peer)
    }

    fn own_generation(&self) -> Own {
        // One lock at a time: never hold `sb_cache` while taking `inner`.
        let disk = self.disk();
        let sb = self.sb_cache.lock();
        Own {
            disk,
            current: sb.current_uuid,
            history: sb.history_uuids,
        }
    }

    /// Connected disk peers and our view of every tiebreaker.
    fn voters(&self) -> (usize, Vec<(NodeId, Tiebreaker)>) {
        let inner = self.inner.lock();
        let mut disk = 0;
        let mut tbs = Vec::new();
        for (id, p) in &inner.peers {
            if self.is_tiebreaker(*id) {
                let known = p.state.as_ref().map_or(0, |s| s.current_uuid);
                let connected = p.conn.is_some();
                tbs.push((*id, Tiebreaker { connected, known }));
            } else if p.conn.is_some() {
                disk += 1;
            }
        }
        (disk, tbs)
    }

    /// Votes now and once the tiebreakers have caught up, with `disk_votes` disk peers
    /// (`None` = the connected ones).
    fn votes(&self, disk_votes: Option<usize>) -> (usize, usize) {
        let (connected, tbs) = self.voters();
        let tbs: Vec<Tiebreaker> = tbs.into_iter().map(|(_, t)| t).collect();
        if self.settings.diskless {
            let all = 1 + connected + tbs.iter().filter(|t| t.connected).count();
            return (all, all);
        }
        tiebreak::votes(
            disk_votes.unwrap_or(connected),
            &tbs,
            &self.own_generation(),
        )
    }

    /// Per tiebreaker peer: whether its vote counts for us now (disk nodes only).
    pub(super) fn tiebreaker_votes(&self) -> std::collections::BTreeMap<NodeId, bool> {
        if self.settings.diskless {
            return Default::default();
        }
        let me = self.own_generation();
        let (_, tbs) = self.voters();
        tbs.into_iter()
            .map(|(id, t)| (id, tiebreak::vouches(&t, &me)))
            .collect()
    }

    /// This node, its connected peers and the tiebreakers that vouch form a quorum.
    pub fn has_quorum(&self) -> bool {
        // Quorum off: nothing to count (this runs on every write).
        let needed = self.quorum_needed();
        needed == 0 || self.votes(None).0 >= needed
    }

    /// Whether `disk_votes` disk peers (`None` = the connected ones, re-read at every
    /// check) and the vouching tiebreakers are a quorum. When only a tiebreaker's
    /// confirmation of our generation is missing, waits for it (briefly).
    pub(super) async fn await_quorum(&self, disk_votes: Option<usize>) -> bool {
        let needed = self.quorum_needed();
        // Enough without any tiebreaker: the common case of a write acked by its peers.
        if disk_votes.is_some_and(|d| 1 + d >= needed) {
            return true;
        }
        let deadline = tokio::time::Instant::now() + TIEBREAK_CONFIRM;
        loop {
            let notified = self.quorum_changed.notified();
            let (now, soon) = self.votes(disk_votes);
            if now >= needed {
                return true;
            }
            if soon < needed || self.is_down() {
                return false;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// Tiebreaker side: recomputes the generation we vouch for from what the disk nodes
    /// reported, and tells every peer when it changed.
    pub(super) async fn tiebreaker_observe(&self) {
        if !self.settings.diskless {
            return;
        }
        let nodes: Vec<DiskNode> = {
            let inner = self.inner.lock();
            inner
                .peers
                .iter()
                .filter(|(id, _)| !self.is_tiebreaker(**id))
                .map(|(_, p)| {
                    let st = p.state.as_ref().filter(|_| p.conn.is_some());
                    DiskNode {
                        connected: st.is_some(),
                        disk: st.map_or(DiskState::DUnknown, |s| s.disk),
                        current: st.map_or(0, |s| s.current_uuid),
                        history: st.map_or([0, 0], |s| s.history_uuids),
                    }
                })
                .collect()
        };
        let known = self.sb_cache.lock().current_uuid;
        let next = tiebreak::adopt(known, &nodes);
        if next == known {
            return;
        }
        tracing::info!(resource = %self.name(), from = format_args!("{known:016X}"),
            to = format_args!("{next:016X}"), "tiebreaker: now vouching for this data generation");
        if self.persist(|sb| sb.current_uuid = next).await.is_ok() {
            self.broadcast_state().await;
        }
    }

    /// Tiebreaker side: a disk node minted a new generation (`Uuids`).
    pub(super) async fn tiebreaker_heard_uuids(
        &self,
        conn: &Conn,
        current: u64,
        history: [u64; 2],
    ) {
        self.update_peer(conn.peer, |p| {
            if let Some(s) = p.state.as_mut() {
                s.current_uuid = current;
                s.history_uuids = history;
            }
        });
        self.tiebreaker_observe().await;
    }

    /// Tiebreaker side of the ordered stream: only generation news matters; data for a
    /// disk we do not have means the peers' config differs from ours.
    pub(super) async fn tiebreaker_apply(
        &self,
        conn: &Conn,
        msg: PeerMsg,
    ) -> Result<(), SessionEnd> {
        match msg {
            PeerMsg::Uuids {
                current, history, ..
            } => {
                self.tiebreaker_heard_uuids(conn, current, history).await;
                Ok(())
            }
            // The sender's State with the new generation follows.
            PeerMsg::NewCurrentUuid { .. } => Ok(()),
            // We never write, so there is nothing to mint or to wait for.
            PeerMsg::Topology { seq } => {
                conn.send(&PeerMsg::TopologyAck { seq }).await;
                Ok(())
            }
            PeerMsg::TopologyAck { seq } => {
                conn.complete(seq, Ok(()));
                Ok(())
            }
            PeerMsg::PeerAck { .. } => Ok(()),
            PeerMsg::Write { seq, .. } | PeerMsg::Zero { seq, .. } | PeerMsg::Flush { seq } => {
                conn.send(&PeerMsg::NegAck {
                    seq,
                    reason: "this node is a diskless tiebreaker and stores no data".into(),
                })
                .await;
                Ok(())
            }
            other => Err(SessionEnd {
                reason: format!(
                    "{} sent to a diskless tiebreaker: the peer's cluster.toml gives this node a disk; use the same cluster.toml on every node",
                    other.kind()
                ),
                standalone: true,
            }),
        }
    }
}
