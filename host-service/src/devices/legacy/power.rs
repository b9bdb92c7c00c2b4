//! The ACPI power device of a hardware-reduced platform: the FADT points the kernel's sleep
//! control and reset registers at these ports. Writing sleep type S5 with SLP_EN powers the VM
//! off; writing the reset value reboots it. Either ends the VM: the device records what the
//! guest asked for and tells the VMM through a callback.

use std::sync::Arc;

use crate::devices::bus::BusDevice;

/// I/O port of the sleep control register (FADT `SLEEP_CONTROL_REG`).
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// I/O port of the sleep status register (FADT `SLEEP_STATUS_REG`).
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// I/O port of the reset register (FADT `RESET_REG`).
pub const RESET_PORT: u16 = 0x602;
/// Ports the device decodes, from [`SLEEP_CONTROL_PORT`].
pub const PORT_COUNT: u64 = 3;
/// The value the kernel writes to [`RESET_PORT`] (FADT `RESET_VALUE`).
pub const RESET_VALUE: u8 = 0x1;
/// The S5 (soft off) sleep type the DSDT's `\_S5_` package announces.
pub const S5_SLEEP_TYPE: u8 = 5;
/// SLP_EN in the sleep control register.
const SLEEP_ENABLE: u8 = 1 << 5;

/// What the guest asked the platform to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerEvent {
    /// Power off (S5).
    PowerOff,
    /// Reset (reboot).
    Reset,
}

/// The decoded meaning of a write to the device at `offset`, if any.
pub fn decode(offset: u64, value: u8) -> Option<PowerEvent> {
    match offset {
        0 if value & SLEEP_ENABLE != 0 && (value >> 2) & 0x7 == S5_SLEEP_TYPE => {
            Some(PowerEvent::PowerOff)
        }
        2 if value == RESET_VALUE => Some(PowerEvent::Reset),
        _ => None,
    }
}

/// Called when the guest powers off or resets, on the vCPU thread that asked.
pub type OnPowerEvent = Arc<dyn Fn(PowerEvent) + Send + Sync>;

/// The power device; `on_event` runs on the vCPU thread that made the write.
pub struct PowerDevice {
    on_event: OnPowerEvent,
}

impl std::fmt::Debug for PowerDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PowerDevice").finish_non_exhaustive()
    }
}

impl PowerDevice {
    /// A device calling `on_event` when the guest powers off or resets.
    pub fn new(on_event: OnPowerEvent) -> Self {
        Self { on_event }
    }
}

impl BusDevice for PowerDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status reads as "not waking"; the other registers are write-only.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [value] = data
            && let Some(event) = decode(offset, *value)
        {
            (self.on_event)(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[test]
    fn s5_with_sleep_enable_powers_off_and_the_reset_value_resets() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let mut dev = PowerDevice::new(Arc::new(move |e| log.lock().expect("log").push(e)));
        // What Linux writes for S5: SLP_TYP << 2 | SLP_EN.
        dev.write(0, &[(S5_SLEEP_TYPE << 2) | SLEEP_ENABLE]);
        dev.write(2, &[RESET_VALUE]);
        // Other sleep states, SLP_TYP without SLP_EN, other values, wide writes: ignored.
        dev.write(0, &[(3 << 2) | SLEEP_ENABLE]);
        dev.write(0, &[S5_SLEEP_TYPE << 2]);
        dev.write(2, &[0x6]);
        dev.write(2, &[RESET_VALUE, 0]);
        dev.write(1, &[0xff]);
        assert_eq!(
            *seen.lock().expect("log"),
            vec![PowerEvent::PowerOff, PowerEvent::Reset]
        );
        let mut status = [0xff];
        dev.read(1, &mut status);
        assert_eq!(status, [0]);
    }
}
