//! Whole-image filesystem fuzzing: small populated images built once per process through
//! the public `tandem_fs` API, byte patches from the fuzz input, then fsck, journal replay,
//! mount and a read-only walk that cross-checks what fsck promised.
//!
//! The images are deterministic (fixed UUID, fixed timestamps), so an input that forges a
//! checksum in one process forges it in every process and corpus files stay meaningful.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, OnceLock};

use tandem_fs::format::{self, BlockType, LockProto, Superblock};
use tandem_fs::fs::{Ctx, FileKind, Fs, FsOptions, SetAttr, ROOT_INO};
use tandem_fs::fsck::{fsck, FsckOptions, FsckReport};
use tandem_fs::inode::{Inode, Time};
use tandem_fs::journal::{Journal, JournalHeader, LoggedBlocks};
use tandem_fs::mkfs::{mkfs, MkfsOptions};
use tandem_fs::{BlockDevice, FaultDevice, FsError};

/// Block size of the fuzzed images: the smallest, so images are small and fast to copy.
pub const BS: usize = 1024;
const CTX: Ctx = Ctx {
    uid: 0,
    gid: 0,
    pid: 0,
};
const FIXED_UUID: [u8; 16] = *b"tandem-fuzz-img!";
const FIXED_TIME: Time = Time {
    secs: 1_700_000_000,
    nsecs: 0,
};
/// How much of a file the walk reads from its start (the rest: its last 4 KiB).
const READ_HEAD: u64 = 64 << 10;

fn new_fs(size: u64, journals: u32) -> (Arc<FaultDevice>, Fs) {
    let dev = Arc::new(FaultDevice::new(size));
    let opts = MkfsOptions {
        lock_table: "fuzz:img".into(),
        journals,
        journal_mib: None,
        block_size: BS as u32,
        lock_proto: LockProto::NoLock,
    };
    mkfs(dev.clone() as Arc<dyn BlockDevice>, &opts).expect("mkfs of the fuzz image");
    let (fs, _) = Fs::mount(dev.clone(), FsOptions::default()).expect("mount of a fresh image");
    (dev, fs)
}

fn block(img: &[u8], b: u64) -> &[u8] {
    &img[b as usize * BS..(b as usize + 1) * BS]
}

fn block_mut(img: &mut [u8], b: u64) -> &mut [u8] {
    &mut img[b as usize * BS..(b as usize + 1) * BS]
}

/// The superblock of a (valid) image.
pub fn superblock(img: &[u8]) -> Superblock {
    Superblock::decode(&img[..4096]).expect("valid superblock")
}

/// A valid metadata block of any type at its home address.
fn is_metadata(b: &[u8], home: u64) -> bool {
    format::peek_type(b)
        .and_then(BlockType::from_u16)
        .is_some_and(|t| format::check(b, t, home).is_ok())
}

/// Fixed timestamps in an inode block image (resealed); other blocks are left alone.
fn normalize_block(b: &mut [u8], home: u64) {
    if format::peek_type(b) != Some(BlockType::Inode as u16) || !is_metadata(b, home) {
        return;
    }
    let Ok(mut ino) = Inode::decode(b, home) else {
        return;
    };
    ino.atime = FIXED_TIME;
    ino.mtime = FIXED_TIME;
    ino.ctime = FIXED_TIME;
    ino.crtime = FIXED_TIME;
    ino.encode_into(b);
    format::seal(b);
}

/// Makes a cleanly unmounted image deterministic: fixed UUID and creation time, fixed inode
/// timestamps, journal headers re-encoded with the new UUID, stale log blocks zeroed.
fn normalize_clean_image(img: &mut [u8]) -> Superblock {
    let old = superblock(img);
    let mut sb = old.clone();
    sb.uuid = FIXED_UUID;
    sb.created_secs = 0;
    img[..BS].copy_from_slice(&sb.encode(BS));
    for j in 0..sb.journal_count {
        let (start, len) = sb.journal_range(j);
        let h = JournalHeader::decode(block(img, start), start, &old.uuid)
            .expect("journal header of a fresh image");
        assert!(
            h.clean,
            "normalize_clean_image needs a cleanly unmounted image"
        );
        block_mut(img, start).copy_from_slice(&h.encode(BS, start, &sb.uuid));
        for b in start + 1..start + len {
            block_mut(img, b).fill(0);
        }
    }
    for b in sb.rg_start..sb.block_count {
        normalize_block(block_mut(img, b), b);
    }
    sb
}

fn check_only(img: Vec<u8>) -> tandem_fs::Result<FsckReport> {
    let mut sink = |_: &str| {};
    fsck(
        Arc::new(FaultDevice::from_image(img)),
        FsckOptions { repair: false },
        &mut sink,
    )
}

/// How a fuzz input selects the block a patch lands in.
pub trait BlockPicker {
    fn pick(&self, selector: u16) -> u64;
}

/// Applies the patches in `data` to `img`; returns the blocks touched. Each patch is
/// `selector: u16 LE, offset: u16 LE, ctl: u8, bytes[ctl & 0x7f]`: the bytes overwrite the
/// block `picker` chooses from `selector`, starting at `offset % BS` (clipped at the block's
/// end). With `ctl & 0x80` the block's checksum is recomputed afterwards, so the patch
/// reaches the code behind the checksum test.
pub fn apply_patches(img: &mut [u8], data: &[u8], picker: &dyn BlockPicker) -> BTreeSet<u64> {
    let mut touched = BTreeSet::new();
    let mut at = 0;
    while at + 5 <= data.len() {
        let sel = u16::from_le_bytes([data[at], data[at + 1]]);
        let off = usize::from(u16::from_le_bytes([data[at + 2], data[at + 3]])) % BS;
        let ctl = data[at + 4];
        at += 5;
        let len = usize::from(ctl & 0x7f).min(data.len() - at);
        let bytes = &data[at..at + len];
        at += len;
        let blk = picker.pick(sel);
        let b = block_mut(img, blk);
        let n = len.min(BS - off);
        b[off..off + n].copy_from_slice(&bytes[..n]);
        if ctl & 0x80 != 0 {
            format::seal(b);
        }
        touched.insert(blk);
    }
    touched
}

/// Encodes one patch in the format `apply_patches` reads (for seed corpora).
pub fn encode_patch(selector: u16, offset: u16, reseal: bool, bytes: &[u8]) -> Vec<u8> {
    assert!(bytes.len() < 128);
    let mut v = selector.to_le_bytes().to_vec();
    v.extend_from_slice(&offset.to_le_bytes());
    v.push(bytes.len() as u8 | if reseal { 0x80 } else { 0 });
    v.extend_from_slice(bytes);
    v
}

// ---------------------------------------------------------------------------------------
// fs_image_fsck

/// A clean, populated image and its metadata blocks.
pub struct FsckBase {
    pub image: Vec<u8>,
    /// Every valid metadata block (superblock first), in block order.
    pub meta: Vec<u64>,
    pub blocks: u64,
}

impl BlockPicker for FsckBase {
    /// High bit clear: the `selector`-th metadata block (mod their count); set: any block.
    fn pick(&self, selector: u16) -> u64 {
        if selector & 0x8000 == 0 {
            self.meta[usize::from(selector) % self.meta.len()]
        } else {
            u64::from(selector & 0x7fff) % self.blocks
        }
    }
}

/// Uses every metadata structure: inline, extent and indirect-extent files, a sparse file,
/// a hashed directory with several leaves, nested directories, symlinks (inline and
/// extent), a hard link, a FIFO and an xattr block. Two journals (the second unused).
fn populate(fs: &Fs) -> tandem_fs::Result<()> {
    let d = fs.mkdir(CTX, ROOT_INO, b"dir", 0o755, 0)?;
    for i in 0..90 {
        let f = fs.mknod(CTX, d.ino, format!("f{i:03}").as_bytes(), 0o644, 0, 0)?;
        fs.write(f.ino, 0, format!("content {i}").as_bytes())?;
    }
    let small = fs.mknod(CTX, ROOT_INO, b"small", 0o644, 0, 0)?;
    fs.write(small.ino, 0, b"hello\n")?;
    let frag = fs.mknod(CTX, ROOT_INO, b"fragmented", 0o644, 0, 0)?;
    for k in 0..50u64 {
        fs.write(frag.ino, k * 2 * BS as u64, &[k as u8; 100])?;
    }
    let big = fs.mknod(CTX, ROOT_INO, b"big", 0o600, 0, 0)?;
    let pattern: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    fs.write(big.ino, 0, &pattern)?;
    fs.setxattr(big.ino, b"user.a", b"value", 0)?;
    fs.setxattr(big.ino, b"user.longer-name", &[9u8; 300], 0)?;
    let sparse = fs.mknod(CTX, ROOT_INO, b"sparse", 0o644, 0, 0)?;
    fs.write(sparse.ino, 100_000, b"end")?;
    fs.symlink(CTX, ROOT_INO, b"link", b"big")?;
    fs.symlink(CTX, d.ino, b"longlink", &[b'x'; 1000])?;
    fs.link(big.ino, d.ino, b"hardlink")?;
    let sub = fs.mkdir(CTX, d.ino, b"sub", 0o755, 0)?;
    fs.mknod(CTX, sub.ino, b"leaf", 0o600, 0, 0)?;
    fs.mknod(CTX, sub.ino, b"fifo", 0o010644, 0, 0)?;
    fs.mkdir(CTX, ROOT_INO, b"empty", 0o700, 0)?;
    fs.setattr(
        small.ino,
        SetAttr {
            uid: Some(1000),
            gid: Some(100),
            ..Default::default()
        },
    )?;
    Ok(())
}

/// Builds the `fs_image_fsck` base image (use `fsck_base` for the cached one).
pub fn build_fsck_base() -> FsckBase {
    let (dev, fs) = new_fs(1536 << 10, 2);
    populate(&fs).expect("populate the fuzz image");
    fs.shutdown().expect("clean unmount");
    drop(fs);
    let mut image = dev.image();
    let sb = normalize_clean_image(&mut image);
    let blocks = sb.block_count;
    let meta: Vec<u64> = (0..blocks)
        .filter(|&b| {
            b == 0
                || format::peek_type(block(&image, b))
                    .and_then(BlockType::from_u16)
                    .is_some_and(|t| format::check(block(&image, b), t, b).is_ok())
        })
        .collect();
    let report = check_only(image.clone()).expect("fsck of the pristine fuzz image");
    assert!(
        report.problems.is_empty(),
        "pristine fuzz image is not clean: {:?}",
        report.problems
    );
    FsckBase {
        image,
        meta,
        blocks,
    }
}

/// The `fs_image_fsck` base image, built once per process.
pub fn fsck_base() -> &'static FsckBase {
    static BASE: OnceLock<FsckBase> = OnceLock::new();
    BASE.get_or_init(build_fsck_base)
}

/// A check that failed: `tag` names the class of finding (see `known`).
#[derive(Debug)]
pub struct Finding {
    pub tag: &'static str,
    pub what: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}] {}", self.tag, self.what)
    }
}

fn finding(tag: &'static str) -> impl Fn(String) -> Finding {
    move |what| Finding { tag, what }
}

/// Whether findings of class `tag` are already reported and should not stop a fuzzing run:
/// `TANDEM_FUZZ_KNOWN=tag1,tag2` (fuzz runs only; the stable corpus replay never sets it,
/// so a committed reproducer keeps failing until the bug is fixed).
pub fn known(tag: &str) -> bool {
    static KNOWN: OnceLock<Vec<String>> = OnceLock::new();
    KNOWN
        .get_or_init(|| {
            std::env::var("TANDEM_FUZZ_KNOWN")
                .unwrap_or_default()
                .split(',')
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .collect()
        })
        .iter()
        .any(|t| t == tag)
}

/// Read-only mount options that also accept a `lock_tandem` superblock (as fsck does).
fn ro_opts() -> FsOptions {
    FsOptions {
        journal: 0,
        read_only: true,
        relatime: false,
        allow_cluster_fs_without_locking: true,
        posix_acl: true,
    }
}

/// Patch, fsck -n; if clean, mount read-only and walk everything: the walk must find
/// nothing fsck missed.
pub fn image_fsck(data: &[u8]) {
    let base = fsck_base();
    let mut img = base.image.clone();
    apply_patches(&mut img, data, base);
    if known("sb-block-count-overflow") {
        // Reported: `read_superblock` multiplies block_count by block_size unchecked.
        if let Ok(sb) = Superblock::decode(&img[..4096]) {
            if sb
                .block_count
                .checked_mul(u64::from(sb.block_size))
                .is_none()
            {
                return;
            }
        }
    }
    let dev = Arc::new(FaultDevice::from_image(img));
    let mut sink = |_: &str| {};
    let Ok(report) = fsck(dev.clone(), FsckOptions { repair: false }, &mut sink) else {
        return;
    };
    if !report.problems.is_empty() {
        return;
    }
    let fs = match Fs::mount(dev, ro_opts()) {
        Ok((fs, _)) => fs,
        // fsck -n leaves a dirty journal alone (it says so), and a read-only mount refuses.
        Err(FsError::NeedsRecovery(_)) => return,
        Err(e) => panic!("fsck -n reported the image clean, but mount failed: {e}"),
    };
    if let Err(e) = walk(&fs) {
        if !known(e.tag) {
            panic!("fsck -n reported the image clean, but the walk found: {e}");
        }
    }
}

/// Reads everything reachable from the root through the POSIX-level API and checks it
/// against what fsck verifies: every listed name looks up to the listed inode with the
/// listed type, "." and ".." are right, link counts match the names found, directories are
/// reached once, reads return exactly the bytes the size promises, xattrs listed can be
/// read, statfs adds up. Returns the first inconsistency.
pub fn walk(fs: &Fs) -> Result<(), Finding> {
    let bad = finding("walk");
    let mut names: BTreeMap<u64, u32> = BTreeMap::new();
    let mut dirs_seen = HashSet::from([ROOT_INO]);
    let mut stack = vec![(ROOT_INO, ROOT_INO)];
    while let Some((dir, parent)) = stack.pop() {
        let fh = fs
            .opendir(dir)
            .map_err(|e| bad(format!("opendir {dir}: {e}")))?;
        let ents = fs.readdir(fh, 0);
        fs.releasedir(fh);
        let ents = ents.map_err(|e| bad(format!("readdir {dir}: {e}")))?;
        let mut subdirs = 0u32;
        for e in ents {
            let shown = String::from_utf8_lossy(&e.name).into_owned();
            if e.name == b"." || e.name == b".." {
                let want = if e.name == b"." { dir } else { parent };
                if e.ino != want {
                    return Err(bad(format!("{shown:?} in {dir} is {} not {want}", e.ino)));
                }
                continue;
            }
            let a = fs
                .lookup(dir, &e.name)
                .map_err(|err| bad(format!("lookup {shown:?} in {dir}: {err}")))?;
            if a.ino != e.ino || a.kind != e.kind {
                return Err(bad(format!(
                    "{shown:?} in {dir}: readdir says {} {:?}, lookup says {} {:?}",
                    e.ino, e.kind, a.ino, a.kind
                )));
            }
            let g = fs
                .getattr(a.ino)
                .map_err(|err| bad(format!("getattr {}: {err}", a.ino)))?;
            if g != a {
                return Err(bad(format!("lookup and getattr of {} disagree", a.ino)));
            }
            if a.kind == FileKind::Dir {
                subdirs += 1;
                if !dirs_seen.insert(a.ino) {
                    return Err(bad(format!("directory {} reached twice", a.ino)));
                }
                stack.push((a.ino, dir));
            } else {
                let n = names.entry(a.ino).or_default();
                *n += 1;
                if *n == 1 {
                    read_file(fs, &a)?;
                }
            }
            let list = fs
                .listxattr(a.ino)
                .map_err(|err| bad(format!("listxattr {}: {err}", a.ino)))?;
            for name in list.split(|&c| c == 0).filter(|n| !n.is_empty()) {
                fs.getxattr(a.ino, name).map_err(|err| Finding {
                    tag: "xattr-name",
                    what: format!(
                        "listxattr of {} lists {:?}, getxattr of it fails: {err}",
                        a.ino,
                        String::from_utf8_lossy(name)
                    ),
                })?;
            }
        }
        let d = fs
            .getattr(dir)
            .map_err(|err| bad(format!("getattr {dir}: {err}")))?;
        if d.nlink != 2 + subdirs {
            return Err(bad(format!(
                "directory {dir} has link count {} but {subdirs} subdirectories",
                d.nlink
            )));
        }
    }
    for (ino, n) in names {
        let a = fs
            .getattr(ino)
            .map_err(|err| bad(format!("getattr {ino}: {err}")))?;
        if a.nlink != n {
            return Err(bad(format!(
                "inode {ino} has link count {} but {n} names",
                a.nlink
            )));
        }
    }
    let s = fs.statfs().map_err(|e| bad(format!("statfs: {e}")))?;
    if s.bfree > s.blocks {
        return Err(bad(format!(
            "statfs: {} free of {} blocks",
            s.bfree, s.blocks
        )));
    }
    Ok(())
}

fn read_file(fs: &Fs, a: &tandem_fs::fs::Attr) -> Result<(), Finding> {
    let bad = finding("read");
    let head = a.size.min(READ_HEAD);
    let got = fs
        .read(a.ino, 0, head as u32)
        .map_err(|e| bad(format!("read {} at 0: {e}", a.ino)))?;
    if got.len() as u64 != head {
        return Err(bad(format!(
            "read {} at 0 returned {} bytes of {head} (size {})",
            a.ino,
            got.len(),
            a.size
        )));
    }
    if a.size > head {
        let off = a.size - 4096.min(a.size - head);
        let want = a.size - off;
        let got = fs
            .read(a.ino, off, want as u32)
            .map_err(|e| bad(format!("read {} at {off}: {e}", a.ino)))?;
        if got.len() as u64 != want {
            return Err(bad(format!(
                "read {} at {off} returned {} bytes of {want}",
                a.ino,
                got.len()
            )));
        }
    }
    if a.kind == FileKind::Symlink {
        let t = fs
            .readlink(a.ino)
            .map_err(|e| bad(format!("readlink {}: {e}", a.ino)))?;
        if t.len() as u64 != a.size {
            return Err(bad(format!(
                "readlink {} returned {} bytes, size is {}",
                a.ino,
                t.len(),
                a.size
            )));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// fs_journal_replay

/// One committed transaction in the base image's journal.
#[derive(Debug, Clone)]
pub struct TxLayout {
    /// Log position (monotonic; block = journal start + 1 + pos % log length).
    pub pos: u64,
    /// Log blocks it occupies: descriptor(s), images, commit.
    pub used: u64,
    /// Its block images with their home addresses.
    pub blocks: LoggedBlocks,
}

/// An image whose journal holds committed transactions none of which reached their home
/// blocks (home area = the state before the first), with the state after each prefix.
pub struct JournalBase {
    pub image: Vec<u8>,
    pub sb: Superblock,
    pub journal_start: u64,
    pub journal_blocks: u64,
    pub log_len: u64,
    /// Header seq/tail: where replay starts.
    pub tail: u64,
    pub seq: u64,
    pub txs: Vec<TxLayout>,
    /// `expected[m]`: the whole image after replaying exactly the first `m` transactions,
    /// outside the journal area (which replay itself rewrites).
    pub expected: Vec<Vec<u8>>,
}

impl JournalBase {
    fn in_journal(&self, b: u64) -> bool {
        (self.journal_start..self.journal_start + self.journal_blocks).contains(&b)
    }

    /// Log blocks in use by the transactions, plus a little slack after them.
    fn span(&self) -> u64 {
        self.txs.iter().map(|t| t.used).sum::<u64>() + 3
    }

    /// Index of the transaction occupying journal block `b`, if any.
    fn tx_of(&self, b: u64) -> Option<usize> {
        let rel = b.checked_sub(self.journal_start + 1)?;
        self.txs
            .iter()
            .position(|t| (0..t.used).any(|k| (t.pos + k) % self.log_len == rel % self.log_len))
    }

    fn first_diff_outside_journal(&self, got: &[u8], want: &[u8]) -> Option<u64> {
        (0..self.sb.block_count)
            .filter(|&b| !self.in_journal(b))
            .find(|&b| block(got, b) != block(want, b))
    }
}

impl BlockPicker for JournalBase {
    /// High bit clear: 0 = the journal header, i = the log block at tail + i - 1 (over the
    /// transactions and a little past them); set: any block of the journal.
    fn pick(&self, selector: u16) -> u64 {
        if selector & 0x8000 == 0 {
            let i = u64::from(selector) % (self.span() + 1);
            if i == 0 {
                self.journal_start
            } else {
                self.journal_start + 1 + (self.tail + i - 1) % self.log_len
            }
        } else {
            self.journal_start + u64::from(selector & 0x7fff) % self.journal_blocks
        }
    }
}

fn lookup_path(fs: &Fs, path: &[&[u8]]) -> tandem_fs::Result<u64> {
    let mut ino = ROOT_INO;
    for p in path {
        ino = fs.lookup(ino, p)?.ino;
    }
    Ok(ino)
}

/// The workload: each step is one transaction (committed by the caller).
fn journal_step(fs: &Fs, k: usize) -> tandem_fs::Result<()> {
    let d = lookup_path(fs, &[b"d"])?;
    match k {
        0 => {
            let a = fs.mknod(CTX, d, b"a", 0o644, 0, 0)?;
            fs.write(a.ino, 0, b"alpha")?;
        }
        1 => {
            let e = fs.mkdir(CTX, d, b"e", 0o755, 0)?;
            let b = fs.mknod(CTX, e.ino, b"b", 0o644, 0, 0)?;
            fs.write(b.ino, 0, &[0x5a; 3000])?;
        }
        2 => {
            let e = lookup_path(fs, &[b"d", b"e"])?;
            fs.rename(d, b"a", e, b"a2", 0)?;
            let b = lookup_path(fs, &[b"d", b"e", b"b"])?;
            fs.setxattr(b, b"user.x", &[7; 100], 0)?;
        }
        3 => {
            fs.unlink(d, b"old1")?;
            fs.symlink(CTX, d, b"l", b"e/a2")?;
        }
        4 => {
            let b = lookup_path(fs, &[b"d", b"e", b"b"])?;
            fs.setattr(
                b,
                SetAttr {
                    size: Some(1024),
                    ..Default::default()
                },
            )?;
            fs.link(b, ROOT_INO, b"hl")?;
        }
        _ => {
            let old = lookup_path(fs, &[b"d", b"old2"])?;
            fs.write(old, 2048, &[0x33; 2048])?;
            fs.rmdir(d, b"gone")?;
            for i in 0..30 {
                fs.mknod(CTX, d, format!("n{i:02}").as_bytes(), 0o644, 0, 0)?;
            }
        }
    }
    Ok(())
}

const JOURNAL_STEPS: usize = 6;

/// Builds the `fs_journal_replay` base image (use `journal_base` for the cached one).
pub fn build_journal_base() -> JournalBase {
    // A populated, cleanly unmounted image (made deterministic).
    let (dev, fs) = new_fs(1 << 20, 1);
    (|| -> tandem_fs::Result<()> {
        let d = fs.mkdir(CTX, ROOT_INO, b"d", 0o755, 0)?;
        for name in [&b"old1"[..], b"old2"] {
            let f = fs.mknod(CTX, d.ino, name, 0o644, 0, 0)?;
            fs.write(f.ino, 0, &[0x11; 2000])?;
        }
        fs.mkdir(CTX, d.ino, b"gone", 0o755, 0)?;
        fs.shutdown()
    })()
    .expect("populate the journal fuzz image");
    drop(fs);
    let clean = dev.image();
    // Run the workload on a copy, recording what each transaction changed in the home area:
    // metadata blocks (logged) and data blocks (written in place before the commit).
    let work = Arc::new(FaultDevice::from_image(clean.clone()));
    let (fs, _) = Fs::mount(work.clone(), FsOptions::default()).expect("remount");
    let sb0 = superblock(&clean);
    let mut prev = work.image();
    let mut steps: Vec<(LoggedBlocks, LoggedBlocks)> = Vec::new();
    for k in 0..JOURNAL_STEPS {
        journal_step(&fs, k).expect("journal workload step");
        fs.commit().expect("commit");
        let cur = work.image();
        let (mut meta, mut data) = (Vec::new(), Vec::new());
        for b in sb0.rg_start..sb0.block_count {
            if block(&prev, b) != block(&cur, b) {
                let img = block(&cur, b).to_vec();
                if is_metadata(&img, b) {
                    meta.push((b, img));
                } else {
                    data.push((b, img));
                }
            }
        }
        assert!(!meta.is_empty(), "workload step {k} changed no metadata");
        steps.push((meta, data));
        prev = cur;
    }
    drop(fs);

    // Rebuild deterministically: the normalized clean image, its journal opened (dirty),
    // each step's data written home and its (normalized) metadata committed to the log.
    let mut base = clean;
    let sb = normalize_clean_image(&mut base);
    let (jstart, jblocks) = sb.journal_range(0);
    let hdr = Journal::read_header(&FaultDevice::from_image(base.clone()), &sb, 0)
        .expect("journal header");
    let logdev = FaultDevice::from_image(base.clone());
    let (mut j, _) = Journal::open(&logdev, &sb, 0, false).expect("open the journal");
    for (meta, data) in &mut steps {
        for (b, img) in data.iter() {
            block_mut(&mut base, *b).copy_from_slice(img);
        }
        for (b, img) in meta.iter_mut() {
            normalize_block(img, *b);
        }
        j.commit(&logdev, meta, true).expect("journal commit");
    }
    let logged = logdev.image();
    let jrange = jstart as usize * BS..(jstart + jblocks) as usize * BS;
    let mut image = base.clone();
    image[jrange.clone()].copy_from_slice(&logged[jrange]);

    // Where each transaction sits, checked against what was committed.
    let log_len = j.log_len();
    let mut txs = Vec::new();
    let mut pos = hdr.tail;
    let dev = FaultDevice::from_image(image.clone());
    for (k, (meta, _)) in steps.iter().enumerate() {
        let (blocks, used) = j
            .read_tx(&dev, pos, hdr.seq + k as u64)
            .expect("read_tx")
            .expect("committed transaction is in the log");
        assert_eq!(&blocks, meta, "logged transaction {k} differs");
        txs.push(TxLayout { pos, used, blocks });
        pos += used;
    }
    assert!(
        j.read_tx(&dev, pos, hdr.seq + txs.len() as u64)
            .expect("read_tx")
            .is_none(),
        "nothing after the last transaction"
    );
    assert!(pos - hdr.tail < log_len / 2, "transactions must not wrap");

    // The state after each prefix, every one of which fsck must find clean.
    let mut expected = vec![image.clone()];
    for t in &txs {
        let mut next = expected.last().expect("one").clone();
        for (b, img) in &t.blocks {
            block_mut(&mut next, *b).copy_from_slice(img);
        }
        expected.push(next);
    }
    for (m, e) in expected.iter().enumerate() {
        let r = check_only(e.clone()).expect("fsck of a transaction prefix");
        assert!(
            r.problems.is_empty(),
            "state after {m} of {} transactions is not clean: {:?}",
            txs.len(),
            r.problems
        );
    }
    let jb = JournalBase {
        image,
        sb,
        journal_start: jstart,
        journal_blocks: jblocks,
        log_len,
        tail: hdr.tail,
        seq: hdr.seq,
        txs,
        expected,
    };
    // Replaying the untouched journal applies every transaction and nothing else.
    let dev = FaultDevice::from_image(jb.image.clone());
    let stats = Journal::recover(&dev, &jb.sb, 0).expect("recover the base journal");
    assert_eq!(stats.transactions, jb.txs.len() as u64);
    let all = jb.expected.last().expect("final state");
    assert_eq!(jb.first_diff_outside_journal(&dev.image(), all), None);
    jb
}

/// The `fs_journal_replay` base image, built once per process.
pub fn journal_base() -> &'static JournalBase {
    static BASE: OnceLock<JournalBase> = OnceLock::new();
    BASE.get_or_init(build_journal_base)
}

fn rw_opts() -> FsOptions {
    FsOptions {
        relatime: false,
        allow_cluster_fs_without_locking: true,
        ..FsOptions::default()
    }
}

/// Input: `mode: u8` (bit 0: replay by mount instead of `Journal::recover`), then patches
/// confined to the journal. Replay must apply every transaction before the first damaged
/// one; if it stops there, the result must be exactly that prefix's state (no partial
/// transaction) and fsck-clean. An intact header must never make replay fail.
pub fn journal_replay(data: &[u8]) {
    let base = journal_base();
    let (mode, patches) = data.split_first().map_or((0, data), |(m, p)| (*m, p));
    let mut img = base.image.clone();
    apply_patches(&mut img, patches, base);
    let changed: Vec<u64> = (base.journal_start..base.journal_start + base.journal_blocks)
        .filter(|&b| block(&img, b) != block(&base.image, b))
        .collect();
    let header_changed = changed.first() == Some(&base.journal_start);
    // Transactions before the first damaged one must replay.
    let intact = changed
        .iter()
        .filter_map(|&b| base.tx_of(b))
        .min()
        .unwrap_or(base.txs.len());
    let dev = Arc::new(FaultDevice::from_image(img.clone()));
    let (replayed, fs) = if mode & 1 == 0 {
        match Journal::recover(&*dev, &base.sb, 0) {
            Ok(stats) => (stats.transactions, None),
            Err(e) if header_changed => {
                let _ = e;
                return;
            }
            Err(e) => panic!("journal recovery failed with an intact header: {e}"),
        }
    } else {
        match Fs::mount(dev.clone(), rw_opts()) {
            Ok((fs, stats)) => (stats.transactions, Some(fs)),
            Err(_) if header_changed => return,
            Err(e) => {
                // Fine only if replay applied a forged transaction that broke the image.
                let again = FaultDevice::from_image(img);
                let n = Journal::recover(&again, &base.sb, 0)
                    .expect("journal recovery with an intact header")
                    .transactions;
                assert!(
                    n > intact as u64,
                    "mount failed after replaying {n} intact transactions: {e}"
                );
                return;
            }
        }
    };
    let exact = !header_changed && replayed == intact as u64;
    if !header_changed {
        assert!(
            replayed >= intact as u64,
            "replay applied {replayed} transactions, but the first {intact} are intact"
        );
    }
    if exact {
        let want = &base.expected[intact];
        if let Some(b) = base.first_diff_outside_journal(&dev.image(), want) {
            panic!(
                "after replaying {replayed} transactions block {b} differs from that prefix's state"
            );
        }
    }
    if let Some(fs) = fs {
        let r = walk(&fs);
        if let (true, Err(e)) = (exact, r) {
            panic!("walk after replaying {replayed} intact transactions: {e}");
        }
        drop(fs);
    }
    let mut sink = |_: &str| {};
    let report = fsck(dev, FsckOptions { repair: false }, &mut sink);
    if exact {
        match report {
            Ok(r) if r.problems.is_empty() => {}
            Ok(r) => panic!(
                "fsck after replaying {replayed} intact transactions: {:?}",
                r.problems
            ),
            Err(e) => panic!("fsck after replaying {replayed} intact transactions: {e}"),
        }
    }
}
