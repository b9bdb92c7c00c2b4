//! How each vCPU starts: CPUID, boot MSRs, FPU and local-APIC wiring for every vCPU, and for the
//! boot vCPU the 64-bit entry state of the Linux boot protocol — a flat GDT, identity-mapped
//! page tables for the first GiB, long mode on, `rsi` pointing at the boot parameters. The other
//! vCPUs wait for the kernel's INIT/SIPI in the in-kernel LAPIC.

use kvm_bindings::{CpuId, Msrs, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment};
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PD_START, PDPT_START, PML4_START,
    ZERO_PAGE_START,
};
use crate::kvm::cpuid;
use crate::kvm::memory::GuestMemory;
use crate::kvm::vcpu::Vcpu;

/// The boot GDT: null, 64-bit code (0x08), data (0x10), TSS (0x18).
const GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x008f_8b00_0000_ffff,
];
const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Page-table entry flags: present, writable; `PS` for a 2 MiB page.
const PTE_PRESENT_RW: u64 = 0x3;
const PTE_PS: u64 = 0x80;

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default type write-back.
const MTRR_ENABLED_WB: u64 = (1 << 11) | 6;

/// Local APIC register offsets and delivery modes for LINT0/LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Why a vCPU cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum CpuSetupError {
    /// A KVM vCPU ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// The boot structures could not be written to guest memory.
    #[error("cannot write the boot {0} into guest memory")]
    Memory(&'static str),
}

fn kvm<T>(op: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, CpuSetupError> {
    r.map_err(|source| CpuSetupError::Kvm { op, source })
}

/// Sets what every vCPU needs before it first runs: CPUID for its APIC id, boot MSRs, a sane
/// FPU, and (with an in-kernel irqchip) LINT0 as ExtINT and LINT1 as NMI.
pub fn setup_vcpu(
    vcpu: &Vcpu,
    supported_cpuid: &CpuId,
    vcpus: u8,
    lapic: bool,
) -> Result<(), CpuSetupError> {
    let fd = vcpu.fd();
    let cpuid = cpuid::for_vcpu(supported_cpuid, vcpu.index(), vcpus);
    kvm("KVM_SET_CPUID2", fd.set_cpuid2(&cpuid))?;
    let msrs = Msrs::from_entries(&[
        kvm_msr_entry {
            index: MSR_IA32_MISC_ENABLE,
            data: MISC_ENABLE_FAST_STRING,
            ..Default::default()
        },
        kvm_msr_entry {
            index: MSR_MTRR_DEF_TYPE,
            data: MTRR_ENABLED_WB,
            ..Default::default()
        },
    ])
    .map_err(|_| CpuSetupError::Memory("MSR list"))?;
    kvm("KVM_SET_MSRS", fd.set_msrs(&msrs))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    kvm("KVM_SET_FPU", fd.set_fpu(&fpu))?;
    if lapic {
        let mut state = kvm("KVM_GET_LAPIC", fd.get_lapic())?;
        for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let bytes: [u8; 4] = std::array::from_fn(|i| state.regs[reg + i] as u8);
            let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
            for (i, b) in value.to_le_bytes().into_iter().enumerate() {
                state.regs[reg + i] = b as _;
            }
        }
        kvm("KVM_SET_LAPIC", fd.set_lapic(&state))?;
    }
    Ok(())
}

/// A segment register built from boot GDT entry `index`.
fn segment(index: usize, selector: u16) -> kvm_segment {
    let entry = GDT[index];
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let granular = (entry >> 55) & 1 == 1;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if granular {
            (limit << 12) | 0xfff
        } else {
            limit
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the boot GDT, IDT and page tables into guest memory.
fn write_boot_tables(mem: &GuestMemory) -> Result<(), CpuSetupError> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|_| CpuSetupError::Memory("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| CpuSetupError::Memory("IDT"))?;
    let table = |what| move |_| CpuSetupError::Memory(what);
    mem.write_obj(PDPT_START | PTE_PRESENT_RW, GuestAddress(PML4_START))
        .map_err(table("PML4"))?;
    mem.write_obj(PD_START | PTE_PRESENT_RW, GuestAddress(PDPT_START))
        .map_err(table("PDPT"))?;
    for i in 0..512u64 {
        mem.write_obj(
            (i << 21) | PTE_PRESENT_RW | PTE_PS,
            GuestAddress(PD_START + 8 * i),
        )
        .map_err(table("page directory"))?;
    }
    Ok(())
}

/// Puts the boot vCPU at the kernel's 64-bit entry `entry` in long mode with the boot
/// parameters in `rsi`.
pub fn setup_boot_vcpu(
    vcpu: &Vcpu,
    mem: &GuestMemory,
    entry: GuestAddress,
) -> Result<(), CpuSetupError> {
    write_boot_tables(mem)?;
    let fd = vcpu.fd();
    let mut sregs = kvm("KVM_GET_SREGS", fd.get_sregs())?;
    let code = segment(1, CODE_SELECTOR);
    let data = segment(2, DATA_SELECTOR);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(3, TSS_SELECTOR);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    kvm("KVM_SET_SREGS", fd.set_sregs(&sregs))?;
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.0,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    kvm("KVM_SET_REGS", fd.set_regs(&regs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvm::memory::MemoryLayout;
    use crate::kvm::vm::Vm;

    #[test]
    fn gdt_entries_decode_to_flat_long_mode_segments() {
        let code = segment(1, CODE_SELECTOR);
        assert_eq!(
            (code.base, code.limit, code.l, code.db, code.g),
            (0, 0xffff_ffff, 1, 0, 1)
        );
        assert_eq!((code.type_, code.present, code.s), (0xb, 1, 1));
        let data = segment(2, DATA_SELECTOR);
        assert_eq!((data.limit, data.db, data.type_), (0xffff_ffff, 1, 0x3));
        let tss = segment(3, TSS_SELECTOR);
        assert_eq!((tss.type_, tss.s), (0xb, 0));
    }

    /// On this machine's KVM the state is accepted and reads back; booting Linux with it is
    /// tested in the KVM test box.
    #[test]
    fn boot_vcpu_enters_long_mode_at_the_kernel_entry() {
        let mut vm = Vm::new(&MemoryLayout::single(32 << 20)).expect("vm");
        vm.create_irqchip().expect("irqchip");
        let vcpu = vm.create_vcpu(0).expect("vcpu");
        let supported = vm
            .kvm()
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .expect("cpuid");
        setup_vcpu(&vcpu, &supported, 1, true).expect("setup");
        setup_boot_vcpu(&vcpu, vm.memory(), GuestAddress(0x10_0200)).expect("boot vcpu");
        let state = vcpu.save_state().expect("state");
        assert_eq!(state.regs.rip, 0x10_0200);
        assert_eq!(state.regs.rsi, ZERO_PAGE_START);
        assert_ne!(state.sregs.efer & EFER_LMA, 0);
        assert_eq!(state.sregs.cr3, PML4_START);
        let pde: u64 = vm
            .memory()
            .read_obj(GuestAddress(PD_START + 8))
            .expect("pde");
        assert_eq!(pde, (1 << 21) | 0x83);
        let lapic = state.lapic.expect("lapic");
        assert_eq!(
            (lapic.regs[APIC_LVT0 + 1] as u8) & 0x7,
            APIC_MODE_EXTINT as u8
        );
        assert_eq!((lapic.regs[APIC_LVT1 + 1] as u8) & 0x7, APIC_MODE_NMI as u8);
    }
}
