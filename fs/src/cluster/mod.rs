//! Cluster mounts (`lock_tandem`): the lock manager session, journal ownership, glocks
//! and recovery of dead nodes' journals.
//!
//! Locks, all in the lockspace named by the superblock's lock table (`CLUSTER:FSNAME`):
//!
//! | resource | mode | held | why |
//! |---|---|---|---|
//! | `journal/N` | EX, PERSISTENT | the whole mount | journal N is ours; orphaned if we die |
//! | `meta` | PR / EX, PERSISTENT | cached until called back | every metadata block and file data |
//! | `iopen/INO` | PR | while the inode is open here | unlink of a file open elsewhere defers the free |
//!
//! Lock order: `journal/N` (taken once at mount), then `meta`, then `iopen/INO` (taken
//! only with NOQUEUE while `meta` is held, so it never waits). Recovery takes
//! `journal/K` with RECOVERY|NOQUEUE first and `meta` EX|RECOVERY second.

pub mod glock;
pub mod lockd;
mod recovery;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use std::collections::HashMap;
use tandem_lockmgr::client::Callback;
use tandem_lockmgr::types::{Flags, LockId, Mode};

use crate::block::BlockDevice;
use crate::error::{FsError, Result};
use crate::format::{LockProto, Superblock};
use glock::Glock;
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
    /// iopen locks held for inodes open on this node.
    iopen: Mutex<HashMap<u64, LockId>>,
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
        Ok(Self {
            conn,
            glock,
            journal,
            journal_lock,
            stop: Arc::new(AtomicBool::new(false)),
            threads: Mutex::new(Vec::new()),
            callbacks: Some(callbacks),
            iopen: Mutex::new(HashMap::new()),
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
                        // Not filtered here: the callback can overtake the grant's reply,
                        // so `demote` first waits for the acquisition in flight. Callbacks
                        // for other locks (iopen, recovery) find no match there: those are
                        // never given up on request.
                        glock.demote(lock, wanted);
                    }
                }
            })
            .map_err(FsError::Io)?;
        self.threads.lock().push(cb);
        let (conn, stop, me) = (self.conn.clone(), self.stop.clone(), self.journal);
        let rec = std::thread::Builder::new()
            .name("recovery".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Err(e) = recovery::scan(&conn, &*dev, &sb, me) {
                        tracing::warn!(error = %e, "journal recovery scan failed; retrying");
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
        Ok(())
    }

    /// At mount, with `meta` held EX: replays journals left dirty by mounts whose locks are
    /// gone without orphans (e.g. after the whole cluster restarted). Journals whose lock is
    /// held or orphaned are left to their owner or to the recovery thread.
    pub fn recover_unowned_journals(&self, dev: &dyn BlockDevice, sb: &Superblock) -> Result<()> {
        recovery::unowned(&self.conn, dev, sb, self.journal)
    }

    /// An inode was opened here for the first time: hold its iopen lock (PR) so an unlink
    /// on another node leaves it allocated until we close it.
    pub fn opened(&self, ino: u64) {
        let mut map = self.iopen.lock();
        if map.contains_key(&ino) {
            return;
        }
        match self.conn.lock(&iopen_lock(ino), Mode::PR, Flags::NOQUEUE) {
            Ok(g) => {
                map.insert(ino, g.lock);
            }
            // An EX holder is freeing it right now: the open will see it gone.
            Err(e) => tracing::debug!(ino, error = %e, "iopen lock not taken"),
        }
    }

    /// The last local handle of `ino` closed.
    pub fn closed(&self, ino: u64) {
        if let Some(id) = self.iopen.lock().remove(&ino) {
            if let Err(e) = self.conn.unlock(id) {
                tracing::debug!(ino, error = %e, "iopen unlock failed");
            }
        }
    }

    /// True if no other node has `ino` open (so an unlinked inode can be freed now).
    pub fn nobody_else_has_open(&self, ino: u64) -> bool {
        if self.iopen.lock().contains_key(&ino) {
            return false;
        }
        match self.conn.lock(&iopen_lock(ino), Mode::EX, Flags::NOQUEUE) {
            Ok(g) => {
                let _ = self.conn.unlock(g.lock);
                true
            }
            Err(_) => false,
        }
    }

    /// Unmount: give up `meta` (flushing first), the iopen locks and the journal.
    pub fn leave(&self) -> Result<()> {
        let res = self.glock.release();
        for (_, id) in self.iopen.lock().drain() {
            let _ = self.conn.unlock(id);
        }
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
    let mut out = format!(
        "lockspace {}\njournal {}\n{:<12} {:>4} {:>10} {:>12} {:>12} {:>10} {:>14}\n",
        c.conn.lockspace,
        c.journal,
        "glock",
        "held",
        "acquires",
        "avg_acq_us",
        "max_acq_us",
        "demotes",
        "flush_total_us"
    );
    out += &format!(
        "{:<12} {:>4} {:>10} {:>12} {:>12} {:>10} {:>14}\n",
        g.name(),
        mode,
        st.acquires,
        avg,
        st.acquire_max_us,
        st.demotes,
        st.flush_total_us
    );
    out += &format!("{:<12} {:>4} {:>10}\n", "iopen", "PR", c.iopen.lock().len());
    out
}
