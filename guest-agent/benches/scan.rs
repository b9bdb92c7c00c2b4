//! Scan benchmark (prints numbers, asserts nothing about speed): an ext4 filesystem on a loop
//! device with about 10 000 files and 1 GiB of data, all in the page cache, scanned once for one
//! folder of 1 000 files and once for all of them. Prints files/s, GiB of resident cache
//! classified per second, CPU seconds and peak RSS of each scan, so that memory can be seen to
//! stay flat as the file count grows. Needs root. Run with `cargo bench -p ditto-agent`.

#![allow(clippy::unwrap_used)] // a benchmark: a failure is a failure

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use ditto_agent::scan::{self, Method, ScanEvent, ScanOptions};

const FOLDERS: usize = 10;
const FILES_PER_FOLDER: usize = 1000;

fn cpu_seconds() -> f64 {
    // SAFETY: an all-zero rusage is valid; getrusage fills it for this process.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

fn peak_rss_kib() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn reset_peak_rss() {
    // Writing 5 to clear_refs resets the peak resident set size (VmHWM).
    let _ = fs::write("/proc/self/clear_refs", "5");
}

fn bench(label: &str, path: &Path) {
    reset_peak_rss();
    let cpu = cpu_seconds();
    let started = Instant::now();
    let mut extents = 0u64;
    let summary = scan::scan(
        &ScanOptions {
            paths: vec![path.to_owned()],
            method: Some(Method::Walk),
            time_budget: None,
            include_loop_devices: true,
            after_mincore: None,
            kpageblock_path: None,
        },
        |event| {
            if let ScanEvent::Extents(batch) = event {
                extents += batch.len() as u64;
            }
            Ok::<(), ()>(())
        },
    )
    .unwrap();
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu;
    let resident_gib = summary.pages_resident as f64 * 4096.0 / (1u64 << 30) as f64;
    println!(
        "{label}: {} files, {:.3} GiB resident, {} pages reported in {extents} extents; \
         {:.2} s wall, {:.0} files/s, {:.2} GiB/s classified, {:.2} CPU s, peak RSS {} MiB",
        summary.files_visited,
        resident_gib,
        summary.pages_reported,
        wall,
        summary.files_visited as f64 / wall,
        resident_gib / wall,
        cpu,
        peak_rss_kib() / 1024
    );
}

fn main() {
    let fs = common::LoopFs::new(1536, 4096);
    let mut written = 0u64;
    let buf: Vec<u8> = (0..200 * 1024).map(|i| (i * 7 + 13) as u8).collect();
    let mut state = 0x1234_5678_u64;
    for folder in 0..FOLDERS {
        let dir = fs.mnt.join(format!("d{folder}"));
        fs::create_dir(&dir).unwrap();
        for file in 0..FILES_PER_FOLDER {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // 4 KiB to 200 KiB, about 102 KiB on average: about 1 GiB in all.
            let len = 4096 + (state % (196 * 1024)) as usize;
            fs::File::create(dir.join(format!("f{file}")))
                .unwrap()
                .write_all(&buf[..len])
                .unwrap();
            written += len as u64;
        }
    }
    std::process::Command::new("sync").status().unwrap();
    println!(
        "wrote {} files, {:.2} GiB, on {} (ext4, 4 KiB blocks); all of it is in the page cache",
        FOLDERS * FILES_PER_FOLDER,
        written as f64 / (1u64 << 30) as f64,
        fs.device.display()
    );
    bench("1 folder", &fs.mnt.join("d0"));
    bench("all folders", &fs.mnt);
}
