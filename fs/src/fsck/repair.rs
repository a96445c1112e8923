//! fsck's repair pass: applies the fixes the check passes recorded, then commits.

use super::*;

impl Checker<'_> {
    pub(super) fn repair(&mut self, bitmaps_bad: bool) -> Result<()> {
        if bitmaps_bad
            || self
                .problems
                .iter()
                .any(|p| p.starts_with("resource group"))
        {
            let states = self.states.clone();
            self.st.rebuild_bitmaps(&states)?;
        }
        let root = self.st.sb.root_block;
        let fixes = std::mem::take(&mut self.fixes);
        let mut orphans = Vec::new();
        for f in fixes {
            match f {
                Fix::RecreateRoot => {
                    let mut r = Inode::new(root, S_IFDIR | 0o755, 0, 0, self.st.bs, 1);
                    r.nlink = 2;
                    r.parent = root;
                    r.size = self.st.bs as u64;
                    self.st.meta_new(root, BlockType::Inode);
                    self.st.put_inode(&r)?;
                }
                Fix::RemoveEntry { dir, name } => {
                    let mut d = self.st.inode_raw(dir)?;
                    if self.st.dir_remove(&mut d, &name).is_ok() {
                        self.st.put_inode(&d)?;
                    }
                }
                Fix::SetDtype {
                    dir,
                    name,
                    ino,
                    dtype,
                } => {
                    let mut d = self.st.inode_raw(dir)?;
                    self.st.dir_remove(&mut d, &name)?;
                    self.st.dir_add(&mut d, Dirent { name, ino, dtype })?;
                    self.st.put_inode(&d)?;
                }
                Fix::ResetDir(b) => self.edit(b, |i| {
                    i.flags = (i.flags & !(FLAG_EXHASH | FLAG_EXT_INDIRECT)) | FLAG_INLINE;
                    i.payload.fill(0);
                    i.payload_len = 0;
                    i.dir_depth = 0;
                    i.dir_entries = 0;
                    i.blocks = u64::from(i.xattr_block != 0);
                })?,
                Fix::DropExtents(b) => self.edit(b, |i| {
                    i.flags = (i.flags & !(FLAG_EXT_INDIRECT | FLAG_EXHASH)) | FLAG_INLINE;
                    i.payload.fill(0);
                    i.payload_len = 0;
                    i.size = 0;
                    i.blocks = u64::from(i.xattr_block != 0);
                })?,
                Fix::DropXattr(b) => self.edit(b, |i| {
                    i.xattr_block = 0;
                    i.blocks = i.blocks.saturating_sub(1);
                })?,
                Fix::RemoveXattr(b, name) => {
                    let mut i = self.st.inode_raw(b)?;
                    self.st.xattr_set(&mut i, &name, None, 0)?;
                    self.st.put_inode(&i)?;
                }
                Fix::SetNlink(b, n) => self.edit(b, |i| i.nlink = n)?,
                Fix::SetParent(b, u64::MAX) => orphans.push(b),
                Fix::SetParent(b, p) => self.edit(b, |i| i.parent = p)?,
                Fix::SetBlocks(b, n) => self.edit(b, |i| i.blocks = n)?,
                Fix::SetEntries(b, n) => self.edit(b, |i| i.dir_entries = n)?,
                Fix::ZeroInlineTail(b) => self.edit(b, |i| {
                    let size = i.size as usize;
                    i.payload[size..].fill(0);
                    i.payload_len = size as u32;
                })?,
                Fix::Rehash(b, ents) => {
                    let mut d = self.st.inode_raw(b)?;
                    self.st.dir_free(&mut d)?;
                    d.dir_entries = 0;
                    for e in ents {
                        self.st.dir_add(&mut d, e)?;
                    }
                    self.st.put_inode(&d)?;
                }
            }
        }
        if !orphans.is_empty() {
            let lf = self.lost_and_found(root)?;
            for o in orphans {
                let ino = self.st.inode_raw(o)?;
                let mut d = self.st.inode_raw(lf)?;
                let name = format!("#{o}").into_bytes();
                if self.st.dir_lookup(&d, &name)?.is_none() {
                    self.st.dir_add(
                        &mut d,
                        Dirent {
                            name,
                            ino: o,
                            dtype: ((ino.mode & 0o170000) >> 12) as u8,
                        },
                    )?;
                }
                if ino.is_dir() {
                    d.nlink += 1;
                    self.edit(o, |i| i.parent = lf)?;
                }
                self.st.put_inode(&d)?;
            }
        }
        self.st.commit()
    }

    pub(super) fn edit(&mut self, blk: u64, f: impl FnOnce(&mut Inode)) -> Result<()> {
        let mut i = self.st.inode_raw(blk)?;
        f(&mut i);
        self.st.put_inode(&i)
    }

    pub(super) fn lost_and_found(&mut self, root: u64) -> Result<u64> {
        let mut r = self.st.inode_raw(root)?;
        if let Some(e) = self.st.dir_lookup(&r, b"lost+found")? {
            return Ok(e.ino);
        }
        let (blk, generation) = self.st.alloc_inode_block(root + 1)?;
        let mut lf = Inode::new(blk, S_IFDIR | 0o700, 0, 0, self.st.bs, generation);
        lf.nlink = 2;
        lf.parent = root;
        lf.size = self.st.bs as u64;
        self.st.put_inode(&lf)?;
        self.st.dir_add(
            &mut r,
            Dirent {
                name: b"lost+found".to_vec(),
                ino: blk,
                dtype: (S_IFDIR >> 12) as u8,
            },
        )?;
        r.nlink += 1;
        r.mtime = Time::now();
        self.st.put_inode(&r)?;
        Ok(blk)
    }
}
