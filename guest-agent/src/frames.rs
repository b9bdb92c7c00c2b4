//! From a file mapping to guest frames: `mincore` for residency, `MADV_POPULATE_READ` to map
//! the resident pages without touching anything else, /proc/self/pagemap for their frame
//! numbers and /proc/kpageflags for the state of each frame.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Size of a page on x86-64.
pub const PAGE_SIZE: u64 = 4096;

/// What can go wrong while reading frame information.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// /proc/kpageflags or /proc/self/pagemap could not be opened.
    #[error(
        "cannot open {path}: {source}; reading guest frame numbers and flags needs CAP_SYS_ADMIN \
         (run the agent as root)"
    )]
    Open {
        /// The file.
        path: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// pagemap shows no frame numbers: the process lacks CAP_SYS_ADMIN.
    #[error(
        "/proc/self/pagemap hides frame numbers: the agent needs CAP_SYS_ADMIN (run it as root)"
    )]
    NoFrameNumbers,
    /// A read failed.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// Bits of /proc/kpageflags (Documentation/admin-guide/mm/pagemap.rst).
pub mod flags {
    /// I/O error on the page.
    pub const ERROR: u64 = 1 << 1;
    /// The page holds valid data.
    pub const UPTODATE: u64 = 1 << 3;
    /// The page was written and not yet written back.
    pub const DIRTY: u64 = 1 << 4;
    /// The page is on an LRU list (page cache or anonymous, not slab or free).
    pub const LRU: u64 = 1 << 5;
    /// Slab allocator memory.
    pub const SLAB: u64 = 1 << 7;
    /// The page is being written back.
    pub const WRITEBACK: u64 = 1 << 8;
    /// The frame is free in the buddy allocator.
    pub const BUDDY: u64 = 1 << 10;
    /// Anonymous memory.
    pub const ANON: u64 = 1 << 12;
    /// In the swap cache.
    pub const SWAPCACHE: u64 = 1 << 13;
    /// Backed by swap or shmem (not by a file on a disk).
    pub const SWAPBACKED: u64 = 1 << 14;
    /// Hardware-poisoned.
    pub const HWPOISON: u64 = 1 << 19;
    /// No page frame at this number.
    pub const NOPAGE: u64 = 1 << 20;
    /// Merged by KSM.
    pub const KSM: u64 = 1 << 21;
}

/// Why a resident page is not a clean page-cache page, or `None` when it is one.
pub fn unclean_reason(page_flags: u64) -> Option<&'static str> {
    use flags::*;
    let checks: [(bool, &str); 9] = [
        (page_flags & NOPAGE != 0, "no frame"),
        (
            page_flags & HWPOISON != 0 || page_flags & ERROR != 0,
            "error",
        ),
        (page_flags & ANON != 0 || page_flags & KSM != 0, "anonymous"),
        (page_flags & (SWAPBACKED | SWAPCACHE) != 0, "swap-backed"),
        (page_flags & DIRTY != 0, "dirty"),
        (page_flags & WRITEBACK != 0, "under writeback"),
        (page_flags & UPTODATE == 0, "not uptodate"),
        (page_flags & LRU == 0, "not on the LRU"),
        (page_flags & BUDDY != 0, "free"),
    ];
    checks.iter().find(|(bad, _)| *bad).map(|(_, why)| *why)
}

/// Open handles on the two procfs files, for one scan.
pub struct FrameReader {
    pagemap: File,
    kpageflags: File,
}

const PAGEMAP: &str = "/proc/self/pagemap";
const KPAGEFLAGS: &str = "/proc/kpageflags";
const PRESENT: u64 = 1 << 63;
const PFN_MASK: u64 = (1 << 55) - 1;

impl FrameReader {
    /// Opens /proc/self/pagemap and /proc/kpageflags; fails with a message naming the
    /// capability when they are not readable.
    pub fn open() -> Result<Self, FrameError> {
        let open = |path: &'static str| {
            File::open(path).map_err(|source| FrameError::Open { path, source })
        };
        let reader = Self {
            pagemap: open(PAGEMAP)?,
            kpageflags: open(KPAGEFLAGS)?,
        };
        // kpageflags opens for root only, but check that a frame can be read too.
        let mut word = [0u8; 8];
        reader
            .kpageflags
            .read_exact_at(&mut word, 0)
            .map_err(|source| FrameError::Read {
                path: KPAGEFLAGS,
                source,
            })?;
        Ok(reader)
    }

    /// The frame numbers of `count` pages of this process starting at virtual address
    /// `addr`: `None` where a page is not mapped.
    pub fn frames(&self, addr: usize, count: usize) -> Result<Vec<Option<u64>>, FrameError> {
        let mut raw = vec![0u8; count * 8];
        let offset = (addr as u64 / PAGE_SIZE) * 8;
        self.pagemap
            .read_exact_at(&mut raw, offset)
            .map_err(|source| FrameError::Read {
                path: PAGEMAP,
                source,
            })?;
        let mut frames = Vec::with_capacity(count);
        for entry in raw.chunks_exact(8) {
            let mut word = [0u8; 8];
            word.copy_from_slice(entry);
            let entry = u64::from_le_bytes(word);
            if entry & PRESENT == 0 {
                frames.push(None);
                continue;
            }
            let pfn = entry & PFN_MASK;
            if pfn == 0 {
                return Err(FrameError::NoFrameNumbers);
            }
            frames.push(Some(pfn));
        }
        Ok(frames)
    }

    /// The kpageflags word of each frame in `pfns`, reading runs of consecutive frames at once.
    pub fn flags(&self, pfns: &[u64]) -> Result<Vec<u64>, FrameError> {
        let mut out = Vec::with_capacity(pfns.len());
        let mut i = 0;
        while i < pfns.len() {
            let mut run = 1;
            while i + run < pfns.len() && pfns[i + run] == pfns[i] + run as u64 && run < 512 {
                run += 1;
            }
            let mut raw = vec![0u8; run * 8];
            match self.kpageflags.read_exact_at(&mut raw, pfns[i] * 8) {
                Ok(()) => {
                    for entry in raw.chunks_exact(8) {
                        let mut word = [0u8; 8];
                        word.copy_from_slice(entry);
                        out.push(u64::from_le_bytes(word));
                    }
                }
                // Past the last frame: no page there.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    out.extend(std::iter::repeat_n(flags::NOPAGE, run));
                }
                Err(source) => {
                    return Err(FrameError::Read {
                        path: KPAGEFLAGS,
                        source,
                    });
                }
            }
            i += run;
        }
        Ok(out)
    }
}

impl FrameReader {
    /// The kpageflags words of the `count` consecutive frames from `first`, in as few reads as
    /// the kernel allows: cheaper than [`FrameReader::flags`] when many frames of a range are
    /// wanted. Frames past the last one read as [`flags::NOPAGE`].
    pub fn flag_range(&self, first: u64, count: usize) -> Result<Vec<u64>, FrameError> {
        let Some(base) = first.checked_mul(8) else {
            return Ok(vec![flags::NOPAGE; count]);
        };
        let mut raw = vec![0u8; count * 8];
        let mut filled = 0;
        while filled < raw.len() {
            let offset = base.saturating_add(filled as u64);
            match self.kpageflags.read_at(&mut raw[filled..], offset) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(FrameError::Read {
                        path: KPAGEFLAGS,
                        source,
                    });
                }
            }
        }
        let mut out: Vec<u64> = raw[..filled - filled % 8]
            .chunks_exact(8)
            .map(|entry| {
                let mut word = [0u8; 8];
                word.copy_from_slice(entry);
                u64::from_le_bytes(word)
            })
            .collect();
        out.resize(count, flags::NOPAGE);
        Ok(out)
    }
}

/// Major page faults of the calling thread so far (a fault that had to read from the disk).
pub fn major_faults() -> u64 {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage; RUSAGE_THREAD only reads the calling thread.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    if rc == 0 {
        u64::try_from(usage.ru_majflt).unwrap_or(0)
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::flags::*;
    use super::*;

    #[test]
    fn only_clean_uptodate_file_pages_on_the_lru_pass() {
        assert_eq!(unclean_reason(UPTODATE | LRU), None);
        assert_eq!(unclean_reason(UPTODATE | LRU | DIRTY), Some("dirty"));
        assert_eq!(
            unclean_reason(UPTODATE | LRU | WRITEBACK),
            Some("under writeback")
        );
        assert_eq!(unclean_reason(UPTODATE | LRU | ANON), Some("anonymous"));
        assert_eq!(
            unclean_reason(UPTODATE | LRU | SWAPBACKED),
            Some("swap-backed")
        );
        assert_eq!(unclean_reason(LRU), Some("not uptodate"));
        assert_eq!(unclean_reason(UPTODATE), Some("not on the LRU"));
        assert_eq!(unclean_reason(UPTODATE | LRU | HWPOISON), Some("error"));
        assert_eq!(unclean_reason(NOPAGE), Some("no frame"));
    }

    #[test]
    fn a_range_of_flags_reads_like_single_frames_and_ends_in_no_page() {
        // Root only (kpageflags); the CI machine runs tests as root.
        let Ok(reader) = FrameReader::open() else {
            return;
        };
        let range = reader.flag_range(0, 4).unwrap();
        assert_eq!(range.len(), 4);
        // Frames below 1 MiB are firmware and kernel memory: stable between two reads.
        assert_eq!(range, reader.flags(&[0, 1, 2, 3]).unwrap());
        let beyond = reader.flag_range(1 << 40, 3).unwrap();
        assert_eq!(beyond, vec![NOPAGE; 3]);
        assert_eq!(reader.flag_range(u64::MAX, 2).unwrap(), vec![NOPAGE; 2]);
    }
}
