//! ACPI tables the guest kernel reads to find its devices. So far the DSDT describing the
//! virtio-mmio devices ([`dsdt`]), which is how Debian's cloud kernel (no `virtio_mmio.device=`
//! support) finds them; the MADT, FADT, XSDT and RSDP come with boot.

pub mod dsdt;
