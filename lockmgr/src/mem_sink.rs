//! An in-memory `LogSink` that models a disk with a volatile write cache: records become
//! durable only at `sync`, and a crash (`MemDisk::crash_image`) keeps just the durable part.
//! Used by the deterministic simulation and by unit tests.

use crate::log_cache::{LogCache, LogRecord};
use crate::node::{LogSink, SinkError};
use std::cell::RefCell;
use std::rc::Rc;

#[derive(Default)]
struct DiskState {
    durable: LogCache,
    unsynced: Vec<LogRecord>,
}

/// A shared handle to one simulated node's disk.
#[derive(Clone, Default)]
pub struct MemDisk(Rc<RefCell<DiskState>>);

impl MemDisk {
    pub fn new(initial: LogCache) -> Self {
        MemDisk(Rc::new(RefCell::new(DiskState {
            durable: initial,
            unsynced: Vec::new(),
        })))
    }

    /// What survives a power failure now: synced records only.
    pub fn crash_image(&self) -> LogCache {
        let mut state = self.0.borrow_mut();
        state.unsynced.clear();
        state.durable.clone()
    }

    pub fn sink(&self) -> MemSink {
        MemSink(self.clone())
    }
}

pub struct MemSink(MemDisk);

impl LogSink for MemSink {
    fn write(&mut self, rec: &LogRecord) -> Result<(), SinkError> {
        self.0 .0.borrow_mut().unsynced.push(rec.clone());
        Ok(())
    }

    fn sync(&mut self) -> Result<(), SinkError> {
        let mut state = self.0 .0.borrow_mut();
        let records = std::mem::take(&mut state.unsynced);
        for rec in &records {
            state
                .durable
                .apply(rec)
                .map_err(|e| SinkError(e.to_string()))?;
        }
        Ok(())
    }

    fn compact(&mut self, _log: &LogCache) -> Result<(), SinkError> {
        Ok(()) // the durable cache already dropped compacted entries when the snapshot synced
    }
}
