//! ditto's host half: the KVM microVM monitor (`ditto-vmm`), the orchestration daemon (`dittod`)
//! and its CLI (`dittoctl`).
//!
//! The VMM library is organised by concern:
//!
//! - [`kvm`]: KVM state — the VM and its memory slots, vCPUs, guest memory and dirty tracking.
//! - [`devices`]: device models (virtio-blk) and the virtio-mmio transport.

pub mod devices;
pub mod kvm;
