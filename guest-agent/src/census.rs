//! A count of every guest frame by kind, from one sequential pass over /proc/kpageflags (plus
//! `MemFree` from /proc/meminfo). The host uses it to say how much of a checkpoint no method
//! could omit: anonymous, kernel and dirty pages.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read as _;

use crate::frames::{FrameError, PAGE_SIZE, flags};

const KPAGEFLAGS: &str = "/proc/kpageflags";
/// Frames read per system call.
const BATCH_FRAMES: usize = 64 * 1024;

/// The kind a frame's kpageflags word puts it in (one of the keys of [`census`]).
pub fn kind(page_flags: u64) -> Option<&'static str> {
    use flags::*;
    if page_flags & NOPAGE != 0 {
        return None;
    }
    Some(if page_flags & (ANON | SWAPBACKED | SWAPCACHE | KSM) != 0 {
        "anon"
    } else if page_flags & LRU != 0 && page_flags & (DIRTY | WRITEBACK) != 0 {
        "file_dirty"
    } else if page_flags & LRU != 0 && page_flags & UPTODATE != 0 {
        "file_clean"
    } else if page_flags & SLAB != 0 {
        "slab"
    } else {
        "other"
    })
}

/// Counts every frame by [`kind`], plus `free` (MemFree in pages: kpageflags marks only the
/// first frame of a free block, so those are counted under `other` too) and `total`.
pub fn census() -> Result<BTreeMap<String, u64>, FrameError> {
    let mut file = File::open(KPAGEFLAGS).map_err(|source| FrameError::Open {
        path: KPAGEFLAGS,
        source,
    })?;
    let mut counts = BTreeMap::<String, u64>::new();
    let mut buf = vec![0u8; BATCH_FRAMES * 8];
    loop {
        let n = file.read(&mut buf).map_err(|source| FrameError::Read {
            path: KPAGEFLAGS,
            source,
        })?;
        if n == 0 {
            break;
        }
        for word in buf[..n - n % 8].chunks_exact(8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            if let Some(k) = kind(u64::from_le_bytes(w)) {
                *counts.entry(k.to_owned()).or_default() += 1;
                *counts.entry("total".to_owned()).or_default() += 1;
            }
        }
    }
    if let Some(free) = mem_free_pages() {
        counts.insert("free".to_owned(), free);
    }
    Ok(counts)
}

/// `MemFree` of /proc/meminfo in pages.
fn mem_free_pages() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemFree:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024 / PAGE_SIZE)
}

#[cfg(test)]
mod tests {
    use super::flags::*;
    use super::*;

    #[test]
    fn frames_fall_into_one_kind_each() {
        assert_eq!(kind(NOPAGE), None);
        assert_eq!(kind(ANON | LRU | UPTODATE), Some("anon"));
        assert_eq!(kind(SWAPBACKED | LRU | UPTODATE | DIRTY), Some("anon"));
        assert_eq!(kind(LRU | UPTODATE | DIRTY), Some("file_dirty"));
        assert_eq!(kind(LRU | UPTODATE | WRITEBACK), Some("file_dirty"));
        assert_eq!(kind(LRU | UPTODATE), Some("file_clean"));
        assert_eq!(kind(SLAB), Some("slab"));
        assert_eq!(kind(BUDDY), Some("other"));
        assert_eq!(kind(0), Some("other"));
    }

    #[test]
    fn the_census_of_this_machine_adds_up() {
        // Root only (kpageflags); the CI machine runs tests as root.
        let Ok(counts) = census() else { return };
        let total = counts["total"];
        let kinds: u64 = ["anon", "file_dirty", "file_clean", "slab", "other"]
            .iter()
            .filter_map(|k| counts.get(*k))
            .sum();
        assert_eq!(kinds, total);
        assert!(counts.get("free").is_some_and(|&f| f < total));
    }
}
