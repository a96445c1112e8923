//! The inode block: fixed fields, then a payload area holding inline data, a linear
//! directory, an extent list, a pointer list to extent leaves, or a directory hash table.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{FsError, Result};
use crate::format::{get_u16, get_u32, get_u64, init_header, put_u16, put_u32, put_u64, BlockType};

/// Payload starts here; everything before is header + fixed fields.
pub const INODE_PAYLOAD: usize = 160;

/// Payload holds file bytes / symlink target / linear directory entries.
pub const FLAG_INLINE: u32 = 1;
/// Directory payload is a hash table of leaf pointers.
pub const FLAG_EXHASH: u32 = 2;
/// Payload holds pointers to extent leaf blocks instead of extents.
pub const FLAG_EXT_INDIRECT: u32 = 4;

pub const S_IFMT: u32 = 0o170000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFLNK: u32 = 0o120000;

/// A timestamp as stored: seconds and nanoseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Time {
    pub secs: i64,
    pub nsecs: u32,
}

impl Time {
    pub fn now() -> Self {
        Self::from_system(SystemTime::now())
    }
    pub fn from_system(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Self {
                secs: d.as_secs() as i64,
                nsecs: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                let mut secs = -(d.as_secs() as i64);
                let mut nsecs = d.subsec_nanos();
                if nsecs > 0 {
                    secs -= 1;
                    nsecs = 1_000_000_000 - nsecs;
                }
                Self { secs, nsecs }
            }
        }
    }
    pub fn to_system(self) -> SystemTime {
        if self.secs >= 0 {
            UNIX_EPOCH + Duration::new(self.secs as u64, self.nsecs.min(999_999_999))
        } else {
            UNIX_EPOCH - Duration::from_secs(self.secs.unsigned_abs())
                + Duration::from_nanos(u64::from(self.nsecs))
        }
    }
}

/// Decoded inode. `block` is its address, which is also its inode number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    pub block: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    /// Blocks owned besides the inode block (data, leaves, xattr block).
    pub blocks: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    pub crtime: Time,
    pub generation: u64,
    pub flags: u32,
    pub rdev: u32,
    pub xattr_block: u64,
    /// Parent directory (directories only; ".." and the rename loop check use it).
    pub parent: u64,
    /// Bytes (inline data or linear dir) or entries (extents, leaf pointers) in the payload.
    pub payload_len: u32,
    pub dir_depth: u16,
    pub dir_entries: u64,
    pub payload: Vec<u8>,
}

fn put_time(b: &mut [u8], secs_off: usize, ns_off: usize, t: Time) {
    put_u64(b, secs_off, t.secs as u64);
    put_u32(b, ns_off, t.nsecs);
}
fn get_time(b: &[u8], secs_off: usize, ns_off: usize) -> Time {
    Time {
        secs: get_u64(b, secs_off) as i64,
        nsecs: get_u32(b, ns_off),
    }
}

impl Inode {
    pub fn new(block: u64, mode: u32, uid: u32, gid: u32, bs: usize, generation: u64) -> Self {
        let now = Time::now();
        Inode {
            block,
            mode,
            uid,
            gid,
            nlink: 1,
            size: 0,
            blocks: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            generation,
            flags: FLAG_INLINE,
            rdev: 0,
            xattr_block: 0,
            parent: 0,
            payload_len: 0,
            dir_depth: 0,
            dir_entries: 0,
            payload: vec![0; bs - INODE_PAYLOAD],
        }
    }

    pub fn kind(&self) -> u32 {
        self.mode & S_IFMT
    }
    pub fn is_dir(&self) -> bool {
        self.kind() == S_IFDIR
    }
    pub fn is_inline(&self) -> bool {
        self.flags & FLAG_INLINE != 0
    }
    pub fn payload_cap(&self) -> usize {
        self.payload.len()
    }

    pub fn encode_into(&self, b: &mut [u8]) {
        b.fill(0);
        init_header(b, BlockType::Inode, self.block);
        put_u32(b, 24, self.mode);
        put_u32(b, 28, self.uid);
        put_u32(b, 32, self.gid);
        put_u32(b, 36, self.nlink);
        put_u64(b, 40, self.size);
        put_u64(b, 48, self.blocks);
        put_time(b, 56, 88, self.atime);
        put_time(b, 64, 92, self.mtime);
        put_time(b, 72, 96, self.ctime);
        put_time(b, 80, 100, self.crtime);
        put_u64(b, 104, self.generation);
        put_u32(b, 112, self.flags);
        put_u32(b, 116, self.rdev);
        put_u64(b, 120, self.xattr_block);
        put_u64(b, 128, self.parent);
        put_u32(b, 136, self.payload_len);
        put_u16(b, 140, self.dir_depth);
        put_u64(b, 144, self.dir_entries);
        b[INODE_PAYLOAD..].copy_from_slice(&self.payload);
    }

    /// Decodes an inode block and checks its internal consistency. The checksum is
    /// verified when a block is read from disk (cached dirty blocks are not sealed yet).
    pub fn decode(b: &[u8], block: u64) -> Result<Self> {
        let ino = Inode {
            block,
            mode: get_u32(b, 24),
            uid: get_u32(b, 28),
            gid: get_u32(b, 32),
            nlink: get_u32(b, 36),
            size: get_u64(b, 40),
            blocks: get_u64(b, 48),
            atime: get_time(b, 56, 88),
            mtime: get_time(b, 64, 92),
            ctime: get_time(b, 72, 96),
            crtime: get_time(b, 80, 100),
            generation: get_u64(b, 104),
            flags: get_u32(b, 112),
            rdev: get_u32(b, 116),
            xattr_block: get_u64(b, 120),
            parent: get_u64(b, 128),
            payload_len: get_u32(b, 136),
            dir_depth: get_u16(b, 140),
            dir_entries: get_u64(b, 144),
            payload: b[INODE_PAYLOAD..].to_vec(),
        };
        let bad = |what: &str| Err(FsError::inconsistent(block, what.to_string()));
        match ino.kind() {
            S_IFREG | S_IFDIR | S_IFLNK => {}
            0o010000 | 0o020000 | 0o060000 | 0o140000 => {}
            _ => return bad("inode has an invalid file type"),
        }
        let cap = ino.payload.len();
        let layout = ino.flags & (FLAG_INLINE | FLAG_EXHASH | FLAG_EXT_INDIRECT);
        if ino.flags & !(FLAG_INLINE | FLAG_EXHASH | FLAG_EXT_INDIRECT) != 0
            || layout.count_ones() > 1
        {
            return bad("inode has unknown or conflicting layout flags");
        }
        if ino.is_inline() {
            if ino.payload_len as usize > cap {
                return bad("inline length exceeds the payload area");
            }
            if !ino.is_dir() && ino.size > cap as u64 {
                return bad("inline file larger than the payload area");
            }
        } else if ino.flags & FLAG_EXHASH != 0 {
            if !ino.is_dir() || ino.dir_depth > 24 || (8usize << ino.dir_depth) > cap {
                return bad("directory hash table does not fit the payload area");
            }
        } else {
            let per = if ino.flags & FLAG_EXT_INDIRECT != 0 {
                8
            } else {
                EXTENT_LEN
            };
            if ino.payload_len as usize * per > cap {
                return bad("extent count exceeds the payload area");
            }
        }
        Ok(ino)
    }
}

/// On-disk extent record size.
pub const EXTENT_LEN: usize = 24;
/// Extent flag: allocated by fallocate, reads as zeros until written.
pub const EXT_UNWRITTEN: u32 = 1;

/// A run of file blocks mapped to contiguous disk blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub len: u32,
    pub flags: u32,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.logical + u64::from(self.len)
    }
    pub fn encode(&self, b: &mut [u8]) {
        put_u64(b, 0, self.logical);
        put_u64(b, 8, self.physical);
        put_u32(b, 16, self.len);
        put_u32(b, 20, self.flags);
    }
    pub fn decode(b: &[u8]) -> Self {
        Extent {
            logical: get_u64(b, 0),
            physical: get_u64(b, 8),
            len: get_u32(b, 16),
            flags: get_u32(b, 20),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_round_trips_and_rejects_flips() {
        let mut ino = Inode::new(77, S_IFREG | 0o644, 1, 2, 4096, 9);
        ino.payload[..5].copy_from_slice(b"hello");
        ino.payload_len = 5;
        ino.size = 5;
        let mut b = vec![0u8; 4096];
        ino.encode_into(&mut b);
        crate::format::seal(&mut b);
        assert_eq!(Inode::decode(&b, 77).unwrap(), ino);
        b[112] = 0xff;
        assert!(
            Inode::decode(&b, 77).is_err(),
            "flags claiming both inline and hashed on a file"
        );
        b[24..28].fill(0xff);
        assert!(Inode::decode(&b, 77).is_err(), "invalid file type");
    }

    #[test]
    fn negative_times_round_trip() {
        let t = Time {
            secs: -5,
            nsecs: 250,
        };
        assert_eq!(Time::from_system(t.to_system()), t);
    }
}
