//! Legacy PC devices on the port I/O bus.

pub mod serial;
