//! Links fuser callbacks to the filesystem core. Each callback is a span, one call into
//! `Fs`, and a reply; all decisions live in `fs.rs` so they can be tested without FUSE.
//!
//! Kernel caching: attributes and entries are cached for `ttl` and file pages are kept
//! across opens (`FOPEN_KEEP_CACHE`). That is valid because this daemon is the only writer.
//! A cluster mount is not: names, attributes and pages are cached only while this node
//! holds the `meta` glock and are forgotten before it goes (`cluster::kcache`; names only
//! on Linux 6.16+, which can forget them all at once without a lock); and the kernel
//! checks a file's mtime and size before every cached read (`FUSE_AUTO_INVAL_DATA`), so a
//! descriptor kept open across another node's write sees the new data.
//! O_APPEND writes bypass the page cache and append at the daemon's end of file, under the
//! exclusive glock, so appends from several nodes never overlap.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::cluster::flock::FlockTable;
use crate::cluster::kcache::{Grant, KernelCache, Ticket};
use crate::error::FsError;
use crate::fs::{Attr, Ctx, FileKind, Fs, SetAttr};

/// Largest write the kernel may send in one request.
pub const MAX_WRITE_BYTES: u32 = 1 << 20;

/// Keep cached pages across opens (we are the only writer), and skip FLUSH on close: it
/// has nothing to do (close promises no durability and locks are kernel-local), and it
/// would cost a round trip per file.
const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_KEEP_CACHE.union(FopenFlags::FOPEN_NOFLUSH);

/// Cluster mounts: another node may change a file between two opens here.
const CLUSTER_OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_NOFLUSH;

pub struct FuseFs {
    fs: Arc<Fs>,
    /// Lifetime of names (and of attributes on a local mount); 0 on a cluster mount.
    ttl: Duration,
    /// Cluster mounts: what the kernel may cache while the glock is held.
    kcache: Option<Arc<KernelCache>>,
    /// The kernel agreed to `FUSE_HANDLE_KILLPRIV_V2`: we drop setuid, setgid and file
    /// capabilities on write, truncate and chown, and the kernel no longer asks for
    /// `security.capability` (one getxattr round trip) before every write.
    kill_privs: std::sync::atomic::AtomicBool,
    /// Cluster mounts: flock(2) through the lock manager, so it excludes other nodes.
    flocks: Option<Arc<FlockTable>>,
    /// File handles: unique per open and never reused, so a late RELEASE of one open can
    /// never be taken for another (flock locks are keyed by them).
    next_fh: std::sync::atomic::AtomicU64,
}

impl FuseFs {
    pub fn new(fs: Arc<Fs>, ttl: Duration) -> Self {
        Self {
            fs,
            ttl,
            kcache: None,
            kill_privs: Default::default(),
            flocks: None,
            next_fh: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// A cluster mount: the kernel caches only what the glock protects, and forgets it
    /// before the glock goes (`kcache`, attached to the glock by the caller).
    pub fn new_cluster(fs: Arc<Fs>, kcache: Arc<KernelCache>, flocks: Arc<FlockTable>) -> Self {
        Self {
            fs,
            ttl: Duration::ZERO,
            kcache: Some(kcache),
            kill_privs: Default::default(),
            flocks: Some(flocks),
            next_fh: std::sync::atomic::AtomicU64::new(1),
        }
    }

    fn new_fh(&self) -> FileHandle {
        FileHandle(
            self.next_fh
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        )
    }
}

fn errno(e: &FsError) -> Errno {
    let level_is_error = matches!(
        e,
        FsError::Corrupt(_) | FsError::Inconsistent { .. } | FsError::Io(_) | FsError::Poisoned
    );
    if level_is_error {
        tracing::error!(error = %e, "filesystem error");
    } else {
        tracing::debug!(error = %e, "operation failed");
    }
    Errno::from_i32(e.errno())
}

fn kind(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
    }
}

fn fattr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks_512,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.crtime,
        kind: kind(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

fn ctx(req: &Request) -> Ctx {
    Ctx {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

impl FuseFs {
    /// Runs `op` and replies with its entry. Cluster mounts cache the attributes and the
    /// name while the glock protects them (`kcache.rs`).
    fn entry(&self, reply: ReplyEntry, op: impl FnOnce() -> crate::Result<Attr>) {
        let t = self.ticket();
        match op() {
            Ok(a) => {
                let (_grant, attr_ttl, name_ttl) = match (&self.kcache, t) {
                    (Some(k), Some(t)) => k.entry(t, a.ino),
                    _ => (Grant::none(), self.ttl, self.ttl),
                };
                reply.entry_with_ttls(&attr_ttl, &name_ttl, &fattr(&a), Generation(a.generation))
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn attr(&self, reply: ReplyAttr, op: impl FnOnce() -> crate::Result<Attr>) {
        let t = self.ticket();
        match op() {
            Ok(a) => {
                let (_grant, attr_ttl) = self.attr_lifetime(t, a.ino);
                reply.attr(&attr_ttl, &fattr(&a))
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// Taken before an operation on a cluster mount (see `kcache::Ticket`).
    fn ticket(&self) -> Option<Ticket> {
        self.kcache.as_ref().map(|k| k.ticket())
    }

    /// The attribute lifetime for a reply about `ino`, and the grant to hold until the
    /// reply is written.
    fn attr_lifetime(&self, t: Option<Ticket>, ino: u64) -> (Grant<'_>, Duration) {
        match (&self.kcache, t) {
            (Some(k), Some(t)) => k.attrs(t, ino),
            _ => (Grant::none(), self.ttl),
        }
    }

    /// Open flags for `ino` opened with `flags` since `t`, and the grant to hold until
    /// the reply is written.
    fn open_reply(&self, t: Option<Ticket>, ino: u64, flags: i32) -> (Grant<'_>, FopenFlags) {
        let (Some(k), Some(t)) = (&self.kcache, t) else {
            return (Grant::none(), OPEN_FLAGS);
        };
        if flags & libc::O_APPEND != 0 {
            return (
                Grant::none(),
                CLUSTER_OPEN_FLAGS | FopenFlags::FOPEN_DIRECT_IO,
            );
        }
        match k.keep_pages(t, ino) {
            (g, true) => (g, CLUSTER_OPEN_FLAGS | FopenFlags::FOPEN_KEEP_CACHE),
            (g, false) => (g, CLUSTER_OPEN_FLAGS),
        }
    }

    fn empty(r: crate::Result<()>, reply: ReplyEmpty) {
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE_BYTES);
        let _ = config.set_max_readahead(MAX_WRITE_BYTES);
        let _ = config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        let _ = config.add_capabilities(InitFlags::FUSE_BIG_WRITES | InitFlags::FUSE_ASYNC_READ);
        if config
            .add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2)
            .is_ok()
        {
            self.kill_privs
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if self.fs.posix_acl() {
            // The kernel enforces and caches ACLs; DONT_MASK leaves the umask to us, since
            // it must not apply under a default ACL (`Inner::inherit`).
            if let Err(missing) =
                config.add_capabilities(InitFlags::FUSE_POSIX_ACL | InitFlags::FUSE_DONT_MASK)
            {
                tracing::warn!(?missing, "the kernel lacks FUSE_POSIX_ACL: ACLs are not supported on this mount (as with noacl)");
                self.fs.set_posix_acl(false);
            }
        }
        if self.flocks.is_some() {
            // flock(2) comes to us (as SETLK/SETLKW) instead of staying in this kernel.
            // POSIX (fcntl) locks stay node-local: FUSE_POSIX_LOCKS is not asked for.
            if let Err(missing) = config.add_capabilities(InitFlags::FUSE_FLOCK_LOCKS) {
                tracing::warn!(
                    ?missing,
                    "the kernel lacks FUSE_FLOCK_LOCKS: flock(2) is node-local on this mount"
                );
            }
        }
        if self.kcache.is_some() {
            if let Err(missing) = config.add_capabilities(InitFlags::FUSE_AUTO_INVAL_DATA) {
                tracing::warn!(?missing, "the kernel lacks FUSE_AUTO_INVAL_DATA: a file kept open may show stale cached pages after another node writes it");
            }
        }
        Ok(())
    }

    fn destroy(&mut self) {
        if let Err(e) = self.fs.shutdown() {
            tracing::error!(error = %e, "clean shutdown failed; the journal will be replayed at next mount");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.entry(reply, || self.fs.lookup(parent.0, name.as_bytes()));
    }

    fn forget(&self, _req: &Request, _ino: INodeNo, _nlookup: u64) {
        // Inode lifetime follows open handles (open/release), not kernel lookups.
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.attr(reply, || self.fs.getattr(ino.0));
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let s = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(time),
            mtime: mtime.map(time),
            ctime,
        };
        // Under FUSE_HANDLE_KILLPRIV_V2 the kernel leaves killing setuid/setgid/caps to
        // us: on chown always (as chown(2) does even for root), on truncate unless the
        // caller may keep them (CAP_FSETID; fsuid 0 stands in for it).
        let kill = self.kill_privs.load(std::sync::atomic::Ordering::Relaxed)
            && (s.uid.is_some() || s.gid.is_some() || (s.size.is_some() && req.uid() != 0));
        self.attr(reply, || self.fs.setattr_with(ino.0, s, kill));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.entry(reply, || {
            self.fs
                .mknod(ctx(req), parent.0, name.as_bytes(), mode, umask, rdev)
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.entry(reply, || {
            self.fs
                .mkdir(ctx(req), parent.0, name.as_bytes(), mode, umask)
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(self.fs.unlink(parent.0, name.as_bytes()), reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(self.fs.rmdir(parent.0, name.as_bytes()), reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.entry(reply, || {
            self.fs.symlink(
                ctx(req),
                parent.0,
                link_name.as_bytes(),
                target.as_os_str().as_bytes(),
            )
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self.fs.rename(
            parent.0,
            name.as_bytes(),
            newparent.0,
            newname.as_bytes(),
            flags.bits(),
        );
        Self::empty(r, reply);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.entry(reply, || {
            self.fs.link(ino.0, newparent.0, newname.as_bytes())
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let t = self.ticket();
        match self.fs.open(ino.0) {
            Ok(()) => {
                let (_grant, open_flags) = self.open_reply(t, ino.0, flags.0);
                reply.opened(self.new_fh(), open_flags)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.fs.read(ino.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // The kernel sets this flag for a writer without CAP_FSETID (under
        // FUSE_HANDLE_KILLPRIV_V2 only).
        let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        // On a cluster mount the kernel's idea of the end of file may be stale for
        // O_APPEND: another node appended.
        let append = self.kcache.is_some() && flags.0 & libc::O_APPEND != 0;
        let res = self
            .fs
            .write_with(ino.0, (!append).then_some(offset), data, kill);
        match res {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Set only when the file description used flock (FUSE_RELEASE_FLOCK_UNLOCK).
        if let (Some(t), Some(_)) = (&self.flocks, lock_owner) {
            t.release(ino.0, fh.0);
        }
        self.fs.release(ino.0);
        reply.ok();
    }

    fn setlk(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        _start: u64,
        _end: u64,
        typ: i32,
        _pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        // Only flock requests come here: FUSE_POSIX_LOCKS is never negotiated, so the
        // kernel keeps fcntl locks itself.
        let Some(t) = &self.flocks else {
            return reply.error(Errno::ENOSYS);
        };
        t.set(ino.0, fh.0, req.pid(), typ, sleep, move |e| {
            if e == 0 {
                reply.ok()
            } else {
                reply.error(Errno::from_i32(e))
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close() promises nothing about durability; fsync does.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        Self::empty(self.fs.fsync(ino.0), reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = self.fs.readdir_with(fh.0, offset, |e| {
            !reply.add(
                INodeNo(e.ino),
                e.offset,
                kind(e.kind),
                OsStr::from_bytes(&e.name),
            )
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        // One lifetime for name and attributes here: the name's (0 when clustered).
        let ttl = self.ttl;
        let r = self.fs.readdirplus(fh.0, offset, |e, a| {
            !reply.add(
                INodeNo(e.ino),
                e.offset,
                OsStr::from_bytes(&e.name),
                &ttl,
                &fattr(a),
                Generation(a.generation),
            )
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        Self::empty(self.fs.fsync(ino.0), reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.fs.statfs() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bfree, s.files, s.ffree, s.bsize, s.namelen, s.bsize,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        Self::empty(
            self.fs
                .setxattr_as(ctx(req), ino.0, name.as_bytes(), value, flags),
            reply,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let name = name.as_bytes();
        let t = self.ticket();
        let res = self.fs.getxattr(ino.0, name);
        // The kernel may cache an ACL, or its absence, with no lifetime: on a cluster
        // mount only while the glock lets it (see `KernelCache::acl`).
        let _grant = match (&self.kcache, t, &res) {
            (Some(k), Some(t), Ok(_) | Err(FsError::NoXattr)) if crate::acl::is_acl_name(name) => {
                k.acl(t, ino.0)
            }
            _ => Grant::none(),
        };
        match res {
            Ok(v) => xattr_reply(&v, size, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.fs.listxattr(ino.0) {
            Ok(v) => xattr_reply(&v, size, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(self.fs.removexattr(ino.0, name.as_bytes()), reply);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // With default_permissions the kernel checks modes itself; only existence is ours.
        Self::empty(self.fs.getattr(ino.0).map(|_| ()), reply);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        // The new file is open: count it like `open` does, so an unlink keeps it alive.
        let t = self.ticket();
        let res = self
            .fs
            .create_file(ctx(req), parent.0, name.as_bytes(), mode, umask, flags)
            .and_then(|a| self.fs.open(a.ino).map(|()| a));
        match res {
            Ok(a) => {
                // One lifetime for name and attributes here: the name's (0 when clustered).
                let (_grant, open_flags) = self.open_reply(t, a.ino, flags);
                reply.created(
                    &self.ttl,
                    &fattr(&a),
                    Generation(a.generation),
                    self.new_fh(),
                    open_flags,
                )
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // Programs probe files with TCGETS (isatty); answer quietly and at once.
        reply.error(Errno::from_i32(libc::ENOTTY));
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        Self::empty(self.fs.fallocate(ino.0, offset, length, mode), reply);
    }
}

fn xattr_reply(v: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(v.len() as u32);
    } else if v.len() > size as usize {
        reply.error(Errno::from_i32(libc::ERANGE));
    } else {
        reply.data(v);
    }
}
