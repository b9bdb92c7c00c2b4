//! The scanner on real ext4 filesystems on loop devices (as root): what it reports is exactly
//! where the bytes are, and what it must not report it does not.

mod common;

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::process::Command;

use common::{LoopFs, frames_of, recache, scan_paths, verify_file, write_tagged};
use ditto_agent::frames::PAGE_SIZE;

#[test]
fn read_files_are_reported_where_their_bytes_are() {
    let fs = LoopFs::new(64, 4096);
    let mut files = Vec::new();
    for (tag, pages) in [(1u32, 1u64), (2, 37), (3, 600)] {
        let path = fs.mnt.join(format!("file-{tag}"));
        write_tagged(&path, tag, pages * PAGE_SIZE, true);
        recache(&path);
        files.push((path, pages));
    }
    let report = scan_paths(&[&fs.mnt]);
    for (path, pages) in &files {
        let verified = verify_file(&report, &fs, path);
        assert_eq!(
            verified,
            (0..*pages).collect::<Vec<_>>(),
            "every page of {} must be reported",
            path.display()
        );
    }
    assert!(
        report.extents.len() < 638,
        "runs were coalesced: {}",
        report.extents.len()
    );
    assert_eq!(report.summary.files_visited, 3);
}

#[test]
fn one_kib_block_ext4_works() {
    let fs = LoopFs::new(32, 1024);
    let path = fs.mnt.join("data");
    write_tagged(&path, 9, 200 * PAGE_SIZE, true);
    recache(&path);
    let report = scan_paths(&[&fs.mnt]);
    let verified = verify_file(&report, &fs, &path);
    assert_eq!(verified, (0..200).collect::<Vec<_>>());
    assert!(
        report
            .pages()
            .iter()
            .all(|(_, _, offset)| offset % 512 == 0),
        "offsets are 512-byte aligned"
    );
}

#[test]
fn dirty_pages_are_excluded_until_fsync() {
    let fs = LoopFs::new(32, 4096);
    let path = fs.mnt.join("unsynced");
    let file = write_tagged(&path, 4, 16 * PAGE_SIZE, false);
    let frames = frames_of(&path);
    assert_eq!(frames.len(), 16, "the written pages are in the cache");
    let report = scan_paths(&[&fs.mnt]);
    let leaked: Vec<_> = report
        .pages()
        .into_iter()
        .filter(|(pfn, _, _)| frames.contains_key(pfn))
        .collect();
    assert!(leaked.is_empty(), "dirty pages were reported: {leaked:?}");
    assert!(
        report
            .summary
            .pages_excluded
            .get("dirty")
            .copied()
            .unwrap_or(0)
            >= 16
    );

    file.sync_all().unwrap();
    common::drain_lru_batches();
    let report = scan_paths(&[&fs.mnt]);
    assert_eq!(
        verify_file(&report, &fs, &path),
        (0..16).collect::<Vec<_>>(),
        "{:?}",
        report.summary
    );
}

#[test]
fn a_partial_last_page_is_never_reported() {
    let fs = LoopFs::new(32, 4096);
    let path = fs.mnt.join("ragged");
    write_tagged(&path, 5, 3 * PAGE_SIZE + 100, true);
    recache(&path);
    let report = scan_paths(&[&fs.mnt]);
    assert_eq!(verify_file(&report, &fs, &path), vec![0, 1, 2]);
    assert!(
        report
            .summary
            .pages_excluded
            .get("partial last page")
            .copied()
            .unwrap_or(0)
            >= 1
    );
}

#[test]
fn unwritten_extents_and_holes_are_not_reported() {
    let fs = LoopFs::new(32, 4096);
    // fallocate makes unwritten extents; reading them caches zero pages the disk does not hold.
    let falloc = fs.mnt.join("fallocated");
    let file = File::create(&falloc).unwrap();
    // SAFETY: a valid fd; fallocate only allocates blocks.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, 64 * PAGE_SIZE as i64) };
    assert_eq!(rc, 0);
    file.sync_all().unwrap();
    recache(&falloc);

    // A sparse file: pages 0 and 10 written, 1..=9 holes.
    let sparse = fs.mnt.join("sparse");
    let file = File::create(&sparse).unwrap();
    file.write_all_at(&common::page_bytes(6, 0), 0).unwrap();
    file.write_all_at(&common::page_bytes(6, 10), 10 * PAGE_SIZE)
        .unwrap();
    file.sync_all().unwrap();
    recache(&sparse);

    let report = scan_paths(&[&fs.mnt]);
    assert!(
        verify_file(&report, &fs, &falloc).is_empty(),
        "unwritten extents reported"
    );
    assert_eq!(
        verify_file(&report, &fs, &sparse),
        vec![0, 10],
        "{:?}",
        report.summary
    );
    let excluded = &report.summary.pages_excluded;
    assert!(
        excluded.get("unwritten extent").copied().unwrap_or(0) >= 64,
        "{excluded:?}"
    );
    assert!(
        excluded.get("hole").copied().unwrap_or(0) >= 9,
        "{excluded:?}"
    );
}

#[test]
fn tmpfs_files_are_not_reported() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    let path = dir.path().join("in-memory");
    write_tagged(&path, 7, 8 * PAGE_SIZE, true);
    let report = scan_paths(&[dir.path()]);
    let _ = Command::new("umount").arg(dir.path()).status();
    assert!(report.extents.is_empty());
    assert_eq!(report.summary.files_visited, 0);
    assert_eq!(
        report
            .summary
            .filesystems_skipped
            .get("path not on an eligible filesystem"),
        Some(&1)
    );
}

#[test]
fn special_files_are_skipped_and_counted() {
    let fs = LoopFs::new(32, 4096);
    let m = &fs.mnt;
    write_tagged(&m.join("regular"), 8, 2 * PAGE_SIZE, true);
    std::os::unix::fs::symlink("loop-b", m.join("loop-a")).unwrap();
    std::os::unix::fs::symlink("loop-a", m.join("loop-b")).unwrap();
    fs::create_dir(m.join("dir")).unwrap();
    std::os::unix::fs::symlink("..", m.join("dir/up")).unwrap();
    let fifo =
        std::ffi::CString::new(m.join("fifo").into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let null =
        std::ffi::CString::new(m.join("null").into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; makes a character device node (1:3).
    let rc = unsafe { libc::mknod(null.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) };
    assert_eq!(rc, 0);
    let _socket = std::os::unix::net::UnixListener::bind(m.join("socket")).unwrap();

    let report = scan_paths(&[m]);
    let skipped = &report.summary.files_skipped;
    assert_eq!(skipped.get("symlink"), Some(&3), "{skipped:?}");
    assert_eq!(skipped.get("fifo"), Some(&1), "{skipped:?}");
    assert_eq!(skipped.get("device node"), Some(&1), "{skipped:?}");
    assert_eq!(skipped.get("socket"), Some(&1), "{skipped:?}");
    assert_eq!(report.summary.files_visited, 1);
}

#[test]
fn files_unlinked_during_the_scan_are_skipped_cleanly() {
    let fs = LoopFs::new(64, 4096);
    let count = 3000;
    for i in 0..count {
        write_tagged(&fs.mnt.join(format!("f{i}")), 100 + i, PAGE_SIZE, false);
    }
    Command::new("sync").status().unwrap();
    let mnt = fs.mnt.clone();
    let deleter = std::thread::spawn(move || {
        for i in (0..count).rev() {
            let _ = fs::remove_file(mnt.join(format!("f{i}")));
        }
    });
    let report = scan_paths(&[&fs.mnt]);
    deleter.join().unwrap();
    let vanished = report
        .summary
        .files_skipped
        .get("vanished")
        .copied()
        .unwrap_or(0);
    assert!(report.summary.files_visited + vanished <= u64::from(count));
    println!(
        "visited {}, vanished {vanished}, reported {} pages",
        report.summary.files_visited, report.summary.pages_reported
    );
}

#[test]
fn files_that_shrink_or_grow_during_the_scan_are_never_fatal() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let fs = LoopFs::new(64, 4096);
    let count = 300u32;
    let paths: Vec<_> = (0..count)
        .map(|i| fs.mnt.join(format!("churn-{i}")))
        .collect();
    for (i, path) in paths.iter().enumerate() {
        write_tagged(path, 500 + i as u32, 8 * PAGE_SIZE, true);
        recache(path);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let churner = {
        let (stop, rounds, paths) = (stop.clone(), rounds.clone(), paths.clone());
        std::thread::spawn(move || {
            // Page-aligned sizes: pages 0..3 keep their bytes, pages 3..8 come and go as holes.
            while !stop.load(Ordering::Relaxed) {
                for path in &paths {
                    let file = fs::OpenOptions::new().write(true).open(path).unwrap();
                    file.set_len(3 * PAGE_SIZE).unwrap();
                    file.set_len(8 * PAGE_SIZE).unwrap();
                }
                rounds.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    while rounds.load(Ordering::Relaxed) == 0 {
        std::thread::yield_now();
    }
    let report = scan_paths(&[&fs.mnt]);
    stop.store(true, Ordering::Relaxed);
    churner.join().unwrap();
    Command::new("sync").status().unwrap();
    assert_eq!(report.summary.files_visited, u64::from(count));
    // Whatever was reported of a page still in the file is where its bytes are.
    for path in &paths {
        let verified = verify_file(&report, &fs, path);
        assert!(verified.iter().all(|p| *p < 3), "{verified:?}");
    }
    println!("{:?}", report.summary);
}

/// Drops the clean cached pages of files named `evicted`: run between `mincore` and the touch,
/// it makes the touch read them back from the disk.
fn evict_if_named_evicted(path: &std::path::Path) {
    if path.file_name().is_some_and(|n| n == "evicted") {
        let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // SAFETY: a valid open fd; fadvise only drops clean cached pages.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0);
    }
}

#[test]
fn pages_evicted_between_mincore_and_the_touch_are_counted_not_reported() {
    let fs = LoopFs::new(32, 4096);
    let evicted = fs.mnt.join("evicted");
    let kept = fs.mnt.join("kept");
    for (tag, path) in [(20, &evicted), (21, &kept)] {
        write_tagged(path, tag, 64 * PAGE_SIZE, true);
        recache(path);
    }
    let report = common::scan_paths_with_hook(&[&fs.mnt], Some(evict_if_named_evicted));
    assert!(
        verify_file(&report, &fs, &evicted).is_empty(),
        "{:?}",
        report.summary
    );
    assert_eq!(
        verify_file(&report, &fs, &kept),
        (0..64).collect::<Vec<_>>(),
        "{:?}",
        report.summary
    );
    assert!(report.summary.pages_refaulted > 0, "{:?}", report.summary);
    assert_eq!(
        report.summary.pages_excluded.get("read back during scan"),
        Some(&64),
        "{:?}",
        report.summary
    );
}
