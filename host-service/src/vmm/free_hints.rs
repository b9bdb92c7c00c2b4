//! Free-page hints for the checkpoint flow: [`Vmm::hint_free_pages`] asks the guest's balloon
//! driver which frames are free and waits for its answer, [`Vmm::end_free_hinting`] lets the
//! guest have those frames back.
//!
//! The hints are only as good as the guest: Linux keeps each hinted block allocated until
//! [`Vmm::end_free_hinting`], but gives blocks back early under memory pressure, and a hostile
//! guest can hint anything inside its RAM. A checkpoint may therefore treat a hinted frame as
//! free only if dirty tracking, armed before the round started, shows it unwritten; then the
//! worst a lie can do is zero that guest's own memory. Every range returned lies inside guest
//! RAM (the device checks each hint against it).

use std::sync::PoisonError;
use std::time::{Duration, Instant};

use super::{RunState, Vmm};
use crate::devices::virtio::balloon::hinting::DroppedHints;
use crate::devices::virtio::balloon::{CMD_ID_FIRST, FrameRange};

/// How often the round is checked while waiting for the guest.
const POLL: Duration = Duration::from_millis(2);

/// Why free-page hints cannot be asked for.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FreeHintsError {
    /// The guest must be running to answer.
    #[error("free-page hints need a running guest; the VM is {0:?}")]
    NotRunning(RunState),
}

/// The answer to one hinting round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FreeHints {
    /// The round's command id.
    pub cmd_id: u32,
    /// Whether the guest sent the whole round (its stop id) before the timeout. An incomplete
    /// round's ranges are still hints the guest made, only fewer than it could have.
    pub complete: bool,
    /// The hinted frames, coalesced, in order, every one inside guest RAM.
    pub ranges: Vec<FrameRange>,
    /// The number of hinted frames.
    pub pages: u64,
    /// What the device did not count (stale, outside RAM, partial pages, over its bound).
    pub dropped: DroppedHints,
    /// From asking to the answer (or the timeout).
    pub elapsed: Duration,
}

impl Vmm {
    /// Runs a free-page hinting round: sends the guest a new command id, then waits until it
    /// has sent every free block of that round or `timeout` passed, and returns the hinted
    /// frames. `Ok(None)` when the VM has no balloon or the guest's driver has not
    /// acknowledged free-page hinting (not loaded yet, or too old). The guest keeps the hinted
    /// blocks allocated until [`Vmm::end_free_hinting`], which the caller must call when it is
    /// done with them (after the checkpoint has captured memory), complete round or not.
    pub fn hint_free_pages(&self, timeout: Duration) -> Result<Option<FreeHints>, FreeHintsError> {
        if self.state != RunState::Running {
            return Err(FreeHintsError::NotRunning(self.state));
        }
        let Some(balloon) = &self.devices.balloon else {
            return Ok(None);
        };
        let lock = || balloon.lock().unwrap_or_else(PoisonError::into_inner);
        let started = Instant::now();
        let cmd_id = {
            let mut t = lock();
            if !t.hinting_available() {
                return Ok(None);
            }
            t.start_hinting()
        };
        loop {
            {
                let t = lock();
                // Done, or the round is gone (the driver reset the device).
                if t.hinting_complete(cmd_id) || t.device().cmd_id() != cmd_id {
                    break;
                }
            }
            let left = timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(POLL.min(left));
        }
        let status = lock().hinting();
        let elapsed = started.elapsed();
        if status.cmd_id != cmd_id || !status.open {
            return Ok(Some(FreeHints {
                cmd_id,
                complete: false,
                ranges: Vec::new(),
                pages: 0,
                dropped: DroppedHints::default(),
                elapsed,
            }));
        }
        Ok(Some(FreeHints {
            cmd_id,
            complete: status.complete,
            ranges: status.ranges,
            pages: status.pages,
            dropped: status.dropped,
            elapsed,
        }))
    }

    /// Ends the hinting round [`Vmm::hint_free_pages`] started: tells the guest it may use the
    /// hinted blocks again. Does nothing without a balloon or an open round; works whether the
    /// VM runs or is paused (the guest acts on it when it runs).
    pub fn end_free_hinting(&self) {
        if let Some(balloon) = &self.devices.balloon {
            let mut t = balloon.lock().unwrap_or_else(PoisonError::into_inner);
            if t.device().cmd_id() >= CMD_ID_FIRST {
                t.finish_hinting();
            }
        }
    }
}
