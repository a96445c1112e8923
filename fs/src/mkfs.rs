//! Making a filesystem: computing the layout and writing superblock, journals, resource
//! groups and the root directory.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::block::BlockDevice;
use crate::error::{FsError, Result};
use crate::format::{
    self, BlockType, LockProto, RgHeader, Superblock, FORMAT_VERSION, MAX_JOURNALS,
};
use crate::inode::{Inode, S_IFDIR};
use crate::journal::Journal;
use crate::store::Store;

/// What `mkfs.tandem` was asked for.
#[derive(Debug, Clone)]
pub struct MkfsOptions {
    /// `cluster:fsname`.
    pub lock_table: String,
    pub journals: u32,
    /// Journal size in MiB; None picks a size that fits the device.
    pub journal_mib: Option<u64>,
    pub block_size: u32,
    pub lock_proto: LockProto,
}

/// Largest resource group: 256 MiB of blocks, GFS2's default.
const RG_MAX_BYTES: u64 = 256 << 20;
const DEFAULT_JOURNAL_MIB: u64 = 32;

/// Validates `cluster:fsname` the way mkfs.gfs2 does: both parts present, fsname 1–16 chars.
pub fn validate_lock_table(t: &str) -> std::result::Result<(), String> {
    let (cluster, fsname) = t
        .split_once(':')
        .ok_or_else(|| format!("lock table {t:?} must be CLUSTER:FSNAME"))?;
    let ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if !ok(cluster) || cluster.len() > 32 {
        return Err(format!(
            "cluster name {cluster:?} must be 1-32 of [A-Za-z0-9-_.]"
        ));
    }
    if !ok(fsname) || fsname.len() > 16 {
        return Err(format!(
            "filesystem name {fsname:?} must be 1-16 of [A-Za-z0-9-_.]"
        ));
    }
    Ok(())
}

/// Formats `dev` and returns the new superblock.
pub fn mkfs(dev: Arc<dyn BlockDevice>, opts: &MkfsOptions) -> Result<Superblock> {
    let bs = opts.block_size;
    if !(format::MIN_BLOCK_SIZE..=format::MAX_BLOCK_SIZE).contains(&bs) || !bs.is_power_of_two() {
        return Err(FsError::Invalid(
            "block size must be a power of two between 1024 and 65536",
        ));
    }
    if opts.journals == 0 || opts.journals > MAX_JOURNALS {
        return Err(FsError::Invalid("journal count must be between 1 and 64"));
    }
    validate_lock_table(&opts.lock_table)
        .map_err(|_| FsError::Invalid("lock table must be CLUSTER:FSNAME"))?;
    let total = dev.size_bytes() / u64::from(bs);
    let journal_blocks = match opts.journal_mib {
        Some(mib) => (mib << 20) / u64::from(bs),
        None => ((DEFAULT_JOURNAL_MIB << 20) / u64::from(bs))
            .min(total / 4 / u64::from(opts.journals))
            .max(64),
    };
    if journal_blocks < 64 || journal_blocks > u64::from(u32::MAX) {
        return Err(FsError::Invalid("journal size out of range"));
    }
    let rg_start = 1 + u64::from(opts.journals) * journal_blocks;
    if total < rg_start + 64 {
        return Err(FsError::NoSpace);
    }
    let remaining = total - rg_start;
    let rg_blocks = (RG_MAX_BYTES / u64::from(bs)).min((remaining / 4).max(64));
    let mut rg_count = remaining.div_ceil(rg_blocks);
    let mut block_count = total;
    if remaining % rg_blocks != 0 && remaining % rg_blocks < 16 {
        rg_count -= 1;
        block_count = rg_start + rg_count * rg_blocks;
    }
    let mut uuid = [0u8; 16];
    rand::Rng::fill(&mut rand::thread_rng(), &mut uuid[..]);
    let mut sb = Superblock {
        version: FORMAT_VERSION,
        block_size: bs,
        block_count,
        uuid,
        lock_proto: opts.lock_proto,
        lock_table: opts.lock_table.clone(),
        journal_count: opts.journals,
        journal_blocks: journal_blocks as u32,
        journal_start: 1,
        rg_start,
        rg_blocks: rg_blocks as u32,
        rg_count: rg_count as u32,
        root_block: 0,
        created_secs: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    // Invalidate any old superblock first so a half-made filesystem is never mounted.
    dev.write_at(&vec![0u8; bs as usize], 0)?;
    dev.flush()?;
    for j in 0..opts.journals {
        Journal::format(&*dev, &sb, j)?;
    }
    let mut st = Store::bare(dev.clone(), sb.clone());
    for i in 0..sb.rg_count {
        let (start, len) = sb.rg_range(i);
        let (bm, data) = format::rg_geometry(len, bs as usize);
        let h = RgHeader {
            index: i,
            bitmap_blocks: bm,
            data0: start + 1 + u64::from(bm),
            data_count: data,
            free: data,
            inodes: 0,
            unlinked: 0,
            igeneration: 1,
        };
        h.encode_into(st.meta_new(start, BlockType::RgHeader), start);
        for k in 0..u64::from(bm) {
            st.meta_new(start + 1 + k, BlockType::Bitmap);
        }
        // Flush in batches so huge devices do not hold every bitmap in memory.
        if st.dirty_count() > 4096 {
            st.commit()?;
        }
    }
    st.commit()?;
    st.load_rgs()?;
    let (root, generation) = st.alloc_inode_block(sb.rg_start)?;
    let mut ino = Inode::new(root, S_IFDIR | 0o755, 0, 0, bs as usize, generation);
    ino.nlink = 2;
    ino.parent = root;
    ino.size = u64::from(bs);
    st.put_inode(&ino)?;
    st.commit()?;
    sb.root_block = root;
    dev.write_at(&sb.encode(bs as usize), 0)?;
    dev.flush()?;
    Ok(sb)
}
