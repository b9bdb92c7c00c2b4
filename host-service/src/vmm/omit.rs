//! The part of a `ditto` or `free-only` checkpoint that decides what to leave out (see
//! [`crate::omission`]): arm the write tracking while the guest runs, ask the guest agent for
//! its page-cache report and the balloon for free pages, and, once the VM is paused, gather
//! what was written since and decide page by page. Every failure here is noted in the
//! [`OmissionReport`] and only means more pages are saved.

use std::fs::File;
use std::time::{Duration, Instant};

use super::Vmm;
use super::snapshot::CheckpointOptions;
use crate::checkpoint::PageExtent;
use crate::kvm::PAGE_SIZE;
use crate::kvm::memory::MemoryLayout;
use crate::omission::decide::{self, Drive, Facts, FreeRange};
use crate::omission::report::{self, AgentReport};
use crate::omission::verify::MemoryAndDrives;
use crate::omission::{OmissionReport, Verification, micros};

/// How long the agent's scan and the free-page round may take when the caller does not say.
pub const DEFAULT_SCAN_TIMEOUT: Duration = Duration::from_secs(60);

/// What the guest claimed before the pause.
#[derive(Debug, Default)]
pub struct Claims {
    /// The agent's page-cache report, when one came and was well formed.
    pub agent: Option<AgentReport>,
    /// The balloon's free-page hints.
    pub free: Vec<FreeRange>,
}

impl Vmm {
    /// Arms the write tracking of guest memory (KVM's log and the VMM's bitmap) and of the
    /// drives. False (noted in `report`) when it cannot be armed: nothing may be omitted then.
    pub(super) fn arm_tracking(&mut self, report: &mut OmissionReport) -> bool {
        if let Err(e) = self.vm.enable_dirty_logging() {
            report.degrade(format!("write tracking cannot be armed: {e}"));
            return false;
        }
        for block in &self.devices.blocks {
            lock(block).device_mut().take_written_sectors();
        }
        true
    }

    /// Turns the memory write tracking off again (it costs the guest a fault per first write).
    pub(super) fn disarm_tracking(&mut self) {
        if self.vm.dirty_logging()
            && let Err(e) = self.vm.disable_dirty_logging()
        {
            tracing::warn!(error = %e, "cannot turn dirty logging off after a checkpoint");
        }
    }

    /// Asks the running guest what the checkpoint's mode needs, within its scan timeout in
    /// all.
    pub(super) fn ask_guest(
        &self,
        options: &CheckpointOptions,
        report: &mut OmissionReport,
    ) -> Claims {
        let (mode, timeout) = (options.mode, options.scan_timeout);
        let deadline = Instant::now() + timeout;
        let mut claims = Claims::default();
        if mode.omits_cache() {
            let started = Instant::now();
            claims.agent = self.agent_report(options.agent_port, timeout, report);
            report.scan_us = micros(started.elapsed());
        }
        if mode.omits_free() {
            let started = Instant::now();
            let left = deadline.saturating_duration_since(Instant::now());
            claims.free = self.free_hints(left, report);
            report.hint_us = micros(started.elapsed());
        }
        claims
    }

    fn agent_report(
        &self,
        port: u32,
        timeout: Duration,
        report: &mut OmissionReport,
    ) -> Option<AgentReport> {
        let Some(vsock) = &self.config.vsock else {
            report.degrade(report::ReportError::NoVsock.to_string());
            return None;
        };
        let guest_pages = MemoryLayout::of(self.vm.memory()).total_bytes() / PAGE_SIZE;
        match report::fetch(&vsock.uds, port, guest_pages, timeout) {
            Ok(agent) => {
                report.guest_frames = agent.summary.guest_frames.clone().into_iter().collect();
                if agent.summary.budget_exhausted {
                    report.degrade(
                        "the agent's scan ran out of time before it had walked every file; \
                         the pages it did not reach are saved",
                    );
                }
                Some(agent)
            }
            Err(e) => {
                report.degrade(format!("{e}; the page cache is saved"));
                None
            }
        }
    }

    fn free_hints(&self, _timeout: Duration, report: &mut OmissionReport) -> Vec<FreeRange> {
        report.degrade("the VM has no balloon device; free pages are saved");
        Vec::new()
    }

    /// Lets the guest's balloon driver give back the blocks it holds for a free-page round.
    pub(super) fn end_free_hinting(&self) {}

    /// With the VM paused: gathers what was written since [`arm_tracking`](Self::arm_tracking)
    /// and decides which claimed pages to omit (see [`decide::decide`]).
    pub(super) fn decide_omissions(
        &mut self,
        claims: &Claims,
        policy: Verification,
        report: &mut OmissionReport,
    ) -> Vec<PageExtent> {
        let written = match self.vm.fetch_and_clear_written() {
            Ok(w) => w,
            Err(e) => {
                report.degrade(format!(
                    "the dirty log cannot be read: {e}; every page is saved"
                ));
                return Vec::new();
            }
        };
        let mut drives = Vec::with_capacity(self.devices.blocks.len());
        let mut disk_written = Vec::with_capacity(self.devices.blocks.len());
        for block in &self.devices.blocks {
            let mut t = lock(block);
            let device = t.device_mut();
            drives.push(Drive {
                id: device.config().id.clone(),
                size: device.nsectors() * 512,
            });
            disk_written.push(device.take_written_sectors());
        }
        // The drives as they are now (the VM is paused, so they hold what it wrote).
        let files: Vec<File> = if policy == Verification::DirtyLog {
            Vec::new()
        } else {
            self.config
                .drives
                .iter()
                .filter_map(|d| match File::open(&d.path) {
                    Ok(f) => Some(f),
                    Err(e) => {
                        tracing::warn!(drive = %d.id, error = %e, "cannot open for verification");
                        None
                    }
                })
                .collect()
        };
        let files = if files.len() == self.config.drives.len() {
            files
        } else {
            // A missing file makes every comparison on it fail, which distrusts the report.
            Vec::new()
        };
        let layout = MemoryLayout::of(self.vm.memory());
        let facts = Facts {
            layout: &layout,
            drives: &drives,
            written: &written,
            disk_written: &disk_written,
        };
        let mut source = MemoryAndDrives::new(self.vm.memory(), &files);
        decide::decide(
            &facts,
            claims.agent.as_ref(),
            &claims.free,
            policy,
            &mut source,
            report,
        )
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
