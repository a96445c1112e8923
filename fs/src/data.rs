//! File contents: inline ("stuffed") data in the inode block, and extent-mapped blocks
//! once a file outgrows it. Data blocks are written in place before the metadata that
//! points at them commits (ordered mode); only the inline bytes are journaled.

use crate::error::{FsError, Result};
use crate::format::{get_u32, get_u64, put_u32, put_u64, BlockState, BlockType};
use crate::inode::{Extent, Inode, EXTENT_LEN, EXT_UNWRITTEN, FLAG_EXT_INDIRECT, FLAG_INLINE};
use crate::store::Store;

/// Largest file size: 16 TiB keeps every block index far from overflow.
pub const MAX_FILE_SIZE: u64 = 1 << 44;
const LEAF_HDR: usize = 32;
/// Longest extent we create; keeps `len` comfortably inside u32.
const MAX_EXTENT_BLOCKS: u64 = 1 << 20;

pub const FALLOC_FL_KEEP_SIZE: i32 = 1;
pub const FALLOC_FL_PUNCH_HOLE: i32 = 2;

/// Device reads that make up one file read: inline bytes, or block-aligned segments
/// (buffer offset, device byte offset, length) of a `span`-byte buffer, of which
/// `skip..skip+len` is returned. Holes are the zeros the buffer starts with.
#[derive(Debug, Default)]
pub struct ReadPlan {
    inline: Option<Vec<u8>>,
    segs: Vec<(usize, u64, usize)>,
    span: usize,
    skip: usize,
    len: usize,
}

impl ReadPlan {
    /// The device byte ranges this plan reads (none for inline data and holes).
    pub fn device_ranges(&self) -> Vec<(u64, u64)> {
        self.segs
            .iter()
            .map(|&(_, dev_off, len)| (dev_off, len as u64))
            .collect()
    }

    pub fn execute(self, dev: &dyn crate::block::BlockDevice) -> Result<Vec<u8>> {
        if let Some(bytes) = self.inline {
            return Ok(bytes);
        }
        let mut buf = vec![0u8; self.span];
        for (at, dev_off, len) in self.segs {
            dev.read_at(&mut buf[at..at + len], dev_off)?;
        }
        buf.drain(..self.skip);
        buf.truncate(self.len);
        Ok(buf)
    }
}

/// Finds the extent containing `lblk`.
fn find(ext: &[Extent], lblk: u64) -> std::result::Result<usize, usize> {
    match ext.binary_search_by(|e| e.logical.cmp(&lblk)) {
        Ok(i) => Ok(i),
        Err(0) => Err(0),
        Err(i) if ext[i - 1].end() > lblk => Ok(i - 1),
        Err(i) => Err(i),
    }
}

/// Removes the mapping of `[lblk, lblk+len)`, returning the physical runs it covered.
pub fn punch(ext: &mut Vec<Extent>, lblk: u64, len: u64) -> Vec<(u64, u64, u32)> {
    let end = lblk.saturating_add(len);
    let mut out = Vec::new();
    let mut keep = Vec::with_capacity(ext.len() + 1);
    for e in ext.drain(..) {
        if e.end() <= lblk || e.logical >= end {
            keep.push(e);
            continue;
        }
        if e.logical < lblk {
            keep.push(Extent {
                len: (lblk - e.logical) as u32,
                ..e
            });
        }
        let s = e.logical.max(lblk);
        let t = e.end().min(end);
        out.push((e.physical + (s - e.logical), t - s, e.flags));
        if e.end() > end {
            keep.push(Extent {
                logical: end,
                physical: e.physical + (end - e.logical),
                len: (e.end() - end) as u32,
                flags: e.flags,
            });
        }
    }
    *ext = keep;
    out
}

/// Inserts an extent over an unmapped range, merging with contiguous neighbours.
pub fn insert(ext: &mut Vec<Extent>, new: Extent) {
    let i = ext.partition_point(|e| e.logical < new.logical);
    ext.insert(i, new);
    let mergeable = |a: &Extent, b: &Extent| {
        a.end() == b.logical
            && a.physical + u64::from(a.len) == b.physical
            && a.flags == b.flags
            && u64::from(a.len) + u64::from(b.len) <= MAX_EXTENT_BLOCKS
    };
    if i + 1 < ext.len() && mergeable(&ext[i], &ext[i + 1]) {
        ext[i].len += ext[i + 1].len;
        ext.remove(i + 1);
    }
    if i > 0 && mergeable(&ext[i - 1], &ext[i]) {
        ext[i - 1].len += ext[i].len;
        ext.remove(i);
    }
}

impl Store {
    fn leaf_cap(&self) -> usize {
        (self.bs - LEAF_HDR) / EXTENT_LEN
    }

    fn leaf_ptrs(ino: &Inode) -> Vec<u64> {
        if ino.flags & FLAG_EXT_INDIRECT == 0 {
            return Vec::new();
        }
        (0..ino.payload_len as usize)
            .map(|i| get_u64(&ino.payload, i * 8))
            .collect()
    }

    /// Loads the full extent list of a non-inline inode.
    pub fn extents(&mut self, ino: &Inode) -> Result<Vec<Extent>> {
        if ino.is_inline() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        if ino.flags & FLAG_EXT_INDIRECT == 0 {
            for i in 0..ino.payload_len as usize {
                out.push(Extent::decode(&ino.payload[i * EXTENT_LEN..]));
            }
        } else {
            let cap = self.leaf_cap();
            for leaf in Self::leaf_ptrs(ino) {
                let b = self.meta(leaf, BlockType::ExtentLeaf)?;
                let n = get_u32(b, 24) as usize;
                if n > cap {
                    return Err(FsError::inconsistent(
                        leaf,
                        "extent leaf count exceeds its capacity",
                    ));
                }
                out.extend((0..n).map(|i| Extent::decode(&b[LEAF_HDR + i * EXTENT_LEN..])));
            }
        }
        let max_blocks = MAX_FILE_SIZE / self.bs as u64;
        let valid = |e: &Extent| {
            e.len > 0
                && e.logical
                    .checked_add(u64::from(e.len))
                    .is_some_and(|end| end <= max_blocks)
                && e.physical
                    .checked_add(u64::from(e.len))
                    .is_some_and(|end| end <= self.sb.block_count)
        };
        if !out.iter().all(valid) {
            return Err(FsError::inconsistent(
                ino.block,
                "extent outside the file or the device",
            ));
        }
        for w in out.windows(2) {
            if w[0].end() > w[1].logical {
                return Err(FsError::inconsistent(
                    ino.block,
                    "extents overlap or are unsorted",
                ));
            }
        }
        if out.iter().any(|e| e.len == 0) {
            return Err(FsError::inconsistent(ino.block, "zero-length extent"));
        }
        Ok(out)
    }

    /// Stores an extent list into the inode (inline if it fits, else in leaf blocks).
    /// On error the inode is unchanged: every allocation happens before the first change.
    pub fn set_extents(&mut self, ino: &mut Inode, ext: &[Extent]) -> Result<()> {
        let mut old = Self::leaf_ptrs(ino);
        let had = old.len();
        if ext.len() * EXTENT_LEN <= ino.payload_cap() {
            for l in old {
                self.free_meta(l)?;
                ino.blocks = ino.blocks.saturating_sub(1);
            }
            ino.flags &= !(FLAG_INLINE | FLAG_EXT_INDIRECT);
            ino.payload.fill(0);
            for (i, e) in ext.iter().enumerate() {
                e.encode(&mut ino.payload[i * EXTENT_LEN..]);
            }
            ino.payload_len = ext.len() as u32;
            return Ok(());
        }
        let cap = self.leaf_cap();
        let need = ext.len().div_ceil(cap);
        if need * 8 > ino.payload_cap() {
            return Err(FsError::FileTooBig);
        }
        let mut fresh = Vec::new();
        while old.len() < need {
            let goal = old.last().copied().unwrap_or(ino.block);
            match self.alloc(goal, 1, BlockState::Used) {
                Ok((l, _)) => {
                    fresh.push(l);
                    old.push(l);
                }
                Err(e) => {
                    for l in fresh {
                        self.free_meta(l)?;
                    }
                    return Err(e);
                }
            }
        }
        ino.blocks += fresh.len() as u64;
        while old.len() > need {
            let l = old.pop().expect("non-empty");
            self.free_meta(l)?;
            ino.blocks = ino.blocks.saturating_sub(1);
        }
        let existing = old.len().min(had);
        for (k, chunk) in ext.chunks(cap).enumerate() {
            let mut body = vec![0u8; self.bs - 24];
            put_u32(&mut body, 0, chunk.len() as u32);
            for (i, e) in chunk.iter().enumerate() {
                e.encode(&mut body[LEAF_HDR - 24 + i * EXTENT_LEN..]);
            }
            // Only leaves whose extents changed join the transaction: appending to a file
            // with thousands of extents must not journal every leaf each time.
            if k < existing && self.meta(old[k], BlockType::ExtentLeaf)?[24..] == body[..] {
                continue;
            }
            let b = if k < existing {
                self.meta_mut(old[k], BlockType::ExtentLeaf)?
            } else {
                self.meta_new(old[k], BlockType::ExtentLeaf)
            };
            b[24..].copy_from_slice(&body);
        }
        ino.flags = (ino.flags & !FLAG_INLINE) | FLAG_EXT_INDIRECT;
        ino.payload.fill(0);
        for (i, l) in old.iter().enumerate() {
            put_u64(&mut ino.payload, i * 8, *l);
        }
        ino.payload_len = old.len() as u32;
        Ok(())
    }

    /// `set_extents` for a map that includes `fresh` runs allocated by this operation: if
    /// the map cannot be stored (no room for another extent leaf), those runs are given
    /// back so nothing leaks and the inode keeps its old, consistent map.
    fn set_extents_or_release(
        &mut self,
        ino: &mut Inode,
        ext: &[Extent],
        fresh: &[(u64, u64)],
    ) -> Result<()> {
        if let Err(e) = self.set_extents(ino, ext) {
            for &(p, n) in fresh {
                self.free_run(p, n)?;
                ino.blocks = ino.blocks.saturating_sub(n);
            }
            return Err(e);
        }
        Ok(())
    }

    /// Moves inline bytes into a data block so the file can grow past the inode.
    fn unstuff(&mut self, ino: &mut Inode) -> Result<()> {
        if !ino.is_inline() {
            return Ok(());
        }
        let size = ino.size as usize;
        let data = ino.payload[..size].to_vec();
        let mut ext = Vec::new();
        if size > 0 {
            let (blk, _) = self.alloc(ino.block + 1, 1, BlockState::Used)?;
            let mut buf = vec![0u8; self.bs];
            buf[..size].copy_from_slice(&data);
            self.write_data(&buf, blk)?;
            ino.blocks += 1;
            ext.push(Extent {
                logical: 0,
                physical: blk,
                len: 1,
                flags: 0,
            });
        }
        ino.payload_len = 0;
        self.set_extents(ino, &ext)
    }

    pub fn file_read(&mut self, ino: &Inode, off: u64, size: u32) -> Result<Vec<u8>> {
        self.read_plan(ino, off, size)?.execute(&*self.dev)
    }

    /// Works out which device ranges a read needs, under the filesystem lock; the reads
    /// themselves (`ReadPlan::execute`) can then run without it.
    pub fn read_plan(&mut self, ino: &Inode, off: u64, size: u32) -> Result<ReadPlan> {
        let mut plan = ReadPlan::default();
        if off >= ino.size {
            return Ok(plan);
        }
        let end = ino.size.min(off + u64::from(size));
        if ino.is_inline() {
            plan.inline = Some(ino.payload[off as usize..end as usize].to_vec());
            return Ok(plan);
        }
        let bs = self.bs as u64;
        let ext = self.extents(ino)?;
        let first = off / bs;
        let last = (end - 1) / bs;
        let mut l = first;
        while l <= last {
            match find(&ext, l) {
                Ok(i) => {
                    let e = ext[i];
                    let run = (e.end() - l).min(last + 1 - l);
                    if e.flags & EXT_UNWRITTEN == 0 {
                        let at = ((l - first) * bs) as usize;
                        plan.segs.push((
                            at,
                            (e.physical + (l - e.logical)) * bs,
                            (run * bs) as usize,
                        ));
                    }
                    l += run;
                }
                Err(i) => l = ext.get(i).map_or(last + 1, |e| e.logical.min(last + 1)),
            }
        }
        plan.span = ((last - first + 1) * bs) as usize;
        plan.skip = (off - first * bs) as usize;
        plan.len = (end - off) as usize;
        Ok(plan)
    }

    pub fn file_write(&mut self, ino: &mut Inode, off: u64, data: &[u8]) -> Result<()> {
        let end = off
            .checked_add(data.len() as u64)
            .ok_or(FsError::FileTooBig)?;
        if end > MAX_FILE_SIZE {
            return Err(FsError::FileTooBig);
        }
        if data.is_empty() {
            return Ok(());
        }
        if ino.is_inline() {
            if end as usize <= ino.payload_cap() {
                ino.payload[off as usize..end as usize].copy_from_slice(data);
                ino.size = ino.size.max(end);
                ino.payload_len = ino.size as u32;
                return Ok(());
            }
            self.unstuff(ino)?;
        }
        let bs = self.bs as u64;
        let mut ext = self.extents(ino)?;
        if off > ino.size {
            self.zero_gap(ino, &ext, off)?;
        }
        let first = off / bs;
        let last = (end - 1) / bs;
        let mut l = first;
        let mut fresh = Vec::new();
        let result = (|| -> Result<()> {
            while l <= last {
                let (phys, run, existing) = match find(&ext, l) {
                    Ok(i) => {
                        let e = ext[i];
                        let run = (e.end() - l).min(last + 1 - l);
                        let phys = e.physical + (l - e.logical);
                        if e.flags & EXT_UNWRITTEN != 0 {
                            punch(&mut ext, l, run);
                            insert(
                                &mut ext,
                                Extent {
                                    logical: l,
                                    physical: phys,
                                    len: run as u32,
                                    flags: 0,
                                },
                            );
                            (phys, run, false)
                        } else {
                            (phys, run, true)
                        }
                    }
                    Err(i) => {
                        let hole = ext.get(i).map_or(u64::MAX, |e| e.logical) - l;
                        let want = hole.min(last + 1 - l).min(MAX_EXTENT_BLOCKS) as u32;
                        let goal = match i {
                            0 => ino.block + 1,
                            _ => {
                                ext[i - 1].physical
                                    + u64::from(ext[i - 1].len)
                                    + (l - ext[i - 1].end())
                            }
                        };
                        let (phys, got) = self.alloc(goal, want, BlockState::Used)?;
                        ino.blocks += u64::from(got);
                        fresh.push((phys, u64::from(got)));
                        insert(
                            &mut ext,
                            Extent {
                                logical: l,
                                physical: phys,
                                len: got,
                                flags: 0,
                            },
                        );
                        (phys, u64::from(got), false)
                    }
                };
                self.write_run(l, phys, run, off, data, existing)?;
                l += run;
            }
            Ok(())
        })();
        // Even on ENOSPC part-way, keep what was allocated so nothing leaks.
        self.set_extents_or_release(ino, &ext, &fresh)?;
        result?;
        ino.size = ino.size.max(end);
        Ok(())
    }

    /// Writes the part of `data` (at file offset `off`) that falls in blocks `[l, l+run)`.
    fn write_run(
        &mut self,
        l: u64,
        phys: u64,
        run: u64,
        off: u64,
        data: &[u8],
        existing: bool,
    ) -> Result<()> {
        let bs = self.bs as u64;
        let run_start = l * bs;
        let run_end = (l + run) * bs;
        let end = off + data.len() as u64;
        let s = off.max(run_start);
        let e = end.min(run_end);
        let mut buf = vec![0u8; (run * bs) as usize];
        if existing && s > run_start {
            self.read_data(&mut buf[..bs as usize], phys)?;
        }
        if existing && e < run_end && (run > 1 || s == run_start) {
            let at = ((run - 1) * bs) as usize;
            self.read_data(&mut buf[at..at + bs as usize], phys + run - 1)?;
        }
        buf[(s - run_start) as usize..(e - run_start) as usize]
            .copy_from_slice(&data[(s - off) as usize..(e - off) as usize]);
        self.write_data(&buf, phys)
    }

    /// Zeroes file bytes `[from, to)` that lie in written blocks (used by truncate/punch).
    fn zero_partial(&mut self, ext: &[Extent], from: u64, to: u64) -> Result<()> {
        if from >= to {
            return Ok(());
        }
        let bs = self.bs as u64;
        let l = from / bs;
        if let Ok(i) = find(ext, l) {
            let e = ext[i];
            if e.flags & EXT_UNWRITTEN == 0 {
                let phys = e.physical + (l - e.logical);
                let mut buf = vec![0u8; self.bs];
                self.read_data(&mut buf, phys)?;
                let s = (from - l * bs) as usize;
                let t = ((to - l * bs).min(bs)) as usize;
                buf[s..t].fill(0);
                self.write_data(&buf, phys)?;
            }
        }
        Ok(())
    }

    /// Zeroes stale bytes between EOF and `new_start` in EOF's block before the file grows
    /// over them. Safe in place: they lie past the durable EOF.
    fn zero_gap(&mut self, ino: &Inode, ext: &[Extent], new_start: u64) -> Result<()> {
        let bs = self.bs as u64;
        if ino.size % bs == 0 {
            return Ok(());
        }
        let block_end = ino.size.div_ceil(bs) * bs;
        self.zero_partial(ext, ino.size, new_start.min(block_end))
    }

    pub fn file_truncate(&mut self, ino: &mut Inode, size: u64) -> Result<()> {
        if size > MAX_FILE_SIZE {
            return Err(FsError::FileTooBig);
        }
        if ino.is_inline() {
            if size as usize <= ino.payload_cap() {
                if size < ino.size {
                    ino.payload[size as usize..ino.size as usize].fill(0);
                }
                ino.size = size;
                ino.payload_len = size as u32;
                return Ok(());
            }
            self.unstuff(ino)?;
        }
        let bs = self.bs as u64;
        if size < ino.size {
            let mut ext = self.extents(ino)?;
            let keep = size.div_ceil(bs);
            for (p, n, _) in punch(&mut ext, keep, u64::MAX - keep) {
                self.free_run(p, n)?;
                ino.blocks = ino.blocks.saturating_sub(n);
            }
            // The bytes past the new end in its last block are left alone (zeroing them in
            // place before the commit would corrupt the old, still-durable file on a
            // crash); they are zeroed when the file grows again (`zero_gap`).
            self.set_extents(ino, &ext)?;
        } else if size > ino.size {
            let ext = self.extents(ino)?;
            self.zero_gap(ino, &ext, size)?;
        }
        ino.size = size;
        Ok(())
    }

    pub fn file_fallocate(&mut self, ino: &mut Inode, off: u64, len: u64, mode: i32) -> Result<()> {
        let end = off
            .checked_add(len)
            .filter(|&e| e <= MAX_FILE_SIZE)
            .ok_or(FsError::FileTooBig)?;
        if len == 0 {
            return Err(FsError::Invalid("fallocate length is zero"));
        }
        let bs = self.bs as u64;
        if mode == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE {
            if ino.is_inline() {
                let e = end.min(ino.size) as usize;
                if (off as usize) < e {
                    ino.payload[off as usize..e].fill(0);
                }
                return Ok(());
            }
            let mut ext = self.extents(ino)?;
            let full_start = off.div_ceil(bs);
            let full_end = end / bs;
            if full_start < full_end {
                for (p, n, _) in punch(&mut ext, full_start, full_end - full_start) {
                    self.free_run(p, n)?;
                    ino.blocks = ino.blocks.saturating_sub(n);
                }
            }
            self.zero_partial(&ext, off, end.min(full_start * bs))?;
            if full_end * bs >= off.max(full_start * bs) {
                self.zero_partial(&ext, (full_end * bs).max(off), end)?;
            }
            return self.set_extents(ino, &ext);
        }
        if mode & !FALLOC_FL_KEEP_SIZE != 0 {
            return Err(FsError::NotSupported("fallocate mode"));
        }
        if ino.is_inline() && end as usize > ino.payload_cap() {
            self.unstuff(ino)?;
        }
        if !ino.is_inline() {
            let mut ext = self.extents(ino)?;
            let mut l = off / bs;
            let last = (end - 1) / bs;
            let mut fresh = Vec::new();
            let res = (|| -> Result<()> {
                while l <= last {
                    match find(&ext, l) {
                        Ok(i) => l = ext[i].end(),
                        Err(i) => {
                            let hole = ext.get(i).map_or(u64::MAX, |e| e.logical) - l;
                            let want = hole.min(last + 1 - l).min(MAX_EXTENT_BLOCKS) as u32;
                            let (phys, got) =
                                self.alloc(ino.block + 1 + l, want, BlockState::Used)?;
                            ino.blocks += u64::from(got);
                            fresh.push((phys, u64::from(got)));
                            insert(
                                &mut ext,
                                Extent {
                                    logical: l,
                                    physical: phys,
                                    len: got,
                                    flags: EXT_UNWRITTEN,
                                },
                            );
                            l += u64::from(got);
                        }
                    }
                }
                Ok(())
            })();
            self.set_extents_or_release(ino, &ext, &fresh)?;
            res?;
        }
        if mode & FALLOC_FL_KEEP_SIZE == 0 && end > ino.size {
            if !ino.is_inline() {
                let ext = self.extents(ino)?;
                self.zero_gap(ino, &ext, end)?;
            }
            if ino.is_inline() {
                ino.payload_len = end as u32;
            }
            ino.size = end;
        }
        Ok(())
    }

    /// Frees every block an inode owns (data, leaves, xattr block) and the inode itself.
    pub fn free_inode(&mut self, ino: &Inode) -> Result<()> {
        if !ino.is_inline() && !ino.is_dir() {
            let ext = self.extents(ino)?;
            for e in &ext {
                self.free_run(e.physical, u64::from(e.len))?;
            }
            for l in Self::leaf_ptrs(ino) {
                self.free_meta(l)?;
            }
        }
        if ino.xattr_block != 0 {
            self.free_meta(ino.xattr_block)?;
        }
        self.free_meta(ino.block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(l: u64, p: u64, n: u32) -> Extent {
        Extent {
            logical: l,
            physical: p,
            len: n,
            flags: 0,
        }
    }

    #[test]
    fn punch_splits_and_insert_merges() {
        let mut v = vec![e(0, 100, 10)];
        let freed = punch(&mut v, 3, 4);
        assert_eq!(freed, vec![(103, 4, 0)]);
        assert_eq!(v, vec![e(0, 100, 3), e(7, 107, 3)]);
        insert(&mut v, e(3, 103, 4));
        assert_eq!(v, vec![e(0, 100, 10)]);
        assert_eq!(find(&v, 9), Ok(0));
        assert_eq!(find(&v, 10), Err(1));
    }
}
