//! The activity log: the set of 4 MiB extents a Primary may be writing right now, made
//! durable before a write to a cold extent starts. After a crash of a Primary only these
//! extents can differ from its peers (every other write was acknowledged everywhere or is
//! in a peer bitmap), so the resync after a crash moves only them, not the whole volume.
//! Stored as one bit per extent in the metadata's AL area (32 KiB: up to 1 TiB volumes;
//! larger volumes run without an AL and resync fully after a crash).

use std::collections::BTreeMap;

use super::bitmap::DirtyBitmap;
use super::dirty::UnpersistedPages;
use super::{EngineError, Resource};

pub const EXTENT_BYTES: u64 = 4 << 20;
/// Hot extents kept before the least recently used idle one is retired (DRBD's default).
pub const AL_EXTENTS: usize = 1237;

pub struct ActivityLog {
    /// One "block" per extent: extent `e` is bit `e` (byte offset e * 4096 in the bitmap).
    bits: DirtyBitmap,
    /// extent -> (last use tick, writes in flight)
    hot: BTreeMap<u64, (u64, u32)>,
    tick: u64,
    /// Pages marked in memory whose durable write has not finished: a write to an extent
    /// already marked waits for them too (dirty.rs).
    unpersisted: UnpersistedPages<()>,
    pub enabled: bool,
}

fn extents(offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
    offset / EXTENT_BYTES..=(offset + len.max(1) - 1) / EXTENT_BYTES
}

impl ActivityLog {
    pub fn new(volume_bytes: u64, on_disk: &[u8]) -> Self {
        let n = volume_bytes.div_ceil(EXTENT_BYTES);
        let enabled = n.div_ceil(8) as usize <= crate::meta::MetaStore::AL_BYTES;
        let bits = DirtyBitmap::from_bytes(n * 4096, if enabled { on_disk } else { &[] });
        Self {
            bits,
            hot: BTreeMap::new(),
            tick: 0,
            unpersisted: UnpersistedPages::default(),
            enabled,
        }
    }

    /// Extents marked on disk (what a crashed Primary may have been writing).
    pub fn marked(&self) -> Vec<u64> {
        let mut out = Vec::new();
        let mut from = 0;
        while let Some((o, l)) = self.bits.next_run(from, u64::MAX) {
            out.extend((o / 4096)..((o + l) / 4096));
            from = o + l;
        }
        out
    }

    /// Marks the extents of a write as active; returns the AL pages that must be made
    /// durable before the write starts: those it changed, and those another write
    /// changed and has not finished writing (empty when all were hot and durable).
    pub fn begin(&mut self, offset: u64, len: u64) -> Vec<usize> {
        if !self.enabled {
            return Vec::new();
        }
        self.tick += 1;
        let mut pages = std::collections::BTreeSet::new();
        for e in extents(offset, len) {
            let entry = self.hot.entry(e).or_insert((0, 0));
            entry.0 = self.tick;
            entry.1 += 1;
            self.unpersisted
                .changed((), self.bits.set_range(e * 4096, 4096));
            pages.extend(
                self.unpersisted
                    .to_persist((), self.bits.pages_of(e * 4096, 4096)),
            );
        }
        // Retire idle cold extents beyond capacity (their bits are cleared lazily: the
        // cleared page is written with the next page write).
        while self.hot.len() > AL_EXTENTS {
            let victim = self
                .hot
                .iter()
                .filter(|(_, (_, inflight))| *inflight == 0)
                .min_by_key(|(_, (t, _))| *t)
                .map(|(e, _)| *e);
            match victim {
                Some(e) => {
                    self.hot.remove(&e);
                    self.bits.clear_range(e * 4096, 4096);
                }
                None => break,
            }
        }
        pages.into_iter().collect()
    }

    /// The bytes of `pages` as they are now, and their change counts, for writing.
    fn copy_pages(&self, pages: &[usize]) -> (Vec<(usize, Vec<u8>)>, Vec<CopiedAlPage>) {
        let bytes = pages
            .iter()
            .map(|&p| (p, self.bits.page_bytes(p)))
            .collect();
        (bytes, self.unpersisted.copy((), pages))
    }

    pub fn end(&mut self, offset: u64, len: u64) {
        if !self.enabled {
            return;
        }
        for e in extents(offset, len) {
            if let Some(entry) = self.hot.get_mut(&e) {
                entry.1 = entry.1.saturating_sub(1);
            }
        }
    }

    /// Everything completed (clean demote / attach): the log is empty.
    pub fn clear(&mut self) -> Vec<(usize, Vec<u8>)> {
        self.hot.clear();
        self.bits.clear_all();
        (0..self.bits.page_count())
            .map(|p| (p, self.bits.page_bytes(p)))
            .collect()
    }
}

type CopiedAlPage = super::dirty::CopiedPage<()>;

/// Ends the AL entry of a write when dropped (also on errors and cancellation).
pub struct AlGuard<'a> {
    res: &'a Resource,
    offset: u64,
    len: u64,
}

impl Drop for AlGuard<'_> {
    fn drop(&mut self) {
        self.res.al.lock().end(self.offset, self.len);
    }
}

impl Resource {
    /// Makes the write's extents durable in the activity log before it starts.
    pub(super) async fn al_begin(&self, offset: u64, len: u64) -> Result<AlGuard<'_>, EngineError> {
        let pages = self.al.lock().begin(offset, len);
        let guard = AlGuard {
            res: self,
            offset,
            len,
        };
        if !pages.is_empty() {
            // Copied under the metadata lock: the last writer of a page writes every
            // extent marked before it began.
            let meta = self.meta.lock().await;
            if let (Some(store), sb) = &*meta {
                // Pages another write persisted while we waited (with our mark: its copy
                // came after it) need no second write; concurrent first writes to a new
                // extent then cost one AL write, not one each.
                let (bytes, copied) = {
                    let al = self.al.lock();
                    let left = al.unpersisted.to_persist((), pages.into_iter());
                    al.copy_pages(&left)
                };
                if !bytes.is_empty() {
                    tokio::task::block_in_place(|| store.write_al_pages(sb, &bytes))?;
                    self.al.lock().unpersisted.written(copied);
                }
            }
        }
        Ok(guard)
    }

    /// Clears the activity log on disk (clean demotion or attach without a crash).
    pub(super) async fn al_clear(&self) -> Result<(), EngineError> {
        // Cleared and copied under the metadata lock, like `al_begin`'s pages: a stale
        // all-clear copy written after a concurrent begin would drop its extent.
        let meta = self.meta.lock().await;
        let pages = self.al.lock().clear();
        if let (Some(store), sb) = &*meta {
            tokio::task::block_in_place(|| store.write_al_pages(sb, &pages))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_extents_need_one_durable_write_and_idle_ones_retire() {
        let mut al = ActivityLog::new(64 << 30, &[]);
        assert!(al.enabled);
        assert_eq!(al.begin(0, 4096).len(), 1);
        // Not yet written: a second write to the extent waits for the page too.
        assert_eq!(al.begin(4096, 4096), vec![0]);
        al.end(4096, 4096);
        let (_, copied) = al.copy_pages(&[0]);
        al.unpersisted.written(copied);
        al.end(0, 4096);
        assert!(
            al.begin(4096, 4096).is_empty(),
            "hot extent needs no AL write"
        );
        al.end(4096, 4096);
        // A write spanning two extents marks both.
        assert!(!al.begin(EXTENT_BYTES - 10, 20).is_empty());
        al.end(EXTENT_BYTES - 10, 20);
        assert_eq!(al.marked(), vec![0, 1]);
        for e in 2..(AL_EXTENTS as u64 + 10) {
            al.begin(e * EXTENT_BYTES, 1);
            al.end(e * EXTENT_BYTES, 1);
        }
        assert!(al.marked().len() <= AL_EXTENTS);
        assert!(
            !al.marked().contains(&0),
            "least recently used extent retired"
        );
        al.clear();
        assert!(al.marked().is_empty());
        // Huge volumes run without an AL.
        assert!(!ActivityLog::new(4 << 40, &[]).enabled);
    }
}
