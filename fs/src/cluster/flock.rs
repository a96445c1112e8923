//! Cluster-wide flock(2), as GFS2 does it with its flock glocks: each lock is a
//! lock-manager lock on `flock/INO` — PR for `LOCK_SH`, EX for `LOCK_EX` — owned by one
//! open file description (the kernel's lock owner for `FUSE_FLOCK_LOCKS`). Two processes
//! on different nodes, or two open file descriptions on one node, exclude each other as
//! they would on a local filesystem.
//!
//! - A conversion (`LOCK_SH` → `LOCK_EX` or back) drops the old lock first, as Linux
//!   does (flock conversions are not atomic; holding the old lock while waiting for the
//!   new one could deadlock two upgraders).
//! - `LOCK_NB` is `NOQUEUE`: EWOULDBLOCK at once when another holder is in the way.
//! - Locks are keyed by the file handle each open gets (unique per open, never reused), not
//!   by the kernel's lock owner: that is derived from the `struct file` address, which a
//!   new open can reuse before the old one's RELEASE (sent in the background) arrives.
//! - A blocking request first tries without waiting; if the lock is busy it waits on its
//!   own thread, never on a FUSE worker, so waiters cannot freeze the mount.
//! - Signals: once the daemon has read a request, the kernel waits for the answer without
//!   any signal getting through, and fuser 0.18 does not pass `FUSE_INTERRUPT` on. So the
//!   waiter watches the caller itself: when a signal the caller does not block is pending
//!   (`/proc/TID/status`), the wait is cancelled and answered EINTR, which the kernel turns
//!   into a restart or EINTR exactly as for a local flock (SA_RESTART decides; a fatal
//!   signal kills the process). `flock -w` and Ctrl-C work as on a local filesystem.
//! - Two requests of one file description at once (threads sharing it): the last to be
//!   granted is the one held; a lock it replaces is released, never leaked.
//! - The last close of the file description (`FUSE_RELEASE` with `FLOCK_UNLOCK`) releases
//!   the lock (so a LOCK_NB elsewhere right after close(2) may still fail for a moment: the
//!   kernel sends RELEASE in the background); a mount that dies or unmounts releases all
//!   of its locks with its lock manager session (they are not `PERSISTENT`: their
//!   processes are gone too). Directories are not covered: the kernel keeps flock on a
//!   directory local to the node.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tandem_lockmgr::client::ClientError;
use tandem_lockmgr::table::LockError;
use tandem_lockmgr::types::{Flags, LockId, Mode};
use tokio::sync::oneshot;

use super::lockd::{would_block, LockdConn};

/// (inode, file handle): one open file description's lock on one file.
type Owner = (u64, u64);

/// How often a waiter looks for a signal pending for its caller.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

pub fn flock_lock(ino: u64) -> Vec<u8> {
    format!("flock/{ino}").into_bytes()
}

#[derive(Default)]
struct State {
    held: HashMap<Owner, (LockId, Mode)>,
    /// Blocking requests still waiting, by ticket: dropping the sender cancels the wait.
    waiting: HashMap<u64, (Owner, oneshot::Sender<()>)>,
    next_ticket: u64,
}

/// Counts for glstats.
pub struct FlockStats {
    pub held: usize,
    pub waiting: usize,
}

pub struct FlockTable {
    conn: Arc<LockdConn>,
    state: Mutex<State>,
}

/// What a flock request asks for: `F_RDLCK`, `F_WRLCK` or `F_UNLCK` (fcntl's constants,
/// which the kernel uses for flock requests too).
fn mode_of(typ: i32) -> Result<Option<Mode>, i32> {
    match typ {
        libc::F_RDLCK => Ok(Some(Mode::PR)),
        libc::F_WRLCK => Ok(Some(Mode::EX)),
        libc::F_UNLCK => Ok(None),
        _ => Err(libc::EINVAL),
    }
}

/// An error of the lock manager, as flock(2) reports it.
fn errno_of(e: &ClientError) -> i32 {
    if would_block(e) {
        return libc::EWOULDBLOCK;
    }
    if matches!(e, ClientError::Lock(LockError::Cancelled)) {
        return libc::EINTR;
    }
    tracing::warn!(error = %e, "flock through tandem-lockd failed");
    libc::ENOLCK
}

/// Whether thread `tid` has a signal pending that it does not block (or is gone).
pub fn signal_pending(tid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{tid}/status")) else {
        return true;
    };
    let mask = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    (mask("SigPnd:") | mask("ShdPnd:")) & !mask("SigBlk:") != 0
}

impl FlockTable {
    pub fn new(conn: Arc<LockdConn>) -> Self {
        Self {
            conn,
            state: Mutex::new(State::default()),
        }
    }

    pub fn stats(&self) -> FlockStats {
        let st = self.state.lock();
        FlockStats {
            held: st.held.len(),
            waiting: st.waiting.len(),
        }
    }

    /// Whether `lock` is one of our flock locks (their blocking callbacks are ignored).
    pub fn holds(&self, lock: LockId) -> bool {
        self.state.lock().held.values().any(|&(l, _)| l == lock)
    }

    /// Records a granted lock; one this owner held already (a concurrent request of the
    /// same file description won first) is released.
    fn hold(&self, key: Owner, lock: LockId, mode: Mode) {
        let old = self.state.lock().held.insert(key, (lock, mode));
        if let Some((l, _)) = old.filter(|&(l, _)| l != lock) {
            if let Err(e) = self.conn.unlock(l) {
                tracing::warn!(ino = key.0, error = %e, "releasing a replaced flock failed");
            }
        }
    }

    /// A flock request (FUSE SETLK / SETLKW with `FUSE_LK_FLOCK`) of the file handle `fh`
    /// by thread `tid`. `done` gets 0 or an errno: at once, or from a waiting thread when
    /// `sleep` and the lock is busy.
    #[allow(clippy::too_many_arguments)]
    pub fn set(
        self: &Arc<Self>,
        ino: u64,
        fh: u64,
        tid: u32,
        typ: i32,
        sleep: bool,
        done: impl FnOnce(i32) + Send + 'static,
    ) {
        let key = (ino, fh);
        let mode = match mode_of(typ) {
            Ok(m) => m,
            Err(e) => return done(e),
        };
        let old = {
            let mut st = self.state.lock();
            match st.held.get(&key) {
                Some(&(_, m)) if Some(m) == mode => return done(0),
                Some(_) => st.held.remove(&key),
                None => None,
            }
        };
        if let Some((lock, _)) = old {
            if let Err(e) = self.conn.unlock(lock) {
                // The session is gone, and with it the lock.
                tracing::warn!(ino, error = %e, "releasing a flock failed");
            }
        }
        let Some(mode) = mode else {
            return done(0);
        };
        let resource = flock_lock(ino);
        // Without waiting first: most requests find the lock free and need no thread.
        match self.conn.lock(&resource, mode, Flags::NOQUEUE) {
            Ok(g) => {
                self.hold(key, g.lock, mode);
                return done(0);
            }
            Err(e) if !(sleep && would_block(&e)) => return done(errno_of(&e)),
            Err(_) => {}
        }
        let (tx, rx) = oneshot::channel::<()>();
        let ticket = {
            let mut st = self.state.lock();
            st.next_ticket += 1;
            let t = st.next_ticket;
            st.waiting.insert(t, (key, tx));
            t
        };
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("flock-wait".into())
            .spawn(move || {
                let give_up = async move {
                    let signalled = async {
                        loop {
                            tokio::time::sleep(SIGNAL_POLL).await;
                            if signal_pending(tid) {
                                return;
                            }
                        }
                    };
                    tokio::select! {
                        // Never sent: resolves when the sender is dropped (closed).
                        _ = rx => {}
                        () = signalled => {}
                    }
                };
                let r = me
                    .conn
                    .lock_until(&resource, mode, Flags::default(), give_up);
                let wanted = me.state.lock().waiting.remove(&ticket).is_some();
                match r {
                    Ok(g) if wanted => {
                        // Granted before the cancel took effect: ours, as a local flock
                        // that got the lock before the signal came would be.
                        me.hold(key, g.lock, mode);
                        done(0)
                    }
                    Ok(g) => {
                        // The file description was closed meanwhile.
                        let _ = me.conn.unlock(g.lock);
                        done(libc::EINTR)
                    }
                    Err(e) => done(errno_of(&e)),
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a flock waiter");
            self.state.lock().waiting.remove(&ticket);
        }
    }

    /// The last close of an open file description that used flock: its lock goes, and
    /// its requests still waiting are cancelled.
    pub fn release(&self, ino: u64, fh: u64) {
        let key = (ino, fh);
        let held = {
            let mut st = self.state.lock();
            st.waiting.retain(|_, (k, _)| *k != key);
            st.held.remove(&key)
        };
        if let Some((lock, _)) = held {
            if let Err(e) = self.conn.unlock(lock) {
                tracing::warn!(ino, error = %e, "releasing a flock at close failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_signal_does_not_interrupt_and_a_vanished_caller_does() {
        // SAFETY: plain signal-mask and tgkill calls on this test's own thread.
        unsafe {
            let tid = libc::gettid() as u32;
            assert!(!signal_pending(tid));
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGUSR2);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGUSR2);
            assert!(
                !signal_pending(tid),
                "blocked: the caller would not be interrupted"
            );
            // Consume it while still blocked, so unblocking does not kill the test.
            let mut got = 0;
            libc::sigwait(&set, &mut got);
            assert_eq!(got, libc::SIGUSR2);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
        assert!(
            signal_pending(u32::MAX - 1),
            "a thread that is gone counts as interrupted"
        );
    }
}
