//! POSIX ACLs on the locked state: storing one (and the mode it implies), keeping the
//! access ACL in step with chmod, and inheriting a directory's default ACL. The rules
//! themselves are `crate::acl`'s; this file only reads and writes the xattrs.

use super::*;
use crate::acl::{self, Acl};

impl Inner {
    /// The ACL stored under `name`, if any (and if ACLs are enforced on this mount).
    pub(super) fn acl(&mut self, i: &Inode, name: &[u8]) -> Result<Option<Acl>> {
        if !self.opts.posix_acl || i.xattr_block == 0 {
            return Ok(None);
        }
        match self.st.xattr_get(i, name) {
            Ok(v) => Acl::parse(&v).map(Some).map_err(|_| {
                FsError::inconsistent(i.xattr_block, "stored POSIX ACL does not parse")
            }),
            Err(FsError::NoXattr) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// setxattr of an ACL. An access ACL sets the mode's permission bits and is stored
    /// only if it says more than they do; a default ACL is for directories only.
    pub(super) fn set_acl(
        &mut self,
        i: &mut Inode,
        name: &[u8],
        a: &Acl,
        caller: Ctx,
    ) -> Result<()> {
        if i.kind() == S_IFLNK {
            return Err(FsError::NotSupported("ACLs on symbolic links"));
        }
        if name == acl::DEFAULT {
            if !i.is_dir() {
                return Err(FsError::Access);
            }
            return self.st.xattr_set(i, name, Some(&a.to_bytes()), 0);
        }
        let (mode, equiv) = a.equiv_mode(i.mode);
        i.mode = mode;
        if caller.uid != 0 && !caller.groups().contains(&i.gid) {
            i.mode &= !0o2000;
        }
        if equiv {
            match self.st.xattr_set(i, name, None, 0) {
                Ok(()) | Err(FsError::NoXattr) => Ok(()),
                Err(e) => Err(e),
            }
        } else {
            self.st.xattr_set(i, name, Some(&a.to_bytes()), 0)
        }
    }

    /// After a chmod: the access ACL's owner, mask and other entries follow the mode.
    pub(super) fn chmod_acl(&mut self, i: &mut Inode) -> Result<()> {
        if let Some(mut a) = self.acl(i, acl::ACCESS)? {
            a.chmod(i.mode);
            self.st.xattr_set(i, acl::ACCESS, Some(&a.to_bytes()), 0)?;
        }
        Ok(())
    }

    /// The mode of a new inode in `dir`, and the (access, default) ACLs to store on it:
    /// the umask applies only where `dir` has no default ACL (symlinks take no ACLs).
    pub(super) fn inherit(
        &mut self,
        dir: &Inode,
        mode: u32,
        umask: u32,
    ) -> Result<(u32, Option<Acl>, Option<Acl>)> {
        let default = if mode & S_IFMT == S_IFLNK {
            None
        } else {
            self.acl(dir, acl::DEFAULT)?
        };
        let Some(default) = default else {
            return Ok((mode & !(umask & 0o777), None, None));
        };
        let mut access = default.clone();
        let (mode, store) = access.create_masq(mode);
        let keep_default = (mode & S_IFMT == S_IFDIR).then_some(default);
        Ok((mode, store.then_some(access), keep_default))
    }

    /// Stores the ACLs `inherit` chose on a new inode.
    pub(super) fn store_inherited(
        &mut self,
        i: &mut Inode,
        access: Option<&Acl>,
        default: Option<&Acl>,
    ) -> Result<()> {
        if let Some(a) = access {
            self.st.xattr_set(i, acl::ACCESS, Some(&a.to_bytes()), 0)?;
        }
        if let Some(d) = default {
            self.st.xattr_set(i, acl::DEFAULT, Some(&d.to_bytes()), 0)?;
        }
        Ok(())
    }

    /// The permission check the kernel would have made had it found the file at lookup:
    /// the access ACL when there is one, else the mode bits; O_TRUNC needs write access
    /// too. Groups are the caller's primary and (through /proc) supplementary ones.
    pub(super) fn may_open(&mut self, ctx: Ctx, i: &Inode, flags: i32) -> Result<bool> {
        if ctx.uid == 0 {
            return Ok(true);
        }
        let mut want = match flags & libc::O_ACCMODE {
            libc::O_RDONLY => 4,
            libc::O_WRONLY => 2,
            _ => 6,
        };
        if flags & libc::O_TRUNC != 0 {
            want |= 2;
        }
        let groups = ctx.groups();
        if let Some(a) = self.acl(i, acl::ACCESS)? {
            return Ok(a.permits(ctx.uid, &groups, i.uid, i.gid, want));
        }
        let bits = if ctx.uid == i.uid {
            (i.mode >> 6) & 7
        } else if groups.contains(&i.gid) {
            (i.mode >> 3) & 7
        } else {
            i.mode & 7
        };
        Ok(bits & want == want)
    }
}
