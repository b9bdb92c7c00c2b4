//! ACPI tables the guest kernel reads to find its CPUs, interrupt controllers and devices: the
//! DSDT describing the virtio-mmio devices ([`dsdt`]) — how Debian's cloud kernel (no
//! `virtio_mmio.device=` support) finds them — and the RSDP, XSDT, FADT and MADT around it
//! ([`tables`]).

pub mod dsdt;
pub mod tables;
