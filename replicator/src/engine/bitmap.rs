//! The per-peer dirty bitmap: one bit per 4 KiB block that this node wrote while the peer
//! did not get it. Pure data structure; the engine persists the 4 KiB pages it changes
//! (each page covers 128 MiB of volume) before acknowledging the write that set them.

use std::collections::BTreeSet;

pub const BLOCK_BYTES: u64 = 4096;
pub const PAGE_BYTES: usize = 4096;
const WORDS_PER_PAGE: usize = PAGE_BYTES / 8;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    bits: u64,
}

impl DirtyBitmap {
    pub fn new(volume_bytes: u64) -> Self {
        let bits = volume_bytes.div_ceil(BLOCK_BYTES);
        let words = (bits.div_ceil(64) as usize).div_ceil(WORDS_PER_PAGE) * WORDS_PER_PAGE;
        Self {
            words: vec![0; words.max(WORDS_PER_PAGE)],
            bits,
        }
    }

    /// Loads from on-disk bytes (little-endian words); extra bits past the volume are
    /// ignored and cleared.
    pub fn from_bytes(volume_bytes: u64, bytes: &[u8]) -> Self {
        let mut b = Self::new(volume_bytes);
        for (w, chunk) in b.words.iter_mut().zip(bytes.chunks_exact(8)) {
            *w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        }
        b.clear_tail();
        b
    }

    fn clear_tail(&mut self) {
        let full = (self.bits / 64) as usize;
        let rem = self.bits % 64;
        if full < self.words.len() {
            if rem != 0 {
                self.words[full] &= (1u64 << rem) - 1;
                for w in &mut self.words[full + 1..] {
                    *w = 0;
                }
            } else {
                for w in &mut self.words[full..] {
                    *w = 0;
                }
            }
        }
    }

    pub fn page_count(&self) -> usize {
        self.words.len() / WORDS_PER_PAGE
    }

    /// The bytes of one 4 KiB page, as stored on disk.
    pub fn page_bytes(&self, page: usize) -> Vec<u8> {
        self.words[page * WORDS_PER_PAGE..(page + 1) * WORDS_PER_PAGE]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect()
    }

    fn block_range(&self, offset: u64, len: u64) -> (u64, u64) {
        let first = offset / BLOCK_BYTES;
        let last = offset
            .saturating_add(len.max(1))
            .div_ceil(BLOCK_BYTES)
            .min(self.bits);
        (first, last)
    }

    /// The pages holding the bits of `[offset, offset+len)` (empty past the volume).
    pub fn pages_of(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let (first, last) = self.block_range(offset, len);
        let bits_per_page = (PAGE_BYTES * 8) as u64;
        if first >= last {
            return 0..0;
        }
        (first / bits_per_page) as usize..((last - 1) / bits_per_page) as usize + 1
    }

    /// Sets the bits covering `[offset, offset+len)`; returns the pages that changed.
    pub fn set_range(&mut self, offset: u64, len: u64) -> BTreeSet<usize> {
        let (first, last) = self.block_range(offset, len);
        let mut pages = BTreeSet::new();
        for bit in first..last {
            let (w, m) = ((bit / 64) as usize, 1u64 << (bit % 64));
            if self.words[w] & m == 0 {
                self.words[w] |= m;
                pages.insert(w / WORDS_PER_PAGE);
            }
        }
        pages
    }

    /// Clears the bits covering `[offset, offset+len)` (only whole blocks inside it).
    pub fn clear_range(&mut self, offset: u64, len: u64) -> BTreeSet<usize> {
        let first = offset.div_ceil(BLOCK_BYTES);
        let last = ((offset + len) / BLOCK_BYTES).min(self.bits);
        let mut pages = BTreeSet::new();
        for bit in first..last {
            let (w, m) = ((bit / 64) as usize, 1u64 << (bit % 64));
            if self.words[w] & m != 0 {
                self.words[w] &= !m;
                pages.insert(w / WORDS_PER_PAGE);
            }
        }
        pages
    }

    pub fn clear_all(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }

    pub fn set_all(&mut self) {
        self.words.iter_mut().for_each(|w| *w = u64::MAX);
        self.clear_tail();
    }

    pub fn count_bits(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.count_bits() * BLOCK_BYTES
    }

    /// Runs of set bits as byte ranges, each at most `max_bytes`, in order, starting at
    /// or after byte `from`.
    pub fn next_run(&self, from: u64, max_bytes: u64) -> Option<(u64, u64)> {
        let max_blocks = (max_bytes / BLOCK_BYTES).max(1);
        let mut bit = from / BLOCK_BYTES;
        while bit < self.bits {
            let w = (bit / 64) as usize;
            let word = self.words[w] >> (bit % 64);
            if word == 0 {
                bit = (w as u64 + 1) * 64;
                continue;
            }
            bit += word.trailing_zeros() as u64;
            let start = bit;
            while bit < self.bits && bit - start < max_blocks && self.get(bit) {
                bit += 1;
            }
            return Some((start * BLOCK_BYTES, (bit - start) * BLOCK_BYTES));
        }
        None
    }

    /// Whether the block holding byte `offset` is set.
    pub fn is_set(&self, offset: u64) -> bool {
        let bit = offset / BLOCK_BYTES;
        bit < self.bits && self.get(bit)
    }

    fn get(&self, bit: u64) -> bool {
        self.words[(bit / 64) as usize] & (1u64 << (bit % 64)) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_clear_runs_and_pages() {
        let mut b = DirtyBitmap::new(1 << 30);
        assert_eq!(b.page_count(), 8);
        let pages = b.set_range(4096 * 3, 4096 * 2 + 1);
        assert_eq!(pages.into_iter().collect::<Vec<_>>(), vec![0]);
        assert_eq!(b.count_bits(), 3);
        assert!(b.set_range(4096 * 3, 10).is_empty(), "already set");
        let far = b.set_range(200 << 20, 4096);
        assert_eq!(far.into_iter().collect::<Vec<_>>(), vec![1]);
        assert_eq!(b.next_run(0, 1 << 20), Some((4096 * 3, 4096 * 3)));
        assert_eq!(b.next_run(4096 * 6, 1 << 20), Some((200 << 20, 4096)));
        assert_eq!(b.next_run((200 << 20) + 4096, 1 << 20), None);
        b.clear_range(4096 * 3, 4096 * 3);
        assert_eq!(b.count_bits(), 1);
        let back = DirtyBitmap::from_bytes(
            1 << 30,
            &b.page_bytes(0)
                .into_iter()
                .chain(b.page_bytes(1))
                .collect::<Vec<_>>(),
        );
        assert_eq!(back.count_bits(), 1);
    }

    #[test]
    fn runs_are_capped_and_tail_is_masked() {
        let mut b = DirtyBitmap::new(10 * 4096 + 100);
        b.set_all();
        assert_eq!(b.count_bits(), 11);
        assert_eq!(b.next_run(0, 4 * 4096), Some((0, 4 * 4096)));
        let mut from = 0;
        let mut total = 0;
        while let Some((o, l)) = b.next_run(from, 4 * 4096) {
            total += l;
            from = o + l;
        }
        assert_eq!(total, 11 * 4096);
        let junk = vec![0xFFu8; PAGE_BYTES];
        assert_eq!(DirtyBitmap::from_bytes(10 * 4096, &junk).count_bits(), 10);
    }
}
