//! The x86 reset vector (`f000:fff0`, physical [`RESET_VECTOR`]), where a PC's firmware starts
//! and where Linux jumps when it reboots "through the BIOS". ditto boots the kernel directly and
//! has no firmware, so the guest would run zeros there forever; instead a few bytes of real-mode
//! code at the vector write the ACPI reset value to the power device's reset register, which
//! ends the VM like any other reboot.
//!
//! This matters for stock kernels: on a hardware-reduced ACPI platform without EFI, Linux's
//! default reboot method is EFI, which falls through to the BIOS method (`machine_real_restart`
//! → far jump to the reset vector) without ever trying the FADT reset register. `reboot=a` on
//! the command line makes it use the register directly; with the stub both ways work.

use vm_memory::{Bytes, GuestAddress};

use crate::devices::legacy::power::{RESET_PORT, RESET_VALUE};
use crate::kvm::memory::GuestMemory;

/// Physical address of the reset vector (`f000:fff0`).
pub const RESET_VECTOR: u64 = 0xf_fff0;
/// The real-mode segment of the reset vector.
pub const RESET_SEGMENT: u16 = 0xf000;
/// The offset of the reset vector in [`RESET_SEGMENT`].
pub const RESET_OFFSET: u16 = 0xfff0;

/// Errors of writing the reset stub.
#[derive(Debug, thiserror::Error)]
pub enum ResetVectorError {
    /// Guest memory does not cover the reset vector.
    #[error("cannot write the reset stub at {RESET_VECTOR:#x}: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// The stub: `mov al, RESET_VALUE; mov dx, RESET_PORT; out dx, al; hlt; jmp hlt`. A guest that
/// comes back after the reset (it never should) halts rather than running on.
fn stub() -> [u8; 9] {
    let [port_lo, port_hi] = RESET_PORT.to_le_bytes();
    [
        0xb0,
        RESET_VALUE,
        0xba,
        port_lo,
        port_hi,
        0xee,
        0xf4,
        0xeb,
        0xfd,
    ]
}

/// Writes the reset stub at [`RESET_VECTOR`].
pub fn write(mem: &GuestMemory) -> Result<(), ResetVectorError> {
    mem.write_slice(&stub(), GuestAddress(RESET_VECTOR))
        .map_err(ResetVectorError::Write)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::devices::bus::Bus;
    use crate::devices::legacy::power::{PORT_COUNT, PowerDevice, PowerEvent, SLEEP_CONTROL_PORT};
    use crate::kvm::memory::MemoryLayout;
    use crate::kvm::vcpu::VcpuExitKind;
    use crate::kvm::vm::Vm;

    #[test]
    fn the_stub_fits_below_one_mib() {
        assert!(RESET_VECTOR + stub().len() as u64 <= 0x10_0000);
        assert_eq!(
            (u64::from(RESET_SEGMENT) << 4) + u64::from(RESET_OFFSET),
            RESET_VECTOR
        );
    }

    /// A vCPU started at `f000:fff0` (where `machine_real_restart` jumps) resets the VM through
    /// the power device, on the local /dev/kvm.
    #[test]
    fn a_jump_to_the_reset_vector_resets_the_vm() {
        let vm = Vm::new(&MemoryLayout::single(0x10_0000)).expect("vm");
        write(vm.memory()).expect("stub");
        let events = Arc::new(Mutex::new(Vec::new()));
        let seen = events.clone();
        let mut pio = Bus::new();
        pio.insert(
            u64::from(SLEEP_CONTROL_PORT),
            PORT_COUNT,
            Arc::new(Mutex::new(PowerDevice::new(Arc::new(move |e| {
                seen.lock().expect("events").push(e);
            })))),
        )
        .expect("power device");
        let mut vcpu = vm.create_vcpu(0).expect("vcpu");
        vcpu.set_real_mode_entry_at(RESET_SEGMENT, RESET_OFFSET)
            .expect("entry");
        let exit = vcpu.run_with_buses(&pio, &Bus::new()).expect("run");
        assert!(
            matches!(&exit, VcpuExitKind::IoOut { port, data } if *port == RESET_PORT && data[..] == [RESET_VALUE]),
            "{exit:?}"
        );
        assert_eq!(*events.lock().expect("events"), [PowerEvent::Reset]);
    }

    #[test]
    fn memory_without_the_first_mib_is_an_error() {
        let memory = MemoryLayout::single(0x8_0000).create().expect("memory");
        assert!(matches!(write(&memory), Err(ResetVectorError::Write(_))));
    }
}
