//! Booting a Linux guest: the guest physical layout ([`layout`]), loading the bzImage, initrd,
//! command line and boot parameters ([`loader`]) and the vCPUs' start state ([`cpu`]).

pub mod cpu;
pub mod layout;
pub mod loader;
