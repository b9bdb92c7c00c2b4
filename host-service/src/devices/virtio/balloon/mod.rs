//! virtio-balloon (device type 5) with free-page hinting (`VIRTIO_BALLOON_F_FREE_PAGE_HINT`),
//! the way Linux's `virtio_balloon` driver speaks it: the host writes a new command id into
//! configuration space and raises the configuration interrupt; the guest answers on the
//! free-page queue with the command id, then with buffers that *are* free memory blocks it
//! allocated and keeps until the host writes [`CMD_ID_DONE`], then with [`CMD_ID_STOP`].
//!
//! ditto uses the balloon only to learn which guest frames are free when it takes a checkpoint:
//! it never asks the guest to inflate (`num_pages` stays 0), and inflate or deflate buffers are
//! returned without discarding anything on the host.
//!
//! - [`hinting`]: the bookkeeping of one hinting round, checked against guest RAM;
//! - [`device`]: the device, its serialisable state and the host-side API on its transport.
//!
//! Hints are hints: the guest may reuse a hinted block before [`CMD_ID_DONE`] (Linux gives
//! blocks back under memory pressure through a shrinker), so a checkpoint may treat a hinted
//! frame as free only if it was not written since dirty tracking was armed before the round.

pub mod device;
pub mod hinting;

pub use device::{Balloon, BalloonError, BalloonState};
pub use hinting::{FrameRange, HintStatus};

/// The virtio device id of a memory balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;
/// Feature bit: the device reports free-page hints on a third queue.
pub const VIRTIO_BALLOON_F_FREE_PAGE_HINT: u32 = 3;
/// Feature bit (not offered): a statistics queue.
pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
/// Feature bit (not offered): deflate when the guest runs out of memory.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
/// Feature bit (not offered): the guest poisons free pages with `poison_val`.
pub const VIRTIO_BALLOON_F_PAGE_POISON: u32 = 4;
/// Feature bit (not offered): free-page reporting on its own queue.
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;

/// Command id "stop": the guest ends its report with it; before any round the device shows it.
pub const CMD_ID_STOP: u32 = 0;
/// Command id "done": the host has finished with the hints; the guest frees the blocks.
pub const CMD_ID_DONE: u32 = 1;
/// The first command id of a hinting round (ids below are [`CMD_ID_STOP`] and [`CMD_ID_DONE`]).
pub const CMD_ID_FIRST: u32 = 2;

/// Index of the inflate queue.
pub const INFLATE_QUEUE: usize = 0;
/// Index of the deflate queue.
pub const DEFLATE_QUEUE: usize = 1;
/// Index of the free-page queue. Linux numbers only the queues it uses, so without
/// `VIRTIO_BALLOON_F_STATS_VQ` (never offered here) the hint queue comes right after deflate.
pub const FREE_PAGE_QUEUE: usize = 2;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Size of the balloon's pages (the unit of inflate and deflate PFNs).
pub const BALLOON_PAGE_SIZE: u64 = 4096;

#[cfg(test)]
mod tests;
