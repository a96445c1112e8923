//! Cluster mounts (`lock_tandem`): the lock manager session, journal ownership, glocks
//! and recovery of dead nodes' journals.
//!
//! Locks, all in the lockspace named by the superblock's lock table (`CLUSTER:FSNAME`):
//!
//! | resource | mode | held | why |
//! |---|---|---|---|
//! | `journal/N` | EX, PERSISTENT | the whole mount | journal N is ours; orphaned if we die |
//! | `meta` | PR / EX, PERSISTENT | cached until called back | every metadata block and file data |
//! | `iopen/INO` | PR | taken for files still open here when `meta` is handed over, then cached until called back (`iopen.rs`) | unlink of a file open elsewhere defers the free |
//! | `flock/INO` | PR / EX | while a process holds flock(2) on the file (`flock.rs`) | cluster-wide flock |
//!
//! Lock order: `journal/N` (taken once at mount), then `meta`, then `iopen/INO` (taken
//! only with NOQUEUE while `meta` is held or being handed over, so it never waits).
//! `flock/INO` is taken with no other lock held (only while the file is open, which keeps
//! the inode number from being reused), so it is outside that order. Recovery takes
//! `journal/K` with RECOVERY|NOQUEUE first and `meta` EX|RECOVERY second.

pub mod flock;
pub mod glock;
mod iopen;
pub mod kcache;
pub mod lockd;
mod recovery;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use tandem_lockmgr::client::Callback;
use tandem_lockmgr::types::{Flags, LockId, Mode};

use crate::block::BlockDevice;
use crate::error::{FsError, Result};
use crate::format::{LockProto, Superblock};
use glock::Glock;
use iopen::IopenCache;
use lockd::{would_block, LockdConn, ResourceBackend};

pub const META_LOCK: &[u8] = b"meta";

pub fn journal_lock(j: u32) -> Vec<u8> {
    format!("journal/{j}").into_bytes()
}

pub fn iopen_lock(ino: u64) -> Vec<u8> {
    format!("iopen/{ino}").into_bytes()
}

#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// `tandem-lockd`'s client socket.
    pub socket: PathBuf,
    /// `cluster.name` from cluster.toml: must match the lock table's cluster part.
    pub cluster_name: String,
    /// This node's name (for logs and the lock client name).
    pub node_name: String,
    /// A glock is kept at least this long before a callback takes it away.
    pub min_hold: Duration,
    /// How often the recovery thread looks for orphaned journals.
    pub recovery_poll: Duration,
}

/// A mounted node's membership in the filesystem's cluster.
pub struct Cluster {
    pub conn: Arc<LockdConn>,
    pub glock: Arc<Glock>,
    pub journal: u32,
    journal_lock: LockId,
    stop: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    callbacks: Option<tokio::sync::mpsc::UnboundedReceiver<Callback>>,
    /// iopen locks of inodes open (or recently open) on this node.
    iopen: Arc<IopenCache>,
    /// flock(2) locks held by processes on this node.
    pub flocks: Arc<flock::FlockTable>,
    /// The reaper thread: frees unlinked inodes whose cached iopen lock we gave up.
    reaper: Mutex<Option<JoinHandle<()>>>,
    reaper_stop: Arc<AtomicBool>,
}

impl Cluster {
    /// Connects to tandem-lockd, checks the lock table and claims a free journal.
    pub fn join(dev: &dyn BlockDevice, sb: &Superblock, o: &ClusterOptions) -> Result<Self> {
        if sb.lock_proto != LockProto::Tandem {
            return Err(FsError::NotSupported(
                "this is a lock_nolock (single-node) filesystem; mount it without node=/config=",
            ));
        }
        let table = sb.lock_table.as_str();
        let cluster = table.split(':').next().unwrap_or_default();
        if cluster != o.cluster_name {
            return Err(FsError::Mount(format!(
                "the filesystem belongs to cluster '{cluster}' (lock table {table}) but this node is in cluster '{}'; remake it with mkfs.tandem -t {}:NAME or fix cluster.name",
                o.cluster_name, o.cluster_name
            )));
        }
        let (conn, callbacks) =
            LockdConn::connect(&o.socket, table, &format!("tandemfs:{}", o.node_name)).map_err(
                |e| {
                    FsError::Mount(format!(
                        "{e}; is tandem-lockd running on this node (tandem-lockctl status)?"
                    ))
                },
            )?;
        let claim = |conn: &LockdConn| -> Result<Option<(u32, LockId)>> {
            for j in 0..sb.journal_count {
                match conn.lock(
                    &journal_lock(j),
                    Mode::EX,
                    Flags::NOQUEUE | Flags::PERSISTENT,
                ) {
                    Ok(g) => return Ok(Some((j, g.lock))),
                    Err(e) if would_block(&e) => continue,
                    Err(e) => return Err(FsError::Mount(format!("claiming journal {j}: {e}"))),
                }
            }
            Ok(None)
        };
        let mut claimed = claim(&conn)?;
        if claimed.is_none() {
            // Every journal is held or orphaned. Orphans of mounts that died (e.g. the
            // whole cluster was stopped without unmounting) are recovered here, by the
            // first mounter, as GFS2's first mounter does; then try again.
            recovery::scan(&conn, dev, sb, u32::MAX)?;
            claimed = claim(&conn)?;
        }
        let Some((journal, journal_lock)) = claimed else {
            return Err(FsError::Mount(format!(
                "all {} journals of {table} are in use (one per mounted node); unmount it on another node, or wait for a dead node's journal to be recovered",
                sb.journal_count
            )));
        };
        tracing::info!(journal, lockspace = table, "claimed journal");
        let backend = Arc::new(ResourceBackend {
            conn: conn.clone(),
            resource: META_LOCK.to_vec(),
        });
        let glock = Arc::new(Glock::new("meta", backend, o.min_hold));
        let iopen = Arc::new(IopenCache::new(conn.clone()));
        Ok(Self {
            flocks: Arc::new(flock::FlockTable::new(conn.clone())),
            conn,
            glock,
            journal,
            journal_lock,
            stop: Arc::new(AtomicBool::new(false)),
            threads: Mutex::new(Vec::new()),
            callbacks: Some(callbacks),
            iopen,
            reaper: Mutex::new(None),
            reaper_stop: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Starts the callback thread (demotions) and the recovery thread.
    pub fn start(
        &mut self,
        dev: Arc<dyn BlockDevice>,
        sb: Superblock,
        recovery_poll: Duration,
    ) -> Result<()> {
        let mut rx = self.callbacks.take().expect("started once");
        let (conn, glock, stop) = (self.conn.clone(), self.glock.clone(), self.stop.clone());
        let (iopen, flocks) = (self.iopen.clone(), self.flocks.clone());
        let cb = std::thread::Builder::new()
            .name("glock-callbacks".into())
            .spawn(move || loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let next = conn.block_on(async {
                    tokio::time::timeout(Duration::from_millis(200), rx.recv()).await
                });
                match next {
                    Err(_) => continue,
                    Ok(None) => {
                        if !stop.load(Ordering::Relaxed) {
                            glock.withdraw("the connection to tandem-lockd closed");
                        }
                        return;
                    }
                    Ok(Some(Callback::Ended(r))) => {
                        glock.withdraw(&format!("lock session ended ({r:?})"));
                        return;
                    }
                    Ok(Some(Callback::Blocking { lock, wanted })) => {
                        // iopen locks first (their map is locked across their grant, so
                        // a callback overtaking the grant's reply still finds them).
                        // Otherwise not filtered: `demote` first waits for the glock
                        // acquisition in flight. Callbacks for other locks (journal,
                        // recovery) find no match there: those are never given up.
                        // flock locks are held until their owner unlocks: a waiter elsewhere
                        // has nothing to ask of us.
                        if !iopen.on_blocking(lock) && !flocks.holds(lock) {
                            glock.demote(lock, wanted);
                        }
                    }
                }
            })
            .map_err(FsError::Io)?;
        self.threads.lock().push(cb);
        let (conn, stop, me) = (self.conn.clone(), self.stop.clone(), self.journal);
        // Once after mount (a node may have died with files open before we came), then
        // after each recovery: the dead node's open unlinked files are closed for good,
        // and nobody else would free them. The reaper thread sweeps, never this one: a
        // sweep takes the glock, which may wait for exactly the orphans this thread must
        // recover.
        let sweep = Arc::new(AtomicBool::new(true));
        let want_sweep = sweep.clone();
        let rec = std::thread::Builder::new()
            .name("recovery".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match recovery::scan(&conn, &*dev, &sb, me) {
                        Ok(0) => {}
                        Ok(_) => want_sweep.store(true, Ordering::Relaxed),
                        Err(e) => {
                            tracing::warn!(error = %e, "journal recovery scan failed; retrying")
                        }
                    }
                    let mut slept = Duration::ZERO;
                    while slept < recovery_poll && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(50));
                        slept += Duration::from_millis(50);
                    }
                }
            })
            .map_err(FsError::Io)?;
        self.threads.lock().push(rec);
        let (tx, rx) = std::sync::mpsc::channel::<u64>();
        self.iopen.set_reaper(tx);
        let (glock, stop) = (self.glock.clone(), self.reaper_stop.clone());
        let reaper = std::thread::Builder::new()
            .name("iopen-reaper".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let job = rx.recv_timeout(Duration::from_millis(200));
                    let Some(h) = glock.hooks() else {
                        continue;
                    };
                    if let Ok(ino) = job {
                        h.reap_unlinked(ino);
                    }
                    if sweep.swap(false, Ordering::Relaxed) && !h.reap_orphans() {
                        sweep.store(true, Ordering::Relaxed); // retried on the next wakeup
                    }
                }
            })
            .map_err(FsError::Io)?;
        *self.reaper.lock() = Some(reaper);
        Ok(())
    }

    /// At mount, with `meta` held EX: replays journals left dirty by mounts whose locks are
    /// gone without orphans (e.g. after the whole cluster restarted). Journals whose lock is
    /// held or orphaned are left to their owner or to the recovery thread.
    pub fn recover_unowned_journals(&self, dev: &dyn BlockDevice, sb: &Superblock) -> Result<()> {
        recovery::unowned(&self.conn, dev, sb, self.journal)
    }

    /// The first local handle of `ino` opened: hold its iopen lock (PR) so an unlink on
    /// another node leaves it allocated until we close it.
    pub fn opened(&self, ino: u64) {
        self.iopen.opened(ino)
    }

    /// Waits for iopen requests in flight (before `meta` is lowered or released).
    pub fn settle_iopen(&self) {
        self.iopen.settle()
    }

    /// The last local handle of `ino` closed (the lock stays cached). True if the inode
    /// may have been unlinked meanwhile: check whether to free it.
    pub fn closed(&self, ino: u64) -> bool {
        self.iopen.closed(ino)
    }

    /// True if no node has `ino` open (so an unlinked inode can be freed now). Call with
    /// `meta` held EX.
    pub fn nobody_has_open(&self, ino: u64) -> bool {
        self.iopen.nobody_has_open(ino)
    }

    /// Unmount: give up `meta` (flushing first), the iopen locks and the journal.
    pub fn leave(&self) -> Result<()> {
        // The reaper first: it takes the glock, which is released next.
        self.reaper_stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.reaper.lock().take() {
            let _ = t.join();
        }
        let res = self.glock.release();
        self.iopen.drain();
        let j = self.conn.unlock(self.journal_lock);
        self.stop.store(true, Ordering::Relaxed);
        let threads: Vec<_> = self.threads.lock().drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
        res?;
        j.map_err(|e| FsError::Lock(e.to_string()))
    }
}

/// The operator's view of this mount's glocks (like GFS2's glstats), one line per lock.
pub fn glstats_text(c: &Cluster) -> String {
    let g = &c.glock;
    let st = g.stats();
    let avg = st.acquire_total_us.checked_div(st.acquires).unwrap_or(0);
    let mode = g.held_mode().map_or("-".to_string(), |m| m.to_string());
    // A demotion's time splits into waiting (minimum hold, idle grace, operations still
    // inside), flushing, and the lock-manager call that lowers the lock.
    let mut out = format!(
        "lockspace {}\njournal {}\n{:<12} {:>4} {:>10} {:>12} {:>12} {:>10} {:>14} {:>14} {:>14} {:>8}\n",
        c.conn.lockspace,
        c.journal,
        "glock",
        "held",
        "acquires",
        "avg_acq_us",
        "max_acq_us",
        "demotes",
        "flush_total_us",
        "wait_total_us",
        "lower_total_us",
        "hold_ms"
    );
    out += &format!(
        "{:<12} {:>4} {:>10} {:>12} {:>12} {:>10} {:>14} {:>14} {:>14} {:>8}\n",
        g.name(),
        mode,
        st.acquires,
        avg,
        st.acquire_max_us,
        st.demotes,
        st.flush_total_us,
        st.demote_wait_total_us,
        st.lower_call_total_us,
        st.hold_us / 1000
    );
    let io = c.iopen.stats();
    out += &format!("iopen PR: {} open, {} cached idle\n", io.open, io.idle);
    let fl = c.flocks.stats();
    out += &format!("flock: {} held, {} waiting\n", fl.held, fl.waiting);
    out += &format!(
        "kernel cache: attributes of {} inodes, names {}\n",
        g.kernel_cached_inodes(),
        if g.kernel_caches_names() {
            "cached"
        } else {
            "not cached"
        }
    );
    out
}
