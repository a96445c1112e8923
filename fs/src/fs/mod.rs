//! The filesystem core: POSIX operations on inode numbers with typed results, callable
//! from tests without a kernel. The FUSE adapter (`fuse.rs`) is a thin layer over this.
//!
//! Concurrency: one mutex around the whole state. The cluster issue replaces it with
//! glocks per inode/resource group; every operation already names the inodes it touches.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::block::BlockDevice;
use crate::cluster::glock::{Glock, GlockGuard, GlockHooks};
use crate::cluster::Cluster;
use crate::dir::Dirent;
use crate::error::{FsError, Result};
use crate::format::{BlockState, LockProto, NAME_MAX};
use crate::inode::{Inode, Time, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG};
use crate::journal::ReplayStats;
use crate::store::Store;
use tandem_lockmgr::types::Mode;

mod acls;
mod inner;
mod types;

pub use types::*;

/// An open directory: its listing, fixed until the next rewind.
struct DirHandle {
    ino: u64,
    /// True until the first read: a read from offset 0 after that is a rewind.
    fresh: bool,
    ents: Vec<DirEntry>,
    /// readdirplus has asked the device for the inode blocks of `ents[..prefetched]`.
    prefetched: usize,
}

struct Inner {
    st: Store,
    root: u64,
    /// Open file handles per inode; an unlinked inode lives until its last close.
    opens: HashMap<u64, u32>,
    /// readdir snapshots taken at opendir, so offsets stay stable while entries change.
    dirs: HashMap<u64, DirHandle>,
    next_fh: u64,
    opts: FsOptions,
    /// The running transaction is near the journal's capacity; commit after this op.
    commit_wanted: bool,
    /// Cluster mounts: asked whether another node has an unlinked inode open.
    cluster: Option<Arc<Cluster>>,
    /// Where the last read of each recently read inode ended (sequential readers get
    /// the device reading ahead; see `map_read`).
    read_ends: HashMap<u64, u64>,
}

/// How far ahead of a sequential reader the device is asked to read.
const READ_AHEAD_BYTES: u32 = 4 << 20;
/// Inodes whose last read position is remembered (the map is cleared beyond that).
const READ_ENDS_CAP: usize = 4096;

pub struct Fs {
    inner: Mutex<Inner>,
    /// Serialises commits; always taken before `inner`, never while holding it.
    commit_lock: Mutex<()>,
    /// Shared by reads doing device I/O outside `inner`; exclusive while freed blocks
    /// become reusable. Lock order: commit_lock, data_guard, inner.
    data_guard: parking_lot::RwLock<()>,
    block_size: u32,
    /// Cluster mounts: the lock session and the glock every operation enters.
    cluster: Option<Arc<Cluster>>,
    /// `release` calls running now: an unlinked inode's blocks are not free until its
    /// release has reaped it, and ENOSPC waits for that (see `with_retry`).
    releasing: std::sync::atomic::AtomicUsize,
    /// POSIX ACLs are served and enforced (mirrors `Inner::opts.posix_acl`, readable
    /// without the lock).
    acl: std::sync::atomic::AtomicBool,
    /// The store's device view (which writes are known durable).
    order: Arc<crate::block::FlushOrder>,
    /// Cluster mounts: wakes the barrier thread, which flushes in the background after an
    /// EX grant so that the commit at the hand-off needs one flush fewer.
    barrier: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    kick: CommitKick,
}

/// The filesystem lock for one operation. When the operation leaves the running
/// transaction too big, the guard commits right after unlocking, so commits never run
/// their I/O under the lock.
struct OpGuard<'a> {
    fs: &'a Fs,
    g: Option<parking_lot::MutexGuard<'a, Inner>>,
}

impl std::ops::Deref for OpGuard<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        self.g.as_ref().expect("held until drop")
    }
}

impl std::ops::DerefMut for OpGuard<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        self.g.as_mut().expect("held until drop")
    }
}

impl Drop for OpGuard<'_> {
    /// A big running transaction is committed early. With a background committer
    /// (`Fs::wait_for_commit_kick`) it is woken and this operation returns at once, so
    /// the journal I/O overlaps the next operations; only when the committer falls behind
    /// (three quarters of the journal, `Fs::op`) does an operation wait for a commit.
    /// Without one (embedded use, tests) the operation that crosses half commits itself.
    fn drop(&mut self) {
        let Some(mut g) = self.g.take() else { return };
        // Only an operation that grew the transaction past a quarter asks (`after_op`);
        // lookups and reads never commit here.
        if !std::mem::take(&mut g.commit_wanted) {
            return;
        }
        let past_half = g.st.dirty_count() > g.st.tx_limit() / 2;
        drop(g);
        if self.fs.kick.kick() || !past_half {
            return;
        }
        if let Err(e) = self.fs.commit() {
            tracing::error!(error = %e, "journal commit failed");
        }
    }
}

/// Wakes the background committer before its interval when the running transaction
/// grew big, so that no operation has to wait for a commit of its own.
#[derive(Default)]
struct CommitKick {
    pending: Mutex<bool>,
    cv: parking_lot::Condvar,
    /// A committer waits in `Fs::wait_for_commit_kick`.
    attached: std::sync::atomic::AtomicBool,
}

impl CommitKick {
    /// Whether a committer was there to be woken.
    fn kick(&self) -> bool {
        if !self.attached.load(std::sync::atomic::Ordering::Acquire) {
            return false;
        }
        let mut p = self.pending.lock();
        if !*p {
            *p = true;
            self.cv.notify_one();
        }
        true
    }

    fn wait(&self, timeout: std::time::Duration) -> bool {
        self.attached
            .store(true, std::sync::atomic::Ordering::Release);
        let mut p = self.pending.lock();
        if !*p {
            self.cv.wait_for(&mut p, timeout);
        }
        std::mem::take(&mut *p)
    }
}

impl Fs {
    /// Mounts: replays the journal if needed and frees inodes orphaned by a crash.
    pub fn mount(dev: Arc<dyn BlockDevice>, opts: FsOptions) -> Result<(Self, ReplayStats)> {
        let sb = crate::store::read_superblock(&*dev)?;
        if sb.lock_proto == LockProto::Tandem && !opts.allow_cluster_fs_without_locking {
            return Err(FsError::NotSupported(
                "this is a lock_tandem (cluster) filesystem: mount it with -o node=NAME[,config=PATH] through the local tandem-lockd, or with -o lockproto=lock_nolock if no other node mounts it",
            ));
        }
        Self::mount_inner(dev, opts, None)
    }

    /// A cluster mount: `cluster` has claimed journal `cluster.journal`, and the caller
    /// holds its glock EX (the journal replay and the orphan scan below need it). Atime
    /// is never updated (reads take the glock shared).
    pub fn mount_cluster(
        dev: Arc<dyn BlockDevice>,
        mut opts: FsOptions,
        cluster: Arc<Cluster>,
    ) -> Result<(Arc<Self>, ReplayStats)> {
        opts.journal = cluster.journal;
        opts.relatime = false;
        let (fs, stats) = Self::mount_inner(dev, opts, Some(cluster.clone()))?;
        let fs = Arc::new(fs);
        let hooks: Arc<dyn GlockHooks> = fs.clone();
        cluster.glock.set_hooks(Arc::downgrade(&hooks));
        // The barrier thread ends when the filesystem (the channel's sender) goes.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let order = fs.order.clone();
        std::thread::Builder::new()
            .name("barrier".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    while rx.try_recv().is_ok() {}
                    if let Err(e) = order.flush_aside() {
                        tracing::warn!(error = %e, "background flush after a glock grant failed");
                    }
                }
            })
            .map_err(|e| FsError::Mount(format!("starting the barrier thread: {e}")))?;
        *fs.barrier.lock() = Some(tx);
        Ok((fs, stats))
    }

    fn mount_inner(
        dev: Arc<dyn BlockDevice>,
        opts: FsOptions,
        cluster: Option<Arc<Cluster>>,
    ) -> Result<(Self, ReplayStats)> {
        let (mut st, stats) = Store::open(dev, opts.journal, opts.read_only)?;
        let root = st.sb.root_block;
        let order = st.order.clone();
        // Cluster: an unlinked inode may be open on another node; the last closer frees it.
        if !opts.read_only && cluster.is_none() {
            for blk in st.unlinked_inodes()? {
                let ino = st.inode(blk)?;
                st.free_inode(&ino)?;
            }
            st.commit()?;
        }
        st.inode(root)?;
        let block_size = st.sb.block_size;
        let acl = std::sync::atomic::AtomicBool::new(opts.posix_acl);
        let inner = Inner {
            st,
            root,
            opens: HashMap::new(),
            dirs: HashMap::new(),
            next_fh: 1,
            opts,
            commit_wanted: false,
            cluster: cluster.clone(),
            read_ends: HashMap::new(),
        };
        Ok((
            Self {
                inner: Mutex::new(inner),
                commit_lock: Mutex::new(()),
                data_guard: parking_lot::RwLock::new(()),
                block_size,
                cluster,
                releasing: std::sync::atomic::AtomicUsize::new(0),
                acl,
                order,
                barrier: Mutex::new(None),
                kick: CommitKick::default(),
            },
            stats,
        ))
    }

    /// Whether POSIX ACLs are served and enforced on this mount.
    pub fn posix_acl(&self) -> bool {
        self.acl.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Turns ACL support off (the kernel refused `FUSE_POSIX_ACL`) or on (tests of the
    /// core without a kernel). Called before the first operation.
    pub fn set_posix_acl(&self, on: bool) {
        self.inner.lock().opts.posix_acl = on;
        self.acl.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Cluster mounts: enters the filesystem glock in `mode` (PR to read, EX to change)
    /// for the operation's duration. Taken before any local lock.
    fn hold(&self, mode: Mode) -> Result<Option<GlockGuard<'_>>> {
        self.glock().map(|g| g.enter(mode)).transpose()
    }

    /// The glock, for status views (None on single-node mounts).
    pub fn glock(&self) -> Option<&Arc<Glock>> {
        self.cluster.as_ref().map(|c| &c.glock)
    }

    /// Runs `op`; on ENOSPC while freed blocks await commit or checkpoint, makes them
    /// reusable and retries once (ext4 does the same for blocks freed by running transactions).
    ///
    /// It also waits (at most `RELEASE_WAIT`) for closes the kernel has not delivered yet:
    /// FUSE sends RELEASE after close(2) returns, so `close; rm big; write` can see the
    /// unlinked file still open here for a moment, and its space must count as free.
    fn with_retry<T>(&self, mut op: impl FnMut(&mut Inner) -> Result<T>) -> Result<T> {
        let unlinked_open = {
            let _gl = self.hold(Mode::EX)?;
            let mut g = self.op();
            match op(&mut g) {
                Err(FsError::NoSpace) => {
                    let n = g.unlinked_open()?;
                    if n == 0 && !g.st.has_held_blocks() {
                        return Err(FsError::NoSpace);
                    }
                    n
                }
                r => return r,
            }
        };
        if unlinked_open > 0 {
            // The glock and the filesystem lock are released: the release must take them.
            self.wait_for_releases(unlinked_open);
        }
        let _gl = self.hold(Mode::EX)?;
        self.sync(false)?;
        op(&mut self.op())
    }

    /// Waits until fewer than `before` unlinked inodes are open here and no release is
    /// running (its reap done), or `RELEASE_WAIT` passes.
    fn wait_for_releases(&self, before: usize) {
        const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
        let start = std::time::Instant::now();
        while start.elapsed() < RELEASE_WAIT {
            std::thread::sleep(std::time::Duration::from_millis(2));
            if self.releasing.load(std::sync::atomic::Ordering::Acquire) > 0 {
                continue;
            }
            let now = {
                let _gl = self.hold(Mode::PR);
                self.inner.lock().unlinked_open()
            };
            if now.map_or(true, |n| n < before) {
                return;
            }
        }
    }

    fn op(&self) -> OpGuard<'_> {
        let g = self.inner.lock();
        if g.st.dirty_count() > g.st.tx_limit() / 4 * 3 {
            // Many operations piled up since the last commit: make room before this one so
            // no transaction outgrows the journal.
            drop(g);
            if let Err(e) = self.commit() {
                tracing::error!(error = %e, "journal commit failed");
            }
            return OpGuard {
                fs: self,
                g: Some(self.inner.lock()),
            };
        }
        OpGuard {
            fs: self,
            g: Some(g),
        }
    }

    /// Commit and checkpoint (`clean` also marks the journal clean, for unmount).
    fn sync(&self, clean: bool) -> Result<()> {
        let _c = self.commit_lock.lock();
        let _no_reads = self.data_guard.write();
        self.inner.lock().st.sync_all(clean)
    }

    /// Metadata blocks in the running transaction (tests and diagnostics).
    pub fn debug_dirty_blocks(&self) -> usize {
        self.inner.lock().st.dirty_count()
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// For the background committer: waits up to `timeout` for operations to ask for an
    /// early commit; true when they did (commit now). Once called, operations stop
    /// committing by themselves until the journal is three quarters full.
    pub fn wait_for_commit_kick(&self, timeout: std::time::Duration) -> bool {
        self.kick.wait(timeout)
    }

    /// Commits the running transaction (group commit; also called by the commit thread).
    /// The journal I/O runs without the filesystem lock, so operations continue meanwhile
    /// and land in the next transaction.
    pub fn commit(&self) -> Result<()> {
        if let Some(g) = self.glock() {
            // Our locks are void: another node may be replaying our journal right now.
            g.check_alive()?;
        }
        let _c = self.commit_lock.lock();
        let (blocks, dev, journal, bs, pre_flush) = {
            let mut g = self.inner.lock();
            let blocks = g.st.prepare_commit()?;
            // Every write this transaction depends on completed before this point.
            let pre_flush = g.st.order.barrier_pending();
            (
                blocks,
                g.st.dev.clone(),
                g.st.journal.clone(),
                g.st.bs,
                pre_flush,
            )
        };
        let res = crate::store::write_tx(&*dev, bs, journal.as_deref(), &blocks, pre_flush);
        // Finishing makes this transaction's freed blocks reusable: wait for reads that
        // may still target them.
        let _no_reads = self.data_guard.write();
        self.inner.lock().st.finish_commit(&res);
        res.map(|_| ())
    }

    /// Commit + checkpoint + clean flag: what unmount does.
    pub fn shutdown(&self) -> Result<()> {
        if let Some(g) = self.glock() {
            g.check_alive()?;
        }
        let _c = self.commit_lock.lock();
        let _no_reads = self.data_guard.write();
        let mut g = self.inner.lock();
        if g.opts.read_only {
            return Ok(());
        }
        let orphans: Vec<u64> = if self.cluster.is_some() {
            Vec::new() // may be open on another node; the last closer frees them
        } else {
            g.st.unlinked_inodes()?
        };
        for blk in orphans {
            let ino = g.st.inode(blk)?;
            g.st.free_inode(&ino)?;
        }
        g.st.sync_all(true)
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr> {
        let _gl = self.hold(Mode::PR)?;
        let mut g = self.op();
        check_name(name)?;
        let dir = g.load(parent)?;
        if !dir.is_dir() {
            return Err(FsError::NotDir);
        }
        let ent = g.st.dir_lookup(&dir, name)?.ok_or(FsError::NotFound)?;
        let ino = g.st.inode(ent.ino)?;
        Ok(g.attr(&ino))
    }

    /// Opens a file: an unlinked file stays readable until the matching `release`.
    pub fn open(&self, ino: u64) -> Result<()> {
        let _gl = self.hold(Mode::PR)?;
        let mut g = self.op();
        let i = g.load(ino)?;
        let n = g.opens.entry(i.block).or_insert(0);
        *n += 1;
        if *n == 1 {
            if let Some(c) = &self.cluster {
                c.opened(i.block);
            }
        }
        Ok(())
    }

    /// Closes a handle from `open`/`create`; frees the inode if it was the last one of an
    /// unlinked file.
    pub fn release(&self, ino: u64) {
        use std::sync::atomic::Ordering;
        self.releasing.fetch_add(1, Ordering::AcqRel);
        self.release_inner(ino);
        self.releasing.fetch_sub(1, Ordering::AcqRel);
    }

    fn release_inner(&self, ino: u64) {
        let Some(cluster) = self.cluster.clone() else {
            let mut g = self.op();
            let blk = g.blk(ino);
            if g.drop_open(blk) {
                if let Err(e) = g.reap(blk) {
                    tracing::warn!(ino, error = %e, "could not free an unlinked inode; fsck or the next mount will");
                }
            }
            return;
        };
        // Cluster: the iopen lock stays cached (idle). If the file may have lost its last
        // name meanwhile (here, or a deleter elsewhere called us back) and no node has it
        // open any more, free it; other closes cost no glock request.
        let blk = {
            let mut g = self.inner.lock();
            let blk = g.blk(ino);
            if !g.drop_open(blk) {
                return;
            }
            blk
        };
        if !cluster.closed(blk) {
            return;
        }
        if let Err(e) = self.reap_if_unused(&cluster, blk) {
            tracing::warn!(ino, error = %e, "could not free an unlinked inode; fsck will");
        }
    }

    /// Cluster: frees every unlinked inode that is open nowhere (after a node died with
    /// files open). Returns how many were freed.
    fn reap_all_unused(&self) -> Result<usize> {
        let Some(cluster) = self.cluster.clone() else {
            return Ok(0);
        };
        if self.inner.lock().opts.read_only {
            return Ok(0);
        }
        let candidates: Vec<u64> = {
            let _gl = self.hold(Mode::PR)?;
            let mut g = self.op();
            let all = g.st.unlinked_inodes()?;
            all.into_iter()
                .filter(|b| !g.opens.contains_key(b))
                .collect()
        };
        let mut freed = 0;
        for blk in candidates {
            if self.reap_if_unused(&cluster, blk)? {
                freed += 1;
            }
        }
        Ok(freed)
    }

    /// Cluster: frees `blk` if it is unlinked and open nowhere. Checked under the shared
    /// glock first, so the common case (a file that still has its names) costs no EX.
    /// Returns whether it freed it.
    fn reap_if_unused(&self, cluster: &Cluster, blk: u64) -> Result<bool> {
        let unlinked = |g: &mut Inner| -> Result<bool> {
            Ok(!g.opens.contains_key(&blk) && g.st.state(blk)? == BlockState::Unlinked)
        };
        {
            let _gl = self.hold(Mode::PR)?;
            if !unlinked(&mut self.op())? {
                return Ok(false);
            }
        }
        let _gl = self.hold(Mode::EX)?;
        let mut g = self.op();
        if unlinked(&mut g)? && cluster.nobody_has_open(blk) {
            g.reap(blk)?;
            return Ok(true);
        }
        Ok(false)
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        let _gl = self.hold(Mode::PR)?;
        let mut g = self.op();
        let i = g.load(ino)?;
        Ok(g.attr(&i))
    }

    pub fn setattr(&self, ino: u64, s: SetAttr) -> Result<Attr> {
        self.setattr_with(ino, s, false)
    }

    /// `setattr`, and with `kill_privs` also drops setuid, setgid and file capabilities
    /// (see `Inner::kill_privs`) in the same operation.
    pub fn setattr_with(&self, ino: u64, s: SetAttr, kill_privs: bool) -> Result<Attr> {
        let _gl = self.hold(Mode::EX)?;
        let mut g = self.op();
        g.writable()?;
        let mut i = g.load(ino)?;
        if kill_privs && !i.is_dir() {
            g.kill_privs(&mut i)?;
        }
        let now = Time::now();
        if s.size.is_some() && i.is_dir() {
            return Err(FsError::IsDir);
        }
        // Before the truncate: once that has freed blocks, nothing may fail before the
        // inode is stored (the ACL rewrite can, on a corrupt ACL).
        if let Some(m) = s.mode {
            i.mode = (i.mode & S_IFMT) | (m & 0o7777);
            g.chmod_acl(&mut i)?;
        }
        if let Some(size) = s.size {
            g.st.file_truncate(&mut i, size)?;
            i.mtime = now;
        }
        if let Some(u) = s.uid {
            i.uid = u;
        }
        if let Some(gid) = s.gid {
            i.gid = gid;
        }
        if let Some(t) = s.atime {
            i.atime = Time::from_system(t);
        }
        if let Some(t) = s.mtime {
            i.mtime = Time::from_system(t);
        }
        i.ctime = s.ctime.map_or(now, Time::from_system);
        g.st.put_inode(&i)?;
        g.after_op()?;
        Ok(g.attr(&i))
    }

    /// Creates a regular file, FIFO, socket or device node.
    pub fn mknod(
        &self,
        ctx: Ctx,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> Result<Attr> {
        let kind = if mode & S_IFMT == 0 {
            S_IFREG
        } else {
            mode & S_IFMT
        };
        if kind == S_IFDIR || kind == S_IFLNK {
            return Err(FsError::Invalid(
                "mknod cannot make directories or symlinks",
            ));
        }
        let mode = kind | (mode & 0o7777);
        self.with_retry(|g| g.create(ctx, parent, name, mode, umask, rdev, None))
    }

    /// open(2) with O_CREAT (FUSE `create`). If the name exists — on a cluster mount another
    /// node may create it between the kernel's lookup and this call — it opens the existing
    /// file unless O_EXCL was given, truncating it for O_TRUNC, as a local filesystem would.
    pub fn create_file(
        &self,
        ctx: Ctx,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> Result<Attr> {
        let mode = S_IFREG | (mode & 0o7777);
        self.with_retry(
            |g| match g.create(ctx, parent, name, mode, umask, 0, None) {
                Err(FsError::Exists) if flags & libc::O_EXCL == 0 => {
                    let dir = g.load_dir(parent)?;
                    let ent = g.st.dir_lookup(&dir, name)?.ok_or(FsError::NotFound)?;
                    let mut i = g.st.inode(ent.ino)?;
                    if i.is_dir() {
                        return Err(FsError::IsDir);
                    }
                    if !g.may_open(ctx, &i, flags)? {
                        return Err(FsError::Access);
                    }
                    if flags & libc::O_TRUNC != 0 && i.size > 0 {
                        g.st.file_truncate(&mut i, 0)?;
                        let now = Time::now();
                        i.mtime = now;
                        i.ctime = now;
                        g.st.put_inode(&i)?;
                        g.after_op()?;
                    }
                    Ok(g.attr(&i))
                }
                r => r,
            },
        )
    }

    pub fn mkdir(&self, ctx: Ctx, parent: u64, name: &[u8], mode: u32, umask: u32) -> Result<Attr> {
        let mode = S_IFDIR | (mode & 0o7777);
        self.with_retry(|g| g.create(ctx, parent, name, mode, umask, 0, None))
    }

    pub fn symlink(&self, ctx: Ctx, parent: u64, name: &[u8], target: &[u8]) -> Result<Attr> {
        if target.is_empty() || target.len() > 4095 {
            return Err(FsError::NameTooLong);
        }
        self.with_retry(|g| g.create(ctx, parent, name, S_IFLNK | 0o777, 0, 0, Some(target)))
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let _gl = self.hold(Mode::PR)?;
        let mut g = self.op();
        let i = g.load(ino)?;
        if i.kind() != S_IFLNK {
            return Err(FsError::Invalid("not a symlink"));
        }
        g.st.file_read(&i, 0, i.size as u32)
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> Result<Attr> {
        let _gl = self.hold(Mode::EX)?;
        let mut g = self.op();
        g.writable()?;
        check_name(newname)?;
        let mut i = g.load(ino)?;
        if i.is_dir() {
            return Err(FsError::NotPermitted);
        }
        if i.nlink >= LINK_MAX {
            return Err(FsError::TooManyLinks);
        }
        let mut dir = g.load_dir(newparent)?;
        if g.st.dir_lookup(&dir, newname)?.is_some() {
            return Err(FsError::Exists);
        }
        let ent = Dirent {
            name: newname.to_vec(),
            ino: i.block,
            dtype: dtype(i.mode),
        };
        let added = g.st.dir_add(&mut dir, ent);
        // Stored even on failure: a leaf split that happened before ENOSPC is already in
        // the leaf blocks, and the table in the inode must match it.
        g.st.put_inode(&dir)?;
        added?;
        let now = Time::now();
        dir.mtime = now;
        dir.ctime = now;
        g.st.put_inode(&dir)?;
        i.nlink += 1;
        i.ctime = now;
        g.st.put_inode(&i)?;
        g.after_op()?;
        Ok(g.attr(&i))
    }

    pub fn unlink(&self, parent: u64, name: &[u8]) -> Result<()> {
        let _gl = self.hold(Mode::EX)?;
        let mut g = self.op();
        g.writable()?;
        check_name(name)?;
        let mut dir = g.load_dir(parent)?;
        let ent = g.st.dir_lookup(&dir, name)?.ok_or(FsError::NotFound)?;
        let mut victim = g.st.inode(ent.ino)?;
        if victim.is_dir() {
            return Err(FsError::IsDir);
        }
        g.st.dir_remove(&mut dir, name)?;
        let now = Time::now();
        dir.mtime = now;
        dir.ctime = now;
        g.st.put_inode(&dir)?;
        g.drop_link(&mut victim)?;
        g.after_op()
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> Result<()> {
        let _gl = self.hold(Mode::EX)?;
        let mut g = self.op();
        g.writable()?;
        if name == b"." {
            return Err(FsError::Invalid("cannot remove '.'"));
        }
        if name == b".." {
            return Err(FsError::NotEmpty);
        }
        check_name(name)?;
        let mut dir = g.load_dir(parent)?;
        let ent = g.st.dir_lookup(&dir, name)?.ok_or(FsError::NotFound)?;
        let mut victim = g.st.inode(ent.ino)?;
        if !victim.is_dir() {
            return Err(FsError::NotDir);
        }
        if victim.dir_entries != 0 {
            return Err(FsError::NotEmpty);
        }
        g.st.dir_remove(&mut dir, name)?;
        let now = Time::now();
        dir.mtime = now;
        dir.ctime = now;
        dir.nlink = dir.nlink.saturating_sub(1);
        g.st.put_inode(&dir)?;
        g.drop_link(&mut victim)?;
        g.after_op()
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: u32,
    ) -> Result<()> {
        let _gl = self.hold(Mode::EX)?;
        let mut g = self.op();
        g.writable()?;
        check_name(name)?;
        check_name(newname)?;
        if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0
            || flags == RENAME_NOREPLACE | RENAME_EXCHANGE
        {
            return Err(FsError::Invalid("unsupported rename flags"));
        }
        g.rename(parent, name, newparent, newname, flags)?;
        g.after_op()
    }

    /// Maps the read under the lock, then reads the device without it, so the kernel's
    /// parallel readahead requests overlap. Holding `data_guard` (shared) meanwhile keeps
    /// the mapped blocks from being freed and reused until the read is done.
    pub fn read(&self, ino: u64, off: u64, size: u32) -> Result<Vec<u8>> {
        let _gl = self.hold(Mode::PR)?;
        let _reading = self.data_guard.read();
        let (plan, dev) = self.map_read(ino, off, size)?;
        plan.execute(&*dev)
    }

    fn map_read(
        &self,
        ino: u64,
        off: u64,
        size: u32,
    ) -> Result<(crate::data::ReadPlan, Arc<dyn BlockDevice>)> {
        // The plain lock, not `op()`: its commit-on-drop would wait for `data_guard`,
        // which this thread holds.
        let mut g = self.inner.lock();
        let mut i = g.load(ino)?;
        if i.is_dir() {
            return Err(FsError::IsDir);
        }
        let plan = g.st.read_plan(&i, off, size)?;
        // A sequential reader (this read starts near where the last one ended; the
        // kernel's parallel readahead requests arrive slightly out of order): ask the
        // device to read the next few MiB of the file now. Only a hint, so free when the
        // data is cached, and devices without a page cache ignore it.
        let end = off + u64::from(size);
        let sequential = g
            .read_ends
            .get(&ino)
            .is_some_and(|&prev| off.abs_diff(prev) <= u64::from(READ_AHEAD_BYTES));
        if g.read_ends.len() >= READ_ENDS_CAP {
            g.read_ends.clear();
        }
        g.read_ends.insert(ino, end);
        if sequential && end < i.size {
            let ahead = g.st.read_plan(&i, end, READ_AHEAD_BYTES)?.device_ranges();
            if !ahead.is_empty() {
                g.st.dev.hint_reads(&ahead);
            }
        }
        if g.opts.relatime && !g.opts.read_only {
            let now = Time::now();
            let older = |a: Time, b: Time| (a.secs, a.nsecs) <= (b.secs, b.nsecs);
            // relatime: update only if atime is not newer than mtime/ctime, or a day old.
            if older(i.atime, i.mtime)
                || older(i.atime, i.ctime)
                || now.secs - i.atime.secs > 24 * 3600
            {
                i.atime = now;
                g.st.put_inode(&i)?;
                g.after_op()?;
            }
        }
        Ok((plan, g.st.dev.clone()))
    }

    pub fn write(&self, ino: u64, off: u64, data: &[u8]) -> Result<u32> {
        self.write_with(ino, Some(off), data, false)
    }

    /// Writes at the current end of file (O_APPEND on a cluster mount: the end of file is
    /// read under the exclusive glock, so appends from several nodes never overlap).
    pub fn append(&self, ino: u64, data: &[u8]) -> Result<u32> {
        self.write_with(ino, None, data, false)
    }

    /// Writes at `off` (None: at the end of file, as O_APPEND on a cluster mount), and
    /// with `kill_privs` drops setuid, setgid and file capabilities in the same operation
    /// (see `Inner::kill_privs`).
    pub fn write_with(
        &self,
        ino: u64,
        off: Option<u64>,
        data: &[u8],
        kill_privs: bool,
    ) -> Result<u32> {
        self.with_retry(|g| {
            g.writable()?;
            let mut i = g.load(ino)?;
            if i.is_dir() {
                return Err(FsError::IsDir);
            }
            if kill_privs {
                g.kill_privs(&mut i)?;
            }
            let off = off.unwrap_or(i.size);
            let res = g.st.file_write(&mut i, off, data);
            let now = Time::now();
            i.mtime = now;
            i.ctime = now;
            // Stored even on failure: blocks allocated before ENOSPC stay owned, not leaked.
            g.st.put_inode(&i)?;
            res?;
            g.after_op()?;
            Ok(data.len() as u32)
        })
    }

    pub fn fallocate(&self, ino: u64, off: u64, len: u64, mode: i32) -> Result<()> {
        self.with_retry(|g| {
            g.writable()?;
            let mut i = g.load(ino)?;
            if i.is_dir() {
                return Err(FsError::IsDir);
            }
            let res = g.st.file_fallocate(&mut i, off, len, mode);
            i.ctime = Time::now();
            if mode & crate::data::FALLOC_FL_PUNCH_HOLE != 0 {
                i.mtime = i.ctime;
            }
            g.st.put_inode(&i)?;
            res?;
            g.after_op()
        })
    }

    /// Makes everything written so far durable (the whole running transaction, group commit).
    pub fn fsync(&self, _ino: u64) -> Result<()> {
        self.commit()
    }

    pub fn opendir(&self, ino: u64) -> Result<u64> {
        let _gl = self.hold(Mode::PR)?;
        let mut g = self.op();
        let snap = g.snapshot(ino)?;
        let fh = g.next_fh;
        g.next_fh += 1;
        g.dirs.insert(
            fh,
            DirHandle {
                ino,
                fresh: true,
                ents: snap,
                prefetched: 0,
            },
        );
        Ok(fh)
    }

    /// Entries from `offset` on, from the snapshot taken at opendir.
    pub fn readdir(&self, fh: u64, offset: u64) -> Result<Vec<DirEntry>> {
        let mut out = Vec::new();
        self.readdir_with(fh, offset, |e| {
            out.push(e.clone());
            true
        })?;
        Ok(out)
    }

    /// Feeds entries from `offset` on to `add` until it returns false (reply buffer full).
    /// Only the entries handed out are touched, so listing a huge directory stays linear.
    pub fn readdir_with(
        &self,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(&DirEntry) -> bool,
    ) -> Result<()> {
        let _gl = self.hold(Mode::PR)?;
        let mut g = self.op();
        g.refresh_on_rewind(fh, offset)?;
        let h = g
            .dirs
            .get(&fh)
            .ok_or(FsError::Invalid("unknown directory handle"))?;
        for e in h.ents.iter().skip(offset as usize) {
            if !add(e) {
                break;
            }
        }
        Ok(())
    }

    /// readdirplus: `add` returns false when the reply buffer is full.
    pub fn readdirplus(
        &self,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(&DirEntry, &Attr) -> bool,
    ) -> Result<()> {
        let _gl = self.hold(Mode::PR)?;
        let mut g = self.op();
        g.refresh_on_rewind(fh, offset)?;
        let mut k = offset as usize;
        g.prefetch_inodes(fh, k);
        loop {
            let h = g
                .dirs
                .get(&fh)
                .ok_or(FsError::Invalid("unknown directory handle"))?;
            let Some(e) = h.ents.get(k).cloned() else {
                break;
            };
            k += 1;
            let ino = match g.load(e.ino) {
                Ok(i) => i,
                // Removed since opendir: skip it, as if it was never there.
                Err(FsError::Stale(_)) => continue,
                Err(err) => return Err(err),
            };
            let attr = g.attr(&ino);
            if !add(&e, &attr) {
                break;
            }
        }
        Ok(())
    }

    pub fn releasedir(&self, fh: u64) {
        self.op().dirs.remove(&fh);
    }

    pub fn statfs(&self) -> Result<StatFs> {
        let _gl = self.hold(Mode::PR)?;
        let mut g = self.op();
        let free = g.st.free_blocks()?;
        Ok(StatFs {
            blocks: g.st.data_blocks(),
            bfree: free,
            files: g.st.inode_count()? + free,
            ffree: free,
            bsize: g.st.sb.block_size,
            namelen: NAME_MAX as u32,
        })
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        // Before any lock: `ls -l` asks this for the first entry of a directory.
        crate::xattr::check_served(name, self.posix_acl())?;
        let _gl = self.hold(Mode::PR)?;
        let mut g = self.op();
        let i = g.load(ino)?;
        g.st.xattr_get(&i, name)
    }

    /// Names, each NUL-terminated, as listxattr(2) returns them.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        let acl = self.posix_acl();
        let _gl = self.hold(Mode::PR)?;
        let mut g = self.op();
        let i = g.load(ino)?;
        let mut out = Vec::new();
        for (n, _) in g.st.xattrs(&i)? {
            if crate::xattr::check_served(&n, acl).is_err() {
                continue;
            }
            out.extend_from_slice(&n);
            out.push(0);
        }
        Ok(out)
    }

    /// setxattr by root (tests and tools; the FUSE layer passes its caller to
    /// `setxattr_as`).
    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        let root = Ctx {
            uid: 0,
            gid: 0,
            pid: 0,
        };
        self.setxattr_as(root, ino, name, value, flags)
    }

    /// setxattr by `caller`: setting an access ACL drops setgid unless the caller is in
    /// the file's group or privileged (`posix_acl_update_mode`).
    pub fn setxattr_as(
        &self,
        caller: Ctx,
        ino: u64,
        name: &[u8],
        value: &[u8],
        flags: i32,
    ) -> Result<()> {
        crate::xattr::check_served(name, self.posix_acl())?;
        if crate::acl::is_acl_name(name) {
            let acl = crate::acl::Acl::parse(value)?;
            return self.edit_xattrs(ino, |g, i| g.set_acl(i, name, &acl, caller));
        }
        self.edit_xattrs(ino, |g, i| g.st.xattr_set(i, name, Some(value), flags))
    }

    pub fn removexattr(&self, ino: u64, name: &[u8]) -> Result<()> {
        self.edit_xattrs(ino, |g, i| g.st.xattr_set(i, name, None, 0))
    }

    /// One change to an inode's extended attributes, as a metadata operation.
    fn edit_xattrs(
        &self,
        ino: u64,
        mut f: impl FnMut(&mut Inner, &mut Inode) -> Result<()>,
    ) -> Result<()> {
        self.with_retry(|g| {
            g.writable()?;
            let mut i = g.load(ino)?;
            f(g, &mut i)?;
            i.ctime = Time::now();
            g.st.put_inode(&i)?;
            g.after_op()
        })
    }
}

fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return Err(FsError::Invalid("bad file name"));
    }
    Ok(())
}

fn dtype(mode: u32) -> u8 {
    ((mode & S_IFMT) >> 12) as u8
}

impl GlockHooks for Fs {
    fn flush(&self) -> Result<()> {
        // Commit, write home, checkpoint: nothing of ours stays replayable, so replay of
        // our journal can never overwrite what another node writes after us.
        self.sync(false)
    }

    fn reap_unlinked(&self, ino: u64) {
        let Some(cluster) = self.cluster.clone() else {
            return;
        };
        if let Err(e) = self.reap_if_unused(&cluster, ino) {
            tracing::warn!(ino, error = %e, "could not free an unlinked inode; fsck will");
        }
    }

    fn reap_orphans(&self) -> bool {
        match self.reap_all_unused() {
            Ok(0) => true,
            Ok(n) => {
                tracing::info!(
                    inodes = n,
                    "freed unlinked inodes that no node has open any more"
                );
                true
            }
            // Withdrawn: nothing more can be done here; the next mount sweeps.
            Err(_) if self.glock().is_some_and(|g| g.check_alive().is_err()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "could not sweep unlinked inodes; retrying");
                false
            }
        }
    }

    fn settle(&self) {
        if let Some(c) = &self.cluster {
            c.settle_iopen();
        }
    }

    /// The node that held the glock before us wrote its journal header without a flush
    /// (`Journal::checkpoint`). A commit block of ours must not become durable before it
    /// (else after a crash of both, its stale transactions could be replayed after ours),
    /// so our first commit would need two flushes. A flush in the background, on a second
    /// device connection, usually completes before that commit and saves one.
    fn granted_exclusive(&self) {
        self.order.require_barrier();
        if let Some(tx) = &*self.barrier.lock() {
            let _ = tx.send(());
        }
    }

    fn invalidate(&self) {
        let mut g = self.inner.lock();
        if let Err(e) = g.st.drop_caches() {
            tracing::error!(error = %e, "re-reading metadata after a glock grant failed");
            g.st.poison();
        }
    }
}
