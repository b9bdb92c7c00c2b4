//! ditto's host half: the KVM microVM monitor (`ditto-vmm`), the orchestration daemon (`dittod`)
//! and its CLI (`dittoctl`).
//!
//! The VMM library is organised by concern:
//!
//! - [`kvm`]: KVM state — the VM and its memory slots, vCPUs, guest memory and dirty tracking.
//! - [`acpi`]: ACPI tables (RSDP, XSDT, FADT, MADT, and the DSDT describing the devices).
//! - [`boot`]: the guest physical layout, kernel/initrd/boot-parameter loading, vCPU start
//!   state.
//! - [`devices`]: device models (virtio-blk, virtio-vsock, the serial console), the virtio-mmio
//!   transport and the port I/O and MMIO buses.
//! - [`vmm`]: one VM assembled from its configuration, started, paused, resumed, captured and
//!   rebuilt; the `ditto-vmm` binary drives it.
//! - [`control`]: the control endpoint (`ditto.vmm.v1.VmmControl` on a Unix socket).

pub mod acpi;
pub mod boot;
pub mod control;
pub mod devices;
pub mod kvm;
pub mod vmm;
