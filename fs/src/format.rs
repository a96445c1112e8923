//! On-disk layout: the byte-exact encoding of every block type (see docs/FORMAT.md).
//!
//! All integers are little-endian. Every metadata block starts with the same 24-byte header
//! (magic, type, format version, CRC-32, home block number) so fsck, journal replay and the
//! block cache can tell a misdirected, torn or foreign block from a valid one.

use thiserror::Error;

/// "TNDM" read as a little-endian u32.
pub const MAGIC: u32 = 0x4D44_4E54;
/// Format version written by this code. A superblock with a higher version is refused.
pub const FORMAT_VERSION: u32 = 1;
/// Length of the common metadata header.
pub const HDR_LEN: usize = 24;
/// Smallest and largest supported block sizes.
pub const MIN_BLOCK_SIZE: u32 = 1024;
pub const MAX_BLOCK_SIZE: u32 = 65536;
/// Longest file name, as on ext4 and GFS2.
pub const NAME_MAX: usize = 255;
/// Superblock lives in block 0.
pub const SB_BLOCK: u64 = 0;
/// Most journals a filesystem can have (one per node).
pub const MAX_JOURNALS: u32 = 64;

/// Block types stored in the header's `type` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum BlockType {
    Super = 1,
    RgHeader = 2,
    Bitmap = 3,
    Inode = 4,
    ExtentLeaf = 5,
    DirLeaf = 6,
    JournalHeader = 7,
    JournalDesc = 8,
    JournalCommit = 9,
    Xattr = 10,
}

impl BlockType {
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::Super,
            2 => Self::RgHeader,
            3 => Self::Bitmap,
            4 => Self::Inode,
            5 => Self::ExtentLeaf,
            6 => Self::DirLeaf,
            7 => Self::JournalHeader,
            8 => Self::JournalDesc,
            9 => Self::JournalCommit,
            10 => Self::Xattr,
            _ => return None,
        })
    }
}

/// Why a block failed validation. Messages read as sentences for fsck and mount errors.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FormatError {
    #[error("block {block}: bad magic {found:#010x} (not a tandem metadata block)")]
    BadMagic { block: u64, found: u32 },
    #[error("block {block}: expected a {expected:?} block, found type {found}")]
    WrongType {
        block: u64,
        expected: BlockType,
        found: u16,
    },
    #[error("block {block}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadChecksum {
        block: u64,
        stored: u32,
        computed: u32,
    },
    #[error("block {block}: header says it belongs at block {home} (misdirected write)")]
    Misplaced { block: u64, home: u64 },
    #[error(
        "block {block}: format version {found} is newer than supported version {FORMAT_VERSION}"
    )]
    TooNew { block: u64, found: u32 },
    #[error("block {block}: {what}")]
    Invalid { block: u64, what: String },
}

pub fn get_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().expect("2 bytes"))
}
pub fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
pub fn get_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}
pub fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Writes a fresh header (type, version, home block) into `buf`; the CRC is set by [`seal`].
pub fn init_header(buf: &mut [u8], ty: BlockType, blkno: u64) {
    put_u32(buf, 0, MAGIC);
    put_u16(buf, 4, ty as u16);
    put_u16(buf, 6, FORMAT_VERSION as u16);
    put_u32(buf, 8, 0);
    put_u32(buf, 12, 0);
    put_u64(buf, 16, blkno);
}

fn block_crc(buf: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&buf[..8]);
    h.update(&[0u8; 4]);
    h.update(&buf[12..]);
    h.finalize()
}

/// Recomputes the checksum; called on every metadata block right before it goes to disk.
pub fn seal(buf: &mut [u8]) {
    let crc = block_crc(buf);
    put_u32(buf, 8, crc);
}

/// The type stored in a header, if the magic is right.
pub fn peek_type(buf: &[u8]) -> Option<u16> {
    (buf.len() >= HDR_LEN && get_u32(buf, 0) == MAGIC).then(|| get_u16(buf, 4))
}

/// Validates magic, type, version, checksum and home address of a metadata block.
pub fn check(buf: &[u8], ty: BlockType, blkno: u64) -> Result<(), FormatError> {
    // A short buffer (a truncated image, a fuzzer) is "not a metadata block", not a panic.
    if buf.len() < HDR_LEN {
        return Err(FormatError::BadMagic {
            block: blkno,
            found: 0,
        });
    }
    let magic = get_u32(buf, 0);
    if magic != MAGIC {
        return Err(FormatError::BadMagic {
            block: blkno,
            found: magic,
        });
    }
    let found = get_u16(buf, 4);
    if found != ty as u16 {
        return Err(FormatError::WrongType {
            block: blkno,
            expected: ty,
            found,
        });
    }
    let version = u32::from(get_u16(buf, 6));
    if version > FORMAT_VERSION {
        return Err(FormatError::TooNew {
            block: blkno,
            found: version,
        });
    }
    let stored = get_u32(buf, 8);
    let computed = block_crc(buf);
    if stored != computed {
        return Err(FormatError::BadChecksum {
            block: blkno,
            stored,
            computed,
        });
    }
    let home = get_u64(buf, 16);
    if home != blkno {
        return Err(FormatError::Misplaced { block: blkno, home });
    }
    Ok(())
}

/// Lock protocols a filesystem can be made with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockProto {
    /// Cluster filesystem: every mount takes glocks in tandem-lockd.
    Tandem,
    /// Single-node filesystem: mounts without any lock manager.
    NoLock,
}

impl LockProto {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tandem => "lock_tandem",
            Self::NoLock => "lock_nolock",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "lock_tandem" => Some(Self::Tandem),
            "lock_nolock" => Some(Self::NoLock),
            _ => None,
        }
    }
}

/// Decoded superblock (block 0). Field offsets are listed in docs/FORMAT.md.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub version: u32,
    pub block_size: u32,
    pub block_count: u64,
    pub uuid: [u8; 16],
    pub lock_proto: LockProto,
    /// `cluster:fsname`, at most 63 bytes.
    pub lock_table: String,
    pub journal_count: u32,
    pub journal_blocks: u32,
    pub journal_start: u64,
    pub rg_start: u64,
    pub rg_blocks: u32,
    pub rg_count: u32,
    pub root_block: u64,
    pub created_secs: u64,
}

const SB_LOCKPROTO: usize = 48;
const SB_LOCKTABLE: usize = 64;
const SB_LOCKTABLE_LEN: usize = 64;

impl Superblock {
    pub fn encode(&self, bs: usize) -> Vec<u8> {
        let mut b = vec![0u8; bs];
        init_header(&mut b, BlockType::Super, SB_BLOCK);
        put_u32(&mut b, 24, self.version);
        put_u32(&mut b, 28, self.block_size);
        put_u64(&mut b, 32, self.block_count);
        b[40..48].copy_from_slice(&self.uuid[..8]);
        // uuid continues at 160 so the lock strings stay 16-byte aligned.
        let proto = self.lock_proto.as_str().as_bytes();
        b[SB_LOCKPROTO..SB_LOCKPROTO + proto.len()].copy_from_slice(proto);
        let table = self.lock_table.as_bytes();
        b[SB_LOCKTABLE..SB_LOCKTABLE + table.len()].copy_from_slice(table);
        put_u32(&mut b, 128, self.journal_count);
        put_u32(&mut b, 132, self.journal_blocks);
        put_u64(&mut b, 136, self.journal_start);
        put_u64(&mut b, 144, self.rg_start);
        put_u32(&mut b, 152, self.rg_blocks);
        put_u32(&mut b, 156, self.rg_count);
        b[160..168].copy_from_slice(&self.uuid[8..]);
        put_u64(&mut b, 168, self.root_block);
        put_u64(&mut b, 176, self.created_secs);
        seal(&mut b);
        b
    }

    /// Decodes and sanity-checks a superblock; every inconsistency is an error, not a panic.
    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        let bad = |what: String| FormatError::Invalid {
            block: SB_BLOCK,
            what,
        };
        if b.len() < 512 {
            return Err(bad("device is too small to hold a superblock".into()));
        }
        let magic = get_u32(b, 0);
        if magic != MAGIC || get_u16(b, 4) != BlockType::Super as u16 {
            return Err(bad(
                "no tandem superblock found (not a tandem filesystem)".into()
            ));
        }
        let version = get_u32(b, 24);
        if version > FORMAT_VERSION {
            return Err(FormatError::TooNew {
                block: SB_BLOCK,
                found: version,
            });
        }
        let block_size = get_u32(b, 28);
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) || !block_size.is_power_of_two()
        {
            return Err(bad(format!("invalid block size {block_size}")));
        }
        if b.len() < block_size as usize {
            return Err(bad("superblock buffer shorter than the block size".into()));
        }
        check(&b[..block_size as usize], BlockType::Super, SB_BLOCK)?;
        let cstr = |s: &[u8]| -> Result<String, FormatError> {
            let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
            String::from_utf8(s[..end].to_vec()).map_err(|_| bad("lock string is not UTF-8".into()))
        };
        let proto = cstr(&b[SB_LOCKPROTO..SB_LOCKTABLE])?;
        let lock_proto = LockProto::parse(&proto)
            .ok_or_else(|| bad(format!("unknown lock protocol {proto:?}")))?;
        let lock_table = cstr(&b[SB_LOCKTABLE..SB_LOCKTABLE + SB_LOCKTABLE_LEN])?;
        let mut uuid = [0u8; 16];
        uuid[..8].copy_from_slice(&b[40..48]);
        uuid[8..].copy_from_slice(&b[160..168]);
        let sb = Superblock {
            version,
            block_size,
            block_count: get_u64(b, 32),
            uuid,
            lock_proto,
            lock_table,
            journal_count: get_u32(b, 128),
            journal_blocks: get_u32(b, 132),
            journal_start: get_u64(b, 136),
            rg_start: get_u64(b, 144),
            rg_blocks: get_u32(b, 152),
            rg_count: get_u32(b, 156),
            root_block: get_u64(b, 168),
            created_secs: get_u64(b, 176),
        };
        sb.validate().map_err(bad)?;
        Ok(sb)
    }

    fn validate(&self) -> Result<(), String> {
        if self.journal_count == 0 || self.journal_count > MAX_JOURNALS {
            return Err(format!("journal count {} out of range", self.journal_count));
        }
        if self.journal_blocks < 16 {
            return Err(format!(
                "journal of {} blocks is too small",
                self.journal_blocks
            ));
        }
        let jend = u64::from(self.journal_count)
            .checked_mul(u64::from(self.journal_blocks))
            .and_then(|v| v.checked_add(self.journal_start))
            .ok_or("journal area overflows")?;
        if self.journal_start == 0 || jend > self.rg_start {
            return Err("journals overlap the superblock or resource groups".into());
        }
        if self.rg_count == 0 || self.rg_blocks < 8 {
            return Err("no resource groups".into());
        }
        let last_start = u64::from(self.rg_count - 1)
            .checked_mul(u64::from(self.rg_blocks))
            .and_then(|v| v.checked_add(self.rg_start))
            .ok_or("resource group index overflows")?;
        if last_start + 8 > self.block_count {
            return Err("resource groups extend past the end of the filesystem".into());
        }
        if self.block_count > last_start + u64::from(self.rg_blocks) {
            return Err("blocks past the last resource group".into());
        }
        // 2^60 bytes (1 EiB): far beyond any device, and every size product stays in a u64.
        if self
            .block_count
            .checked_mul(u64::from(self.block_size))
            .is_none_or(|b| b > 1 << 60)
        {
            return Err(format!(
                "filesystem of {} blocks of {} bytes is impossibly large",
                self.block_count, self.block_size
            ));
        }
        if self.root_block < self.rg_start || self.root_block >= self.block_count {
            return Err(format!(
                "root inode block {} outside the data area",
                self.root_block
            ));
        }
        Ok(())
    }

    /// First block of resource group `i`, and its length in blocks (the last one may be short).
    pub fn rg_range(&self, i: u32) -> (u64, u64) {
        let start = self.rg_start + u64::from(i) * u64::from(self.rg_blocks);
        let len = (self.block_count - start).min(u64::from(self.rg_blocks));
        (start, len)
    }

    /// First block of journal `i` (its header block).
    pub fn journal_range(&self, i: u32) -> (u64, u64) {
        (
            self.journal_start + u64::from(i) * u64::from(self.journal_blocks),
            u64::from(self.journal_blocks),
        )
    }
}

/// Allocation states: two bits per block, as in GFS2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    Free = 0,
    /// Data, extent leaf, directory leaf or xattr block.
    Used = 1,
    /// An inode whose link count reached zero while still open; freed at next mount or by fsck.
    Unlinked = 2,
    Inode = 3,
}

impl BlockState {
    pub fn from_bits(v: u8) -> Self {
        match v & 3 {
            0 => Self::Free,
            1 => Self::Used,
            2 => Self::Unlinked,
            _ => Self::Inode,
        }
    }
}

/// Resource-group header (first block of each group). Bitmap blocks follow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgHeader {
    pub index: u32,
    pub bitmap_blocks: u32,
    /// First block covered by the bitmap.
    pub data0: u64,
    /// Number of blocks covered by the bitmap.
    pub data_count: u32,
    pub free: u32,
    pub inodes: u32,
    /// Inodes in state UNLINKED, so mount only scans groups that have some.
    pub unlinked: u32,
    pub igeneration: u64,
}

impl RgHeader {
    pub fn encode_into(&self, b: &mut [u8], blkno: u64) {
        b.fill(0);
        init_header(b, BlockType::RgHeader, blkno);
        put_u32(b, 24, self.index);
        put_u32(b, 28, self.bitmap_blocks);
        put_u64(b, 32, self.data0);
        put_u32(b, 40, self.data_count);
        put_u32(b, 44, self.free);
        put_u32(b, 48, self.inodes);
        put_u32(b, 52, self.unlinked);
        put_u64(b, 56, self.igeneration);
    }
    /// Decodes a header whose checksum was verified when it was read.
    pub fn decode(b: &[u8], blkno: u64) -> Result<Self, FormatError> {
        let rg = RgHeader {
            index: get_u32(b, 24),
            bitmap_blocks: get_u32(b, 28),
            data0: get_u64(b, 32),
            data_count: get_u32(b, 40),
            free: get_u32(b, 44),
            inodes: get_u32(b, 48),
            unlinked: get_u32(b, 52),
            igeneration: get_u64(b, 56),
        };
        if rg.data0 != blkno + 1 + u64::from(rg.bitmap_blocks)
            || rg.free > rg.data_count
            || rg.unlinked > rg.inodes
        {
            return Err(FormatError::Invalid {
                block: blkno,
                what: "resource group header fields disagree".into(),
            });
        }
        Ok(rg)
    }
}

/// Bits of bitmap payload per bitmap block (after the header).
pub fn bitmap_blocks_per(bs: usize) -> usize {
    (bs - HDR_LEN) * 4
}

/// Computes the bitmap size for a group of `rg_len` blocks: header + bitmaps + data.
pub fn rg_geometry(rg_len: u64, bs: usize) -> (u32, u32) {
    let per = bitmap_blocks_per(bs) as u64;
    // Each bitmap block covers `per` data blocks and costs one block itself.
    let avail = rg_len - 1;
    let bm = avail.div_ceil(per + 1);
    let data = (avail - bm).min(bm * per);
    (bm as u32, data as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            version: FORMAT_VERSION,
            block_size: 4096,
            block_count: 16384,
            uuid: [7; 16],
            lock_proto: LockProto::NoLock,
            lock_table: "alpha:www".into(),
            journal_count: 2,
            journal_blocks: 1024,
            journal_start: 1,
            rg_start: 2049,
            rg_blocks: 4096,
            rg_count: 4,
            root_block: 2060,
            created_secs: 1,
        }
    }

    #[test]
    fn superblock_round_trips() {
        let sb = sample();
        let b = sb.encode(4096);
        assert_eq!(Superblock::decode(&b).unwrap(), sb);
    }

    #[test]
    fn superblock_bit_flips_are_errors_not_panics() {
        let b = sample().encode(4096);
        for i in 0..512 * 8 {
            let mut c = b.clone();
            c[i / 8] ^= 1 << (i % 8);
            assert!(
                Superblock::decode(&c).is_err(),
                "flip of bit {i} went unnoticed"
            );
        }
        for len in [0usize, 10, 511, 600] {
            assert!(Superblock::decode(&b[..len]).is_err());
        }
    }

    #[test]
    fn newer_version_is_refused() {
        let mut sb = sample();
        sb.version = FORMAT_VERSION + 1;
        let b = sb.encode(4096);
        assert!(matches!(
            Superblock::decode(&b),
            Err(FormatError::TooNew { .. })
        ));
    }

    #[test]
    fn header_detects_misdirected_writes() {
        let mut b = vec![0u8; 1024];
        init_header(&mut b, BlockType::Inode, 42);
        seal(&mut b);
        assert!(check(&b, BlockType::Inode, 42).is_ok());
        assert!(matches!(
            check(&b, BlockType::Inode, 43),
            Err(FormatError::Misplaced { .. })
        ));
        assert!(matches!(
            check(&b, BlockType::DirLeaf, 42),
            Err(FormatError::WrongType { .. })
        ));
    }

    #[test]
    fn rg_geometry_covers_every_block() {
        for len in [9u64, 100, 4096, 65536, 65537] {
            let (bm, data) = rg_geometry(len, 4096);
            assert!(1 + u64::from(bm) + u64::from(data) <= len);
            assert!(u64::from(data) <= u64::from(bm) * bitmap_blocks_per(4096) as u64);
        }
    }
}
