//! The KVM VM: its file descriptor, one memory slot per guest RAM region, and the dirty tracking
//! API (issue 4, item 5).
//!
//! Dirty tracking is armed with [`Vm::enable_dirty_logging`], which re-sets every memory slot with
//! `KVM_MEM_LOG_DIRTY_PAGES` and clears the VMM's own bitmap of device writes, so that both start
//! at the same moment. [`Vm::fetch_and_clear_dirty`] returns the union of KVM's log (pages the
//! guest CPUs wrote) and the VMM's bitmap (pages devices wrote through [`GuestMemory`]) and
//! clears both.

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES,
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};

use super::PAGE_SIZE;
use super::dirty::{DirtyBitmap, RegionDirty, WrittenPages};
use super::memory::{GuestMemory, MemoryError, MemoryLayout};
use super::vcpu::{SAVED_MSRS, Vcpu, VcpuError};

/// What can go wrong with the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// The operation that failed.
        op: &'static str,
        /// The error KVM returned.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be built.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A guest memory region could not be registered as a KVM slot.
    #[error("guest memory region {index} cannot be a KVM memory slot: {reason}")]
    Slot {
        /// Index of the region (and slot).
        index: usize,
        /// Why.
        reason: String,
    },
    /// In-kernel device state was asked for on a VM without an irqchip.
    #[error("the VM has no in-kernel irqchip")]
    NoIrqchip,
    /// Dirty pages were asked for while dirty logging is off.
    #[error("dirty logging is not enabled")]
    DirtyLoggingOff,
    /// A vCPU could not be created.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
}

/// The VMM's own bitmap of one region (the whole-region bitmap, not a slice of it).
fn vmm_bitmap(region: &vm_memory::GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    vm_memory::MmapRegion::bitmap(region)
}

fn kvm<T>(op: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VmError> {
    r.map_err(|source| VmError::Kvm { op, source })
}

/// The serialisable state of the VM itself (memory contents and vCPUs are captured separately).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// Guest RAM layout; region `i` is KVM memory slot `i`.
    pub memory: MemoryLayout,
    /// Whether KVM dirty logging is on for every slot.
    pub dirty_logging: bool,
    /// Whether the VM has the in-kernel irqchip and PIT.
    pub irqchip: bool,
}

/// The state of the VM's in-kernel devices: interrupt controllers, PIT and kvmclock.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmDevicesState {
    /// The master 8259 PIC.
    pub pic_master: kvm_irqchip,
    /// The slave 8259 PIC.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT.
    pub pit: kvm_pit_state2,
    /// The kvmclock (guest nanoseconds).
    pub clock: kvm_clock_data,
}

/// A KVM VM with its guest memory registered as memory slots.
pub struct Vm {
    // Field order matters: the VM file descriptor closes before this handle on the memory drops.
    fd: VmFd,
    kvm: Kvm,
    memory: GuestMemory,
    dirty_logging: bool,
    irqchip: bool,
    msr_indices: Vec<u32>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Opens `/dev/kvm`, creates a VM and maps fresh zeroed guest memory for `layout`.
    pub fn new(layout: &MemoryLayout) -> Result<Self, VmError> {
        let memory = layout.create()?;
        Self::with_memory(memory)
    }

    /// Opens `/dev/kvm`, creates a VM and registers `memory` (its regions become slots 0, 1, …).
    /// Dirty logging starts off.
    pub fn with_memory(memory: GuestMemory) -> Result<Self, VmError> {
        let kvm_fd = kvm("open /dev/kvm", Kvm::new())?;
        let fd = kvm("KVM_CREATE_VM", kvm_fd.create_vm())?;
        let supported = kvm("KVM_GET_MSR_INDEX_LIST", kvm_fd.get_msr_index_list())?;
        let msr_indices = SAVED_MSRS
            .iter()
            .copied()
            .filter(|i| supported.as_slice().contains(i))
            .collect();
        let vm = Self {
            fd,
            kvm: kvm_fd,
            memory,
            dirty_logging: false,
            irqchip: false,
            msr_indices,
        };
        vm.set_slots(false)?;
        Ok(vm)
    }

    /// (Re-)registers every region as a memory slot, with or without dirty logging.
    fn set_slots(&self, log_dirty: bool) -> Result<(), VmError> {
        for (index, region) in self.memory.iter().enumerate() {
            let slot = u32::try_from(index).map_err(|_| VmError::Slot {
                index,
                reason: "too many regions".into(),
            })?;
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| VmError::Slot {
                    index,
                    reason: e.to_string(),
                })?;
            let desc = kvm_userspace_memory_region {
                slot,
                flags: if log_dirty {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: `host` is the start of a live mapping of `region.len()` bytes owned by
            // `self.memory`; this struct holds a reference to that mapping for at least as long as
            // the VM file descriptor (field order), so KVM never sees a dangling slot.
            kvm("KVM_SET_USER_MEMORY_REGION", unsafe {
                self.fd.set_user_memory_region(desc)
            })?;
        }
        Ok(())
    }

    /// Arms dirty tracking: every slot is re-set with `KVM_MEM_LOG_DIRTY_PAGES` (KVM's log starts
    /// empty) and the VMM's bitmap of device writes is cleared.
    pub fn enable_dirty_logging(&mut self) -> Result<(), VmError> {
        self.set_slots(true)?;
        for region in self.memory.iter() {
            vmm_bitmap(region).reset();
        }
        self.dirty_logging = true;
        Ok(())
    }

    /// Disarms dirty tracking: every slot is re-set without `KVM_MEM_LOG_DIRTY_PAGES`.
    pub fn disable_dirty_logging(&mut self) -> Result<(), VmError> {
        self.set_slots(false)?;
        self.dirty_logging = false;
        Ok(())
    }

    /// Whether dirty logging is on.
    pub fn dirty_logging(&self) -> bool {
        self.dirty_logging
    }

    /// Fetches and clears the pages written since tracking was armed or last fetched: the union
    /// of KVM's dirty log of every slot and the VMM's own bitmap of device writes.
    ///
    /// For an exact answer the vCPUs should be out of `KVM_RUN` and device queues quiet; while
    /// the guest runs, a page written during the fetch shows up in this fetch or the next.
    pub fn fetch_and_clear_dirty(&self) -> Result<DirtyBitmap, VmError> {
        let mut written = self.fetch_and_clear_written()?;
        written.guest.merge(&written.devices);
        Ok(written.guest)
    }

    /// Like [`fetch_and_clear_dirty`](Self::fetch_and_clear_dirty), with the guest's writes
    /// (KVM's log) and the VMM's device writes apart.
    pub fn fetch_and_clear_written(&self) -> Result<WrittenPages, VmError> {
        if !self.dirty_logging {
            return Err(VmError::DirtyLoggingOff);
        }
        let mut out = WrittenPages::default();
        for (index, region) in self.memory.iter().enumerate() {
            let slot = u32::try_from(index).map_err(|_| VmError::Slot {
                index,
                reason: "too many regions".into(),
            })?;
            let size = usize::try_from(region.len()).map_err(|_| VmError::Slot {
                index,
                reason: "larger than the host".into(),
            })?;
            let clean = RegionDirty::clean(region.start_addr().0, region.len() / PAGE_SIZE);
            let mut guest = clean.clone();
            guest.union_with(&kvm(
                "KVM_GET_DIRTY_LOG",
                self.fd.get_dirty_log(slot, size),
            )?);
            let mut devices = clean;
            devices.union_with(&vmm_bitmap(region).get_and_reset());
            out.guest.regions.push(guest);
            out.devices.regions.push(devices);
        }
        Ok(out)
    }

    /// Creates the in-kernel interrupt controllers (PIC, IOAPIC, a LAPIC per vCPU) and PIT.
    /// Must come before the first vCPU.
    pub fn create_irqchip(&mut self) -> Result<(), VmError> {
        kvm("KVM_CREATE_IRQCHIP", self.fd.create_irq_chip())?;
        let pit = kvm_bindings::kvm_pit_config {
            flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        kvm("KVM_CREATE_PIT2", self.fd.create_pit2(pit))?;
        self.irqchip = true;
        Ok(())
    }

    /// Captures the in-kernel devices (needs [`Vm::create_irqchip`]). The vCPUs must be paused.
    pub fn save_devices(&self) -> Result<VmDevicesState, VmError> {
        if !self.irqchip {
            return Err(VmError::NoIrqchip);
        }
        let chip = |chip_id| {
            let mut c = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            kvm("KVM_GET_IRQCHIP", self.fd.get_irqchip(&mut c)).map(|()| c)
        };
        Ok(VmDevicesState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: kvm("KVM_GET_PIT2", self.fd.get_pit2())?,
            clock: kvm("KVM_GET_CLOCK", self.fd.get_clock())?,
        })
    }

    /// Restores captured in-kernel device state into this VM (created with
    /// [`Vm::create_irqchip`]), before its vCPUs run. The kvmclock continues from the captured
    /// value.
    pub fn restore_devices(&self, state: &VmDevicesState) -> Result<(), VmError> {
        if !self.irqchip {
            return Err(VmError::NoIrqchip);
        }
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            kvm("KVM_SET_IRQCHIP", self.fd.set_irqchip(chip))?;
        }
        kvm("KVM_SET_PIT2", self.fd.set_pit2(&state.pit))?;
        // Only the clock value is restored; the flags KVM reported (TSC stable, realtime, host
        // TSC) describe the old host's clock and are not accepted back.
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        kvm("KVM_SET_CLOCK", self.fd.set_clock(&clock))
    }

    /// Creates vCPU number `index`.
    pub fn create_vcpu(&self, index: u8) -> Result<Vcpu, VmError> {
        Ok(Vcpu::new(
            &self.fd,
            index,
            self.msr_indices.clone(),
            self.irqchip,
        )?)
    }

    /// The MSRs vCPU state includes: those of [`SAVED_MSRS`] this KVM supports.
    pub fn saved_msr_indices(&self) -> &[u32] {
        &self.msr_indices
    }

    /// The guest memory (a cheap handle sharing the mappings and the dirty bitmap).
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The `/dev/kvm` handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The serialisable state of the VM itself.
    pub fn state(&self) -> VmState {
        VmState {
            memory: MemoryLayout::of(&self.memory),
            dirty_logging: self.dirty_logging,
            irqchip: self.irqchip,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvm::memory::RegionLayout;
    use crate::kvm::vcpu::VcpuExitKind;
    use vm_memory::{Bytes, GuestAddress};

    /// Two slots, both reachable from real mode with DS = 0: pages 0..8 and 8..16.
    fn two_slot_vm() -> Vm {
        let layout = MemoryLayout {
            regions: vec![
                RegionLayout {
                    guest_addr: 0,
                    size: 8 * PAGE_SIZE,
                },
                RegionLayout {
                    guest_addr: 8 * PAGE_SIZE,
                    size: 8 * PAGE_SIZE,
                },
            ],
        };
        Vm::new(&layout).expect("VM on /dev/kvm")
    }

    /// Real-mode code at page 0 that writes 0x5a at offset 0x10 of each page and halts.
    fn run_payload(vm: &Vm, vcpu: &mut Vcpu, pages: &[u64]) {
        let mut code = vec![0xb0, 0x5a]; // mov al, 0x5a
        for &page in pages {
            code.push(0xa2); // mov [moffs16], al
            code.extend_from_slice(
                &u16::try_from(page * PAGE_SIZE + 0x10)
                    .expect("16-bit")
                    .to_le_bytes(),
            );
        }
        code.push(0xf4); // hlt
        // Placing the code goes through guest memory, so the VMM's bitmap marks page 0.
        vm.memory()
            .write_slice(&code, GuestAddress(0))
            .expect("code");
        vcpu.set_real_mode_entry(0).expect("entry");
        assert_eq!(vcpu.run().expect("run"), VcpuExitKind::Hlt);
    }

    #[test]
    fn dirty_union_is_exact_and_fetch_clears_both() {
        let mut vm = two_slot_vm();
        let mut vcpu = vm.create_vcpu(0).expect("vcpu");
        assert!(matches!(
            vm.fetch_and_clear_dirty(),
            Err(VmError::DirtyLoggingOff)
        ));
        vm.enable_dirty_logging().expect("enable");
        assert!(vm.state().dirty_logging);

        // The guest writes pages 2, 7 (slot 0) and 9, 15 (slot 1); the code page 0 is written by
        // the VMM when it places the code. The "device path" writes pages 3, 8 and 12 (one write
        // straddling 12 and 13).
        run_payload(&vm, &mut vcpu, &[2, 7, 9, 15]);
        vm.memory()
            .write_obj(0xabu8, GuestAddress(3 * PAGE_SIZE + 100))
            .expect("dev");
        vm.memory()
            .write_obj(0xabu8, GuestAddress(8 * PAGE_SIZE))
            .expect("dev");
        vm.memory()
            .write_slice(&[1u8; 8], GuestAddress(13 * PAGE_SIZE - 4))
            .expect("dev");
        let dirty = vm.fetch_and_clear_dirty().expect("fetch");
        assert_eq!(dirty.dirty_frames(), vec![0, 2, 3, 7, 8, 9, 12, 13, 15]);
        assert_eq!(dirty.regions.len(), 2);

        // Both logs are clear now.
        let again = vm.fetch_and_clear_dirty().expect("fetch");
        assert_eq!(again.count(), 0, "{:?}", again.dirty_frames());

        // Guest-only and device-only rounds are each seen on their own.
        run_payload(&vm, &mut vcpu, &[5]);
        assert_eq!(
            vm.fetch_and_clear_dirty().expect("fetch").dirty_frames(),
            vec![0, 5]
        );
        vm.memory()
            .write_obj(1u32, GuestAddress(14 * PAGE_SIZE))
            .expect("dev");
        assert_eq!(
            vm.fetch_and_clear_dirty().expect("fetch").dirty_frames(),
            vec![14]
        );
    }

    #[test]
    fn disable_and_re_enable_starts_a_fresh_log() {
        let mut vm = two_slot_vm();
        let mut vcpu = vm.create_vcpu(0).expect("vcpu");
        vm.enable_dirty_logging().expect("enable");
        run_payload(&vm, &mut vcpu, &[4]);
        vm.disable_dirty_logging().expect("disable");
        assert!(matches!(
            vm.fetch_and_clear_dirty(),
            Err(VmError::DirtyLoggingOff)
        ));
        // Written while off: not reported after re-arming.
        run_payload(&vm, &mut vcpu, &[6, 10]);
        vm.memory()
            .write_obj(1u8, GuestAddress(11 * PAGE_SIZE))
            .expect("dev");
        vm.enable_dirty_logging().expect("re-enable");
        assert_eq!(vm.fetch_and_clear_dirty().expect("fetch").count(), 0);
        run_payload(&vm, &mut vcpu, &[1, 10]);
        assert_eq!(
            vm.fetch_and_clear_dirty().expect("fetch").dirty_frames(),
            vec![0, 1, 10]
        );
        assert_eq!(
            vm.memory()
                .read_obj::<u8>(GuestAddress(PAGE_SIZE + 0x10))
                .expect("rd"),
            0x5a
        );
    }

    #[test]
    fn in_kernel_devices_round_trip_into_a_fresh_vm() {
        let layout = MemoryLayout::single(16 * PAGE_SIZE);
        let plain = Vm::new(&layout).expect("vm");
        assert!(matches!(plain.save_devices(), Err(VmError::NoIrqchip)));

        let mut vm = Vm::new(&layout).expect("vm");
        vm.create_irqchip().expect("irqchip");
        // Program IOAPIC redirection entry 5 so there is something non-default to carry.
        let mut ioapic = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        vm.fd().get_irqchip(&mut ioapic).expect("get ioapic");
        // SAFETY: chip_id IOAPIC means the union holds `ioapic`.
        unsafe { ioapic.chip.ioapic.redirtbl[5].bits = 0x0001_0000_0000_0035 };
        vm.fd().set_irqchip(&ioapic).expect("set ioapic");
        let saved = vm.save_devices().expect("save");
        let json = serde_json::to_string(&saved).expect("serialise");
        drop(vm);

        let state: VmDevicesState = serde_json::from_str(&json).expect("deserialise");
        let mut fresh = Vm::new(&layout).expect("fresh");
        fresh.create_irqchip().expect("irqchip");
        fresh.restore_devices(&state).expect("restore");
        let again = fresh.save_devices().expect("save again");
        // SAFETY: both are IOAPIC chips, as above.
        let entry = unsafe { again.ioapic.chip.ioapic.redirtbl[5].bits };
        assert_eq!(entry, 0x0001_0000_0000_0035);
        assert!(
            again.clock.clock >= state.clock.clock,
            "kvmclock continues, never goes back"
        );
        let pics = |s: &VmDevicesState| {
            serde_json::to_string(&(&s.pic_master, &s.pic_slave)).expect("json")
        };
        assert_eq!(pics(&again), pics(&state));
    }
}
