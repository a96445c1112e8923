//! Dirty-bitmap bookkeeping on the write path: before a write that some peer will not get
//! is acknowledged, that peer gets a bitmap generation (minting a new current generation
//! the first time) and the write's blocks are set in its bitmap and made durable. A later
//! reconnect then resyncs exactly those blocks.

use std::sync::atomic::Ordering;

use tandem_common::NodeId;

use super::core::{assign_bitmap_generation, needs_bitmap_generation, track_missing};
use super::{Conn, EngineError, Resource};
use crate::proto::PeerMsg;

/// Bitmap pages to write, by peer. Their bytes are copied only under the metadata lock
/// (`persist_bitmap_pages`): a copy taken before it could be older than one another task
/// wrote meanwhile, and writing it last would lose that task's bits on disk.
type PagesByPeer = Vec<(NodeId, Vec<usize>)>;

/// Page bytes to write, by metadata slot.
type PageBytesBySlot = Vec<(usize, Vec<(usize, Vec<u8>)>)>;

impl Resource {
    /// Records that `missing` peers did not get `[offset, offset+len)`.
    pub(super) async fn record_missed_write(
        &self,
        missing: &[NodeId],
        offset: u64,
        len: u64,
    ) -> Result<(), EngineError> {
        if missing.is_empty() {
            return Ok(());
        }
        self.ensure_bitmap_generation(missing).await?;
        let changed = self.set_bits(missing, offset, len);
        self.persist_bitmap_pages(changed).await
    }

    /// Sets the bits of `[offset, offset+len)` for `peers`; returns the pages to persist
    /// before the write is acknowledged: those it changed, and those whose bits another
    /// write set and has not finished persisting (finding a bit already set in memory
    /// does not mean it is on disk).
    fn set_bits(&self, peers: &[NodeId], offset: u64, len: u64) -> PagesByPeer {
        let mut bms = self.bitmaps.lock();
        let mut pending = self.bitmap_unpersisted.lock();
        let mut out = Vec::new();
        for p in peers {
            if let Some((_, bm)) = bms.get_mut(p) {
                pending.changed(*p, bm.set_range(offset, len));
                let pages = pending.to_persist(*p, bm.pages_of(offset, len));
                if !pages.is_empty() {
                    out.push((*p, pages));
                }
            }
        }
        out
    }

    /// Writes the named pages as they are *now*: the bytes are copied under the metadata
    /// lock, so whichever task writes a page last writes every bit set before it began.
    /// A page leaves `bitmap_unpersisted` once written, unless it changed after the copy.
    async fn persist_bitmap_pages(&self, changed: PagesByPeer) -> Result<(), EngineError> {
        if changed.is_empty() {
            return Ok(());
        }
        let guard = self.meta.lock().await;
        let (Some(store), sb) = &*guard else {
            return Ok(());
        };
        let mut copied = Vec::new();
        let by_slot: PageBytesBySlot = {
            let bms = self.bitmaps.lock();
            let pending = self.bitmap_unpersisted.lock();
            changed
                .iter()
                .filter_map(|(peer, pages)| {
                    let (slot, bm) = bms.get(peer)?;
                    copied.extend(pending.copy(*peer, pages));
                    Some((
                        *slot,
                        pages.iter().map(|&pg| (pg, bm.page_bytes(pg))).collect(),
                    ))
                })
                .collect()
        };
        tokio::task::block_in_place(|| {
            for (slot, pages) in &by_slot {
                store.write_bitmap_pages(sb, *slot, pages)?;
            }
            Ok::<_, crate::meta::MetaError>(())
        })?;
        let _bms = self.bitmaps.lock();
        self.bitmap_unpersisted.lock().written(copied);
        Ok(())
    }

    /// Persists the whole bitmap of one peer (after a resync cleared it, or set it).
    pub(super) async fn persist_whole_bitmap(&self, peer: NodeId) -> Result<(), EngineError> {
        let pages = self
            .bitmaps
            .lock()
            .get(&peer)
            .map(|(_, bm)| (0..bm.page_count()).collect::<Vec<_>>());
        match pages {
            Some(pages) => self.persist_bitmap_pages(vec![(peer, pages)]).await,
            None => Ok(()),
        }
    }

    /// After `mint_after_rollback` persisted our new generation (with `SyncDone`): tell the
    /// source, which adopts it, and log it.
    pub(super) async fn announce_rollback_mint(&self, source: &Conn, tracked: Vec<NodeId>) {
        let g = self.generation();
        tracing::info!(resource = %self.name(), source = %source.peer,
            current = format_args!("{:016X}", g.current),
            "rolled back unacknowledged writes of a crashed Primary: new current generation, resyncing third peers from it");
        source
            .send(&PeerMsg::Uuids {
                current: g.current,
                history: g.history,
                missing: tracked,
            })
            .await;
    }

    /// Gives each missing peer without one a bitmap generation (our current), and then
    /// mints a new current generation so the divergence is visible at reconnect.
    pub(super) async fn ensure_bitmap_generation(
        &self,
        missing: &[NodeId],
    ) -> Result<(), EngineError> {
        // A connection came or went since our last generation: a missing peer may have
        // caught up to our current through a third node, so mint even if it has a bitmap.
        let changed = !missing.is_empty() && self.conn_changed.load(Ordering::Acquire);
        if !changed && !needs_bitmap_generation(&self.sb_cache.lock(), missing) {
            return Ok(());
        }
        let _g = self.rotation_lock.lock().await;
        let fresh = rand::random::<u64>() | 1;
        let mut minted = false;
        self.persist(|sb| minted = assign_bitmap_generation(sb, missing, fresh, changed))
            .await?;
        self.conn_changed.store(false, Ordering::Release);
        if minted {
            let g = self.generation();
            tracing::info!(resource = %self.name(), ?missing, current = format_args!("{:016X}", g.current),
                "new current generation; dirty bitmap started for the missing peer(s)");
            let msg = PeerMsg::Uuids {
                current: g.current,
                history: g.history,
                missing: missing.to_vec(),
            };
            for c in self.connections() {
                if !missing.contains(&c.peer) {
                    c.send(&msg).await;
                }
            }
        }
        Ok(())
    }

    /// Protocols A and B: after a connection that carried writes breaks we do not know
    /// which of them arrived, so the whole volume is marked for that peer.
    pub(super) async fn mark_all_for(&self, peer: NodeId) -> Result<(), EngineError> {
        self.ensure_bitmap_generation(&[peer]).await?;
        if let Some((_, bm)) = self.bitmaps.lock().get_mut(&peer) {
            bm.set_all();
        }
        self.persist_whole_bitmap(peer).await
    }

    /// A peer's write (or its new generation) reached us but not `missing`: track them
    /// too, without minting (the writer minted), so whichever node later resyncs them
    /// sends this block. Durable before we acknowledge.
    pub(super) async fn record_received_write(
        &self,
        missing: &[NodeId],
        offset: u64,
        len: u64,
    ) -> Result<(), EngineError> {
        let mine: Vec<NodeId> = missing
            .iter()
            .copied()
            .filter(|p| *p != self.settings.node_id)
            .collect();
        if mine.is_empty() {
            return Ok(());
        }
        self.track_missing_peers(&mine).await?;
        if len == 0 {
            return Ok(());
        }
        let changed = self.set_bits(&mine, offset, len);
        self.persist_bitmap_pages(changed).await
    }

    /// Marks every block set in `blocks` for `peers` (tracking them first), durably.
    pub(super) async fn mark_blocks_for(
        &self,
        peers: &[NodeId],
        blocks: &super::bitmap::DirtyBitmap,
    ) -> Result<(), EngineError> {
        if peers.is_empty() || blocks.count_bits() == 0 {
            return Ok(());
        }
        self.track_missing_peers(peers).await?;
        self.set_and_persist_bits(peers, blocks).await
    }

    /// Sets `blocks` in our bitmaps for `peers` and persists them; their bitmap generation
    /// is the caller's (now, as `mark_blocks_for` does, or with a later superblock write).
    pub(super) async fn set_and_persist_bits(
        &self,
        peers: &[NodeId],
        blocks: &super::bitmap::DirtyBitmap,
    ) -> Result<(), EngineError> {
        {
            let mut bms = self.bitmaps.lock();
            let mut pending = self.bitmap_unpersisted.lock();
            for p in peers {
                if let Some((_, bm)) = bms.get_mut(p) {
                    let mut from = 0;
                    while let Some((o, l)) = blocks.next_run(from, u64::MAX) {
                        pending.changed(*p, bm.set_range(o, l));
                        from = o + l;
                    }
                }
            }
        }
        for p in peers {
            self.persist_whole_bitmap(*p).await?;
        }
        Ok(())
    }

    /// Gives `missing` peers without one a bitmap generation (our current), no minting.
    pub(super) async fn track_missing_peers(&self, missing: &[NodeId]) -> Result<(), EngineError> {
        if needs_bitmap_generation(&self.sb_cache.lock(), missing) {
            self.persist(|sb| {
                track_missing(sb, missing);
            })
            .await?;
        }
        Ok(())
    }

    /// Bytes our bitmap says `peer` is missing.
    pub fn bitmap_dirty_bytes(&self, peer: NodeId) -> u64 {
        self.bitmaps
            .lock()
            .get(&peer)
            .map_or(0, |(_, bm)| bm.dirty_bytes())
    }

    pub(super) fn count_sent_write(&self, conn: &super::Conn) {
        conn.writes_sent.fetch_add(1, Ordering::Relaxed);
    }
}

/// Metadata pages (of a peer's bitmap, or of the activity log) whose bits were set in
/// memory and are not yet known to be on disk, each with a count of its changes. A write
/// that finds its bits already set must still wait for such a page to be written before
/// it goes on; a persist that copied a page at change `n` clears it only if no change
/// came after the copy. `K` names the bitmap (a peer, or `()` for the activity log).
pub(super) struct UnpersistedPages<K>(std::collections::BTreeMap<(K, usize), u64>);

impl<K> Default for UnpersistedPages<K> {
    fn default() -> Self {
        Self(std::collections::BTreeMap::new())
    }
}

/// A page as copied for writing: which, and at which change.
pub(super) type CopiedPage<K> = ((K, usize), u64);

impl<K: Ord + Copy> UnpersistedPages<K> {
    /// `pages` of bitmap `k` changed in memory.
    pub(super) fn changed(&mut self, k: K, pages: impl IntoIterator<Item = usize>) {
        for pg in pages {
            *self.0.entry((k, pg)).or_insert(0) += 1;
        }
    }

    /// Of the pages covering a write's bits, those not yet known to be on disk.
    pub(super) fn to_persist(&self, k: K, covering: impl Iterator<Item = usize>) -> Vec<usize> {
        covering
            .filter(|pg| self.0.contains_key(&(k, *pg)))
            .collect()
    }

    /// Notes the change counts of `pages` as they are copied for writing.
    pub(super) fn copy(&self, k: K, pages: &[usize]) -> Vec<CopiedPage<K>> {
        pages
            .iter()
            .filter_map(|pg| self.0.get(&(k, *pg)).map(|n| ((k, *pg), *n)))
            .collect()
    }

    /// The copies are on disk: pages not changed since are persisted.
    pub(super) fn written(&mut self, copied: Vec<CopiedPage<K>>) {
        for (key, n) in copied {
            if self.0.get(&key) == Some(&n) {
                self.0.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::UnpersistedPages;
    use tandem_common::NodeId;

    #[test]
    fn a_bit_already_set_is_not_durable_until_its_page_is_written() {
        let (p, mut u) = (NodeId(2), UnpersistedPages::<NodeId>::default());
        // Write A sets a bit in page 0 and starts persisting it.
        u.changed(p, [0]);
        assert_eq!(u.to_persist(p, 0..1), vec![0]);
        // Write B finds the bit set (no change) but must persist page 0 as well.
        u.changed(p, []);
        assert_eq!(u.to_persist(p, 0..1), vec![0]);
        let copy = u.copy(p, &[0]);
        u.written(copy);
        // Once written, a later write with the bit already set needs no persist.
        assert!(u.to_persist(p, 0..1).is_empty());
    }

    #[test]
    fn a_change_after_the_copy_keeps_the_page_pending() {
        let (p, mut u) = (NodeId(2), UnpersistedPages::<NodeId>::default());
        u.changed(p, [1]);
        let copy = u.copy(p, &[1]);
        // Another bit of page 1 set after A copied it: A's write does not cover it.
        u.changed(p, [1]);
        u.written(copy);
        assert_eq!(u.to_persist(p, 1..2), vec![1]);
        let copy = u.copy(p, &[1]);
        u.written(copy);
        assert!(u.to_persist(p, 0..3).is_empty());
        // Pages of other peers are separate.
        u.changed(NodeId(3), [1]);
        assert!(u.to_persist(p, 0..3).is_empty());
    }
}
