//! One scan: report each clean page-cache page as (guest frame, disk, byte offset on the whole
//! disk), by one of two methods. The kernel fast path ([`Method::Kpageblock`], see
//! [`crate::kpageblock`]) reads every frame's disk block from /proc/kpageblock where the guest
//! kernel has ditto's patch. The walk ([`Method::Walk`], any kernel) walks the regular files of
//! the eligible filesystems and finds which of their pages are resident: files are only ever
//! mapped read-only and shared, only resident pages are touched (with `MADV_POPULATE_READ`,
//! which fails instead of raising SIGBUS when a file shrinks under it), and nothing is written,
//! synced or read from disk on purpose.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions, ReadDir};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::disks::{self, Disk, DiskError, Layout, Mount, split_dev};
use crate::extents::{CacheExtent, Coalescer};
use crate::fiemap::{ExtentMap, Placement};
use crate::frames::{self, FrameError, FrameReader, PAGE_SIZE};
use crate::kpageblock::{self, DeviceMap, KPAGEBLOCK, KpageblockError, KpageblockReader};

/// Pages examined per step: bounds the memory a file of any size needs.
const CHUNK_PAGES: usize = 1024;
/// Extents per batch handed to the sink.
pub const BATCH_EXTENTS: usize = 4096;
const MADV_POPULATE_READ: libc::c_int = 22;

/// How a scan finds the pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Walk the files: `mincore`, pagemap, kpageflags and FIEMAP (any kernel).
    #[default]
    Walk,
    /// Read /proc/kpageblock (a kernel with ditto's patch).
    Kpageblock,
}

impl Method {
    /// The method's name: `walk` or `kpageblock`.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Walk => "walk",
            Method::Kpageblock => "kpageblock",
        }
    }

    /// Parses a requested method: `walk`, `kpageblock`, or `auto` or empty for `None` (the
    /// fast path when the kernel has it, else the walk).
    pub fn parse_request(name: &str) -> Result<Option<Self>, UnknownMethod> {
        match name {
            "" | "auto" => Ok(None),
            other => other.parse().map(Some),
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A method name that is neither `walk` nor `kpageblock` (nor `auto`).
#[derive(Debug, thiserror::Error)]
#[error("unknown scan method {0:?}: the methods are walk and kpageblock")]
pub struct UnknownMethod(pub String);

impl std::str::FromStr for Method {
    type Err = UnknownMethod;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "walk" => Ok(Method::Walk),
            "kpageblock" => Ok(Method::Kpageblock),
            other => Err(UnknownMethod(other.to_owned())),
        }
    }
}

/// What to scan.
#[derive(Clone, Debug, Default)]
pub struct ScanOptions {
    /// Limit the walk to these directories (empty: every eligible filesystem). Only the walk
    /// can do this: with paths, the automatic choice is the walk, and forcing
    /// [`Method::Kpageblock`] is an error.
    pub paths: Vec<PathBuf>,
    /// The method to use; `None` picks the fast path when /proc/kpageblock is readable, else
    /// the walk.
    pub method: Option<Method>,
    /// Stop walking after this long.
    pub time_budget: Option<Duration>,
    /// Treat loop devices as disks (for machines that are not ditto guests, such as tests).
    pub include_loop_devices: bool,
    /// Called with each file's path between `mincore` and the touch of its resident pages
    /// (a seam for tests that evict pages in that window; `None` in the agent).
    #[doc(hidden)]
    pub after_mincore: Option<fn(&Path)>,
    /// Read the fast path's records from this file instead of /proc/kpageblock (a seam for
    /// tests that fake the kernel interface; `None` in the agent).
    #[doc(hidden)]
    pub kpageblock_path: Option<PathBuf>,
}

/// What a scan hands on, in order: the disk table once, then extents in batches.
#[derive(Debug)]
pub enum ScanEvent {
    /// The disks that extents refer to by index.
    Disks(Vec<Disk>),
    /// A batch of extents.
    Extents(Vec<CacheExtent>),
}

/// What a scan found and skipped.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    /// Regular files opened.
    pub files_visited: u64,
    /// Files and directory entries skipped, by reason.
    pub files_skipped: BTreeMap<String, u64>,
    /// Mounted filesystems skipped, by reason.
    pub filesystems_skipped: BTreeMap<String, u64>,
    /// Resident pages of the visited files.
    pub pages_resident: u64,
    /// Pages reported as clean page cache.
    pub pages_reported: u64,
    /// Resident pages not reported, by reason.
    pub pages_excluded: BTreeMap<String, u64>,
    /// Major faults taken while mapping resident pages: pages evicted after `mincore` and read
    /// back from the disk. The runs of pages that took one are excluded ("read back during
    /// scan").
    pub pages_refaulted: u64,
    /// Wall time of the scan in microseconds.
    pub elapsed_us: u64,
    /// The time budget ran out before the walk finished.
    pub budget_exhausted: bool,
    /// How the pages were found.
    pub method: Method,
}

fn bump(map: &mut BTreeMap<String, u64>, reason: &str, n: u64) {
    *map.entry(reason.to_owned()).or_default() += n;
}

/// Why a scan failed as a whole (single files never fail a scan).
#[derive(Debug, thiserror::Error)]
pub enum ScanError<E> {
    /// Frame numbers or flags are not readable.
    #[error(transparent)]
    Frames(#[from] FrameError),
    /// The disks could not be found.
    #[error(transparent)]
    Disks(#[from] DiskError),
    /// A path to limit the walk does not exist.
    #[error("cannot scan {path}: {source}")]
    Path {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The kernel lacks MADV_POPULATE_READ (Linux 5.14).
    #[error("this kernel lacks MADV_POPULATE_READ (needs Linux 5.14 or later)")]
    Unsupported,
    /// The fast path was asked for and /proc/kpageblock is missing or unreadable.
    #[error("--method kpageblock: {0}")]
    Kpageblock(#[from] KpageblockError),
    /// The fast path was asked for together with paths, which only the walk honours.
    #[error(
        "--method kpageblock reports every frame and cannot be limited to paths; use --method \
         walk with --path"
    )]
    PathsNeedWalk,
    /// The consumer of the report stopped taking it.
    #[error("the report's consumer went away")]
    Sink(E),
}

/// The method a scan uses, with the fast path's open file.
enum Chosen {
    Walk,
    Kpageblock(KpageblockReader),
}

/// Picks the method `options` ask for, reading the fast path's file at `path`.
fn choose<E>(options: &ScanOptions, path: &Path) -> Result<Chosen, ScanError<E>> {
    match (options.method, options.paths.is_empty()) {
        (Some(Method::Walk), _) | (None, false) => Ok(Chosen::Walk),
        (Some(Method::Kpageblock), false) => Err(ScanError::PathsNeedWalk),
        (Some(Method::Kpageblock), true) => Ok(Chosen::Kpageblock(KpageblockReader::open(path)?)),
        (None, true) => Ok(KpageblockReader::open(path).map_or(Chosen::Walk, Chosen::Kpageblock)),
    }
}

/// Runs one scan, handing the report to `sink` as it is produced.
pub fn scan<E>(
    options: &ScanOptions,
    mut sink: impl FnMut(ScanEvent) -> Result<(), E>,
) -> Result<Summary, ScanError<E>> {
    let started = Instant::now();
    let path = options
        .kpageblock_path
        .as_deref()
        .unwrap_or(Path::new(KPAGEBLOCK));
    let chosen = choose(options, path)?;
    let frames = FrameReader::open()?;
    let layout = disks::discover(options.include_loop_devices)?;
    let mut summary = Summary {
        filesystems_skipped: layout.skipped.clone(),
        ..Summary::default()
    };
    sink(ScanEvent::Disks(layout.disks.clone())).map_err(ScanError::Sink)?;
    let deadline = options.time_budget.map(|b| started + b);
    let mut coalescer = Coalescer::new(BATCH_EXTENTS, |batch| sink(ScanEvent::Extents(batch)));
    match chosen {
        Chosen::Walk => walk(
            options,
            &frames,
            &layout,
            &mut summary,
            deadline,
            &mut coalescer,
        )?,
        Chosen::Kpageblock(reader) => {
            summary.method = Method::Kpageblock;
            let mut devices = DeviceMap::new(&layout, disks::whole_disk);
            kpageblock::scan_frames(
                &reader,
                &mut devices,
                &mut |first, count| frames.flag_range(first, count),
                deadline,
                &mut summary,
                &mut coalescer,
            )
            .map_err(ScanError::Sink)?;
        }
    }
    summary.pages_reported = coalescer.finish().map_err(ScanError::Sink)?;
    summary.elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    Ok(summary)
}

/// The walk over the files of the eligible filesystems (or of `options.paths`).
fn walk<E, F: FnMut(Vec<CacheExtent>) -> Result<(), E>>(
    options: &ScanOptions,
    frames: &FrameReader,
    layout: &Layout,
    summary: &mut Summary,
    deadline: Option<Instant>,
    coalescer: &mut Coalescer<F>,
) -> Result<(), ScanError<E>> {
    let mut roots: Vec<(PathBuf, &Mount)> = Vec::new();
    if options.paths.is_empty() {
        roots.extend(layout.mounts.iter().map(|m| (m.mount_point.clone(), m)));
    } else {
        for path in &options.paths {
            let meta = fs::metadata(path).map_err(|source| ScanError::Path {
                path: path.clone(),
                source,
            })?;
            match layout.mount_of(split_dev(meta.dev())) {
                Some(mount) => roots.push((path.clone(), mount)),
                None => bump(
                    &mut summary.filesystems_skipped,
                    "path not on an eligible filesystem",
                    1,
                ),
            }
        }
    }

    let mut ctx = FileScan {
        frames,
        layout,
        summary,
        deadline,
        after_mincore: options.after_mincore,
    };
    'roots: for (root, mount) in roots {
        let mut stack: Vec<ReadDir> = Vec::new();
        match fs::read_dir(&root) {
            Ok(dir) => stack.push(dir),
            Err(_) => bump(&mut ctx.summary.files_skipped, "unreadable directory", 1),
        }
        while let Some(dir) = stack.last_mut() {
            if ctx.out_of_time() {
                break 'roots;
            }
            let Some(entry) = dir.next() else {
                stack.pop();
                continue;
            };
            let Ok(entry) = entry else {
                bump(&mut ctx.summary.files_skipped, "unreadable directory", 1);
                continue;
            };
            let Ok(kind) = entry.file_type() else {
                bump(&mut ctx.summary.files_skipped, "vanished", 1);
                continue;
            };
            let path = entry.path();
            if kind.is_dir() {
                match fs::symlink_metadata(&path) {
                    Ok(meta) if split_dev(meta.dev()) != mount.dev => {
                        bump(&mut ctx.summary.files_skipped, "other filesystem", 1)
                    }
                    Ok(_) => match fs::read_dir(&path) {
                        Ok(sub) => stack.push(sub),
                        Err(_) => bump(&mut ctx.summary.files_skipped, "unreadable directory", 1),
                    },
                    Err(_) => bump(&mut ctx.summary.files_skipped, "vanished", 1),
                }
            } else if kind.is_file() {
                ctx.file(&path, mount, coalescer)?;
            } else {
                let reason = if kind.is_symlink() {
                    "symlink"
                } else if kind.is_fifo() {
                    "fifo"
                } else if kind.is_socket() {
                    "socket"
                } else {
                    "device node"
                };
                bump(&mut ctx.summary.files_skipped, reason, 1);
            }
        }
    }
    Ok(())
}

/// The state one file's scan needs.
struct FileScan<'a> {
    frames: &'a FrameReader,
    layout: &'a Layout,
    summary: &'a mut Summary,
    deadline: Option<Instant>,
    after_mincore: Option<fn(&Path)>,
}

/// A read-only shared mapping, unmapped when dropped.
struct Mapping {
    addr: *mut libc::c_void,
    len: usize,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: addr/len describe a mapping this struct created and nothing else uses.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

impl FileScan<'_> {
    fn out_of_time(&mut self) -> bool {
        let out = self.deadline.is_some_and(|d| Instant::now() >= d);
        if out {
            self.summary.budget_exhausted = true;
        }
        out
    }

    fn skip(&mut self, reason: &str) {
        bump(&mut self.summary.files_skipped, reason, 1);
    }

    fn exclude(&mut self, reason: &str, pages: u64) {
        bump(&mut self.summary.pages_excluded, reason, pages);
    }

    /// Scans one regular file; problems with the file are counted, never returned.
    fn file<E, F: FnMut(Vec<CacheExtent>) -> Result<(), E>>(
        &mut self,
        path: &Path,
        mount: &Mount,
        out: &mut Coalescer<F>,
    ) -> Result<(), ScanError<E>> {
        let file = match open_read_only(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.skip("vanished");
                return Ok(());
            }
            Err(_) => {
                self.skip("unreadable");
                return Ok(());
            }
        };
        let Ok(meta) = file.metadata() else {
            self.skip("unreadable");
            return Ok(());
        };
        if !meta.is_file() {
            self.skip("not a regular file any more");
            return Ok(());
        }
        if split_dev(meta.dev()) != mount.dev {
            self.skip("other filesystem");
            return Ok(());
        }
        self.summary.files_visited += 1;
        let size = meta.size();
        let full_pages = (size / PAGE_SIZE) as usize;
        let all_pages = size.div_ceil(PAGE_SIZE) as usize;
        if all_pages == 0 {
            return Ok(());
        }
        let len = all_pages * PAGE_SIZE as usize;
        // SAFETY: a fresh read-only shared mapping of an open file; the kernel picks the
        // address, and the result is checked before use.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            self.skip("cannot map");
            return Ok(());
        }
        let mapping = Mapping { addr, len };
        let mut extents = ExtentMap::new(file.as_fd());
        let disk = mount.disk as u32;

        let mut first = 0;
        while first < all_pages {
            if self.out_of_time() {
                break;
            }
            let count = CHUNK_PAGES.min(all_pages - first);
            let base = mapping.addr as usize + first * PAGE_SIZE as usize;
            let mut resident = vec![0u8; count];
            // SAFETY: [base, base + count pages) lies inside the mapping, and `resident` has
            // one byte per page of it.
            let rc = unsafe {
                libc::mincore(
                    base as *mut libc::c_void,
                    count * PAGE_SIZE as usize,
                    resident.as_mut_ptr(),
                )
            };
            if rc != 0 {
                self.skip("changed during scan");
                return Ok(());
            }
            // The partial last page is never reported: past EOF the page holds zeros, the
            // disk block whatever it held.
            let whole = count.min(full_pages.saturating_sub(first));
            let tail_resident = resident[whole..].iter().filter(|r| **r & 1 != 0).count() as u64;
            if tail_resident > 0 {
                self.summary.pages_resident += tail_resident;
                self.exclude("partial last page", tail_resident);
            }
            let resident = &resident[..whole];
            let resident_count = resident.iter().filter(|r| **r & 1 != 0).count() as u64;
            if resident_count == 0 {
                first += count;
                continue;
            }
            self.summary.pages_resident += resident_count;
            if let Some(hook) = self.after_mincore {
                hook(path);
            }

            // Map the resident runs into our page tables so pagemap shows their frames. A run
            // during whose mapping the thread took a major fault had a page evicted after
            // `mincore` and read back from the disk: it is counted, and none of it is reported.
            let mut read_back = vec![false; whole];
            let mut i = 0;
            while i < whole {
                if resident[i] & 1 == 0 {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < whole && resident[i] & 1 != 0 {
                    i += 1;
                }
                let run_addr = base + start * PAGE_SIZE as usize;
                let faults_before = frames::major_faults();
                // SAFETY: the range lies inside our mapping; MADV_POPULATE_READ only faults
                // pages in (and fails with EFAULT where a page would raise SIGBUS).
                let rc = unsafe {
                    libc::madvise(
                        run_addr as *mut libc::c_void,
                        (i - start) * PAGE_SIZE as usize,
                        MADV_POPULATE_READ,
                    )
                };
                if rc != 0 {
                    let err = std::io::Error::last_os_error();
                    if err.raw_os_error() == Some(libc::EINVAL) {
                        return Err(ScanError::Unsupported);
                    }
                    self.skip("changed during scan");
                    return Ok(());
                }
                let faults = frames::major_faults().saturating_sub(faults_before);
                if faults > 0 {
                    self.summary.pages_refaulted += faults;
                    read_back[start..i].iter_mut().for_each(|r| *r = true);
                }
            }

            let pfns = self.frames.frames(base, whole)?;
            // The pages still in the running, with their frames; flags are read for exactly
            // these, so each page is judged by its own frame's flags.
            let mut candidates: Vec<(usize, u64)> = Vec::new();
            for (index, (pfn, r)) in pfns.iter().zip(resident).enumerate() {
                if *r & 1 == 0 {
                    continue;
                }
                if read_back[index] {
                    self.exclude("read back during scan", 1);
                    continue;
                }
                match *pfn {
                    Some(pfn) => candidates.push((index, pfn)),
                    None => self.exclude("evicted during scan", 1),
                }
            }
            let frame_numbers: Vec<u64> = candidates.iter().map(|(_, pfn)| *pfn).collect();
            let flags = self.frames.flags(&frame_numbers)?;
            let mut found: Vec<(u64, u64)> = Vec::new();
            for ((index, pfn), page_flags) in candidates.into_iter().zip(flags) {
                if let Some(reason) = frames::unclean_reason(page_flags) {
                    self.exclude(reason, 1);
                    continue;
                }
                let offset = (first + index) as u64 * PAGE_SIZE;
                match extents.place(offset, PAGE_SIZE) {
                    Ok(Placement::Device(device)) => {
                        let Some(on_disk) = mount.start_bytes.checked_add(device) else {
                            self.exclude("offset out of range", 1);
                            continue;
                        };
                        let inside = self
                            .layout
                            .disks
                            .get(mount.disk)
                            .is_some_and(|d| on_disk.saturating_add(PAGE_SIZE) <= d.size_bytes);
                        if !inside {
                            self.exclude("offset out of range", 1);
                            continue;
                        }
                        found.push((pfn, on_disk));
                    }
                    Ok(Placement::Refused(reason)) => self.exclude(reason, 1),
                    Err(_) => {
                        self.exclude("no extent map (FIEMAP failed)", 1);
                    }
                }
            }
            // A file that shrank or grew while this chunk was examined may have had its last
            // page or its extents change under us: report nothing more of it.
            let same_size = file.metadata().is_ok_and(|now| now.size() == size);
            if !same_size {
                self.exclude("file changed during scan", found.len() as u64);
                self.skip("changed during scan");
                return Ok(());
            }
            for (pfn, on_disk) in found {
                out.push(pfn, disk, on_disk).map_err(ScanError::Sink)?;
            }
            first += count;
        }
        Ok(())
    }
}

/// Opens a file for reading without following a symlink, blocking on a FIFO, or changing its
/// access time where the kernel allows that.
fn open_read_only(path: &Path) -> std::io::Result<File> {
    let flags = libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
    match OpenOptions::new()
        .read(true)
        .custom_flags(flags | libc::O_NOATIME)
        .open(path)
    {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            OpenOptions::new().read(true).custom_flags(flags).open(path)
        }
        other => other,
    }
}
