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
//! - [`agent`]: the host's client of the guest agent, through the hybrid vsock socket.
//! - [`daemon`]: `dittod`, the orchestration daemon (`ditto.host.v1.Host`): a registry of VMs
//!   in a state directory, one supervised `ditto-vmm` process per running VM.
//! - [`cli`]: `dittoctl`'s client and output formatting.
//! - [`atomic_file`]: files replaced atomically (records, exit files).
//! - [`unix_socket`]: owner-only Unix socket files, shared by the servers.
//! - [`checkpoint`]: the checkpoint file (page map, compressed chunks, state) and its writer and
//!   reader; [`vmm::snapshot`] checkpoints and restores a whole VM with it.
//! - [`omission`]: which pages a `ditto` or `free-only` checkpoint leaves out: the agent's
//!   report fetched with bounds, the page-by-page decision and content verification.
//! - [`disk_copy`]: sparse copies of disk images (the disks of a checkpoint and its clones).

pub mod acpi;
pub mod agent;
pub mod atomic_file;
pub mod boot;
pub mod checkpoint;
pub mod cli;
pub mod control;
pub mod daemon;
pub mod devices;
pub mod disk_copy;
pub mod error_text;
pub mod kvm;
pub mod omission;
pub mod unix_socket;
pub mod vmm;
