//! Reading a checkpoint: [`CheckpointReader::open`] checks the whole file's structure (header,
//! version, flags, trailer, the checksum of every metadata section, the page map against the
//! layout and drives, the chunk table against the file) before handing anything out;
//! [`CheckpointReader::restore_memory`] then fills fresh guest memory from the chunks in
//! parallel, checking each chunk's checksum before any of its pages is written.
//!
//! Nothing taken from the file sizes an allocation before it is bounded: fixed-size parts are
//! read into fixed buffers, the state and layout sections have format maxima, and the page map
//! and chunk table are parsed as a stream whose memory grows only with records actually read.

use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use serde::de::DeserializeOwned;
use vm_memory::{Bytes as _, GuestAddress};

use crate::kvm::memory::{GuestMemory, MemoryLayout};

use super::disk_refs::DiskRefRun;
use super::error::ReadError;
use super::format::{
    CHUNK_RECORD_LEN, CHUNK_TABLE_HEADER_LEN, ChunkEntry, Codec, DriveInfo, HEADER_LEN, Header,
    MAGIC, MAX_LAYOUT_LEN, MAX_STATE_LEN, PAGE_SIZE, RESERVE_LIMIT, Section, SectionEntry,
    TRAILER_LEN, Trailer, VERSION, checksum, decode_layout, malformed, verify_checksum,
};
use super::page_map::{PageMap, Run, RunKind};

/// Bytes read at once while checksumming or parsing a section.
const SECTION_READ: usize = 1 << 20;

/// An open, validated checkpoint.
#[derive(Debug)]
pub struct CheckpointReader {
    file: File,
    header: Header,
    state: Vec<u8>,
    layout: MemoryLayout,
    drives: Vec<DriveInfo>,
    page_map: PageMap,
    chunks: Vec<ChunkEntry>,
    /// Saved runs only, in page order (so also in saved-page order).
    saved_runs: Vec<Run>,
}

impl CheckpointReader {
    /// Opens and validates the checkpoint at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ReadError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| ReadError::Open {
            path: path.to_owned(),
            source,
        })?;
        Self::from_file(file)
    }

    /// Validates the checkpoint in `file`: header (magic, then version, then checksum, then
    /// page size and incompatible flags), trailer (magic, checksum, file length, header
    /// binding), the placement of every section, the checksums of the state, layout, page map
    /// and chunk table, and the structure of each. Chunk checksums are checked when the chunks
    /// are read ([`Self::restore_memory`], [`Self::verify_chunks`]).
    pub fn from_file(file: File) -> Result<Self, ReadError> {
        let file_len = file
            .metadata()
            .map_err(|source| ReadError::Io { offset: 0, source })?
            .len();
        let (header, header_crc) = read_header(&file, file_len)?;
        if file_len < HEADER_LEN + TRAILER_LEN {
            return Err(ReadError::Incomplete { file_len });
        }
        let mut tb = [0u8; TRAILER_LEN as usize];
        read_at(&file, file_len - TRAILER_LEN, &mut tb)?;
        let trailer = Trailer::decode(&tb, file_len)?;
        if trailer.header_crc != header_crc {
            return Err(malformed(
                Section::Trailer,
                "the trailer belongs to a different header".into(),
            ));
        }
        check_placement(&trailer)?;
        let [state_s, layout_s, map_s, chunks_s] = trailer.sections;

        let state = read_small_section(&file, Section::State, &state_s, MAX_STATE_LEN)?;
        let layout_bytes = read_small_section(&file, Section::Layout, &layout_s, MAX_LAYOUT_LEN)?;
        let (layout, drives) = decode_layout(&layout_bytes)?;

        verify_section_crc(&file, Section::PageMap, &map_s)?;
        let page_map = PageMap::decode(
            &mut section_stream(&file, &map_s),
            map_s.offset,
            map_s.len,
            &layout,
            &drives,
        )?;

        verify_section_crc(&file, Section::ChunkTable, &chunks_s)?;
        let data_end = trailer
            .sections
            .iter()
            .map(|s| s.offset)
            .min()
            .unwrap_or(HEADER_LEN);
        let chunks = decode_chunk_table(
            &mut section_stream(&file, &chunks_s),
            &chunks_s,
            &header,
            data_end,
            page_map.saved_pages(),
        )?;
        let saved_runs = page_map
            .runs()
            .iter()
            .filter(|r| r.kind == RunKind::Saved)
            .copied()
            .collect();
        Ok(Self {
            file,
            header,
            state,
            layout,
            drives,
            page_map,
            chunks,
            saved_runs,
        })
    }

    /// The header's flags.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The VM state as the writer stored it.
    pub fn state(&self) -> &[u8] {
        &self.state
    }

    /// The VM state, parsed as JSON.
    pub fn state_json<T: DeserializeOwned>(&self) -> Result<T, ReadError> {
        serde_json::from_slice(&self.state).map_err(ReadError::State)
    }

    /// The guest memory layout the checkpoint was taken from; restore needs memory of exactly
    /// this layout.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// The drives disk-referenced pages point into.
    pub fn drives(&self) -> &[DriveInfo] {
        &self.drives
    }

    /// The page map.
    pub fn page_map(&self) -> &PageMap {
        &self.page_map
    }

    /// The chunk table.
    pub fn chunks(&self) -> &[ChunkEntry] {
        &self.chunks
    }

    /// The disk-referenced runs with their page hashes, in page order.
    pub fn disk_refs(&self) -> Vec<DiskRefRun> {
        self.page_map
            .runs()
            .iter()
            .filter_map(|run| match run.kind {
                RunKind::Disk { drive, offset } => Some(DiskRefRun {
                    guest_addr: run.guest_addr,
                    pages: run.pages,
                    drive,
                    drive_offset: offset,
                    hashes: self.page_map.hashes(run).to_vec(),
                }),
                _ => None,
            })
            .collect()
    }

    /// Fills `memory` from the saved pages, reading and decompressing chunks on `threads`
    /// threads (0 counts as 1) in file order, and returns the disk-referenced runs for the
    /// caller to fill ([`super::fill_disk_refs`]).
    ///
    /// `memory` must have the checkpoint's layout and be fresh (all zero, as newly mapped
    /// anonymous memory is): zero pages are not written. Each chunk's checksum is checked
    /// before its pages are written, but on an error earlier chunks are already in memory:
    /// discard it. Writes go through guest memory, so they mark the VMM's dirty bitmap like
    /// any device write; reset tracking before arming it.
    pub fn restore_memory(
        &self,
        memory: &GuestMemory,
        threads: usize,
    ) -> Result<Vec<DiskRefRun>, ReadError> {
        let target = MemoryLayout::of(memory);
        if target != self.layout {
            return Err(ReadError::LayoutMismatch {
                file: describe(&self.layout),
                target: describe(&target),
            });
        }
        self.for_each_chunk(threads, |first_saved, data| {
            self.place(memory, first_saved, data)
        })?;
        Ok(self.disk_refs())
    }

    /// Reads, checksums and decompresses every chunk without writing anything: a full check
    /// of the file on `threads` threads.
    pub fn verify_chunks(&self, threads: usize) -> Result<(), ReadError> {
        self.for_each_chunk(threads, |_, _| Ok(()))
    }

    /// Writes the decoded pages of a chunk, whose first page is saved page `first_saved`, to
    /// their guest addresses.
    fn place(&self, memory: &GuestMemory, first_saved: u64, data: &[u8]) -> Result<(), ReadError> {
        let mut saved = first_saved;
        let mut rest = data;
        // The run holding saved page `saved`: the last one starting at or before it.
        let mut idx = self
            .saved_runs
            .partition_point(|r| r.data_index <= saved)
            .saturating_sub(1);
        while !rest.is_empty() {
            let Some(run) = self.saved_runs.get(idx) else {
                // open() checked that the chunks hold exactly the saved pages.
                return Err(malformed(
                    Section::ChunkTable,
                    format!("saved page {saved} is in no saved run"),
                ));
            };
            let skip = saved - run.data_index;
            let pages = (run.pages - skip).min(rest.len() as u64 / PAGE_SIZE);
            let (now, later) = rest.split_at((pages * PAGE_SIZE) as usize);
            let guest_addr = run.guest_addr + skip * PAGE_SIZE;
            memory
                .write_slice(now, GuestAddress(guest_addr))
                .map_err(|source| ReadError::Memory { guest_addr, source })?;
            saved += pages;
            rest = later;
            idx += 1;
        }
        Ok(())
    }

    /// Runs `f` on every chunk's decoded pages (with the index of its first saved page) on
    /// up to `threads` threads taking chunks in file order. Stops at the first error and
    /// reports the one of the lowest chunk.
    fn for_each_chunk(
        &self,
        threads: usize,
        f: impl Fn(u64, &[u8]) -> Result<(), ReadError> + Sync,
    ) -> Result<(), ReadError> {
        let mut first_saved = Vec::with_capacity(self.chunks.len());
        let mut total = 0u64;
        for c in &self.chunks {
            first_saved.push(total);
            total += u64::from(c.pages);
        }
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let error: Mutex<Option<(usize, ReadError)>> = Mutex::new(None);
        let threads = threads.clamp(1, self.chunks.len().max(1));
        let work = || {
            let mut buffers = ChunkBuffers::default();
            while !failed.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let (Some(entry), Some(&first)) = (self.chunks.get(i), first_saved.get(i)) else {
                    break;
                };
                let result = buffers
                    .load(&self.file, i as u64, entry)
                    .and_then(|data| f(first, data));
                if let Err(e) = result {
                    failed.store(true, Ordering::Relaxed);
                    let mut slot = error.lock().unwrap_or_else(|p| p.into_inner());
                    if slot.as_ref().is_none_or(|(j, _)| i < *j) {
                        *slot = Some((i, e));
                    }
                }
            }
        };
        let panicked = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads).map(|_| s.spawn(work)).collect();
            handles.into_iter().any(|h| h.join().is_err())
        });
        if panicked {
            return Err(ReadError::WorkerPanicked);
        }
        match error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }
}

/// One thread's reusable chunk buffers and decompressor.
#[derive(Default)]
struct ChunkBuffers {
    stored: Vec<u8>,
    raw: Vec<u8>,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
}

impl ChunkBuffers {
    /// Reads chunk `index`, checks its checksum and returns its decoded pages.
    fn load(&mut self, file: &File, index: u64, entry: &ChunkEntry) -> Result<&[u8], ReadError> {
        // Both lengths were bounded by MAX_CHUNK_PAGES when the table was read.
        self.stored.resize(entry.stored_len as usize, 0);
        read_at(file, entry.offset, &mut self.stored)?;
        verify_checksum(Section::Chunk(index), entry.crc, checksum(&self.stored))?;
        match entry.codec {
            Codec::None => Ok(&self.stored),
            Codec::Zstd => {
                let d = match &mut self.decompressor {
                    Some(d) => d,
                    None => self
                        .decompressor
                        .insert(zstd::bulk::Decompressor::new().map_err(|source| {
                            ReadError::Decompress {
                                chunk: index,
                                source,
                            }
                        })?),
                };
                let raw_len = entry.raw_len();
                self.raw.clear();
                self.raw.reserve(raw_len);
                let n = d
                    .decompress_to_buffer(&self.stored[..], &mut self.raw)
                    .map_err(|source| ReadError::Decompress {
                        chunk: index,
                        source,
                    })?;
                if n != raw_len {
                    return Err(malformed(
                        Section::Chunk(index),
                        format!("decompresses to {n} bytes, expected {raw_len}"),
                    ));
                }
                Ok(&self.raw)
            }
        }
    }
}

/// Reads and checks the header; returns it with its checksum.
fn read_header(file: &File, file_len: u64) -> Result<(Header, u32), ReadError> {
    let mut hb = [0u8; HEADER_LEN as usize];
    let have = file_len.min(HEADER_LEN) as usize;
    read_at(file, 0, &mut hb[..have])?;
    if have < MAGIC.len() || hb[..MAGIC.len()] != MAGIC {
        return Err(ReadError::NotACheckpoint);
    }
    if have >= 12 {
        let version = u32::from_le_bytes([hb[8], hb[9], hb[10], hb[11]]);
        if version != VERSION {
            return Err(ReadError::UnsupportedVersion { version });
        }
    }
    if (have as u64) < HEADER_LEN {
        return Err(ReadError::Truncated {
            section: Section::Header,
            needed: HEADER_LEN,
            file_len,
        });
    }
    Header::decode(&hb)
}

/// Checks that every section lies between the header and the trailer and that no two overlap.
fn check_placement(trailer: &Trailer) -> Result<(), ReadError> {
    let body_end = trailer.file_len - TRAILER_LEN;
    let mut placed: Vec<(Section, SectionEntry)> = Section::DIRECTORY
        .into_iter()
        .zip(trailer.sections)
        .collect();
    for (section, s) in &placed {
        let end = s.offset.checked_add(s.len);
        if s.offset < HEADER_LEN || end.is_none_or(|end| end > body_end) {
            return Err(malformed(
                Section::Trailer,
                format!(
                    "the {section} at offset {} of {} bytes lies outside the file body \
                     ({HEADER_LEN}..{body_end})",
                    s.offset, s.len
                ),
            ));
        }
    }
    placed.sort_by_key(|(_, s)| s.offset);
    for pair in placed.windows(2) {
        let [(a, sa), (b, sb)] = pair else { continue };
        if sa.end() > sb.offset {
            return Err(malformed(
                Section::Trailer,
                format!("the {a} overlaps the {b}"),
            ));
        }
    }
    Ok(())
}

/// Reads a section whose size has a format maximum into memory and checks its checksum.
fn read_small_section(
    file: &File,
    section: Section,
    s: &SectionEntry,
    max: u64,
) -> Result<Vec<u8>, ReadError> {
    if s.len > max {
        return Err(malformed(
            section,
            format!("{} bytes, more than the {max} allowed", s.len),
        ));
    }
    let mut bytes = vec![0u8; s.len as usize];
    read_at(file, s.offset, &mut bytes)?;
    verify_checksum(section, s.crc, checksum(&bytes))?;
    Ok(bytes)
}

/// Checks the checksum of a section of any size by streaming through it, so that a damaged
/// section is reported as such before its contents are interpreted.
fn verify_section_crc(file: &File, section: Section, s: &SectionEntry) -> Result<(), ReadError> {
    let mut buf = vec![0u8; SECTION_READ.min(s.len as usize)];
    let mut crc = 0u32;
    let mut at = s.offset;
    while at < s.end() {
        let n = (s.end() - at).min(buf.len() as u64) as usize;
        read_at(file, at, &mut buf[..n])?;
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        at += n as u64;
    }
    verify_checksum(section, s.crc, crc)
}

/// Decodes the chunk table: count, then records that each pass [`ChunkEntry::decode`], lie in
/// file order without overlap in the data area (after the header, before the first section),
/// and hold exactly the page map's saved pages.
fn decode_chunk_table(
    src: &mut impl Read,
    s: &SectionEntry,
    header: &Header,
    data_end: u64,
    saved_pages: u64,
) -> Result<Vec<ChunkEntry>, ReadError> {
    let bad = |detail: String| malformed(Section::ChunkTable, detail);
    let io = |source| ReadError::Io {
        offset: s.offset,
        source,
    };
    if s.len < CHUNK_TABLE_HEADER_LEN {
        return Err(bad(format!("{} bytes, too short for its header", s.len)));
    }
    let mut cb = [0u8; CHUNK_TABLE_HEADER_LEN as usize];
    src.read_exact(&mut cb).map_err(io)?;
    let count = u64::from_le_bytes(cb);
    if count > saved_pages {
        return Err(bad(format!("{count} chunks for {saved_pages} saved pages")));
    }
    let expected =
        u128::from(CHUNK_TABLE_HEADER_LEN) + u128::from(count) * u128::from(CHUNK_RECORD_LEN);
    if expected != u128::from(s.len) {
        return Err(bad(format!(
            "{count} chunks need {expected} bytes, the section has {}",
            s.len
        )));
    }
    let mut chunks = Vec::with_capacity(count.min(RESERVE_LIMIT) as usize);
    let mut prev_end = HEADER_LEN;
    let mut pages = 0u64;
    let mut rec = [0u8; CHUNK_RECORD_LEN as usize];
    for index in 0..count {
        src.read_exact(&mut rec).map_err(io)?;
        let c = ChunkEntry::decode(&rec, index, header)?;
        let end = c.offset.checked_add(u64::from(c.stored_len));
        if c.offset < prev_end || end.is_none_or(|end| end > data_end) {
            return Err(bad(format!(
                "chunk {index} at offset {} of {} bytes is out of order or outside the data \
                 area ({prev_end}..{data_end})",
                c.offset, c.stored_len
            )));
        }
        prev_end = c.offset + u64::from(c.stored_len);
        pages += u64::from(c.pages);
        chunks.push(c);
    }
    if pages != saved_pages {
        return Err(bad(format!(
            "the chunks hold {pages} pages, the page map saves {saved_pages}"
        )));
    }
    Ok(chunks)
}

/// A buffered reader over one section's bytes.
fn section_stream<'f>(file: &'f File, s: &SectionEntry) -> BufReader<SectionRead<'f>> {
    BufReader::with_capacity(
        SECTION_READ.min(s.len.max(1) as usize),
        SectionRead {
            file,
            at: s.offset,
            end: s.end(),
        },
    )
}

/// Positional reads of `at..end` of a file.
struct SectionRead<'f> {
    file: &'f File,
    at: u64,
    end: u64,
}

impl Read for SectionRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.end - self.at).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        let got = self.file.read_at(&mut buf[..n], self.at)?;
        self.at += got as u64;
        Ok(got)
    }
}

/// Reads exactly `buf.len()` bytes at `offset`. Callers have checked the range against the
/// file's length, so running out means the file shrank meanwhile.
fn read_at(file: &File, offset: u64, buf: &mut [u8]) -> Result<(), ReadError> {
    file.read_exact_at(buf, offset)
        .map_err(|source| ReadError::Io { offset, source })
}

/// A layout as `[start+size, …]` in hex, for errors.
fn describe(layout: &MemoryLayout) -> String {
    let regions: Vec<String> = layout
        .regions
        .iter()
        .map(|r| format!("{:#x}+{:#x}", r.guest_addr, r.size))
        .collect();
    format!("[{}]", regions.join(", "))
}
