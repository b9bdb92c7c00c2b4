//! Legacy PC devices on the port I/O bus: the serial console and the ACPI power device.

pub mod power;
pub mod serial;
