//! Offline consistency check and repair.
//!
//! Passes: (0) superblock and journals (replayed with repair), (1) walk the tree from the
//! root, validating every inode, extent, leaf and xattr block and recording which blocks
//! are in use, (2) find orphaned inodes, (3) compare link counts, parents and allocation
//! bitmaps with what the walk found. Repairs rebuild bitmaps and group headers from the
//! walk, drop entries that point at garbage, fix counts, and attach orphans to
//! /lost+found. Any input, however corrupt, yields a report or an error — never a panic.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::block::BlockDevice;
use crate::dir::Dirent;
use crate::error::Result;
use crate::format::{self, BlockState, BlockType, RgHeader, HDR_LEN};
use crate::inode::{Inode, Time, FLAG_EXHASH, FLAG_EXT_INDIRECT, FLAG_INLINE, S_IFDIR};
use crate::journal::{Journal, JournalHeader};
use crate::store::{read_superblock, Store};

mod repair;

#[derive(Debug, Clone, Copy, Default)]
pub struct FsckOptions {
    /// Repair (`-y`); otherwise only report (`-n`).
    pub repair: bool,
}

#[derive(Debug, Default)]
pub struct FsckReport {
    pub problems: Vec<String>,
    pub repaired: bool,
    pub files: u64,
    pub dirs: u64,
    pub used_blocks: u64,
    pub journals_replayed: u32,
}

impl FsckReport {
    /// e2fsck convention: 0 clean, 1 errors corrected, 4 errors left uncorrected.
    pub fn exit_code(&self) -> i32 {
        match (self.problems.is_empty(), self.repaired) {
            (true, _) => 0,
            (false, true) => 1,
            (false, false) => 4,
        }
    }
}

#[derive(Debug)]
enum Fix {
    RecreateRoot,
    RemoveEntry {
        dir: u64,
        name: Vec<u8>,
    },
    SetDtype {
        dir: u64,
        name: Vec<u8>,
        ino: u64,
        dtype: u8,
    },
    ResetDir(u64),
    DropExtents(u64),
    DropXattr(u64),
    /// An attribute whose value breaks its own rules (a malformed POSIX ACL).
    RemoveXattr(u64, Vec<u8>),
    SetNlink(u64, u32),
    SetParent(u64, u64),
    SetBlocks(u64, u64),
    SetEntries(u64, u64),
    Rehash(u64, Vec<Dirent>),
    ZeroInlineTail(u64),
}

struct Info {
    is_dir: bool,
    dtype: u8,
    nlink: u32,
    refs: u32,
    subdirs: u32,
    parent: u64,
    walked_parent: u64,
}

struct Checker<'a> {
    st: Store,
    states: Vec<u8>,
    info: BTreeMap<u64, Info>,
    fixes: Vec<Fix>,
    problems: Vec<String>,
    out: &'a mut dyn FnMut(&str),
}

const FREE: u8 = BlockState::Free as u8;

/// Checks (and with `repair`, fixes) the filesystem on `dev`. `out` receives progress lines.
pub fn fsck(
    dev: Arc<dyn BlockDevice>,
    opts: FsckOptions,
    out: &mut dyn FnMut(&str),
) -> Result<FsckReport> {
    let sb = read_superblock(&*dev)?;
    let mut report = FsckReport::default();
    let mut problems = Vec::new();
    out(&format!(
        "checking {} ({} blocks of {} bytes, {} journals)",
        sb.lock_table, sb.block_count, sb.block_size, sb.journal_count
    ));
    for j in 0..sb.journal_count {
        match Journal::read_header(&*dev, &sb, j) {
            Ok(h) if h.clean => {}
            Ok(_) if opts.repair => {
                let stats = Journal::recover(&*dev, &sb, j)?;
                out(&format!(
                    "journal {j}: replayed {} transactions",
                    stats.transactions
                ));
                report.journals_replayed += 1;
            }
            Ok(_) => out(&format!(
                "journal {j} was not unmounted cleanly; it is replayed at mount (or by -y)"
            )),
            Err(e) => {
                problems.push(format!("journal {j} header is corrupt: {e}"));
                if opts.repair {
                    let (start, _) = sb.journal_range(j);
                    let h = JournalHeader {
                        seq: 1,
                        tail: 0,
                        clean: true,
                        index: j,
                    };
                    dev.write_at(
                        &h.encode(sb.block_size as usize, start, &sb.uuid),
                        start * u64::from(sb.block_size),
                    )?;
                    dev.flush()?;
                }
            }
        }
    }
    let bc = sb.block_count as usize;
    let mut c = Checker {
        st: Store::bare(dev, sb),
        states: vec![FREE; bc],
        info: BTreeMap::new(),
        fixes: Vec::new(),
        problems,
        out,
    };
    let rgs_ok = c.check_rgs();
    c.walk_tree();
    if rgs_ok {
        c.find_orphans()?;
    }
    c.check_counts();
    let bitmaps_bad = c.compare_bitmaps(rgs_ok);
    for (_, i) in c.info.iter() {
        if i.is_dir {
            report.dirs += 1;
        } else {
            report.files += 1;
        }
    }
    report.used_blocks = c.states.iter().filter(|&&s| s != FREE).count() as u64;
    if opts.repair && (!c.problems.is_empty() || bitmaps_bad) {
        c.repair(bitmaps_bad)?;
        report.repaired = true;
    }
    report.problems = c.problems;
    Ok(report)
}

impl Checker<'_> {
    /// Every stored POSIX ACL must parse, and default ACLs belong to directories only:
    /// the kernel would refuse the inode's permission checks otherwise.
    fn check_acls(&mut self, blk: u64, ino: &Inode, xattrs: Vec<(Vec<u8>, Vec<u8>)>) {
        for (name, value) in xattrs {
            if !crate::acl::is_acl_name(&name) {
                continue;
            }
            let why = match crate::acl::Acl::parse(&value) {
                Err(e) => e.to_string(),
                Ok(_) if name == crate::acl::DEFAULT && !ino.is_dir() => {
                    "a default ACL on a non-directory".to_string()
                }
                Ok(_) => continue,
            };
            self.problem(format!(
                "inode {blk}: {} is invalid: {why}",
                String::from_utf8_lossy(&name)
            ));
            self.fixes.push(Fix::RemoveXattr(blk, name));
        }
    }

    fn problem(&mut self, p: String) {
        (self.out)(&format!("problem: {p}"));
        self.problems.push(p);
    }

    /// Validates group headers against the superblock geometry.
    fn check_rgs(&mut self) -> bool {
        let mut ok = true;
        for i in 0..self.st.sb.rg_count {
            let (start, len) = self.st.sb.rg_range(i);
            let (bm, data) = format::rg_geometry(len, self.st.bs);
            let res = self
                .st
                .meta(start, BlockType::RgHeader)
                .map(|b| RgHeader::decode(b, start));
            match res {
                Ok(Ok(h)) if h.index == i && h.bitmap_blocks == bm && h.data_count == data => {}
                Ok(Ok(_)) => {
                    ok = false;
                    self.problem(format!(
                        "resource group {i} header disagrees with the superblock geometry"
                    ));
                }
                Ok(Err(e)) => {
                    ok = false;
                    self.problem(format!("resource group {i}: {e}"));
                }
                Err(e) => {
                    ok = false;
                    self.problem(format!("resource group {i}: {e}"));
                }
            }
        }
        if ok {
            ok = self.st.load_rgs().is_ok();
        }
        if !ok {
            // Carry on with the geometry so the walk can still classify blocks.
            let free = vec![FREE; self.states.len()];
            if let Err(e) = self.st.rebuild_bitmaps(&free) {
                self.problem(format!("cannot rebuild resource groups: {e}"));
            }
        }
        ok
    }

    fn claim(&mut self, blk: u64, st: BlockState) -> bool {
        match self.states.get_mut(blk as usize) {
            Some(s) if *s == FREE && self.st.rg_of(blk).is_some() => {
                *s = st as u8;
                true
            }
            _ => false,
        }
    }

    fn free_range(&self, start: u64, len: u64) -> bool {
        len > 0
            && start
                .checked_add(len)
                .is_some_and(|e| e <= self.st.sb.block_count)
            && self.st.rg_of(start).is_some()
            && self.st.rg_of(start) == self.st.rg_of(start + len - 1)
            && (start..start + len).all(|b| self.states[b as usize] == FREE)
    }

    /// Validates an inode and claims every block it owns. Err = unusable inode.
    fn visit(&mut self, blk: u64, parent: u64) -> std::result::Result<Inode, String> {
        if self.states.get(blk as usize) != Some(&FREE) || self.st.rg_of(blk).is_none() {
            return Err("inode block is outside the data area or already in use".into());
        }
        let ino = self.st.inode_raw(blk).map_err(|e| e.to_string())?;
        if ino.nlink == 0 {
            return Err("inode has link count 0".into());
        }
        self.claim(blk, BlockState::Inode);
        let mut owned = 0u64;
        if ino.is_dir() {
            match self.st.dir_leaves(&ino) {
                Ok(leaves) if leaves.iter().all(|&l| self.free_range(l, 1)) => {
                    for l in &leaves {
                        self.claim(*l, BlockState::Used);
                    }
                    owned += leaves.len() as u64;
                }
                Ok(_) => {
                    self.problem(format!("directory {blk}: leaf blocks invalid or shared"));
                    self.fixes.push(Fix::ResetDir(blk));
                }
                Err(e) => {
                    self.problem(format!("directory {blk}: {e}"));
                    self.fixes.push(Fix::ResetDir(blk));
                }
            }
        } else if !ino.is_inline() {
            let leaves: Vec<u64> = if ino.flags & FLAG_EXT_INDIRECT != 0 {
                (0..ino.payload_len as usize)
                    .map(|i| format::get_u64(&ino.payload, i * 8))
                    .collect()
            } else {
                Vec::new()
            };
            match self.st.extents(&ino) {
                Ok(ext)
                    if ext
                        .iter()
                        .all(|e| self.free_range(e.physical, u64::from(e.len)))
                        && leaves.iter().all(|&l| self.free_range(l, 1))
                        && !ranges_overlap(&ext) =>
                {
                    for e in &ext {
                        for b in e.physical..e.physical + u64::from(e.len) {
                            self.claim(b, BlockState::Used);
                        }
                        owned += u64::from(e.len);
                    }
                    for l in &leaves {
                        self.claim(*l, BlockState::Used);
                    }
                    owned += leaves.len() as u64;
                }
                Ok(_) => {
                    self.problem(format!(
                        "inode {blk}: extents point outside the data area or at blocks in use"
                    ));
                    self.fixes.push(Fix::DropExtents(blk));
                }
                Err(e) => {
                    self.problem(format!("inode {blk}: {e}"));
                    self.fixes.push(Fix::DropExtents(blk));
                }
            }
        }
        if !ino.is_dir()
            && ino.is_inline()
            && ino.payload[ino.size as usize..].iter().any(|&b| b != 0)
        {
            // Bytes past EOF would reappear if the file grew; they must be zero.
            self.problem(format!(
                "inode {blk}: stale bytes after the end of inline data"
            ));
            self.fixes.push(Fix::ZeroInlineTail(blk));
        }
        if ino.xattr_block != 0 {
            let xattrs = if self.free_range(ino.xattr_block, 1) {
                self.st.xattrs(&ino).ok()
            } else {
                None
            };
            if let Some(xattrs) = xattrs {
                self.claim(ino.xattr_block, BlockState::Used);
                owned += 1;
                self.check_acls(blk, &ino, xattrs);
            } else {
                self.problem(format!("inode {blk}: extended attribute block is corrupt"));
                self.fixes.push(Fix::DropXattr(blk));
            }
        }
        if owned != ino.blocks && !self.fixes.iter().any(|f| matches!(f, Fix::DropExtents(b) | Fix::ResetDir(b) | Fix::DropXattr(b) if *b == blk)) {
            self.problem(format!("inode {blk}: block count {} but owns {owned}", ino.blocks));
            self.fixes.push(Fix::SetBlocks(blk, owned));
        }
        let dtype = ((ino.mode & 0o170000) >> 12) as u8;
        self.info.insert(
            blk,
            Info {
                is_dir: ino.is_dir(),
                dtype,
                nlink: ino.nlink,
                refs: 0,
                subdirs: 0,
                parent: ino.parent,
                walked_parent: parent,
            },
        );
        Ok(ino)
    }

    fn walk_tree(&mut self) {
        let root = self.st.sb.root_block;
        match self.visit(root, root) {
            Ok(_) => self.walk_from(root),
            Err(e) => {
                // Like e2fsck: a new empty root; everything else is found as orphans.
                self.problem(format!(
                    "root directory {root} is unusable: {e}; it will be recreated"
                ));
                self.states[root as usize] = BlockState::Inode as u8;
                let info = Info {
                    is_dir: true,
                    dtype: 4,
                    nlink: 2,
                    refs: 0,
                    subdirs: 0,
                    parent: root,
                    walked_parent: root,
                };
                self.info.insert(root, info);
                self.fixes.push(Fix::RecreateRoot);
            }
        }
    }

    fn walk_from(&mut self, top: u64) {
        let mut stack = vec![top];
        // The group headers' inode counts give the total for percentages.
        let total = self.st.inode_count().unwrap_or(0).max(1);
        let mut next_report = total / 10;
        while let Some(dblk) = stack.pop() {
            let dir = match self.st.inode_raw(dblk) {
                Ok(d) => d,
                Err(_) => continue,
            };
            if self
                .fixes
                .iter()
                .any(|f| matches!(f, Fix::ResetDir(b) if *b == dblk))
            {
                continue;
            }
            let ents = match self.st.dir_list(&dir) {
                Ok(e) => e,
                Err(e) => {
                    self.problem(format!("directory {dblk}: {e}"));
                    self.fixes.push(Fix::ResetDir(dblk));
                    continue;
                }
            };
            match self.st.dir_misplaced(&dir) {
                Ok(0) => {}
                Ok(n) => {
                    self.problem(format!(
                        "directory {dblk}: {n} entries or leaves are not where their hash says"
                    ));
                    self.fixes.push(Fix::Rehash(dblk, ents.clone()));
                }
                Err(e) => {
                    self.problem(format!("directory {dblk}: {e}"));
                    self.fixes.push(Fix::ResetDir(dblk));
                    continue;
                }
            }
            if ents.len() as u64 != dir.dir_entries {
                self.problem(format!(
                    "directory {dblk}: entry count {} but holds {}",
                    dir.dir_entries,
                    ents.len()
                ));
                self.fixes.push(Fix::SetEntries(dblk, ents.len() as u64));
            }
            for e in ents {
                self.check_entry(dblk, e, &mut stack);
                let seen = self.info.len() as u64;
                if seen >= next_report && total >= 10_000 {
                    let pct = seen * 100 / total;
                    (self.out)(&format!(
                        "pass 1: {seen} of about {total} inodes checked ({pct}%)"
                    ));
                    next_report = seen + total / 10;
                }
            }
        }
    }

    fn check_entry(&mut self, dblk: u64, e: Dirent, stack: &mut Vec<u64>) {
        let name = String::from_utf8_lossy(&e.name).into_owned();
        let (is_dir, dtype) = if let Some(i) = self.info.get(&e.ino) {
            if i.is_dir {
                self.problem(format!(
                    "directory {} has a second name {name:?} in {dblk}",
                    e.ino
                ));
                self.fixes.push(Fix::RemoveEntry {
                    dir: dblk,
                    name: e.name,
                });
                return;
            }
            (false, i.dtype)
        } else {
            match self.visit(e.ino, dblk) {
                Ok(ino) => (ino.is_dir(), ((ino.mode & 0o170000) >> 12) as u8),
                Err(why) => {
                    self.problem(format!(
                        "entry {name:?} in directory {dblk} points at inode {}: {why}",
                        e.ino
                    ));
                    self.fixes.push(Fix::RemoveEntry {
                        dir: dblk,
                        name: e.name,
                    });
                    return;
                }
            }
        };
        if let Some(i) = self.info.get_mut(&e.ino) {
            i.refs += 1;
        }
        if is_dir {
            if let Some(p) = self.info.get_mut(&dblk) {
                p.subdirs += 1;
            }
            stack.push(e.ino);
            if e.dtype != dtype {
                self.problem(format!("entry {name:?} in {dblk} has the wrong file type"));
                self.fixes.push(Fix::SetDtype {
                    dir: dblk,
                    name: e.name,
                    ino: e.ino,
                    dtype,
                });
            }
        } else if e.dtype != dtype {
            self.problem(format!("entry {name:?} in {dblk} has the wrong file type"));
            self.fixes.push(Fix::SetDtype {
                dir: dblk,
                name: e.name,
                ino: e.ino,
                dtype,
            });
        }
    }

    /// Inodes marked allocated in the bitmaps that the walk never reached.
    fn find_orphans(&mut self) -> Result<()> {
        let mut orphans = Vec::new();
        let per = format::bitmap_blocks_per(self.st.bs) as u64;
        for rg in 0..self.st.rgs.len() {
            let h = self.st.rgs[rg].clone();
            let (start, _) = self.st.sb.rg_range(rg as u32);
            for k in 0..u64::from(h.bitmap_blocks) {
                let Ok(b) = self
                    .st
                    .meta(start + 1 + k, BlockType::Bitmap)
                    .map(|b| b.to_vec())
                else {
                    continue;
                };
                for bit in 0..per.min(u64::from(h.data_count).saturating_sub(k * per)) {
                    let v = (b[HDR_LEN + (bit / 4) as usize] >> ((bit % 4) * 2)) & 3;
                    let blk = h.data0 + k * per + bit;
                    if v == BlockState::Inode as u8 && !self.info.contains_key(&blk) {
                        orphans.push(blk);
                    }
                }
            }
        }
        let lf_parent = self.st.sb.root_block;
        for blk in orphans {
            if self.info.contains_key(&blk) {
                continue;
            }
            if let Ok(ino) = self.visit(blk, lf_parent) {
                self.problem(format!(
                    "inode {blk} is not in any directory (orphan); it goes to /lost+found"
                ));
                if let Some(i) = self.info.get_mut(&blk) {
                    i.refs += 1;
                }
                if ino.is_dir() {
                    self.walk_from(blk);
                }
                self.fixes.push(Fix::SetParent(blk, u64::MAX));
            }
        }
        Ok(())
    }

    fn check_counts(&mut self) {
        let mut found = Vec::new();
        for (&blk, i) in &self.info {
            let want = if i.is_dir { 2 + i.subdirs } else { i.refs };
            if want != i.nlink && want > 0 {
                found.push((
                    format!("inode {blk}: link count {} should be {want}", i.nlink),
                    Fix::SetNlink(blk, want),
                ));
            }
            if i.is_dir && blk != self.st.sb.root_block && i.parent != i.walked_parent {
                found.push((
                    format!(
                        "directory {blk}: parent {} should be {}",
                        i.parent, i.walked_parent
                    ),
                    Fix::SetParent(blk, i.walked_parent),
                ));
            }
        }
        for (p, f) in found {
            self.problem(p);
            self.fixes.push(f);
        }
    }

    fn compare_bitmaps(&mut self, rgs_ok: bool) -> bool {
        if !rgs_ok {
            return true;
        }
        let mut wrong = 0u64;
        let mut pending = 0u64;
        let n = self.st.rgs.len();
        for rg in 0..n {
            let h = self.st.rgs[rg].clone();
            let (mut free, mut inodes, mut pending_rg) = (0u32, 0u32, 0u32);
            for blk in h.data0..h.data0 + u64::from(h.data_count) {
                let want = self.states[blk as usize];
                match BlockState::from_bits(want) {
                    BlockState::Free => free += 1,
                    BlockState::Inode | BlockState::Unlinked => inodes += 1,
                    BlockState::Used => {}
                }
                match self.st.state(blk) {
                    Ok(s) if s as u8 == want => {}
                    // An open-unlinked inode left by a crash: legitimate, freed at mount.
                    Ok(BlockState::Unlinked) if want == FREE => pending_rg += 1,
                    _ => wrong += 1,
                }
            }
            pending += u64::from(pending_rg);
            // The header describes the bitmap as it is, pending unlinked inodes included.
            let (want_free, want_inodes) = (free - pending_rg, inodes + pending_rg);
            if want_free != h.free || want_inodes != h.inodes || pending_rg != h.unlinked {
                self.problem(format!(
                    "resource group {rg}: header says {} free / {} inodes / {} unlinked, bitmap has {want_free} / {want_inodes} / {pending_rg}",
                    h.free, h.inodes, h.unlinked
                ));
            }
            if n >= 10 && (rg + 1) % (n / 10) == 0 {
                (self.out)(&format!("pass 3: bitmaps {}% checked", (rg + 1) * 100 / n));
            }
        }
        if pending > 0 {
            (self.out)(&format!(
                "{pending} unlinked inodes are still allocated; they are freed at mount"
            ));
        }
        if wrong > 0 {
            self.problem(format!(
                "{wrong} blocks have the wrong allocation state in the bitmaps"
            ));
        }
        wrong > 0 || pending > 0
    }
}

fn ranges_overlap(ext: &[crate::inode::Extent]) -> bool {
    let mut v: Vec<(u64, u64)> = ext
        .iter()
        .map(|e| (e.physical, e.physical + u64::from(e.len)))
        .collect();
    v.sort_unstable();
    v.windows(2).any(|w| w[0].1 > w[1].0)
}
