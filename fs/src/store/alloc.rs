//! The resource-group allocator: 2-bit bitmaps, group counters, scan hints, and the rules
//! that keep freed blocks from being reused too early.

use super::*;

impl Store {
    // ---- allocator -------------------------------------------------------------------

    /// The resource group whose data area holds `blk`.
    pub fn rg_of(&self, blk: u64) -> Option<usize> {
        if blk < self.sb.rg_start || blk >= self.sb.block_count {
            return None;
        }
        let i = ((blk - self.sb.rg_start) / u64::from(self.sb.rg_blocks)) as usize;
        let rg = self.rgs.get(i)?;
        (blk >= rg.data0 && blk < rg.data0 + u64::from(rg.data_count)).then_some(i)
    }

    pub(super) fn bitmap_pos(&self, rg: usize, blk: u64) -> (u64, usize) {
        let per = format::bitmap_blocks_per(self.bs) as u64;
        let idx = blk - self.rgs[rg].data0;
        let (start, _) = self.sb.rg_range(rg as u32);
        (start + 1 + idx / per, (idx % per) as usize)
    }

    pub fn state(&mut self, blk: u64) -> Result<BlockState> {
        let rg = self
            .rg_of(blk)
            .ok_or_else(|| FsError::inconsistent(blk, "block outside any data area"))?;
        let (bm, bit) = self.bitmap_pos(rg, blk);
        let b = self.meta(bm, BlockType::Bitmap)?;
        Ok(BlockState::from_bits(
            b[HDR_LEN + bit / 4] >> ((bit % 4) * 2),
        ))
    }

    pub fn set_state(&mut self, blk: u64, st: BlockState) -> Result<()> {
        self.fresh_rgs()?;
        let rg = self
            .rg_of(blk)
            .ok_or_else(|| FsError::inconsistent(blk, "block outside any data area"))?;
        let (bm, bit) = self.bitmap_pos(rg, blk);
        let b = self.meta_mut(bm, BlockType::Bitmap)?;
        let byte = &mut b[HDR_LEN + bit / 4];
        let shift = (bit % 4) * 2;
        let old = BlockState::from_bits(*byte >> shift);
        *byte = (*byte & !(3 << shift)) | ((st as u8) << shift);
        let h = &mut self.rgs[rg];
        let was_inode = matches!(old, BlockState::Inode | BlockState::Unlinked);
        let is_inode = matches!(st, BlockState::Inode | BlockState::Unlinked);
        match (old == BlockState::Free, st == BlockState::Free) {
            (true, false) => h.free = h.free.saturating_sub(1),
            (false, true) => h.free += 1,
            _ => {}
        }
        match (was_inode, is_inode) {
            (false, true) => {
                h.inodes += 1;
                h.igeneration += 1;
            }
            (true, false) => h.inodes = h.inodes.saturating_sub(1),
            _ => {}
        }
        match (old == BlockState::Unlinked, st == BlockState::Unlinked) {
            (false, true) => h.unlinked += 1,
            (true, false) => h.unlinked = h.unlinked.saturating_sub(1),
            _ => {}
        }
        if st == BlockState::Free {
            let idx = (blk - h.data0) as u32;
            if self.hints[rg] != HINT_UNKNOWN {
                self.hints[rg] = self.hints[rg].min(idx);
            }
        }
        self.write_rg(rg)
    }

    pub(super) fn write_rg(&mut self, rg: usize) -> Result<()> {
        let (start, _) = self.sb.rg_range(rg as u32);
        let h = self.rgs[rg].clone();
        let b = self.meta_mut(start, BlockType::RgHeader)?;
        h.encode_into(b, start);
        Ok(())
    }

    /// Allocates up to `want` contiguous blocks near `goal`, marking them `st`.
    pub fn alloc(&mut self, goal: u64, want: u32, st: BlockState) -> Result<(u64, u32)> {
        assert!(want > 0);
        self.fresh_rgs()?;
        let n = self.rgs.len();
        let first = self.rg_of(goal).unwrap_or(self.alloc_rg);
        for k in 0..n {
            let rg = (first + k) % n;
            if self.rgs[rg].free == 0 {
                continue;
            }
            if self.hints[rg] == HINT_UNKNOWN {
                // One scan per group per mount finds the first free block.
                self.hints[rg] = 0;
                self.scan_free(rg, 0)?;
            }
            // Nothing below the hint is free, so starting there never skips a candidate
            // and keeps allocation O(1) amortised while a group fills up.
            let from = if k == 0 && self.rg_of(goal) == Some(rg) {
                ((goal - self.rgs[rg].data0) as u32).max(self.hints[rg])
            } else {
                self.hints[rg]
            };
            let found = match self.scan_free(rg, from)? {
                Some(i) => Some(i),
                None if from > self.hints[rg] => self.scan_free(rg, self.hints[rg])?,
                None => None,
            };
            let Some(idx) = found else { continue };
            let data0 = self.rgs[rg].data0;
            let count = self.rgs[rg].data_count;
            let start = data0 + u64::from(idx);
            let mut len = 0u32;
            while len < want && idx + len < count {
                let b = start + u64::from(len);
                if self.is_held(b) || self.state(b)? != BlockState::Free {
                    break;
                }
                self.set_state(b, st)?;
                len += 1;
            }
            if idx == self.hints[rg] {
                self.hints[rg] = idx + len;
            }
            debug_assert!(self.hints[rg] <= self.rgs[rg].data_count);
            self.alloc_rg = rg;
            return Ok((start, len));
        }
        Err(FsError::NoSpace)
    }

    /// First free, not-pending data index at or after `from` in group `rg`.
    pub(super) fn scan_free(&mut self, rg: usize, from: u32) -> Result<Option<u32>> {
        let per = format::bitmap_blocks_per(self.bs) as u32;
        let count = self.rgs[rg].data_count;
        let data0 = self.rgs[rg].data0;
        let (start, _) = self.sb.rg_range(rg as u32);
        let mut i = from;
        // First block that is free in the bitmap (held or not): the new scan hint.
        let mut first_free = None;
        let mut found = None;
        'outer: while i < count {
            let bm = start + 1 + u64::from(i / per);
            self.meta(bm, BlockType::Bitmap)?;
            let b = &self.blocks[&bm];
            let end = count.min((i / per + 1) * per);
            while i < end {
                let bit = (i % per) as usize;
                let byte = b[HDR_LEN + bit / 4];
                // A byte whose four 2-bit states are all non-zero has no free block.
                if bit % 4 == 0 && (byte | (byte >> 1)) & 0b0101_0101 == 0b0101_0101 && i + 4 <= end
                {
                    i += 4;
                    continue;
                }
                if (byte >> ((bit % 4) * 2)) & 3 == 0 {
                    first_free.get_or_insert(i);
                    if !self.is_held(data0 + u64::from(i)) {
                        found = Some(i);
                        break 'outer;
                    }
                }
                i += 1;
            }
        }
        if from <= self.hints[rg] {
            self.hints[rg] = first_free.unwrap_or(count);
        }
        Ok(found)
    }

    /// Frees a block run; the blocks become allocatable after the next commit.
    pub fn free_run(&mut self, start: u64, len: u64) -> Result<()> {
        for b in start..start + len {
            self.set_state(b, BlockState::Free)?;
            self.pending_free.insert(b);
            self.forget_block(b);
        }
        Ok(())
    }

    /// Frees one metadata block (inode, leaf, xattr); reusable after the next checkpoint.
    pub fn free_meta(&mut self, blk: u64) -> Result<()> {
        self.free_run(blk, 1)?;
        self.held_until_checkpoint.insert(blk);
        Ok(())
    }

    pub(super) fn is_held(&self, blk: u64) -> bool {
        self.pending_free.contains(&blk)
            || self.committing_free.contains(&blk)
            || self.held_until_checkpoint.contains(&blk)
    }

    /// Free data blocks (group counters; re-read first if stale).
    pub fn free_blocks(&mut self) -> Result<u64> {
        self.fresh_rgs()?;
        Ok(self.rgs.iter().map(|r| u64::from(r.free)).sum())
    }
    pub fn data_blocks(&self) -> u64 {
        self.rgs.iter().map(|r| u64::from(r.data_count)).sum()
    }
    /// Allocated inodes (group counters; re-read first if stale).
    pub fn inode_count(&mut self) -> Result<u64> {
        self.fresh_rgs()?;
        Ok(self.rgs.iter().map(|r| u64::from(r.inodes)).sum())
    }

    /// Blocks in state `Unlinked` (orphans left by a crash while files were open).
    pub fn unlinked_inodes(&mut self) -> Result<Vec<u64>> {
        self.fresh_rgs()?;
        let mut out = Vec::new();
        let per = format::bitmap_blocks_per(self.bs) as u64;
        for rg in 0..self.rgs.len() {
            if self.rgs[rg].unlinked == 0 {
                continue;
            }
            let (start, _) = self.sb.rg_range(rg as u32);
            let (data0, count) = (self.rgs[rg].data0, u64::from(self.rgs[rg].data_count));
            for bmi in 0..u64::from(self.rgs[rg].bitmap_blocks) {
                let b = self.meta(start + 1 + bmi, BlockType::Bitmap)?.to_vec();
                for bit in 0..per.min(count.saturating_sub(bmi * per)) {
                    let v = (b[HDR_LEN + (bit / 4) as usize] >> ((bit % 4) * 2)) & 3;
                    if v == BlockState::Unlinked as u8 {
                        out.push(data0 + bmi * per + bit);
                    }
                }
            }
        }
        Ok(out)
    }
}
