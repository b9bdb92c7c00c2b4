//! The guest physical address layout of an x86-64 microVM: guest RAM split around the 32-bit
//! MMIO hole, the virtio-mmio windows and their interrupt lines, the fixed places of the boot
//! structures, and the e820 map the kernel gets. A layout that does not fit is an error before
//! anything is created.

use serde::{Deserialize, Serialize};

use crate::kvm::memory::{MemoryLayout, RegionLayout};

/// One MiB.
pub const MIB: u64 = 1 << 20;
/// Start of the 32-bit MMIO hole; RAM above this address moves to [`HIGH_RAM_START`].
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// Where RAM continues above the hole.
pub const HIGH_RAM_START: u64 = 1 << 32;
/// First virtio-mmio window.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// End of the virtio-mmio area (the IOAPIC and LAPIC live above it).
pub const VIRTIO_MMIO_END: u64 = 0xfec0_0000;
/// The IOAPIC's MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APICs' MMIO base.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// End of conventional memory below the EBDA (what e820 reports usable in the first MiB).
pub const EBDA_START: u64 = 0x9fc00;
/// Where the boot parameters (the "zero page") go.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Where the kernel command line goes.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line, including its terminating NUL.
pub const CMDLINE_MAX: u64 = 0x10000;
/// Where the ACPI RSDP goes (the BIOS area the kernel scans).
pub const RSDP_START: u64 = 0xe0000;
/// Where a bzImage's protected-mode kernel is loaded (the boot protocol's 1 MiB).
pub const KERNEL_START: u64 = 0x10_0000;
/// The boot GDT (null, 64-bit code, data, TSS descriptors).
pub const BOOT_GDT_START: u64 = 0x500;
/// The boot IDT (empty; the kernel installs its own before enabling interrupts).
pub const BOOT_IDT_START: u64 = 0x520;
/// The boot stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// The boot page tables: PML4, one PDPT and one page directory identity-mapping the first GiB
/// with 2 MiB pages.
pub const PML4_START: u64 = 0x9000;
/// The boot PDPT.
pub const PDPT_START: u64 = 0xa000;
/// The boot page directory.
pub const PD_START: u64 = 0xb000;
/// End of the area ACPI tables may occupy (the RSDP comes first at [`RSDP_START`]); the reset
/// stub follows at the reset vector.
pub const ACPI_END: u64 = super::reset_vector::RESET_VECTOR;
/// Interrupt lines for virtio-mmio devices: IOAPIC pins 5..=23 (0-4 are the timer, keyboard,
/// cascade and serial ports).
pub const VIRTIO_IRQS: std::ops::RangeInclusive<u32> = 5..=23;
/// Smallest guest RAM accepted.
pub const MIN_MEM_MIB: u64 = 32;
/// Largest guest RAM accepted (1 TiB).
pub const MAX_MEM_MIB: u64 = 1 << 20;

/// Why a layout does not fit.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// Guest RAM outside [`MIN_MEM_MIB`]..=[`MAX_MEM_MIB`].
    #[error("guest memory of {0} MiB is outside {MIN_MEM_MIB}..={MAX_MEM_MIB} MiB")]
    Memory(u64),
    /// More virtio devices than interrupt lines or MMIO windows.
    #[error("{0} virtio devices do not fit (at most {max})", max = max_devices())]
    TooManyDevices(usize),
}

/// The number of virtio-mmio devices a layout can hold.
pub fn max_devices() -> usize {
    let windows = (VIRTIO_MMIO_END - VIRTIO_MMIO_START) / VIRTIO_MMIO_SIZE;
    let irqs = VIRTIO_IRQS.count() as u64;
    windows.min(irqs) as usize
}

/// One virtio-mmio device's window and interrupt line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioSlot {
    /// Guest physical base of the register window.
    pub base: u64,
    /// Window size.
    pub len: u64,
    /// IOAPIC pin (GSI).
    pub irq: u32,
}

/// Kind of an e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum E820Kind {
    /// Usable RAM.
    Ram,
    /// Reserved (the kernel keeps away).
    Reserved,
}

/// One e820 map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// What it is.
    pub kind: E820Kind,
}

/// The whole guest physical layout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// Guest RAM regions (KVM memory slots).
    pub memory: MemoryLayout,
    /// One slot per virtio-mmio device, in device order.
    pub devices: Vec<MmioSlot>,
    /// The e820 map for the boot parameters.
    pub e820: Vec<E820Entry>,
}

impl Layout {
    /// Plans `mem_mib` MiB of RAM and `devices` virtio-mmio devices.
    pub fn plan(mem_mib: u64, devices: usize) -> Result<Self, LayoutError> {
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mem_mib) {
            return Err(LayoutError::Memory(mem_mib));
        }
        if devices > max_devices() {
            return Err(LayoutError::TooManyDevices(devices));
        }
        let bytes = mem_mib * MIB;
        let low = bytes.min(MMIO_HOLE_START);
        let mut regions = vec![RegionLayout {
            guest_addr: 0,
            size: low,
        }];
        if bytes > low {
            regions.push(RegionLayout {
                guest_addr: HIGH_RAM_START,
                size: bytes - low,
            });
        }
        let slots = (0..devices)
            .zip(VIRTIO_IRQS)
            .map(|(i, irq)| MmioSlot {
                base: VIRTIO_MMIO_START + i as u64 * VIRTIO_MMIO_SIZE,
                len: VIRTIO_MMIO_SIZE,
                irq,
            })
            .collect();
        let mut e820 = vec![
            E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820Kind::Ram,
            },
            E820Entry {
                addr: EBDA_START,
                size: MIB - EBDA_START,
                kind: E820Kind::Reserved,
            },
            E820Entry {
                addr: MIB,
                size: low - MIB,
                kind: E820Kind::Ram,
            },
        ];
        if bytes > low {
            e820.push(E820Entry {
                addr: HIGH_RAM_START,
                size: bytes - low,
                kind: E820Kind::Ram,
            });
        }
        Ok(Self {
            memory: MemoryLayout { regions },
            devices: slots,
            e820,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
        a.0 < b.0 + b.1 && b.0 < a.0 + a.1
    }

    #[test]
    fn small_vm_has_one_region_and_device_slots() {
        let l = Layout::plan(512, 3).expect("plan");
        assert_eq!(
            l.memory.regions,
            vec![RegionLayout {
                guest_addr: 0,
                size: 512 * MIB
            }]
        );
        assert_eq!(l.devices.len(), 3);
        assert_eq!(
            l.devices[0],
            MmioSlot {
                base: VIRTIO_MMIO_START,
                len: 0x1000,
                irq: 5
            }
        );
        assert_eq!(l.devices[2].irq, 7);
        let usable: u64 = l
            .e820
            .iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| e.size)
            .sum();
        assert_eq!(usable, 512 * MIB - MIB + EBDA_START);
    }

    #[test]
    fn large_vm_is_split_around_the_hole_and_nothing_overlaps() {
        let l = Layout::plan(5 * 1024, max_devices()).expect("plan");
        assert_eq!(l.memory.total_bytes(), 5 * 1024 * MIB);
        assert_eq!(l.memory.regions[1].guest_addr, HIGH_RAM_START);
        let ram: Vec<(u64, u64)> = l
            .memory
            .regions
            .iter()
            .map(|r| (r.guest_addr, r.size))
            .collect();
        for d in &l.devices {
            for &r in &ram {
                assert!(!overlaps((d.base, d.len), r), "{d:?} overlaps RAM {r:?}");
            }
            assert!(d.base + d.len <= IOAPIC_START);
        }
        for e in l.e820.iter().filter(|e| e.kind == E820Kind::Ram) {
            assert!(
                ram.iter()
                    .any(|&(b, s)| e.addr >= b && e.addr + e.size <= b + s),
                "{e:?}"
            );
        }
        let mut irqs: Vec<u32> = l.devices.iter().map(|d| d.irq).collect();
        irqs.dedup();
        assert_eq!(irqs.len(), l.devices.len());
        assert!(
            l.memory.create().is_ok() || cfg!(miri),
            "5 GiB of lazily mapped memory"
        );
    }

    #[test]
    fn layouts_that_do_not_fit_are_refused() {
        assert_eq!(Layout::plan(0, 1), Err(LayoutError::Memory(0)));
        assert_eq!(
            Layout::plan(MAX_MEM_MIB + 1, 1),
            Err(LayoutError::Memory(MAX_MEM_MIB + 1))
        );
        let n = max_devices() + 1;
        assert_eq!(Layout::plan(512, n), Err(LayoutError::TooManyDevices(n)));
        assert_eq!(max_devices(), 19);
    }
}
