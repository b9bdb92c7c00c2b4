//! Dirty-page sets: which guest pages were written since tracking was armed or last fetched.
//!
//! A [`DirtyBitmap`] holds one bitmap per guest memory region, in the layout KVM_GET_DIRTY_LOG
//! and vm-memory's `AtomicBitmap` share: bit `i` of word `w` is page `64 * w + i` of the region.
//! The VM's fetch-and-clear ([`super::vm::Vm::fetch_and_clear_dirty`]) fills it with the union of
//! KVM's log (guest CPU writes) and the VMM's own bitmap (device writes).

use serde::{Deserialize, Serialize};

use super::PAGE_SIZE;

/// The dirty pages of one guest memory region.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionDirty {
    /// Start of the region in guest physical memory.
    pub guest_addr: u64,
    /// Number of pages in the region.
    pub pages: u64,
    /// One bit per page; bits past `pages` are always clear.
    pub bits: Vec<u64>,
}

impl RegionDirty {
    /// An all-clean bitmap for a region of `pages` pages at `guest_addr`.
    pub fn clean(guest_addr: u64, pages: u64) -> Self {
        let words = usize::try_from(pages.div_ceil(64)).unwrap_or(usize::MAX);
        Self {
            guest_addr,
            pages,
            bits: vec![0; words],
        }
    }

    /// ORs `other` (same layout: bit `i` of word `w` is page `64 * w + i`) into this bitmap.
    /// Words past the region and bits past the last page are ignored.
    pub fn union_with(&mut self, other: &[u64]) {
        for (mine, theirs) in self.bits.iter_mut().zip(other) {
            *mine |= theirs;
        }
        self.mask_tail();
    }

    fn mask_tail(&mut self) {
        let rem = self.pages % 64;
        if rem != 0
            && let Some(last) = self.bits.last_mut()
        {
            *last &= (1u64 << rem) - 1;
        }
    }

    /// Whether page `index` of the region (0-based) is dirty.
    pub fn is_dirty(&self, index: u64) -> bool {
        if index >= self.pages {
            return false;
        }
        let word = usize::try_from(index / 64).unwrap_or(usize::MAX);
        self.bits
            .get(word)
            .is_some_and(|w| w & (1 << (index % 64)) != 0)
    }

    /// Guest frame numbers of the dirty pages, ascending.
    pub fn dirty_frames(&self) -> impl Iterator<Item = u64> + '_ {
        let first = self.guest_addr / PAGE_SIZE;
        self.bits.iter().enumerate().flat_map(move |(w, &word)| {
            (0..64u64)
                .filter(move |bit| word & (1 << bit) != 0)
                .map(move |bit| first + w as u64 * 64 + bit)
        })
    }
}

/// Dirty pages of all guest memory regions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyBitmap {
    /// One entry per region, in guest address order.
    pub regions: Vec<RegionDirty>,
}

impl DirtyBitmap {
    /// Guest frame numbers (guest physical address / 4 KiB) of all dirty pages, ascending.
    pub fn dirty_frames(&self) -> Vec<u64> {
        self.regions
            .iter()
            .flat_map(RegionDirty::dirty_frames)
            .collect()
    }

    /// Whether the page with guest frame number `gfn` is dirty (false outside guest memory).
    pub fn is_frame_dirty(&self, gfn: u64) -> bool {
        self.regions.iter().any(|r| {
            let first = r.guest_addr / PAGE_SIZE;
            gfn >= first && r.is_dirty(gfn - first)
        })
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|r| r.bits.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// ORs another fetch of the same layout into this one (for accumulating several fetches).
    /// Regions are matched by guest address; regions of `other` not in `self` are ignored.
    pub fn merge(&mut self, other: &DirtyBitmap) {
        for theirs in &other.regions {
            if let Some(mine) = self
                .regions
                .iter_mut()
                .find(|r| r.guest_addr == theirs.guest_addr)
            {
                mine.union_with(&theirs.bits);
            }
        }
    }
}

/// The pages written since tracking was armed, by who wrote them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WrittenPages {
    /// Written by the guest's CPUs (KVM's dirty log).
    pub guest: DirtyBitmap,
    /// Written by the VMM's devices (virtio-blk reads, vsock receive, ...).
    pub devices: DirtyBitmap,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_masks_bits_past_the_region_and_lists_frames() {
        let mut r = RegionDirty::clean(0x10_0000, 70);
        r.union_with(&[0b101, u64::MAX, 7]);
        assert!(r.is_dirty(0) && !r.is_dirty(1) && r.is_dirty(2) && r.is_dirty(69));
        assert!(!r.is_dirty(70) && !r.is_dirty(1000));
        assert_eq!(r.bits[1], 0b11_1111);
        let bitmap = DirtyBitmap { regions: vec![r] };
        assert_eq!(bitmap.count(), 2 + 6);
        let frames = bitmap.dirty_frames();
        assert_eq!(frames[..3], [0x100, 0x102, 0x100 + 64]);
        assert!(bitmap.is_frame_dirty(0x102) && !bitmap.is_frame_dirty(0x101));
        assert!(!bitmap.is_frame_dirty(0x10) && !bitmap.is_frame_dirty(0x100 + 70));
    }

    #[test]
    fn merge_accumulates_by_region() {
        let mut a = DirtyBitmap {
            regions: vec![RegionDirty::clean(0, 64)],
        };
        let mut b = a.clone();
        a.regions[0].union_with(&[1]);
        b.regions[0].union_with(&[2]);
        b.regions.push(RegionDirty {
            guest_addr: 1 << 30,
            pages: 1,
            bits: vec![1],
        });
        a.merge(&b);
        assert_eq!(a.dirty_frames(), vec![0, 1]);
    }
}
