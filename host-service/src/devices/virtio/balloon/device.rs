//! The virtio-balloon device: its configuration space, its serialisable state, its queues, and
//! the host-side hinting API on its transport ([`MmioTransport<Balloon>`]).
//!
//! Configuration space (`struct virtio_balloon_config`, little endian): `num_pages` at 0 (always
//! 0: ditto never asks for memory), `actual` at 4 (the only field the guest may write),
//! `free_page_hint_cmd_id` at 8 (written by the host only) and `poison_val` at 12 (0; page
//! poisoning is not offered, so the guest's writes are ignored).
//!
//! On the free-page queue a device-readable descriptor of at least four bytes carries a command
//! id (le32) and a device-writable descriptor is a hinted free block; the device writes nothing
//! into either and returns every chain at once, since Linux drops a block instead of hinting it
//! when the queue has no room.

use serde::{Deserialize, Serialize};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::hinting::{HintRound, HintStatus};
use super::{
    CMD_ID_DONE, CMD_ID_FIRST, CMD_ID_STOP, DEFLATE_QUEUE, FREE_PAGE_QUEUE, INFLATE_QUEUE,
    QUEUE_SIZE, VIRTIO_BALLOON_F_FREE_PAGE_HINT, VIRTIO_ID_BALLOON,
};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::{VIRTIO_F_VERSION_1, VirtioDevice, read_config_space};
use crate::kvm::memory::GuestMemory;

/// The features the device offers.
const FEATURES: u64 = VIRTIO_F_VERSION_1 | 1 << VIRTIO_BALLOON_F_FREE_PAGE_HINT;
/// Bytes of configuration space.
const CONFIG_BYTES: usize = 16;
/// Where `actual` lies in configuration space.
const ACTUAL: std::ops::Range<usize> = 4..8;

/// Why a balloon cannot be restored.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BalloonError {
    /// The state acknowledges features the device does not offer.
    #[error("balloon state acknowledges features {0:#x} the device does not offer")]
    Features(u64),
}

/// The device's serialisable state (the hints of an open round are not part of it: a restored
/// balloon tells the guest [`CMD_ID_DONE`], see [`MmioTransport::<Balloon>::resume_after_restore`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    /// Features the driver acknowledged (0 before activation).
    pub acked_features: u64,
    /// The `actual` field the guest wrote.
    pub actual: u32,
    /// The command id configuration space shows.
    pub cmd_id: u32,
    /// The command id of the last round the host started (0: none yet).
    pub last_round: u32,
}

/// A virtio-balloon device that only gathers free-page hints.
#[derive(Debug)]
pub struct Balloon {
    acked_features: u64,
    actual: u32,
    cmd_id: u32,
    last_round: u32,
    round: HintRound,
    inflated: u64,
    deflated: u64,
    queue_sizes: [u16; 3],
}

impl Default for Balloon {
    fn default() -> Self {
        Self::new()
    }
}

impl Balloon {
    /// A fresh balloon: no round yet, command id [`CMD_ID_STOP`].
    pub fn new() -> Self {
        Self {
            acked_features: 0,
            actual: 0,
            cmd_id: CMD_ID_STOP,
            last_round: 0,
            round: HintRound::default(),
            inflated: 0,
            deflated: 0,
            queue_sizes: [QUEUE_SIZE; 3],
        }
    }

    /// A balloon from captured state, with no round open.
    pub fn restore(state: &BalloonState) -> Result<Self, BalloonError> {
        if state.acked_features & !FEATURES != 0 {
            return Err(BalloonError::Features(state.acked_features));
        }
        Ok(Self {
            acked_features: state.acked_features,
            actual: state.actual,
            cmd_id: state.cmd_id,
            last_round: state.last_round,
            ..Self::new()
        })
    }

    /// Captures the device state.
    pub fn state(&self) -> BalloonState {
        BalloonState {
            acked_features: self.acked_features,
            actual: self.actual,
            cmd_id: self.cmd_id,
            last_round: self.last_round,
        }
    }

    /// Whether the driver acknowledged free-page hinting.
    pub fn hints_acked(&self) -> bool {
        self.acked_features & 1 << VIRTIO_BALLOON_F_FREE_PAGE_HINT != 0
    }

    /// The command id configuration space shows.
    pub fn cmd_id(&self) -> u32 {
        self.cmd_id
    }

    /// The `actual` field the guest wrote (balloon pages it says it gave).
    pub fn actual(&self) -> u32 {
        self.actual
    }

    /// PFNs the guest put on the inflate and deflate queues so far (accepted, not acted on).
    pub fn ballooned_pfns(&self) -> (u64, u64) {
        (self.inflated, self.deflated)
    }

    /// The current (or last) round.
    pub fn hint_status(&self) -> HintStatus {
        self.round.status()
    }

    /// Whether round `cmd_id` is open and the guest has sent all of it.
    pub fn hinting_complete(&self, cmd_id: u32) -> bool {
        self.round.id() == cmd_id && self.round.is_complete()
    }

    /// Opens a new round under a command id the guest has not seen (ids run from
    /// [`CMD_ID_FIRST`] and wrap back to it) and shows it in configuration space.
    fn open_round(&mut self) -> u32 {
        let id = match self.last_round.wrapping_add(1) {
            n if n < CMD_ID_FIRST => CMD_ID_FIRST,
            n => n,
        };
        self.last_round = id;
        self.cmd_id = id;
        self.round.open(id);
        id
    }

    /// Closes the round and shows [`CMD_ID_DONE`].
    fn close_round(&mut self) {
        self.round.close();
        self.cmd_id = CMD_ID_DONE;
    }

    fn free_page_descriptor(&mut self, mem: &GuestMemory, desc: &Descriptor) {
        if desc.is_write_only() {
            self.round.hint(mem, desc.addr().0, desc.len());
        } else if desc.len() >= 4
            && let Ok(id) = mem.read_obj::<u32>(GuestAddress(desc.addr().0))
        {
            self.round.command(u32::from_le(id));
        }
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn avail_features(&self) -> u64 {
        FEATURES
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut space = [0u8; CONFIG_BYTES];
        space[ACTUAL].copy_from_slice(&self.actual.to_le_bytes());
        space[8..12].copy_from_slice(&self.cmd_id.to_le_bytes());
        read_config_space(&space, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual`, and only within it; everything else is the host's.
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        let Some(end) = start.checked_add(data.len()) else {
            return;
        };
        if data.is_empty() || start < ACTUAL.start || end > ACTUAL.end {
            return;
        }
        let mut actual = self.actual.to_le_bytes();
        actual[start - ACTUAL.start..end - ACTUAL.start].copy_from_slice(data);
        self.actual = u32::from_le_bytes(actual);
    }

    fn activate(&mut self, acked_features: u64) {
        self.acked_features = acked_features;
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemory) -> bool {
        if index > FREE_PAGE_QUEUE || !queue.is_valid(mem) {
            return false;
        }
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            for desc in chain {
                match index {
                    FREE_PAGE_QUEUE => self.free_page_descriptor(mem, &desc),
                    // Arrays of le32 PFNs: counted, nothing is discarded on the host.
                    INFLATE_QUEUE | DEFLATE_QUEUE if !desc.is_write_only() => {
                        let count = if index == INFLATE_QUEUE {
                            &mut self.inflated
                        } else {
                            &mut self.deflated
                        };
                        *count = count.saturating_add(u64::from(desc.len() / 4));
                    }
                    _ => {}
                }
            }
            if queue.add_used(mem, head, 0).is_err() {
                break;
            }
            used = true;
        }
        used && queue.needs_notification(mem).unwrap_or(true)
    }

    fn reset(&mut self) {
        // The driver is gone (and gave its blocks back); a new one starts from "stop". The
        // round counter carries on so command ids never repeat.
        self.acked_features = 0;
        self.actual = 0;
        self.cmd_id = CMD_ID_STOP;
        self.round = HintRound::default();
    }
}

/// The host-side hinting API: the device's configuration changes need the transport's
/// configuration interrupt, so the API lives on the transport.
impl MmioTransport<Balloon> {
    /// Whether the guest's driver is running and acknowledged free-page hinting: without it a
    /// round would never be answered.
    pub fn hinting_available(&self) -> bool {
        self.is_active() && self.device().hints_acked()
    }

    /// Starts a hinting round: a new command id (at least [`CMD_ID_FIRST`]) in configuration
    /// space and the configuration interrupt. Hints of any earlier round are discarded.
    /// Returns the round's command id.
    pub fn start_hinting(&mut self) -> u32 {
        let id = self.device_mut().open_round();
        self.config_changed();
        id
    }

    /// The current (or last) round: its command id, whether the guest has sent its stop id,
    /// and the hinted frames (coalesced, in order, inside guest RAM).
    pub fn hinting(&self) -> HintStatus {
        self.device().hint_status()
    }

    /// Whether round `cmd_id` is still open and the guest has sent all of it (cheap, for
    /// polling).
    pub fn hinting_complete(&self, cmd_id: u32) -> bool {
        self.device().hinting_complete(cmd_id)
    }

    /// Ends the round: [`CMD_ID_DONE`] in configuration space and the configuration
    /// interrupt, so the guest takes its hinted blocks back. The round's hints are discarded;
    /// read them with [`Self::hinting`] first.
    pub fn finish_hinting(&mut self) {
        self.device_mut().close_round();
        self.config_changed();
    }

    /// After a restore: a guest captured during a round still holds its hinted blocks and
    /// waits for [`CMD_ID_DONE`]; send it. Call once the vCPUs exist with their restored
    /// interrupt state, so the interrupt reaches the guest.
    pub fn resume_after_restore(&mut self) {
        if self.is_active() && self.device().cmd_id() >= CMD_ID_FIRST {
            self.finish_hinting();
        }
    }
}
