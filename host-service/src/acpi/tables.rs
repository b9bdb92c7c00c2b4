//! The complete ACPI table set of a hardware-reduced microVM, written into guest memory at
//! [`RSDP_START`]: RSDP → XSDT → FADT (hardware-reduced, sleep control/status and reset
//! registers on the power device, DSDT) and MADT (one local APIC per vCPU, the IOAPIC, LINT1 as
//! NMI).

use acpi_tables::Aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use vm_memory::{Bytes, GuestAddress};

use super::dsdt::{self, DsdtError, OEM_ID, OEM_TABLE_ID};
use crate::boot::layout::{ACPI_END, IOAPIC_START, LAPIC_START, MmioSlot, RSDP_START};
use crate::devices::legacy::power::{
    RESET_PORT, RESET_VALUE, SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT,
};
use crate::kvm::memory::GuestMemory;

/// IA-PC boot architecture flags: no VGA, no MSI, no CMOS RTC (and, by their absence, no 8042
/// keyboard controller and no legacy devices).
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
/// MADT flag: the platform also has dual 8259 PICs (KVM's in-kernel irqchip does).
const MADT_PCAT_COMPAT: u32 = 1;
/// Hypervisor vendor identity in the FADT.
const HYPERVISOR_ID: u64 = u64::from_le_bytes(*b"DITTOVMM");

/// Why the tables cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The DSDT cannot describe the devices.
    #[error(transparent)]
    Dsdt(#[from] DsdtError),
    /// The tables do not fit below 1 MiB.
    #[error("ACPI tables of {0} bytes do not fit between {RSDP_START:#x} and {ACPI_END:#x}")]
    TooLarge(u64),
    /// More vCPUs than MADT local APIC entries can number.
    #[error("{0} vCPUs do not fit in the MADT (at most 255)")]
    TooManyVcpus(usize),
    /// Guest memory could not be written.
    #[error("cannot write the ACPI tables into guest memory")]
    Memory,
}

fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

fn aml_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    table.to_aml_bytes(&mut out);
    out
}

/// The MADT: local APIC address, PC-AT compatibility, one enabled local APIC per vCPU (APIC id
/// = vCPU index), the IOAPIC with GSI base 0, and LINT1 of every processor as NMI.
fn madt(vcpus: u8) -> Vec<u8> {
    let mut table = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, 1);
    table.write_u32(36, LAPIC_START as u32);
    table.write_u32(40, MADT_PCAT_COMPAT);
    for id in 0..vcpus {
        // Type 0, length 8: processor uid, APIC id, flags (enabled).
        table.append_slice(&[0, 8, id, id]);
        table.append_slice(&1u32.to_le_bytes());
    }
    // Type 1, length 12: IOAPIC id, reserved, address, GSI base.
    table.append_slice(&[1, 12, 0, 0]);
    table.append_slice(&(IOAPIC_START as u32).to_le_bytes());
    table.append_slice(&0u32.to_le_bytes());
    // Type 4, length 6: local APIC NMI for all processors (uid 0xff), flags 0, LINT1.
    table.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    table.update_checksum();
    table.as_slice().to_vec()
}

/// Builds the tables for `vcpus` vCPUs and the virtio-mmio `slots` and writes them into guest
/// memory from [`RSDP_START`]. Returns the RSDP's address.
pub fn write(mem: &GuestMemory, vcpus: usize, slots: &[MmioSlot]) -> Result<u64, AcpiError> {
    let vcpus = u8::try_from(vcpus)
        .ok()
        .filter(|v| *v < u8::MAX)
        .ok_or(AcpiError::TooManyVcpus(vcpus))?;
    let dsdt = dsdt::build(slots)?;
    // Layout: RSDP, then XSDT, FADT, MADT, DSDT, each 16-byte aligned.
    let align = |a: u64| (a + 15) & !15;
    let xsdt_addr = align(RSDP_START + Rsdp::len() as u64);
    let fadt_addr = align(xsdt_addr + 36 + 2 * 8);
    let madt_addr = align(fadt_addr + acpi_tables::fadt::FADT::len() as u64);
    let madt = madt(vcpus);
    let dsdt_addr = align(madt_addr + madt.len() as u64);
    let end = dsdt_addr + dsdt.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooLarge(end - RSDP_START));
    }

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, 1)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch =
        (IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED | IAPC_CMOS_RTC_NOT_PRESENT).into();
    fadt.reset_reg = io_register(RESET_PORT);
    fadt.reset_value = RESET_VALUE;
    fadt.sleep_control_reg = io_register(SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_register(SLEEP_STATUS_PORT);
    fadt.hypervisor_vendor_identity = HYPERVISOR_ID.into();
    let fadt = aml_bytes(&fadt.finalize());

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = aml_bytes(&xsdt);
    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    for (addr, bytes) in [
        (RSDP_START, &rsdp),
        (xsdt_addr, &xsdt),
        (fadt_addr, &fadt),
        (madt_addr, &madt),
        (dsdt_addr, &dsdt),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|_| AcpiError::Memory)?;
    }
    Ok(RSDP_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::layout::Layout;

    fn read(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        mem.read_slice(&mut out, GuestAddress(addr)).expect("read");
        out
    }

    fn table(mem: &GuestMemory, addr: u64) -> Vec<u8> {
        let header = read(mem, addr, 8);
        let len = u32::from_le_bytes(header[4..8].try_into().expect("len"));
        let t = read(mem, addr, len as usize);
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "checksum");
        t
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().expect("u64"))
    }

    /// Walks the tables the way the kernel does: RSDP → XSDT → FADT/MADT → DSDT.
    #[test]
    fn tables_chain_from_the_rsdp_with_valid_checksums() {
        let layout = Layout::plan(256, 3).expect("layout");
        let mem = layout.memory.create().expect("memory");
        let rsdp_addr = write(&mem, 2, &layout.devices).expect("acpi");
        let rsdp = read(&mem, rsdp_addr, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp[..20].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let xsdt = table(&mem, u64_at(&rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        let fadt = table(&mem, u64_at(&xsdt, 36));
        let madt = table(&mem, u64_at(&xsdt, 44));
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(&madt[..4], b"APIC");
        // FADT flags at 112: hardware-reduced and reset register supported.
        let flags = u32::from_le_bytes(fadt[112..116].try_into().expect("flags"));
        assert_ne!(flags & (1 << 20), 0);
        assert_ne!(flags & (1 << 10), 0);
        // X_DSDT at 140.
        let dsdt = table(&mem, u64_at(&fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        // Two local APICs (ids 0 and 1), one IOAPIC, one NMI entry.
        let mut at = 44;
        let mut kinds = Vec::new();
        while at < madt.len() {
            kinds.push((madt[at], madt[at + 3]));
            at += madt[at + 1] as usize;
        }
        assert_eq!(kinds, vec![(0, 0), (0, 1), (1, 0), (4, 0)]);
    }

    #[test]
    fn too_many_vcpus_are_refused() {
        let layout = Layout::plan(64, 1).expect("layout");
        let mem = layout.memory.create().expect("memory");
        assert!(matches!(
            write(&mem, 300, &layout.devices),
            Err(AcpiError::TooManyVcpus(300))
        ));
    }
}
