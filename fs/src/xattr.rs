//! Extended attributes: all of an inode's attributes packed in one xattr block.

use crate::error::{FsError, Result};
use crate::format::{get_u16, get_u32, put_u16, put_u32, BlockState, BlockType};
use crate::inode::Inode;
use crate::store::Store;

const XA_HDR: usize = 32;
const ENT_HDR: usize = 4;

pub const XATTR_CREATE: i32 = 1;
pub const XATTR_REPLACE: i32 = 2;

/// Namespaces we store. Others (e.g. unknown `system.*`) are refused with EOPNOTSUPP.
fn check_name(name: &[u8]) -> Result<()> {
    if name.is_empty() || name.len() > 255 {
        return Err(FsError::Range);
    }
    let ok = [&b"user."[..], b"trusted.", b"security."]
        .iter()
        .any(|p| name.starts_with(p) && name.len() > p.len())
        || name == b"system.posix_acl_access"
        || name == b"system.posix_acl_default";
    if ok {
        Ok(())
    } else {
        Err(FsError::NotSupported("extended attribute namespace"))
    }
}

/// Names we store but do not serve: reading or setting them fails with EOPNOTSUPP, and
/// listxattr leaves them out. Removing one still works.
///
/// - POSIX ACLs unless the mount enforces them (`-o acl`, which needs the kernel's
///   `FUSE_POSIX_ACL`): without that the kernel would store them through us but never
///   enforce them, a silent wrong answer. This is also GFS2's behaviour without `acl`.
/// - `security.selinux`: SELinux labels FUSE mounts by policy (genfscon) and never reads
///   this attribute from them; only tools do (`ls -l`, `cp --preserve=context`).
///
/// "Not supported" is also what lets `ls -l` stop asking: coreutils remembers per device
/// that ACLs and security contexts are unsupported, instead of two failed getxattr round
/// trips per entry (two thirds of a cold `ls -l` of a large directory).
pub fn check_served(name: &[u8], acl: bool) -> Result<()> {
    match name {
        b"system.posix_acl_access" | b"system.posix_acl_default" if !acl => {
            Err(FsError::NotSupported(
                "POSIX ACLs (this mount does not enforce them: mount with -o acl)",
            ))
        }
        b"security.selinux" => Err(FsError::NotSupported(
            "SELinux labels (FUSE mounts are labelled by policy)",
        )),
        _ => check_name(name),
    }
}

fn parse(b: &[u8], blk: u64) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let count = get_u16(b, 24) as usize;
    let used = get_u32(b, 28) as usize;
    if XA_HDR + used > b.len() {
        return Err(FsError::inconsistent(blk, "xattr block overflows"));
    }
    let area = &b[XA_HDR..XA_HDR + used];
    let mut out = Vec::with_capacity(count);
    let mut p = 0;
    while p < used {
        if p + ENT_HDR > used {
            return Err(FsError::inconsistent(blk, "truncated xattr entry"));
        }
        let nl = area[p] as usize;
        let vl = get_u16(area, p + 2) as usize;
        if nl == 0 || p + ENT_HDR + nl + vl > used {
            return Err(FsError::inconsistent(blk, "xattr entry overflows"));
        }
        let name = area[p + ENT_HDR..p + ENT_HDR + nl].to_vec();
        // Only names `setxattr` could have stored: anything else could be listed but never
        // read or removed (and a NUL would split listxattr's answer).
        if name.contains(&0) || check_name(&name).is_err() {
            return Err(FsError::inconsistent(
                blk,
                "xattr entry with an invalid name",
            ));
        }
        if out.iter().any(|(n, _): &(Vec<u8>, Vec<u8>)| *n == name) {
            return Err(FsError::inconsistent(blk, "duplicate xattr name"));
        }
        let value = area[p + ENT_HDR + nl..p + ENT_HDR + nl + vl].to_vec();
        out.push((name, value));
        p += ENT_HDR + nl + vl;
    }
    if out.len() != count {
        return Err(FsError::inconsistent(
            blk,
            "xattr count disagrees with entries",
        ));
    }
    Ok(out)
}

impl Store {
    pub fn xattrs(&mut self, ino: &Inode) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        if ino.xattr_block == 0 {
            return Ok(Vec::new());
        }
        let b = self.meta(ino.xattr_block, BlockType::Xattr)?;
        parse(b, ino.xattr_block)
    }

    /// One attribute; whether the mount serves the name is the caller's check.
    pub fn xattr_get(&mut self, ino: &Inode, name: &[u8]) -> Result<Vec<u8>> {
        check_name(name)?;
        self.xattrs(ino)?
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .ok_or(FsError::NoXattr)
    }

    /// Sets or removes (`value == None`) an attribute; the caller stores the inode and
    /// checks that the mount serves the name.
    pub fn xattr_set(
        &mut self,
        ino: &mut Inode,
        name: &[u8],
        value: Option<&[u8]>,
        flags: i32,
    ) -> Result<()> {
        check_name(name)?;
        let mut all = self.xattrs(ino)?;
        let pos = all.iter().position(|(n, _)| n == name);
        match (value, pos) {
            (None, None) => return Err(FsError::NoXattr),
            (None, Some(i)) => {
                all.remove(i);
            }
            (Some(_), Some(_)) if flags & XATTR_CREATE != 0 => return Err(FsError::Exists),
            (Some(_), None) if flags & XATTR_REPLACE != 0 => return Err(FsError::NoXattr),
            (Some(v), Some(i)) => all[i].1 = v.to_vec(),
            (Some(v), None) => all.push((name.to_vec(), v.to_vec())),
        }
        let used: usize = all.iter().map(|(n, v)| ENT_HDR + n.len() + v.len()).sum();
        if XA_HDR + used > self.bs || all.iter().any(|(_, v)| v.len() > u16::MAX as usize) {
            return Err(FsError::XattrTooBig);
        }
        if all.is_empty() {
            if ino.xattr_block != 0 {
                self.free_meta(ino.xattr_block)?;
                ino.blocks = ino.blocks.saturating_sub(1);
                ino.xattr_block = 0;
            }
            return Ok(());
        }
        let fresh = ino.xattr_block == 0;
        if fresh {
            let (b, _) = self.alloc(ino.block + 1, 1, BlockState::Used)?;
            ino.xattr_block = b;
            ino.blocks += 1;
        }
        let blk = ino.xattr_block;
        let b = if fresh {
            self.meta_new(blk, BlockType::Xattr)
        } else {
            self.meta_mut(blk, BlockType::Xattr)?
        };
        b[24..].fill(0);
        put_u16(b, 24, all.len() as u16);
        put_u32(b, 28, used as u32);
        let mut p = XA_HDR;
        for (n, v) in &all {
            b[p] = n.len() as u8;
            put_u16(b, p + 2, v.len() as u16);
            b[p + ENT_HDR..p + ENT_HDR + n.len()].copy_from_slice(n);
            b[p + ENT_HDR + n.len()..p + ENT_HDR + n.len() + v.len()].copy_from_slice(v);
            p += ENT_HDR + n.len() + v.len();
        }
        Ok(())
    }
}
