//! Public types of the filesystem core API: options, attributes, caller identity, entries.

use std::time::SystemTime;

use crate::inode::{S_IFDIR, S_IFLNK, S_IFMT};

/// FUSE's fixed root inode number; every other inode number is its block address.
pub const ROOT_INO: u64 = 1;
pub(crate) const LINK_MAX: u32 = 65000;
pub(crate) const S_ISGID: u32 = 0o2000;
pub const RENAME_NOREPLACE: u32 = 1;
pub const RENAME_EXCHANGE: u32 = 2;

/// Mount-time settings of the core.
#[derive(Debug, Clone)]
pub struct FsOptions {
    pub journal: u32,
    pub read_only: bool,
    /// Update atime like `relatime`; false means `noatime`.
    pub relatime: bool,
    /// A `lock_tandem` filesystem needs tandem-lockd; only tests and fsck may skip that.
    pub allow_cluster_fs_without_locking: bool,
    /// Enforce POSIX ACLs (`-o acl`; GFS2's default is `noacl` too). Needs the kernel's
    /// `FUSE_POSIX_ACL`: the FUSE layer turns it off again when the kernel refuses.
    pub posix_acl: bool,
}

impl Default for FsOptions {
    fn default() -> Self {
        Self {
            journal: 0,
            read_only: false,
            relatime: true,
            allow_cluster_fs_without_locking: false,
            posix_acl: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl FileKind {
    pub(crate) fn from_mode(mode: u32) -> Self {
        match mode & S_IFMT {
            S_IFDIR => Self::Dir,
            S_IFLNK => Self::Symlink,
            0o010000 => Self::Fifo,
            0o140000 => Self::Socket,
            0o020000 => Self::CharDev,
            0o060000 => Self::BlockDev,
            _ => Self::File,
        }
    }
}

/// Attributes as FUSE needs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks_512: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub crtime: SystemTime,
    pub kind: FileKind,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
    pub generation: u64,
}

/// Requested attribute changes (setattr).
#[derive(Debug, Clone, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SystemTime>,
    pub mtime: Option<SystemTime>,
    pub ctime: Option<SystemTime>,
}

/// Caller identity for new inodes.
#[derive(Debug, Clone, Copy)]
pub struct Ctx {
    pub uid: u32,
    pub gid: u32,
    /// The calling thread (its supplementary groups are read from /proc where a
    /// permission check needs them); 0 when unknown: the primary group only.
    pub pid: u32,
}

impl Ctx {
    /// The caller's primary group and, when its thread is known, its supplementary
    /// groups (unknown, e.g. the process is gone: the primary group only).
    pub fn groups(&self) -> Vec<u32> {
        let mut groups = vec![self.gid];
        if self.pid == 0 {
            return groups;
        }
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", self.pid)) {
            if let Some(line) = status.lines().find_map(|l| l.strip_prefix("Groups:")) {
                groups.extend(
                    line.split_whitespace()
                        .filter_map(|g| g.parse::<u32>().ok()),
                );
            }
        }
        groups
    }
}

/// A readdir entry; `offset` is the cookie of the *next* entry.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub ino: u64,
    pub offset: u64,
    pub kind: FileKind,
    pub name: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}
