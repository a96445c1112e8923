//! The Raft log as raft-rs reads it: hard state, conf state, the latest snapshot (with the
//! serialized lock table) and the entries after it. Changed only through `LogRecord`s, the
//! same records the write-ahead log stores, so replaying the WAL rebuilds exactly this.

use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};

/// One durable change to the log. The WAL stores these; `LogCache::apply` replays them.
#[derive(Clone, Debug, PartialEq)]
pub enum LogRecord {
    /// Entries to append; any existing entries at or after the first index are replaced.
    Entries(Vec<Entry>),
    HardState(HardState),
    ConfState(ConfState),
    /// A snapshot: entries up to its index are dropped, later ones kept if present.
    Snapshot(Snapshot),
}

#[derive(Clone, Debug, Default)]
pub struct LogCache {
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: Snapshot,
    entries: Vec<Entry>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LogCacheError {
    #[error("entries starting at {first} leave a gap after last index {last}")]
    Gap { first: u64, last: u64 },
    #[error("entries starting at {first} overwrite compacted entries (first index {compacted})")]
    Compacted { first: u64, compacted: u64 },
    #[error("entries are not consecutive at index {0}")]
    NotConsecutive(u64),
}

impl LogCache {
    /// A fresh log for a node bootstrapped with the initial voters (all nodes start alike):
    /// a snapshot at index 1, term 1, holding the initial configuration. Starting the log at
    /// index 2 means a node that joins later with an empty log can only catch up through a
    /// snapshot, which carries the configuration; replaying conf changes from index 1 on
    /// top of an empty configuration would make it believe it is alone (found by the
    /// simulation; raft-rs's `MemStorage` documentation describes the same choice).
    pub fn bootstrap(voters: &[u64]) -> Self {
        let mut log = Self::default();
        log.conf_state.voters = voters.to_vec();
        let meta = log.snapshot.mut_metadata();
        meta.index = 1;
        meta.term = 1;
        meta.set_conf_state(log.conf_state.clone());
        log.hard_state.term = 1;
        log.hard_state.commit = 1;
        log
    }

    pub fn is_initialized(&self) -> bool {
        self.conf_state != ConfState::default()
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    pub fn latest_snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    pub fn entries_after_snapshot(&self) -> &[Entry] {
        &self.entries
    }

    fn first(&self) -> u64 {
        self.snapshot.get_metadata().index + 1
    }

    fn last(&self) -> u64 {
        self.entries
            .last()
            .map(|e| e.index)
            .unwrap_or(self.snapshot.get_metadata().index)
    }

    /// Applies a record. Errors mean the record does not fit this log (corrupt WAL or bug).
    pub fn apply(&mut self, rec: &LogRecord) -> Result<(), LogCacheError> {
        match rec {
            LogRecord::Entries(ents) => self.append(ents),
            LogRecord::HardState(hs) => {
                self.hard_state = hs.clone();
                Ok(())
            }
            LogRecord::ConfState(cs) => {
                self.conf_state = cs.clone();
                Ok(())
            }
            LogRecord::Snapshot(snap) => {
                let meta = snap.get_metadata();
                if meta.index < self.snapshot.get_metadata().index {
                    return Ok(()); // older than what we have: nothing to learn
                }
                let keep_from = self.entries.iter().position(|e| e.index > meta.index);
                let matches = self
                    .entries
                    .iter()
                    .find(|e| e.index == meta.index)
                    .is_some_and(|e| e.term == meta.term);
                self.entries = match (keep_from, matches) {
                    (Some(i), true) => self.entries.split_off(i),
                    _ => Vec::new(),
                };
                self.conf_state = meta.get_conf_state().clone();
                if self.hard_state.commit < meta.index {
                    self.hard_state.commit = meta.index;
                }
                if self.hard_state.term < meta.term {
                    self.hard_state.term = meta.term;
                }
                self.snapshot = snap.clone();
                Ok(())
            }
        }
    }

    fn append(&mut self, ents: &[Entry]) -> Result<(), LogCacheError> {
        let Some(head) = ents.first() else {
            return Ok(());
        };
        for pair in ents.windows(2) {
            if pair[1].index != pair[0].index + 1 {
                return Err(LogCacheError::NotConsecutive(pair[1].index));
            }
        }
        if head.index < self.first() {
            return Err(LogCacheError::Compacted {
                first: head.index,
                compacted: self.first(),
            });
        }
        if head.index > self.last() + 1 {
            return Err(LogCacheError::Gap {
                first: head.index,
                last: self.last(),
            });
        }
        let keep = (head.index - self.first()) as usize;
        self.entries.truncate(keep);
        self.entries.extend_from_slice(ents);
        Ok(())
    }
}

fn store_err(e: StorageError) -> raft::Error {
    raft::Error::Store(e)
}

impl raft::Storage for LogCache {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(store_err(StorageError::Compacted));
        }
        if high > self.last() + 1 || low > high {
            return Err(store_err(StorageError::Unavailable));
        }
        let lo = (low - self.first()) as usize;
        let hi = (high - self.first()) as usize;
        let mut out = Vec::with_capacity(hi - lo);
        let max_size = max_size.into().unwrap_or(u64::MAX);
        let mut size = 0u64;
        for e in &self.entries[lo..hi] {
            size += protobuf::Message::compute_size(e) as u64;
            // raft-rs contract: at least one entry even when it alone exceeds max_size.
            if !out.is_empty() && size > max_size {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let meta = self.snapshot.get_metadata();
        if idx == meta.index {
            return Ok(meta.term);
        }
        if idx < self.first() {
            return Err(store_err(StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(store_err(StorageError::Unavailable));
        }
        Ok(self.entries[(idx - self.first()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.snapshot.get_metadata().index < request_index {
            return Err(store_err(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(self.snapshot.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn ent(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Default::default()
        }
    }

    #[test]
    fn append_truncates_conflicting_suffix() {
        let mut log = LogCache::bootstrap(&[1, 2, 3]);
        // The bootstrap snapshot covers index 1; the log proper starts at 2.
        assert!(log.apply(&LogRecord::Entries(vec![ent(1, 1)])).is_err());
        log.apply(&LogRecord::Entries(vec![ent(2, 1), ent(3, 1), ent(4, 1)]))
            .unwrap();
        log.apply(&LogRecord::Entries(vec![ent(3, 2)])).unwrap();
        assert_eq!(log.last_index().unwrap(), 3);
        assert_eq!(log.term(3).unwrap(), 2);
        assert!(log.apply(&LogRecord::Entries(vec![ent(6, 2)])).is_err());
    }

    #[test]
    fn snapshot_compacts_and_keeps_matching_tail() {
        let mut log = LogCache::bootstrap(&[1]);
        log.apply(&LogRecord::Entries((2..=5).map(|i| ent(i, 1)).collect()))
            .unwrap();
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 3;
        snap.mut_metadata().term = 1;
        snap.mut_metadata().mut_conf_state().voters = vec![1];
        log.apply(&LogRecord::Snapshot(snap)).unwrap();
        assert_eq!(log.first_index().unwrap(), 4);
        assert_eq!(log.last_index().unwrap(), 5);
        assert_eq!(log.term(3).unwrap(), 1);
        assert!(matches!(
            log.entries(2, 4, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        assert!(log.apply(&LogRecord::Entries(vec![ent(2, 1)])).is_err());
    }
}
