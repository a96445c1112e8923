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
//!
//! The lock is requested lazily: an open only notes the inode, and the glock's `settle`
//! hook — run before this node lowers or gives up `meta` — requests PR for every inode
//! still open here that has none yet, all at once, and waits for the grants. That is
//! enough because only a holder of `meta` EX unlinks or frees, so no other node can look
//! at an inode's iopen lock before this node has given up `meta`; a file opened and closed
//! between two hand-offs (a create, a web server's read) then costs no lock-manager round
//! trip at all, where a request per first open cost a Raft commit under the filesystem
//! lock. A blocking callback can overtake a grant's reply (they travel on different paths
//! inside the client), so callbacks for lock ids we do not know yet are remembered while
//! requests are in flight and applied when the grant arrives.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use tandem_lockmgr::types::{Flags, LockId, Mode};

use super::iopen_lock;
use super::lockd::LockdConn;

/// Idle cached iopen locks kept per mount before the oldest are dropped.
pub const MAX_IDLE: usize = 4096;

struct Entry {
    /// Granted (None: not requested yet, or in flight if `requested`).
    lock: Option<LockId>,
    requested: bool,
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
    /// Entries not open here (granted or still in flight).
    idle: usize,
    clock: u64,
    /// Lock requests in flight.
    in_flight: usize,
    /// Blocking callbacks for lock ids unknown while requests were in flight: maybe for a
    /// grant whose reply has not been handled yet. Cleared when nothing is in flight.
    early: HashSet<LockId>,
}

/// What a blocking callback means for the iopen cache.
#[derive(Debug, PartialEq, Eq)]
enum Blocking {
    /// Not an iopen lock we know (maybe a glock's).
    NotOurs,
    /// Open here: marked, the last local close checks the inode.
    Doomed,
    /// Idle here: give the lock back and let the reaper look at the inode.
    Drop(u64),
}

impl Map {
    /// The reply to a request sent by `settle` (`None`: refused or session gone). Returns
    /// a lock to give up at once: a blocking callback overtook the grant while the inode
    /// was idle here.
    fn granted(&mut self, ino: u64, res: Option<LockId>) -> Option<LockId> {
        self.in_flight -= 1;
        let mut drop_now = None;
        match res {
            Some(lock) => {
                let early = self.early.remove(&lock);
                let e = self.by_ino.get_mut(&ino).expect("in-flight entries stay");
                e.lock = Some(lock);
                let open = e.open;
                if early && open {
                    e.doomed = true; // our last close checks it
                }
                self.by_lock.insert(lock, ino);
                if early && !open {
                    self.remove(ino);
                    drop_now = Some(lock);
                }
            }
            None => {
                self.remove(ino);
            }
        }
        if self.in_flight == 0 {
            self.early.clear();
        }
        drop_now
    }

    fn blocking(&mut self, lock: LockId) -> Blocking {
        let Some(&ino) = self.by_lock.get(&lock) else {
            if self.in_flight > 0 {
                // Maybe ours, its grant not handled yet (`granted` looks here). Passed on
                // as well: the glocks ignore ids they do not hold.
                self.early.insert(lock);
            }
            return Blocking::NotOurs;
        };
        let e = self.by_ino.get_mut(&ino).expect("indexed both ways");
        if e.open {
            e.doomed = true; // our last close checks it
            return Blocking::Doomed;
        }
        self.remove(ino);
        Blocking::Drop(ino)
    }

    fn remove(&mut self, ino: u64) -> Option<Entry> {
        let e = self.by_ino.remove(&ino)?;
        if let Some(l) = e.lock {
            self.by_lock.remove(&l);
        }
        if !e.open {
            self.idle -= 1;
        }
        Some(e)
    }
}

/// Fault injection for tests: `TANDEM_FAULT_IOPEN_DELAY_MS` holds every iopen request
/// back that long, so a test can show that a hand-off waits for them.
fn fault_delay() -> Option<std::time::Duration> {
    static DELAY: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        std::env::var("TANDEM_FAULT_IOPEN_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(std::time::Duration::from_millis)
    })
}

pub struct IopenCache {
    conn: Arc<LockdConn>,
    map: Mutex<Map>,
    /// Signalled whenever a request in flight completes.
    settled: Condvar,
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
            settled: Condvar::new(),
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

    /// The first local handle of `ino` opened: note it; `settle` takes its lock if it is
    /// still open when this node gives up `meta` (see the module comment). A cached lock
    /// is simply used again.
    pub fn opened(&self, ino: u64) {
        let mut map = self.map.lock();
        if let Some(e) = map.by_ino.get_mut(&ino) {
            if !e.open {
                e.open = true;
                map.idle -= 1;
            }
            return;
        }
        map.by_ino.insert(
            ino,
            Entry {
                lock: None,
                requested: false,
                open: true,
                doomed: false,
                idle_since: 0,
            },
        );
    }

    /// Sends the PR request for `ino` (counted in flight by the caller).
    fn request(self: &Arc<Self>, ino: u64) {
        let this = self.clone();
        self.conn.spawn(async move {
            if let Some(d) = fault_delay() {
                tokio::time::sleep(d).await;
            }
            let res = this
                .conn
                .lock_async(&iopen_lock(ino), Mode::PR, Flags::NOQUEUE)
                .await;
            if let Some(lock) = this.granted(ino, res.map(|g| g.lock)) {
                this.give_back(ino, lock).await;
            }
        });
    }

    /// Unlocks an iopen lock we no longer keep and lets the reaper look at the inode.
    async fn give_back(&self, ino: u64, lock: LockId) {
        if let Err(e) = self.conn.unlock_async(lock).await {
            tracing::debug!(ino, error = %e, "iopen unlock failed");
        }
        self.queue_reap(ino);
    }

    /// The reply to a `settle` request. Returns a lock to give up at once (a blocking
    /// callback overtook the grant while the inode was idle here).
    fn granted(
        &self,
        ino: u64,
        res: Result<LockId, tandem_lockmgr::client::ClientError>,
    ) -> Option<LockId> {
        let res = res.map_err(|e| {
            // An EX holder is freeing it right now (the open finds it gone), or the session
            // ended. The last close then checks the inode itself.
            tracing::debug!(ino, error = %e, "iopen lock not taken");
        });
        let drop_now = self.map.lock().granted(ino, res.ok());
        self.settled.notify_all();
        drop_now
    }

    /// Before this node lowers or gives up `meta` (no local operation inside it): takes
    /// PR for every inode open here without one, all requests at once, and waits until
    /// every request in flight is answered, so a deleter elsewhere sees our opens.
    pub fn settle(self: &Arc<Self>) {
        let mut map = self.map.lock();
        let wanted: Vec<u64> = map
            .by_ino
            .iter_mut()
            .filter(|(_, e)| e.open && !e.requested)
            .map(|(ino, e)| {
                e.requested = true;
                *ino
            })
            .collect();
        map.in_flight += wanted.len();
        for ino in wanted {
            self.request(ino);
        }
        self.settled.wait_while(&mut map, |m| m.in_flight > 0);
    }

    /// The last local handle of `ino` closed: keep the lock, idle. Returns true if the
    /// inode may have lost its last name meanwhile (doomed, or no lock was held to tell),
    /// so the caller checks whether to free it.
    pub fn closed(self: &Arc<Self>, ino: u64) -> bool {
        let (doomed, evicted) = {
            let mut map = self.map.lock();
            map.clock += 1;
            let now = map.clock;
            let Some(e) = map.by_ino.get_mut(&ino) else {
                return true;
            };
            let doomed = std::mem::take(&mut e.doomed);
            if !e.requested {
                // Opened and closed between two hand-offs: no lock to keep. Nobody else
                // can have unlinked it meanwhile (they would have needed `meta` EX).
                map.by_ino.remove(&ino);
                return doomed;
            }
            if e.open {
                e.open = false;
                e.idle_since = now;
                map.idle += 1;
            }
            if map.idle <= MAX_IDLE {
                return doomed;
            }
            // Only granted locks can be given back: let those in flight arrive first.
            self.settled.wait_while(&mut map, |m| m.in_flight > 0);
            if map.idle <= MAX_IDLE {
                return doomed;
            }
            let mut idle: Vec<(u64, u64)> = map
                .by_ino
                .iter()
                .filter(|(_, e)| !e.open && e.lock.is_some())
                .map(|(ino, e)| (e.idle_since, *ino))
                .collect();
            idle.sort_unstable();
            idle.truncate(MAX_IDLE / 4);
            let evicted = idle
                .into_iter()
                .filter_map(|(_, ino)| map.remove(ino).and_then(|e| Some((ino, e.lock?))))
                .collect::<Vec<_>>();
            (doomed, evicted)
        };
        // Given back together (a sequential unlock each would cost a Raft commit each).
        for (ino, lock) in evicted {
            let this = self.clone();
            self.conn
                .spawn(async move { this.give_back(ino, lock).await });
        }
        doomed
    }

    /// A blocking callback arrived for `lock`. Returns false if it is not an iopen lock
    /// of ours (the caller passes it on to the glocks).
    pub fn on_blocking(&self, lock: LockId) -> bool {
        let verdict = self.map.lock().blocking(lock);
        match verdict {
            Blocking::NotOurs => false,
            Blocking::Doomed => true,
            Blocking::Drop(ino) => {
                self.drop_lock(ino, lock);
                true
            }
        }
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
            self.settled.wait_while(&mut map, |m| m.in_flight > 0);
            match map.by_ino.get_mut(&ino) {
                Some(e) if e.open => {
                    e.doomed = true; // unlinked here while open here
                    return false;
                }
                Some(_) => {
                    let e = map.remove(ino).expect("present");
                    let lock = e.lock.expect("settled above");
                    if let Err(err) = self.conn.unlock(lock) {
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
            self.settled.wait_while(&mut map, |m| m.in_flight > 0);
            let locks = map.by_ino.values().filter_map(|e| e.lock).collect();
            *map = Map::default();
            locks
        };
        for l in locks {
            let _ = self.conn.unlock(l);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(m: &mut Map, ino: u64) {
        m.by_ino.insert(
            ino,
            Entry {
                lock: None,
                requested: true,
                open: true,
                doomed: false,
                idle_since: 0,
            },
        );
        m.in_flight += 1;
    }

    fn close(m: &mut Map, ino: u64) {
        let e = m.by_ino.get_mut(&ino).unwrap();
        e.open = false;
        m.idle += 1;
    }

    #[test]
    fn a_callback_that_overtakes_the_grant_of_an_open_inode_dooms_it() {
        let mut m = Map::default();
        sent(&mut m, 7);
        assert_eq!(m.blocking(LockId(40)), Blocking::NotOurs);
        assert_eq!(m.granted(7, Some(LockId(40))), None);
        assert!(m.by_ino[&7].doomed, "the last close must check the inode");
        assert!(m.early.is_empty());
    }

    #[test]
    fn a_callback_that_overtakes_the_grant_of_an_idle_inode_gives_the_lock_back() {
        let mut m = Map::default();
        sent(&mut m, 7);
        close(&mut m, 7);
        assert_eq!(m.blocking(LockId(40)), Blocking::NotOurs);
        assert_eq!(m.granted(7, Some(LockId(40))), Some(LockId(40)));
        assert!(m.by_ino.is_empty() && m.by_lock.is_empty());
        assert_eq!(m.idle, 0);
    }

    #[test]
    fn callbacks_for_other_locks_are_forgotten_once_nothing_is_in_flight() {
        let mut m = Map::default();
        sent(&mut m, 7);
        sent(&mut m, 8);
        assert_eq!(m.blocking(LockId(99)), Blocking::NotOurs); // a glock's, say
        assert_eq!(m.granted(7, Some(LockId(40))), None);
        assert!(!m.by_ino[&7].doomed);
        assert_eq!(m.granted(8, None), None); // refused: the entry goes
        assert!(m.early.is_empty() && !m.by_ino.contains_key(&8));
        // Known locks: open → doomed; idle → dropped.
        assert_eq!(m.blocking(LockId(40)), Blocking::Doomed);
        close(&mut m, 7);
        assert_eq!(m.blocking(LockId(40)), Blocking::Drop(7));
        assert_eq!((m.idle, m.by_ino.len()), (0, 0));
        // Nothing in flight: an unknown id is not remembered.
        assert_eq!(m.blocking(LockId(41)), Blocking::NotOurs);
        assert!(m.early.is_empty());
    }
}
