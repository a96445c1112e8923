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
//! - A blocking request waits on its own thread, never on a FUSE worker: two waiters must
//!   not freeze the mount. It is cancelled when its file description is closed meanwhile.
//!   fuser 0.18 does not pass `FUSE_INTERRUPT` on, so a non-fatal signal does not end the
//!   wait (a fatal one does: the kernel's wait is killable).
//! - The last close of the file description (`FUSE_RELEASE` with `FLOCK_UNLOCK`) releases
//!   the lock; a mount that dies or unmounts releases all of its locks with its lock
//!   manager session (they are not `PERSISTENT`: their processes are gone too).

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tandem_lockmgr::client::ClientError;
use tandem_lockmgr::table::LockError;
use tandem_lockmgr::types::{Flags, LockId, Mode};
use tokio::sync::oneshot;

use super::lockd::{would_block, LockdConn};

/// (inode, kernel lock owner): one open file description's lock on one file.
type Owner = (u64, u64);

pub fn flock_lock(ino: u64) -> Vec<u8> {
    format!("flock/{ino}").into_bytes()
}

#[derive(Default)]
struct State {
    held: HashMap<Owner, (LockId, Mode)>,
    /// Blocking requests still waiting: dropping the sender cancels the wait.
    waiting: HashMap<Owner, (u64, oneshot::Sender<()>)>,
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

    /// A flock request (FUSE SETLK / SETLKW with `FUSE_LK_FLOCK`). `done` gets 0 or an
    /// errno: at once, or from a waiting thread when `sleep` and the lock is busy.
    pub fn set(
        self: &Arc<Self>,
        ino: u64,
        owner: u64,
        typ: i32,
        sleep: bool,
        done: impl FnOnce(i32) + Send + 'static,
    ) {
        let key = (ino, owner);
        let mode = match mode_of(typ) {
            Ok(m) => m,
            Err(e) => return done(e),
        };
        let old = {
            let mut st = self.state.lock();
            // A newer request of the same owner supersedes one still waiting.
            st.waiting.remove(&key);
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
        if !sleep {
            return match self.conn.lock(&resource, mode, Flags::NOQUEUE) {
                Ok(g) => {
                    self.state.lock().held.insert(key, (g.lock, mode));
                    done(0)
                }
                Err(e) => done(errno_of(&e)),
            };
        }
        let (tx, rx) = oneshot::channel::<()>();
        let ticket = {
            let mut st = self.state.lock();
            st.next_ticket += 1;
            let t = st.next_ticket;
            st.waiting.insert(key, (t, tx));
            t
        };
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("flock-wait".into())
            .spawn(move || {
                let give_up = async {
                    // Sent never: resolves when the sender is dropped (cancelled).
                    let _ = rx.await;
                };
                let r = me
                    .conn
                    .lock_until(&resource, mode, Flags::default(), give_up);
                let wanted = {
                    let mut st = me.state.lock();
                    let wanted = st.waiting.get(&key).is_some_and(|(t, _)| *t == ticket);
                    if wanted {
                        st.waiting.remove(&key);
                        if let Ok(g) = &r {
                            st.held.insert(key, (g.lock, mode));
                        }
                    }
                    wanted
                };
                match r {
                    Ok(_) if wanted => done(0),
                    Ok(g) => {
                        // Closed or superseded while the grant was on its way.
                        let _ = me.conn.unlock(g.lock);
                        done(libc::EINTR)
                    }
                    Err(e) => done(errno_of(&e)),
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a flock waiter");
            self.state.lock().waiting.remove(&key);
        }
    }

    /// The last close of an open file description that used flock: its lock goes, and a
    /// request of it still waiting is cancelled.
    pub fn release(&self, ino: u64, owner: u64) {
        let key = (ino, owner);
        let held = {
            let mut st = self.state.lock();
            st.waiting.remove(&key);
            st.held.remove(&key)
        };
        if let Some((lock, _)) = held {
            if let Err(e) = self.conn.unlock(lock) {
                tracing::warn!(ino, error = %e, "releasing a flock at close failed");
            }
        }
    }
}
