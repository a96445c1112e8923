//! Joins and the writer's generation, with three or more nodes.
//!
//! "Same current generation" must keep meaning "same data, except the blocks the newer
//! side holds bits for". A writer mints a new generation when its own links change, but a
//! node can also reach the writer's generation through a third node (a resync from it, or
//! a connect without one). If the writer, not connected to that node, kept writing in the
//! same generation, the node would claim the writer's generation without its writes, and a
//! later connect could pick the stale copy (four-node seed 2797 of the simulation).
//!
//! So a join is confirmed by the neighbours first: the joining side sends `Topology` to
//! every other connected peer; a peer marks its topology changed (it mints before its next
//! write that misses a peer), waits until every application write that passed its
//! generation check has been queued (`topology_gate`), and answers `TopologyAck` on the
//! same stream — after those writes, so the sender has tracked them for the joining node
//! when the ack arrives (acks are applied in stream order). A neighbour that does not
//! answer in time is disconnected: losing it is itself a topology change on both sides.
//!
//! And a resync target inherits the source's bitmaps for third peers (`SyncDone`), so
//! what it tells them about itself is what the source knew.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tandem_common::NodeId;

use super::core::{dirty_runs, inherit_bits};
use super::{Conn, Resource};
use crate::proto::{PeerMsg, ThirdPeerView};

/// How long a neighbour may take to confirm a join before it is disconnected.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

impl Resource {
    /// Tells every connected peer except `joining` that it joined our generation, and
    /// waits for each to confirm (or disconnects it).
    pub(super) async fn confirm_join(self: &Arc<Self>, joining: NodeId) {
        if self.settings.diskless {
            return; // a tiebreaker holds no generation anyone could join
        }
        let mut waits = Vec::new();
        for c in self.connections() {
            if c.peer == joining {
                continue;
            }
            let seq = self.next_seq();
            let rx = c.expect_ack(seq);
            if c.send(&PeerMsg::Topology { seq }).await {
                waits.push((c, rx));
            }
        }
        for (c, rx) in waits {
            match tokio::time::timeout(CONFIRM_TIMEOUT, rx).await {
                Ok(Ok(Ok(()))) => {}
                // Gone while we asked: its own disconnect handling marks the change.
                Ok(_) if c.is_closed() => {}
                _ => {
                    tracing::warn!(resource = %self.name(), peer = %c.peer, joining = %joining,
                        "peer did not confirm a node joining our generation in time: disconnecting it");
                    c.close();
                }
            }
        }
    }

    /// `Topology` from `conn`'s peer: one of its peers joined its generation.
    pub(super) fn on_topology(self: &Arc<Self>, conn: &Arc<Conn>, seq: u64) {
        // Writes that check from now on mint first.
        self.conn_changed.store(true, Ordering::Release);
        // Answer once every write past its generation check has been queued (to this peer
        // too, ahead of the answer). Not on the apply task: a write holding the gate may be
        // waiting for room on a link whose peer waits on us the same way.
        let (me, conn) = (self.clone(), conn.clone());
        tokio::spawn(async move {
            drop(me.topology_gate.write().await);
            conn.send(&PeerMsg::TopologyAck { seq }).await;
        });
    }

    /// Our hot extents, if we are a crashed Primary and some disk peer other than
    /// `target` is not connected and in sync with us (it may get a survivor's copy of them,
    /// so `target` must be ready to take that copy too). Returns (crashed, extents; `None` = unknown).
    pub(super) fn crashed_extents_after_syncing(&self, target: NodeId) -> (bool, Option<Vec<u64>>) {
        if self.sb_cache.lock().flags & crate::meta::format::FLAG_CRASHED_PRIMARY == 0 {
            return (false, None);
        }
        let others_synced = self
            .inner
            .lock()
            .peers
            .iter()
            .filter(|(id, _)| **id != target && !self.is_tiebreaker(**id))
            .all(|(_, p)| p.conn.is_some() && p.repl == super::ReplState::Established);
        if others_synced {
            return (false, None);
        }
        (true, self.crashed_extents.lock().clone())
    }

    /// What we know of our peers other than `target`, for its `SyncDone`.
    pub(super) fn third_peer_views(&self, target: NodeId) -> Vec<ThirdPeerView> {
        let sb = self.sb_cache.lock().clone();
        let bms = self.bitmaps.lock();
        sb.peers
            .iter()
            .filter(|p| p.node_id != target)
            .map(|p| ThirdPeerView {
                node: p.node_id,
                bitmap_uuid: p.bitmap_uuid,
                runs: bms
                    .get(&p.node_id)
                    .map_or(Some(Vec::new()), |(_, bm)| dirty_runs(bm)),
            })
            .collect()
    }

    /// Adds the source's bitmaps for third peers to ours (in memory); returns the peers
    /// we keep a bitmap for (the caller persists them, then their bitmap generations).
    pub(super) fn inherit_third_peers(&self, views: &[ThirdPeerView]) -> Vec<NodeId> {
        let mut bms = self.bitmaps.lock();
        let mut done = BTreeSet::new();
        for v in views {
            if v.node == self.settings.node_id {
                continue;
            }
            if let Some((_, bm)) = bms.get_mut(&v.node) {
                inherit_bits(bm, v);
                done.insert(v.node);
            }
        }
        done.into_iter().collect()
    }
}
