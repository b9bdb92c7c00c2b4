//! `kpageblock-check`: runs inside a guest with the patched kernel (`cargo xtask kernel`) and
//! checks `/proc/kpageblock` against the truth. For every page of FILE (read into the page cache
//! first) it finds the frame through `/proc/self/pagemap`, reads that frame's record and, when the
//! record is valid, compares the page with the bytes at the record's offset on DEVICE. With
//! `--agent-json`, the records of every frame of a `ditto-agent scan --json` report (either
//! method) must give the same device and offset, and it counts those of the device's own cache;
//! with `--in-report` as well, every page of FILE that has a record must be in that report. With
//! `--expect-none` (a dirty file) no page may have a record, nor be in the report. It also
//! checks the interface's edges: an
//! unaligned read fails with EINVAL, a read past the last frame returns nothing, and opening
//! without CAP_SYS_ADMIN fails with EPERM. Exits 0 when everything held.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;

const PAGE: usize = 4096;
const RECORD: u64 = 16;
const KPB_MAPPED: u32 = 1;
const KPB_BDEV: u32 = 2;
/// The capability number of CAP_SYS_ADMIN.
const CAP_SYS_ADMIN: u32 = 21;

/// Check /proc/kpageblock against a cached file, its disk and the agent's walk.
#[derive(Parser)]
struct Args {
    /// A regular file on DEVICE's file system.
    file: PathBuf,
    /// The block device the file system is on (e.g. /dev/vda).
    device: PathBuf,
    /// A `ditto-agent scan --json` report to compare with.
    #[arg(long)]
    agent_json: Option<PathBuf>,
    /// FILE is dirty (written, not yet written back): no page of it may have a record.
    #[arg(long)]
    expect_none: bool,
    /// Every page of FILE with a record must be in the `--agent-json` report.
    #[arg(long, requires = "agent_json")]
    in_report: bool,
}

/// A page-aligned buffer of one page, as O_DIRECT reads need.
#[repr(align(4096))]
struct AlignedPage([u8; PAGE]);

/// One /proc/kpageblock record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Record {
    dev: u32,
    flags: u32,
    offset: u64,
}

fn record(kpb: &File, pfn: u64) -> Result<Record> {
    let mut raw = [0u8; RECORD as usize];
    kpb.read_exact_at(&mut raw, pfn * RECORD)
        .with_context(|| format!("reading the record of frame {pfn:#x}"))?;
    let word = |at: usize| u32::from_ne_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]]);
    let mut offset = [0u8; 8];
    offset.copy_from_slice(&raw[8..16]);
    Ok(Record {
        dev: word(0),
        flags: word(4),
        offset: u64::from_ne_bytes(offset),
    })
}

/// The kernel's `new_encode_dev`.
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let kpb = File::open("/proc/kpageblock").context("opening /proc/kpageblock")?;
    // O_DIRECT: the device's bytes without passing through its page cache, whose pages would
    // otherwise become records of the device's own cache (aliases of the file's blocks) and
    // count as metadata in the census.
    let device = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&args.device)
        .with_context(|| format!("opening {} with O_DIRECT", args.device.display()))?;
    let rdev = device.metadata()?.rdev();
    let dev = encode_dev(libc::major(rdev), libc::minor(rdev));

    let mut failures = Vec::new();
    let reported = match &args.agent_json {
        Some(report) => Some(check_agent(report, &kpb, dev, &mut failures)?),
        None => None,
    };
    check_file(&args, &kpb, &device, dev, reported.as_ref(), &mut failures)?;
    census(&kpb)?;
    check_edges(&mut failures)?;

    if failures.is_empty() {
        println!("kpageblock-check: ok");
        Ok(())
    } else {
        for failure in failures.iter().take(20) {
            println!("FAIL {failure}");
        }
        bail!("{} checks failed", failures.len())
    }
}

/// Every page of the file: its frame's record, the bytes on the device, and whether the agent's
/// report (the frames in `reported`) names it.
fn check_file(
    args: &Args,
    kpb: &File,
    device: &File,
    dev: u32,
    reported: Option<&HashSet<u64>>,
    failures: &mut Vec<String>,
) -> Result<()> {
    let mut file =
        File::open(&args.file).with_context(|| format!("opening {}", args.file.display()))?;
    let mut contents = Vec::new();
    file.read_to_end(&mut contents)?;
    let len = contents.len();
    if len < 2 * PAGE {
        bail!(
            "{} is too small to check ({len} bytes)",
            args.file.display()
        );
    }
    let pages = len.div_ceil(PAGE);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    // SAFETY: a fresh read-only shared mapping of a file we hold open; it is only read through
    // the slice below while `map` lives, and unmapped before returning.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if map == libc::MAP_FAILED {
        bail!("mmap: {}", std::io::Error::last_os_error());
    }
    // SAFETY: `map` is a readable mapping of `len` bytes (checked above).
    let mapped = unsafe { std::slice::from_raw_parts(map.cast::<u8>(), len) };
    let pagemap = File::open("/proc/self/pagemap").context("opening /proc/self/pagemap")?;
    let (mut valid, mut equal, mut in_report) = (0usize, 0usize, 0usize);
    let is_reported = |pfn: u64| reported.is_some_and(|r| r.contains(&pfn));
    let mut block = Box::new(AlignedPage([0u8; PAGE]));
    for page in 0..pages {
        let start = page * PAGE;
        // Touch the page so that it is mapped, then ask where it is.
        let bytes = &mapped[start..len.min(start + PAGE)];
        std::hint::black_box(bytes[0]);
        let mut entry = [0u8; 8];
        let virt = map as usize + start;
        pagemap.read_exact_at(&mut entry, (virt / PAGE * 8) as u64)?;
        let entry = u64::from_ne_bytes(entry);
        if entry >> 63 == 0 {
            failures.push(format!("page {page} of the file is not present"));
            continue;
        }
        let pfn = entry & ((1 << 55) - 1);
        let rec = record(kpb, pfn)?;
        let whole = bytes.len() == PAGE;
        if args.expect_none {
            if rec.flags & KPB_MAPPED != 0 {
                failures.push(format!(
                    "page {page} of the dirty file has a record {rec:?}"
                ));
            }
            if is_reported(pfn) {
                failures.push(format!(
                    "page {page} (frame {pfn:#x}) of the dirty file is in the agent's report"
                ));
            }
            continue;
        }
        if rec.flags & KPB_MAPPED == 0 {
            if whole {
                println!("page {page} (frame {pfn:#x}): no record");
            }
            continue;
        }
        if !whole {
            failures.push(format!("the partial last page {page} has a record {rec:?}"));
            continue;
        }
        valid += 1;
        if is_reported(pfn) {
            in_report += 1;
        } else if args.in_report {
            failures.push(format!(
                "page {page} (frame {pfn:#x}) has a record but is not in the agent's report"
            ));
        }
        if rec.dev != dev || rec.flags != KPB_MAPPED {
            failures.push(format!("page {page}: record {rec:?}, device {dev:#x}"));
            continue;
        }
        device.read_exact_at(&mut block.0, rec.offset)?;
        if block.0 == bytes && bytes == &contents[start..start + PAGE] {
            equal += 1;
        } else {
            failures.push(format!(
                "page {page}: the bytes at {:#x} differ",
                rec.offset
            ));
        }
    }
    // SAFETY: unmapping the mapping made above; `mapped` is not used after this.
    unsafe { libc::munmap(map, len) };
    println!(
        "file {}: {len} bytes, {pages} pages, {valid} with a record, {equal} equal to the disk, \
         {in_report} in the agent's report",
        args.file.display()
    );
    if valid == 0 && !args.expect_none {
        failures.push("no page of the file has a record".into());
    }
    Ok(())
}

/// The agent's report and /proc/kpageblock must agree on every frame the agent reports; returns
/// those frames.
fn check_agent(
    report: &PathBuf,
    kpb: &File,
    dev: u32,
    failures: &mut Vec<String>,
) -> Result<HashSet<u64>> {
    let text =
        std::fs::read_to_string(report).with_context(|| format!("reading {}", report.display()))?;
    let doc: serde_json::Value = serde_json::from_str(&text).context("parsing the report")?;
    let extents = doc["cache_extents"]
        .as_array()
        .context("the report has no cache_extents")?;
    let method = doc["summary"]["method"].as_str().unwrap_or("(no method)");
    let (mut pages, mut agree, mut missing, mut bdev) = (0u64, 0u64, 0u64, 0u64);
    let mut frames = HashSet::new();
    for extent in extents {
        let field = |name: &str| {
            extent[name]
                .as_u64()
                .with_context(|| format!("an extent without {name}: {extent}"))
        };
        let (pfn, count, offset) = (field("pfn")?, field("pages")?, field("offset")?);
        for i in 0..count {
            pages += 1;
            frames.insert(pfn + i);
            let rec = record(kpb, pfn + i)?;
            let want = offset + i * PAGE as u64;
            if rec.flags & KPB_MAPPED == 0 {
                missing += 1;
            } else if rec.dev == dev && rec.offset == want {
                agree += 1;
                if rec.flags & KPB_BDEV != 0 {
                    bdev += 1;
                }
            } else {
                failures.push(format!(
                    "frame {:#x}: the agent says {want:#x}, kpageblock {rec:?}",
                    pfn + i
                ));
            }
        }
    }
    println!(
        "agent {method}: {} extents, {pages} pages; kpageblock agrees on {agree} \
         ({bdev} of the device's own cache), has no record for {missing}",
        extents.len()
    );
    if agree == 0 {
        failures.push("kpageblock agrees with the agent on no page".into());
    }
    Ok(frames)
}

/// How many frames have a record, and how many of those are the device's own cache.
fn census(kpb: &File) -> Result<()> {
    let mut reader = std::io::BufReader::with_capacity(1 << 16, kpb);
    reader.seek(SeekFrom::Start(0))?;
    let mut raw = Vec::new();
    let started = std::time::Instant::now();
    reader.read_to_end(&mut raw)?;
    let (mut frames, mut valid, mut bdev) = (0u64, 0u64, 0u64);
    for chunk in raw.chunks_exact(RECORD as usize) {
        frames += 1;
        let flags = u32::from_ne_bytes([chunk[4], chunk[5], chunk[6], chunk[7]]);
        if flags & KPB_MAPPED != 0 {
            valid += 1;
            if flags & KPB_BDEV != 0 {
                bdev += 1;
            }
        }
    }
    println!(
        "census: {frames} frames read in {:.3} s, {valid} with a record ({bdev} of a block device's own cache)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// EINVAL for an unaligned read, nothing past the end, EPERM without CAP_SYS_ADMIN.
fn check_edges(failures: &mut Vec<String>) -> Result<()> {
    let kpb = File::open("/proc/kpageblock")?;
    let mut buf = [0u8; 32];
    match kpb.read_at(&mut buf, 8) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
        other => failures.push(format!("an unaligned offset read gave {other:?}")),
    }
    match kpb.read_at(&mut buf[..24], 0) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
        other => failures.push(format!("an unaligned length read gave {other:?}")),
    }
    match kpb.read_at(&mut buf, 1 << 60) {
        Ok(0) => {}
        other => failures.push(format!("a read past the end gave {other:?}")),
    }
    // Drop CAP_SYS_ADMIN from the effective set (keep it permitted) and open again.
    let mut header = [0x2008_0522u32, 0]; // _LINUX_CAPABILITY_VERSION_3, this process
    let mut data = [0u32; 6]; // two __user_cap_data_struct: effective, permitted, inheritable
    // SAFETY: capget with a version 3 header and room for its two data structs.
    if unsafe { libc::syscall(libc::SYS_capget, header.as_mut_ptr(), data.as_mut_ptr()) } != 0 {
        bail!("capget: {}", std::io::Error::last_os_error());
    }
    data[0] &= !(1 << CAP_SYS_ADMIN);
    // SAFETY: capset with the header and data capget filled, less one effective bit.
    if unsafe { libc::syscall(libc::SYS_capset, header.as_mut_ptr(), data.as_ptr()) } != 0 {
        bail!("capset: {}", std::io::Error::last_os_error());
    }
    match File::open("/proc/kpageblock") {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
        other => failures.push(format!("opening without CAP_SYS_ADMIN gave {other:?}")),
    }
    data[0] |= 1 << CAP_SYS_ADMIN;
    // SAFETY: as above, restoring the bit.
    if unsafe { libc::syscall(libc::SYS_capset, header.as_mut_ptr(), data.as_ptr()) } != 0 {
        bail!("capset: {}", std::io::Error::last_os_error());
    }
    println!("edges: unaligned reads, the end of the file and the capability check done");
    Ok(())
}
