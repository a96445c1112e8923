//! Application I/O on a node that is SyncTarget (DRBD keeps serving a Primary there; so
//! do we, instead of failing its I/O until the resync ends).
//!
//! While a resync from `source` runs our disk is Inconsistent: a block is current here
//! only once the resync wrote it (`sync_received`) or an application write replaced it
//! whole (`sync_shadow`). Every other block is read from the source, which holds the
//! data we converge to. Our writes go to the source too (a SyncTarget link is a
//! replication target, io.rs) and to our disk.
//!
//! Why no write is lost on our copy:
//! - resync data never overwrites a block an application write replaced whole since
//!   `SyncStart` (the source may have read it before that write reached it), and a
//!   *partial* write of a block is kept as an overlay and applied again on top of the
//!   resync data for that block (the rest of the block must still come from the source);
//! - `sync_io`, a range lock, makes "check shadow and overlays, then write" one step for
//!   both the resync data and every local write of application data. It is held only
//!   around local disk writes, never while waiting for a peer, so it cannot deadlock with
//!   the ordered streams;
//! - the source reads no block before our writes sent ahead of `SyncStart` were applied
//!   there: after `SyncStart` it waits for our answer to a `Topology` (`run_resync`),
//!   which we give only once every write past its generation check was queued
//!   (topology.rs). A write queued after that answer checked the shadow after it existed.
//!
//! A write is acknowledged only if the source acknowledged it: our copy is not an
//! UpToDate copy yet. Peers that missed it are tracked by the source (the `Write` names
//! them, `PeerAck` reports the rest), as for a diskless node; we inherit those bits with
//! `SyncDone`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::bitmap::BLOCK_BYTES;
use super::io::IoError;
use super::{Conn, Resource};
use crate::state::{DiskState, ReplState, Role};

/// Partial application writes of blocks not yet current here, by block offset: (offset,
/// bytes) in the order they were written.
pub(super) type Overlays = BTreeMap<u64, Vec<(u64, Vec<u8>)>>;

/// What an application write put into the blocks it only partly covers.
#[derive(Clone, Copy)]
enum Piece<'a> {
    /// Its data (`None` when it covers whole blocks only and kept no copy).
    Data(Option<&'a [u8]>),
    Zeroes,
}

/// How long I/O on an Inconsistent Primary waits for a source's `SyncStart` (after
/// `invalidate`, or between a handshake and the resync) before it fails.
const AWAIT_SOURCE: Duration = Duration::from_secs(5);

/// The 4 KiB blocks `[offset, offset+len)` touches.
fn blocks(offset: u64, len: u64) -> impl Iterator<Item = u64> {
    let first = offset / BLOCK_BYTES * BLOCK_BYTES;
    let end = offset + len;
    (first..end).step_by(BLOCK_BYTES as usize)
}

impl Resource {
    /// The connection of the resync source we are SyncTarget of, if we serve I/O as one:
    /// from `SyncStart` (shadow in place) to `SyncDone`, whatever the disk state says in
    /// between (it turns Inconsistent after the shadow exists, and UpToDate before the
    /// shadow goes), and only while that source reports UpToDate data (it answers our
    /// reads only then, and only then is its copy a good one).
    pub(super) fn target_source(&self) -> Option<Arc<Conn>> {
        if self.is_detached() || self.sync_shadow.lock().is_none() {
            return None;
        }
        let inner = self.inner.lock();
        inner
            .peers
            .values()
            .find(|p| {
                p.repl == ReplState::SyncTarget
                    && p.state
                        .as_ref()
                        .is_some_and(|s| s.disk == DiskState::UpToDate)
            })
            .and_then(|p| p.conn.clone())
    }

    /// Where I/O finds good data now: `Ok(None)` on our UpToDate disk, `Ok(Some(source))`
    /// as SyncTarget of `source` (waiting briefly for one about to stream: a Primary just
    /// invalidated, or one a connected UpToDate peer is about to resync), `Err(disk)`
    /// when there is none.
    pub(super) async fn data_path(&self) -> Result<Option<Arc<Conn>>, DiskState> {
        let disk = self.disk();
        if disk == DiskState::UpToDate {
            return Ok(None);
        }
        match self.await_target_source().await {
            Some(source) => Ok(Some(source)),
            // The resync finished while we looked.
            None if self.disk() == DiskState::UpToDate => Ok(None),
            None => Err(disk),
        }
    }

    /// The resync source to serve I/O through, waiting up to `AWAIT_SOURCE` for one that
    /// is about to stream.
    async fn await_target_source(&self) -> Option<Arc<Conn>> {
        let until = Instant::now() + AWAIT_SOURCE;
        loop {
            if let Some(c) = self.target_source() {
                return Some(c);
            }
            let expected = {
                let inner = self.inner.lock();
                inner.role == Role::Primary
                    && inner.disk == DiskState::Inconsistent
                    && inner.peers.values().any(|p| {
                        p.conn.is_some()
                            && p.state
                                .as_ref()
                                .is_some_and(|s| s.disk == DiskState::UpToDate)
                    })
            };
            if !expected || Instant::now() >= until || self.is_down() {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Writes application data (`None`: zeroes) to our disk. As SyncTarget, under
    /// `sync_io` and with the shadow and overlays updated first (module comment).
    pub(super) async fn write_app_data_locally(
        &self,
        offset: u64,
        len: u64,
        data: Option<Vec<u8>>,
    ) -> Result<(), crate::backing::BackingError> {
        if self.sync_shadow.lock().is_none() {
            return match data {
                Some(data) => self.backing.write_at(offset, data).await,
                None => self.backing.write_zeroes(offset, len).await,
            };
        }
        let _io = self.sync_io.lock(offset, len).await;
        // Noted once on disk (still under `sync_io`): a failed write must not shadow
        // its blocks against the resync data that is still to come for them.
        match data {
            Some(data) => {
                // A piece of a block becomes an overlay: keep the bytes the disk write
                // takes (only writes that leave a piece, and only during a resync).
                let partial = !offset.is_multiple_of(BLOCK_BYTES)
                    || !(offset + len).is_multiple_of(BLOCK_BYTES);
                let kept = partial.then(|| data.clone());
                self.backing.write_at(offset, data).await?;
                self.note_app_data(offset, len, Piece::Data(kept.as_deref()));
            }
            None => {
                self.backing.write_zeroes(offset, len).await?;
                self.note_app_data(offset, len, Piece::Zeroes);
            }
        }
        Ok(())
    }

    /// Caller holds `sync_io` for the range: blocks the write covers whole are shadowed
    /// (their overlays are moot); partial pieces of blocks not shadowed become overlays.
    fn note_app_data(&self, offset: u64, len: u64, data: Piece<'_>) {
        let mut shadow = self.sync_shadow.lock();
        let Some(shadow) = shadow.as_mut() else {
            return;
        };
        let mut overlays = self.sync_overlays.lock();
        let end = offset + len;
        for b in blocks(offset, len) {
            let (from, to) = (offset.max(b), end.min(b + BLOCK_BYTES));
            if from == b && to == b + BLOCK_BYTES {
                shadow.set_range(b, BLOCK_BYTES);
                overlays.remove(&b);
            } else if !shadow.is_set(b) {
                let bytes = match data {
                    Piece::Data(Some(d)) => {
                        d[(from - offset) as usize..(to - offset) as usize].to_vec()
                    }
                    Piece::Zeroes => vec![0; (to - from) as usize],
                    // Not kept: the write covers whole blocks only, so no piece is left.
                    Piece::Data(None) => continue,
                };
                overlays.entry(b).or_default().push((from, bytes));
            }
        }
    }

    /// Writes one chunk of resync data: blocks shadowed are skipped, overlays are laid on
    /// top, and the blocks count as received once on disk (reads may then use them).
    pub(super) async fn write_resync_chunk(
        &self,
        source: tandem_common::NodeId,
        offset: u64,
        mut data: Vec<u8>,
        note_replaced: bool,
    ) -> Result<(), crate::backing::BackingError> {
        let len = data.len() as u64;
        let _io = self.sync_io.lock(offset, len).await;
        if note_replaced {
            self.note_replaced(source, offset, &data).await;
        }
        let skip: Vec<bool> = {
            let shadow = self.sync_shadow.lock();
            let overlays = self.sync_overlays.lock();
            blocks(offset, len)
                .map(|b| {
                    for (at, bytes) in overlays.get(&b).into_iter().flatten() {
                        let i = (at - offset) as usize;
                        if let Some(dst) = data.get_mut(i..i + bytes.len()) {
                            dst.copy_from_slice(bytes);
                        }
                    }
                    shadow.as_ref().is_some_and(|s| s.is_set(b))
                })
                .collect()
        };
        self.write_unskipped(offset, data, &skip).await?;
        if let Some(rcv) = self.sync_received.lock().as_mut() {
            rcv.set_range(offset, len);
        }
        Ok(())
    }

    /// Writes `data` at `offset` except the 4 KiB blocks flagged in `skip`.
    async fn write_unskipped(
        &self,
        offset: u64,
        data: Vec<u8>,
        skip: &[bool],
    ) -> Result<(), crate::backing::BackingError> {
        if !skip.iter().any(|&s| s) {
            return self.backing.write_at(offset, data).await;
        }
        let block = BLOCK_BYTES as usize;
        let mut i = 0;
        while i < skip.len() {
            if skip[i] {
                i += 1;
                continue;
            }
            let start = i;
            while i < skip.len() && !skip[i] {
                i += 1;
            }
            let (a, b) = (start * block, (i * block).min(data.len()));
            self.backing
                .write_at(offset + a as u64, data[a..b].to_vec())
                .await?;
        }
        Ok(())
    }

    /// A read as SyncTarget: blocks current here from our disk, the rest from the source
    /// with our overlays on top.
    pub(super) async fn target_read(
        &self,
        source: &Conn,
        offset: u64,
        len: u32,
    ) -> Result<Vec<u8>, IoError> {
        let end = offset + u64::from(len);
        let is_local = |b: u64| {
            self.sync_received
                .lock()
                .as_ref()
                .is_some_and(|r| r.is_set(b))
                || self
                    .sync_shadow
                    .lock()
                    .as_ref()
                    .is_some_and(|s| s.is_set(b))
        };
        if blocks(offset, u64::from(len)).all(is_local) {
            let _io = self.sync_io.lock(offset, u64::from(len)).await;
            return Ok(self.backing.read_at(offset, len as usize).await?);
        }
        let mut buf = self.remote_read_from(source, offset, len).await?;
        // Classified again under the lock: a block may have become current meanwhile.
        let _io = self.sync_io.lock(offset, u64::from(len)).await;
        let local: Vec<u64> = blocks(offset, u64::from(len))
            .filter(|&b| is_local(b))
            .collect();
        if !local.is_empty() {
            let mine = self.backing.read_at(offset, len as usize).await?;
            for b in local {
                let (from, to) = (offset.max(b), end.min(b + BLOCK_BYTES));
                let r = (from - offset) as usize..(to - offset) as usize;
                buf[r.clone()].copy_from_slice(&mine[r]);
            }
        }
        let remote: Vec<u64> = blocks(offset, u64::from(len))
            .filter(|&b| !is_local(b))
            .collect();
        let overlays = self.sync_overlays.lock();
        for b in remote {
            for (at, bytes) in overlays.get(&b).into_iter().flatten() {
                let (from, to) = ((*at).max(offset), (at + bytes.len() as u64).min(end));
                if from < to {
                    buf[(from - offset) as usize..(to - offset) as usize]
                        .copy_from_slice(&bytes[(from - at) as usize..(to - at) as usize]);
                }
            }
        }
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::blocks;

    #[test]
    fn blocks_touched_by_a_range() {
        assert_eq!(blocks(0, 4096).collect::<Vec<_>>(), vec![0]);
        assert_eq!(blocks(100, 4096).collect::<Vec<_>>(), vec![0, 4096]);
        assert_eq!(blocks(8192, 1).collect::<Vec<_>>(), vec![8192]);
        assert_eq!(
            blocks(4095, 8194).collect::<Vec<_>>(),
            vec![0, 4096, 8192, 12288]
        );
    }
}
