//! Benchmark of the checkpoint file (`ditto_host::checkpoint`): what the write options cost and
//! buy. It fills guest memory with a seeded, realistic mix (40 % incompressible pages, 30 %
//! log-like text, 30 % zero pages, in runs of 1 to 32 pages), writes one checkpoint per variant
//! (raw, zstd 1, zstd 3; 1 and 2 compression threads; 64, 256 and 1024 pages per chunk) into a
//! folder under Cargo's target directory (real disk, not tmpfs), then restores each into fresh
//! memory with 1 and 2 threads and asserts the restored memory equals the original.
//!
//! Every write includes the file's fsync and rename (the whole of `create` .. `finish`). Before
//! each restore the file is dropped from the page cache (`POSIX_FADV_DONTNEED`), so restores
//! read from the disk. Each time is the best of `DITTO_BENCH_REPS` runs (default 2); ratios are
//! to the raw, 1-thread, 256-page baseline (its write, and its 1-thread restore).
//!
//! A second part measures restoring disk-referenced pages: the same memory is written as a
//! checkpoint in which every page references a drive image (runs of 1 to 32 pages at shuffled
//! places on the drive), and `fill_disk_refs_parallel` fills it on 1 and on N threads (N = the
//! host's CPUs, at least 2), from a cold and from a warm page cache; it prints the N-thread time
//! as a ratio to the 1-thread time.
//!
//! `cargo bench -p ditto-host --bench checkpoint_file [-- MIB]`, or `DITTO_BENCH_MIB=MIB`: the
//! guest memory size in MiB (default 512: about a minute and a half on two cores).
//! `DITTO_BENCH_ONLY=disk-refs` runs only the second part.

use std::fmt::Write as _;
use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use ditto_host::checkpoint::{
    CheckpointReader, CheckpointWriter, DriveFiles, DriveInfo, PageClass, PageExtent, WriteOptions,
    WriteStats, fill_disk_refs_parallel,
};
use ditto_host::kvm::memory::{GuestMemory, MemoryLayout};
use vm_memory::{Bytes as _, GuestAddress};

const PAGE: usize = 4096;
const MIB: u64 = 1 << 20;
const DEFAULT_MIB: u64 = 512;
const DEFAULT_REPS: u32 = 2;
const SEED: u64 = 0xd177_0c4e_c4ec_4b01;
/// Longest run of pages of one kind in the generated memory.
const MAX_RUN: u64 = 32;
/// Bytes compared at once when checking a restore.
const COMPARE_BLOCK: usize = 1 << 20;
/// The baseline every ratio is taken to.
const BASELINE: Variant = Variant {
    compression: None,
    threads: 1,
    chunk_pages: 256,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Variant {
    compression: Option<i32>,
    threads: usize,
    chunk_pages: u32,
}

impl Variant {
    fn all() -> Vec<Variant> {
        let mut all = Vec::new();
        for compression in [None, Some(1), Some(3)] {
            for threads in [1, 2] {
                for chunk_pages in [64, 256, 1024] {
                    all.push(Variant {
                        compression,
                        threads,
                        chunk_pages,
                    });
                }
            }
        }
        all
    }

    fn codec(&self) -> String {
        self.compression
            .map_or_else(|| "raw".to_owned(), |level| format!("zstd {level}"))
    }

    fn options(&self) -> WriteOptions {
        WriteOptions {
            compression: self.compression,
            threads: self.threads,
            chunk_pages: self.chunk_pages,
        }
    }
}

/// What one variant measured.
struct Measured {
    variant: Variant,
    stats: WriteStats,
    write: Duration,
    /// Restore with 1 and with 2 threads.
    restore: [Duration; 2],
}

impl Measured {
    /// The best time of each of two runs of the same variant.
    fn best(self, other: Measured) -> Measured {
        Measured {
            write: self.write.min(other.write),
            restore: [0, 1].map(|i| self.restore[i].min(other.restore[i])),
            ..self
        }
    }
}

/// Pages of each kind the generator wrote.
#[derive(Debug, Default)]
struct Mix {
    random: u64,
    text: u64,
    zero: u64,
}

fn main() {
    let mib = size_mib();
    let reps = env_number("DITTO_BENCH_REPS")
        .unwrap_or(DEFAULT_REPS)
        .max(1);
    let bytes = mib * MIB;
    let memory = MemoryLayout::single(bytes)
        .create()
        .expect("mapping guest memory");
    let started = Instant::now();
    let mix = fill(&memory, bytes / PAGE as u64);
    println!(
        "checkpoint_file: {mib} MiB of guest memory ({} random, {} text, {} zero pages; seed \
         {SEED:#x}; filled in {:.1} s), {} CPUs, load average {}",
        mix.random,
        mix.text,
        mix.zero,
        started.elapsed().as_secs_f64(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        load_average(),
    );
    let dir = tempfile::Builder::new()
        .prefix("checkpoint_file.")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("creating the benchmark folder");
    println!(
        "files in {} (page cache dropped before each restore); best of {reps} runs",
        dir.path().display()
    );

    let path = dir.path().join("bench.ditto");
    if std::env::var("DITTO_BENCH_ONLY").is_ok_and(|v| v == "disk-refs") {
        disk_refs(&memory, dir.path(), reps);
        println!("total {:.0} s", started.elapsed().as_secs_f64());
        return;
    }
    let mut results = Vec::new();
    for variant in Variant::all() {
        let m = (0..reps)
            .map(|_| measure(&memory, &path, variant))
            .reduce(Measured::best)
            .expect("at least one run");
        eprintln!(
            "  {:<7} {} thr {:>4} pages: write {:.2} s, restore {:.2} / {:.2} s",
            variant.codec(),
            variant.threads,
            variant.chunk_pages,
            m.write.as_secs_f64(),
            m.restore[0].as_secs_f64(),
            m.restore[1].as_secs_f64(),
        );
        results.push(m);
    }
    print!("{}", table(&results, bytes));
    disk_refs(&memory, dir.path(), reps);
    println!("total {:.0} s", started.elapsed().as_secs_f64());
}

/// Writes `memory` as a checkpoint whose pages all reference a drive image in `dir`, then
/// times filling them on 1 and N threads, cold and warm, best of `reps`; prints the ratios.
fn disk_refs(memory: &GuestMemory, dir: &Path, reps: u32) {
    let bytes = MemoryLayout::of(memory).regions[0].size;
    let pages = bytes / PAGE as u64;
    let image_path = dir.join("drive.img");
    let image = File::create(&image_path).expect("creating the drive image");
    image.set_len(bytes).expect("sizing the drive image");
    // Runs of guest pages, laid out on the drive in shuffled order.
    let mut rng = fastrand::Rng::with_seed(SEED ^ 1);
    let mut runs = Vec::new();
    let mut next = 0;
    while next < pages {
        let n = rng.u64(1..=MAX_RUN).min(pages - next);
        runs.push((next, n));
        next += n;
    }
    let mut placed = runs.clone();
    rng.shuffle(&mut placed);
    let mut extents = Vec::with_capacity(runs.len());
    let mut drive_page = 0;
    let mut buf = Vec::new();
    for (first, n) in placed {
        buf.resize(n as usize * PAGE, 0);
        memory
            .read_slice(&mut buf, GuestAddress(first * PAGE as u64))
            .expect("reading guest memory");
        std::os::unix::fs::FileExt::write_all_at(&image, &buf, drive_page * PAGE as u64)
            .expect("writing the drive image");
        extents.push(PageExtent {
            first_frame: first,
            pages: n,
            class: PageClass::Disk {
                drive: 0,
                offset: drive_page * PAGE as u64,
            },
        });
        drive_page += n;
    }
    image.sync_all().expect("syncing the drive image");
    let path = dir.join("disk-refs.ditto");
    let drives = [DriveInfo {
        id: "bench".into(),
        size: bytes,
    }];
    let mut writer =
        CheckpointWriter::create(&path, WriteOptions::default()).expect("creating the checkpoint");
    writer
        .write_memory(memory, &drives, &extents)
        .expect("writing guest memory into the checkpoint");
    writer.finish(b"{}").expect("finishing the checkpoint");

    let reader = CheckpointReader::open(&path).expect("opening the checkpoint");
    let many = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
    let files = [File::open(&image_path).expect("opening the drive image")];
    let fill = |threads: usize, cold: bool| {
        let restored = reader.layout().create().expect("mapping fresh memory");
        let disk_runs = reader
            .restore_memory(&restored, 2)
            .expect("restoring guest memory");
        if cold {
            drop_from_page_cache(&image_path);
        }
        let started = Instant::now();
        let n = fill_disk_refs_parallel(&restored, &disk_runs, &DriveFiles(&files), threads)
            .expect("filling disk-referenced pages");
        let elapsed = started.elapsed();
        assert_eq!(n, pages, "every page is disk-referenced");
        assert_same(memory, &restored);
        elapsed
    };
    let best = |threads, cold| {
        (0..reps)
            .map(|_| fill(threads, cold))
            .min()
            .expect("at least one run")
    };
    println!(
        "\ndisk-referenced restore: {pages} pages in {} runs from a {} MiB drive image, best of \
         {reps}\n\n| cache | 1 thread s | {many} threads s | {many}t / 1t |\n| ----- | ---------: \
         | ---------: | ------: |",
        runs.len(),
        bytes / MIB
    );
    for (label, cold) in [("cold", true), ("warm", false)] {
        let one = best(1, cold);
        let n = best(many, cold);
        println!(
            "| {label:<5} | {:>10.3} | {:>10.3} | {:>7.2} |",
            one.as_secs_f64(),
            n.as_secs_f64(),
            n.as_secs_f64() / one.as_secs_f64()
        );
    }
    std::fs::remove_file(&path).expect("removing the checkpoint");
    std::fs::remove_file(&image_path).expect("removing the drive image");
}

/// The memory size in MiB: the first argument that is not a flag (`cargo bench` adds
/// `--bench`), else `DITTO_BENCH_MIB`, else the default.
fn size_mib() -> u64 {
    let arg = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let mib = arg
        .map(|s| s.parse().expect("the memory size is a whole number of MiB"))
        .or_else(|| env_number("DITTO_BENCH_MIB"))
        .unwrap_or(DEFAULT_MIB);
    assert!(mib > 0, "the memory size must be at least 1 MiB");
    mib
}

/// A whole number from the environment variable `name`, if set.
fn env_number<T: std::str::FromStr>(name: &str) -> Option<T> {
    let value = std::env::var(name).ok()?;
    let parsed = value.parse().ok();
    assert!(parsed.is_some(), "{name}={value:?} is not a whole number");
    parsed
}

/// The 1-minute load average, for reading the times (other work on the machine skews them).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Fills `pages` pages of fresh memory with runs of random, text and (left as they are) zero
/// pages.
fn fill(memory: &GuestMemory, pages: u64) -> Mix {
    let mut rng = fastrand::Rng::with_seed(SEED);
    let mut mix = Mix::default();
    let mut page = Vec::with_capacity(PAGE + 256);
    let mut next = 0;
    while next < pages {
        let run = rng.u64(1..=MAX_RUN).min(pages - next);
        let kind = rng.u32(0..100);
        for p in next..next + run {
            match kind {
                0..40 => {
                    page.resize(PAGE, 0);
                    rng.fill(&mut page);
                    mix.random += 1;
                }
                40..70 => {
                    log_page(&mut rng, &mut page);
                    mix.text += 1;
                }
                _ => {
                    mix.zero += 1;
                    continue;
                }
            }
            memory
                .write_slice(&page, GuestAddress(p * PAGE as u64))
                .expect("writing guest memory");
        }
        next += run;
    }
    mix
}

/// One page of syslog-like lines: repetitive words, varying numbers (zstd gets about 2 to 3x).
fn log_page(rng: &mut fastrand::Rng, page: &mut Vec<u8>) {
    const SOURCES: [&str; 6] = [
        "kernel: EXT4-fs (vda1)",
        "systemd[1]",
        "sshd[812]",
        "nginx[1204]",
        "CRON[4551]",
        "postgres[977]",
    ];
    const EVENTS: [&str; 6] = [
        "accepted connection from 10.0.2.",
        "session opened for user app uid",
        "GET /api/v1/items/",
        "checkpoint complete: wrote buffers",
        "started job with pid",
        "mounted filesystem with ordered data mode, inode",
    ];
    let mut text = String::with_capacity(PAGE + 256);
    while text.len() < PAGE {
        let _ = writeln!(
            text,
            "Dec  1 18:{:02}:{:02}.{:06} guest {}: {}{} ({:#x})",
            rng.u32(0..60),
            rng.u32(0..60),
            rng.u32(0..1_000_000),
            SOURCES[rng.usize(..SOURCES.len())],
            EVENTS[rng.usize(..EVENTS.len())],
            rng.u32(0..100_000),
            rng.u64(0..1 << 40),
        );
    }
    page.clear();
    page.extend_from_slice(&text.as_bytes()[..PAGE]);
}

/// Writes the checkpoint of one variant, restores it twice and removes it.
fn measure(memory: &GuestMemory, path: &Path, variant: Variant) -> Measured {
    let started = Instant::now();
    let mut writer =
        CheckpointWriter::create(path, variant.options()).expect("creating the checkpoint");
    writer
        .write_memory(memory, &[], &[])
        .expect("writing guest memory into the checkpoint");
    let stats = writer.finish(b"{}").expect("finishing the checkpoint");
    let write = started.elapsed();
    let restore = [1, 2].map(|threads| restore(path, memory, threads));
    std::fs::remove_file(path).expect("removing the checkpoint");
    Measured {
        variant,
        stats,
        write,
        restore,
    }
}

/// Restores the checkpoint at `path` into fresh memory on `threads` threads, from a cold page
/// cache; checks it equals `original` (outside the time taken).
fn restore(path: &Path, original: &GuestMemory, threads: usize) -> Duration {
    drop_from_page_cache(path);
    let started = Instant::now();
    let reader = CheckpointReader::open(path).expect("opening the checkpoint");
    let memory = reader.layout().create().expect("mapping fresh memory");
    let disk_refs = reader
        .restore_memory(&memory, threads)
        .expect("restoring guest memory");
    let elapsed = started.elapsed();
    assert!(
        disk_refs.is_empty(),
        "no page was written as a disk reference"
    );
    assert_same(original, &memory);
    elapsed
}

fn drop_from_page_cache(path: &Path) {
    let file = File::open(path).expect("opening the checkpoint");
    rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed)
        .expect("dropping the checkpoint from the page cache");
}

fn assert_same(original: &GuestMemory, restored: &GuestMemory) {
    let layout = MemoryLayout::of(original);
    assert_eq!(layout, MemoryLayout::of(restored), "the layouts differ");
    let mut a = vec![0u8; COMPARE_BLOCK];
    let mut b = vec![0u8; COMPARE_BLOCK];
    for region in &layout.regions {
        let mut at = region.guest_addr;
        let end = region.guest_addr + region.size;
        while at < end {
            let n = (end - at).min(COMPARE_BLOCK as u64) as usize;
            original
                .read_slice(&mut a[..n], GuestAddress(at))
                .expect("reading the original memory");
            restored
                .read_slice(&mut b[..n], GuestAddress(at))
                .expect("reading the restored memory");
            assert!(
                a[..n] == b[..n],
                "the restored memory differs in {at:#x}+{n:#x}"
            );
            at += n as u64;
        }
    }
}

/// The results as a table; every ratio is to [`BASELINE`].
fn table(results: &[Measured], guest_bytes: u64) -> String {
    let base = results
        .iter()
        .find(|m| m.variant == BASELINE)
        .expect("the baseline was measured");
    let secs = |d: Duration| d.as_secs_f64();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n| codec  | thr | chunk | file MiB | size × | write s | MiB/s | write × \
         | restore 1t s | × | restore 2t s | × |"
    );
    let _ = writeln!(
        out,
        "| ------ | --: | ----: | -------: | -----: | ------: | ----: | ------: \
         | -----------: | -: | -----------: | -: |"
    );
    for m in results {
        let v = m.variant;
        let _ = writeln!(
            out,
            "| {:<6} | {:>3} | {:>5} | {:>8.1} | {:>6.3} | {:>7.2} | {:>5.0} | {:>7.2} \
             | {:>12.2} | {:.2} | {:>12.2} | {:.2} |",
            v.codec(),
            v.threads,
            v.chunk_pages,
            m.stats.file_bytes as f64 / MIB as f64,
            m.stats.file_bytes as f64 / base.stats.file_bytes as f64,
            secs(m.write),
            guest_bytes as f64 / MIB as f64 / secs(m.write),
            secs(m.write) / secs(base.write),
            secs(m.restore[0]),
            secs(m.restore[0]) / secs(base.restore[0]),
            secs(m.restore[1]),
            secs(m.restore[1]) / secs(base.restore[0]),
        );
    }
    out
}
