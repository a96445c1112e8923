//! The operations' decision logic on the locked state: creating, linking, unlinking,
//! renaming and listing, with the POSIX rules each one enforces.

use super::*;

impl Inner {
    pub(super) fn blk(&self, ino: u64) -> u64 {
        if ino == ROOT_INO {
            self.root
        } else {
            ino
        }
    }
    pub(super) fn ino_of(&self, blk: u64) -> u64 {
        if blk == self.root {
            ROOT_INO
        } else {
            blk
        }
    }
    /// What a write, truncate or chown by an unprivileged caller does to a file, and what
    /// the kernel leaves to us under `FUSE_HANDLE_KILLPRIV_V2` (as `should_remove_suid`):
    /// setuid goes, setgid goes if the group may execute, file capabilities go.
    pub(super) fn kill_privs(&mut self, i: &mut Inode) -> Result<()> {
        const S_ISUID: u32 = 0o4000;
        const S_ISGID: u32 = 0o2000;
        const S_IXGRP: u32 = 0o0010;
        i.mode &= !S_ISUID;
        if i.mode & (S_ISGID | S_IXGRP) == (S_ISGID | S_IXGRP) {
            i.mode &= !S_ISGID;
        }
        if i.xattr_block != 0 {
            match self.st.xattr_set(i, b"security.capability", None, 0) {
                Ok(()) | Err(FsError::NoXattr) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub(super) fn load(&mut self, ino: u64) -> Result<Inode> {
        let blk = self.blk(ino);
        self.st.inode(blk)
    }
    pub(super) fn load_dir(&mut self, ino: u64) -> Result<Inode> {
        let d = self.load(ino)?;
        if d.is_dir() {
            Ok(d)
        } else {
            Err(FsError::NotDir)
        }
    }
    /// The entries a new directory handle lists: ".", "..", then the directory in order.
    pub(super) fn snapshot(&mut self, ino: u64) -> Result<Vec<DirEntry>> {
        let dir = self.load_dir(ino)?;
        let parent = if dir.block == self.root {
            ROOT_INO
        } else {
            self.ino_of(dir.parent)
        };
        let mut snap = vec![
            DirEntry {
                ino,
                offset: 1,
                kind: FileKind::Dir,
                name: b".".to_vec(),
            },
            DirEntry {
                ino: parent,
                offset: 2,
                kind: FileKind::Dir,
                name: b"..".to_vec(),
            },
        ];
        for (k, e) in self.st.dir_list(&dir)?.into_iter().enumerate() {
            let kind = FileKind::from_mode(u32::from(e.dtype) << 12);
            snap.push(DirEntry {
                ino: self.ino_of(e.ino),
                offset: k as u64 + 3,
                kind,
                name: e.name,
            });
        }
        Ok(snap)
    }

    /// Before readdirplus loads the inodes of `fh`'s entries from `from` on: keeps the
    /// device reading up to `PREFETCH_ENTRIES` entries ahead, in one batch per half.
    pub(super) fn prefetch_inodes(&mut self, fh: u64, from: usize) {
        const PREFETCH_ENTRIES: usize = 1024;
        let Some(h) = self.dirs.get(&fh) else {
            return;
        };
        if h.prefetched > from + PREFETCH_ENTRIES / 2 || h.prefetched >= h.ents.len() {
            return;
        }
        let start = h.prefetched.max(from);
        let end = (from + PREFETCH_ENTRIES).min(h.ents.len());
        let blks: Vec<u64> = h.ents[start..end].iter().map(|e| self.blk(e.ino)).collect();
        self.st.prefetch(blks, crate::format::BlockType::Inode);
        if let Some(h) = self.dirs.get_mut(&fh) {
            h.prefetched = end;
        }
    }

    /// rewinddir(3) shows the directory as it is now: reading from offset 0 takes a new
    /// snapshot (the first read after opendir reuses the one opendir took).
    pub(super) fn refresh_on_rewind(&mut self, fh: u64, offset: u64) -> Result<()> {
        let Some(h) = self.dirs.get_mut(&fh) else {
            return Ok(());
        };
        let rewind = offset == 0 && !h.fresh;
        h.fresh = false;
        if rewind {
            let ino = h.ino;
            let ents = self.snapshot(ino)?;
            self.dirs.insert(
                fh,
                DirHandle {
                    ino,
                    fresh: false,
                    ents,
                    prefetched: 0,
                },
            );
        }
        Ok(())
    }

    pub(super) fn writable(&self) -> Result<()> {
        self.st.check_poison()?;
        if self.opts.read_only {
            Err(FsError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Asks for an early commit (arranged by `OpGuard` after unlocking) once the running
    /// transaction holds a quarter of what the journal can take: see `OpGuard::drop`.
    pub(super) fn after_op(&mut self) -> Result<()> {
        if self.st.dirty_count() > self.st.tx_limit() / 4 {
            self.commit_wanted = true;
        }
        Ok(())
    }

    pub(super) fn attr(&self, i: &Inode) -> Attr {
        Attr {
            ino: self.ino_of(i.block),
            size: i.size,
            blocks_512: i.blocks * u64::from(self.st.sb.block_size / 512),
            atime: i.atime.to_system(),
            mtime: i.mtime.to_system(),
            ctime: i.ctime.to_system(),
            crtime: i.crtime.to_system(),
            kind: FileKind::from_mode(i.mode),
            perm: (i.mode & 0o7777) as u16,
            nlink: i.nlink,
            uid: i.uid,
            gid: i.gid,
            rdev: i.rdev,
            blksize: self.st.sb.block_size,
            generation: i.generation,
        }
    }

    pub(super) fn create(
        &mut self,
        ctx: Ctx,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
        rdev: u32,
        target: Option<&[u8]>,
    ) -> Result<Attr> {
        self.writable()?;
        check_name(name)?;
        let mut dir = self.load_dir(parent)?;
        if dir.nlink == 0 {
            return Err(FsError::NotFound);
        }
        if self.st.dir_lookup(&dir, name)?.is_some() {
            return Err(FsError::Exists);
        }
        let is_dir = mode & S_IFMT == S_IFDIR;
        if is_dir && dir.nlink >= LINK_MAX {
            return Err(FsError::TooManyLinks);
        }
        let (mut mode, access_acl, default_acl) = self.inherit(&dir, mode, umask)?;
        let (blk, generation) = self.st.alloc_inode_block(dir.block + 1)?;
        let bs = self.st.bs;
        let mut gid = ctx.gid;
        // BSD group semantics on setgid directories, as ext4 and GFS2 do.
        if dir.mode & S_ISGID != 0 {
            gid = dir.gid;
            if is_dir {
                mode |= S_ISGID;
            }
        }
        let mut ino = Inode::new(blk, mode, ctx.uid, gid, bs, generation);
        ino.rdev = rdev;
        if is_dir {
            ino.nlink = 2;
            ino.parent = dir.block;
            ino.size = bs as u64;
        }
        let res = (|| -> Result<()> {
            self.store_inherited(&mut ino, access_acl.as_ref(), default_acl.as_ref())?;
            if let Some(t) = target {
                self.st.file_write(&mut ino, 0, t)?;
            }
            self.st.dir_add(
                &mut dir,
                Dirent {
                    name: name.to_vec(),
                    ino: blk,
                    dtype: dtype(mode),
                },
            )
        })();
        if let Err(e) = res {
            // Undo the allocation so an ENOSPC part-way leaks nothing.
            self.st.put_inode(&ino)?;
            self.st.free_inode(&ino)?;
            self.st.put_inode(&dir)?;
            return Err(e);
        }
        self.st.put_inode(&ino)?;
        let now = Time::now();
        dir.mtime = now;
        dir.ctime = now;
        if is_dir {
            dir.nlink += 1;
        }
        self.st.put_inode(&dir)?;
        self.after_op()?;
        Ok(self.attr(&ino))
    }

    /// Drops one name of `ino`; frees it now, or marks it unlinked while it is still open.
    pub(super) fn drop_link(&mut self, ino: &mut Inode) -> Result<()> {
        ino.ctime = Time::now();
        if ino.is_dir() {
            ino.nlink = 0;
            self.st.dir_free(ino)?;
        } else {
            ino.nlink = ino.nlink.saturating_sub(1);
        }
        self.st.put_inode(ino)?;
        if ino.nlink > 0 {
            return Ok(());
        }
        let open_elsewhere = self
            .cluster
            .as_ref()
            .is_some_and(|c| !c.nobody_has_open(ino.block));
        if open_elsewhere || self.opens.get(&ino.block).copied().unwrap_or(0) > 0 {
            self.st.set_state(ino.block, BlockState::Unlinked)
        } else {
            self.st.free_inode(ino)
        }
    }

    /// How many inodes open here have lost their last name (their space is freed on close).
    pub(super) fn unlinked_open(&mut self) -> Result<usize> {
        let blks: Vec<u64> = self.opens.keys().copied().collect();
        let mut n = 0;
        for blk in blks {
            if self.st.state(blk)? == BlockState::Unlinked {
                n += 1;
            }
        }
        Ok(n)
    }

    /// One handle of `blk` closed; true if it was the last one on this node.
    pub(super) fn drop_open(&mut self, blk: u64) -> bool {
        let Some(c) = self.opens.get_mut(&blk) else {
            return false;
        };
        *c = c.saturating_sub(1);
        if *c == 0 {
            self.opens.remove(&blk);
            return true;
        }
        false
    }

    pub(super) fn reap(&mut self, blk: u64) -> Result<()> {
        if self.st.state(blk)? == BlockState::Unlinked {
            let ino = self.st.inode(blk)?;
            self.st.free_inode(&ino)?;
            self.after_op()?;
        }
        Ok(())
    }

    /// True if `dir` is `anc` or lies below it.
    pub(super) fn is_within(&mut self, mut dir: u64, anc: u64) -> Result<bool> {
        for _ in 0..100_000 {
            if dir == anc {
                return Ok(true);
            }
            if dir == self.root {
                return Ok(false);
            }
            dir = self.st.inode(dir)?.parent;
        }
        Err(FsError::inconsistent(
            dir,
            "directory parent chain does not reach the root",
        ))
    }

    pub(super) fn rename(
        &mut self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: u32,
    ) -> Result<()> {
        let (pb, npb) = (self.blk(parent), self.blk(newparent));
        let pdir = self.load_dir(parent)?;
        let ndir = self.load_dir(newparent)?;
        let src = self.st.dir_lookup(&pdir, name)?.ok_or(FsError::NotFound)?;
        let dst = self.st.dir_lookup(&ndir, newname)?;
        let src_ino = self.st.inode(src.ino)?;
        let now = Time::now();
        if flags & RENAME_EXCHANGE != 0 {
            let dst = dst.ok_or(FsError::NotFound)?;
            let dst_ino = self.st.inode(dst.ino)?;
            if pb != npb {
                if src_ino.is_dir() && self.is_within(npb, src_ino.block)? {
                    return Err(FsError::Invalid("cannot move a directory below itself"));
                }
                if dst_ino.is_dir() && self.is_within(pb, dst_ino.block)? {
                    return Err(FsError::Invalid("cannot move a directory below itself"));
                }
            }
            self.replace_entry(pb, name, dst.ino, dst.dtype, now)?;
            self.replace_entry(npb, newname, src.ino, src.dtype, now)?;
            if pb != npb {
                self.reparent(src.ino, pb, npb, now)?;
                self.reparent(dst.ino, npb, pb, now)?;
            }
            return Ok(());
        }
        if let Some(d) = &dst {
            if flags & RENAME_NOREPLACE != 0 {
                return Err(FsError::Exists);
            }
            if d.ino == src.ino {
                return Ok(());
            }
        }
        if src_ino.is_dir() && self.is_within(npb, src_ino.block)? {
            return Err(FsError::Invalid("cannot move a directory below itself"));
        }
        // Order matters for atomicity: the only step that can run out of space (adding a
        // new name) comes first; everything after it cannot fail for lack of space.
        let victim = match dst {
            Some(d) => {
                let victim = self.st.inode(d.ino)?;
                match (src_ino.is_dir(), victim.is_dir()) {
                    (true, false) => return Err(FsError::NotDir),
                    (false, true) => return Err(FsError::IsDir),
                    (true, true) if victim.dir_entries != 0 => return Err(FsError::NotEmpty),
                    _ => {}
                }
                let mut nd = self.st.inode(npb)?;
                self.st.dir_replace(&mut nd, newname, src.ino, src.dtype)?;
                if victim.is_dir() {
                    nd.nlink = nd.nlink.saturating_sub(1);
                }
                nd.mtime = now;
                nd.ctime = now;
                self.st.put_inode(&nd)?;
                Some(victim)
            }
            None => {
                let mut nd = self.st.inode(npb)?;
                let ent = Dirent {
                    name: newname.to_vec(),
                    ino: src.ino,
                    dtype: src.dtype,
                };
                let added = self.st.dir_add(&mut nd, ent);
                // Stored even on failure: see `Fs::link`.
                self.st.put_inode(&nd)?;
                added?;
                nd.mtime = now;
                nd.ctime = now;
                self.st.put_inode(&nd)?;
                None
            }
        };
        let mut pd = self.st.inode(pb)?;
        self.st.dir_remove(&mut pd, name)?;
        pd.mtime = now;
        pd.ctime = now;
        self.st.put_inode(&pd)?;
        if let Some(mut victim) = victim {
            self.drop_link(&mut victim)?;
        }
        if pb != npb {
            self.reparent(src.ino, pb, npb, now)?;
        } else {
            let mut s = self.st.inode(src.ino)?;
            s.ctime = now;
            self.st.put_inode(&s)?;
        }
        Ok(())
    }

    pub(super) fn replace_entry(
        &mut self,
        dir: u64,
        name: &[u8],
        ino: u64,
        dtype: u8,
        now: Time,
    ) -> Result<()> {
        let mut d = self.st.inode(dir)?;
        self.st.dir_replace(&mut d, name, ino, dtype)?;
        d.mtime = now;
        d.ctime = now;
        self.st.put_inode(&d)
    }

    /// Fixes parent pointer and link counts after `child` moved from `from` to `to`.
    pub(super) fn reparent(&mut self, child: u64, from: u64, to: u64, now: Time) -> Result<()> {
        let mut c = self.st.inode(child)?;
        c.ctime = now;
        if c.is_dir() {
            c.parent = to;
            let mut f = self.st.inode(from)?;
            f.nlink = f.nlink.saturating_sub(1);
            self.st.put_inode(&f)?;
            let mut t = self.st.inode(to)?;
            t.nlink += 1;
            self.st.put_inode(&t)?;
        }
        self.st.put_inode(&c)
    }
}
