//! What the kernel may cache on a cluster mount, and when it must forget it.
//!
//! While this node holds the `meta` glock (PR or EX) no other node can change anything,
//! so the kernel may keep attributes and file pages like on a local mount. Before the
//! glock is released every attribute handed out with a lifetime is invalidated
//! (`FUSE_NOTIFY_INVAL_INODE` with a negative offset: attributes only), and a file's
//! cached pages are dropped at its next open unless that open happens in the same grant
//! as the open that last dropped them.
//!
//! Names (directory entries) are cached only where the kernel can forget them all at once
//! without taking a lock: `FUSE_NOTIFY_INC_EPOCH` (Linux 6.16) bumps the connection's
//! epoch and every dentry looked up before it is revalidated by a new lookup. The first
//! lookup reply probes for it; on older kernels names get lifetime 0 (a lookup per path
//! component). Invalidating names one by one (`FUSE_NOTIFY_INVAL_ENTRY`) is not an option:
//! it takes the parent directory's `i_rwsem`, which a local request waiting for this very
//! glock may hold (a create waiting for EX), so the release would deadlock.
//!
//! Why not more:
//! - Pages are not invalidated at release time for the same reason (an in-flight read or
//!   write holds page locks while its handler waits for the glock). Dropping them at the
//!   next open covers new opens; a descriptor kept open across the release revalidates
//!   through `FUSE_AUTO_INVAL_DATA`, whose attribute check the invalidated attributes force.
//!
//! Races: every reply that grants a lifetime carries a `Ticket` taken before the
//! operation ran. The grant holds the read side of `epoch` until the reply is written;
//! `releasing` takes the write side, so it waits for grants being sent, and any operation
//! that started before a release or grant sees a different epoch and gets lifetime 0.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use parking_lot::{Mutex, RwLock, RwLockReadGuard};

use super::glock::CacheObserver;

/// Inodes whose attributes may be cached at once; beyond this, lifetimes are 0 until the
/// next release (bounds the work of a release and the memory).
pub const MAX_TRACKED_INODES: usize = 65_536;

/// Lifetime of cached attributes and names: long, since a release invalidates them anyway.
pub const ATTR_TTL: Duration = Duration::from_secs(3600);

/// `FUSE_NOTIFY_INC_EPOCH` (include/uapi/linux/fuse.h, protocol 7.44).
const FUSE_NOTIFY_INC_EPOCH: i32 = 8;

#[derive(Default)]
struct Epoch {
    /// Bumped at every grant and every release.
    n: u64,
    /// The glock is held: replies may grant lifetimes.
    cacheable: bool,
}

#[derive(Default)]
struct Tracked {
    /// Inodes whose attributes the kernel may hold with a lifetime.
    attrs: HashSet<u64>,
    /// Inode → epoch of the open that last dropped its cached pages.
    pages: HashMap<u64, u64>,
}

/// Taken before an operation; a grant is valid only in the same epoch.
#[derive(Debug, Clone, Copy)]
pub struct Ticket(u64);

/// Sends kernel cache invalidations; the real one wraps `fuser::Notifier`.
pub trait Invalidate: Send + Sync {
    /// Forget the attributes of `ino` (not its pages). `Ok` also when the kernel no
    /// longer knows the inode.
    fn inval_attrs(&self, ino: u64) -> std::io::Result<()>;

    /// Forget every cached name (`FUSE_NOTIFY_INC_EPOCH`); an error if the kernel cannot.
    fn forget_names(&self) -> std::io::Result<()>;
}

/// The real invalidator: fuser's notifier for inodes, and our own write of the
/// notification fuser 0.18 cannot send.
pub struct FuseInvalidate {
    notifier: fuser::Notifier,
    /// A duplicate of the session's `/dev/fuse` descriptor.
    dev: std::fs::File,
}

impl FuseInvalidate {
    pub fn new(notifier: fuser::Notifier, dev: OwnedFd) -> Self {
        Self {
            notifier,
            dev: dev.into(),
        }
    }
}

impl Invalidate for FuseInvalidate {
    fn inval_attrs(&self, ino: u64) -> std::io::Result<()> {
        match self.notifier.inval_inode(fuser::INodeNo(ino), -1, 0) {
            // The kernel has forgotten the inode already.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            r => r,
        }
    }

    fn forget_names(&self) -> std::io::Result<()> {
        // struct fuse_out_header { u32 len; i32 error (the notify code); u64 unique = 0 },
        // no payload. One write is one message.
        let mut msg = [0u8; 16];
        msg[0..4].copy_from_slice(&16u32.to_ne_bytes());
        msg[4..8].copy_from_slice(&FUSE_NOTIFY_INC_EPOCH.to_ne_bytes());
        let n = (&self.dev).write(&msg)?;
        if n != msg.len() {
            return Err(std::io::Error::other(
                "short write of FUSE_NOTIFY_INC_EPOCH",
            ));
        }
        Ok(())
    }
}

#[derive(Default)]
pub struct KernelCache {
    epoch: RwLock<Epoch>,
    tracked: Mutex<Tracked>,
    notifier: Mutex<Option<Box<dyn Invalidate>>>,
    /// Whether the kernel takes `FUSE_NOTIFY_INC_EPOCH`: may names be cached at all.
    names_supported: OnceLock<bool>,
    /// A name was handed out with a lifetime since the last `forget_names`.
    names_granted: AtomicBool,
}

/// Keeps the epoch from changing while a reply that grants a lifetime is written: drop
/// it only after the reply. Empty when nothing was granted (nothing to protect).
pub struct Grant<'a> {
    _epoch: Option<RwLockReadGuard<'a, Epoch>>,
}

impl Grant<'_> {
    pub fn none() -> Self {
        Grant { _epoch: None }
    }
}

impl KernelCache {
    /// Without a notifier nothing is ever granted (invalidation would be impossible);
    /// set it before the glock observer is attached.
    pub fn set_notifier(&self, n: Box<dyn Invalidate>) {
        *self.notifier.lock() = Some(n);
    }

    pub fn ticket(&self) -> Ticket {
        Ticket(self.epoch.read().n)
    }

    /// The epoch, read-locked, if `t` is still current and the glock is held.
    fn valid(&self, t: Ticket) -> Option<RwLockReadGuard<'_, Epoch>> {
        let e = self.epoch.read();
        (e.cacheable && e.n == t.0).then_some(e)
    }

    /// Lifetimes of (attributes, name) for an entry reply about `ino` computed since `t`.
    pub fn entry(&self, t: Ticket, ino: u64) -> (Grant<'_>, Duration, Duration) {
        let (grant, attr_ttl) = self.attrs(t, ino);
        if attr_ttl.is_zero() || !self.names_supported() {
            return (grant, attr_ttl, Duration::ZERO);
        }
        // Set under the grant (the epoch's read side), so the release that follows sees it.
        self.names_granted.store(true, Ordering::SeqCst);
        (grant, attr_ttl, ATTR_TTL)
    }

    /// Whether the kernel can forget all names at once; asks it the first time (a lookup
    /// is being answered, so the connection is initialised). The probe itself only
    /// invalidates names, which is always harmless.
    fn names_supported(&self) -> bool {
        *self.names_supported.get_or_init(|| {
            // Called only under a grant, which needs the notifier: it is set.
            let Some(probe) = self.notifier.lock().as_ref().map(|n| n.forget_names()) else {
                return false;
            };
            probe
                .inspect_err(|e| tracing::info!(error = %e, "kernel lacks FUSE_NOTIFY_INC_EPOCH (Linux 6.16+): names are not cached on this cluster mount"))
                .is_ok()
        })
    }

    /// The attribute lifetime for a reply about `ino` computed since `t`.
    pub fn attrs(&self, t: Ticket, ino: u64) -> (Grant<'_>, Duration) {
        let Some(epoch) = self.valid(t) else {
            return (Grant::none(), Duration::ZERO);
        };
        let mut tr = self.tracked.lock();
        if tr.attrs.len() >= MAX_TRACKED_INODES && !tr.attrs.contains(&ino) {
            return (Grant::none(), Duration::ZERO);
        }
        tr.attrs.insert(ino);
        (
            Grant {
                _epoch: Some(epoch),
            },
            ATTR_TTL,
        )
    }

    /// Answering an ACL getxattr about `ino` since `t`. The kernel caches ACLs with no
    /// lifetime until the inode's attributes are invalidated (`forget_all_cached_acls`),
    /// so the inode is tracked like granted attributes and invalidated at release. When
    /// nothing may be granted, it is invalidated right away: the kernel put a sentinel in
    /// the ACL slot before asking, the invalidation replaces it, and the answer then is
    /// used once but not cached. (Attribute-only invalidation takes no lock the waiting
    /// request could hold, so sending it from the handler cannot deadlock.)
    pub fn acl(&self, t: Ticket, ino: u64) -> Grant<'_> {
        let (grant, ttl) = self.attrs(t, ino);
        if ttl.is_zero() {
            if let Some(n) = self.notifier.lock().as_ref() {
                if let Err(e) = n.inval_attrs(ino) {
                    tracing::warn!(ino, error = %e, "could not keep the kernel from caching an ACL");
                }
            }
        }
        grant
    }

    /// Whether an open of `ino` since `t` may keep the kernel's cached pages
    /// (`FOPEN_KEEP_CACHE`).
    pub fn keep_pages(&self, t: Ticket, ino: u64) -> (Grant<'_>, bool) {
        let Some(epoch) = self.valid(t) else {
            return (Grant::none(), false);
        };
        let n = epoch.n;
        let mut tr = self.tracked.lock();
        let keep = tr.pages.get(&ino) == Some(&n);
        if !keep {
            // This open drops the pages: everything cached from now on is of this grant.
            if tr.pages.len() >= MAX_TRACKED_INODES {
                tr.pages.clear();
            }
            tr.pages.insert(ino, n);
        }
        (
            Grant {
                _epoch: Some(epoch),
            },
            keep,
        )
    }

    /// Inodes whose attributes are currently granted (for tests and status).
    pub fn tracked_inodes(&self) -> usize {
        self.tracked.lock().attrs.len()
    }
}

impl CacheObserver for KernelCache {
    fn cached_inodes(&self) -> usize {
        self.tracked_inodes()
    }

    fn caches_names(&self) -> bool {
        self.names_granted.load(Ordering::Relaxed)
    }

    fn granted(&self) {
        let can_invalidate = self.notifier.lock().is_some();
        let mut e = self.epoch.write();
        e.n += 1;
        e.cacheable = can_invalidate;
    }

    fn releasing(&self) {
        {
            let mut e = self.epoch.write();
            e.n += 1;
            e.cacheable = false;
        }
        // Every grant of the old epoch has been written (we had the write side), and no
        // new one can be made: invalidate them all before the lock goes.
        let inos = std::mem::take(&mut self.tracked.lock().attrs);
        if let Some(n) = self.notifier.lock().as_ref() {
            // After unmount the connection is gone and every call fails: say so once.
            let (mut failed, mut first) = (0usize, None);
            if self.names_granted.swap(false, Ordering::SeqCst) {
                if let Err(e) = n.forget_names() {
                    failed += 1;
                    first.get_or_insert(e);
                }
            }
            for ino in inos {
                if let Err(e) = n.inval_attrs(ino) {
                    failed += 1;
                    first.get_or_insert(e);
                }
            }
            if let Some(e) = first {
                tracing::warn!(failed, error = %e, "kernel cache invalidations failed (expected only once the mount is gone)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Records invalidations; `FORGET_NAMES` stands for a `forget_names` call.
    #[derive(Default)]
    struct Rec(Arc<Mutex<Vec<u64>>>, bool);
    const FORGET_NAMES: u64 = 0;
    impl Invalidate for Rec {
        fn inval_attrs(&self, ino: u64) -> std::io::Result<()> {
            self.0.lock().push(ino);
            Ok(())
        }
        fn forget_names(&self) -> std::io::Result<()> {
            if self.1 {
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            }
            self.0.lock().push(FORGET_NAMES);
            Ok(())
        }
    }

    fn cache() -> (KernelCache, Arc<Mutex<Vec<u64>>>) {
        let k = KernelCache::default();
        let rec = Rec::default();
        let seen = rec.0.clone();
        k.set_notifier(Box::new(rec));
        (k, seen)
    }

    #[test]
    fn nothing_is_granted_before_the_glock_is_held() {
        let (k, _) = cache();
        let t = k.ticket();
        assert_eq!(k.attrs(t, 5).1, Duration::ZERO);
        assert!(!k.keep_pages(t, 5).1);
        assert_eq!(k.tracked_inodes(), 0);
    }

    #[test]
    fn without_a_notifier_nothing_is_granted_even_under_the_glock() {
        let k = KernelCache::default();
        k.granted();
        let t = k.ticket();
        assert_eq!(k.attrs(t, 5).1, Duration::ZERO);
        assert!(!k.keep_pages(t, 5).1);
    }

    #[test]
    fn an_operation_that_straddles_a_grant_or_release_gets_no_lifetime() {
        let (k, seen) = cache();
        let before_grant = k.ticket();
        k.granted();
        assert_eq!(k.attrs(before_grant, 1).1, Duration::ZERO);
        let t = k.ticket();
        assert_eq!(k.attrs(t, 2).1, ATTR_TTL);
        k.releasing();
        assert_eq!(*seen.lock(), [2], "the granted inode is invalidated");
        k.granted();
        // Started in the old grant, answered in the new one: its data may be stale.
        assert_eq!(k.attrs(t, 3).1, Duration::ZERO);
    }

    #[test]
    fn an_acl_is_cached_only_under_the_glock_and_otherwise_forgotten_at_once() {
        let (k, seen) = cache();
        // Before any grant: the answer must not stay in the kernel's ACL cache.
        drop(k.acl(k.ticket(), 7));
        assert_eq!(*seen.lock(), [7], "invalidated right away");
        k.granted();
        let t = k.ticket();
        drop(k.acl(t, 8));
        assert_eq!(*seen.lock(), [7], "held glock: cached");
        assert_eq!(k.tracked_inodes(), 1);
        k.releasing();
        assert_eq!(*seen.lock(), [7, 8], "forgotten before the glock goes");
        k.granted();
        // Straddled the release and the new grant: forgotten at once.
        drop(k.acl(t, 9));
        assert_eq!(*seen.lock(), [7, 8, 9]);
    }

    #[test]
    fn pages_are_kept_only_within_the_grant_that_dropped_them() {
        let (k, _) = cache();
        k.granted();
        let t = k.ticket();
        assert!(!k.keep_pages(t, 9).1, "first open drops the pages");
        assert!(k.keep_pages(t, 9).1, "same grant: keep");
        k.releasing();
        k.granted();
        let t = k.ticket();
        assert!(
            !k.keep_pages(t, 9).1,
            "new grant: another node may have written"
        );
        assert!(k.keep_pages(t, 9).1);
    }

    #[test]
    fn a_release_waits_for_grants_being_written() {
        let (k, seen) = cache();
        let k = Arc::new(k);
        k.granted();
        let g = k.attrs(k.ticket(), 4);
        let k2 = k.clone();
        let rel = std::thread::spawn(move || k2.releasing());
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            seen.lock().is_empty(),
            "released while a grant was being written"
        );
        drop(g);
        rel.join().unwrap();
        assert_eq!(*seen.lock(), [4]);
    }

    #[test]
    fn names_are_cached_under_the_glock_and_all_forgotten_before_it_goes() {
        let (k, seen) = cache();
        let t = k.ticket();
        assert_eq!(k.entry(t, 3).2, Duration::ZERO, "glock not held");
        assert!(seen.lock().is_empty(), "no probe without a grant");
        k.granted();
        let t = k.ticket();
        assert_eq!(k.entry(t, 3).2, ATTR_TTL);
        assert_eq!(*seen.lock(), [FORGET_NAMES], "the first entry probes");
        assert_eq!(k.entry(t, 4).2, ATTR_TTL);
        seen.lock().clear();
        k.releasing();
        let mut s = seen.lock().clone();
        s.sort();
        assert_eq!(s, [FORGET_NAMES, 3, 4]);
        seen.lock().clear();
        k.granted();
        k.releasing();
        assert!(
            seen.lock().is_empty(),
            "no names handed out, nothing to forget"
        );
        k.granted();
        let stale = k.ticket();
        k.releasing();
        k.granted();
        assert_eq!(k.entry(stale, 5).2, Duration::ZERO, "straddles a release");
    }

    #[test]
    fn without_inc_epoch_names_are_never_cached() {
        let k = KernelCache::default();
        let rec = Rec(Arc::default(), true);
        let seen = rec.0.clone();
        k.set_notifier(Box::new(rec));
        k.granted();
        let t = k.ticket();
        let (_g, attr, name) = k.entry(t, 3);
        assert_eq!((attr, name), (ATTR_TTL, Duration::ZERO));
        drop(_g);
        k.releasing();
        assert_eq!(*seen.lock(), [3]);
    }

    #[test]
    fn tracking_is_bounded() {
        let (k, _) = cache();
        k.granted();
        let t = k.ticket();
        for ino in 0..MAX_TRACKED_INODES as u64 {
            assert_eq!(k.attrs(t, ino).1, ATTR_TTL);
        }
        assert_eq!(k.attrs(t, u64::MAX).1, Duration::ZERO);
        assert_eq!(k.attrs(t, 7).1, ATTR_TTL, "already tracked");
        assert_eq!(k.tracked_inodes(), MAX_TRACKED_INODES);
    }
}
