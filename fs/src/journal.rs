//! The per-node metadata journal: physical block logging with group commit, checkpoint and
//! replay (jbd2-style, ordered data).
//!
//! A journal is a contiguous run of blocks: a header block, then a circular log. A
//! transaction is one or more descriptor blocks (listing home addresses) each followed by
//! the logged block images, then a commit block carrying the CRC of all images. Replay
//! applies transactions in sequence order from the header's tail and stops at the first
//! one that is missing, torn or out of sequence.

use crate::block::BlockDevice;
use crate::error::{FsError, Result};
use crate::format::{
    self, get_u32, get_u64, init_header, put_u32, put_u64, seal, BlockType, Superblock,
};

const JH_SEQ: usize = 24;
const JH_TAIL: usize = 32;
const JH_CLEAN: usize = 40;
const JH_INDEX: usize = 44;
const JH_UUID: usize = 48;
const JD_SEQ: usize = 24;
const JD_UUID: usize = 32;
const JD_COUNT: usize = 48;
const JD_TARGETS: usize = 56;
const JC_NBLOCKS: usize = 48;
const JC_CRC: usize = 52;

/// Block images of one transaction with their home addresses.
pub type LoggedBlocks = Vec<(u64, Vec<u8>)>;

/// Decoded journal header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalHeader {
    /// Sequence number of the first transaction at `tail`.
    pub seq: u64,
    /// Log position (monotonic counter; block = position mod log length).
    pub tail: u64,
    /// Set on clean unmount: nothing to replay.
    pub clean: bool,
    pub index: u32,
}

impl JournalHeader {
    pub fn encode(&self, bs: usize, blkno: u64, uuid: &[u8; 16]) -> Vec<u8> {
        let mut b = vec![0u8; bs];
        init_header(&mut b, BlockType::JournalHeader, blkno);
        put_u64(&mut b, JH_SEQ, self.seq);
        put_u64(&mut b, JH_TAIL, self.tail);
        put_u32(&mut b, JH_CLEAN, u32::from(self.clean));
        put_u32(&mut b, JH_INDEX, self.index);
        b[JH_UUID..JH_UUID + 16].copy_from_slice(uuid);
        seal(&mut b);
        b
    }
    pub fn decode(b: &[u8], blkno: u64, uuid: &[u8; 16]) -> Result<Self> {
        format::check(b, BlockType::JournalHeader, blkno)?;
        if &b[JH_UUID..JH_UUID + 16] != uuid {
            return Err(FsError::inconsistent(
                blkno,
                "journal header belongs to another filesystem",
            ));
        }
        Ok(Self {
            seq: get_u64(b, JH_SEQ),
            tail: get_u64(b, JH_TAIL),
            clean: get_u32(b, JH_CLEAN) != 0,
            index: get_u32(b, JH_INDEX),
        })
    }
}

/// One node's journal while mounted.
pub struct Journal {
    bs: usize,
    start: u64,
    log_len: u64,
    uuid: [u8; 16],
    index: u32,
    /// Lowest home block a logged block may have (everything below is sb/journals).
    min_home: u64,
    block_count: u64,
    head: u64,
    tail: u64,
    next_seq: u64,
    tail_seq: u64,
    /// The tail that the header on stable storage is known to hold. A checkpoint writes
    /// the header without flushing it (see `checkpoint`); until a later flush, replay may
    /// still start here, so the log behind it must not be overwritten.
    durable_tail: u64,
    /// A header was written since the last flush.
    header_unflushed: bool,
}

/// What replay found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplayStats {
    pub was_clean: bool,
    pub transactions: u64,
    pub blocks: u64,
}

impl Journal {
    fn new(sb: &Superblock, index: u32) -> Self {
        let (start, len) = sb.journal_range(index);
        Self {
            bs: sb.block_size as usize,
            start,
            log_len: len - 1,
            uuid: sb.uuid,
            index,
            min_home: sb.rg_start,
            block_count: sb.block_count,
            head: 0,
            tail: 0,
            next_seq: 1,
            tail_seq: 1,
            durable_tail: 0,
            header_unflushed: false,
        }
    }

    fn addr(&self, pos: u64) -> u64 {
        self.start + 1 + pos % self.log_len
    }

    /// Writes an empty, clean journal (mkfs).
    pub fn format(dev: &dyn BlockDevice, sb: &Superblock, index: u32) -> Result<()> {
        let j = Self::new(sb, index);
        let h = JournalHeader {
            seq: 1,
            tail: 0,
            clean: true,
            index,
        };
        dev.write_at(&h.encode(j.bs, j.start, &j.uuid), j.start * j.bs as u64)?;
        Ok(())
    }

    pub fn read_header(
        dev: &dyn BlockDevice,
        sb: &Superblock,
        index: u32,
    ) -> Result<JournalHeader> {
        let j = Self::new(sb, index);
        let mut b = vec![0u8; j.bs];
        dev.read_at(&mut b, j.start * j.bs as u64)?;
        JournalHeader::decode(&b, j.start, &j.uuid)
    }

    /// Opens journal `index`, replaying it if the last unmount was not clean, and marks it
    /// in use (not clean) so a crash from now on forces replay.
    pub fn open(
        dev: &dyn BlockDevice,
        sb: &Superblock,
        index: u32,
        read_only: bool,
    ) -> Result<(Self, ReplayStats)> {
        let mut j = Self::new(sb, index);
        let h = Self::read_header(dev, sb, index)?;
        j.tail = h.tail;
        j.head = h.tail;
        j.durable_tail = h.tail;
        j.next_seq = h.seq;
        j.tail_seq = h.seq;
        let mut stats = ReplayStats {
            was_clean: h.clean,
            ..Default::default()
        };
        if !h.clean {
            if read_only {
                return Err(FsError::NeedsRecovery(index));
            }
            stats = j.replay(dev)?;
        }
        if !read_only {
            j.write_header(dev, false)?;
        }
        Ok((j, stats))
    }

    /// Replays journal `index` (someone else's, or one fsck repairs) and marks it clean, so
    /// nothing in it is ever replayed again.
    pub fn recover(dev: &dyn BlockDevice, sb: &Superblock, index: u32) -> Result<ReplayStats> {
        let (mut j, stats) = Self::open(dev, sb, index, false)?;
        j.checkpoint(dev, true)?;
        Ok(stats)
    }

    /// Applies every complete transaction from the tail, then empties the log.
    fn replay(&mut self, dev: &dyn BlockDevice) -> Result<ReplayStats> {
        let mut stats = ReplayStats::default();
        let mut pos = self.tail;
        let mut seq = self.next_seq;
        while let Some((blocks, used)) = self.read_tx(dev, pos, seq)? {
            for (home, data) in &blocks {
                dev.write_at(data, home * self.bs as u64)?;
            }
            stats.transactions += 1;
            stats.blocks += blocks.len() as u64;
            pos += used;
            seq += 1;
        }
        dev.flush()?;
        self.head = pos;
        self.tail = pos;
        self.durable_tail = pos;
        self.next_seq = seq;
        self.tail_seq = seq;
        tracing::info!(journal = self.index, ?stats, "journal replayed");
        Ok(stats)
    }

    /// Reads and verifies the transaction with sequence `seq` at `pos`; None if there is none.
    pub fn read_tx(
        &self,
        dev: &dyn BlockDevice,
        pos: u64,
        seq: u64,
    ) -> Result<Option<(LoggedBlocks, u64)>> {
        let mut blocks = Vec::new();
        let mut p = pos;
        let mut crc = crc32fast::Hasher::new();
        loop {
            if p - pos >= self.log_len {
                return Ok(None);
            }
            let addr = self.addr(p);
            let mut b = vec![0u8; self.bs];
            dev.read_at(&mut b, addr * self.bs as u64)?;
            let ty = format::peek_type(&b);
            if ty == Some(BlockType::JournalCommit as u16) {
                let ok = format::check(&b, BlockType::JournalCommit, addr).is_ok()
                    && get_u64(&b, JD_SEQ) == seq
                    && b[JD_UUID..JD_UUID + 16] == self.uuid
                    && get_u32(&b, JC_NBLOCKS) as usize == blocks.len()
                    && get_u32(&b, JC_CRC) == crc.clone().finalize();
                return Ok(ok.then_some((blocks, p + 1 - pos)));
            }
            if ty != Some(BlockType::JournalDesc as u16)
                || format::check(&b, BlockType::JournalDesc, addr).is_err()
                || get_u64(&b, JD_SEQ) != seq
                || b[JD_UUID..JD_UUID + 16] != self.uuid
            {
                return Ok(None);
            }
            let count = get_u32(&b, JD_COUNT) as usize;
            if count > (self.bs - JD_TARGETS) / 8 {
                return Ok(None);
            }
            p += 1;
            for i in 0..count {
                let home = get_u64(&b, JD_TARGETS + 8 * i);
                if home < self.min_home || home >= self.block_count || p - pos >= self.log_len {
                    return Ok(None);
                }
                let mut data = vec![0u8; self.bs];
                dev.read_at(&mut data, self.addr(p) * self.bs as u64)?;
                // Logged images are sealed metadata; anything else means a torn log.
                let Some(t) = format::peek_type(&data).and_then(BlockType::from_u16) else {
                    return Ok(None);
                };
                if format::check(&data, t, home).is_err() {
                    return Ok(None);
                }
                crc.update(&data);
                blocks.push((home, data));
                p += 1;
            }
        }
    }

    fn blocks_needed(&self, n: usize) -> u64 {
        let per = (self.bs - JD_TARGETS) / 8;
        (n.div_ceil(per) + n + 1) as u64
    }

    /// Largest transaction (in logged blocks) this journal can ever hold.
    pub fn max_tx_blocks(&self) -> usize {
        let per = (self.bs - JD_TARGETS) / 8;
        let usable = self.log_len as usize - 2;
        usable * per / (per + 1)
    }

    /// Commits sealed block images: log them, make them durable, then write them home.
    ///
    /// `pre_flush`: some write outside the log must be durable before the commit block
    /// may be (ordered file data this transaction points at, or another node's journal
    /// header; see `FlushOrder`). Then the log payload goes out and is flushed before the
    /// commit block is written, and that flush also covers those writes: two flushes.
    /// Otherwise payload and commit block go out together and one flush makes them
    /// durable (jbd2's async commit): a crash in between may keep the commit block without
    /// some payload block, and replay then finds the CRC in the commit block wrong and
    /// drops the transaction, which was never acknowledged.
    pub fn commit(
        &mut self,
        dev: &dyn BlockDevice,
        blocks: &[(u64, Vec<u8>)],
        pre_flush: bool,
    ) -> Result<()> {
        let need = self.blocks_needed(blocks.len());
        if need > self.log_len - 1 {
            return Err(FsError::NoSpace);
        }
        if self.head + need - self.tail > self.log_len {
            self.checkpoint(dev, false)?;
        }
        if self.head + need - self.durable_tail > self.log_len {
            // The payload would overwrite transactions that the header on disk still
            // points at: make the new header durable first, or a crash before this
            // commit's flush could replay a torn prefix of them over newer home blocks.
            self.flush_header(dev)?;
        }
        let seq = self.next_seq;
        let per = (self.bs - JD_TARGETS) / 8;
        let mut pos = self.head;
        let mut crc = crc32fast::Hasher::new();
        // The payload is assembled in log order and written in as few requests as the
        // circular log allows: over NBD every request is a replicated round trip.
        let mut log = Vec::with_capacity((need as usize - 1) * self.bs);
        for chunk in blocks.chunks(per) {
            let addr = self.addr(pos);
            let mut d = vec![0u8; self.bs];
            init_header(&mut d, BlockType::JournalDesc, addr);
            put_u64(&mut d, JD_SEQ, seq);
            d[JD_UUID..JD_UUID + 16].copy_from_slice(&self.uuid);
            put_u32(&mut d, JD_COUNT, chunk.len() as u32);
            for (i, (home, _)) in chunk.iter().enumerate() {
                put_u64(&mut d, JD_TARGETS + 8 * i, *home);
            }
            seal(&mut d);
            log.extend_from_slice(&d);
            pos += 1;
            for (_, data) in chunk {
                crc.update(data);
                log.extend_from_slice(data);
                pos += 1;
            }
        }
        let addr = self.addr(pos);
        let mut c = vec![0u8; self.bs];
        init_header(&mut c, BlockType::JournalCommit, addr);
        put_u64(&mut c, JD_SEQ, seq);
        c[JD_UUID..JD_UUID + 16].copy_from_slice(&self.uuid);
        put_u32(&mut c, JC_NBLOCKS, blocks.len() as u32);
        put_u32(&mut c, JC_CRC, crc.finalize());
        seal(&mut c);
        let header_written = self.header_unflushed.then_some(self.tail);
        if pre_flush {
            self.write_log(dev, self.head, &log)?;
            dev.flush()?;
            dev.write_at(&c, addr * self.bs as u64)?;
        } else {
            log.extend_from_slice(&c);
            self.write_log(dev, self.head, &log)?;
        }
        dev.flush()?;
        if let Some(t) = header_written {
            // Those flushes also made the last header durable.
            self.durable_tail = t;
            self.header_unflushed = false;
        }
        pos += 1;
        // The transaction is durable; home writes may now reach the disk in any order.
        // Runs of adjacent home blocks go out as one request, and all runs at once (over
        // NBD each request is a replicated round trip: in flight together they cost one).
        let mut homes: Vec<&(u64, Vec<u8>)> = blocks.iter().collect();
        homes.sort_unstable_by_key(|(h, _)| *h);
        let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut i = 0;
        while i < homes.len() {
            let mut j = i + 1;
            while j < homes.len() && homes[j].0 == homes[j - 1].0 + 1 && j - i < 256 {
                j += 1;
            }
            let mut run = Vec::with_capacity((j - i) * self.bs);
            for (_, d) in &homes[i..j] {
                run.extend_from_slice(d);
            }
            runs.push((homes[i].0 * self.bs as u64, run));
            i = j;
        }
        let reqs: Vec<(u64, &[u8])> = runs.iter().map(|(o, d)| (*o, d.as_slice())).collect();
        dev.write_many(&reqs)?;
        self.head = pos;
        self.next_seq = seq + 1;
        Ok(())
    }

    /// Writes consecutive log blocks starting at log position `pos`, splitting where the
    /// circular log wraps.
    fn write_log(&self, dev: &dyn BlockDevice, pos: u64, data: &[u8]) -> Result<()> {
        let n = (data.len() / self.bs) as u64;
        let first = n.min(self.log_len - pos % self.log_len);
        let split = first as usize * self.bs;
        dev.write_at(&data[..split], self.addr(pos) * self.bs as u64)?;
        if split < data.len() {
            dev.write_at(&data[split..], self.addr(pos + first) * self.bs as u64)?;
        }
        Ok(())
    }

    /// Makes all home writes durable and frees the log. `clean` marks a clean unmount
    /// and is durable on return.
    ///
    /// Otherwise the new header is written but not flushed: the flush that precedes any
    /// later commit block makes it durable (`commit`), on any node, because every
    /// flush of the replicated device covers every write acknowledged before it. Until
    /// then a crash replays transactions whose blocks are already home, which rewrites
    /// the same images. Nothing newer can be overwritten: a newer home write of one of
    /// those blocks (by us, or by the node that takes the glock next) is only issued
    /// after its own commit's first flush, which covers this header. That saves one of
    /// the four flushes of a glock hand-off.
    pub fn checkpoint(&mut self, dev: &dyn BlockDevice, clean: bool) -> Result<()> {
        // Home writes durable before the header says they need no replay.
        dev.flush()?;
        self.tail = self.head;
        self.tail_seq = self.next_seq;
        self.write_header_only(dev, clean)?;
        if clean {
            self.flush_header(dev)?;
        }
        Ok(())
    }

    /// Flushes a header written by `checkpoint`.
    fn flush_header(&mut self, dev: &dyn BlockDevice) -> Result<()> {
        if self.header_unflushed {
            dev.flush()?;
            self.header_unflushed = false;
        }
        self.durable_tail = self.tail;
        Ok(())
    }

    fn write_header_only(&mut self, dev: &dyn BlockDevice, clean: bool) -> Result<()> {
        let h = JournalHeader {
            seq: self.tail_seq,
            tail: self.tail,
            clean,
            index: self.index,
        };
        dev.write_at(
            &h.encode(self.bs, self.start, &self.uuid),
            self.start * self.bs as u64,
        )?;
        self.header_unflushed = true;
        Ok(())
    }

    fn write_header(&self, dev: &dyn BlockDevice, clean: bool) -> Result<()> {
        let h = JournalHeader {
            seq: self.tail_seq,
            tail: self.tail,
            clean,
            index: self.index,
        };
        dev.write_at(
            &h.encode(self.bs, self.start, &self.uuid),
            self.start * self.bs as u64,
        )?;
        dev.flush()?;
        Ok(())
    }

    /// Fraction of the log in use, for deciding when to checkpoint early.
    pub fn used_blocks(&self) -> u64 {
        self.head - self.tail
    }
    pub fn log_len(&self) -> u64 {
        self.log_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{CrashMode, FaultDevice};
    use crate::format::{LockProto, FORMAT_VERSION};

    const BS: usize = 1024;

    fn sb(journal_blocks: u32) -> Superblock {
        Superblock {
            version: FORMAT_VERSION,
            block_size: BS as u32,
            block_count: 4096,
            uuid: [3; 16],
            lock_proto: LockProto::NoLock,
            lock_table: "t:j".into(),
            journal_count: 1,
            journal_blocks,
            journal_start: 1,
            rg_start: 1 + u64::from(journal_blocks),
            rg_blocks: 1024,
            rg_count: 1,
            root_block: 1 + u64::from(journal_blocks) + 2,
            created_secs: 0,
        }
    }

    fn image(home: u64, fill: u8) -> (u64, Vec<u8>) {
        let mut b = vec![fill; BS];
        init_header(&mut b, BlockType::Inode, home);
        seal(&mut b);
        (home, b)
    }

    fn home_fill(dev: &FaultDevice, home: u64) -> u8 {
        let mut b = vec![0u8; BS];
        dev.read_at(&mut b, home * BS as u64).unwrap();
        b[100]
    }

    #[test]
    fn multi_descriptor_transactions_replay_whole_or_not_at_all() {
        let sb = sb(1024);
        let dev = FaultDevice::new(4096 * BS as u64);
        Journal::format(&dev, &sb, 0).unwrap();
        dev.flush().unwrap();
        let (mut j, _) = Journal::open(&dev, &sb, 0, false).unwrap();
        // 300 blocks need three descriptors at 1 KiB ((1024-56)/8 = 121 per descriptor).
        let tx: Vec<_> = (0..300).map(|i| image(sb.rg_start + 10 + i, 7)).collect();
        j.commit(&dev, &tx, true).unwrap();
        // Power cut right after the commit record: home writes were never flushed.
        let img = dev.crash_image(CrashMode::DropAll, 0);
        let dev2 = FaultDevice::from_image(img);
        let (_, stats) = Journal::open(&dev2, &sb, 0, false).unwrap();
        assert_eq!((stats.transactions, stats.blocks), (1, 300));
        assert!((0..300).all(|i| home_fill(&dev2, sb.rg_start + 10 + i) == 7));
    }

    #[test]
    fn torn_or_missing_commit_discards_the_transaction() {
        let sb = sb(1024);
        let dev = FaultDevice::new(4096 * BS as u64);
        Journal::format(&dev, &sb, 0).unwrap();
        dev.flush().unwrap();
        let (mut j, _) = Journal::open(&dev, &sb, 0, false).unwrap();
        j.commit(&dev, &[image(sb.rg_start + 5, 1)], true).unwrap();
        j.commit(
            &dev,
            &[image(sb.rg_start + 5, 2), image(sb.rg_start + 6, 2)],
            true,
        )
        .unwrap();
        // Corrupt the second commit block (log positions: 0 desc, 1 img, 2 commit, 3 desc,
        // 4-5 images, 6 commit).
        let mut img = dev.crash_image(CrashMode::DropAll, 0);
        let commit2 = (sb.journal_start + 1 + 6) as usize * BS;
        img[commit2 + 60] ^= 0xff;
        let dev2 = FaultDevice::from_image(img);
        let (_, stats) = Journal::open(&dev2, &sb, 0, false).unwrap();
        assert_eq!(stats.transactions, 1);
        assert_eq!(
            home_fill(&dev2, sb.rg_start + 5),
            1,
            "first transaction applied"
        );
        assert_eq!(
            home_fill(&dev2, sb.rg_start + 6),
            0,
            "second transaction dropped whole"
        );
    }

    #[test]
    fn the_log_wraps_around_and_still_replays_in_order() {
        let sb = sb(40);
        let dev = FaultDevice::new(4096 * BS as u64);
        Journal::format(&dev, &sb, 0).unwrap();
        dev.flush().unwrap();
        let (mut j, _) = Journal::open(&dev, &sb, 0, false).unwrap();
        for round in 0..50u8 {
            let tx: Vec<_> = (0..5).map(|i| image(sb.rg_start + i, round)).collect();
            j.commit(&dev, &tx, round % 2 == 0).unwrap();
            if j.used_blocks() > j.log_len() / 2 {
                j.checkpoint(&dev, false).unwrap();
            }
        }
        assert!(j.head > 3 * j.log_len, "the log wrapped several times");
        let img = dev.crash_image(CrashMode::DropAll, 0);
        let dev2 = FaultDevice::from_image(img);
        Journal::open(&dev2, &sb, 0, false).unwrap();
        assert!(
            (0..5).all(|i| home_fill(&dev2, sb.rg_start + i) == 49),
            "last transaction wins"
        );
    }

    #[test]
    fn a_checkpoint_flushes_once_and_its_header_becomes_durable_with_the_next_commit() {
        let sb = sb(1024);
        let dev = FaultDevice::new(4096 * BS as u64);
        Journal::format(&dev, &sb, 0).unwrap();
        dev.flush().unwrap();
        let (mut j, _) = Journal::open(&dev, &sb, 0, false).unwrap();
        j.commit(&dev, &[image(sb.rg_start + 5, 1)], true).unwrap();
        let before = dev.flush_count();
        j.checkpoint(&dev, false).unwrap();
        assert_eq!(
            dev.flush_count() - before,
            1,
            "home writes flushed, header not"
        );
        // A crash now loses the header: replay rewrites the image that is already home.
        let dev2 = FaultDevice::from_image(dev.crash_image(CrashMode::DropAll, 0));
        let (_, stats) = Journal::open(&dev2, &sb, 0, false).unwrap();
        assert_eq!(
            (stats.transactions, home_fill(&dev2, sb.rg_start + 5)),
            (1, 1)
        );
        // The next commit's first flush carries the header: nothing is replayed twice.
        j.commit(&dev, &[image(sb.rg_start + 6, 2)], true).unwrap();
        let dev3 = FaultDevice::from_image(dev.crash_image(CrashMode::DropAll, 0));
        let (_, stats) = Journal::open(&dev3, &sb, 0, false).unwrap();
        assert_eq!(
            stats.transactions, 1,
            "only the transaction after the checkpoint"
        );
        // A clean checkpoint (unmount) is durable on return.
        j.checkpoint(&dev, true).unwrap();
        let dev4 = FaultDevice::from_image(dev.crash_image(CrashMode::DropAll, 0));
        assert!(Journal::read_header(&dev4, &sb, 0).unwrap().clean);
    }

    #[test]
    fn a_crash_in_any_commit_never_rolls_home_blocks_back() {
        // A small log and no checkpoints by the caller: a commit that finds the log full
        // checkpoints and reuses the oldest log space at once, while the header on disk
        // may still point there. Crash inside every commit, at every write, many ways.
        // Transactions of varying length put boundaries everywhere in the circular log.
        let seeds: u64 = std::env::var("TANDEM_JOURNAL_CRASH_SEEDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(6);
        let sb = sb(40);
        for fail_round in 2..40u8 {
            for writes in 0..4 {
                for seed in 0..seeds {
                    let dev = FaultDevice::new(1024 * BS as u64);
                    Journal::format(&dev, &sb, 0).unwrap();
                    dev.flush().unwrap();
                    let (mut j, _) = Journal::open(&dev, &sb, 0, false).unwrap();
                    let mut done = 0u8;
                    for round in 1..=fail_round {
                        let extra = (u64::from(round) * 7 + seed * 13 + seed / 9) % 9;
                        // Both commit forms: with and without the first flush.
                        let pre_flush = (u64::from(round) + seed) % 3 == 0;
                        let tx: Vec<_> = (0..5 + extra)
                            .map(|i| image(sb.rg_start + i, round))
                            .collect();
                        if round == fail_round {
                            dev.fail_writes_after(Some(writes));
                            let _ = j.commit(&dev, &tx, pre_flush);
                            break;
                        }
                        j.commit(&dev, &tx, pre_flush).unwrap();
                        done = round;
                    }
                    let mode = if seed % 2 == 0 {
                        CrashMode::RandomSubset
                    } else {
                        CrashMode::Torn
                    };
                    let img = dev.crash_image(mode, seed / 9 + seed);
                    let dev2 = FaultDevice::from_image(img);
                    Journal::open(&dev2, &sb, 0, false).unwrap();
                    let vals: Vec<u8> = (0..5).map(|i| home_fill(&dev2, sb.rg_start + i)).collect();
                    assert!(
                        vals.iter().all(|v| *v == vals[0]) && (vals[0] == done || vals[0] == fail_round),
                        "round {fail_round}, {writes} writes, seed {seed}: home holds {vals:?}, last durable round {done}"
                    );
                }
            }
        }
    }

    #[test]
    fn replay_never_starts_behind_log_space_a_commit_reused() {
        // Log of 39 blocks. Rounds 1-4 fill positions 0-31 and a checkpoint moves the
        // tail to 32; round 5 (32-38) makes that header durable; rounds 6-8 fill 0-25.
        // Round 9 (15 blocks) finds the log full, checkpoints, and its payload covers
        // 26-38 (one write, round 5 among it) and 0-1 (a second write, into round 6).
        // If a crash keeps only that second write, a replay from the old tail 32 would
        // apply round 5 over the newer rounds and stop at round 6: the header must be
        // durable before the log behind it is reused.
        let sb = sb(40);
        let sizes = [6u64, 6, 6, 6, 5, 6, 6, 8, 13];
        for seed in 0..64 {
            let dev = FaultDevice::new(1024 * BS as u64);
            Journal::format(&dev, &sb, 0).unwrap();
            dev.flush().unwrap();
            let (mut j, _) = Journal::open(&dev, &sb, 0, false).unwrap();
            for (k, n) in sizes.iter().enumerate() {
                let round = k as u8 + 1;
                let tx: Vec<_> = (0..*n).map(|i| image(sb.rg_start + i, round)).collect();
                if round == 9 {
                    // The header and the two payload writes go out, the flush fails.
                    dev.fail_writes_after(Some(3));
                    assert!(j.commit(&dev, &tx, true).is_err());
                } else {
                    j.commit(&dev, &tx, true).unwrap();
                }
                if round == 4 {
                    j.checkpoint(&dev, false).unwrap();
                }
            }
            let dev2 = FaultDevice::from_image(dev.crash_image(CrashMode::RandomSubset, seed));
            Journal::open(&dev2, &sb, 0, false).unwrap();
            let vals: Vec<u8> = (0..5).map(|i| home_fill(&dev2, sb.rg_start + i)).collect();
            assert_eq!(vals, vec![8; 5], "seed {seed}: home rolled back");
        }
    }

    #[test]
    fn a_transaction_larger_than_the_log_is_refused() {
        let sb = sb(40);
        let dev = FaultDevice::new(4096 * BS as u64);
        Journal::format(&dev, &sb, 0).unwrap();
        let (mut j, _) = Journal::open(&dev, &sb, 0, false).unwrap();
        let tx: Vec<_> = (0..60).map(|i| image(sb.rg_start + i, 1)).collect();
        assert!(matches!(j.commit(&dev, &tx, true), Err(FsError::NoSpace)));
        assert!(j.max_tx_blocks() < 40);
    }
}
