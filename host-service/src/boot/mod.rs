//! Booting a Linux guest: the guest physical layout ([`layout`]), loading the bzImage, initrd,
//! command line and boot parameters ([`loader`]), the vCPUs' start state ([`cpu`]) and the
//! reset stub that makes BIOS-style reboots end the VM ([`reset_vector`]).

pub mod cpu;
pub mod layout;
pub mod loader;
pub mod reset_vector;
