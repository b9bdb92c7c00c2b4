//! Page contents: comparing reported pages with the bytes on the disk, for every page or for
//! a random share of them ([`super::Verification`]), and hashing them ahead of the pause.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;

use sha2::{Digest, Sha256};
use vm_memory::{Bytes as _, GuestAddress};

use super::decide::CacheRun;
use crate::checkpoint::PageHashes;

use crate::kvm::PAGE_SIZE;
use crate::kvm::memory::GuestMemory;

/// Pages compared per read.
const BATCH_PAGES: u64 = 64;

/// Where the two sides of a comparison come from.
pub trait PageSource {
    /// How many of the `pages` pages from guest frame `gfn` differ from the bytes of drive
    /// `drive` from byte `offset` on.
    fn mismatches(&mut self, gfn: u64, drive: usize, offset: u64, pages: u64) -> io::Result<u64>;
}

/// Guest memory against the drive images.
#[derive(Debug)]
pub struct MemoryAndDrives<'a> {
    memory: &'a GuestMemory,
    drives: &'a [File],
    mem_buf: Vec<u8>,
    disk_buf: Vec<u8>,
}

impl<'a> MemoryAndDrives<'a> {
    /// Compares `memory` with `drives` (drive `i` is `drives[i]`).
    pub fn new(memory: &'a GuestMemory, drives: &'a [File]) -> Self {
        Self {
            memory,
            drives,
            mem_buf: Vec::new(),
            disk_buf: Vec::new(),
        }
    }
}

impl PageSource for MemoryAndDrives<'_> {
    fn mismatches(&mut self, gfn: u64, drive: usize, offset: u64, pages: u64) -> io::Result<u64> {
        let file = self
            .drives
            .get(drive)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such drive"))?;
        let page = PAGE_SIZE as usize;
        let mut differing = 0;
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(BATCH_PAGES);
            let len = n as usize * page;
            self.mem_buf.resize(len, 0);
            self.disk_buf.resize(len, 0);
            self.memory
                .read_slice(&mut self.mem_buf, GuestAddress((gfn + done) * PAGE_SIZE))
                .map_err(io::Error::other)?;
            file.read_exact_at(&mut self.disk_buf, offset + done * PAGE_SIZE)?;
            differing += self
                .mem_buf
                .chunks_exact(page)
                .zip(self.disk_buf.chunks_exact(page))
                .filter(|(m, d)| m != d)
                .count() as u64;
            done += n;
        }
        Ok(differing)
    }
}

/// The SHA-256 of every page of `runs`, read from `memory` on up to `threads` threads. Taken
/// while the guest runs: a page written meanwhile gets a useless hash, but the dirty log shows
/// it written and it is saved instead of referenced, so only hashes of unchanged pages are
/// ever used. Pages that cannot be read are left out (the writer hashes them itself).
pub fn page_hashes(memory: &GuestMemory, runs: &[CacheRun], threads: usize) -> PageHashes {
    let total: u64 = runs.iter().map(|r| r.pages).sum();
    let per_thread = total.div_ceil(threads.max(1) as u64).max(1);
    // Contiguous slices of the runs, each about `per_thread` pages.
    let mut slices: Vec<&[CacheRun]> = Vec::new();
    let (mut start, mut pages) = (0, 0);
    for (i, r) in runs.iter().enumerate() {
        pages += r.pages;
        if pages >= per_thread {
            slices.push(&runs[start..=i]);
            (start, pages) = (i + 1, 0);
        }
    }
    if start < runs.len() {
        slices.push(&runs[start..]);
    }
    let parts: Vec<PageHashes> = std::thread::scope(|s| {
        let workers: Vec<_> = slices
            .into_iter()
            .map(|slice| s.spawn(move || hash_runs(memory, slice)))
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_default())
            .collect()
    });
    let mut all = PageHashes::with_capacity(usize::try_from(total).unwrap_or(0));
    for part in parts {
        all.extend(part);
    }
    all
}

fn hash_runs(memory: &GuestMemory, runs: &[CacheRun]) -> PageHashes {
    let mut out = PageHashes::new();
    let mut buf = vec![0u8; BATCH_PAGES as usize * PAGE_SIZE as usize];
    for r in runs {
        let mut done = 0;
        while done < r.pages {
            let n = (r.pages - done).min(BATCH_PAGES);
            let bytes = &mut buf[..n as usize * PAGE_SIZE as usize];
            let first = r.gfn + done;
            if memory
                .read_slice(bytes, GuestAddress(first * PAGE_SIZE))
                .is_ok()
            {
                for (i, page) in bytes.chunks_exact(PAGE_SIZE as usize).enumerate() {
                    out.insert(first + i as u64, Sha256::digest(page).into());
                }
            }
            done += n;
        }
    }
    out
}

/// A reproducible random choice of pages: page `index` is chosen with probability
/// `percent` / 100, independently of the others.
#[derive(Clone, Copy, Debug)]
pub struct Sampler {
    seed: u64,
    percent: u8,
}

impl Sampler {
    /// A sampler of `percent` % (clamped to 100) with its own seed.
    pub fn new(seed: u64, percent: u8) -> Self {
        Self {
            seed,
            percent: percent.min(100),
        }
    }

    /// A sampler seeded from the clock.
    pub fn random(percent: u8) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x5eed, |d| d.as_nanos() as u64);
        Self::new(seed, percent)
    }

    /// Whether page `index` is chosen.
    pub fn chooses(&self, index: u64) -> bool {
        // splitmix64 of the seeded index: uniform enough for a sample.
        let mut z = self
            .seed
            .wrapping_add(index.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        z % 100 < u64::from(self.percent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvm::memory::MemoryLayout;

    #[test]
    fn a_sample_takes_about_its_share() {
        let s = Sampler::new(42, 10);
        let chosen = (0..100_000).filter(|&i| s.chooses(i)).count();
        assert!((9_000..11_000).contains(&chosen), "{chosen}");
        assert!((0..1000).all(|i| Sampler::new(1, 100).chooses(i)));
        assert!((0..1000).all(|i| !Sampler::new(1, 0).chooses(i)));
    }

    #[test]
    fn memory_is_compared_with_the_drive_page_by_page() {
        let memory = MemoryLayout::single(16 * PAGE_SIZE).create().unwrap();
        let mut disk = tempfile::tempfile().unwrap();
        let mut bytes = vec![0u8; 8 * PAGE_SIZE as usize];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i / 4096) as u8 + 1;
        }
        std::io::Write::write_all(&mut disk, &bytes).unwrap();
        // Frames 4.. hold the drive's pages 0..; page 2 of them differs.
        memory
            .write_slice(&bytes, GuestAddress(4 * PAGE_SIZE))
            .unwrap();
        memory
            .write_slice(&[0xff], GuestAddress(6 * PAGE_SIZE + 100))
            .unwrap();
        let drives = [disk];
        let mut source = MemoryAndDrives::new(&memory, &drives);
        assert_eq!(source.mismatches(4, 0, 0, 8).unwrap(), 1);
        assert_eq!(source.mismatches(4, 0, 0, 2).unwrap(), 0);
        assert_eq!(source.mismatches(5, 0, 0, 1).unwrap(), 1);
        assert!(
            source.mismatches(4, 0, 0, 9).is_err(),
            "past the drive's end"
        );
        assert!(source.mismatches(4, 1, 0, 1).is_err(), "no such drive");
    }

    #[test]
    fn pages_are_hashed_ahead_on_several_threads() {
        let memory = MemoryLayout::single(64 * PAGE_SIZE).create().unwrap();
        for gfn in 0..64u64 {
            memory
                .write_slice(&[gfn as u8 + 1; 4096], GuestAddress(gfn * PAGE_SIZE))
                .unwrap();
        }
        let run = |gfn, pages| CacheRun {
            gfn,
            pages,
            drive: 0,
            offset: 0,
        };
        let runs = [run(1, 3), run(10, 20), run(40, 1), run(63, 1)];
        for threads in [1, 2, 7] {
            let hashes = page_hashes(&memory, &runs, threads);
            assert_eq!(hashes.len(), 25, "{threads} threads");
            for gfn in [1, 3, 10, 29, 40, 63] {
                let want: crate::checkpoint::PageHash =
                    Sha256::digest([gfn as u8 + 1; 4096]).into();
                assert_eq!(hashes[&gfn], want, "frame {gfn}");
            }
            assert!(!hashes.contains_key(&4) && !hashes.contains_key(&30));
        }
        assert!(page_hashes(&memory, &[], 2).is_empty());
        // Frames outside memory are left out, not failed.
        assert!(page_hashes(&memory, &[run(100, 2)], 2).is_empty());
    }
}
