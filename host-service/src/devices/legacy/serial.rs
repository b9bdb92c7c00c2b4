//! The 8250/16550 serial console (vm-superio's model) at COM1, writing guest output to stdout,
//! a file or any writer, and raising its interrupt through an [`Interrupt`] line.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::Interrupt;

/// COM1's I/O port base.
pub const COM1_PORT: u64 = 0x3f8;
/// COM1's ISA interrupt.
pub const COM1_IRQ: u32 = 4;
/// Number of ports the UART decodes.
pub const PORT_COUNT: u64 = 8;

/// The UART's registers and pending input, serialisable: vm-superio's `SerialState` through a
/// serde remote definition. (Its companion crate vm-superio-ser pins vm-superio 0.8.1, which
/// lacks the THRE re-assertion on IER writes that Linux's 8250 driver needs to transmit from
/// userspace.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialConsoleState(#[serde(with = "SerialStateDef")] pub SerialState);

/// The serde shape of [`SerialState`].
#[derive(Serialize, Deserialize)]
#[serde(remote = "SerialState")]
struct SerialStateDef {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// Adapts an [`Interrupt`] line to vm-superio's trigger.
pub struct SerialIrq(pub Box<dyn Interrupt>);

impl Trigger for SerialIrq {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.trigger()
    }
}

/// The serial console device.
pub struct SerialConsole {
    serial: Serial<SerialIrq, NoEvents, Box<dyn Write + Send>>,
}

impl std::fmt::Debug for SerialConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialConsole").finish_non_exhaustive()
    }
}

impl SerialConsole {
    /// A UART writing guest output to `out`.
    pub fn new(irq: Box<dyn Interrupt>, out: Box<dyn Write + Send>) -> Self {
        Self {
            serial: Serial::new(SerialIrq(irq), out),
        }
    }

    /// Rebuilds a UART from captured registers.
    pub fn restore(
        state: &SerialConsoleState,
        irq: Box<dyn Interrupt>,
        out: Box<dyn Write + Send>,
    ) -> Result<Self, vm_superio::serial::Error<std::io::Error>> {
        let serial = Serial::from_state(&state.0, SerialIrq(irq), NoEvents, out)?;
        Ok(Self { serial })
    }

    /// The UART's registers and pending input, serialisable.
    pub fn state(&self) -> SerialConsoleState {
        SerialConsoleState(self.serial.state())
    }

    /// Queues input bytes for the guest (as if typed); returns how many fit in the FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(input).unwrap_or(0)
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            *byte = self.serial.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            // An output error (closed stdout, full disk) loses console bytes, never the guest.
            let _ = self.serial.write(offset, *byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::devices::bus::Bus;
    use crate::devices::virtio::block::{Block, BlockConfig};
    use crate::devices::virtio::mmio::{MMIO_WINDOW, MmioTransport};
    use crate::kvm::memory::MemoryLayout;
    use crate::kvm::vcpu::VcpuExitKind;
    use crate::kvm::vm::Vm;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buffer").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A real-mode guest on /dev/kvm prints through the UART, reads its line status register
    /// (an IN answered by the bus) and reads a virtio-mmio device's magic value (an MMIO read).
    #[test]
    fn guest_prints_on_the_console_and_reads_pio_and_mmio_registers() {
        #[rustfmt::skip]
        let code = [
            0xba, 0xf8, 0x03,             // mov dx, 0x3f8
            0xb0, b'o', 0xee,             // mov al, 'o'; out dx, al
            0xb0, b'k', 0xee,             // mov al, 'k'; out dx, al
            0xb0, b'\n', 0xee,            // mov al, '\n'; out dx, al
            0xba, 0xfd, 0x03,             // mov dx, 0x3fd (line status)
            0xec,                         // in al, dx
            0xa2, 0x00, 0x30,             // mov [0x3000], al
            0xb8, 0x00, 0x80,             // mov ax, 0x8000
            0x8e, 0xd8,                   // mov ds, ax
            0x66, 0xa1, 0x00, 0x00,       // mov eax, [0]   (guest physical 0x80000)
            0x31, 0xdb,                   // xor bx, bx
            0x8e, 0xdb,                   // mov ds, bx
            0x66, 0xa3, 0x04, 0x30,       // mov [0x3004], eax
            0xf4,                         // hlt
        ];
        let vm = Vm::new(&MemoryLayout::single(16 * 4096)).expect("vm");
        vm.memory()
            .write_slice(&code, GuestAddress(0x1000))
            .expect("code");
        let out = Shared::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let console = SerialConsole::new(Box::new(irq), Box::new(out.clone()));
        let mut pio = Bus::new();
        pio.insert(COM1_PORT, PORT_COUNT, Arc::new(Mutex::new(console)))
            .expect("com1");

        let disk = tempfile::NamedTempFile::new().expect("disk");
        disk.as_file().set_len(4096).expect("size");
        let config = BlockConfig {
            id: "d".into(),
            path: disk.path().to_path_buf(),
            read_only: true,
        };
        let block = Block::open(config).expect("block");
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let transport =
            MmioTransport::new(block, vm.memory().clone(), Box::new(irq)).expect("mmio");
        let mut mmio = Bus::new();
        mmio.insert(0x8_0000, MMIO_WINDOW, Arc::new(Mutex::new(transport)))
            .expect("virtio");

        let mut vcpu = vm.create_vcpu(0).expect("vcpu");
        vcpu.set_real_mode_entry(0x1000).expect("entry");
        let mut exits = 0;
        loop {
            match vcpu.run_with_buses(&pio, &mmio).expect("run") {
                VcpuExitKind::Hlt => break,
                VcpuExitKind::Other(other) => panic!("unexpected exit {other}"),
                _ => exits += 1,
            }
            assert!(exits < 100, "runaway guest");
        }
        assert_eq!(out.0.lock().expect("out").as_slice(), b"ok\n");
        let lsr = vm
            .memory()
            .read_obj::<u8>(GuestAddress(0x3000))
            .expect("lsr");
        assert_eq!(lsr & 0x60, 0x60, "transmitter empty: {lsr:#x}");
        let magic = vm
            .memory()
            .read_obj::<u32>(GuestAddress(0x3004))
            .expect("magic");
        assert_eq!(magic, 0x7472_6976, "virtio-mmio magic through an MMIO exit");
    }

    #[test]
    fn registers_and_pending_input_survive_capture_json_and_restore() {
        let irq = || Box::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
        let mut uart = SerialConsole::new(irq(), Box::new(std::io::sink()));
        uart.write(7, &[0x5a]); // scratch register
        uart.write(3, &[0x03]); // line control: 8 bits
        uart.enqueue_input(b"hi");
        let json = serde_json::to_string(&uart.state()).expect("serialise");
        let state: SerialConsoleState = serde_json::from_str(&json).expect("deserialise");
        assert_eq!(state, uart.state());
        let mut restored =
            SerialConsole::restore(&state, irq(), Box::new(std::io::sink())).expect("restore");
        let mut byte = [0];
        restored.read(7, &mut byte);
        assert_eq!(byte, [0x5a]);
        restored.read(0, &mut byte);
        assert_eq!(byte, [b'h'], "pending input carried over");
    }
}
