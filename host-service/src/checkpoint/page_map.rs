//! The page map: for every guest page, in order across the memory regions, whether it is saved
//! in the file, zero, or a reference to a drive block with the page's SHA-256.
//!
//! Pages are numbered globally: page 0 is the first page of the first region, the pages of each
//! region follow those of the region before it. The map is a sequence of runs of equal kind that
//! tiles those pages exactly, each run inside one region. Saved pages are stored in the chunks in
//! page order, so a saved run's data is found by counting the saved pages before it; the hashes
//! of disk-referenced pages follow the runs in page order likewise.
//!
//! Section encoding (little-endian): `run_count: u64`, `hashed_pages: u64`, then `run_count`
//! records of 24 bytes (`kind: u8` — 1 saved, 2 zero, 3 disk — three reserved bytes,
//! `drive: u32`, `pages: u64`, `drive_offset: u64`), then `hashed_pages` SHA-256 digests of 32
//! bytes.

use std::io::Read;

use crate::kvm::memory::MemoryLayout;

use super::error::ReadError;
use super::format::{DriveInfo, PAGE_SIZE, RESERVE_LIMIT, Section, malformed};

/// SHA-256 of one page.
pub type PageHash = [u8; 32];

/// Size of one run record.
pub const RUN_RECORD_LEN: u64 = 24;
/// Size of the page map's own header (run count and hashed-page count).
pub const PAGE_MAP_HEADER_LEN: u64 = 16;
/// Size of one page hash.
pub const HASH_LEN: u64 = 32;

const KIND_SAVED: u8 = 1;
const KIND_ZERO: u8 = 2;
const KIND_DISK: u8 = 3;

/// What a run of pages is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunKind {
    /// Stored in the chunks.
    Saved,
    /// All zero; nothing stored.
    Zero,
    /// Equal to the bytes of a drive, starting at a byte offset; page `i` of the run is at
    /// `offset + i * PAGE_SIZE`.
    Disk {
        /// Index into the file's drive table.
        drive: u32,
        /// Byte offset of the run's first page on the drive.
        offset: u64,
    },
}

/// A run of pages of one kind inside one memory region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// Global index of the first page.
    pub first_page: u64,
    /// Guest physical address of the first page.
    pub guest_addr: u64,
    /// Number of pages (at least 1).
    pub pages: u64,
    /// What the pages are.
    pub kind: RunKind,
    /// For a saved run, the index of its first page among all saved pages (its place in the
    /// chunks); for a disk run, the index of its first page's hash; 0 for a zero run.
    pub data_index: u64,
}

/// The decoded page map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageMap {
    runs: Vec<Run>,
    hashes: Vec<PageHash>,
    saved_pages: u64,
    zero_pages: u64,
}

impl PageMap {
    /// The runs in page order.
    pub fn runs(&self) -> &[Run] {
        &self.runs
    }

    /// The page hashes of a disk run of this map (empty for other runs).
    pub fn hashes(&self, run: &Run) -> &[PageHash] {
        if !matches!(run.kind, RunKind::Disk { .. }) {
            return &[];
        }
        let start = usize::try_from(run.data_index).unwrap_or(usize::MAX);
        let len = usize::try_from(run.pages).unwrap_or(usize::MAX);
        self.hashes
            .get(start..start.saturating_add(len))
            .unwrap_or(&[])
    }

    /// Pages stored in the chunks.
    pub fn saved_pages(&self) -> u64 {
        self.saved_pages
    }

    /// Pages stored as zero.
    pub fn zero_pages(&self) -> u64 {
        self.zero_pages
    }

    /// Pages referencing drive blocks.
    pub fn disk_pages(&self) -> u64 {
        self.hashes.len() as u64
    }

    /// The encoded section.
    pub fn encode(&self) -> Vec<u8> {
        let len = PAGE_MAP_HEADER_LEN as usize
            + self.runs.len() * RUN_RECORD_LEN as usize
            + self.hashes.len() * HASH_LEN as usize;
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&(self.runs.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.hashes.len() as u64).to_le_bytes());
        for run in &self.runs {
            let (kind, drive, offset) = match run.kind {
                RunKind::Saved => (KIND_SAVED, 0, 0),
                RunKind::Zero => (KIND_ZERO, 0, 0),
                RunKind::Disk { drive, offset } => (KIND_DISK, drive, offset),
            };
            out.extend_from_slice(&[kind, 0, 0, 0]);
            out.extend_from_slice(&drive.to_le_bytes());
            out.extend_from_slice(&run.pages.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
        }
        for h in &self.hashes {
            out.extend_from_slice(h);
        }
        out
    }

    /// Decodes a page map section of `section_len` bytes (its checksum already verified) from
    /// `src`, checking it against the file's layout and drives: the runs tile every page of the
    /// layout in order, none crosses a region boundary, disk runs lie inside their drive, and the
    /// hash count equals the disk-referenced page count. Memory grows only with records actually
    /// read, never with a count taken from the file.
    pub fn decode(
        src: &mut impl Read,
        section_offset: u64,
        section_len: u64,
        layout: &MemoryLayout,
        drives: &[DriveInfo],
    ) -> Result<Self, ReadError> {
        let bad = |detail: String| malformed(Section::PageMap, detail);
        let io = |source| ReadError::Io {
            offset: section_offset,
            source,
        };
        if section_len < PAGE_MAP_HEADER_LEN {
            return Err(bad(format!(
                "{section_len} bytes, too short for its header"
            )));
        }
        let mut head = [0u8; PAGE_MAP_HEADER_LEN as usize];
        src.read_exact(&mut head).map_err(io)?;
        let run_count = super::format::le_u64(&head, 0);
        let hashed = super::format::le_u64(&head, 8);
        let total_pages = layout.total_bytes() / PAGE_SIZE;
        if run_count == 0 || run_count > total_pages || hashed > total_pages {
            return Err(bad(format!(
                "{run_count} runs and {hashed} hashes for {total_pages} pages"
            )));
        }
        let expected = u128::from(PAGE_MAP_HEADER_LEN)
            + u128::from(run_count) * u128::from(RUN_RECORD_LEN)
            + u128::from(hashed) * u128::from(HASH_LEN);
        if expected != u128::from(section_len) {
            return Err(bad(format!(
                "{run_count} runs and {hashed} hashes need {expected} bytes, the section has \
                 {section_len}"
            )));
        }

        let mut map = PageMap {
            runs: Vec::with_capacity(run_count.min(RESERVE_LIMIT) as usize),
            ..PageMap::default()
        };
        let mut disk_pages: u64 = 0;
        let mut page: u64 = 0;
        let mut regions = region_pages(layout);
        let mut region = regions.next();
        let mut rec = [0u8; RUN_RECORD_LEN as usize];
        for index in 0..run_count {
            src.read_exact(&mut rec).map_err(io)?;
            let drive = super::format::le_u32(&rec, 4);
            let pages = super::format::le_u64(&rec, 8);
            let offset = super::format::le_u64(&rec, 16);
            let Some((region_first, region_addr, region_len)) = region else {
                return Err(bad(format!("run {index} lies past the last region")));
            };
            let region_end = region_first + region_len;
            if pages == 0 || pages > region_end - page {
                return Err(bad(format!(
                    "run {index} of {pages} pages at page {page} does not fit in its region \
                     (pages {region_first}..{region_end})"
                )));
            }
            let (kind, data_index) = match rec[0] {
                KIND_SAVED | KIND_ZERO if drive != 0 || offset != 0 => {
                    return Err(bad(format!(
                        "run {index}: a saved or zero run names a drive or offset"
                    )));
                }
                KIND_SAVED => {
                    let at = map.saved_pages;
                    map.saved_pages += pages;
                    (RunKind::Saved, at)
                }
                KIND_ZERO => {
                    map.zero_pages += pages;
                    (RunKind::Zero, 0)
                }
                KIND_DISK => {
                    let Some(d) = drives.get(drive as usize) else {
                        return Err(bad(format!(
                            "run {index} references drive {drive}, the file has {}",
                            drives.len()
                        )));
                    };
                    let end = pages
                        .checked_mul(PAGE_SIZE)
                        .and_then(|len| offset.checked_add(len));
                    if end.is_none_or(|end| end > d.size) {
                        return Err(bad(format!(
                            "run {index} references bytes {offset:#x} + {pages} pages of drive \
                             {drive}, which has {} bytes",
                            d.size
                        )));
                    }
                    let at = disk_pages;
                    disk_pages += pages;
                    (RunKind::Disk { drive, offset }, at)
                }
                other => return Err(bad(format!("run {index} has unknown kind {other}"))),
            };
            map.runs.push(Run {
                first_page: page,
                guest_addr: region_addr + (page - region_first) * PAGE_SIZE,
                pages,
                kind,
                data_index,
            });
            page += pages;
            if page == region_end {
                region = regions.next();
            }
        }
        if page != total_pages {
            return Err(bad(format!(
                "the runs cover {page} of the layout's {total_pages} pages"
            )));
        }
        if disk_pages != hashed {
            return Err(bad(format!(
                "{hashed} hashes for {disk_pages} disk-referenced pages"
            )));
        }
        map.hashes.reserve(hashed.min(RESERVE_LIMIT) as usize);
        let mut hash = [0u8; HASH_LEN as usize];
        for _ in 0..hashed {
            src.read_exact(&mut hash).map_err(io)?;
            map.hashes.push(hash);
        }
        Ok(map)
    }
}

/// Each region of `layout` as (global index of its first page, guest address, pages).
pub fn region_pages(layout: &MemoryLayout) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
    layout.regions.iter().scan(0u64, |first, r| {
        let pages = r.size / PAGE_SIZE;
        let item = (*first, r.guest_addr, pages);
        *first += pages;
        Some(item)
    })
}

/// Builds a page map page by page, region by region, merging neighbours of equal kind.
#[derive(Debug, Default)]
pub struct PageMapBuilder {
    map: PageMap,
    next_page: u64,
    next_addr: u64,
    region_first_run: usize,
}

impl PageMapBuilder {
    /// Starts the next region, at `guest_addr`; no run is merged across the boundary.
    pub fn begin_region(&mut self, guest_addr: u64) {
        self.next_addr = guest_addr;
        self.region_first_run = self.map.runs.len();
    }

    /// Appends `pages` pages of `kind` at the current position. For a disk run, the caller then
    /// pushes one hash per page with [`Self::push_hash`].
    pub fn push(&mut self, pages: u64, kind: RunKind) {
        if pages == 0 {
            return;
        }
        let data_index = match kind {
            RunKind::Saved => self.map.saved_pages,
            RunKind::Zero => 0,
            RunKind::Disk { .. } => self.map.hashes.len() as u64,
        };
        match kind {
            RunKind::Saved => self.map.saved_pages += pages,
            RunKind::Zero => self.map.zero_pages += pages,
            RunKind::Disk { .. } => {}
        }
        let merges = self.map.runs.len() > self.region_first_run
            && self
                .map
                .runs
                .last()
                .is_some_and(|last| match (last.kind, kind) {
                    (RunKind::Saved, RunKind::Saved) | (RunKind::Zero, RunKind::Zero) => true,
                    (
                        RunKind::Disk { drive, offset },
                        RunKind::Disk {
                            drive: d2,
                            offset: o2,
                        },
                    ) => drive == d2 && offset + last.pages * PAGE_SIZE == o2,
                    _ => false,
                });
        if merges && let Some(last) = self.map.runs.last_mut() {
            last.pages += pages;
        } else {
            self.map.runs.push(Run {
                first_page: self.next_page,
                guest_addr: self.next_addr,
                pages,
                kind,
                data_index,
            });
        }
        self.next_page += pages;
        self.next_addr += pages * PAGE_SIZE;
    }

    /// Appends the hash of the next disk-referenced page.
    pub fn push_hash(&mut self, hash: PageHash) {
        self.map.hashes.push(hash);
    }

    /// The finished map.
    pub fn finish(self) -> PageMap {
        self.map
    }
}
