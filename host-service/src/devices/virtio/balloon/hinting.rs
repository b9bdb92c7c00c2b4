//! One free-page hinting round as the device sees it: which command id the host asked for,
//! whether the guest has started and stopped answering it, and the frames it hinted.
//!
//! The guest is not trusted. A hinted buffer counts only while the host's round is open and
//! the guest's last command id on the free-page queue is that round's; only the whole pages of
//! a buffer that lie inside guest RAM count (the rest is dropped and counted); and a round
//! keeps at most [`MAX_RANGES`] separate frame ranges, so a guest scattering tiny hints cannot
//! make the host allocate without bound.

use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};

use super::CMD_ID_STOP;
use crate::devices::virtio::ranges::RangeSet;
use crate::kvm::PAGE_SIZE;
use crate::kvm::memory::GuestMemory;

/// Most separate frame ranges one round keeps (about 16 MiB of host memory at worst); hints
/// that would add more are dropped. Linux hints 4 MiB blocks, so this covers 1 TiB of
/// scattered free memory.
pub const MAX_RANGES: usize = 1 << 18;

/// Guest frames `[first, first + count)` (frame = guest physical address / 4096).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameRange {
    /// First guest frame.
    pub first: u64,
    /// Number of frames.
    pub count: u64,
}

/// What a round did not count, and why.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DroppedHints {
    /// Buffers that arrived outside an open round, before the round's command id or after its
    /// stop, or tagged with another command id.
    pub stale_buffers: u64,
    /// Bytes of hinted buffers outside guest RAM.
    pub outside_ram_bytes: u64,
    /// Bytes of hinted buffers inside guest RAM but in pages the buffer does not cover whole.
    pub partial_page_bytes: u64,
    /// Pages dropped because the round already held [`MAX_RANGES`] ranges.
    pub over_limit_pages: u64,
}

/// The state of the current (or last) hinting round, for the host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HintStatus {
    /// The round's command id (0 before the first round).
    pub cmd_id: u32,
    /// Whether the round is open: started by the host and not finished yet.
    pub open: bool,
    /// Whether the guest has answered with the round's command id.
    pub started: bool,
    /// Whether the guest has sent the stop id after it: every hint of the round is in.
    pub complete: bool,
    /// The hinted frames, coalesced and in order, all inside guest RAM.
    pub ranges: Vec<FrameRange>,
    /// The number of hinted frames.
    pub pages: u64,
    /// What was not counted.
    pub dropped: DroppedHints,
}

/// The device's record of the round.
#[derive(Clone, Debug, Default)]
pub(super) struct HintRound {
    id: u32,
    open: bool,
    started: bool,
    complete: bool,
    /// The command id the guest tags its buffers with now: the last one it sent, until it
    /// sends the stop id.
    tag: Option<u32>,
    frames: RangeSet,
    dropped: DroppedHints,
}

impl HintRound {
    /// Opens round `id`. The guest's tag carries over: a guest still reporting an older round
    /// keeps being ignored until it starts this one.
    pub(super) fn open(&mut self, id: u32) {
        *self = Self {
            id,
            open: true,
            tag: self.tag,
            ..Self::default()
        };
    }

    /// Closes the round and frees its record.
    pub(super) fn close(&mut self) {
        self.open = false;
        self.frames = RangeSet::default();
    }

    /// The round's command id.
    pub(super) fn id(&self) -> u32 {
        self.id
    }

    /// Whether the round is open and the guest has sent all of it.
    pub(super) fn is_complete(&self) -> bool {
        self.open && self.complete
    }

    /// The guest sent command id `id` on the free-page queue.
    pub(super) fn command(&mut self, id: u32) {
        if id == CMD_ID_STOP {
            if self.open && self.started && self.tag == Some(self.id) {
                self.complete = true;
            }
            self.tag = None;
        } else {
            self.tag = Some(id);
            if self.open && id == self.id && !self.complete {
                self.started = true;
            }
        }
    }

    /// The guest hinted `len` bytes at guest physical `addr` as free.
    pub(super) fn hint(&mut self, mem: &GuestMemory, addr: u64, len: u32) {
        if !self.open || self.complete || self.tag != Some(self.id) {
            self.dropped.stale_buffers = self.dropped.stale_buffers.saturating_add(1);
            return;
        }
        let end = addr.saturating_add(u64::from(len));
        let mut inside = 0u64;
        for region in mem.iter() {
            let start = region.start_addr().0;
            let (s, e) = (addr.max(start), end.min(start.saturating_add(region.len())));
            if s >= e {
                continue;
            }
            inside += e - s;
            let (first, last) = (s.div_ceil(PAGE_SIZE), e / PAGE_SIZE);
            let whole = last.saturating_sub(first);
            let d = &mut self.dropped;
            d.partial_page_bytes = d
                .partial_page_bytes
                .saturating_add((e - s) - whole * PAGE_SIZE);
            if whole == 0 {
                continue;
            }
            if self.frames.len() >= MAX_RANGES {
                d.over_limit_pages = d.over_limit_pages.saturating_add(whole);
                continue;
            }
            self.frames.insert(first, last);
        }
        let d = &mut self.dropped;
        d.outside_ram_bytes = d
            .outside_ram_bytes
            .saturating_add(u64::from(len) - inside.min(u64::from(len)));
    }

    /// The round for the host.
    pub(super) fn status(&self) -> HintStatus {
        HintStatus {
            cmd_id: self.id,
            open: self.open,
            started: self.started,
            complete: self.complete,
            ranges: self
                .frames
                .iter()
                .map(|(first, end)| FrameRange {
                    first,
                    count: end - first,
                })
                .collect(),
            pages: self.frames.total(),
            dropped: self.dropped,
        }
    }
}
