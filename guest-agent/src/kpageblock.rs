//! The kernel fast path: /proc/kpageblock (from ditto's guest-kernel patch, `kernel-patch/`)
//! says for every guest frame which block device and which byte offset on it hold the frame's
//! bytes, so one sequential read over all frames replaces the walk over files, `mincore`,
//! pagemap and FIEMAP.
//!
//! The file is indexed like /proc/kpageflags: the record of frame `pfn` is the 16 bytes at
//! offset `pfn * 16`, native endian, `struct kpageblock_entry { u32 dev; u32 flags; u64
//! offset; }`. `dev` is the device's `dev_t` in the kernel's `new_encode_dev()` encoding (what
//! userspace sees as `st_rdev`); flag bit 0 ([`KPB_MAPPED`]) makes the record valid, bit 1
//! ([`KPB_BDEV`]) says the page is in the block device's own page cache (filesystem metadata);
//! other bits are reserved and ignored. Every frame that is not a clean, uptodate, non-writeback
//! page-cache page lying contiguously on a block device reads as zeros. Reading needs
//! CAP_SYS_ADMIN; reads past the last frame come back short or empty.
//!
//! A record may be stale by the time it is read, so each valid record is checked against the
//! frame's kpageflags word as the walk checks its pages (the host's dirty log is the real safety
//! net), and only records on the scan's disks (or partitions of them, offset by the
//! partition's start) are kept. A bad record is counted and skipped, never fatal.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::disks::{Layout, split_dev};
use crate::extents::Coalescer;
use crate::frames::{self, FrameError, PAGE_SIZE};
use crate::scan::Summary;

/// Where the kernel exposes the interface.
pub const KPAGEBLOCK: &str = "/proc/kpageblock";
/// Bytes of one record.
pub const RECORD_BYTES: usize = 16;
/// Record flag: the record is valid.
pub const KPB_MAPPED: u32 = 1 << 0;
/// Record flag: the page is in the block device's own page cache (e.g. filesystem metadata).
pub const KPB_BDEV: u32 = 1 << 1;
/// Frames read per system call (1 MiB of records).
const CHUNK_FRAMES: usize = 64 * 1024;
/// Consecutive unreadable chunks after which the scan stops reading.
const MAX_READ_FAILURES: u32 = 8;
/// The smallest unit a disk offset must be aligned to (the host refuses anything else).
const SECTOR: u64 = 512;
/// Distinct unknown devices whose resolution is remembered (more are resolved each time).
const MAX_CACHED_DEVICES: usize = 4096;

/// Why /proc/kpageblock cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KpageblockError {
    /// The file does not exist: the kernel lacks the patch.
    #[error(
        "{path} does not exist: this kernel lacks ditto's kpageblock patch; scan with \
         --method walk (or leave the method to auto)"
    )]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// The file exists but this process may not read it.
    #[error("cannot read {path}: {source}; reading it needs CAP_SYS_ADMIN (run the agent as root)")]
    Denied {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Opening or reading the file failed otherwise.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// One frame's record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Record {
    /// The block device, `new_encode_dev()`-encoded.
    pub dev: u32,
    /// `KPB_*` flags.
    pub flags: u32,
    /// Byte offset on that device of the frame's 4096 bytes.
    pub offset: u64,
}

impl Record {
    /// Decodes one record from its 16 native-endian bytes.
    pub fn parse(raw: &[u8; RECORD_BYTES]) -> Self {
        let [d0, d1, d2, d3, f0, f1, f2, f3, o @ ..] = *raw;
        Self {
            dev: u32::from_ne_bytes([d0, d1, d2, d3]),
            flags: u32::from_ne_bytes([f0, f1, f2, f3]),
            offset: u64::from_ne_bytes(o),
        }
    }

    /// Encodes the record as the kernel writes it (for tests and tools that fake the file).
    pub fn to_bytes(self) -> [u8; RECORD_BYTES] {
        let mut raw = [0u8; RECORD_BYTES];
        raw[..4].copy_from_slice(&self.dev.to_ne_bytes());
        raw[4..8].copy_from_slice(&self.flags.to_ne_bytes());
        raw[8..].copy_from_slice(&self.offset.to_ne_bytes());
        raw
    }

    /// Whether the record describes a page (only [`KPB_MAPPED`] decides).
    pub fn mapped(&self) -> bool {
        self.flags & KPB_MAPPED != 0
    }

    /// Major and minor number of the device.
    pub fn device(&self) -> (u32, u32) {
        split_dev(u64::from(self.dev))
    }
}

/// An open /proc/kpageblock (or a file in its format).
pub struct KpageblockReader {
    file: File,
    path: PathBuf,
}

impl KpageblockReader {
    /// Opens the file at `path` and reads the first record, so that a missing kernel patch or a
    /// missing capability shows here and not halfway through a scan.
    pub fn open(path: &Path) -> Result<Self, KpageblockError> {
        let path = path.to_path_buf();
        let classify = |path: &PathBuf, source: std::io::Error| match source.kind() {
            std::io::ErrorKind::NotFound => KpageblockError::Missing { path: path.clone() },
            std::io::ErrorKind::PermissionDenied => KpageblockError::Denied {
                path: path.clone(),
                source,
            },
            _ => KpageblockError::Read {
                path: path.clone(),
                source,
            },
        };
        let file = File::open(&path).map_err(|e| classify(&path, e))?;
        let reader = Self { file, path };
        let mut first = [0u8; RECORD_BYTES];
        reader
            .read_frames(0, &mut first)
            .map_err(|e| classify(&reader.path, e))?;
        Ok(reader)
    }

    /// Reads the records from frame `pfn` on into `buf`; returns the bytes read (0 past the
    /// last frame).
    pub fn read_frames(&self, pfn: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let offset = pfn
            .checked_mul(RECORD_BYTES as u64)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        loop {
            match self.file.read_at(buf, offset) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }
}

/// Whether /proc/kpageblock exists and this process can read it.
pub fn available() -> bool {
    KpageblockReader::open(Path::new(KPAGEBLOCK)).is_ok()
}

/// Gives a block device's whole disk and the device's byte offset on it.
pub type ResolveDevice = fn((u32, u32)) -> Option<((u32, u32), u64)>;

/// Gives the kpageflags words of `count` consecutive frames from `first`.
pub type PageFlags<'a> = &'a mut dyn FnMut(u64, usize) -> Result<Vec<u64>, FrameError>;

/// Where a device's records go: a disk of the scan's table and the device's byte offset on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Target {
    disk: u32,
    start_bytes: u64,
    disk_size: u64,
}

/// Maps record devices to the scan's disks: the eligible filesystems' devices and the disks
/// themselves from the [`Layout`], any other device through `resolve` (a partition of a disk
/// in the table maps to that disk, offset by the partition's start), everything else to none.
pub struct DeviceMap {
    disks: Vec<((u32, u32), u64)>,
    known: HashMap<(u32, u32), Option<Target>>,
    resolve: ResolveDevice,
}

impl DeviceMap {
    /// The map for `layout`; `resolve` gives a device's whole disk and its byte offset on it
    /// ([`crate::disks::whole_disk`] in the agent).
    pub fn new(layout: &Layout, resolve: ResolveDevice) -> Self {
        let disks: Vec<_> = layout.disks.iter().map(|d| (d.dev, d.size_bytes)).collect();
        let mut known = HashMap::new();
        for (index, (dev, size)) in disks.iter().enumerate() {
            let target = u32::try_from(index).ok().map(|disk| Target {
                disk,
                start_bytes: 0,
                disk_size: *size,
            });
            known.insert(*dev, target);
        }
        for mount in &layout.mounts {
            let target = layout.disks.get(mount.disk).and_then(|d| {
                Some(Target {
                    disk: u32::try_from(mount.disk).ok()?,
                    start_bytes: mount.start_bytes,
                    disk_size: d.size_bytes,
                })
            });
            known.insert(mount.dev, target);
        }
        Self {
            disks,
            known,
            resolve,
        }
    }

    fn lookup(&mut self, dev: (u32, u32)) -> Option<Target> {
        if let Some(target) = self.known.get(&dev) {
            return *target;
        }
        let target = (self.resolve)(dev).and_then(|(whole, start_bytes)| {
            let index = self.disks.iter().position(|(d, _)| *d == whole)?;
            Some(Target {
                disk: u32::try_from(index).ok()?,
                start_bytes,
                disk_size: self.disks.get(index)?.1,
            })
        });
        if self.known.len() < MAX_CACHED_DEVICES {
            self.known.insert(dev, target);
        }
        target
    }
}

fn exclude(summary: &mut Summary, reason: &str, pages: u64) {
    *summary.pages_excluded.entry(reason.to_owned()).or_default() += pages;
}

/// Reads every frame's record from `reader` and pushes each clean page-cache page on one of the
/// disks of `devices` into `out`, with its frame's kpageflags word (from `page_flags`, asked
/// once per chunk for the span of frames with usable records, so at worst one pass over
/// kpageflags in all) checked as the walk checks its pages. Counts into `summary`: valid
/// records as `pages_resident`, the ones not reported in `pages_excluded` by reason, ranges of
/// frames that could not be read in `files_skipped` ("kpageblock range unreadable"), and a
/// deadline that passed as `budget_exhausted`. Only the sink's error ends it early.
pub fn scan_frames<E, F: FnMut(Vec<crate::extents::CacheExtent>) -> Result<(), E>>(
    reader: &KpageblockReader,
    devices: &mut DeviceMap,
    page_flags: PageFlags<'_>,
    deadline: Option<Instant>,
    summary: &mut Summary,
    out: &mut Coalescer<F>,
) -> Result<(), E> {
    let mut buf = vec![0u8; CHUNK_FRAMES * RECORD_BYTES];
    let mut pfn = 0u64;
    let mut failures = 0;
    let mut found: Vec<(u64, u32, u64)> = Vec::new();
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            summary.budget_exhausted = true;
            break;
        }
        let bytes = match reader.read_frames(pfn, &mut buf) {
            Ok(n) => n,
            Err(_) => {
                *summary
                    .files_skipped
                    .entry("kpageblock range unreadable".to_owned())
                    .or_default() += 1;
                failures += 1;
                if failures >= MAX_READ_FAILURES {
                    break;
                }
                pfn = pfn.saturating_add(CHUNK_FRAMES as u64);
                continue;
            }
        };
        failures = 0;
        let records = bytes / RECORD_BYTES;
        if records == 0 {
            break; // past the last frame
        }
        found.clear();
        for (index, raw) in buf[..records * RECORD_BYTES]
            .chunks_exact(RECORD_BYTES)
            .enumerate()
        {
            let mut word = [0u8; RECORD_BYTES];
            word.copy_from_slice(raw);
            let record = Record::parse(&word);
            if !record.mapped() {
                continue;
            }
            summary.pages_resident += 1;
            let Some(target) = devices.lookup(record.device()) else {
                exclude(summary, "not on an eligible disk", 1);
                continue;
            };
            let Some(on_disk) = target.start_bytes.checked_add(record.offset) else {
                exclude(summary, "offset out of range", 1);
                continue;
            };
            if !on_disk.is_multiple_of(SECTOR) {
                exclude(summary, "offset not sector-aligned", 1);
                continue;
            }
            if on_disk
                .checked_add(PAGE_SIZE)
                .is_none_or(|end| end > target.disk_size)
            {
                exclude(summary, "offset out of range", 1);
                continue;
            }
            found.push((pfn + index as u64, target.disk, on_disk));
        }
        if let (Some(&(first, _, _)), Some(&(last, _, _))) = (found.first(), found.last()) {
            let span = usize::try_from(last - first + 1).unwrap_or(usize::MAX);
            match page_flags(first, span) {
                Ok(flags) if flags.len() == span => {
                    for &(frame, disk, on_disk) in &found {
                        let word = usize::try_from(frame - first)
                            .ok()
                            .and_then(|i| flags.get(i).copied());
                        match word.map(frames::unclean_reason) {
                            Some(None) => out.push(frame, disk, on_disk)?,
                            Some(Some(reason)) => exclude(summary, reason, 1),
                            None => exclude(summary, "kpageflags unreadable", 1),
                        }
                    }
                }
                _ => exclude(summary, "kpageflags unreadable", found.len() as u64),
            }
        }
        pfn += records as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;
    use crate::disks::{Disk, Mount};
    use crate::extents::CacheExtent;
    use crate::frames::flags::{DIRTY, LRU, UPTODATE};

    const VDA: (u32, u32) = (254, 0);
    const VDA1: (u32, u32) = (254, 1);
    const VDB: (u32, u32) = (254, 16);
    const VDB2: (u32, u32) = (254, 18);
    const VDC: (u32, u32) = (254, 32);
    const PART_START: u64 = 2048 * 512;

    fn encode((major, minor): (u32, u32)) -> u32 {
        // new_encode_dev(): what st_rdev holds for numbers that fit 32 bits.
        u32::try_from(libc::makedev(major, minor)).unwrap()
    }

    fn rec(dev: (u32, u32), flags: u32, offset: u64) -> Record {
        Record {
            dev: encode(dev),
            flags,
            offset,
        }
    }

    /// vda holds a filesystem directly, vdb one on partition 2 (vdb1 is known only to sysfs);
    /// vdc is not in the table.
    fn layout() -> Layout {
        let disk = |id: &str, dev| Disk {
            id: id.into(),
            dev,
            path: format!("/dev/{id}").into(),
            size_bytes: 1 << 30,
        };
        let mount = |dev, disk, start_bytes| Mount {
            mount_point: "/".into(),
            dev,
            disk,
            start_bytes,
            fs_type: "ext4".into(),
        };
        Layout {
            disks: vec![disk("vda", VDA), disk("vdb", VDB)],
            mounts: vec![mount(VDA, 0, 0), mount(VDB2, 1, 4 * PART_START)],
            skipped: Default::default(),
        }
    }

    fn sysfs(dev: (u32, u32)) -> Option<((u32, u32), u64)> {
        match dev {
            VDA1 => Some((VDA, PART_START)),
            (254, 17) => Some((VDB, PART_START)),
            VDC => Some((VDC, 0)),
            _ => None,
        }
    }

    fn write_file(records: &[(u64, Record)]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        let frames = records.iter().map(|(pfn, _)| *pfn + 1).max().unwrap_or(0);
        let mut image = vec![0u8; frames as usize * RECORD_BYTES];
        for (pfn, record) in records {
            let at = *pfn as usize * RECORD_BYTES;
            image[at..at + RECORD_BYTES].copy_from_slice(&record.to_bytes());
        }
        file.write_all(&image).unwrap();
        file.flush().unwrap();
        file
    }

    fn run(
        records: &[(u64, Record)],
        dirty: &[u64],
        deadline: Option<Instant>,
    ) -> (Vec<CacheExtent>, Summary) {
        let file = write_file(records);
        let reader = KpageblockReader::open(file.path()).unwrap();
        let mut devices = DeviceMap::new(&layout(), sysfs);
        let mut flags = |first: u64, count: usize| {
            Ok((first..first + count as u64)
                .map(|p| {
                    if dirty.contains(&p) {
                        UPTODATE | LRU | DIRTY
                    } else {
                        UPTODATE | LRU
                    }
                })
                .collect())
        };
        let mut summary = Summary::default();
        let mut extents = Vec::new();
        let mut out = Coalescer::new(2, |batch| {
            extents.extend(batch);
            Ok::<(), ()>(())
        });
        scan_frames(
            &reader,
            &mut devices,
            &mut flags,
            deadline,
            &mut summary,
            &mut out,
        )
        .unwrap();
        summary.pages_reported = out.finish().unwrap();
        (extents, summary)
    }

    fn ext(pfn: u64, pages: u64, disk: u32, offset: u64) -> CacheExtent {
        CacheExtent {
            pfn,
            pages,
            disk,
            offset,
        }
    }

    #[test]
    fn records_round_trip_in_native_endian() {
        let r = Record {
            dev: 0x0fe0_0001,
            flags: KPB_MAPPED | KPB_BDEV | 0x8000_0000,
            offset: 0x1234_5678_9abc_d000,
        };
        assert_eq!(Record::parse(&r.to_bytes()), r);
        assert!(r.mapped());
        assert!(!Record::default().mapped());
        assert!(
            !Record {
                flags: KPB_BDEV,
                ..r
            }
            .mapped()
        );
        assert_eq!(rec(VDB2, 0, 0).device(), VDB2);
        // A minor number above 255 uses the high bits of new_encode_dev().
        assert_eq!(rec((259, 70000), 0, 0).device(), (259, 70000));
    }

    #[test]
    fn contiguous_runs_coalesce_and_any_break_splits_them() {
        let m = KPB_MAPPED;
        let records = [
            // A run of three on vda.
            (10, rec(VDA, m, 0x10000)),
            (11, rec(VDA, m, 0x11000)),
            (12, rec(VDA, m | KPB_BDEV | 0x100, 0x12000)), // reserved bits: still valid
            // Frame 13 is zero: a gap in frames.
            (14, rec(VDA, m, 0x14000)),
            // Next frame, but the bytes are not the next ones.
            (15, rec(VDA, m, 0x20000)),
            // Next frame and bytes, but on another disk (vdb's partition 2).
            (16, rec(VDB2, m, 0x21000)),
            (17, rec(VDB2, m, 0x22000)),
        ];
        let (extents, summary) = run(&records, &[], None);
        let vdb2 = 4 * PART_START;
        assert_eq!(
            extents,
            vec![
                ext(10, 3, 0, 0x10000),
                ext(14, 1, 0, 0x14000),
                ext(15, 1, 0, 0x20000),
                ext(16, 2, 1, vdb2 + 0x21000),
            ]
        );
        assert_eq!(summary.pages_resident, 7);
        assert_eq!(summary.pages_reported, 7);
        assert!(summary.pages_excluded.is_empty(), "{summary:?}");
    }

    #[test]
    fn invalid_unknown_and_out_of_range_records_are_skipped_and_counted() {
        let m = KPB_MAPPED;
        let records = [
            (0, rec(VDA, KPB_BDEV, 0x1000)),      // not mapped: not a page at all
            (1, rec(VDC, m, 0x2000)),             // a disk not in the table
            (2, rec((8, 0), m, 0x3000)),          // a device sysfs does not know
            (3, rec(VDA, m, (1 << 30) - 0x800)),  // runs past the disk's end
            (4, rec(VDA, m, u64::MAX - 0xfff)),   // its end would overflow
            (5, rec(VDA, m, 0x5100)),             // not sector-aligned
            (6, rec(VDA, m, 0x6000)),             // dirty by kpageflags
            (7, rec(VDA, m, 0x7000)),             // good
            (8, rec(VDB2, m, u64::MAX - 0x1000)), // overflows with the partition start
            (9, rec(VDA1, m, 0x9000)),            // partition known only to sysfs
            (10, rec(VDA1, m, 0xa000)),           // … coalesces with the one before
            (200_000, rec(VDA, m, 0x30000)),      // beyond the first chunk
        ];
        let (extents, summary) = run(&records, &[6], None);
        assert_eq!(
            extents,
            vec![
                ext(7, 1, 0, 0x7000),
                ext(9, 2, 0, PART_START + 0x9000),
                ext(200_000, 1, 0, 0x30000),
            ]
        );
        assert_eq!(summary.pages_resident, 11);
        assert_eq!(summary.pages_reported, 4);
        let excluded = |reason: &str| summary.pages_excluded.get(reason).copied();
        assert_eq!(excluded("not on an eligible disk"), Some(2));
        assert_eq!(excluded("offset out of range"), Some(3));
        assert_eq!(excluded("offset not sector-aligned"), Some(1));
        assert_eq!(excluded("dirty"), Some(1));
        assert!(!summary.budget_exhausted);
    }

    #[test]
    fn unreadable_flags_exclude_the_chunk_and_a_past_deadline_stops() {
        let records = [(3, rec(VDA, KPB_MAPPED, 0x3000))];
        let file = write_file(&records);
        let reader = KpageblockReader::open(file.path()).unwrap();
        let mut devices = DeviceMap::new(&layout(), sysfs);
        let mut summary = Summary::default();
        let mut out = Coalescer::new(8, |_| Ok::<(), ()>(()));
        let mut broken = |_: u64, _: usize| {
            Err(FrameError::Read {
                path: "/proc/kpageflags",
                source: std::io::Error::from_raw_os_error(libc::EIO),
            })
        };
        scan_frames(
            &reader,
            &mut devices,
            &mut broken,
            None,
            &mut summary,
            &mut out,
        )
        .unwrap();
        assert_eq!(out.finish().unwrap(), 0);
        assert_eq!(
            summary.pages_excluded.get("kpageflags unreadable"),
            Some(&1)
        );

        let (extents, summary) = run(&records, &[], Some(Instant::now()));
        assert!(extents.is_empty());
        assert!(summary.budget_exhausted);
    }

    #[test]
    fn a_missing_file_says_the_kernel_lacks_the_patch() {
        let dir = tempfile::tempdir().unwrap();
        let err = KpageblockReader::open(&dir.path().join("kpageblock"))
            .err()
            .unwrap();
        assert!(matches!(err, KpageblockError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("--method walk"), "{err}");
        // An empty file is a kernel with no frames: readable, and nothing in it.
        let (extents, summary) = run(&[], &[], None);
        assert!(extents.is_empty());
        assert_eq!(summary.pages_resident, 0);
    }
}
