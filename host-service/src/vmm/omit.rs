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
use crate::checkpoint::PageHashes;
use crate::kvm::PAGE_SIZE;
use crate::kvm::memory::MemoryLayout;
use crate::omission::decide::{self, CacheRun, Comparison, Facts, FreeRange};
use crate::omission::report::{self, AgentReport};
use crate::omission::verify::{MemoryAndDrives, page_hashes};
use crate::omission::{OmissionReport, Verification, micros};

/// How long the agent's scan and the free-page round may take when the caller does not say.
pub const DEFAULT_SCAN_TIMEOUT: Duration = Duration::from_secs(60);

/// The part of the scan timeout kept for the balloon's free-page round when the mode omits free
/// pages: a tenth of it, at most this much. The agent gets the rest, so an agent that stalls
/// costs the page cache but not the free pages (a round takes well under a second).
pub const HINT_RESERVE_MAX: Duration = Duration::from_secs(2);

/// What the guest claimed before the pause, and what the VMM made of it while the guest ran.
#[derive(Debug, Default)]
pub struct Claims {
    /// The agent's reported extents that passed validation.
    pub cache: Vec<CacheRun>,
    /// What comparing them with the disk found.
    pub comparison: Comparison,
    /// Their pages' SHA-256, taken while the guest ran (used for those still unwritten at the
    /// pause).
    pub hashes: PageHashes,
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
    /// all: the agent first, then the balloon, with a share of the time kept for the balloon
    /// ([`HINT_RESERVE_MAX`]).
    pub(super) fn ask_guest(
        &self,
        options: &CheckpointOptions,
        report: &mut OmissionReport,
    ) -> Claims {
        let (mode, timeout) = (options.mode, options.scan_timeout);
        let deadline = Instant::now() + timeout;
        let reserve = if mode.omits_free() {
            (timeout / 10).min(HINT_RESERVE_MAX)
        } else {
            Duration::ZERO
        };
        let mut claims = Claims::default();
        if mode.omits_cache() {
            let started = Instant::now();
            let agent_time = timeout.saturating_sub(reserve);
            if let Some(agent) = self.agent_report(options.agent_port, agent_time, report) {
                report.scan_us = micros(started.elapsed());
                self.examine(&agent, options.verification, &mut claims, report);
            } else {
                report.scan_us = micros(started.elapsed());
            }
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
                report.scan_method = scan_method(&agent.summary.method).to_owned();
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

    /// One free-page round of the balloon within `timeout` ([`Vmm::hint_free_pages`]); the
    /// guest holds the hinted blocks until [`Vmm::end_free_hinting`].
    fn free_hints(&self, timeout: Duration, report: &mut OmissionReport) -> Vec<FreeRange> {
        let hints = match self.hint_free_pages(timeout) {
            Ok(Some(hints)) => hints,
            Ok(None) if self.devices.balloon.is_none() => {
                report.degrade("the VM has no balloon device; free pages are saved");
                return Vec::new();
            }
            Ok(None) => {
                report.degrade(
                    "the guest's balloon driver does not take free-page hints (not loaded); \
                     free pages are saved",
                );
                return Vec::new();
            }
            Err(e) => {
                report.degrade(format!("{e}; free pages are saved"));
                return Vec::new();
            }
        };
        if !hints.complete {
            report.degrade(format!(
                "the guest's balloon driver did not finish its free-page round within \
                 {timeout:?}; only the {} pages it hinted so far may be free",
                hints.pages
            ));
        }
        hints
            .ranges
            .iter()
            .map(|r| FreeRange {
                first: r.first,
                pages: r.count,
            })
            .collect()
    }

    /// While the guest runs: validates the agent's extents, compares them with the drives as
    /// `policy` says, and hashes their pages, so the pause has only the write checks left.
    fn examine(
        &self,
        agent: &AgentReport,
        policy: Verification,
        claims: &mut Claims,
        report: &mut OmissionReport,
    ) {
        let t = Instant::now();
        let layout = MemoryLayout::of(self.vm.memory());
        claims.cache = decide::validate_report(&layout, &self.drive_table(), agent, report);
        let files = if policy == Verification::DirtyLog {
            Vec::new()
        } else {
            self.drive_files()
        };
        let mut source = MemoryAndDrives::new(self.vm.memory(), &files);
        claims.comparison = decide::compare(&claims.cache, policy, &mut source, report);
        let compared = t.elapsed();
        claims.hashes = page_hashes(self.vm.memory(), &claims.cache, hash_threads());
        tracing::debug!(?compared, hashed = ?t.elapsed() - compared, pages = claims.hashes.len(),
            "reported pages examined while the guest runs");
    }

    /// Each drive image opened for reading; empty when one cannot be opened (every comparison
    /// then fails, which distrusts the report).
    fn drive_files(&self) -> Vec<File> {
        let files: Vec<File> = self
            .config
            .drives
            .iter()
            .filter_map(|d| match File::open(&d.path) {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::warn!(drive = %d.id, error = %e, "cannot open for verification");
                    None
                }
            })
            .collect();
        if files.len() == self.config.drives.len() {
            files
        } else {
            Vec::new()
        }
    }

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
        let disk_written: Vec<_> = self
            .devices
            .blocks
            .iter()
            .map(|b| lock(b).device_mut().take_written_sectors())
            .collect();
        let layout = MemoryLayout::of(self.vm.memory());
        let facts = Facts {
            layout: &layout,
            written: &written,
            disk_written: &disk_written,
        };
        decide::decide(
            &facts,
            &claims.cache,
            &claims.comparison,
            &claims.free,
            policy,
            report,
        )
    }
}

/// Threads that hash reported pages: one per host CPU, at most 4 (the guest runs meanwhile).
fn hash_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The scan method an agent named in its summary, as the report keeps it: the guest is not
/// trusted, so only the two names the agent knows are kept verbatim.
fn scan_method(said: &str) -> &'static str {
    match said {
        "walk" => "walk",
        "kpageblock" => "kpageblock",
        "" => "",
        _ => "other",
    }
}

#[cfg(test)]
mod scan_method_tests {
    use super::scan_method;

    #[test]
    fn only_known_methods_are_kept() {
        assert_eq!(scan_method("walk"), "walk");
        assert_eq!(scan_method("kpageblock"), "kpageblock");
        assert_eq!(scan_method(""), "");
        assert_eq!(scan_method(&"x".repeat(10_000)), "other");
    }
}
