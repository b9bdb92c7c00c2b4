//! The seeded content of the workload's memory and files.
//!
//! Content is a sequence of 64-bit little-endian words; word `n` of a stream is
//! `mix(base + (n + 1) * GAMMA)`, where `mix` is SplitMix64's finaliser, `GAMMA` its odd
//! increment and `base` a value derived from the seed and the stream's [`Stream`] kind. Page `i`
//! of a stream holds words `i * 512 .. (i + 1) * 512`. Because `GAMMA` is odd, the states of the
//! first 2^64 words are all different, and `mix` is a bijection, so **no two words of one stream
//! are equal**: every page differs from every other page, and a page that lands at the wrong
//! index (or a page of zeroes, or a page from another seed's stream at the same index) fails its
//! check. Generating a page is 512 multiply-xorshift rounds, a few GiB/s on one core.

/// Bytes in one pattern page (the x86-64 base page size).
pub const PAGE_SIZE: usize = 4096;
/// Words in one pattern page.
const WORDS_PER_PAGE: u64 = (PAGE_SIZE / 8) as u64;
/// SplitMix64's increment (odd, so `n * GAMMA` is a bijection on `u64`).
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function: a bijection on `u64` with good avalanche.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Which stream of a seed: the anonymous memory, or one of the files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// The anonymous memory region.
    Memory,
    /// The file with this index.
    File(u64),
}

/// The content generator of one stream of one seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pattern {
    base: u64,
}

impl Pattern {
    /// The pattern of `stream` under `seed`.
    pub fn new(seed: u64, stream: Stream) -> Self {
        let tag = match stream {
            Stream::Memory => 0,
            Stream::File(index) => mix(index.wrapping_add(1)) | 1,
        };
        Self {
            base: mix(mix(seed) ^ tag),
        }
    }

    fn word(&self, n: u64) -> u64 {
        mix(self
            .base
            .wrapping_add(n.wrapping_add(1).wrapping_mul(GAMMA)))
    }

    /// Writes page `index` of the stream into `page` (its first [`PAGE_SIZE`] bytes; a shorter
    /// buffer gets the page's prefix, as the last page of a file does).
    pub fn fill_page(&self, index: u64, page: &mut [u8]) {
        let first = index.wrapping_mul(WORDS_PER_PAGE);
        for (i, chunk) in (0..).zip(page.chunks_mut(8).take(PAGE_SIZE / 8)) {
            let bytes = self.word(first.wrapping_add(i)).to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }

    /// Checks `page` against page `index` of the stream; returns the offset of the first byte
    /// that differs, or `None` when the page is exactly right. `page` must be a whole page.
    pub fn check_page(&self, index: u64, page: &[u8]) -> Option<usize> {
        if page.len() != PAGE_SIZE {
            return Some(page.len().min(PAGE_SIZE));
        }
        let first = index.wrapping_mul(WORDS_PER_PAGE);
        let read = |chunk: &[u8]| u64::from_le_bytes(chunk.try_into().unwrap_or_default());
        // Fast path without branches: OR together the differences of all words.
        let mut diff = 0u64;
        for (i, chunk) in (0..).zip(page.chunks_exact(8)) {
            diff |= read(chunk) ^ self.word(first.wrapping_add(i));
        }
        if diff == 0 {
            return None;
        }
        (0..).zip(page.chunks_exact(8)).find_map(|(i, chunk)| {
            let delta = read(chunk) ^ self.word(first.wrapping_add(i));
            // Little-endian: the lowest differing bit is in the first differing byte.
            (delta != 0).then(|| i as usize * 8 + delta.trailing_zeros() as usize / 8)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn page(pattern: &Pattern, index: u64) -> Vec<u8> {
        let mut page = vec![0u8; PAGE_SIZE];
        pattern.fill_page(index, &mut page);
        page
    }

    #[test]
    fn the_same_seed_and_index_give_the_same_page() {
        let a = Pattern::new(42, Stream::Memory);
        let b = Pattern::new(42, Stream::Memory);
        for index in [0, 1, 7, 1 << 20, u64::MAX / WORDS_PER_PAGE] {
            assert_eq!(page(&a, index), page(&b, index));
            assert_eq!(a.check_page(index, &page(&b, index)), None);
        }
        // Pinned: the generator must not change under a running fleet of tests that compare
        // across builds (a workload restored from a checkpoint made by an older binary).
        let first = u64::from_le_bytes(page(&a, 0)[..8].try_into().unwrap());
        let last = u64::from_le_bytes(page(&a, 1000)[PAGE_SIZE - 8..].try_into().unwrap());
        assert_eq!(
            (first, last),
            (11_338_124_010_319_451_123, 9_302_608_048_745_889_685)
        );
        // SplitMix64's published first output for state 0.
        assert_eq!(mix(GAMMA), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn every_page_of_a_stream_is_different_and_misplaced_pages_fail() {
        let pattern = Pattern::new(7, Stream::Memory);
        let mut pages = HashSet::new();
        let mut words = HashSet::new();
        for index in 0..2048 {
            let p = page(&pattern, index);
            for w in p.chunks_exact(8) {
                let w = u64::from_le_bytes(w.try_into().unwrap());
                assert!(words.insert(w), "a word repeats in page {index}");
            }
            assert!(pages.insert(p.clone()));
            // No two words are equal, so the very first word of a misplaced page differs.
            for wrong in [index + 1, index.wrapping_sub(1), index + 1000] {
                assert!(matches!(pattern.check_page(wrong, &p), Some(0..8)));
            }
        }
        assert!(matches!(
            pattern.check_page(3, &[0u8; PAGE_SIZE]),
            Some(0..8)
        ));
    }

    #[test]
    fn seeds_and_streams_differ() {
        let memory = page(&Pattern::new(1, Stream::Memory), 0);
        assert_ne!(memory, page(&Pattern::new(2, Stream::Memory), 0));
        assert_ne!(memory, page(&Pattern::new(1, Stream::File(0)), 0));
        assert_ne!(
            page(&Pattern::new(1, Stream::File(0)), 0),
            page(&Pattern::new(1, Stream::File(1)), 0)
        );
        assert_eq!(Pattern::new(1, Stream::Memory).check_page(0, &memory), None);
        assert!(
            Pattern::new(2, Stream::Memory)
                .check_page(0, &memory)
                .is_some()
        );
    }

    #[test]
    fn any_flipped_bit_is_found_at_its_offset() {
        let pattern = Pattern::new(99, Stream::Memory);
        let good = page(&pattern, 5);
        for offset in [0, 1, 7, 8, 2047, 4095] {
            for bit in [0, 7] {
                let mut bad = good.clone();
                bad[offset] ^= 1 << bit;
                assert_eq!(pattern.check_page(5, &bad), Some(offset));
            }
        }
    }

    #[test]
    fn short_buffers_get_the_page_prefix_and_never_pass_as_whole_pages() {
        let pattern = Pattern::new(3, Stream::File(2));
        let whole = page(&pattern, 9);
        let mut short = vec![0u8; 1001];
        pattern.fill_page(9, &mut short);
        assert_eq!(short, whole[..1001]);
        assert_eq!(pattern.check_page(9, &whole[..1001]), Some(1001));
    }
}
