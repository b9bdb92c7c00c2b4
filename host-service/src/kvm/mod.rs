//! KVM state of one VM: guest memory ([`memory`]), the VM and its memory slots ([`vm`]), vCPUs
//! ([`vcpu`]), vCPU threads that stop promptly for pause and resume ([`runner`]) and dirty-page
//! tracking ([`dirty`]).
//!
//! Everything that describes state is a plain serialisable struct; the live objects (file
//! descriptors, mappings) are built from and captured into those structs.

pub mod cpuid;
pub mod dirty;
pub mod memory;
pub mod runner;
pub mod vcpu;
pub mod vm;

/// The page size KVM's dirty log and the VMM's own bitmap both count in.
pub const PAGE_SIZE: u64 = 4096;
