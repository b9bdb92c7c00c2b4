//! The one part of the PC's 8042 keyboard controller a VM without a keyboard needs: its reset
//! line. Linux's `reboot=k` method (the one Firecracker tells its guests to use) and its
//! fallback chain poll the status port until the controller's input buffer is empty, then
//! write command 0xFE, "pulse the reset line". With nothing at the port every poll reads all
//! ones (buffer full), and each of the kernel's ten attempts spins through 65 536 polls, every
//! one a VM exit; here the status always reads empty and 0xFE resets the VM.

use crate::devices::bus::BusDevice;
use crate::devices::legacy::power::{OnPowerEvent, PowerEvent};

/// The controller's status (read) and command (write) port.
pub const COMMAND_PORT: u16 = 0x64;
/// Ports the device decodes, from [`COMMAND_PORT`].
pub const PORT_COUNT: u64 = 1;
/// The command that pulses the CPU reset line.
pub const PULSE_RESET: u8 = 0xfe;

/// The reset line of the keyboard controller; `on_event` runs on the vCPU thread that wrote.
pub struct KeyboardControllerReset {
    on_event: OnPowerEvent,
}

impl std::fmt::Debug for KeyboardControllerReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyboardControllerReset")
            .finish_non_exhaustive()
    }
}

impl KeyboardControllerReset {
    /// A controller calling `on_event` with [`PowerEvent::Reset`] on [`PULSE_RESET`].
    pub fn new(on_event: OnPowerEvent) -> Self {
        Self { on_event }
    }
}

impl BusDevice for KeyboardControllerReset {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty, no error.
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data == [PULSE_RESET] {
            (self.on_event)(PowerEvent::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn the_status_reads_empty_and_only_pulse_reset_resets() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let mut dev =
            KeyboardControllerReset::new(Arc::new(move |e| log.lock().expect("log").push(e)));
        let mut status = [0xff];
        dev.read(0, &mut status);
        assert_eq!(status, [0], "input buffer empty");
        // Other controller commands (read config, self test, disable keyboard) do nothing.
        for command in [0x20, 0xaa, 0xad] {
            dev.write(0, &[command]);
        }
        assert!(seen.lock().expect("log").is_empty());
        dev.write(0, &[PULSE_RESET]);
        assert_eq!(*seen.lock().expect("log"), [PowerEvent::Reset]);
    }
}
