//! `ditto-agent`, the guest half of ditto: finds clean page-cache pages and reports them as
//! `(first guest frame, page count, disk, byte offset)` extents, and serves that report (and a
//! small exec facility) over gRPC on virtio-vsock.
//!
//! The host never trusts this report: it checks every extent against its own dirty tracking
//! and the guest's disks. The agent's job is to be right as often as it can, cheaply, and
//! never to change anything in the guest while it looks.

pub mod census;
pub mod disks;
pub mod exec;
pub mod extents;
pub mod fault;
pub mod fiemap;
pub mod frames;
pub mod kpageblock;
pub mod listen;
pub mod report;
pub mod scan;
pub mod service;

/// The vsock port the agent listens on by default.
pub const DEFAULT_VSOCK_PORT: u32 = 10240;
