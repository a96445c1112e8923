//! Byte layout of one metadata superblock slot (4096 bytes, little endian). Pure encode /
//! decode so the fuzz target and the tests exercise exactly what the daemon reads.
//! The full layout and its reasons are in docs/FORMAT.md ("Replicator metadata").

use crate::state::DiskState;
use tandem_common::NodeId;

pub const SLOT_BYTES: usize = 4096;
pub const MD_MAGIC: u64 = u64::from_le_bytes(*b"TNDMETA\x01");
pub const MD_VERSION: u32 = 1;
pub const MAX_PEERS: usize = 15;
pub const NAME_BYTES: usize = 32;
/// Bytes covered by one bitmap bit (DRBD's default).
pub const BITMAP_BLOCK_BYTES: u32 = 4096;

pub const FLAG_CONSISTENT: u32 = 1;
pub const FLAG_WAS_PRIMARY: u32 = 2;
pub const FLAG_CRASHED_PRIMARY: u32 = 4;
/// A write reached our disk but failed for lack of quorum: take a peer's copy.
pub const FLAG_LOST_QUORUM: u32 = 8;
/// Set with `FLAG_CRASHED_PRIMARY` when this node itself stopped as Primary — not a
/// crashed source's doubt inherited through a resync. Only such a node mints a generation
/// after its rollback (`engine::core::mint_after_rollback`): it was the writer of its
/// generation, while a node that merely took its hot extents was not, and minting there
/// forked the lineage beside the real writer's next generation (simulation seed 28203
/// then lost an acknowledged write).
pub const FLAG_CRASHED_HERE: u32 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PeerSlot {
    pub node_id: NodeId,
    /// Generation the bitmap for this peer counts from (0 while connected / unused).
    pub bitmap_uuid: u64,
    /// We were Primary the last time we were connected to this peer: kept current while
    /// connected, frozen when the link goes. Split-brain recovery by
    /// `discard-younger/older-primary` compares it (DRBD keeps it in the bitmap UUID's
    /// low bit). Byte 1 of the slot, bit 0; older builds left the byte zero.
    pub primary_at_loss: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub flags: u32,
    /// Increases with every write; the slot with the higher valid seq wins.
    pub seq: u64,
    pub usable_size_bytes: u64,
    pub backing_size_bytes: u64,
    pub node_id: NodeId,
    pub disk_state: DiskState,
    pub current_uuid: u64,
    pub history_uuids: [u64; 2],
    pub resource: String,
    pub peers: Vec<PeerSlot>,
    /// Byte offset of the metadata area on its device (internal: == usable size).
    pub md_offset: u64,
    /// Offsets of the activity log and the bitmaps, relative to `md_offset`.
    pub al_offset: u64,
    pub bitmap_offset: u64,
    pub bitmap_bytes_per_peer: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("no Tandem metadata found (bad magic {0:#018x}); run `tandemadm create-md`")]
    BadMagic(u64),
    #[error(
        "metadata version {0} is newer than this build supports ({MD_VERSION}); upgrade Tandem"
    )]
    TooNew(u32),
    #[error("metadata checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("metadata field {0} holds an invalid value")]
    BadField(&'static str),
    #[error("metadata slot is {0} bytes, expected {SLOT_BYTES}")]
    Short(usize),
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

const PEERS_AT: usize = 112;
const PEER_BYTES: usize = 16;
const CRC_AT: usize = SLOT_BYTES - 4;

impl Superblock {
    pub fn encode(&self) -> Vec<u8> {
        assert!(self.peers.len() <= MAX_PEERS, "too many peers");
        assert!(self.resource.len() <= NAME_BYTES, "resource name too long");
        let mut b = vec![0u8; SLOT_BYTES];
        put_u64(&mut b, 0, MD_MAGIC);
        put_u32(&mut b, 8, MD_VERSION);
        put_u32(&mut b, 12, self.flags);
        put_u64(&mut b, 16, self.seq);
        put_u64(&mut b, 24, self.usable_size_bytes);
        put_u64(&mut b, 32, self.backing_size_bytes);
        put_u32(&mut b, 40, BITMAP_BLOCK_BYTES);
        b[44] = self.node_id.0;
        b[45] = self.disk_state.to_code();
        b[46] = self.peers.len() as u8;
        put_u64(&mut b, 48, self.current_uuid);
        put_u64(&mut b, 56, self.history_uuids[0]);
        put_u64(&mut b, 64, self.history_uuids[1]);
        b[72..72 + self.resource.len()].copy_from_slice(self.resource.as_bytes());
        put_u64(&mut b, 104, self.md_offset);
        for (i, p) in self.peers.iter().enumerate() {
            let at = PEERS_AT + i * PEER_BYTES;
            b[at] = p.node_id.0;
            b[at + 1] = u8::from(p.primary_at_loss);
            put_u64(&mut b, at + 8, p.bitmap_uuid);
        }
        let tail = PEERS_AT + MAX_PEERS * PEER_BYTES;
        put_u64(&mut b, tail, self.al_offset);
        put_u64(&mut b, tail + 8, self.bitmap_offset);
        put_u64(&mut b, tail + 16, self.bitmap_bytes_per_peer);
        let crc = crc32fast::hash(&b[..CRC_AT]);
        put_u32(&mut b, CRC_AT, crc);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        if b.len() != SLOT_BYTES {
            return Err(FormatError::Short(b.len()));
        }
        let magic = get_u64(b, 0);
        if magic != MD_MAGIC {
            return Err(FormatError::BadMagic(magic));
        }
        let version = get_u32(b, 8);
        if version > MD_VERSION {
            return Err(FormatError::TooNew(version));
        }
        if version == 0 {
            return Err(FormatError::BadField("version"));
        }
        let stored = get_u32(b, CRC_AT);
        let computed = crc32fast::hash(&b[..CRC_AT]);
        if stored != computed {
            return Err(FormatError::Checksum { stored, computed });
        }
        if get_u32(b, 40) != BITMAP_BLOCK_BYTES {
            return Err(FormatError::BadField("bitmap block size"));
        }
        let disk_state = DiskState::from_code(b[45]).ok_or(FormatError::BadField("disk state"))?;
        let n_peers = b[46] as usize;
        if n_peers > MAX_PEERS {
            return Err(FormatError::BadField("peer count"));
        }
        let name_raw = &b[72..72 + NAME_BYTES];
        let name_len = name_raw.iter().position(|&c| c == 0).unwrap_or(NAME_BYTES);
        let resource = std::str::from_utf8(&name_raw[..name_len])
            .map_err(|_| FormatError::BadField("resource name"))?
            .to_string();
        let peers = (0..n_peers)
            .map(|i| {
                let at = PEERS_AT + i * PEER_BYTES;
                PeerSlot {
                    node_id: NodeId(b[at]),
                    bitmap_uuid: get_u64(b, at + 8),
                    primary_at_loss: b[at + 1] & 1 != 0,
                }
            })
            .collect();
        let tail = PEERS_AT + MAX_PEERS * PEER_BYTES;
        let sb = Superblock {
            flags: get_u32(b, 12),
            seq: get_u64(b, 16),
            usable_size_bytes: get_u64(b, 24),
            backing_size_bytes: get_u64(b, 32),
            node_id: NodeId(b[44]),
            disk_state,
            current_uuid: get_u64(b, 48),
            history_uuids: [get_u64(b, 56), get_u64(b, 64)],
            resource,
            peers,
            md_offset: get_u64(b, 104),
            al_offset: get_u64(b, tail),
            bitmap_offset: get_u64(b, tail + 8),
            bitmap_bytes_per_peer: get_u64(b, tail + 16),
        };
        if sb.usable_size_bytes == 0 || !sb.usable_size_bytes.is_multiple_of(4096) {
            return Err(FormatError::BadField("usable size"));
        }
        Ok(sb)
    }
}

/// Bytes of metadata needed for a backing disk of `backing_bytes` with `peers` bitmaps:
/// two superblock slots, the activity log area and one bitmap per peer (4 KiB per bit),
/// each rounded to 4 KiB.
pub fn md_layout(backing_bytes: u64, peers: usize) -> (u64, u64, u64, u64) {
    let al_offset = 2 * SLOT_BYTES as u64;
    let al_bytes = 32 * 1024;
    let bitmap_offset = al_offset + al_bytes;
    let bits = backing_bytes.div_ceil(BITMAP_BLOCK_BYTES as u64);
    let bitmap_bytes_per_peer = bits.div_ceil(8).div_ceil(4096) * 4096;
    let total = bitmap_offset + bitmap_bytes_per_peer * peers.max(1) as u64;
    (total, al_offset, bitmap_offset, bitmap_bytes_per_peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Superblock {
        Superblock {
            flags: FLAG_CONSISTENT,
            seq: 3,
            usable_size_bytes: 1 << 20,
            backing_size_bytes: 2 << 20,
            node_id: NodeId(2),
            disk_state: DiskState::UpToDate,
            current_uuid: 0xABCD,
            history_uuids: [1, 2],
            resource: "www".into(),
            peers: vec![PeerSlot {
                node_id: NodeId(1),
                bitmap_uuid: 0,
                primary_at_loss: true,
            }],
            md_offset: 1 << 20,
            al_offset: 8192,
            bitmap_offset: 8192 + 32768,
            bitmap_bytes_per_peer: 4096,
        }
    }

    #[test]
    fn round_trip() {
        let sb = sample();
        assert_eq!(Superblock::decode(&sb.encode()).unwrap(), sb);
    }

    #[test]
    fn every_bit_flip_is_detected() {
        let bytes = sample().encode();
        for i in (0..SLOT_BYTES).step_by(7) {
            let mut b = bytes.clone();
            b[i] ^= 1;
            assert!(Superblock::decode(&b).is_err(), "flip at {i} accepted");
        }
    }

    #[test]
    fn too_new_is_named() {
        let mut b = sample().encode();
        b[8] = 9;
        assert_eq!(Superblock::decode(&b), Err(FormatError::TooNew(9)));
        assert!(Superblock::decode(&b[..100]).is_err());
    }

    #[test]
    fn layout_scales_with_disk() {
        let (total, _, _, per_peer) = md_layout(1 << 30, 2);
        assert_eq!(per_peer, 32 * 1024);
        assert!(total < 1 << 20);
    }
}
