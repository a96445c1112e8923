//! Acknowledged-write oracle (crucible's WriteLog idea): each block's content encodes
//! (block, generation); the writer records the generation of the last acknowledged write
//! and of the one in flight. After a crash a block must hold the acknowledged generation
//! or the in-flight one, never anything older.

use std::collections::BTreeMap;

pub const BLOCK_BYTES: usize = 4096;

/// The block content for a generation: a header then a pattern, all derived from both.
pub fn block_data(block: u64, generation: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_BYTES];
    b[0..8].copy_from_slice(&block.to_le_bytes());
    b[8..16].copy_from_slice(&generation.to_le_bytes());
    let seed = block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ generation;
    for (i, chunk) in b[16..].chunks_mut(8).enumerate() {
        let v = seed
            .wrapping_add(i as u64)
            .wrapping_mul(0x2545_F491_4F6C_DD1D);
        chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
    }
    b
}

/// Decodes a block's generation, or None if it is not a valid oracle block for `block`.
pub fn block_generation(block: u64, data: &[u8]) -> Option<u64> {
    if data.len() != BLOCK_BYTES || data.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let stored_block = u64::from_le_bytes(data[0..8].try_into().ok()?);
    let generation = u64::from_le_bytes(data[8..16].try_into().ok()?);
    (stored_block == block && block_data(block, generation) == data).then_some(generation)
}

#[derive(Default, Debug, Clone)]
pub struct WriteLog {
    /// Generation of the last acknowledged write per block.
    pub acked: BTreeMap<u64, u64>,
    /// Generation of a write sent but not (yet) acknowledged.
    pub in_flight: BTreeMap<u64, u64>,
}

impl WriteLog {
    pub fn begin(&mut self, block: u64, generation: u64) {
        self.in_flight.insert(block, generation);
    }
    pub fn ack(&mut self, block: u64, generation: u64) {
        self.in_flight.remove(&block);
        self.acked.insert(block, generation);
    }
    /// Checks blocks `blocks` of a whole disk image (a backing file read back).
    pub fn check_image(&self, image: &[u8], blocks: std::ops::Range<u64>) -> Result<(), String> {
        for block in blocks {
            let at = block as usize * BLOCK_BYTES;
            self.check(block, &image[at..at + BLOCK_BYTES])?;
        }
        Ok(())
    }

    /// Checks a block read back after a crash.
    pub fn check(&self, block: u64, data: &[u8]) -> Result<(), String> {
        let got = block_generation(block, data)
            .ok_or_else(|| format!("block {block} holds garbage (not any generation)"))?;
        let acked = self.acked.get(&block).copied().unwrap_or(0);
        let flying = self.in_flight.get(&block).copied();
        if got == acked || Some(got) == flying {
            Ok(())
        } else {
            Err(format!(
                "block {block}: found generation {got}, acknowledged {acked}, in flight {flying:?}"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oracle_accepts_acked_or_in_flight_only() {
        let mut log = WriteLog::default();
        log.ack(3, 1);
        log.begin(3, 2);
        assert!(log.check(3, &block_data(3, 1)).is_ok());
        assert!(log.check(3, &block_data(3, 2)).is_ok());
        log.ack(3, 2);
        assert!(log.check(3, &block_data(3, 1)).is_err());
        assert!(log.check(3, &block_data(4, 2)).is_err());
        assert!(log.check(5, &[0u8; BLOCK_BYTES]).is_ok());
        assert!(log.check(3, &[7u8; BLOCK_BYTES]).is_err());
    }
}
