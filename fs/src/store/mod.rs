//! The mounted filesystem's state below the POSIX layer: metadata block cache, running
//! transaction, resource-group allocator and inode load/store.
//!
//! Every metadata change goes through `meta_mut`, which puts the block in the running
//! transaction; `commit` journals all of them atomically. Freed blocks are not reused until
//! the transaction that freed them commits, so a crash can never leave an old file pointing
//! at a new file's data.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::block::BlockDevice;
use crate::error::{FsError, Result};
use crate::format::{self, init_header, BlockState, BlockType, RgHeader, Superblock, HDR_LEN};
use crate::inode::Inode;
use crate::journal::{Journal, LoggedBlocks, ReplayStats};

mod alloc;

/// Scan hint of a group whose first free block has not been looked for since mount.
const HINT_UNKNOWN: u32 = u32::MAX;

/// Clean metadata blocks kept in memory before eviction starts.
const CACHE_CAP_BLOCKS: usize = 16384;
/// Blocks read with a cold inode block (itself included): see `load`.
const INODE_READAROUND_BLOCKS: u64 = 8;
/// Largest range one prefetch request covers.
const PREFETCH_RANGE_BYTES: u64 = 256 << 10;

pub struct Store {
    /// `order`, as the device every read, write and flush goes through.
    pub dev: Arc<dyn BlockDevice>,
    /// Which writes are known durable (decides whether a commit needs its first flush).
    pub order: Arc<crate::block::FlushOrder>,
    pub sb: Superblock,
    pub bs: usize,
    blocks: HashMap<u64, Box<[u8]>>,
    dirty: BTreeSet<u64>,
    /// Group headers. Their geometry (`data0`, `data_count`, `bitmap_blocks`) never
    /// changes; their counters are re-read lazily after `drop_caches` (see `rgs_stale`).
    pub rgs: Vec<RgHeader>,
    /// The counters in `rgs` may be stale (another node held the glock meanwhile): re-read
    /// the headers before using them (`fresh_rgs`). Reading every header at every glock
    /// grant cost one device round trip per group even for operations that only read.
    rgs_stale: bool,
    /// Per group: first data index that may be free (scan hint).
    hints: Vec<u32>,
    pending_free: HashSet<u64>,
    /// Freed metadata blocks whose old images may still be in the journal: reusing one
    /// before the log is checkpointed would let replay overwrite its new contents (the
    /// problem jbd2 solves with revoke records).
    held_until_checkpoint: HashSet<u64>,
    /// Shared so a commit's I/O can run without the filesystem lock (see `Fs::commit`).
    pub journal: Option<Arc<Mutex<Journal>>>,
    /// Blocks freed by the transaction whose commit is in flight: still not reusable.
    committing_free: HashSet<u64>,
    /// Blocks of the in-flight commit: must stay cached until their home writes are issued.
    committing: HashSet<u64>,
    tx_limit: usize,
    poisoned: bool,
    alloc_rg: usize,
}

impl Store {
    /// Opens the filesystem: superblock, journal (replayed if needed), group headers.
    pub fn open(
        dev: Arc<dyn BlockDevice>,
        journal_index: u32,
        read_only: bool,
    ) -> Result<(Self, ReplayStats)> {
        let order = Arc::new(crate::block::FlushOrder::new(dev));
        let dev: Arc<dyn BlockDevice> = order.clone();
        let sb = read_superblock(&*dev)?;
        if journal_index >= sb.journal_count {
            return Err(FsError::Invalid("journal index beyond the journal count"));
        }
        let (journal, stats) = Journal::open(&*dev, &sb, journal_index, read_only)?;
        let mut s = Self::with_order(order, sb);
        s.tx_limit = journal.max_tx_blocks();
        s.journal = (!read_only).then(|| Arc::new(Mutex::new(journal)));
        s.load_rgs()?;
        // Each journal (node) starts allocating in its own share of the groups, so cluster
        // nodes rarely allocate from the same group (OCFS2's local alloc idea).
        s.alloc_rg = journal_index as usize * s.rgs.len() / s.sb.journal_count.max(1) as usize;
        Ok((s, stats))
    }

    /// A store without a journal (mkfs and fsck write in place).
    pub fn bare(dev: Arc<dyn BlockDevice>, sb: Superblock) -> Self {
        Self::with_order(Arc::new(crate::block::FlushOrder::new(dev)), sb)
    }

    fn with_order(order: Arc<crate::block::FlushOrder>, sb: Superblock) -> Self {
        let bs = sb.block_size as usize;
        Store {
            dev: order.clone(),
            order,
            sb,
            bs,
            blocks: HashMap::new(),
            dirty: BTreeSet::new(),
            rgs: Vec::new(),
            rgs_stale: false,
            hints: Vec::new(),
            pending_free: HashSet::new(),
            held_until_checkpoint: HashSet::new(),
            journal: None,
            committing_free: HashSet::new(),
            committing: HashSet::new(),
            tx_limit: usize::MAX,
            poisoned: false,
            alloc_rg: 0,
        }
    }

    pub fn load_rgs(&mut self) -> Result<()> {
        // Built aside: on an error the old geometry stays for `rg_of`.
        let mut rgs = Vec::with_capacity(self.sb.rg_count as usize);
        for i in 0..self.sb.rg_count {
            let (start, len) = self.sb.rg_range(i);
            let rg = RgHeader::decode(self.meta(start, BlockType::RgHeader)?, start)?;
            if rg.index != i
                || (rg.bitmap_blocks, rg.data_count) != format::rg_geometry(len, self.bs)
            {
                return Err(FsError::inconsistent(
                    start,
                    "resource group header disagrees with the superblock",
                ));
            }
            rgs.push(rg);
        }
        self.rgs = rgs;
        self.hints = vec![HINT_UNKNOWN; self.rgs.len()];
        self.rgs_stale = false;
        Ok(())
    }

    /// Re-reads the group headers if another node may have changed them.
    pub fn fresh_rgs(&mut self) -> Result<()> {
        if self.rgs_stale {
            self.load_rgs()?;
        }
        Ok(())
    }

    /// Forgets every cached metadata block and marks the group headers stale: another node
    /// may have changed anything while this one did not hold the filesystem's glock.
    /// Called only with nothing dirty (the glock is flushed before it is given up).
    pub fn drop_caches(&mut self) -> Result<()> {
        debug_assert!(self.dirty.is_empty(), "dropping caches with dirty blocks");
        let keep: HashSet<u64> = self.dirty.iter().chain(&self.committing).copied().collect();
        self.blocks.retain(|b, _| keep.contains(b));
        // The headers (and with them the scan hints) are re-read when first needed:
        // most grants only read files.
        self.rgs_stale = true;
        Ok(())
    }

    /// Refuses all further work (the cache can no longer be trusted).
    pub fn poison(&mut self) {
        self.poisoned = true;
    }

    pub fn check_poison(&self) -> Result<()> {
        if self.poisoned {
            Err(FsError::Poisoned)
        } else {
            Ok(())
        }
    }

    /// Reads a metadata block through the cache, verifying it on first load.
    pub fn meta(&mut self, blk: u64, ty: BlockType) -> Result<&[u8]> {
        self.load(blk, ty)?;
        Ok(&self.blocks[&blk])
    }

    /// Like `meta`, and adds the block to the running transaction.
    pub fn meta_mut(&mut self, blk: u64, ty: BlockType) -> Result<&mut [u8]> {
        self.load(blk, ty)?;
        self.dirty.insert(blk);
        Ok(self.blocks.get_mut(&blk).expect("loaded"))
    }

    /// A new zeroed metadata block with a fresh header, in the running transaction.
    pub fn meta_new(&mut self, blk: u64, ty: BlockType) -> &mut [u8] {
        let mut b = vec![0u8; self.bs].into_boxed_slice();
        init_header(&mut b, ty, blk);
        self.blocks.insert(blk, b);
        self.dirty.insert(blk);
        self.blocks.get_mut(&blk).expect("inserted")
    }

    /// Blocks of type `ty` about to be loaded (a cold `ls -l` loads one inode block per
    /// entry, in hash order): those not cached yet, adjacent ones as one range, are handed
    /// to the device as a hint (an image file: the kernel reads them in the background),
    /// or, for a device without a cache of its own (an NBD export), read right away with
    /// many requests in flight into our cache. Either way the loads that follow do not
    /// wait for one random read after another. Only a hint: errors and blocks that fail
    /// their checks are left for the loads to report.
    pub fn prefetch(&mut self, blks: impl IntoIterator<Item = u64>, ty: BlockType) {
        let mut want: Vec<u64> = blks
            .into_iter()
            .filter(|b| *b < self.sb.block_count && !self.blocks.contains_key(b))
            .collect();
        if want.is_empty() {
            return;
        }
        want.sort_unstable();
        want.dedup();
        let bs = self.bs as u64;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for b in want {
            match ranges.last_mut() {
                Some((off, len)) if *off + *len == b * bs && *len < PREFETCH_RANGE_BYTES => {
                    *len += bs
                }
                _ => ranges.push((b * bs, bs)),
            }
        }
        if self.dev.hint_reads(&ranges) {
            return;
        }
        let mut bufs: Vec<(u64, Vec<u8>)> = ranges
            .iter()
            .map(|&(off, len)| (off, vec![0u8; len as usize]))
            .collect();
        let mut reqs: Vec<(u64, &mut [u8])> = bufs
            .iter_mut()
            .map(|(off, b)| (*off, b.as_mut_slice()))
            .collect();
        if self.dev.read_many(&mut reqs).is_err() {
            return;
        }
        for (off, buf) in bufs {
            for (i, b) in buf.chunks(self.bs).enumerate() {
                let blk = off / bs + i as u64;
                if self.blocks.contains_key(&blk) || format::check(b, ty, blk).is_err() {
                    continue;
                }
                if self.blocks.len() >= CACHE_CAP_BLOCKS {
                    self.evict();
                }
                self.blocks.insert(blk, b.into());
            }
        }
    }

    fn load(&mut self, blk: u64, ty: BlockType) -> Result<()> {
        if let Some(b) = self.blocks.get(&blk) {
            if format::get_u16(b, 4) != ty as u16 {
                return Err(FsError::inconsistent(
                    blk,
                    format!("cached block is not a {ty:?} block"),
                ));
            }
            return Ok(());
        }
        if blk >= self.sb.block_count {
            return Err(FsError::inconsistent(
                blk,
                "block address beyond the end of the filesystem",
            ));
        }
        if ty == BlockType::Inode {
            // Read around a cold inode: a small file's data and the next files' inodes
            // were allocated right after it, and come in the same device read (a hint
            // only; devices without a page cache ignore it).
            let end = (blk + INODE_READAROUND_BLOCKS).min(self.sb.block_count);
            let bs = self.bs as u64;
            self.dev.hint_reads(&[(blk * bs, (end - blk) * bs)]);
        }
        let mut b = vec![0u8; self.bs].into_boxed_slice();
        self.dev.read_at(&mut b, blk * self.bs as u64)?;
        format::check(&b, ty, blk)?;
        if self.blocks.len() >= CACHE_CAP_BLOCKS {
            self.evict();
        }
        self.blocks.insert(blk, b);
        Ok(())
    }

    fn evict(&mut self) {
        let target = CACHE_CAP_BLOCKS * 3 / 4;
        let excess = self.blocks.len().saturating_sub(target);
        let victims: Vec<u64> = self
            .blocks
            .keys()
            .filter(|k| !self.dirty.contains(k) && !self.committing.contains(k))
            .take(excess)
            .copied()
            .collect();
        for v in victims {
            self.blocks.remove(&v);
        }
    }

    /// Drops a freed metadata block from the cache and the transaction.
    pub fn forget_block(&mut self, blk: u64) {
        self.blocks.remove(&blk);
        self.dirty.remove(&blk);
    }

    pub fn dirty_count(&self) -> usize {
        self.dirty.len()
    }

    /// First half of a commit, under the filesystem lock: seals and copies every dirty
    /// block, and moves this transaction's freed blocks to the in-flight set.
    pub fn prepare_commit(&mut self) -> Result<LoggedBlocks> {
        self.check_poison()?;
        assert!(
            self.committing_free.is_empty() && self.committing.is_empty(),
            "one commit at a time"
        );
        let mut out = Vec::with_capacity(self.dirty.len());
        for blk in std::mem::take(&mut self.dirty) {
            let b = self.blocks.get_mut(&blk).expect("dirty blocks stay cached");
            format::seal(b);
            out.push((blk, b.to_vec()));
            self.committing.insert(blk);
        }
        self.committing_free = std::mem::take(&mut self.pending_free);
        Ok(out)
    }

    /// Second half, under the lock again: `res` is what `write_tx` returned.
    pub fn finish_commit(&mut self, res: &Result<bool>) {
        self.committing.clear();
        match res {
            Ok(checkpointed) => {
                self.committing_free.clear();
                if *checkpointed {
                    self.held_until_checkpoint.clear();
                }
            }
            // The cache no longer matches anything durable; refuse further work.
            Err(_) => self.poisoned = true,
        }
    }

    /// A whole commit while holding the lock (mount, mkfs, fsck, unmount: no concurrency).
    pub fn commit(&mut self) -> Result<()> {
        let blocks = self.prepare_commit()?;
        let pre_flush = self.order.barrier_pending();
        let res = write_tx(
            &*self.dev,
            self.bs,
            self.journal.as_deref(),
            &blocks,
            pre_flush,
        );
        self.finish_commit(&res);
        res.map(|_| ())
    }

    /// Commits and checkpoints; `clean` marks the journal clean for unmount.
    pub fn sync_all(&mut self, clean: bool) -> Result<()> {
        self.check_poison()?;
        let log_empty = self
            .journal
            .as_ref()
            .is_none_or(|j| j.lock().used_blocks() == 0);
        if !clean && log_empty && self.dirty.is_empty() && self.pending_free.is_empty() {
            // Everything is home already (a glock taken EX but not used to change
            // anything, or flushed just before): a demotion costs no device flush.
            // File data written in place since then is visible to every node through
            // the device already; its durability is fsync's business, not a hand-off's.
            self.held_until_checkpoint.clear();
            return Ok(());
        }
        self.commit()?;
        if let Some(j) = self.journal.as_ref() {
            j.lock()
                .checkpoint(&*self.dev, clean)
                .inspect_err(|_| self.poisoned = true)?;
        }
        self.held_until_checkpoint.clear();
        Ok(())
    }

    /// True if freed blocks wait for a commit or checkpoint before they can be reused.
    pub fn has_held_blocks(&self) -> bool {
        !self.pending_free.is_empty()
            || !self.committing_free.is_empty()
            || !self.held_until_checkpoint.is_empty()
    }

    /// Largest number of dirty blocks one transaction may hold.
    pub fn tx_limit(&self) -> usize {
        self.tx_limit
    }

    // ---- inodes ----------------------------------------------------------------------

    /// Loads an inode, refusing block numbers that are not allocated inodes.
    pub fn inode(&mut self, blk: u64) -> Result<Inode> {
        match self.rg_of(blk).map(|_| self.state(blk)).transpose()? {
            Some(BlockState::Inode | BlockState::Unlinked) => {}
            _ => return Err(FsError::Stale(blk)),
        }
        let b = self.meta(blk, BlockType::Inode)?;
        Inode::decode(b, blk)
    }

    /// Loads an inode without consulting the bitmap (fsck walks before trusting bitmaps).
    pub fn inode_raw(&mut self, blk: u64) -> Result<Inode> {
        if self.rg_of(blk).is_none() {
            return Err(FsError::inconsistent(
                blk,
                "inode address outside every data area",
            ));
        }
        let b = self.meta(blk, BlockType::Inode)?;
        Inode::decode(b, blk)
    }

    /// Rewrites every bitmap block and group header from `states` (one byte per block,
    /// a `BlockState` value), the way fsck repairs allocation metadata.
    pub fn rebuild_bitmaps(&mut self, states: &[u8]) -> Result<()> {
        let per = format::bitmap_blocks_per(self.bs) as u64;
        for i in 0..self.sb.rg_count {
            let (start, len) = self.sb.rg_range(i);
            let (bm, data) = format::rg_geometry(len, self.bs);
            let data0 = start + 1 + u64::from(bm);
            let mut h = RgHeader {
                index: i,
                bitmap_blocks: bm,
                data0,
                data_count: data,
                free: 0,
                inodes: 0,
                unlinked: 0,
                igeneration: 1,
            };
            if let Some(old) = self.rgs.get(i as usize) {
                h.igeneration = old.igeneration.max(1);
            }
            for k in 0..u64::from(bm) {
                let b = self.meta_new(start + 1 + k, BlockType::Bitmap);
                for bit in 0..per.min(u64::from(data).saturating_sub(k * per)) {
                    let blk = data0 + k * per + bit;
                    let st = states[blk as usize] & 3;
                    b[HDR_LEN + (bit / 4) as usize] |= st << ((bit % 4) * 2);
                }
            }
            for blk in data0..data0 + u64::from(data) {
                match BlockState::from_bits(states[blk as usize]) {
                    BlockState::Free => h.free += 1,
                    BlockState::Inode => h.inodes += 1,
                    BlockState::Unlinked => {
                        h.inodes += 1;
                        h.unlinked += 1;
                    }
                    BlockState::Used => {}
                }
            }
            let b = self.meta_new(start, BlockType::RgHeader);
            h.encode_into(b, start);
        }
        self.load_rgs()
    }

    pub fn put_inode(&mut self, ino: &Inode) -> Result<()> {
        let b = self.meta_mut(ino.block, BlockType::Inode)?;
        ino.encode_into(b);
        Ok(())
    }

    /// Allocates an inode block near `goal`.
    pub fn alloc_inode_block(&mut self, goal: u64) -> Result<(u64, u64)> {
        let (blk, _) = self.alloc(goal, 1, BlockState::Inode)?;
        let rg = self.rg_of(blk).expect("allocated in a group");
        let generation = self.rgs[rg].igeneration;
        self.meta_new(blk, BlockType::Inode);
        Ok((blk, generation))
    }

    pub fn read_data(&self, buf: &mut [u8], blk: u64) -> Result<()> {
        self.dev.read_at(buf, blk * self.bs as u64)?;
        Ok(())
    }
    pub fn write_data(&self, buf: &[u8], blk: u64) -> Result<()> {
        self.dev.write_at(buf, blk * self.bs as u64)?;
        // Ordered mode: durable before the commit block that may point at it.
        self.order.require_barrier();
        Ok(())
    }
}

/// Writes a prepared transaction: through the journal (then checkpoints if the log is over
/// half full) or, without a journal, in place. Returns whether the log was checkpointed
/// after this transaction, which makes held metadata blocks reusable. `pre_flush`: some
/// write must be durable before the commit block can be (see `Journal::commit`).
pub fn write_tx(
    dev: &dyn BlockDevice,
    bs: usize,
    journal: Option<&Mutex<Journal>>,
    blocks: &[(u64, Vec<u8>)],
    pre_flush: bool,
) -> Result<bool> {
    let Some(j) = journal else {
        write_in_place(dev, bs, blocks)?;
        return Ok(true);
    };
    let mut j = j.lock();
    if blocks.is_empty() {
        // Nothing to log, but fsync still promises that written data is durable.
        dev.flush()?;
        return Ok(false);
    }
    j.commit(dev, blocks, pre_flush)?;
    if j.used_blocks() > j.log_len() / 2 {
        j.checkpoint(dev, false)?;
        return Ok(true);
    }
    Ok(false)
}

fn write_in_place(dev: &dyn BlockDevice, bs: usize, blocks: &[(u64, Vec<u8>)]) -> Result<()> {
    for (blk, data) in blocks {
        dev.write_at(data, blk * bs as u64)?;
    }
    dev.flush()?;
    Ok(())
}

/// Reads and validates the superblock, with a clear error for foreign or short devices.
pub fn read_superblock(dev: &dyn BlockDevice) -> Result<Superblock> {
    let size = dev.size_bytes();
    if size < 4096 {
        return Err(FsError::Corrupt(format::FormatError::Invalid {
            block: 0,
            what: format!("device of {size} bytes is too small to be a tandem filesystem"),
        }));
    }
    let mut b = vec![0u8; 4096];
    dev.read_at(&mut b, 0)?;
    let bs = format::get_u32(&b, 28) as usize;
    if (format::MIN_BLOCK_SIZE as usize..=format::MAX_BLOCK_SIZE as usize).contains(&bs)
        && bs > 4096
        && bs as u64 <= size
    {
        b = vec![0u8; bs];
        dev.read_at(&mut b, 0)?;
    }
    let sb = Superblock::decode(&b)?;
    let need = sb.block_count.saturating_mul(u64::from(sb.block_size));
    if need > size {
        return Err(FsError::Corrupt(format::FormatError::Invalid {
            block: 0,
            what: format!(
                "filesystem needs {need} bytes but the device has only {size} (truncated image?)"
            ),
        }));
    }
    Ok(sb)
}
