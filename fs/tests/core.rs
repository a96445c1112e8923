//! Kernel-free tests of the filesystem core on an in-memory device.

use std::sync::Arc;

use tandem_fs::format::LockProto;
use tandem_fs::fs::{Ctx, Fs, FsOptions, ROOT_INO};
use tandem_fs::mkfs::{mkfs, MkfsOptions};
use tandem_fs::{BlockDevice, FaultDevice};

const CTX: Ctx = Ctx {
    uid: 0,
    gid: 0,
    pid: 0,
};

/// An in-memory device of `size` bytes with a fresh lock_nolock filesystem of `journals`.
fn formatted(size: u64, journals: u32) -> Arc<FaultDevice> {
    let dev = Arc::new(FaultDevice::new(size));
    let opts = MkfsOptions {
        lock_table: "t:core".into(),
        journals,
        journal_mib: Some(1),
        block_size: 4096,
        lock_proto: LockProto::NoLock,
    };
    mkfs(dev.clone() as Arc<dyn BlockDevice>, &opts).unwrap();
    dev
}

fn fresh(size: u64) -> (Arc<FaultDevice>, Fs) {
    let dev = formatted(size, 1);
    let (fs, _) = Fs::mount(dev.clone(), FsOptions::default()).unwrap();
    (dev, fs)
}

#[test]
fn create_write_read_small_and_large() {
    let (_d, fs) = fresh(64 << 20);
    let a = fs.mknod(CTX, ROOT_INO, b"a", 0o644, 0, 0).unwrap();
    fs.write(a.ino, 0, b"hello\n").unwrap();
    assert_eq!(fs.read(a.ino, 0, 100).unwrap(), b"hello\n");
    fs.commit().unwrap();
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let b = fs.mknod(CTX, ROOT_INO, b"b", 0o644, 0, 0).unwrap();
    for (k, chunk) in big.chunks(65536).enumerate() {
        fs.write(b.ino, (k * 65536) as u64, chunk).unwrap();
    }
    fs.commit().unwrap();
    assert_eq!(fs.read(b.ino, 0, 2_000_000).unwrap(), big);
    fs.write(a.ino, 5000, b"x").unwrap();
    let r = fs.read(a.ino, 0, 10000).unwrap();
    assert_eq!(r.len(), 5001);
    assert_eq!(&r[..6], b"hello\n");
    assert!(r[6..5000].iter().all(|&c| c == 0));
}

#[test]
fn space_is_reusable_after_unlink_of_a_file_that_filled_the_disk() {
    let (_d, fs) = fresh(16 << 20);
    let f = fs.mknod(CTX, ROOT_INO, b"fill", 0o644, 0, 0).unwrap();
    let chunk = vec![1u8; 1 << 20];
    let mut off = 0;
    let err = loop {
        match fs.write(f.ino, off, &chunk) {
            Ok(_) => off += chunk.len() as u64,
            Err(e) => break e,
        }
    };
    assert_eq!(err.errno(), libc::ENOSPC);
    assert_eq!(
        fs.mknod(CTX, ROOT_INO, b"x", 0o644, 0, 0)
            .unwrap_err()
            .errno(),
        libc::ENOSPC
    );
    fs.unlink(ROOT_INO, b"fill").unwrap();
    let g = fs.mknod(CTX, ROOT_INO, b"after", 0o644, 0, 0).unwrap();
    fs.write(g.ino, 0, &chunk).unwrap();
    assert_eq!(
        fs.statfs().unwrap().bfree,
        fs.statfs().unwrap().blocks - 1 - 256 - 1
    );
}

/// FUSE delivers RELEASE after close(2) has returned, so `close; rm; write` can reach the
/// filesystem as `unlink; write; release`. The write must wait for that release to free the
/// unlinked file's space rather than fail with ENOSPC.
#[test]
fn enospc_waits_for_a_late_release_of_an_unlinked_file() {
    let (_d, fs) = fresh(16 << 20);
    let fs = Arc::new(fs);
    let f = fs.mknod(CTX, ROOT_INO, b"fill", 0o644, 0, 0).unwrap();
    let g = fs.mknod(CTX, ROOT_INO, b"after", 0o644, 0, 0).unwrap();
    let h = fs.mknod(CTX, ROOT_INO, b"held", 0o644, 0, 0).unwrap();
    fs.open(f.ino).unwrap();
    let chunk = vec![1u8; 1 << 20];
    let mut off = 0;
    while fs.write(f.ino, off, &chunk).is_ok() {
        off += chunk.len() as u64;
    }
    fs.unlink(ROOT_INO, b"fill").unwrap();
    let releaser = {
        let fs = fs.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            fs.release(f.ino);
        })
    };
    fs.write(g.ino, 0, &chunk).unwrap();
    releaser.join().unwrap();
    // And a file that stays open keeps its space: ENOSPC after the bounded wait.
    fs.open(h.ino).unwrap();
    let mut off = 0;
    while fs.write(h.ino, off, &chunk).is_ok() {
        off += chunk.len() as u64;
    }
    fs.unlink(ROOT_INO, b"held").unwrap();
    let t = std::time::Instant::now();
    assert_eq!(
        fs.write(g.ino, 1 << 20, &chunk).unwrap_err().errno(),
        libc::ENOSPC
    );
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
}

#[test]
fn hashed_directories_split_double_and_chain() {
    // 1 KiB blocks: the hash table tops out at 64 leaves, so 5000 entries also chain.
    let dev = Arc::new(FaultDevice::new(32 << 20));
    let opts = MkfsOptions {
        lock_table: "t:dir".into(),
        journals: 1,
        journal_mib: Some(1),
        block_size: 1024,
        lock_proto: LockProto::NoLock,
    };
    mkfs(dev.clone() as Arc<dyn BlockDevice>, &opts).unwrap();
    let (fs, _) = Fs::mount(dev.clone(), FsOptions::default()).unwrap();
    let d = fs.mkdir(CTX, ROOT_INO, b"d", 0o755, 0).unwrap();
    let n: usize = 5000;
    for i in 0..n {
        fs.mknod(CTX, d.ino, format!("name-{i}").as_bytes(), 0o644, 0, 0)
            .unwrap();
    }
    for i in (0..n).step_by(3) {
        fs.unlink(d.ino, format!("name-{i}").as_bytes()).unwrap();
    }
    for i in 0..n {
        let found = fs.lookup(d.ino, format!("name-{i}").as_bytes()).is_ok();
        assert_eq!(found, i % 3 != 0, "name-{i}");
    }
    let fh = fs.opendir(d.ino).unwrap();
    assert_eq!(fs.readdir(fh, 2).unwrap().len(), n - n.div_ceil(3));
    fs.shutdown().unwrap();
    let mut sink = |_: &str| {};
    let rep =
        tandem_fs::fsck::fsck(dev, tandem_fs::fsck::FsckOptions::default(), &mut sink).unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
}

#[test]
fn appending_to_a_fragmented_file_journals_only_the_changed_leaf() {
    let (_d, fs) = fresh(64 << 20);
    let f = fs.mknod(CTX, ROOT_INO, b"frag", 0o644, 0, 0).unwrap();
    // Every other block: one extent each, far more than fit in the inode.
    for k in 0..1000u64 {
        fs.write(f.ino, k * 8192, &[k as u8; 10]).unwrap();
    }
    fs.commit().unwrap();
    let before = fs.debug_dirty_blocks();
    assert_eq!(before, 0);
    fs.write(f.ino, 1000 * 8192, &[1; 10]).unwrap();
    let dirty = fs.debug_dirty_blocks();
    // Inode, the last leaf, one bitmap block and the group header.
    assert!(dirty <= 5, "{dirty} blocks dirtied by one append");
    for k in (0..1000u64).step_by(97) {
        assert_eq!(fs.read(f.ino, k * 8192, 10).unwrap(), vec![k as u8; 10]);
    }
}

#[test]
fn rename_that_runs_out_of_space_changes_nothing() {
    let (dev, fs) = fresh(16 << 20);
    let d = fs.mkdir(CTX, ROOT_INO, b"d", 0o755, 0).unwrap();
    // Fourteen 255-byte names fill the directory's inline area: one more needs a leaf.
    for i in 0..14u8 {
        fs.mknod(CTX, d.ino, &[b'a' + i; 255], 0o644, 0, 0).unwrap();
    }
    let src = fs.mknod(CTX, ROOT_INO, b"src", 0o644, 0, 0).unwrap();
    fs.write(src.ino, 0, b"payload").unwrap();
    let fill = fs.mknod(CTX, ROOT_INO, b"fill", 0o644, 0, 0).unwrap();
    let chunk = vec![0u8; 1 << 20];
    let mut off = 0;
    while fs.write(fill.ino, off, &chunk).is_ok() {
        off += chunk.len() as u64;
    }
    while fs.write(fill.ino, off, &[0u8; 4096]).is_ok() {
        off += 4096;
    }
    let err = fs
        .rename(ROOT_INO, b"src", d.ino, &[b'z'; 255], 0)
        .unwrap_err();
    assert_eq!(err.errno(), libc::ENOSPC);
    assert_eq!(fs.lookup(ROOT_INO, b"src").unwrap().ino, src.ino);
    assert!(fs.lookup(d.ino, &[b'z'; 255]).is_err());
    // Replacing an existing name needs no space and works on a full filesystem.
    fs.rename(ROOT_INO, b"src", d.ino, &[b'a'; 255], 0).unwrap();
    assert_eq!(
        fs.read(fs.lookup(d.ino, &[b'a'; 255]).unwrap().ino, 0, 100)
            .unwrap(),
        b"payload"
    );
    fs.shutdown().unwrap();
    let mut sink = |_: &str| {};
    let rep =
        tandem_fs::fsck::fsck(dev, tandem_fs::fsck::FsckOptions::default(), &mut sink).unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
}

#[test]
fn directory_growth_that_runs_out_of_space_loses_no_entries() {
    let dev = Arc::new(FaultDevice::new(8 << 20));
    let opts = MkfsOptions {
        lock_table: "t:full".into(),
        journals: 1,
        journal_mib: Some(1),
        block_size: 1024,
        lock_proto: LockProto::NoLock,
    };
    mkfs(dev.clone() as Arc<dyn BlockDevice>, &opts).unwrap();
    let (fs, _) = Fs::mount(dev.clone(), FsOptions::default()).unwrap();
    let d = fs.mkdir(CTX, ROOT_INO, b"d", 0o755, 0).unwrap();
    let fill = fs.mknod(CTX, ROOT_INO, b"fill", 0o644, 0, 0).unwrap();
    let mut off = 0;
    while fs.write(fill.ino, off, &[7u8; 1024]).is_ok() {
        off += 1024;
    }
    // Leave room for a handful of inodes and leaves only.
    fs.setattr(
        fill.ino,
        tandem_fs::fs::SetAttr {
            size: Some(off - 40 * 1024),
            ..Default::default()
        },
    )
    .unwrap();
    fs.commit().unwrap();
    let mut added = Vec::new();
    for i in 0..10_000 {
        let name = format!("entry-with-a-long-name-{i:05}");
        match fs.mknod(CTX, d.ino, name.as_bytes(), 0o644, 0, 0) {
            Ok(_) => added.push(name),
            Err(e) => {
                assert_eq!(e.errno(), libc::ENOSPC, "{e}");
                break;
            }
        }
    }
    assert!(!added.is_empty() && added.len() < 10_000);
    for name in &added {
        fs.lookup(d.ino, name.as_bytes())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    fs.shutdown().unwrap();
    let mut sink = |_: &str| {};
    let rep =
        tandem_fs::fsck::fsck(dev, tandem_fs::fsck::FsckOptions::default(), &mut sink).unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
}

#[test]
fn a_write_that_cannot_store_its_extent_map_gives_its_blocks_back() {
    let dev = Arc::new(FaultDevice::new(8 << 20));
    let opts = MkfsOptions {
        lock_table: "t:leaf".into(),
        journals: 1,
        journal_mib: Some(1),
        block_size: 1024,
        lock_proto: LockProto::NoLock,
    };
    mkfs(dev.clone() as Arc<dyn BlockDevice>, &opts).unwrap();
    let (fs, _) = Fs::mount(dev.clone(), FsOptions::default()).unwrap();
    // 36 separate extents: exactly what fits in a 1 KiB inode.
    let frag = fs.mknod(CTX, ROOT_INO, b"frag", 0o644, 0, 0).unwrap();
    for k in 0..36u64 {
        fs.write(frag.ino, k * 2048, &[k as u8; 1024]).unwrap();
    }
    let fill = fs.mknod(CTX, ROOT_INO, b"fill", 0o644, 0, 0).unwrap();
    let mut off = 0;
    while fs.write(fill.ino, off, &[1u8; 1024]).is_ok() {
        off += 1024;
    }
    fs.setattr(
        fill.ino,
        tandem_fs::fs::SetAttr {
            size: Some(off - 1024),
            ..Default::default()
        },
    )
    .unwrap();
    fs.commit().unwrap();
    fs.commit().unwrap();
    let free = fs.statfs().unwrap().bfree;
    assert_eq!(free, 1);
    // The 37th extent gets its data block but no leaf for the map.
    let err = fs.write(frag.ino, 36 * 2048, &[99u8; 1024]).unwrap_err();
    assert_eq!(err.errno(), libc::ENOSPC);
    assert_eq!(
        fs.statfs().unwrap().bfree,
        1,
        "the data block was given back"
    );
    assert_eq!(fs.getattr(frag.ino).unwrap().size, 35 * 2048 + 1024);
    for k in 0..36u64 {
        assert_eq!(
            fs.read(frag.ino, k * 2048, 1024).unwrap(),
            vec![k as u8; 1024]
        );
    }
    fs.shutdown().unwrap();
    let mut sink = |_: &str| {};
    let rep =
        tandem_fs::fsck::fsck(dev, tandem_fs::fsck::FsckOptions::default(), &mut sink).unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
}

#[test]
fn unlocked_reads_never_see_another_files_data() {
    let (_d, fs) = fresh(32 << 20);
    let fs = Arc::new(fs);
    let a = fs.mknod(CTX, ROOT_INO, b"a", 0o644, 0, 0).unwrap();
    fs.write(a.ino, 0, &vec![0xaa; 256 << 10]).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (fs, stop) = (fs.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut reads = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let data = fs.read(a.ino, 0, 256 << 10).unwrap();
                    assert!(data.iter().all(|&b| b == 0xaa), "read saw foreign bytes");
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    for round in 0..40 {
        // Free A's blocks, let another file grab them, then rebuild A.
        fs.setattr(
            a.ino,
            tandem_fs::fs::SetAttr {
                size: Some(0),
                ..Default::default()
            },
        )
        .unwrap();
        fs.commit().unwrap();
        let b = fs
            .mknod(CTX, ROOT_INO, format!("b{round}").as_bytes(), 0o644, 0, 0)
            .unwrap();
        fs.write(b.ino, 0, &vec![0xbb; 256 << 10]).unwrap();
        fs.unlink(ROOT_INO, format!("b{round}").as_bytes()).unwrap();
        fs.commit().unwrap();
        fs.write(a.ino, 0, &vec![0xaa; 256 << 10]).unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let total: usize = readers.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(total > 0);
}

#[test]
fn create_of_an_existing_name_opens_it_unless_exclusive() {
    // On a cluster mount another node can create the name between the kernel's lookup and
    // our create: O_CREAT without O_EXCL must then open (and O_TRUNC truncate) the file.
    let (_dev, fs) = fresh(8 << 20);
    let a = fs
        .create_file(CTX, ROOT_INO, b"log", 0o644, 0o022, libc::O_WRONLY)
        .unwrap();
    fs.write(a.ino, 0, b"first").unwrap();
    let b = fs
        .create_file(CTX, ROOT_INO, b"log", 0o644, 0o022, libc::O_WRONLY)
        .unwrap();
    assert_eq!((b.ino, b.size), (a.ino, 5));
    let err = fs
        .create_file(
            CTX,
            ROOT_INO,
            b"log",
            0o644,
            0,
            libc::O_WRONLY | libc::O_EXCL,
        )
        .unwrap_err();
    assert_eq!(err.errno(), libc::EEXIST);
    let c = fs
        .create_file(
            CTX,
            ROOT_INO,
            b"log",
            0o644,
            0,
            libc::O_WRONLY | libc::O_TRUNC,
        )
        .unwrap();
    assert_eq!((c.ino, c.size), (a.ino, 0));
    let user = Ctx {
        uid: 1000,
        gid: 1000,
        pid: 0,
    };
    let err = fs
        .create_file(user, ROOT_INO, b"log", 0o644, 0, libc::O_WRONLY)
        .unwrap_err();
    assert_eq!(err.errno(), libc::EACCES);
    // O_TRUNC needs write permission even with O_RDONLY (as the kernel's open checks).
    fs.write(a.ino, 0, b"keep").unwrap();
    let err = fs
        .create_file(
            user,
            ROOT_INO,
            b"log",
            0o644,
            0,
            libc::O_RDONLY | libc::O_TRUNC,
        )
        .unwrap_err();
    assert_eq!(err.errno(), libc::EACCES);
    assert_eq!(fs.getattr(a.ino).unwrap().size, 4, "not truncated");
    fs.create_file(user, ROOT_INO, b"log", 0o644, 0, libc::O_RDONLY)
        .unwrap();
}

/// Forwards to a FaultDevice and records what it is asked: prefetch hints (if it takes
/// them, like an image file), batched reads, single reads.
struct Recording {
    inner: Arc<FaultDevice>,
    takes_hints: bool,
    /// Each `hint_reads` call's ranges.
    hints: parking_lot::Mutex<Vec<Vec<(u64, u64)>>>,
    batched_bytes: std::sync::atomic::AtomicU64,
    single_reads: std::sync::atomic::AtomicU64,
    /// Offsets of every read, single or batched.
    offsets: parking_lot::Mutex<Vec<u64>>,
}

impl Recording {
    fn new(inner: Arc<FaultDevice>, takes_hints: bool) -> Arc<Self> {
        Arc::new(Recording {
            inner,
            takes_hints,
            hints: parking_lot::Mutex::new(Vec::new()),
            batched_bytes: Default::default(),
            single_reads: Default::default(),
            offsets: Default::default(),
        })
    }
}

impl BlockDevice for Recording {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        self.single_reads.fetch_add(1, Relaxed);
        self.offsets.lock().push(offset);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn hint_reads(&self, ranges: &[(u64, u64)]) -> bool {
        self.hints.lock().push(ranges.to_vec());
        self.takes_hints
    }
    fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> std::io::Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        for (off, buf) in reqs.iter_mut() {
            self.batched_bytes.fetch_add(buf.len() as u64, Relaxed);
            self.offsets.lock().push(*off);
            self.inner.read_at(buf, *off)?;
        }
        Ok(())
    }
}

/// 1500 files in a directory, remounted through a `Recording` device (nothing cached, as
/// after a mount), then listed with readdirplus in FUSE-sized batches.
fn list_cold_directory(takes_hints: bool) -> (Arc<Recording>, Vec<u64>) {
    let (dev, fs) = fresh(64 << 20);
    let d = fs.mkdir(CTX, ROOT_INO, b"d", 0o755, 0).unwrap();
    let mut inos = Vec::new();
    for i in 0..1500 {
        let name = format!("entry-{i:05}");
        inos.push(
            fs.mknod(CTX, d.ino, name.as_bytes(), 0o644, 0, 0)
                .unwrap()
                .ino,
        );
    }
    fs.shutdown().unwrap();
    drop(fs);
    let rec = Recording::new(dev, takes_hints);
    let (fs, _) = Fs::mount(rec.clone(), FsOptions::default()).unwrap();
    let fh = fs.opendir(d.ino).unwrap();
    let mut seen = Vec::new();
    let mut offset = 0;
    loop {
        let mut batch = 0;
        fs.readdirplus(fh, offset, |e, a| {
            // A FUSE reply holds a few dozen entries.
            if batch == 24 {
                return false;
            }
            batch += 1;
            offset = e.offset;
            assert_eq!(e.ino, a.ino);
            seen.push(e.ino);
            true
        })
        .unwrap();
        if batch == 0 {
            break;
        }
    }
    assert_eq!(seen.len(), 1502, "every entry listed once");
    (rec, inos)
}

#[test]
fn readdirplus_of_a_cold_directory_hints_the_inode_blocks_ahead() {
    let (rec, inos) = list_cold_directory(true);
    // Every file's inode block was in a batch hint (ino = block address). The loads also
    // hint a 32 KiB read-around each; the batches are the larger calls.
    let calls = rec.hints.lock().clone();
    let batches: Vec<&Vec<(u64, u64)>> = calls
        .iter()
        .filter(|c| c.iter().map(|r| r.1).sum::<u64>() > 8 * 4096)
        .collect();
    let hints: Vec<(u64, u64)> = batches.iter().flat_map(|c| c.iter().copied()).collect();
    let hinted = |ino: u64| {
        hints
            .iter()
            .any(|&(off, len)| off <= ino * 4096 && ino * 4096 < off + len)
    };
    let missed: Vec<u64> = inos.iter().copied().filter(|&i| !hinted(i)).collect();
    assert!(missed.is_empty(), "not prefetched: {missed:?}");
    // In a few batches ahead of the reader, not one per entry.
    assert!(batches.len() <= 4, "{} batch hints", batches.len());
}

#[test]
fn readdirplus_of_a_cold_directory_batches_the_inode_reads_on_a_device_without_hints() {
    use std::sync::atomic::Ordering::Relaxed;
    let (rec, _) = list_cold_directory(false);
    // The inode blocks came in batches (an NBD export keeps them in flight), not as 1500
    // single reads.
    assert!(rec.batched_bytes.load(Relaxed) >= 1500 * 4096);
    let singles = rec.single_reads.load(Relaxed);
    assert!(singles < 300, "{singles} single reads");
}

#[test]
fn acls_follow_chmod_and_default_acls_are_inherited_without_the_umask() {
    use tandem_fs::acl::{self, Acl, Entry};
    use tandem_fs::fs::SetAttr;
    let (_d, fs) = fresh(16 << 20);
    fs.set_posix_acl(true);
    let e = |tag, perm, id| Entry { tag, perm, id };
    let default = Acl::from_entries(vec![
        e(acl::USER_OBJ, 7, acl::UNDEFINED_ID),
        e(acl::USER, 7, 1000),
        e(acl::GROUP_OBJ, 5, acl::UNDEFINED_ID),
        e(acl::MASK, 7, acl::UNDEFINED_ID),
        e(acl::OTHER, 0, acl::UNDEFINED_ID),
    ])
    .unwrap();
    let d = fs.mkdir(CTX, ROOT_INO, b"d", 0o755, 0o022).unwrap();
    let f = fs.mknod(CTX, ROOT_INO, b"f", 0o644, 0o022, 0).unwrap();
    assert!(matches!(
        fs.setxattr(f.ino, acl::DEFAULT, &default.to_bytes(), 0),
        Err(tandem_fs::FsError::Access)
    ));
    fs.setxattr(d.ino, acl::DEFAULT, &default.to_bytes(), 0)
        .unwrap();

    // umask 077 is ignored under a default ACL; the requested mode masks the ACL.
    let c = fs.mknod(CTX, d.ino, b"c", 0o666, 0o077, 0).unwrap();
    assert_eq!(c.perm, 0o660);
    let got = Acl::parse(&fs.getxattr(c.ino, acl::ACCESS).unwrap()).unwrap();
    let perms: Vec<u16> = got.entries().iter().map(|e| e.perm).collect();
    assert_eq!(perms, [6, 7, 5, 6, 0]);
    assert!(matches!(
        fs.getxattr(c.ino, acl::DEFAULT),
        Err(tandem_fs::FsError::NoXattr)
    ));
    let sub = fs.mkdir(CTX, d.ino, b"sub", 0o777, 0o077).unwrap();
    assert_eq!(sub.perm, 0o770);
    assert_eq!(
        fs.getxattr(sub.ino, acl::DEFAULT).unwrap(),
        default.to_bytes()
    );
    let l = fs.symlink(CTX, d.ino, b"l", b"c").unwrap();
    assert!(
        fs.listxattr(l.ino).unwrap().is_empty(),
        "symlinks take no ACL"
    );
    // Without a default ACL the umask applies.
    let plain = fs.mknod(CTX, ROOT_INO, b"plain", 0o666, 0o077, 0).unwrap();
    assert_eq!(plain.perm, 0o600);

    // chmod rewrites owner, mask and other; named entries keep theirs.
    let s = SetAttr {
        mode: Some(0o705),
        ..SetAttr::default()
    };
    fs.setattr(c.ino, s).unwrap();
    let got = Acl::parse(&fs.getxattr(c.ino, acl::ACCESS).unwrap()).unwrap();
    let perms: Vec<u16> = got.entries().iter().map(|e| e.perm).collect();
    assert_eq!(perms, [7, 7, 5, 0, 5]);

    // An ACL equal to a mode is not stored; it sets the mode.
    fs.setxattr(c.ino, acl::ACCESS, &Acl::from_mode(0o751).to_bytes(), 0)
        .unwrap();
    assert_eq!(fs.getattr(c.ino).unwrap().perm, 0o751);
    assert!(matches!(
        fs.getxattr(c.ino, acl::ACCESS),
        Err(tandem_fs::FsError::NoXattr)
    ));
    // Without ACL support the names are not served.
    fs.set_posix_acl(false);
    assert!(matches!(
        fs.getxattr(sub.ino, acl::DEFAULT),
        Err(tandem_fs::FsError::NotSupported(_))
    ));
}

#[test]
fn a_glock_hand_off_flushes_twice_three_times_with_ordered_data_and_not_at_all_with_nothing_new() {
    use tandem_fs::cluster::glock::GlockHooks;
    let (d, fs) = fresh(16 << 20);
    let a = fs.mknod(CTX, ROOT_INO, b"a", 0o644, 0, 0).unwrap();
    fs.write(a.ino, 0, b"x").unwrap();
    let n0 = d.flush_count();
    GlockHooks::flush(&fs).unwrap();
    let n1 = d.flush_count();
    // Inline data is metadata: the log payload and its commit block go out together
    // (one flush), then the home writes (one flush). The journal header is written
    // without a flush of its own (the next commit's flush carries it).
    assert_eq!(n1 - n0, 2);
    GlockHooks::flush(&fs).unwrap();
    assert_eq!(d.flush_count(), n1, "nothing new since: no flush");
    // File data outside the log must be durable before the commit block: one more.
    let big = vec![7u8; 20_000];
    fs.write(a.ino, 0, &big).unwrap();
    GlockHooks::flush(&fs).unwrap();
    let n2 = d.flush_count();
    assert_eq!(n2 - n1, 3);
    // So must the header of the node that held the glock before us, after a grant.
    fs.write(a.ino, 0, b"y").unwrap();
    fs.granted_exclusive();
    GlockHooks::flush(&fs).unwrap();
    assert_eq!(d.flush_count() - n2, 3);
    // What the hand-offs made durable survives a power cut.
    let img = d.crash_image(tandem_fs::block::CrashMode::DropAll, 0);
    let dev2 = Arc::new(FaultDevice::from_image(img));
    let (fs2, _) = Fs::mount(dev2, FsOptions::default()).unwrap();
    let got = fs2.lookup(ROOT_INO, b"a").unwrap();
    let mut want = big.clone();
    want[0] = b'y';
    assert_eq!(fs2.read(got.ino, 0, 30_000).unwrap(), want);
}

/// Two mounts of one device with the glock hand-off played by hand (flush on the giver,
/// invalidate on the taker): the taker re-reads the group headers only when it needs
/// their counters, so a grant used only to read a file costs no header reads, and its
/// statfs and allocations after a hand-off account for the other node's changes.
#[test]
fn after_a_hand_off_group_headers_are_read_only_when_needed_and_are_current() {
    use tandem_fs::cluster::glock::GlockHooks;
    let dev = formatted(64 << 20, 2);
    let sb = tandem_fs::store::read_superblock(&*dev).unwrap();
    assert!(sb.rg_count >= 4);
    let headers: Vec<u64> = (0..sb.rg_count)
        .map(|i| sb.rg_range(i).0 * u64::from(sb.block_size))
        .collect();
    let rec = Recording::new(dev.clone(), false);
    let (a, _) = Fs::mount(dev.clone(), FsOptions::default()).unwrap();
    let (b, _) = Fs::mount(
        rec.clone(),
        FsOptions {
            journal: 1,
            ..FsOptions::default()
        },
    )
    .unwrap();
    let ones = vec![1u8; 100_000];
    let f = a.mknod(CTX, ROOT_INO, b"f", 0o644, 0, 0).unwrap();
    a.write(f.ino, 0, &ones).unwrap();
    GlockHooks::flush(&a).unwrap();
    rec.offsets.lock().clear();
    GlockHooks::invalidate(&b);
    let got = b.lookup(ROOT_INO, b"f").unwrap();
    assert_eq!(b.read(got.ino, 0, 200_000).unwrap(), ones);
    let read: Vec<u64> = rec.offsets.lock().clone();
    assert!(!read.is_empty(), "the taker re-read the file");
    assert!(
        read.iter().all(|o| !headers.contains(o)),
        "a grant used to read a file read group headers: {read:?} ({headers:?})"
    );
    // Counters: current as soon as they are needed (an allocation first, then statfs).
    let twos = vec![2u8; 100_000];
    let g = b.mknod(CTX, ROOT_INO, b"g", 0o644, 0, 0).unwrap();
    b.write(g.ino, 0, &twos).unwrap();
    GlockHooks::flush(&b).unwrap();
    GlockHooks::invalidate(&a);
    assert_eq!(a.statfs().unwrap().bfree, b.statfs().unwrap().bfree);
    assert_eq!(
        a.read(f.ino, 0, 200_000).unwrap(),
        ones,
        "b allocated over a's file"
    );
    let g2 = a.lookup(ROOT_INO, b"g").unwrap();
    assert_eq!(a.read(g2.ino, 0, 200_000).unwrap(), twos);
    a.shutdown().unwrap();
    b.shutdown().unwrap();
    drop((a, b));
    let mut sink = |_: &str| {};
    let rep =
        tandem_fs::fsck::fsck(dev, tandem_fs::fsck::FsckOptions::default(), &mut sink).unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
}

/// Creates files named `{prefix}{i}` until the running transaction shrinks (a commit
/// ran) or `max` files exist; returns the largest dirty count seen and whether it shrank.
fn create_until_a_commit(fs: &Fs, prefix: &str, max: usize) -> (usize, bool) {
    let mut peak = fs.debug_dirty_blocks();
    for i in 0..max {
        fs.mknod(
            CTX,
            ROOT_INO,
            format!("{prefix}{i}").as_bytes(),
            0o644,
            0,
            0,
        )
        .unwrap();
        let d = fs.debug_dirty_blocks();
        if d < peak {
            return (peak, true);
        }
        peak = d;
    }
    (peak, false)
}

#[test]
fn a_big_running_transaction_wakes_the_background_committer_instead_of_stalling_an_operation() {
    // No committer (embedded use): the operation that crosses half the journal's
    // transaction limit commits by itself.
    let (_d, alone) = fresh(64 << 20);
    let (alone_peak, committed) = create_until_a_commit(&alone, "f", 1000);
    assert!(committed, "never committed by itself");

    // With a committer waiting, operations only wake it: the transaction grows past that
    // point without any operation committing, and a kick is pending.
    let (_d, fs) = fresh(64 << 20);
    assert!(
        !fs.wait_for_commit_kick(std::time::Duration::ZERO),
        "nothing asked yet"
    );
    for i in 0..alone_peak {
        fs.mknod(CTX, ROOT_INO, format!("g{i}").as_bytes(), 0o644, 0, 0)
            .unwrap();
        if fs.debug_dirty_blocks() > alone_peak + 8 {
            break;
        }
    }
    let grown = fs.debug_dirty_blocks();
    assert!(
        grown > alone_peak,
        "an operation committed by itself ({grown} <= {alone_peak} dirty blocks)"
    );
    assert!(
        fs.wait_for_commit_kick(std::time::Duration::ZERO),
        "the committer was not woken"
    );
    // Nor does an operation that changes nothing commit the big transaction.
    fs.lookup(ROOT_INO, b"g0").unwrap();
    assert_eq!(fs.debug_dirty_blocks(), grown, "a lookup committed");
    // A committer that falls behind still cannot let the transaction outgrow the journal:
    // at three quarters an operation commits first.
    let (peak, committed) = create_until_a_commit(&fs, "h", 1000);
    assert!(committed, "the transaction grew to {peak} blocks unbounded");
    assert!(peak > grown);
    // What the committer does when woken.
    fs.commit().unwrap();
    assert_eq!(fs.debug_dirty_blocks(), 0);
}
