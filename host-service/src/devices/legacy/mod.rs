//! Legacy PC devices on the port I/O bus: the serial console, the ACPI power device and the
//! keyboard controller's reset line.

pub mod console_tail;
pub mod i8042;
pub mod power;
pub mod serial;
