//! The kernel fast path without the patched kernel: the method choice on a kernel without
//! /proc/kpageblock, and a whole scan over a file in kpageblock's format that describes real
//! page-cache frames of an ext4 filesystem on a loop device (so the real kpageflags cross-check,
//! disk table and disk bytes are exercised).

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{LoopFs, Report, frames_of, recache, verify_file, write_tagged};
use ditto_agent::frames::PAGE_SIZE;
use ditto_agent::kpageblock::{KPAGEBLOCK, KPB_BDEV, KPB_MAPPED, RECORD_BYTES, Record};
use ditto_agent::scan::{self, Method, ScanError, ScanEvent, ScanOptions};

fn patched_kernel() -> bool {
    Path::new(KPAGEBLOCK).exists()
}

fn run(options: &ScanOptions) -> Result<Report, ScanError<()>> {
    let mut disks = Vec::new();
    let mut extents = Vec::new();
    let summary = scan::scan(options, |event| {
        match event {
            ScanEvent::Disks(d) => disks = d,
            ScanEvent::Extents(batch) => extents.extend(batch),
        }
        Ok(())
    })?;
    Ok(Report {
        disks,
        extents,
        summary,
    })
}

fn options(method: Option<Method>, paths: Vec<PathBuf>) -> ScanOptions {
    ScanOptions {
        paths,
        method,
        include_loop_devices: true,
        ..ScanOptions::default()
    }
}

#[test]
fn forcing_kpageblock_on_a_stock_kernel_is_a_clear_error() {
    common::require_root();
    if patched_kernel() {
        return; // this kernel has the fast path; the box tests cover it
    }
    let err = run(&options(Some(Method::Kpageblock), Vec::new()))
        .err()
        .unwrap();
    assert!(matches!(err, ScanError::Kpageblock(_)), "{err}");
    let message = err.to_string();
    assert!(message.contains("/proc/kpageblock"), "{message}");
    assert!(message.contains("--method walk"), "{message}");
}

#[test]
fn kpageblock_cannot_be_limited_to_paths() {
    let err = run(&options(Some(Method::Kpageblock), vec!["/".into()]))
        .err()
        .unwrap();
    assert!(matches!(err, ScanError::PathsNeedWalk), "{err}");
}

#[test]
fn auto_falls_back_to_the_walk_and_says_so() {
    common::require_root();
    let mut whole = options(None, Vec::new());
    whole.time_budget = Some(Duration::from_millis(200));
    let report = run(&whole).unwrap();
    let expected = if patched_kernel() {
        Method::Kpageblock
    } else {
        Method::Walk
    };
    assert_eq!(report.summary.method, expected);

    // With paths, only the walk can honour them.
    let fs = LoopFs::new(32, 4096);
    let report = run(&options(None, vec![fs.mnt.clone()])).unwrap();
    assert_eq!(report.summary.method, Method::Walk);
}

/// Writes `records` (frame → record) as a sparse file in kpageblock's format.
fn fake_kpageblock(path: &Path, records: &HashMap<u64, Record>) {
    let file = File::create(path).unwrap();
    let frames = records.keys().max().map_or(0, |last| last + 1);
    file.set_len(frames * RECORD_BYTES as u64).unwrap();
    for (pfn, record) in records {
        file.write_all_at(&record.to_bytes(), pfn * RECORD_BYTES as u64)
            .unwrap();
    }
}

#[test]
fn a_kpageblock_file_of_real_frames_reports_what_the_walk_reports() {
    let fs = LoopFs::new(32, 4096);
    let clean = fs.mnt.join("clean");
    write_tagged(&clean, 31, 40 * PAGE_SIZE, true);
    recache(&clean);
    let walk = common::scan_paths(&[&fs.mnt]);
    let disk = walk.disk_index(&fs.device).unwrap();
    let clean_frames = frames_of(&clean);
    let walked: Vec<_> = walk
        .pages()
        .into_iter()
        .filter(|(pfn, d, _)| *d == disk && clean_frames.contains_key(pfn))
        .collect();
    assert_eq!(
        walked.len(),
        40,
        "the walk reports the file: {:?}",
        walk.summary
    );

    let dev = u32::try_from(std::fs::metadata(&fs.device).unwrap().rdev()).unwrap();
    let mut records: HashMap<u64, Record> = walked
        .iter()
        .map(|&(pfn, _, offset)| {
            let record = Record {
                dev,
                flags: KPB_MAPPED,
                offset,
            };
            (pfn, record)
        })
        .collect();
    // Pages the kernel would never list, but which a stale record could name: dirty ones.
    let dirty = fs.mnt.join("dirty");
    let _dirty_file = write_tagged(&dirty, 32, 8 * PAGE_SIZE, false);
    let dirty_frames = frames_of(&dirty);
    assert_eq!(dirty_frames.len(), 8);
    for (&pfn, &page) in &dirty_frames {
        let record = Record {
            dev,
            flags: KPB_MAPPED | KPB_BDEV,
            offset: (1 << 20) + page * PAGE_SIZE,
        };
        records.insert(pfn, record);
    }
    // A record on a device that is no disk of the scan, and one not marked valid.
    let last = records.keys().max().copied().unwrap();
    records.insert(
        last + 1,
        Record {
            dev: u32::try_from(libc::makedev(1, 3)).unwrap(), // /dev/null's numbers
            flags: KPB_MAPPED,
            offset: 0,
        },
    );
    records.insert(
        last + 2,
        Record {
            dev,
            flags: KPB_BDEV,
            offset: 0,
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("kpageblock");
    fake_kpageblock(&fake, &records);

    let mut fast = options(Some(Method::Kpageblock), Vec::new());
    fast.kpageblock_path = Some(fake);
    let report = run(&fast).unwrap();
    assert_eq!(report.summary.method, Method::Kpageblock);
    assert_eq!(report.summary.files_visited, 0);
    assert_eq!(report.summary.pages_resident, 40 + 8 + 1);
    let excluded = |reason: &str| report.summary.pages_excluded.get(reason).copied();
    assert_eq!(excluded("dirty"), Some(8), "{:?}", report.summary);
    assert_eq!(excluded("not on an eligible disk"), Some(1));
    assert_eq!(report.summary.pages_reported, 40, "{:?}", report.summary);
    assert_eq!(
        verify_file(&report, &fs, &clean),
        (0..40).collect::<Vec<_>>(),
        "every page is where the disk holds its bytes"
    );
    assert!(
        report.extents.len() <= walk.extents.len(),
        "runs coalesce as the walk's do: {:?}",
        report.extents
    );
}
