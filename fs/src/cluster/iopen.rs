//! iopen locks, cached as GFS2 caches its iopen glocks.
//!
//! A node holds `iopen/INO` in PR while it has the inode open, so a node that unlinks the
//! last name can tell (EX NOQUEUE fails) that the inode must stay allocated until the
//! last close elsewhere. Taking and dropping that lock on every open/close cost two lock
//! manager round trips per file served; so the lock stays cached (idle) after the last
//! local close, and goes away only when
//! - a deleter's `EX | NOQUEUE | NOQUEUEBAST` attempt sends us a blocking callback while
//!   the inode is idle here: we drop the lock and queue the inode for `reap` (it may be
//!   unlinked and now free to go; the reaper checks under the glock);
//! - more than `MAX_IDLE` inodes are idle (evicted in batches, also queued for `reap`);
//! - the mount ends.
//!
//! A callback for an inode open here only marks it `doomed`: someone unlinked its last name
//! (or tried to free it), so the last local close must check whether to free it. Closes of
//! files nobody asked about skip that check, and with it a glock request per close.

use std::collections::HashMap;
use std::sync::mpsc::Sender;
use std::sync::Arc;

use parking_lot::Mutex;
use tandem_lockmgr::types::{Flags, LockId, Mode};

use super::iopen_lock;
use super::lockd::LockdConn;

/// Idle cached iopen locks kept per mount before the oldest are dropped.
pub const MAX_IDLE: usize = 4096;

struct Entry {
    lock: LockId,
    open: bool,
    /// While open here, a deleter called us back or we unlinked it ourselves.
    doomed: bool,
    /// When it last went idle (a counter, for eviction order).
    idle_since: u64,
}

#[derive(Default)]
struct Map {
    by_ino: HashMap<u64, Entry>,
    by_lock: HashMap<LockId, u64>,
    idle: usize,
    clock: u64,
}

impl Map {
    fn remove(&mut self, ino: u64) -> Option<Entry> {
        let e = self.by_ino.remove(&ino)?;
        self.by_lock.remove(&e.lock);
        if !e.open {
            self.idle -= 1;
        }
        Some(e)
    }
}

pub struct IopenCache {
    conn: Arc<LockdConn>,
    map: Mutex<Map>,
    /// Inodes whose lock we dropped: the reaper frees those that are unlinked.
    reap: Mutex<Option<Sender<u64>>>,
}

/// Counts for glstats.
pub struct IopenStats {
    pub open: usize,
    pub idle: usize,
}

impl IopenCache {
    pub fn new(conn: Arc<LockdConn>) -> Self {
        Self {
            conn,
            map: Mutex::new(Map::default()),
            reap: Mutex::new(None),
        }
    }

    pub fn set_reaper(&self, tx: Sender<u64>) {
        *self.reap.lock() = Some(tx);
    }

    fn queue_reap(&self, ino: u64) {
        if let Some(tx) = &*self.reap.lock() {
            let _ = tx.send(ino);
        }
    }

    /// The first local handle of `ino` opened: hold its iopen lock (from the cache if we
    /// have it). The map stays locked across the lock request so that a blocking callback
    /// for the new lock, which can overtake the grant's reply, finds the entry.
    pub fn opened(&self, ino: u64) {
        let mut map = self.map.lock();
        if let Some(e) = map.by_ino.get_mut(&ino) {
            if !e.open {
                e.open = true;
                map.idle -= 1;
            }
            return;
        }
        match self.conn.lock(&iopen_lock(ino), Mode::PR, Flags::NOQUEUE) {
            Ok(g) => {
                map.by_ino.insert(
                    ino,
                    Entry {
                        lock: g.lock,
                        open: true,
                        doomed: false,
                        idle_since: 0,
                    },
                );
                map.by_lock.insert(g.lock, ino);
            }
            // An EX holder is freeing it right now: the open will see it gone.
            Err(e) => tracing::debug!(ino, error = %e, "iopen lock not taken"),
        }
    }

    /// The last local handle of `ino` closed: keep the lock, idle. Returns true if the
    /// inode may have lost its last name meanwhile (doomed, or no lock was held to tell),
    /// so the caller checks whether to free it.
    pub fn closed(&self, ino: u64) -> bool {
        let (doomed, evicted) = {
            let mut map = self.map.lock();
            map.clock += 1;
            let now = map.clock;
            let Some(e) = map.by_ino.get_mut(&ino) else {
                return true;
            };
            let doomed = std::mem::take(&mut e.doomed);
            if e.open {
                e.open = false;
                e.idle_since = now;
                map.idle += 1;
            }
            if map.idle <= MAX_IDLE {
                return doomed;
            }
            let mut idle: Vec<(u64, u64)> = map
                .by_ino
                .iter()
                .filter(|(_, e)| !e.open)
                .map(|(ino, e)| (e.idle_since, *ino))
                .collect();
            idle.sort_unstable();
            idle.truncate(MAX_IDLE / 4);
            let evicted = idle
                .into_iter()
                .filter_map(|(_, ino)| map.remove(ino).map(|e| (ino, e.lock)))
                .collect::<Vec<_>>();
            (doomed, evicted)
        };
        for (ino, lock) in evicted {
            self.drop_lock(ino, lock);
        }
        doomed
    }

    /// A blocking callback arrived for `lock`. Returns false if it is not an iopen lock
    /// of ours (the caller passes it on to the glocks).
    pub fn on_blocking(&self, lock: LockId) -> bool {
        let idle = {
            let mut map = self.map.lock();
            let Some(&ino) = map.by_lock.get(&lock) else {
                return false;
            };
            let e = map.by_ino.get_mut(&ino).expect("indexed both ways");
            if e.open {
                e.doomed = true; // our last close checks it
                return true;
            }
            map.remove(ino);
            ino
        };
        self.drop_lock(idle, lock);
        true
    }

    fn drop_lock(&self, ino: u64, lock: LockId) {
        if let Err(e) = self.conn.unlock(lock) {
            tracing::debug!(ino, error = %e, "iopen unlock failed");
        }
        self.queue_reap(ino);
    }

    /// True if no node (this one included) has `ino` open, so an unlinked inode can be
    /// freed now. Call with the glock held EX. Nodes that only cache the lock are called
    /// back (they drop it and queue the inode for their reaper, which then frees it).
    pub fn nobody_has_open(&self, ino: u64) -> bool {
        {
            let mut map = self.map.lock();
            match map.by_ino.get_mut(&ino) {
                Some(e) if e.open => {
                    e.doomed = true; // unlinked here while open here
                    return false;
                }
                Some(_) => {
                    let e = map.remove(ino).expect("present");
                    if let Err(err) = self.conn.unlock(e.lock) {
                        tracing::debug!(ino, error = %err, "iopen unlock failed");
                    }
                }
                None => {}
            }
        }
        match self.conn.lock(
            &iopen_lock(ino),
            Mode::EX,
            Flags::NOQUEUE | Flags::NOQUEUEBAST,
        ) {
            Ok(g) => {
                let _ = self.conn.unlock(g.lock);
                true
            }
            Err(_) => false,
        }
    }

    pub fn stats(&self) -> IopenStats {
        let map = self.map.lock();
        IopenStats {
            open: map.by_ino.len() - map.idle,
            idle: map.idle,
        }
    }

    /// Unmount: every iopen lock goes.
    pub fn drain(&self) {
        let locks: Vec<LockId> = {
            let mut map = self.map.lock();
            let locks = map.by_ino.values().map(|e| e.lock).collect();
            *map = Map::default();
            locks
        };
        for l in locks {
            let _ = self.conn.unlock(l);
        }
    }
}
