//! Booting a Linux guest: the guest physical layout ([`layout`]). Loading the bzImage, initrd
//! and boot parameters (linux-loader) and the ACPI tables come next; they need the KVM test box
//! to be proven, because this machine's KVM cannot boot Linux.

pub mod layout;
