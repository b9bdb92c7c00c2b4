//! virtio-blk on a raw image file: request parsing ([`request`]), the device ([`device`]) and
//! copy before write of blocks that checkpoints reference ([`preserve`]).
//!
//! Guest input is never trusted: every descriptor is checked against guest memory and its
//! direction, every request against the disk's size, and a malformed request fails with the
//! proper virtio status (or, when not even the status byte is usable, is returned unused) while
//! the device keeps running.

pub mod device;
pub mod preserve;
pub mod request;

pub use device::{Block, BlockConfig, BlockError, BlockState, SectorRange};
pub use preserve::{PreserveError, PreservedCheckpoint, ReferencedBlocks};

/// Size of a virtio-blk sector in bytes.
pub const SECTOR_SIZE: u64 = 512;
/// Bytes of the device id string returned by `VIRTIO_BLK_T_GET_ID`.
pub const ID_BYTES: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;
/// Size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;

#[cfg(test)]
mod preserve_tests;
#[cfg(test)]
mod tests;
