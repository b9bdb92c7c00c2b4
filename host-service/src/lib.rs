//! ditto's host half: the KVM microVM monitor (`ditto-vmm`), the orchestration daemon (`dittod`)
//! and its CLI (`dittoctl`).
//!
//! The VMM library is organised by concern:
//!
//! - [`kvm`]: KVM state — the VM and its memory slots, vCPUs, guest memory and dirty tracking.
//! - [`acpi`]: ACPI tables (the DSDT that describes the virtio-mmio devices).
//! - [`boot`]: the guest physical layout (RAM around the MMIO hole, virtio-mmio slots, e820).
//! - [`devices`]: device models (virtio-blk, virtio-vsock, the serial console), the virtio-mmio
//!   transport and the port I/O and MMIO buses.

pub mod acpi;
pub mod boot;
pub mod control;
pub mod devices;
pub mod kvm;
pub mod vmm;
