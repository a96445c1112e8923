//! Peer acks: a Primary that crashes in the middle of a write may have reached some of
//! its targets and not others. The survivors are then at the same generation with
//! different data and no bits to say so (gap (b) of docs/SEMANTICS.md before this).
//!
//! So a receiver keeps every write it applied "unconfirmed" until the writer reports,
//! with `PeerAck`, that every target has it (or which ones failed it: the receiver tracks
//! the blocks for those). If the connection to the writer ends first, the receiver marks
//! the unconfirmed blocks for the writer's other targets and for the writer itself (it
//! may come back without them: a crashed Primary takes a survivor's copy of its hot
//! extents), and the next decision resyncs them. DRBD 9 does the same with its peer acks.
//! Protocol A sends no acks, so nothing is tracked there.

use std::collections::BTreeMap;
use std::sync::Arc;

use tandem_common::NodeId;

use super::bitmap::DirtyBitmap;
use super::{EngineError, Resource};

/// One applied write the writer has not yet confirmed on every target.
#[derive(Clone, Debug)]
pub(super) struct Unconfirmed {
    offset: u64,
    len: u64,
    /// The peers the writer missed (from the `Write`; usually none, so no allocation).
    /// Its other targets are derived from this only if it goes before confirming.
    missing: Vec<NodeId>,
}

/// Unconfirmed writes per writer, by sequence number.
pub(super) type UnconfirmedWrites = BTreeMap<NodeId, BTreeMap<u64, Unconfirmed>>;

impl Resource {
    /// A write from `writer` was applied here (before we acknowledge it).
    pub(super) fn note_unconfirmed(
        &self,
        writer: NodeId,
        seq: u64,
        offset: u64,
        len: u64,
        missing: &[NodeId],
    ) {
        self.unconfirmed.lock().entry(writer).or_default().insert(
            seq,
            Unconfirmed {
                offset,
                len,
                missing: missing.to_vec(),
            },
        );
    }

    /// `PeerAck` from `writer`: the write is on every target but `lost`.
    pub(super) async fn on_peer_ack(
        &self,
        writer: NodeId,
        seq: u64,
        lost: &[NodeId],
    ) -> Result<(), EngineError> {
        let entry = self
            .unconfirmed
            .lock()
            .get_mut(&writer)
            .and_then(|m| m.remove(&seq));
        match entry {
            Some(u) if !lost.is_empty() => self.record_received_write(lost, u.offset, u.len).await,
            _ => Ok(()),
        }
    }

    /// The connection to `writer` ended: its unconfirmed writes may be missing on its
    /// other targets, or on itself. Marks them (durably, one bitmap write per peer) and
    /// returns whether any were.
    pub(super) async fn unconfirmed_lost(self: &Arc<Self>, writer: NodeId) -> bool {
        let Some(writes) = self.unconfirmed.lock().remove(&writer) else {
            return false;
        };
        if writes.is_empty() {
            return false;
        }
        tracing::info!(resource = %self.name(), %writer, writes = writes.len(),
            "writer gone before confirming its last writes on every node: marking them for resync");
        // The writer and its other disk targets; writes that missed the same peers share
        // one set (almost always all of them).
        let mut by_peers: BTreeMap<Vec<NodeId>, DirtyBitmap> = BTreeMap::new();
        for u in writes.values() {
            let peers: Vec<NodeId> = self
                .settings
                .peers
                .iter()
                .map(|(id, _)| *id)
                .filter(|id| *id == writer || (!u.missing.contains(id) && !self.is_tiebreaker(*id)))
                .collect();
            by_peers
                .entry(peers)
                .or_insert_with(|| DirtyBitmap::new(self.usable_bytes))
                .set_range(u.offset, u.len);
        }
        for (peers, blocks) in &by_peers {
            if let Err(e) = self.mark_blocks_for(peers, blocks).await {
                tracing::error!(resource = %self.name(), error = %e, "cannot record unconfirmed writes");
                return false;
            }
        }
        true
    }
}
