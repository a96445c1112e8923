//! Directories: a linear entry list inside the inode block while it fits, then an
//! extendible hash table of leaf blocks (GFS2's exhash) so 100,000 entries stay O(1).

use crate::error::{FsError, Result};
use crate::format::{get_u16, get_u32, get_u64, put_u16, put_u32, put_u64, BlockState, BlockType};
use crate::inode::{Inode, FLAG_EXHASH, FLAG_INLINE};
use crate::store::Store;

const ENT_HDR: usize = 14;
const LEAF_HDR: usize = 40;

/// One directory entry. `dtype` is the file type (mode >> 12, the same values as DT_*).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dirent {
    pub name: Vec<u8>,
    pub ino: u64,
    pub dtype: u8,
}

pub fn name_hash(name: &[u8]) -> u32 {
    crc32fast::hash(name)
}

fn ent_len(name: &[u8]) -> usize {
    ENT_HDR + name.len()
}

fn encode_ent(buf: &mut [u8], e: &Dirent) -> usize {
    put_u64(buf, 0, e.ino);
    put_u32(buf, 8, name_hash(&e.name));
    buf[12] = e.dtype;
    buf[13] = e.name.len() as u8;
    buf[ENT_HDR..ENT_HDR + e.name.len()].copy_from_slice(&e.name);
    ent_len(&e.name)
}

/// Parses packed entries, rejecting anything that runs past `used` or has a bad hash.
fn parse_ents(buf: &[u8], used: usize, blk: u64) -> Result<Vec<Dirent>> {
    let mut out = Vec::new();
    let mut p = 0;
    if used > buf.len() {
        return Err(FsError::inconsistent(
            blk,
            "directory entry area overflows its block",
        ));
    }
    while p < used {
        if p + ENT_HDR > used {
            return Err(FsError::inconsistent(blk, "truncated directory entry"));
        }
        let n = buf[p + 13] as usize;
        if n == 0 || p + ENT_HDR + n > used {
            return Err(FsError::inconsistent(blk, "directory entry name overflows"));
        }
        let name = buf[p + ENT_HDR..p + ENT_HDR + n].to_vec();
        if get_u32(buf, p + 8) != name_hash(&name) || name.contains(&b'/') || name.contains(&0) {
            return Err(FsError::inconsistent(blk, "directory entry is corrupt"));
        }
        out.push(Dirent {
            ino: get_u64(buf, p),
            dtype: buf[p + 12],
            name,
        });
        p += ENT_HDR + n;
    }
    Ok(out)
}

/// Finds `name` in packed entries without decoding the others (the hot path of lookup,
/// create and unlink). Bounds are checked; the block CRC was verified when it was read.
fn find_ent(buf: &[u8], used: usize, name: &[u8], hash: u32) -> Option<(usize, Dirent)> {
    let used = used.min(buf.len());
    let mut p = 0;
    while p + ENT_HDR <= used {
        let n = buf[p + 13] as usize;
        if n == 0 || p + ENT_HDR + n > used {
            return None;
        }
        if get_u32(buf, p + 8) == hash && &buf[p + ENT_HDR..p + ENT_HDR + n] == name {
            return Some((
                p,
                Dirent {
                    ino: get_u64(buf, p),
                    dtype: buf[p + 12],
                    name: name.to_vec(),
                },
            ));
        }
        p += ENT_HDR + n;
    }
    None
}

struct Leaf {
    depth: u16,
    next: u64,
    ents: Vec<Dirent>,
}

impl Store {
    fn max_depth(&self, dir: &Inode) -> u16 {
        let mut d = 0;
        while (8usize << (d + 1)) <= dir.payload_cap() {
            d += 1;
        }
        d
    }

    fn leaf_room(&self) -> usize {
        self.bs - LEAF_HDR
    }

    fn read_leaf(&mut self, blk: u64) -> Result<Leaf> {
        let b = self.meta(blk, BlockType::DirLeaf)?;
        let used = get_u32(b, 28) as usize;
        let depth = get_u16(b, 24);
        let next = get_u64(b, 32);
        let ents = parse_ents(&b[LEAF_HDR..], used, blk)?;
        if usize::from(get_u16(b, 26)) != ents.len() {
            return Err(FsError::inconsistent(
                blk,
                "leaf entry count disagrees with its entries",
            ));
        }
        Ok(Leaf { depth, next, ents })
    }

    fn write_leaf(&mut self, blk: u64, leaf: &Leaf, fresh: bool) -> Result<()> {
        let b = if fresh {
            self.meta_new(blk, BlockType::DirLeaf)
        } else {
            self.meta_mut(blk, BlockType::DirLeaf)?
        };
        b[24..].fill(0);
        put_u16(b, 24, leaf.depth);
        put_u16(b, 26, leaf.ents.len() as u16);
        put_u64(b, 32, leaf.next);
        let mut p = LEAF_HDR;
        for e in &leaf.ents {
            p += encode_ent(&mut b[p..], e);
        }
        put_u32(b, 28, (p - LEAF_HDR) as u32);
        Ok(())
    }

    fn table(dir: &Inode) -> Vec<u64> {
        (0..1usize << dir.dir_depth)
            .map(|i| get_u64(&dir.payload, i * 8))
            .collect()
    }

    fn set_table(dir: &mut Inode, t: &[u64], depth: u16) {
        dir.payload.fill(0);
        for (i, p) in t.iter().enumerate() {
            put_u64(&mut dir.payload, i * 8, *p);
        }
        dir.dir_depth = depth;
        dir.payload_len = t.len() as u32;
    }

    fn slot(hash: u32, depth: u16) -> usize {
        if depth == 0 {
            0
        } else {
            (hash >> (32 - u32::from(depth))) as usize
        }
    }

    /// All entries (without "." and ".."), in on-disk order.
    pub fn dir_list(&mut self, dir: &Inode) -> Result<Vec<Dirent>> {
        if dir.flags & FLAG_EXHASH == 0 {
            return parse_ents(&dir.payload, dir.payload_len as usize, dir.block);
        }
        let mut out = Vec::new();
        let mut prev = 0;
        let mut seen = 0usize;
        for p in Self::table(dir) {
            if p == prev {
                continue;
            }
            prev = p;
            let mut cur = p;
            while cur != 0 {
                seen += 1;
                if seen > self.sb.block_count as usize {
                    return Err(FsError::inconsistent(
                        dir.block,
                        "directory leaf chain loops",
                    ));
                }
                let leaf = self.read_leaf(cur)?;
                out.extend(leaf.ents);
                cur = leaf.next;
            }
        }
        Ok(out)
    }

    /// Distinct leaf blocks of a hashed directory (for freeing and fsck).
    pub fn dir_leaves(&mut self, dir: &Inode) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        if dir.flags & FLAG_EXHASH == 0 {
            return Ok(out);
        }
        let mut prev = 0;
        for p in Self::table(dir) {
            if p == prev || out.contains(&p) {
                prev = p;
                continue;
            }
            prev = p;
            let mut cur = p;
            while cur != 0 && !out.contains(&cur) {
                out.push(cur);
                cur = self.read_leaf(cur)?.next;
            }
        }
        Ok(out)
    }

    pub fn dir_lookup(&mut self, dir: &Inode, name: &[u8]) -> Result<Option<Dirent>> {
        let hash = name_hash(name);
        if dir.flags & FLAG_EXHASH == 0 {
            return Ok(find_ent(&dir.payload, dir.payload_len as usize, name, hash).map(|(_, e)| e));
        }
        Ok(self.find_in_leaves(dir, name, hash)?.map(|(_, _, _, e)| e))
    }

    /// Finds `name` in a hashed directory's leaf chain for `hash`: (leaf block, entry
    /// offset in the leaf's entry area, bytes used there, entry).
    fn find_in_leaves(
        &mut self,
        dir: &Inode,
        name: &[u8],
        hash: u32,
    ) -> Result<Option<(u64, usize, usize, Dirent)>> {
        let mut cur = Self::table(dir)[Self::slot(hash, dir.dir_depth)];
        let mut hops = 0;
        while cur != 0 && hops < 1 << 20 {
            let b = self.meta(cur, BlockType::DirLeaf)?;
            let used = get_u32(b, 28) as usize;
            if let Some((p, e)) = find_ent(&b[LEAF_HDR..], used, name, hash) {
                return Ok(Some((cur, p, used, e)));
            }
            cur = get_u64(b, 32);
            hops += 1;
        }
        Ok(None)
    }

    /// Adds an entry; the caller has checked that the name is absent. On error the
    /// directory is still consistent (a split or table doubling may have happened) and the
    /// caller must store `dir` anyway.
    pub fn dir_add(&mut self, dir: &mut Inode, ent: Dirent) -> Result<()> {
        if dir.flags & FLAG_EXHASH == 0 {
            let used = dir.payload_len as usize;
            if used + ent_len(&ent.name) <= dir.payload_cap() {
                encode_ent(&mut dir.payload[used..], &ent);
                dir.payload_len += ent_len(&ent.name) as u32;
                dir.dir_entries += 1;
                return Ok(());
            }
            // Convert: one leaf holding everything, table of depth 0.
            let mut ents = parse_ents(&dir.payload, used, dir.block)?;
            let (leaf_blk, _) = self.alloc(dir.block + 1, 1, BlockState::Used)?;
            dir.blocks += 1;
            ents.sort_by_key(|e| name_hash(&e.name));
            self.write_leaf(
                leaf_blk,
                &Leaf {
                    depth: 0,
                    next: 0,
                    ents,
                },
                true,
            )?;
            dir.flags = (dir.flags & !FLAG_INLINE) | FLAG_EXHASH;
            Self::set_table(dir, &[leaf_blk], 0);
        }
        let hash = name_hash(&ent.name);
        let need = ent_len(&ent.name);
        let room = self.leaf_room();
        loop {
            let mut table = Self::table(dir);
            let idx = Self::slot(hash, dir.dir_depth);
            let head = table[idx];
            let mut cur = head;
            let mut last = head;
            while cur != 0 {
                let b = self.meta(cur, BlockType::DirLeaf)?;
                let used = get_u32(b, 28) as usize;
                let next = get_u64(b, 32);
                if used + need <= room {
                    // Append in place: no need to decode the leaf.
                    let b = self.meta_mut(cur, BlockType::DirLeaf)?;
                    encode_ent(&mut b[LEAF_HDR + used..], &ent);
                    put_u32(b, 28, (used + need) as u32);
                    let count = get_u16(b, 26);
                    put_u16(b, 26, count + 1);
                    dir.dir_entries += 1;
                    return Ok(());
                }
                last = cur;
                cur = next;
            }
            let head_leaf = self.read_leaf(head)?;
            if head_leaf.depth < dir.dir_depth && head_leaf.next == 0 {
                self.split_leaf(dir, &mut table, idx, head, head_leaf)?;
                Self::set_table(dir, &table, dir.dir_depth);
            } else if dir.dir_depth < self.max_depth(dir) {
                let doubled: Vec<u64> = table.iter().flat_map(|&p| [p, p]).collect();
                let d = dir.dir_depth + 1;
                Self::set_table(dir, &doubled, d);
            } else {
                // Table at its maximum size: chain a new leaf after the full one.
                let (nb, _) = self.alloc(last, 1, BlockState::Used)?;
                dir.blocks += 1;
                let mut tail = self.read_leaf(last)?;
                tail.next = nb;
                self.write_leaf(last, &tail, false)?;
                self.write_leaf(
                    nb,
                    &Leaf {
                        depth: head_leaf.depth,
                        next: 0,
                        ents: vec![ent],
                    },
                    true,
                )?;
                dir.dir_entries += 1;
                return Ok(());
            }
        }
    }

    fn split_leaf(
        &mut self,
        dir: &mut Inode,
        table: &mut [u64],
        idx: usize,
        blk: u64,
        leaf: Leaf,
    ) -> Result<()> {
        let d = dir.dir_depth;
        let span = 1usize << (d - leaf.depth);
        let start = idx / span * span;
        let half = start + span / 2;
        let (nb, _) = self.alloc(blk, 1, BlockState::Used)?;
        dir.blocks += 1;
        let (hi, lo): (Vec<Dirent>, Vec<Dirent>) = leaf
            .ents
            .into_iter()
            .partition(|e| Self::slot(name_hash(&e.name), d) >= half);
        let depth = leaf.depth + 1;
        self.write_leaf(
            blk,
            &Leaf {
                depth,
                next: 0,
                ents: lo,
            },
            false,
        )?;
        self.write_leaf(
            nb,
            &Leaf {
                depth,
                next: 0,
                ents: hi,
            },
            true,
        )?;
        for p in &mut table[half..start + span] {
            *p = nb;
        }
        Ok(())
    }

    /// Removes `name`, returning its entry.
    pub fn dir_remove(&mut self, dir: &mut Inode, name: &[u8]) -> Result<Dirent> {
        let hash = name_hash(name);
        if dir.flags & FLAG_EXHASH == 0 {
            let used = dir.payload_len as usize;
            let (p, gone) = find_ent(&dir.payload, used, name, hash).ok_or(FsError::NotFound)?;
            let len = ent_len(name);
            dir.payload.copy_within(p + len..used, p);
            dir.payload[used - len..used].fill(0);
            dir.payload_len -= len as u32;
            dir.dir_entries = dir.dir_entries.saturating_sub(1);
            return Ok(gone);
        }
        let (cur, p, used, gone) = self
            .find_in_leaves(dir, name, hash)?
            .ok_or(FsError::NotFound)?;
        let b = self.meta_mut(cur, BlockType::DirLeaf)?;
        let len = ent_len(name);
        let area = &mut b[LEAF_HDR..];
        area.copy_within(p + len..used, p);
        area[used - len..used].fill(0);
        put_u32(b, 28, (used - len) as u32);
        let count = get_u16(b, 26);
        put_u16(b, 26, count.saturating_sub(1));
        dir.dir_entries = dir.dir_entries.saturating_sub(1);
        Ok(gone)
    }

    /// Frees the leaves of an (empty) directory before the inode itself is freed.
    pub fn dir_free(&mut self, dir: &mut Inode) -> Result<()> {
        for l in self.dir_leaves(dir)? {
            self.free_meta(l)?;
            dir.blocks = dir.blocks.saturating_sub(1);
        }
        dir.flags = (dir.flags & !FLAG_EXHASH) | FLAG_INLINE;
        dir.payload.fill(0);
        dir.payload_len = 0;
        dir.dir_depth = 0;
        Ok(())
    }
}

impl Store {
    /// fsck: entries of a hashed directory that lookups cannot find (their hash maps to a
    /// different leaf chain) plus leaves deeper than the table. 0 for a healthy directory.
    pub fn dir_misplaced(&mut self, dir: &Inode) -> Result<usize> {
        if dir.flags & FLAG_EXHASH == 0 {
            return Ok(0);
        }
        let table = Self::table(dir);
        let mut bad = 0;
        let mut prev = 0;
        for &head in &table {
            if head == prev {
                continue;
            }
            prev = head;
            let (mut cur, mut hops) = (head, 0u64);
            while cur != 0 && hops <= self.sb.block_count {
                let leaf = self.read_leaf(cur)?;
                if leaf.depth > dir.dir_depth {
                    bad += 1;
                }
                bad += leaf
                    .ents
                    .iter()
                    .filter(|e| table[Self::slot(name_hash(&e.name), dir.dir_depth)] != head)
                    .count();
                cur = leaf.next;
                hops += 1;
            }
        }
        Ok(bad)
    }
}

impl Store {
    /// Points an existing entry at another inode, in place: needs no space, so rename
    /// over an existing name cannot fail half-way with ENOSPC.
    pub fn dir_replace(&mut self, dir: &mut Inode, name: &[u8], ino: u64, dtype: u8) -> Result<()> {
        let hash = name_hash(name);
        if dir.flags & FLAG_EXHASH == 0 {
            let (p, _) = find_ent(&dir.payload, dir.payload_len as usize, name, hash)
                .ok_or(FsError::NotFound)?;
            put_u64(&mut dir.payload, p, ino);
            dir.payload[p + 12] = dtype;
            return Ok(());
        }
        let (cur, p, _, _) = self
            .find_in_leaves(dir, name, hash)?
            .ok_or(FsError::NotFound)?;
        let b = self.meta_mut(cur, BlockType::DirLeaf)?;
        put_u64(b, LEAF_HDR + p, ino);
        b[LEAF_HDR + p + 12] = dtype;
        Ok(())
    }
}
