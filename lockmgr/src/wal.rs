//! The durable Raft log of one `tandem-lockd`: an append-only file of checksummed
//! `LogRecord`s (`<state-dir>/lockd/raft.wal`), fdatasync'd once per Ready (group commit),
//! rewritten atomically (temp file, fsync, rename, fsync dir) after each snapshot so the
//! file holds only the snapshot and the entries after it. Layout in docs/LOCKMGR.md:
//!
//! ```text
//! 0  u32 magic   0x4C574C54 ("TLWL")
//! 4  u8  version WAL_VERSION
//! 5  u8  kind    1 entries, 2 hard state, 3 conf state, 4 snapshot
//! 6  u16 reserved, 0
//! 8  u32 len     payload bytes
//! 12 u32 crc32   of bytes 0..12 then the payload
//! 16 payload     protobuf (raft eraftpb) encodings; entries: u32 count, then u32 len + entry
//! ```
//!
//! Replay stops at the first record that is short or fails its checks: a crash can tear only
//! the tail (records are appended and synced in order), so that is where the valid log ends.
//!
//! The file is kept preallocated with written zeros (`PREALLOC_BYTES` at a time): an
//! fdatasync after overwriting allocated blocks has no metadata to commit, which on ext4
//! makes it about half as costly as after an append that grows the file (the lock bench
//! prints both), and every Raft commit waits for one. So after the valid log there are normally only zeros; any
//! other byte there is a torn tail, and the file is truncated at the end of the valid log
//! (so a stale record beyond a tear can never be read as part of the log later).

use crate::log_cache::{LogCache, LogRecord};
use crate::node::{LogSink, SinkError};
use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

pub const WAL_MAGIC: u32 = 0x4C57_4C54;
pub const WAL_VERSION: u8 = 1;
const HEADER_BYTES: usize = 16;
/// Sanity bound on one record (a snapshot of a very large lock table still fits).
const MAX_RECORD_BYTES: u32 = 256 << 20;
const WAL_FILE: &str = "raft.wal";
/// How far ahead of the log's end the file is filled with zeros.
const PREALLOC_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: record at byte {offset} does not fit the log: {message}")]
    Inconsistent {
        path: PathBuf,
        offset: u64,
        message: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn kind_of(rec: &LogRecord) -> u8 {
    match rec {
        LogRecord::Entries(_) => 1,
        LogRecord::HardState(_) => 2,
        LogRecord::ConfState(_) => 3,
        LogRecord::Snapshot(_) => 4,
    }
}

fn pb<M: protobuf::Message>(m: &M) -> Vec<u8> {
    m.write_to_bytes().unwrap_or_default()
}

/// Encodes one record with its header.
pub fn encode_record(rec: &LogRecord) -> Vec<u8> {
    let payload = match rec {
        LogRecord::Entries(ents) => {
            let mut p = Vec::new();
            p.extend_from_slice(&(ents.len() as u32).to_le_bytes());
            for e in ents {
                let bytes = pb(e);
                p.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                p.extend_from_slice(&bytes);
            }
            p
        }
        LogRecord::HardState(hs) => pb(hs),
        LogRecord::ConfState(cs) => pb(cs),
        LogRecord::Snapshot(s) => pb(s),
    };
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    out.extend_from_slice(&WAL_MAGIC.to_le_bytes());
    out.push(WAL_VERSION);
    out.push(kind_of(rec));
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&out[..12]);
    h.update(&payload);
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Decodes the record at the start of `buf`: `Ok(Some((record, bytes used)))`, or
/// `Ok(None)` where the valid log ends (short, torn or corrupt record).
pub fn decode_record(buf: &[u8]) -> Option<(LogRecord, usize)> {
    if buf.len() < HEADER_BYTES {
        return None;
    }
    let u32_at = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().expect("4 bytes"));
    if u32_at(0) != WAL_MAGIC || buf[4] != WAL_VERSION || buf[6] != 0 || buf[7] != 0 {
        return None;
    }
    let len = u32_at(8);
    if len > MAX_RECORD_BYTES || buf.len() - HEADER_BYTES < len as usize {
        return None;
    }
    let end = HEADER_BYTES + len as usize;
    let payload = &buf[HEADER_BYTES..end];
    let mut h = crc32fast::Hasher::new();
    h.update(&buf[..12]);
    h.update(payload);
    if h.finalize() != u32_at(12) {
        return None;
    }
    let rec = match buf[5] {
        1 => {
            let mut ents = Vec::new();
            let count = u32::from_le_bytes(payload.get(..4)?.try_into().ok()?);
            let mut at = 4usize;
            for _ in 0..count {
                let n = u32::from_le_bytes(payload.get(at..at + 4)?.try_into().ok()?) as usize;
                at += 4;
                ents.push(Entry::parse_from_bytes(payload.get(at..at.checked_add(n)?)?).ok()?);
                at += n;
            }
            if at != payload.len() {
                return None;
            }
            LogRecord::Entries(ents)
        }
        2 => LogRecord::HardState(HardState::parse_from_bytes(payload).ok()?),
        3 => LogRecord::ConfState(ConfState::parse_from_bytes(payload).ok()?),
        4 => LogRecord::Snapshot(Snapshot::parse_from_bytes(payload).ok()?),
        _ => return None,
    };
    Some((rec, end))
}

/// The daemon's `LogSink`.
pub struct DiskSink {
    dir: PathBuf,
    /// Positioned at `end`.
    file: BufWriter<File>,
    /// Where the next record goes: the end of the valid log.
    end: u64,
    /// The file's length; every byte between `end` and here is zero.
    allocated: u64,
}

/// The end of the valid log in a WAL file (its records' total length); the file itself
/// may be longer (preallocated zeros). For tests and tools.
pub fn valid_len(path: &Path) -> std::io::Result<u64> {
    let bytes = std::fs::read(path)?;
    let mut at = 0usize;
    while let Some((_, used)) = decode_record(&bytes[at..]) {
        at += used;
    }
    Ok(at as u64)
}

/// Opens (or creates) the log in `dir`. A new log starts from `initial` (bootstrap
/// configuration, or empty for a node that joins later). Returns the rebuilt log.
pub fn open(dir: &Path, initial: LogCache) -> Result<(LogCache, DiskSink), WalError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let path = dir.join(WAL_FILE);
    if !path.exists() {
        write_image(dir, &initial)?;
    }
    let mut bytes = Vec::new();
    File::open(&path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io_err(&path))?;
    let mut log = LogCache::default();
    let mut at = 0usize;
    while let Some((rec, used)) = decode_record(&bytes[at..]) {
        log.apply(&rec).map_err(|e| WalError::Inconsistent {
            path: path.clone(),
            offset: at as u64,
            message: e.to_string(),
        })?;
        at += used;
    }
    let file = OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    let mut allocated = bytes.len() as u64;
    if bytes[at..].iter().any(|&b| b != 0) {
        tracing::warn!(
            path = %path.display(),
            offset = at,
            dropped_bytes = bytes.len() - at,
            "write-ahead log ends in a torn or corrupt record; truncating"
        );
        file.set_len(at as u64).map_err(io_err(&path))?;
        file.sync_all().map_err(io_err(&path))?;
        allocated = at as u64;
    }
    Ok((
        log,
        DiskSink::at(dir, file, at as u64, allocated).map_err(io_err(&path))?,
    ))
}

/// Writes a whole log image, followed by `PREALLOC_BYTES` of zeros, to a temp file and
/// atomically replaces the WAL with it. Returns (end of the log, file length).
fn write_image(dir: &Path, log: &LogCache) -> Result<(u64, u64), WalError> {
    let tmp = dir.join(format!("{WAL_FILE}.tmp"));
    let path = dir.join(WAL_FILE);
    let mut end = 0u64;
    {
        let mut f = BufWriter::new(File::create(&tmp).map_err(io_err(&tmp))?);
        let mut recs = vec![
            LogRecord::Snapshot(log.latest_snapshot().clone()),
            LogRecord::ConfState(log.conf_state().clone()),
            LogRecord::HardState(log.hard_state().clone()),
        ];
        if !log.entries_after_snapshot().is_empty() {
            recs.push(LogRecord::Entries(log.entries_after_snapshot().to_vec()));
        }
        for rec in &recs {
            let bytes = encode_record(rec);
            f.write_all(&bytes).map_err(io_err(&tmp))?;
            end += bytes.len() as u64;
        }
        let f = f.into_inner().map_err(|e| io_err(&tmp)(e.into_error()))?;
        fill_zeros(&f, end, end + PREALLOC_BYTES).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok((end, end + PREALLOC_BYTES))
}

impl DiskSink {
    /// A sink appending at `end` of `file`, whose bytes from `end` to `allocated` are zero.
    fn at(dir: &Path, mut file: File, end: u64, allocated: u64) -> std::io::Result<Self> {
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(end))?;
        Ok(DiskSink {
            dir: dir.to_path_buf(),
            file: BufWriter::new(file),
            end,
            allocated,
        })
    }

    /// Fills the file with zeros up to past `need`. Not synced here: the next sync makes
    /// them durable along with the record, and later syncs find the blocks allocated.
    fn preallocate(&mut self, need: u64) -> std::io::Result<()> {
        let to = need + PREALLOC_BYTES;
        fill_zeros(self.file.get_ref(), self.allocated, to)?;
        self.allocated = to;
        Ok(())
    }
}

/// Writes zeros over `from..to` of `f` (real blocks, not a hole or unwritten extents, so
/// later overwrites there change no metadata).
fn fill_zeros(f: &File, from: u64, to: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let zeros = vec![0u8; 64 << 10];
    let mut at = from;
    while at < to {
        let n = (to - at).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

impl LogSink for DiskSink {
    fn write(&mut self, rec: &LogRecord) -> Result<(), SinkError> {
        let bytes = encode_record(rec);
        let need = self.end + bytes.len() as u64;
        if need > self.allocated {
            self.preallocate(need)
                .map_err(|e| SinkError(format!("preallocating the raft log failed: {e}")))?;
        }
        self.file
            .write_all(&bytes)
            .map_err(|e| SinkError(e.to_string()))?;
        self.end = need;
        Ok(())
    }

    fn sync(&mut self) -> Result<(), SinkError> {
        self.file.flush().map_err(|e| SinkError(e.to_string()))?;
        self.file
            .get_ref()
            .sync_data()
            .map_err(|e| SinkError(format!("fdatasync of the raft log failed: {e}")))
    }

    fn compact(&mut self, log: &LogCache) -> Result<(), SinkError> {
        self.file.flush().map_err(|e| SinkError(e.to_string()))?;
        let (end, allocated) = write_image(&self.dir, log).map_err(|e| SinkError(e.to_string()))?;
        let path = self.dir.join(WAL_FILE);
        let f = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| SinkError(format!("{}: {e}", path.display())))?;
        *self = DiskSink::at(&self.dir, f, end, allocated)
            .map_err(|e| SinkError(format!("{}: {e}", path.display())))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    /// Appends `rec` durably, closes the log and opens it again.
    fn append_and_reopen(dir: &Path, mut sink: DiskSink, rec: LogRecord) -> (LogCache, DiskSink) {
        sink.write(&rec).unwrap();
        sink.sync().unwrap();
        drop(sink);
        open(dir, LogCache::default()).unwrap()
    }

    fn ent(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    #[test]
    fn log_survives_reopen_and_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut sink) = open(dir.path(), LogCache::bootstrap(&[1, 2, 3])).unwrap();
        sink.write(&LogRecord::Entries(vec![ent(2, 1, b"a"), ent(3, 1, b"b")]))
            .unwrap();
        let hs = HardState {
            term: 1,
            vote: 2,
            commit: 3,
            ..Default::default()
        };
        sink.write(&LogRecord::HardState(hs.clone())).unwrap();
        sink.sync().unwrap();
        drop(sink);
        // A torn append: half a record of garbage at the end.
        let path = dir.path().join(WAL_FILE);
        let mut torn = encode_record(&LogRecord::Entries(vec![ent(4, 1, b"c")]));
        torn.truncate(torn.len() - 3);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&torn).unwrap();
        drop(f);
        let (log, sink) = open(dir.path(), LogCache::default()).unwrap();
        assert_eq!(log.last_index().unwrap(), 3);
        assert_eq!(log.hard_state(), &hs);
        assert_eq!(log.conf_state().voters, vec![1, 2, 3]);
        // Appends after the truncation point replay cleanly.
        let (log, _) =
            append_and_reopen(dir.path(), sink, LogRecord::Entries(vec![ent(3, 2, b"d")]));
        assert_eq!(log.last_index().unwrap(), 3);
        assert_eq!(log.term(3).unwrap(), 2);
    }

    #[test]
    fn the_file_is_preallocated_and_its_zeros_are_not_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(WAL_FILE);
        let (_, mut sink) = open(dir.path(), LogCache::bootstrap(&[1])).unwrap();
        for i in 2..200 {
            sink.write(&LogRecord::Entries(vec![ent(i, 1, &[i as u8; 300])]))
                .unwrap();
            sink.sync().unwrap();
        }
        drop(sink);
        let (valid, len) = (
            valid_len(&path).unwrap(),
            std::fs::metadata(&path).unwrap().len(),
        );
        assert!(len >= valid + PREALLOC_BYTES / 2, "{len} vs {valid}");
        let (log, sink) = open(dir.path(), LogCache::default()).unwrap();
        assert_eq!(log.last_index().unwrap(), 199);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            len,
            "zeros kept, not truncated"
        );
        let (log, _) = append_and_reopen(
            dir.path(),
            sink,
            LogRecord::Entries(vec![ent(200, 1, b"z")]),
        );
        assert_eq!(log.last_index().unwrap(), 200);
    }

    #[test]
    fn a_stale_record_beyond_a_tear_is_cut_off_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(WAL_FILE);
        let (_, mut sink) = open(dir.path(), LogCache::bootstrap(&[1])).unwrap();
        sink.write(&LogRecord::Entries(vec![ent(2, 1, b"a")]))
            .unwrap();
        sink.sync().unwrap();
        drop(sink);
        // A crash persisted a later record's page but not the one before it: zeros, then
        // a valid record that was never acknowledged.
        let end = valid_len(&path).unwrap();
        let stale = encode_record(&LogRecord::Entries(vec![ent(3, 9, b"stale")]));
        {
            use std::os::unix::fs::FileExt;
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            f.write_all_at(&stale, end + 100).unwrap();
        }
        let (log, sink) = open(dir.path(), LogCache::default()).unwrap();
        assert_eq!(log.last_index().unwrap(), 2);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), end, "truncated");
        // New records of any length can never line up with the stale one.
        let (log, _) = append_and_reopen(
            dir.path(),
            sink,
            LogRecord::Entries(vec![ent(3, 1, &[1; 68])]),
        );
        assert_eq!(log.last_index().unwrap(), 3);
        assert_eq!(log.term(3).unwrap(), 1);
    }

    #[test]
    fn compaction_rewrites_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, mut sink) = open(dir.path(), LogCache::bootstrap(&[1])).unwrap();
        let rec = LogRecord::Entries((2..=100).map(|i| ent(i, 1, &[7; 100])).collect());
        sink.write(&rec).unwrap();
        log.apply(&rec).unwrap();
        sink.sync().unwrap();
        let before = valid_len(&dir.path().join(WAL_FILE)).unwrap();
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 90;
        snap.mut_metadata().term = 1;
        snap.mut_metadata().mut_conf_state().voters = vec![1];
        snap.data = b"table".to_vec().into();
        let rec = LogRecord::Snapshot(snap);
        sink.write(&rec).unwrap();
        log.apply(&rec).unwrap();
        sink.sync().unwrap();
        sink.compact(&log).unwrap();
        let after = valid_len(&dir.path().join(WAL_FILE)).unwrap();
        assert!(after < before / 4, "{after} vs {before}");
        sink.write(&LogRecord::Entries(vec![ent(101, 1, b"x")]))
            .unwrap();
        sink.sync().unwrap();
        let (back, _) = open(dir.path(), LogCache::default()).unwrap();
        assert_eq!(back.first_index().unwrap(), 91);
        assert_eq!(back.last_index().unwrap(), 101);
        assert_eq!(&back.latest_snapshot().data[..], b"table");
    }

    #[test]
    fn corrupt_records_are_rejected_without_panic() {
        let good = encode_record(&LogRecord::Entries(vec![ent(1, 1, b"abc")]));
        assert!(decode_record(&good).is_some());
        for i in 0..good.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = good.clone();
                bad[i] ^= bit;
                assert!(decode_record(&bad).is_none(), "flip at byte {i} accepted");
            }
        }
        assert!(decode_record(&[0xff; 64]).is_none());
    }
}
