//! Guest memory: anonymous host mappings, one per guest RAM region, each carrying vm-memory's
//! [`AtomicBitmap`] as the VMM's own record of the pages it wrote (device DMA such as virtio-blk
//! reads and vsock receive buffers — writes KVM's dirty log never sees).
//!
//! Every write through the [`vm_memory::Bytes`] interface of [`GuestMemory`] marks its pages in
//! that bitmap, so device models only need to write through guest memory, never through raw host
//! pointers.

use serde::{Deserialize, Serialize};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend as _, GuestMemoryMmap, GuestMemoryRegion as _};

use super::PAGE_SIZE;

/// Guest memory with the VMM's dirty bitmap of device writes.
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// What can go wrong while building guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The layout has no regions.
    #[error("guest memory layout has no regions")]
    Empty,
    /// A region is empty or not page aligned.
    #[error(
        "guest memory region at {guest_addr:#x} of {size:#x} bytes is empty or not page aligned"
    )]
    Unaligned {
        /// Start of the region in guest physical memory.
        guest_addr: u64,
        /// Size of the region in bytes.
        size: u64,
    },
    /// The host could not map the memory, or the regions overlap.
    #[error("cannot map guest memory: {0}")]
    Map(#[from] vm_memory::mmap::FromRangesError),
    /// A region's size does not fit the host's address space.
    #[error("guest memory region of {0:#x} bytes is too large for this host")]
    TooLarge(u64),
}

/// One guest RAM region: where it is in guest physical memory and how large it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionLayout {
    /// Start of the region in guest physical memory (page aligned).
    pub guest_addr: u64,
    /// Size of the region in bytes (a nonzero multiple of the page size).
    pub size: u64,
}

/// The guest RAM layout: the regions in guest physical address order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    /// The regions, sorted by guest address, not overlapping.
    pub regions: Vec<RegionLayout>,
}

impl MemoryLayout {
    /// A single region of `size` bytes at guest address 0.
    pub fn single(size: u64) -> Self {
        Self {
            regions: vec![RegionLayout {
                guest_addr: 0,
                size,
            }],
        }
    }

    /// Total bytes of guest RAM.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Maps zeroed anonymous memory for this layout, with an empty dirty bitmap per region.
    pub fn create(&self) -> Result<GuestMemory, MemoryError> {
        if self.regions.is_empty() {
            return Err(MemoryError::Empty);
        }
        let mut ranges = Vec::with_capacity(self.regions.len());
        for r in &self.regions {
            if r.size == 0 || r.size % PAGE_SIZE != 0 || r.guest_addr % PAGE_SIZE != 0 {
                return Err(MemoryError::Unaligned {
                    guest_addr: r.guest_addr,
                    size: r.size,
                });
            }
            let size = usize::try_from(r.size).map_err(|_| MemoryError::TooLarge(r.size))?;
            ranges.push((GuestAddress(r.guest_addr), size));
        }
        Ok(GuestMemoryMmap::from_ranges(&ranges)?)
    }

    /// The layout of existing guest memory.
    pub fn of(memory: &GuestMemory) -> Self {
        Self {
            regions: memory
                .iter()
                .map(|r| RegionLayout {
                    guest_addr: r.start_addr().0,
                    size: r.len(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn layout_round_trips_and_rejects_bad_regions() {
        let layout = MemoryLayout {
            regions: vec![
                RegionLayout {
                    guest_addr: 0,
                    size: 4 * PAGE_SIZE,
                },
                RegionLayout {
                    guest_addr: 16 * PAGE_SIZE,
                    size: 2 * PAGE_SIZE,
                },
            ],
        };
        let mem = layout.create().expect("create");
        assert_eq!(MemoryLayout::of(&mem), layout);
        assert_eq!(layout.total_bytes(), 6 * PAGE_SIZE);
        assert!(matches!(
            MemoryLayout::default().create(),
            Err(MemoryError::Empty)
        ));
        assert!(matches!(
            MemoryLayout::single(100).create(),
            Err(MemoryError::Unaligned { .. })
        ));
        let overlapping = MemoryLayout {
            regions: vec![
                RegionLayout {
                    guest_addr: 0,
                    size: 4 * PAGE_SIZE,
                },
                RegionLayout {
                    guest_addr: PAGE_SIZE,
                    size: PAGE_SIZE,
                },
            ],
        };
        assert!(matches!(overlapping.create(), Err(MemoryError::Map(_))));
    }

    #[test]
    fn writes_through_guest_memory_mark_the_bitmap() {
        let mem = MemoryLayout::single(8 * PAGE_SIZE)
            .create()
            .expect("create");
        mem.write_slice(&[1u8; 10], GuestAddress(3 * PAGE_SIZE + 5))
            .expect("write");
        let region = mem.iter().next().expect("region");
        assert!(vm_memory::MmapRegion::bitmap(region).is_bit_set(3));
        assert!(!vm_memory::MmapRegion::bitmap(region).is_bit_set(2));
        assert!(!vm_memory::MmapRegion::bitmap(region).is_bit_set(4));
    }
}
