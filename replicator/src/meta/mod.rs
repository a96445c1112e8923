//! Replicator metadata: two checksummed superblock slots written alternately (a crash in
//! the middle of an update leaves the other slot intact), an activity-log area and one
//! dirty bitmap per peer. Internal metadata sits at the end of the backing disk; external
//! metadata at the start of its own file or device.

pub mod format;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use format::{md_layout, FormatError, PeerSlot, Superblock, SLOT_BYTES};
use tandem_common::config::{ClusterConfig, ResourceConfig};
use tandem_common::size::format_bytes;
use tandem_common::NodeId;

use crate::backing::device_size;
use crate::state::DiskState;

/// Smallest usable volume we create.
pub const MIN_USABLE_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Format { path: PathBuf, source: FormatError },
    #[error("{path}: both metadata slots are unreadable ({a}; {b}); the metadata is corrupt — restore it with `tandemadm create-md --force` and a full resync from a peer")]
    BothSlotsBad {
        path: PathBuf,
        a: FormatError,
        b: FormatError,
    },
    #[error(
        "{path} holds metadata of resource `{found}`, not `{expected}`: wrong disk configured?"
    )]
    WrongResource {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("{path} holds metadata of node id {found}, but this is node id {expected}")]
    WrongNode {
        path: PathBuf,
        found: NodeId,
        expected: NodeId,
    },
    #[error("{path} is too small: {have} available, {need} needed ({why})")]
    TooSmall {
        path: PathBuf,
        have: String,
        need: String,
        why: String,
    },
    #[error("{path} already has Tandem metadata; use `tandemadm wipe-md` first or pass --force")]
    Exists { path: PathBuf },
    #[error("backing disk {path} does not exist and resource `{resource}` sets no `size` to create it with")]
    NoDisk { path: PathBuf, resource: String },
    #[error(
        "node `{node}` is a diskless tiebreaker of resource `{resource}`: it has no metadata; set resource.on.{node}.disk to give it a copy of the data"
    )]
    Diskless { node: String, resource: String },
    #[error("{0}")]
    Config(#[from] tandem_common::ConfigError),
}

/// Where the metadata lives and the handle to update it.
pub struct MetaStore {
    path: PathBuf,
    file: Arc<File>,
    /// Byte offset of slot 0 on `file`.
    base: u64,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> MetaError + '_ {
    move |source| MetaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl MetaStore {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads both slots and returns the newest valid one.
    pub fn read(&self) -> Result<Superblock, MetaError> {
        let mut slots = Vec::with_capacity(2);
        for i in 0..2u64 {
            let mut buf = vec![0u8; SLOT_BYTES];
            self.file
                .read_exact_at(&mut buf, self.base + i * SLOT_BYTES as u64)
                .map_err(io_err(&self.path))?;
            slots.push(Superblock::decode(&buf));
        }
        let b = slots.pop().expect("two slots");
        let a = slots.pop().expect("two slots");
        match (a, b) {
            (Ok(a), Ok(b)) => Ok(if b.seq > a.seq { b } else { a }),
            (Ok(a), Err(_)) => Ok(a),
            (Err(_), Ok(b)) => Ok(b),
            (Err(a), Err(b)) => {
                // A single clear reason when both are "not metadata at all".
                if matches!(a, FormatError::BadMagic(_)) && matches!(b, FormatError::BadMagic(_)) {
                    Err(MetaError::Format {
                        path: self.path.clone(),
                        source: a,
                    })
                } else {
                    Err(MetaError::BothSlotsBad {
                        path: self.path.clone(),
                        a,
                        b,
                    })
                }
            }
        }
    }

    /// Writes `sb` with the next sequence number into the older slot and makes it durable.
    pub fn write(&self, sb: &mut Superblock) -> Result<(), MetaError> {
        sb.seq += 1;
        let slot = sb.seq % 2;
        self.file
            .write_all_at(&sb.encode(), self.base + slot * SLOT_BYTES as u64)
            .map_err(io_err(&self.path))?;
        self.file.sync_data().map_err(io_err(&self.path))
    }

    fn bitmap_base(&self, sb: &Superblock, slot: usize) -> u64 {
        self.base + sb.bitmap_offset + slot as u64 * sb.bitmap_bytes_per_peer
    }

    /// Reads the on-disk dirty bitmap of peer slot `slot`.
    pub fn read_bitmap(&self, sb: &Superblock, slot: usize) -> Result<Vec<u8>, MetaError> {
        let mut buf = vec![0u8; sb.bitmap_bytes_per_peer as usize];
        self.file
            .read_exact_at(&mut buf, self.bitmap_base(sb, slot))
            .map_err(io_err(&self.path))?;
        Ok(buf)
    }

    /// Writes changed 4 KiB bitmap pages of peer slot `slot` and makes them durable.
    pub fn write_bitmap_pages(
        &self,
        sb: &Superblock,
        slot: usize,
        pages: &[(usize, Vec<u8>)],
    ) -> Result<(), MetaError> {
        let base = self.bitmap_base(sb, slot);
        for (page, bytes) in pages {
            let at = *page as u64 * 4096;
            if at + bytes.len() as u64 > sb.bitmap_bytes_per_peer {
                continue;
            }
            self.file
                .write_all_at(bytes, base + at)
                .map_err(io_err(&self.path))?;
        }
        self.file.sync_data().map_err(io_err(&self.path))
    }

    /// Bytes of the activity-log area (one bit per 4 MiB extent).
    pub const AL_BYTES: usize = 32 * 1024;

    /// Reads the activity-log area.
    pub fn read_al(&self, sb: &Superblock) -> Result<Vec<u8>, MetaError> {
        let mut buf = vec![0u8; Self::AL_BYTES];
        self.file
            .read_exact_at(&mut buf, self.base + sb.al_offset)
            .map_err(io_err(&self.path))?;
        Ok(buf)
    }

    /// Writes activity-log pages and makes them durable.
    pub fn write_al_pages(
        &self,
        sb: &Superblock,
        pages: &[(usize, Vec<u8>)],
    ) -> Result<(), MetaError> {
        for (page, bytes) in pages {
            let at = *page * 4096;
            if at + bytes.len() > Self::AL_BYTES {
                continue;
            }
            self.file
                .write_all_at(bytes, self.base + sb.al_offset + at as u64)
                .map_err(io_err(&self.path))?;
        }
        self.file.sync_data().map_err(io_err(&self.path))
    }

    /// Zeroes both slots (`wipe-md`).
    pub fn wipe(&self) -> Result<(), MetaError> {
        self.file
            .write_all_at(&vec![0u8; 2 * SLOT_BYTES], self.base)
            .map_err(io_err(&self.path))?;
        self.file.sync_data().map_err(io_err(&self.path))
    }
}

/// Resolved locations of a resource's disk and metadata on one node.
pub struct DiskPlan {
    pub disk: PathBuf,
    pub external_meta: Option<PathBuf>,
    pub node_id: NodeId,
    pub peers: Vec<NodeId>,
}

pub fn plan(
    config: &ClusterConfig,
    res: &ResourceConfig,
    node: &str,
) -> Result<DiskPlan, MetaError> {
    let me = config.node(node)?;
    let disk = config
        .disk_for(res, node)
        .ok_or_else(|| MetaError::Diskless {
            node: node.to_string(),
            resource: res.name.clone(),
        })?;
    // Bitmap slots only for peers that hold data: a diskless tiebreaker misses nothing.
    let peers = config
        .resource_node_names(res)
        .iter()
        .filter(|n| n.as_str() != node && !config.is_diskless(res, n))
        .filter_map(|n| config.node(n).ok().map(|c| c.node_id()))
        .collect();
    Ok(DiskPlan {
        disk,
        external_meta: config.external_meta_for(res, node),
        node_id: me.node_id(),
        peers,
    })
}

fn open_rw(path: &Path) -> Result<File, MetaError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(path))
}

/// Opens the metadata of an existing resource disk and checks it belongs here.
pub fn open(
    config: &ClusterConfig,
    res: &ResourceConfig,
    node: &str,
) -> Result<(MetaStore, Superblock), MetaError> {
    let plan = plan(config, res, node)?;
    let (store, backing_bytes) = locate(&plan)?;
    let sb = store.read()?;
    if sb.resource != res.name {
        return Err(MetaError::WrongResource {
            path: store.path.clone(),
            found: sb.resource,
            expected: res.name.clone(),
        });
    }
    if sb.node_id != plan.node_id {
        return Err(MetaError::WrongNode {
            path: store.path.clone(),
            found: sb.node_id,
            expected: plan.node_id,
        });
    }
    let need = if plan.external_meta.is_none() {
        sb.md_offset + md_layout(sb.backing_size_bytes, sb.peers.len()).0
    } else {
        sb.usable_size_bytes
    };
    if backing_bytes < need || sb.md_offset < sb.usable_size_bytes && plan.external_meta.is_none() {
        return Err(MetaError::TooSmall {
            path: plan.disk.clone(),
            have: format_bytes(backing_bytes),
            need: format_bytes(need),
            why: "the disk shrank since create-md".into(),
        });
    }
    Ok((store, sb))
}

/// Finds the metadata area: the end of the disk (internal) or an external file.
fn locate(plan: &DiskPlan) -> Result<(MetaStore, u64), MetaError> {
    let disk = open_rw(&plan.disk)?;
    let backing_bytes = device_size(&disk).map_err(io_err(&plan.disk))?;
    match &plan.external_meta {
        Some(meta) => {
            let f = open_rw(meta)?;
            Ok((
                MetaStore {
                    path: meta.clone(),
                    file: Arc::new(f),
                    base: 0,
                },
                backing_bytes,
            ))
        }
        None => {
            let (md_total, ..) = md_layout(backing_bytes, plan.peers.len());
            if backing_bytes < md_total + MIN_USABLE_BYTES {
                return Err(MetaError::TooSmall {
                    path: plan.disk.clone(),
                    have: format_bytes(backing_bytes),
                    need: format_bytes(md_total + MIN_USABLE_BYTES),
                    why: "internal metadata plus at least 1 MiB of data".into(),
                });
            }
            let md_offset = (backing_bytes - md_total) / 4096 * 4096;
            Ok((
                MetaStore {
                    path: plan.disk.clone(),
                    file: Arc::new(disk),
                    base: md_offset,
                },
                backing_bytes,
            ))
        }
    }
}

/// `tandemadm create-md`: writes fresh metadata (Inconsistent, no generation yet).
/// A missing file-backed disk is created (sparse) from `resource.size`.
pub fn create(
    config: &ClusterConfig,
    res: &ResourceConfig,
    node: &str,
    force: bool,
) -> Result<Superblock, MetaError> {
    let plan = plan(config, res, node)?;
    let want = res.size_bytes();
    let peers = plan.peers.len();
    if !plan.disk.exists() {
        let size = want.ok_or_else(|| MetaError::NoDisk {
            path: plan.disk.clone(),
            resource: res.name.clone(),
        })?;
        let total = if plan.external_meta.is_some() {
            size
        } else {
            // Grow until the usable part (after metadata) holds `size`.
            let mut total = size + md_layout(size, peers).0;
            while total - md_layout(total, peers).0 < size {
                total += 4096;
            }
            total
        };
        if let Some(parent) = plan.disk.parent() {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        let f = File::create(&plan.disk).map_err(io_err(&plan.disk))?;
        f.set_len(total).map_err(io_err(&plan.disk))?;
    }
    if let Some(meta) = &plan.external_meta {
        if !meta.exists() {
            let disk = File::open(&plan.disk).map_err(io_err(&plan.disk))?;
            let bytes = device_size(&disk).map_err(io_err(&plan.disk))?;
            let f = File::create(meta).map_err(io_err(meta))?;
            f.set_len(md_layout(bytes, peers).0).map_err(io_err(meta))?;
        }
    }
    let (store, backing_bytes) = locate(&plan)?;
    if !force && store.read().is_ok() {
        return Err(MetaError::Exists {
            path: store.path.clone(),
        });
    }
    let (md_total, al_offset, bitmap_offset, bitmap_bytes_per_peer) =
        md_layout(backing_bytes, peers);
    let (md_offset, max_usable) = match &plan.external_meta {
        Some(meta) => {
            let f = File::open(meta).map_err(io_err(meta))?;
            let have = device_size(&f).map_err(io_err(meta))?;
            if have < md_total {
                return Err(MetaError::TooSmall {
                    path: meta.clone(),
                    have: format_bytes(have),
                    need: format_bytes(md_total),
                    why: "external metadata".into(),
                });
            }
            (0, backing_bytes / 4096 * 4096)
        }
        None => {
            let off = (backing_bytes - md_total) / 4096 * 4096;
            (off, off)
        }
    };
    let usable = match want {
        Some(size) if size > max_usable => {
            return Err(MetaError::TooSmall {
                path: plan.disk.clone(),
                have: format_bytes(max_usable),
                need: format_bytes(size),
                why: format!("resource.{}.size after metadata", res.name),
            })
        }
        Some(size) => size,
        None => max_usable,
    };
    let mut sb = Superblock {
        flags: 0,
        seq: 0,
        usable_size_bytes: usable,
        backing_size_bytes: backing_bytes,
        node_id: plan.node_id,
        disk_state: DiskState::Inconsistent,
        current_uuid: 0,
        history_uuids: [0, 0],
        resource: res.name.clone(),
        peers: plan
            .peers
            .iter()
            .map(|&node_id| PeerSlot {
                node_id,
                bitmap_uuid: 0,
                primary_at_loss: false,
            })
            .collect(),
        md_offset,
        al_offset,
        bitmap_offset,
        bitmap_bytes_per_peer,
    };
    // Zero the AL and bitmap areas, then write both slots (seq 1 and 2).
    store
        .file
        .write_all_at(&vec![0u8; (md_total as usize).min(64 << 20)], store.base)
        .map_err(io_err(&store.path))?;
    store.write(&mut sb)?;
    store.write(&mut sb)?;
    Ok(sb)
}

#[cfg(test)]
mod tests;
