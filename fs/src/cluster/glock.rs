//! One glock: a cluster lock that this node caches until another node asks for it.
//!
//! Local operations `enter` the glock in the mode they need (PR to read and cache, EX to
//! modify); the first one that finds the lock missing or too weak acquires or converts it
//! from the lock manager, and everyone else waits. A blocking callback from the lock
//! manager reaches `demote`, which waits for the minimum hold time (so two nodes do not
//! ping-pong a lock on every operation), stops admitting local operations, waits for those
//! inside to finish, makes every change durable (`GlockHooks::flush`), then lowers the
//! lock to what the other node wants or releases it. The next acquisition from nothing
//! drops every cached block (`GlockHooks::invalidate`), because another node may have
//! changed anything meanwhile.
//!
//! The lock manager is behind `LockBackend` so this state machine can be tested without
//! a daemon; the real backend is `lockd::LockdBackend`.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tandem_lockmgr::types::{Flags, LockId, Mode};

use crate::error::{FsError, Result};

/// What the lock manager said, reduced to what the glock needs to distinguish.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// A conversion lost a deadlock: the lock keeps its mode and must be released.
    #[error("conversion deadlock")]
    Deadlock,
    /// The session is gone (daemon down, node evicted): every lock is void.
    #[error("{0}")]
    Lost(String),
    #[error("{0}")]
    Other(String),
}

/// Blocking calls to the lock manager for one resource.
pub trait LockBackend: Send + Sync {
    fn lock(&self, mode: Mode, flags: Flags) -> std::result::Result<LockId, BackendError>;
    fn convert(&self, lock: LockId, mode: Mode) -> std::result::Result<(), BackendError>;
    fn unlock(&self, lock: LockId) -> std::result::Result<(), BackendError>;
}

/// What the filesystem does around lock transitions.
pub trait GlockHooks: Send + Sync {
    /// Before EX is lowered or released: commit, write home and checkpoint the journal, so
    /// the device holds everything and nothing of ours can be replayed over another
    /// node's later changes.
    fn flush(&self) -> Result<()>;
    /// After acquiring from nothing: forget every cached block.
    fn invalidate(&self);
    /// Before the lock is lowered or released, in any mode, with no local operation
    /// inside: wait for lock requests the operations sent without waiting (iopen).
    fn settle(&self) {}
    /// Just granted EX (from nothing or by conversion), before any local operation runs
    /// under it: the previous holder's last journal header may not be durable yet.
    fn granted_exclusive(&self) {}
    /// This node gave up its cached iopen lock of inode `ino`: free it if it is unlinked
    /// and no node has it open any more. Runs on the reaper thread.
    fn reap_unlinked(&self, _ino: u64) {}
    /// Free every unlinked inode that no node has open any more: run after a dead node's
    /// journal was recovered (its open files died with it) and once after mount. False
    /// when it could not finish (retried later).
    fn reap_orphans(&self) -> bool {
        true
    }
}

/// Told when the lock starts and stops protecting caches outside the daemon (the
/// kernel's, `kcache.rs`).
pub trait CacheObserver: Send + Sync {
    /// Acquired from nothing; no local operation has been admitted yet.
    fn granted(&self);
    /// About to be released (or void): must forget everything cached under it first.
    /// Runs with no local operation inside the glock, so it must not wait for one.
    fn releasing(&self);
    /// Inodes whose attributes the kernel may be caching (operator view).
    fn cached_inodes(&self) -> usize {
        0
    }
    /// Whether the kernel may be caching names now (operator view).
    fn caches_names(&self) -> bool {
        false
    }
}

#[derive(Default)]
struct State {
    held: Option<(LockId, Mode)>,
    /// Local operations inside the glock.
    users: usize,
    /// A lock-manager call for this glock is in progress.
    busy: bool,
    /// A demotion waits for the users to leave: admit nobody.
    draining: bool,
    granted_at: Option<Instant>,
    /// When the last local operation left (users dropped to 0).
    idle_since: Option<Instant>,
    /// How long a called-back glock is kept while in use (adaptive; see `HOLD_STEP`).
    hold: Duration,
    /// When a callback last took the glock away while local operations were still
    /// coming (not idle): taking it back soon after is ping-pong.
    forced_at: Option<Instant>,
    withdrawn: Option<String>,
}

/// A called-back glock that has been idle this long goes at once, before `min_hold`:
/// the gaps between the requests of one system call sequence (open, write, release) are
/// shorter, so a burst keeps the lock while a finished one hands it over quickly.
pub const IDLE_GRACE: Duration = Duration::from_millis(1);

/// Ping-pong protection, as GFS2's `gl_hold_time`: when this node takes a glock back
/// within `PING_PONG_WINDOW` of a callback that took it away while it was busy, the hold
/// time grows by `HOLD_STEP` (up to `MAX_HOLD`), so two busy nodes hand it over less
/// often and each gets longer bursts; every other acquisition shrinks it by half a step
/// (down to the mount's `min_hold`). A holder that has gone idle still lets go after
/// `IDLE_GRACE`, so a lone reader or writer elsewhere does not wait for the hold time.
pub const HOLD_STEP: Duration = Duration::from_millis(5);
pub const MAX_HOLD: Duration = Duration::from_millis(50);
pub const PING_PONG_WINDOW: Duration = Duration::from_millis(100);
/// Counters for the operator view (`glstats`).
#[derive(Debug, Default, Clone)]
pub struct GlockStats {
    pub acquires: u64,
    pub acquire_total_us: u64,
    pub acquire_max_us: u64,
    pub demotes: u64,
    pub flush_total_us: u64,
    /// From a blocking callback's arrival until the demotion starts flushing (minimum
    /// hold, idle grace, local operations still inside).
    pub demote_wait_total_us: u64,
    /// The lock-manager call that lowers or releases the lock after the flush.
    pub lower_call_total_us: u64,
    /// The hold time now (adaptive, see `HOLD_STEP`).
    pub hold_us: u64,
}

pub struct Glock {
    name: String,
    backend: Arc<dyn LockBackend>,
    hooks: Mutex<Option<Weak<dyn GlockHooks>>>,
    observer: Mutex<Option<Arc<dyn CacheObserver>>>,
    st: Mutex<State>,
    cv: Condvar,
    min_hold: Duration,
    stats: Mutex<GlockStats>,
}

/// Keeps the glock held in at least the entered mode until dropped.
pub struct GlockGuard<'a> {
    g: &'a Glock,
}

impl Drop for GlockGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.g.st.lock();
        st.users -= 1;
        if st.users == 0 {
            st.idle_since = Some(Instant::now());
            self.g.cv.notify_all();
        }
    }
}

fn covers(held: Mode, need: Mode) -> bool {
    held == need || held == Mode::EX
}

impl Glock {
    pub fn new(name: &str, backend: Arc<dyn LockBackend>, min_hold: Duration) -> Self {
        Self {
            name: name.to_string(),
            backend,
            hooks: Mutex::new(None),
            observer: Mutex::new(None),
            st: Mutex::new(State {
                hold: min_hold,
                ..State::default()
            }),
            cv: Condvar::new(),
            min_hold,
            stats: Mutex::new(GlockStats::default()),
        }
    }

    pub fn set_hooks(&self, hooks: Weak<dyn GlockHooks>) {
        *self.hooks.lock() = Some(hooks);
    }

    /// Attaches the kernel-cache observer; told `granted` at once if the lock is held.
    pub fn set_observer(&self, o: Arc<dyn CacheObserver>) {
        let st = self.st.lock();
        if st.held.is_some() && st.withdrawn.is_none() {
            o.granted();
        }
        *self.observer.lock() = Some(o);
    }

    /// Inodes whose attributes the kernel may cache under this glock now.
    pub fn kernel_cached_inodes(&self) -> usize {
        self.observer().map_or(0, |o| o.cached_inodes())
    }

    /// Whether the kernel may cache names under this glock now.
    pub fn kernel_caches_names(&self) -> bool {
        self.observer().is_some_and(|o| o.caches_names())
    }

    fn observer(&self) -> Option<Arc<dyn CacheObserver>> {
        self.observer.lock().clone()
    }

    /// Before any unlock, and when the lock becomes void.
    fn releasing(&self) {
        if let Some(o) = self.observer() {
            o.releasing();
        }
    }

    pub fn hooks(&self) -> Option<Arc<dyn GlockHooks>> {
        self.hooks.lock().as_ref().and_then(Weak::upgrade)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn held_mode(&self) -> Option<Mode> {
        self.st.lock().held.map(|(_, m)| m)
    }

    pub fn stats(&self) -> GlockStats {
        let hold = self.st.lock().hold;
        let mut s = self.stats.lock().clone();
        s.hold_us = hold.as_micros() as u64;
        s
    }

    /// The hold time now (adaptive).
    pub fn hold_time(&self) -> Duration {
        self.st.lock().hold
    }

    /// Error if the node lost its lock-manager session: nothing may be written any more.
    pub fn check_alive(&self) -> Result<()> {
        match &self.st.lock().withdrawn {
            Some(w) => Err(FsError::Withdrawn(w.clone())),
            None => Ok(()),
        }
    }

    /// Every lock is void (session ended): fail all operations from now on.
    pub fn withdraw(&self, why: &str) {
        let mut st = self.st.lock();
        if st.withdrawn.is_none() {
            tracing::error!(glock = %self.name, why, "withdrawn: the filesystem refuses all I/O until it is unmounted and mounted again");
            st.withdrawn = Some(why.to_string());
            self.releasing();
        }
        self.cv.notify_all();
    }

    /// Holds the glock in `need` (PR or EX) for the guard's life, acquiring it if needed.
    pub fn enter(&self, need: Mode) -> Result<GlockGuard<'_>> {
        let mut st = self.st.lock();
        loop {
            if let Some(w) = &st.withdrawn {
                return Err(FsError::Withdrawn(w.clone()));
            }
            if !st.draining && st.held.is_some_and(|(_, m)| covers(m, need)) {
                st.users += 1;
                return Ok(GlockGuard { g: self });
            }
            if !st.busy && !st.draining {
                st.busy = true;
                let held = st.held;
                let res = parking_lot::MutexGuard::unlocked(&mut st, || self.acquire(held, need));
                st.busy = false;
                match res {
                    Ok(Some(h)) => {
                        st.held = Some(h);
                        st.granted_at = Some(Instant::now());
                        st.idle_since = st.granted_at;
                        let ping_pong = st
                            .forced_at
                            .take()
                            .is_some_and(|t| t.elapsed() < PING_PONG_WINDOW);
                        st.hold = if ping_pong {
                            (st.hold + HOLD_STEP).min(MAX_HOLD.max(self.min_hold))
                        } else {
                            st.hold.saturating_sub(HOLD_STEP / 2).max(self.min_hold)
                        };
                    }
                    Ok(None) => {
                        // Lost a conversion deadlock: give our PR back so the other node
                        // can go on, then ask again from nothing.
                        let id = held.expect("converted a held lock").0;
                        let r = self.exclusively(&mut st, || {
                            if let Some(h) = self.hooks() {
                                h.settle();
                            }
                            self.releasing();
                            self.backend.unlock(id)
                        });
                        st.held = None;
                        if let Err(e) = r {
                            self.fail(&mut st, e);
                        }
                    }
                    Err(e) => {
                        self.fail(&mut st, e.clone());
                        self.cv.notify_all();
                        if !matches!(e, BackendError::Lost(_)) {
                            return Err(FsError::Lock(e.to_string()));
                        }
                    }
                }
                self.cv.notify_all();
                continue;
            }
            self.cv.wait(&mut st);
        }
    }

    fn fail(&self, st: &mut State, e: BackendError) {
        if let BackendError::Lost(why) = e {
            if st.withdrawn.is_none() {
                tracing::error!(glock = %self.name, why, "lock manager session lost: withdrawn");
                st.withdrawn = Some(why);
                self.releasing();
            }
        }
    }

    /// Talks to the lock manager without the state lock. `Ok(None)`: conversion deadlock.
    fn acquire(
        &self,
        held: Option<(LockId, Mode)>,
        need: Mode,
    ) -> std::result::Result<Option<(LockId, Mode)>, BackendError> {
        let t0 = Instant::now();
        let res = match held {
            Some((id, _)) => match self.backend.convert(id, need) {
                Ok(()) => {
                    if need == Mode::EX {
                        if let Some(h) = self.hooks() {
                            h.granted_exclusive();
                        }
                    }
                    Some((id, need))
                }
                Err(BackendError::Deadlock) => None,
                Err(e) => return Err(e),
            },
            None => {
                let id = self.backend.lock(need, Flags::PERSISTENT)?;
                // Another node may have changed anything since we last held it.
                if let Some(h) = self.hooks() {
                    h.invalidate();
                    if need == Mode::EX {
                        h.granted_exclusive();
                    }
                }
                if let Some(o) = self.observer() {
                    o.granted();
                }
                Some((id, need))
            }
        };
        let us = t0.elapsed().as_micros() as u64;
        let mut s = self.stats.lock();
        s.acquires += 1;
        s.acquire_total_us += us;
        s.acquire_max_us = s.acquire_max_us.max(us);
        tracing::debug!(glock = %self.name, ?need, us, "glock acquired");
        Ok(res)
    }

    /// Another node waits for `wanted` on `lock`: lower or release ours once the minimum
    /// hold time has passed and local operations inside have finished. Runs on the
    /// callback thread, never inside a FUSE request.
    pub fn demote(&self, lock: LockId, wanted: Mode) {
        let called_at = Instant::now();
        let mut st = self.st.lock();
        loop {
            self.cv.wait_while(&mut st, |s| s.busy || s.draining);
            let Some((id, mode)) = st.held else { return };
            if id != lock || st.withdrawn.is_some() || mode.compatible(wanted) {
                return; // a stale callback: that lock is gone or already low enough
            }
            // Held long enough, or idle long enough: give it up.
            let hold = st.hold;
            let held = st.granted_at.map_or(hold, |t| t.elapsed());
            let grace = IDLE_GRACE.min(self.min_hold);
            let idle = match (st.users, st.idle_since) {
                (0, Some(t)) => t.elapsed(),
                (0, None) => grace,
                _ => Duration::ZERO,
            };
            if idle >= grace {
                st.forced_at = None;
                break;
            }
            if held >= hold {
                st.forced_at = Some(Instant::now());
                break;
            }
            let wait = (hold - held).min(grace - idle);
            parking_lot::MutexGuard::unlocked(&mut st, || std::thread::sleep(wait));
        }
        let (id, mode) = st.held.expect("checked above");
        let waited_us = called_at.elapsed().as_micros() as u64;
        self.stats.lock().demote_wait_total_us += waited_us;
        match self.exclusively(&mut st, || self.lower(id, mode, wanted)) {
            Ok(h) => st.held = h,
            Err(e) => self.fail(&mut st, e),
        }
    }

    /// Stops admitting local operations, waits for those inside to leave, then runs `f`
    /// (a lock-manager call, maybe a flush) without the state lock; admission resumes after.
    fn exclusively<R>(
        &self,
        st: &mut parking_lot::MutexGuard<'_, State>,
        f: impl FnOnce() -> R,
    ) -> R {
        st.busy = true;
        st.draining = true;
        self.cv.wait_while(st, |s| s.users > 0);
        let r = parking_lot::MutexGuard::unlocked(st, f);
        st.busy = false;
        st.draining = false;
        self.cv.notify_all();
        r
    }

    fn lower(
        &self,
        id: LockId,
        mode: Mode,
        wanted: Mode,
    ) -> std::result::Result<Option<(LockId, Mode)>, BackendError> {
        let hooks = self.hooks();
        if let Some(h) = &hooks {
            h.settle();
        }
        if mode == Mode::EX {
            let t0 = Instant::now();
            if let Some(h) = &hooks {
                if let Err(e) = h.flush() {
                    // Releasing now would show the others a half-written state; losing
                    // the session instead orphans our locks so a survivor replays our
                    // journal.
                    return Err(BackendError::Lost(format!(
                        "could not flush before releasing {}: {e}",
                        self.name
                    )));
                }
            }
            self.stats.lock().flush_total_us += t0.elapsed().as_micros() as u64;
        }
        self.stats.lock().demotes += 1;
        let t0 = Instant::now();
        let res = if mode == Mode::EX && wanted == Mode::PR {
            // Keep reading (and caching) beside the new reader.
            self.backend
                .convert(id, Mode::PR)
                .map(|()| Some((id, Mode::PR)))
        } else {
            self.releasing();
            self.backend.unlock(id).map(|()| None)
        };
        self.stats.lock().lower_call_total_us += t0.elapsed().as_micros() as u64;
        res
    }

    /// Unmount: flush if EX and release. Waits for local operations to finish.
    pub fn release(&self) -> Result<()> {
        let mut st = self.st.lock();
        self.cv.wait_while(&mut st, |s| s.busy || s.draining);
        if st.withdrawn.is_some() {
            // The session is gone and with it every lock: nothing to give back.
            st.held = None;
            return Ok(());
        }
        let Some((id, mode)) = st.held.take() else {
            return Ok(());
        };
        self.exclusively(&mut st, || self.lower(id, mode, Mode::EX))
            .map(|_| ())
            .map_err(|e| FsError::Lock(e.to_string()))
    }
}

#[cfg(test)]
mod tests;
