//! The page-by-page decision of a `ditto` or `free-only` checkpoint, taken while the VM is
//! paused: which reported page-cache pages become drive references, which hinted free pages
//! become free, and why every other claim is refused (see the module documentation of
//! [`super`]). Nothing here trusts the guest: every claim is checked against the VMM's own
//! facts, and a refused claim only means the page is saved.

use crate::checkpoint::{DriveInfo, PageClass, PageExtent};
use crate::devices::virtio::block::SectorRange;
use crate::kvm::PAGE_SIZE;
use crate::kvm::dirty::WrittenPages;
use crate::kvm::memory::MemoryLayout;

use super::report::{AgentReport, ClaimedExtent};
use super::verify::{PageSource, Sampler};
use super::{OmissionReport, Verification};

const SECTOR: u64 = 512;
const SECTORS_PER_PAGE: u64 = PAGE_SIZE / SECTOR;

/// What the VMM knows for sure, gathered at the pause.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    /// Guest RAM.
    pub layout: &'a MemoryLayout,
    /// Guest memory written since tracking was armed.
    pub written: &'a WrittenPages,
    /// Per drive (in the checkpoint's drive-table order): the sectors written since then,
    /// sorted and coalesced.
    pub disk_written: &'a [Vec<SectorRange>],
}

/// Guest frames `first..first + pages` claimed free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FreeRange {
    /// First guest frame.
    pub first: u64,
    /// Number of frames.
    pub pages: u64,
}

/// A run of reported pages that passed validation: guest frames `gfn..gfn + pages` claimed to
/// hold the bytes of drive `drive` from byte `offset` on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheRun {
    /// First guest frame.
    pub gfn: u64,
    /// Number of pages.
    pub pages: u64,
    /// Index of the drive in the checkpoint's drive table.
    pub drive: usize,
    /// Byte offset of the first page on the drive.
    pub offset: u64,
}

/// What comparing the candidates with the disk found, while the guest still ran. A page that
/// differed only counts against the report if nothing wrote it or its block since tracking
/// was armed (a page the guest was changing may differ for that reason alone; it is saved
/// anyway).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Comparison {
    /// The policy compares nothing.
    #[default]
    NotAsked,
    /// The frames whose bytes differed from the disk, sorted.
    Done(Vec<u64>),
    /// A comparison could not be made: the report is distrusted.
    Failed(String),
}

/// While the guest runs: the reported extents that pass validation (see the module
/// documentation), as sorted runs that never overlap. Refusals are counted in `report`.
pub fn validate_report(
    layout: &MemoryLayout,
    drives: &[DriveInfo],
    agent: &AgentReport,
    report: &mut OmissionReport,
) -> Vec<CacheRun> {
    report.pages_reported_cache = agent.extents.iter().map(|e| e.pages).sum();
    let mut valid: Vec<(ClaimedExtent, usize)> = Vec::with_capacity(agent.extents.len());
    let mut first_problem = None;
    for e in &agent.extents {
        match validate(layout, drives, agent, e) {
            Ok(drive) => valid.push((*e, drive)),
            Err(why) => {
                report.rejected_validation += e.pages;
                first_problem.get_or_insert(why);
            }
        }
    }
    // Frames claimed by two extents: at most one claim is right, so neither is used.
    valid.sort_by_key(|(e, _)| e.pfn);
    let mut overlapping = vec![false; valid.len()];
    let mut reach: Option<(usize, u64)> = None;
    for (i, (e, _)) in valid.iter().enumerate() {
        if let Some((j, end)) = reach
            && e.pfn < end
        {
            overlapping[i] = true;
            overlapping[j] = true;
        }
        let end = e.pfn + e.pages;
        if reach.is_none_or(|(_, r)| end > r) {
            reach = Some((i, end));
        }
    }
    let overlaps = overlapping.iter().filter(|&&o| o).count();
    if overlaps > 0 {
        first_problem.get_or_insert(format!("{overlaps} extents claim frames another claims"));
    }
    let mut runs = Vec::with_capacity(valid.len());
    for ((e, drive), overlaps) in valid.iter().zip(overlapping) {
        if overlaps {
            report.rejected_validation += e.pages;
        } else {
            runs.push(CacheRun {
                gfn: e.pfn,
                pages: e.pages,
                drive: *drive,
                offset: e.offset,
            });
        }
    }
    if let Some(why) = first_problem {
        report.degrade(format!(
            "{} reported pages failed validation (first: {why})",
            report.rejected_validation
        ));
    }
    runs
}

/// While the guest runs: compares the candidates' bytes with the disk as `policy` says
/// (every page, a random share, or none). `report` counts the pages compared.
pub fn compare(
    runs: &[CacheRun],
    policy: Verification,
    source: &mut dyn PageSource,
    report: &mut OmissionReport,
) -> Comparison {
    let sampler = match policy {
        Verification::DirtyLog => return Comparison::NotAsked,
        Verification::Full => None,
        Verification::Sample(percent) => Some(Sampler::random(percent)),
    };
    let mut differing = Vec::new();
    let mut index = 0u64;
    for r in runs {
        let pages: Vec<u64> = match sampler {
            None => (0..r.pages).collect(),
            Some(s) => (0..r.pages).filter(|i| s.chooses(index + i)).collect(),
        };
        index += r.pages;
        for i in pages {
            report.pages_verified += 1;
            match source.mismatches(r.gfn + i, r.drive, r.offset + i * PAGE_SIZE, 1) {
                Ok(0) => {}
                Ok(_) => differing.push(r.gfn + i),
                Err(e) => {
                    return Comparison::Failed(format!(
                        "verification could not read drive {} at byte {}: {e}",
                        r.drive,
                        r.offset + i * PAGE_SIZE
                    ));
                }
            }
        }
    }
    differing.sort_unstable();
    Comparison::Done(differing)
}

/// At the pause: decides every claimed page (see the module documentation). `runs` are the
/// validated candidates, `comparison` what comparing them found, `free` the balloon's hints.
/// Counts go into `report`; the result lists the omitted runs for the checkpoint writer,
/// sorted, never overlapping.
pub fn decide(
    facts: &Facts<'_>,
    runs: &[CacheRun],
    comparison: &Comparison,
    free: &[FreeRange],
    policy: Verification,
    report: &mut OmissionReport,
) -> Vec<PageExtent> {
    let free_runs = free_pages(facts, free, report);
    let mut cache_runs = cache_pages(facts, runs, &free_runs, report);
    if !cache_runs.is_empty() && !trusted(&cache_runs, comparison, policy, report) {
        report.rejected_verification += cache_runs.iter().map(|r| r.pages).sum::<u64>();
        cache_runs.clear();
    }
    report.pages_omitted_free = free_runs.iter().map(|r| r.1 - r.0).sum();
    report.pages_omitted_cache = cache_runs.iter().map(|r| r.pages).sum();

    let mut out: Vec<PageExtent> = free_runs
        .iter()
        .map(|&(first, end)| PageExtent {
            first_frame: first,
            pages: end - first,
            class: PageClass::Free,
        })
        .chain(cache_runs.iter().map(|r| PageExtent {
            first_frame: r.gfn,
            pages: r.pages,
            class: PageClass::Disk {
                drive: r.drive as u32,
                offset: r.offset,
            },
        }))
        .collect();
    out.sort_by_key(|e| e.first_frame);
    out
}

/// Whether one region of guest RAM holds all of frames `gfn..gfn + pages`.
fn ram_holds(layout: &MemoryLayout, gfn: u64, pages: u64) -> bool {
    let Some(end) = gfn.checked_add(pages) else {
        return false;
    };
    layout.regions.iter().any(|r| {
        let first = r.guest_addr / PAGE_SIZE;
        gfn >= first && end <= first + r.size / PAGE_SIZE
    })
}

/// Why frame `gfn` may not be omitted because of a memory write, if it may not.
fn written_by(facts: &Facts<'_>, gfn: u64) -> Option<Writer> {
    if facts.written.guest.is_frame_dirty(gfn) {
        Some(Writer::Guest)
    } else if facts.written.devices.is_frame_dirty(gfn) {
        Some(Writer::Vmm)
    } else {
        None
    }
}

enum Writer {
    Guest,
    Vmm,
}

fn count_write(report: &mut OmissionReport, writer: Writer) {
    match writer {
        Writer::Guest => report.rejected_guest_write += 1,
        Writer::Vmm => report.rejected_vmm_write += 1,
    }
}

/// The hinted pages inside RAM that nothing wrote, as sorted, disjoint `(first, end)` runs.
fn free_pages(
    facts: &Facts<'_>,
    free: &[FreeRange],
    report: &mut OmissionReport,
) -> Vec<(u64, u64)> {
    let mut hinted: Vec<(u64, u64)> = free
        .iter()
        .filter(|r| r.pages > 0 && ram_holds(facts.layout, r.first, r.pages))
        .map(|r| (r.first, r.first + r.pages))
        .collect();
    hinted.sort_unstable();
    // A frame hinted twice counts once.
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(hinted.len());
    for (first, end) in hinted {
        match merged.last_mut() {
            Some(last) if first <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((first, end)),
        }
    }
    report.pages_hinted_free = merged.iter().map(|r| r.1 - r.0).sum();
    let mut runs = Vec::new();
    for (first, end) in merged {
        let mut start = None;
        for gfn in first..end {
            match written_by(facts, gfn) {
                Some(w) => {
                    count_write(report, w);
                    if let Some(s) = start.take() {
                        runs.push((s, gfn));
                    }
                }
                None => {
                    start.get_or_insert(gfn);
                }
            }
        }
        if let Some(s) = start {
            runs.push((s, end));
        }
    }
    runs
}

fn in_runs(runs: &[(u64, u64)], gfn: u64) -> bool {
    let i = runs.partition_point(|r| r.1 <= gfn);
    runs.get(i).is_some_and(|r| r.0 <= gfn)
}

/// Whether any of sectors `first..end` was written.
fn disk_written(ranges: &[SectorRange], first: u64, end: u64) -> bool {
    let i = ranges.partition_point(|r| r.start + r.count <= first);
    ranges.get(i).is_some_and(|r| r.start < end)
}

/// Validation of one claimed extent: the drive it names, or why it is refused.
fn validate(
    layout: &MemoryLayout,
    drives: &[DriveInfo],
    agent: &AgentReport,
    e: &ClaimedExtent,
) -> Result<usize, String> {
    if e.pages == 0 {
        return Err("an extent of no pages".into());
    }
    if !ram_holds(layout, e.pfn, e.pages) {
        return Err(format!("frames {:#x}+{} are not guest RAM", e.pfn, e.pages));
    }
    let id = agent
        .disks
        .get(e.disk as usize)
        .ok_or_else(|| format!("disk index {} is not in the disk table", e.disk))?;
    let drive = drives
        .iter()
        .position(|d| d.id == *id)
        .ok_or_else(|| format!("disk {id:?} is not a drive of this VM"))?;
    if !e.offset.is_multiple_of(SECTOR) {
        return Err(format!("offset {} is not sector-aligned", e.offset));
    }
    let end = e
        .pages
        .checked_mul(PAGE_SIZE)
        .and_then(|len| e.offset.checked_add(len));
    if end.is_none_or(|end| end > drives[drive].size) {
        return Err(format!(
            "{} pages at byte {} run past the end of drive {id:?}",
            e.pages, e.offset
        ));
    }
    Ok(drive)
}

/// The candidate pages that pass the write checks and are not free, as runs.
fn cache_pages(
    facts: &Facts<'_>,
    candidates: &[CacheRun],
    free: &[(u64, u64)],
    report: &mut OmissionReport,
) -> Vec<CacheRun> {
    let mut runs = Vec::new();
    for c in candidates {
        let no_writes = Vec::new();
        let written = facts.disk_written.get(c.drive).unwrap_or(&no_writes);
        let mut run: Option<CacheRun> = None;
        for i in 0..c.pages {
            let gfn = c.gfn + i;
            let offset = c.offset + i * PAGE_SIZE;
            let refused = if in_runs(free, gfn) {
                // Stored as free already: neither omitted as cache nor refused.
                true
            } else if let Some(w) = written_by(facts, gfn) {
                count_write(report, w);
                true
            } else if disk_written(written, offset / SECTOR, offset / SECTOR + SECTORS_PER_PAGE) {
                report.rejected_disk_write += 1;
                true
            } else {
                false
            };
            if refused {
                runs.extend(run.take());
            } else if let Some(r) = &mut run {
                r.pages += 1;
            } else {
                run = Some(CacheRun {
                    gfn,
                    pages: 1,
                    drive: c.drive,
                    offset,
                });
            }
        }
        runs.extend(run);
    }
    runs
}

/// Applies the comparison to the pages left after the write checks; false when the report
/// is to be distrusted.
fn trusted(
    runs: &[CacheRun],
    comparison: &Comparison,
    policy: Verification,
    report: &mut OmissionReport,
) -> bool {
    let differing = match comparison {
        Comparison::NotAsked => return true,
        Comparison::Failed(why) => {
            report.degrade(format!(
                "{why}; the agent's report was distrusted and every page it named saved"
            ));
            return false;
        }
        Comparison::Done(differing) => differing,
    };
    report.pages_mismatched = differing
        .iter()
        .filter(|&&gfn| {
            let i = runs.partition_point(|r| r.gfn + r.pages <= gfn);
            runs.get(i).is_some_and(|r| r.gfn <= gfn)
        })
        .count() as u64;
    if report.pages_mismatched > 0 {
        report.degrade(format!(
            "verification ({policy}) found {} of {} compared pages differing from the disk; the \
             agent's report was distrusted and every page it named saved",
            report.pages_mismatched, report.pages_verified
        ));
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;
    use crate::kvm::dirty::{DirtyBitmap, RegionDirty};

    const RAM_PAGES: u64 = 1024;

    struct Env {
        layout: MemoryLayout,
        drives: Vec<DriveInfo>,
        written: WrittenPages,
        disk_written: Vec<Vec<SectorRange>>,
    }

    impl Env {
        fn new() -> Self {
            let clean = DirtyBitmap {
                regions: vec![RegionDirty::clean(0, RAM_PAGES)],
            };
            Self {
                layout: MemoryLayout::single(RAM_PAGES * PAGE_SIZE),
                drives: vec![
                    DriveInfo {
                        id: "root".into(),
                        size: 1 << 20,
                    },
                    DriveInfo {
                        id: "data".into(),
                        size: 64 * PAGE_SIZE,
                    },
                ],
                written: WrittenPages {
                    guest: clean.clone(),
                    devices: clean,
                },
                disk_written: vec![Vec::new(), Vec::new()],
            }
        }

        fn facts(&self) -> Facts<'_> {
            Facts {
                layout: &self.layout,
                written: &self.written,
                disk_written: &self.disk_written,
            }
        }
    }

    /// The three steps of a checkpoint: validation and comparison while the guest runs, the
    /// decision at the pause.
    fn run(
        env: &Env,
        agent: Option<&AgentReport>,
        free: &[FreeRange],
        policy: Verification,
        source: &mut dyn PageSource,
        report: &mut OmissionReport,
    ) -> Vec<PageExtent> {
        let runs = agent.map_or_else(Vec::new, |a| {
            validate_report(&env.layout, &env.drives, a, report)
        });
        let comparison = compare(&runs, policy, source, report);
        decide(&env.facts(), &runs, &comparison, free, policy, report)
    }

    fn mark(bitmap: &mut DirtyBitmap, gfn: u64) {
        let mut bits = vec![0u64; (RAM_PAGES / 64) as usize];
        bits[(gfn / 64) as usize] = 1 << (gfn % 64);
        bitmap.regions[0].union_with(&bits);
    }

    fn agent(extents: &[(u64, u64, u32, u64)]) -> AgentReport {
        AgentReport {
            disks: vec!["data".into(), "root".into(), "stranger".into()],
            extents: extents
                .iter()
                .map(|&(pfn, pages, disk, offset)| ClaimedExtent {
                    pfn,
                    pages,
                    disk,
                    offset,
                })
                .collect(),
            summary: Default::default(),
        }
    }

    /// Pages equal the disk except the frames listed.
    struct Differing(Vec<u64>, u64);

    impl PageSource for Differing {
        fn mismatches(&mut self, gfn: u64, _: usize, _: u64, pages: u64) -> io::Result<u64> {
            self.1 += pages;
            Ok(self
                .0
                .iter()
                .filter(|&&g| g >= gfn && g < gfn + pages)
                .count() as u64)
        }
    }

    struct Unreadable;

    impl PageSource for Unreadable {
        fn mismatches(&mut self, _: u64, _: usize, _: u64, _: u64) -> io::Result<u64> {
            Err(io::Error::other("gone"))
        }
    }

    fn disk(first_frame: u64, pages: u64, drive: u32, offset: u64) -> PageExtent {
        PageExtent {
            first_frame,
            pages,
            class: PageClass::Disk { drive, offset },
        }
    }

    #[test]
    fn clean_reported_pages_become_drive_references() {
        let env = Env::new();
        let mut report = OmissionReport::default();
        let out = run(
            &env,
            Some(&agent(&[(10, 4, 1, 8192), (100, 2, 0, 0)])),
            &[],
            Verification::DirtyLog,
            &mut Differing(vec![], 0),
            &mut report,
        );
        // Disk table index 1 is "root", drive 0 of the VM; index 0 is "data", drive 1.
        assert_eq!(out, vec![disk(10, 4, 0, 8192), disk(100, 2, 1, 0)]);
        assert_eq!(report.pages_reported_cache, 6);
        assert_eq!(report.pages_omitted_cache, 6);
        assert!(report.degraded.is_empty());
    }

    #[test]
    fn every_invalid_extent_is_refused_and_counted() {
        let env = Env::new();
        let mut report = OmissionReport::default();
        let out = run(
            &env,
            Some(&agent(&[
                (RAM_PAGES - 1, 2, 1, 0),   // past guest RAM
                (u64::MAX, 2, 1, 0),        // overflowing frames
                (20, 1, 2, 0),              // a disk the VM does not have
                (21, 1, 7, 0),              // not in the disk table
                (22, 1, 1, 100),            // unaligned
                (23, 2, 0, 63 * PAGE_SIZE), // past the end of "data"
                (24, 1, 1, u64::MAX - 10),  // overflowing offset
                (25, 0, 1, 0),              // no pages
                (30, 1, 1, 0),              // fine
            ])),
            &[],
            Verification::DirtyLog,
            &mut Differing(vec![], 0),
            &mut report,
        );
        assert_eq!(out, vec![disk(30, 1, 0, 0)]);
        assert_eq!(report.rejected_validation, 2 + 2 + 1 + 1 + 1 + 2 + 1);
        assert_eq!(report.degraded.len(), 1);
        assert!(
            report.degraded[0].contains("not guest RAM"),
            "{:?}",
            report.degraded
        );
    }

    #[test]
    fn frames_claimed_twice_are_never_omitted() {
        let env = Env::new();
        let mut report = OmissionReport::default();
        let out = run(
            &env,
            Some(&agent(&[
                (10, 10, 1, 0),
                (15, 1, 1, 1 << 16),
                (40, 2, 1, 0),
                (50, 1, 1, 0),
            ])),
            &[],
            Verification::DirtyLog,
            &mut Differing(vec![], 0),
            &mut report,
        );
        // The same disk block behind two frames is fine; one frame with two blocks is not.
        assert_eq!(out, vec![disk(40, 2, 0, 0), disk(50, 1, 0, 0)]);
        assert_eq!(report.rejected_validation, 11);
    }

    #[test]
    fn written_pages_and_blocks_are_saved_by_reason() {
        let mut env = Env::new();
        mark(&mut env.written.guest, 11);
        mark(&mut env.written.devices, 13);
        // Sector 8 is the first sector of the drive's second page.
        env.disk_written[0] = vec![SectorRange {
            start: 15,
            count: 2,
        }];
        let mut report = OmissionReport::default();
        let out = run(
            &env,
            Some(&agent(&[(10, 6, 1, 0)])),
            &[],
            Verification::DirtyLog,
            &mut Differing(vec![], 0),
            &mut report,
        );
        // Frame 10 is block 0 (clean); 11 guest-written; 12 is sectors 16..24: written at 16;
        // 13 VMM-written; 14 and 15 clean. Frame 11's block (sectors 8..16) has sector 15.
        assert_eq!(out, vec![disk(10, 1, 0, 0), disk(14, 2, 0, 4 * PAGE_SIZE)]);
        assert_eq!(report.rejected_guest_write, 1);
        assert_eq!(report.rejected_vmm_write, 1);
        assert_eq!(report.rejected_disk_write, 1);
        assert_eq!(report.pages_omitted_cache, 3);
    }

    #[test]
    fn hinted_free_pages_that_stay_unwritten_are_free() {
        let mut env = Env::new();
        mark(&mut env.written.guest, 101);
        let mut report = OmissionReport::default();
        let out = run(
            &env,
            Some(&agent(&[(104, 4, 1, 0)])),
            &[
                FreeRange {
                    first: 100,
                    pages: 6,
                },
                FreeRange {
                    first: 102,
                    pages: 2,
                }, // hinted twice
                FreeRange {
                    first: RAM_PAGES,
                    pages: 5,
                }, // outside RAM
            ],
            Verification::DirtyLog,
            &mut Differing(vec![], 0),
            &mut report,
        );
        let free = |first_frame, pages| PageExtent {
            first_frame,
            pages,
            class: PageClass::Free,
        };
        // 104 and 105 are free, so only 106 and 107 are cache.
        assert_eq!(
            out,
            vec![free(100, 1), free(102, 4), disk(106, 2, 0, 2 * PAGE_SIZE)]
        );
        assert_eq!(report.pages_hinted_free, 6);
        assert_eq!(report.pages_omitted_free, 5);
        assert_eq!(report.rejected_guest_write, 1);
        assert_eq!(report.pages_omitted_cache, 2);
    }

    #[test]
    fn a_page_that_differed_because_it_was_written_does_not_distrust_the_report() {
        let mut env = Env::new();
        mark(&mut env.written.guest, 12);
        let mut report = OmissionReport::default();
        let out = run(
            &env,
            Some(&agent(&[(10, 4, 1, 0)])),
            &[],
            Verification::Full,
            &mut Differing(vec![12], 0),
            &mut report,
        );
        assert_eq!(out, vec![disk(10, 2, 0, 0), disk(13, 1, 0, 3 * PAGE_SIZE)]);
        assert_eq!((report.pages_verified, report.pages_mismatched), (4, 0));
        assert!(report.degraded.is_empty());
    }

    #[test]
    fn one_mismatch_distrusts_the_whole_report() {
        let env = Env::new();
        let report_of = |policy, source: &mut dyn PageSource| {
            let mut report = OmissionReport::default();
            let out = run(
                &env,
                Some(&agent(&[(10, 100, 1, 0), (300, 100, 1, 1 << 19)])),
                &[FreeRange {
                    first: 500,
                    pages: 10,
                }],
                policy,
                source,
                &mut report,
            );
            (out, report)
        };
        let (out, report) = report_of(Verification::Full, &mut Differing(vec![350], 0));
        assert_eq!(out.len(), 1, "only the free run is left: {out:?}");
        assert_eq!(report.rejected_verification, 200);
        assert_eq!((report.pages_verified, report.pages_mismatched), (200, 1));
        assert!(report.degraded[0].contains("distrusted"));

        let mut all_equal = Differing(vec![], 0);
        let (out, report) = report_of(Verification::Sample(10), &mut all_equal);
        assert_eq!(out.len(), 3);
        assert!(
            (1..100).contains(&all_equal.1),
            "about 20 of 200 compared: {}",
            all_equal.1
        );
        assert_eq!(report.pages_verified, all_equal.1);

        let (out, report) = report_of(Verification::Sample(100), &mut Differing(vec![10], 0));
        assert_eq!(out.len(), 1);
        assert_eq!(report.pages_mismatched, 1);

        let (out, report) = report_of(Verification::Full, &mut Unreadable);
        assert_eq!(out.len(), 1);
        assert!(report.degraded[0].contains("could not read"));

        let (out, report) = report_of(Verification::DirtyLog, &mut Unreadable);
        assert_eq!(out.len(), 3);
        assert_eq!(report.pages_verified, 0);
    }
}
