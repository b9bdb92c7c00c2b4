//! The workload's anonymous memory: a private anonymous mapping (never file-backed), every page
//! written with its [`Pattern`] page at start (which also faults every page in), checked whole
//! on request, and re-checked and re-written a few pages at a time while the workload runs.

use std::ptr::NonNull;

use crate::pattern::{PAGE_SIZE, Pattern};

/// What can go wrong with the anonymous region.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size does not fit this machine's address space.
    #[error("{mib} MiB of anonymous memory does not fit the address space")]
    TooLarge {
        /// The size asked for.
        mib: u64,
    },
    /// More than the machine's RAM and swap together: filling it would only end in the OOM
    /// killer.
    #[error(
        "{mib} MiB of anonymous memory is more than this machine's {total_mib} MiB of RAM and swap"
    )]
    MoreThanTheMachine {
        /// The size asked for.
        mib: u64,
        /// RAM plus swap, in MiB.
        total_mib: u64,
    },
    /// mmap refused.
    #[error("mapping {mib} MiB of anonymous memory: {source}")]
    Map {
        /// The size asked for.
        mib: u64,
        /// Why.
        source: std::io::Error,
    },
    /// A page index beyond the region.
    #[error("page {page} is outside the region of {pages} pages")]
    NoSuchPage {
        /// The index asked for.
        page: u64,
        /// Pages in the region.
        pages: u64,
    },
}

/// The result of checking pages.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageCheck {
    /// Pages compared.
    pub checked: u64,
    /// Pages that differ from their pattern.
    pub bad: u64,
    /// The lowest indices of the bad pages, at most [`FIRST_BAD_KEPT`].
    pub first_bad: Vec<u64>,
}

/// How many bad page indices a check keeps.
pub const FIRST_BAD_KEPT: usize = 16;

impl PageCheck {
    fn record(&mut self, index: u64, good: bool) {
        self.checked += 1;
        if !good {
            self.bad += 1;
            if self.first_bad.len() < FIRST_BAD_KEPT {
                self.first_bad.push(index);
            }
        }
    }
}

/// A private anonymous mapping filled with a pattern.
pub struct AnonRegion {
    ptr: NonNull<u8>,
    len: usize,
    pattern: Pattern,
}

// SAFETY: the region owns its mapping exclusively (nothing else holds the pointer); moving it to
// another thread moves that ownership.
unsafe impl Send for AnonRegion {}

impl AnonRegion {
    /// Maps `mib` MiB of private anonymous memory and writes every page with `pattern`
    /// (0 MiB gives an empty region without a mapping).
    pub fn filled(mib: u64, pattern: Pattern) -> Result<Self, MemoryError> {
        let len = mib
            .checked_mul(1 << 20)
            .and_then(|n| usize::try_from(n).ok())
            .filter(|n| *n <= isize::MAX as usize)
            .ok_or(MemoryError::TooLarge { mib })?;
        if let Some(total_mib) = ram_and_swap_mib()
            && mib > total_mib
        {
            return Err(MemoryError::MoreThanTheMachine { mib, total_mib });
        }
        let ptr = if len == 0 {
            NonNull::dangling()
        } else {
            // SAFETY: a fresh private anonymous mapping at an address the kernel picks; no
            // existing memory is affected. The result is checked before use.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if addr == libc::MAP_FAILED {
                return Err(MemoryError::Map {
                    mib,
                    source: std::io::Error::last_os_error(),
                });
            }
            NonNull::new(addr.cast::<u8>()).ok_or(MemoryError::Map {
                mib,
                source: std::io::Error::other("mmap returned a null address"),
            })?
        };
        let mut region = Self { ptr, len, pattern };
        for index in 0..region.pages() {
            region.rewrite(index);
        }
        Ok(region)
    }

    /// Pages in the region.
    pub fn pages(&self) -> u64 {
        (self.len / PAGE_SIZE) as u64
    }

    /// Bytes in the region.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a region of 0 bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` is a live mapping of `len` readable bytes owned by `self` (or dangling
        // with `len == 0`, which a slice allows); `&self` excludes writers.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    fn page(&self, index: u64) -> &[u8] {
        let start = index as usize * PAGE_SIZE;
        &self.bytes()[start..start + PAGE_SIZE]
    }

    /// Writes page `index` with its pattern (it must be inside the region).
    fn rewrite(&mut self, index: u64) {
        let pattern = self.pattern;
        let start = index as usize * PAGE_SIZE;
        pattern.fill_page(index, &mut self.bytes_mut()[start..start + PAGE_SIZE]);
    }

    /// Checks page `index` against its pattern (`false` outside the region).
    pub fn page_is_good(&self, index: u64) -> bool {
        index < self.pages() && self.pattern.check_page(index, self.page(index)).is_none()
    }

    /// Checks every page.
    pub fn verify(&self) -> PageCheck {
        let mut check = PageCheck::default();
        for index in 0..self.pages() {
            check.record(index, self.page_is_good(index));
        }
        check
    }

    /// Checks page `index` and, only if it is right, writes it again with the same bytes (a
    /// running program touching its memory). A wrong page is left as it is, so that the next
    /// full [`verify`](Self::verify) still sees it. Returns whether the page was right.
    pub fn recheck_and_touch(&mut self, index: u64) -> Result<bool, MemoryError> {
        self.in_range(index)?;
        let good = self.page_is_good(index);
        if good {
            self.rewrite(index);
        }
        Ok(good)
    }

    /// Flips the lowest bit of the byte in the middle of page `index` (a debugging aid that
    /// lets tests prove corruption is detected) and returns that byte's offset in the page.
    pub fn corrupt_page(&mut self, index: u64) -> Result<usize, MemoryError> {
        self.in_range(index)?;
        let offset = PAGE_SIZE / 2;
        let at = index as usize * PAGE_SIZE + offset;
        self.bytes_mut()[at] ^= 1;
        Ok(offset)
    }

    fn in_range(&self, index: u64) -> Result<(), MemoryError> {
        if index < self.pages() {
            Ok(())
        } else {
            Err(MemoryError::NoSuchPage {
                page: index,
                pages: self.pages(),
            })
        }
    }
}

/// RAM plus swap of this machine in MiB (`None` if the kernel does not say).
fn ram_and_swap_mib() -> Option<u64> {
    // SAFETY: sysinfo only fills the zeroed struct it is given.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable sysinfo struct.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return None;
    }
    let unit = u64::from(info.mem_unit.max(1));
    let bytes = (info.totalram as u64).saturating_add(info.totalswap as u64);
    Some(bytes.saturating_mul(unit) >> 20)
}

impl Drop for AnonRegion {
    fn drop(&mut self) {
        if self.len != 0 {
            // SAFETY: unmapping exactly the mapping this region created; no reference into it
            // outlives `self`.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pattern::Stream;

    fn resident_pages(region: &AnonRegion) -> usize {
        let mut vec = vec![0u8; region.pages() as usize];
        // SAFETY: mincore reads the page tables of our own live mapping into a buffer of one
        // byte per page.
        let rc = unsafe {
            libc::mincore(
                region.ptr.as_ptr().cast(),
                region.len,
                vec.as_mut_ptr().cast(),
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        vec.iter().filter(|b| **b & 1 == 1).count()
    }

    #[test]
    fn a_filled_region_is_resident_and_verifies() {
        let region = AnonRegion::filled(4, Pattern::new(11, Stream::Memory)).unwrap();
        assert_eq!(region.pages(), 1024);
        assert_eq!(resident_pages(&region), 1024);
        let check = region.verify();
        assert_eq!(check.checked, 1024);
        assert_eq!(check.bad, 0);
        assert!(check.first_bad.is_empty());
    }

    #[test]
    fn corrupted_pages_are_named_and_not_healed_by_touching() {
        let mut region = AnonRegion::filled(1, Pattern::new(12, Stream::Memory)).unwrap();
        assert_eq!(region.corrupt_page(200).unwrap(), PAGE_SIZE / 2);
        region.corrupt_page(3).unwrap();
        assert!(!region.recheck_and_touch(3).unwrap());
        assert!(region.recheck_and_touch(4).unwrap());
        let check = region.verify();
        assert_eq!((check.checked, check.bad), (256, 2));
        assert_eq!(check.first_bad, vec![3, 200]);
        // Flipping the same bit again restores the page.
        region.corrupt_page(3).unwrap();
        assert_eq!(region.verify().first_bad, vec![200]);
    }

    #[test]
    fn out_of_range_pages_are_refused() {
        let mut region = AnonRegion::filled(1, Pattern::new(1, Stream::Memory)).unwrap();
        assert!(matches!(
            region.corrupt_page(256),
            Err(MemoryError::NoSuchPage {
                page: 256,
                pages: 256
            })
        ));
        assert!(region.recheck_and_touch(u64::MAX).is_err());
        assert!(!region.page_is_good(256));
    }

    #[test]
    fn sizes_that_cannot_be_mapped_are_errors() {
        assert!(matches!(
            AnonRegion::filled(u64::MAX, Pattern::new(1, Stream::Memory)),
            Err(MemoryError::TooLarge { .. })
        ));
        let total = ram_and_swap_mib().unwrap();
        assert!(total > 0);
        assert!(matches!(
            AnonRegion::filled(total + 1, Pattern::new(1, Stream::Memory)),
            Err(MemoryError::MoreThanTheMachine { .. })
        ));
        let empty = AnonRegion::filled(0, Pattern::new(1, Stream::Memory)).unwrap();
        assert!(empty.is_empty());
        assert_eq!(empty.verify(), PageCheck::default());
    }

    #[test]
    fn the_first_bad_list_is_capped() {
        let mut region = AnonRegion::filled(1, Pattern::new(5, Stream::Memory)).unwrap();
        for page in (0..40).rev() {
            region.corrupt_page(page).unwrap();
        }
        let check = region.verify();
        assert_eq!(check.bad, 40);
        assert_eq!(check.first_bad, (0..16).collect::<Vec<_>>());
    }
}
