//! The DSDT: one `LNRO0005` (virtio-mmio) device per slot under `\_SB`, each with its register
//! window (`Memory32Fixed`) and edge-triggered interrupt in `_CRS`, as Linux's virtio_mmio ACPI
//! match expects, and the `\_S5_` sleep type the kernel writes to the power device to power off.

use acpi_tables::Aml;
use acpi_tables::AmlSink;
use acpi_tables::aml::{
    Device, EISAName, IO, Interrupt, Memory32Fixed, Name, Package, Path, ResourceTemplate, Scope,
};
use acpi_tables::sdt::Sdt;

use crate::boot::layout::MmioSlot;
use crate::devices::legacy::power::S5_SLEEP_TYPE;
use crate::devices::legacy::serial::{COM1_IRQ, COM1_PORT, PORT_COUNT};

/// OEM id written into the tables.
pub const OEM_ID: [u8; 6] = *b"DITTO ";
/// OEM table id written into the tables.
pub const OEM_TABLE_ID: [u8; 8] = *b"DITTOVM ";

/// AML that is already encoded.
struct Encoded(Vec<u8>);

impl Aml for Encoded {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// Why a DSDT cannot be built.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DsdtError {
    /// A virtio-mmio window is not addressable by a 32-bit memory descriptor.
    #[error("virtio-mmio window at {0:#x} is above 4 GiB")]
    WindowAbove4G(u64),
    /// More devices than four-character ACPI names `V000`..`VFFF` allow.
    #[error("{0} devices are too many for the DSDT")]
    TooManyDevices(usize),
}

/// Builds the DSDT for the virtio-mmio `slots`.
pub fn build(slots: &[MmioSlot]) -> Result<Vec<u8>, DsdtError> {
    if slots.len() > 0x1000 {
        return Err(DsdtError::TooManyDevices(slots.len()));
    }
    let mut devices = Vec::with_capacity(slots.len());
    for (i, slot) in slots.iter().enumerate() {
        let base = u32::try_from(slot.base).map_err(|_| DsdtError::WindowAbove4G(slot.base))?;
        let len = u32::try_from(slot.len).map_err(|_| DsdtError::WindowAbove4G(slot.base))?;
        let mut aml = Vec::new();
        let memory = Memory32Fixed::new(true, base, len);
        let irq = Interrupt::new(true, true, false, false, slot.irq);
        let crs = ResourceTemplate::new(vec![&memory, &irq]);
        let hid = Name::new(Path::new("_HID"), &"LNRO0005");
        let uid = Name::new(Path::new("_UID"), &i);
        let crs = Name::new(Path::new("_CRS"), &crs);
        Device::new(Path::new(&format!("V{i:03X}")), vec![&hid, &uid, &crs]).to_aml_bytes(&mut aml);
        devices.push(Encoded(aml));
    }
    // COM1 as a PNP0501 device: on a hardware-reduced platform the kernel has no legacy ISA
    // interrupts, so the serial port's IRQ only works when ACPI describes it.
    let mut com1 = Vec::new();
    let io = IO::new(COM1_PORT as u16, COM1_PORT as u16, 1, PORT_COUNT as u8);
    let irq = Interrupt::new(true, true, false, false, COM1_IRQ);
    let crs = ResourceTemplate::new(vec![&io, &irq]);
    Device::new(
        Path::new("COM1"),
        vec![
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0501")),
            &Name::new(Path::new("_UID"), &0u8),
            &Name::new(Path::new("_CRS"), &crs),
        ],
    )
    .to_aml_bytes(&mut com1);
    devices.push(Encoded(com1));
    let children: Vec<&dyn Aml> = devices.iter().map(|d| d as &dyn Aml).collect();
    let mut body = Vec::new();
    let s5 = [S5_SLEEP_TYPE, 0, 0, 0];
    let s5: Vec<&dyn Aml> = s5.iter().map(|v| v as &dyn Aml).collect();
    Name::new(Path::new("_S5_"), &Package::new(s5)).to_aml_bytes(&mut body);
    Scope::new(Path::new("\\_SB_"), children).to_aml_bytes(&mut body);
    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, 1);
    table.append_slice(&body);
    Ok(table.as_slice().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::layout::Layout;

    fn count(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .filter(|w| *w == needle)
            .count()
    }

    #[test]
    fn dsdt_describes_every_virtio_mmio_device() {
        let layout = Layout::plan(512, 3).expect("layout");
        let table = build(&layout.devices).expect("dsdt");
        assert_eq!(&table[..4], b"DSDT");
        let len = u32::from_le_bytes(table[4..8].try_into().expect("length"));
        assert_eq!(len as usize, table.len());
        assert_eq!(
            table.iter().fold(0u8, |a, b| a.wrapping_add(*b)),
            0,
            "checksum"
        );
        assert_eq!(count(&table, b"LNRO0005"), 3);
        assert_eq!(count(&table, b"COM1"), 1);
        // IO descriptor: tag 0x47, 16-bit decode, 0x3f8..0x3f8, alignment 1, 8 ports.
        assert_eq!(
            count(&table, &[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]),
            1
        );
        // Name(_S5_, Package(4) { 5, 0, 0, 0 }).
        assert_eq!(count(&table, b"_S5_\x12\x07\x04\x0a\x05\x00\x00\x00"), 1);
        for (i, slot) in layout.devices.iter().enumerate() {
            assert_eq!(count(&table, format!("V{i:03X}").as_bytes()), 1);
            // Memory32Fixed: tag 0x86, length 9, read-write, base, size.
            let mut mem = vec![0x86, 0x09, 0x00, 0x01];
            mem.extend_from_slice(&(slot.base as u32).to_le_bytes());
            mem.extend_from_slice(&(slot.len as u32).to_le_bytes());
            assert_eq!(count(&table, &mem), 1, "window of device {i}");
            // Extended interrupt: tag 0x89, length 6, consumer + edge, one interrupt.
            let mut irq = vec![0x89, 0x06, 0x00, 0x03, 0x01];
            irq.extend_from_slice(&slot.irq.to_le_bytes());
            assert_eq!(count(&table, &irq), 1, "interrupt of device {i}");
        }
    }

    #[test]
    fn windows_above_4g_are_refused() {
        let slot = MmioSlot {
            base: 1 << 32,
            len: 0x1000,
            irq: 5,
        };
        assert_eq!(build(&[slot]), Err(DsdtError::WindowAbove4G(1 << 32)));
        assert!(build(&[]).is_ok());
    }
}
