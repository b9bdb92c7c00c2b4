//! Writing a checkpoint: pages streamed from guest memory into independent chunks (optionally
//! zstd-compressed by a small pool of threads), zero pages detected and left out, pages the
//! caller classified as free or as drive blocks recorded without their bytes, then the state,
//! layout, page map, chunk table and — last — the trailer; the file gets its final name only
//! once all of it is durable ([`super::durable`]).
//!
//! One thread walks guest memory and fills chunk buffers, `threads` workers compress and
//! checksum them, and one thread writes them in order through a large buffer; a fixed pool of
//! chunk buffers bounds the memory in flight and makes the walk wait for a slow disk.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2::{Digest, Sha256};
use vm_memory::{Bytes as _, GuestAddress};

use crate::kvm::memory::{GuestMemory, MemoryLayout};

use super::durable::PendingFile;
use super::error::WriteError;
use super::format::{
    ChunkEntry, Codec, DriveInfo, HEADER_LEN, Header, INCOMPAT_ZSTD, MAX_CHUNK_PAGES,
    MAX_STATE_LEN, PAGE_SIZE, SectionEntry, TRAILER_LEN, Trailer, check_drives, check_layout,
    checksum, encode_layout,
};
use super::page_map::{PageHash, PageMap, PageMapBuilder, RunKind};

/// Size of the buffer between the chunk writer and the file.
const WRITE_BUFFER: usize = 8 << 20;
/// Disk-referenced pages read and hashed at once.
const HASH_BATCH_PAGES: u64 = 64;
const PAGE: usize = PAGE_SIZE as usize;

/// How to write a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteOptions {
    /// zstd level for the chunks (1 is fast, 3 is zstd's default), or `None` to store pages raw.
    pub compression: Option<i32>,
    /// Threads that compress and checksum chunks (0 counts as 1), besides the thread walking
    /// memory and the one writing the file.
    pub threads: usize,
    /// Saved pages per chunk, 1 to [`MAX_CHUNK_PAGES`]; each chunk is compressed and can be
    /// restored on its own.
    pub chunk_pages: u32,
}

impl Default for WriteOptions {
    /// zstd level 1 with two threads in 1 MiB chunks (see `benches/checkpoint_file.rs`).
    fn default() -> Self {
        Self {
            compression: Some(1),
            threads: 2,
            chunk_pages: 256,
        }
    }
}

/// What the caller knows about a run of guest frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageClass {
    /// The guest does not use these pages: stored as zero without reading them.
    Free,
    /// The pages equal the bytes of drive `drive` (an index into the drive table given to
    /// [`CheckpointWriter::write_memory`]) from byte `offset` on. The writer records the
    /// reference and each page's SHA-256, taken from guest memory, for restore to check.
    Disk {
        /// Index of the drive.
        drive: u32,
        /// Byte offset of the first page on the drive.
        offset: u64,
    },
}

/// A run of guest frames the caller classified; every page not in one is saved, or stored as
/// zero if it is all zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageExtent {
    /// Guest frame number (guest physical address / 4096) of the first page.
    pub first_frame: u64,
    /// Number of pages (at least 1).
    pub pages: u64,
    /// What they are.
    pub class: PageClass,
}

/// SHA-256 hashes of pages by guest frame number, computed ahead of the write.
pub type PageHashes = std::collections::HashMap<u64, PageHash>;

/// What a finished checkpoint holds and what writing it cost.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Length of the file.
    pub file_bytes: u64,
    /// Pages stored in chunks.
    pub pages_saved: u64,
    /// Pages found all zero and stored as zero.
    pub pages_zero: u64,
    /// Pages the caller declared free, stored as zero.
    pub pages_free: u64,
    /// Pages stored as drive references.
    pub pages_disk: u64,
    /// Number of chunks.
    pub chunks: u64,
    /// Bytes of the saved pages before compression.
    pub raw_bytes: u64,
    /// Bytes the chunks take in the file.
    pub stored_bytes: u64,
    /// Time from [`CheckpointWriter::create`] to the file being in place.
    pub elapsed: Duration,
}

/// The result of writing guest memory, kept until the state arrives.
#[derive(Debug)]
struct MemoryPart {
    layout: MemoryLayout,
    drives: Vec<DriveInfo>,
    page_map: PageMap,
    chunks: Vec<ChunkEntry>,
    /// Offset just past the last chunk.
    data_end: u64,
}

/// A checkpoint being written. Call [`Self::write_memory`] then [`Self::finish`]; a writer
/// dropped before `finish` returns leaves nothing behind at the final path (nor, where it can be
/// removed, under a temporary name).
#[derive(Debug)]
pub struct CheckpointWriter {
    file: PendingFile,
    options: WriteOptions,
    header: Header,
    started: Instant,
    stats: WriteStats,
    memory: Option<MemoryPart>,
}

impl CheckpointWriter {
    /// Starts a checkpoint for `path` (its directory must exist) and writes its header.
    pub fn create(path: impl AsRef<Path>, options: WriteOptions) -> Result<Self, WriteError> {
        let started = Instant::now();
        if options.chunk_pages == 0 || options.chunk_pages > MAX_CHUNK_PAGES {
            return Err(WriteError::Options(format!(
                "{} pages per chunk, need 1..={MAX_CHUNK_PAGES}",
                options.chunk_pages
            )));
        }
        if let Some(level) = options.compression {
            let range = zstd::compression_level_range();
            if !range.contains(&level) {
                return Err(WriteError::Options(format!(
                    "zstd level {level} outside {}..={}",
                    range.start(),
                    range.end()
                )));
            }
        }
        let file = PendingFile::create(path.as_ref())?;
        let header = Header {
            incompat_flags: if options.compression.is_some() {
                INCOMPAT_ZSTD
            } else {
                0
            },
            compat_flags: 0,
        };
        let mut f = file.file();
        f.write_all(&header.encode())
            .map_err(|e| io_error("writing", file.path(), e))?;
        Ok(Self {
            file,
            options,
            header,
            started,
            stats: WriteStats::default(),
            memory: None,
        })
    }

    /// Writes every page of `memory` (which must not change meanwhile: the VM is paused).
    /// `drives` is the drive table disk extents index into; `extents` classify pages as free or
    /// as drive blocks (any order, not overlapping, inside guest memory and their drive).
    pub fn write_memory(
        &mut self,
        memory: &GuestMemory,
        drives: &[DriveInfo],
        extents: &[PageExtent],
    ) -> Result<(), WriteError> {
        self.write_memory_hashed(memory, drives, extents, &PageHashes::new())
    }

    /// [`write_memory`](Self::write_memory), taking the SHA-256 of a disk-referenced page from
    /// `hashes` (by guest frame) when it is there instead of hashing the page now. The caller
    /// vouches that each such hash is of the page's bytes as they are: a VMM hashes pages while
    /// the guest still runs and hands on only those its dirty log shows unwritten since.
    pub fn write_memory_hashed(
        &mut self,
        memory: &GuestMemory,
        drives: &[DriveInfo],
        extents: &[PageExtent],
        hashes: &PageHashes,
    ) -> Result<(), WriteError> {
        if self.memory.is_some() {
            return Err(WriteError::Sequence("guest memory was already written"));
        }
        let layout = MemoryLayout::of(memory);
        check_layout(&layout).map_err(WriteError::Layout)?;
        check_drives(drives).map_err(WriteError::Drives)?;
        let extents = sorted_extents(&layout, drives, extents)?;
        let pool = 2 * self.options.threads.max(1) + 2;
        let chunk_bytes = self.options.chunk_pages as usize * PAGE;

        let (free_tx, free_rx) = sync_channel::<ChunkBuf>(pool);
        for _ in 0..pool {
            // The receiver is alive: filling the pool cannot fail.
            let _ = free_tx.send(ChunkBuf::with_capacity(chunk_bytes));
        }
        let (work_tx, work_rx) = sync_channel::<ChunkBuf>(pool);
        let work_rx = Arc::new(Mutex::new(work_rx));
        let (done_tx, done_rx) = sync_channel::<ChunkBuf>(pool);

        let file = self.file.file();
        let path = self.file.path();
        let (walked, written) = std::thread::scope(|s| {
            let writer = s.spawn(move || write_chunks(file, path, done_rx, free_tx));
            let workers: Vec<_> = (0..self.options.threads.max(1))
                .map(|_| {
                    let rx = Arc::clone(&work_rx);
                    let tx = done_tx.clone();
                    let level = self.options.compression;
                    s.spawn(move || encode_chunks(level, &rx, &tx))
                })
                .collect();
            drop(done_tx);
            let walker = Walker {
                memory,
                chunk_pages: self.options.chunk_pages,
                free: free_rx,
                work: work_tx,
                builder: PageMapBuilder::default(),
                stats: WriteStats::default(),
                seq: 0,
                hashes,
            };
            let walked = walker.walk(&layout, &extents);
            let mut worker_error = None;
            for w in workers {
                let result = w.join().unwrap_or(Err(WriteError::WorkerPanicked));
                if let Err(e) = result {
                    worker_error.get_or_insert(e);
                }
            }
            let written = writer.join().unwrap_or(Err(WriteError::WorkerPanicked));
            (walked, worker_error.map_or(written, Err))
        });
        // A worker's or the writer's error is the cause when the walk stopped because the
        // pipeline broke, so it goes first.
        let written = written?;
        let (page_map, stats) = walked?;
        self.stats = WriteStats {
            chunks: written.chunks.len() as u64,
            stored_bytes: written.stored_bytes,
            raw_bytes: stats.pages_saved * PAGE_SIZE,
            ..stats
        };
        self.memory = Some(MemoryPart {
            layout,
            drives: drives.to_vec(),
            page_map,
            chunks: written.chunks,
            data_end: written.data_end,
        });
        Ok(())
    }

    /// Writes the VM state (opaque bytes; `ditto-vmm` stores JSON), the layout, page map,
    /// chunk table and trailer, makes the file durable and renames it into place.
    pub fn finish(self, state: &[u8]) -> Result<WriteStats, WriteError> {
        let Some(memory) = &self.memory else {
            return Err(WriteError::Sequence("finish called before write_memory"));
        };
        if state.len() as u64 > MAX_STATE_LEN {
            return Err(WriteError::StateTooLarge { len: state.len() });
        }
        let layout = encode_layout(&memory.layout, &memory.drives);
        let page_map = memory.page_map.encode();
        let mut chunk_table = Vec::with_capacity(8 + memory.chunks.len() * 24);
        chunk_table.extend_from_slice(&(memory.chunks.len() as u64).to_le_bytes());
        for c in &memory.chunks {
            c.encode(&mut chunk_table);
        }
        let bodies: [&[u8]; 4] = [state, &layout, &page_map, &chunk_table];
        let mut sections = [SectionEntry::default(); 4];
        let mut offset = memory.data_end;
        for (entry, body) in sections.iter_mut().zip(bodies) {
            *entry = SectionEntry {
                offset,
                len: body.len() as u64,
                crc: checksum(body),
            };
            offset += body.len() as u64;
        }
        let file_len = offset + TRAILER_LEN;
        let trailer = Trailer {
            file_len,
            header_crc: self.header.crc(),
            sections,
        };
        let path = self.file.path();
        let mut out = BufWriter::with_capacity(WRITE_BUFFER, self.file.file());
        for body in bodies {
            out.write_all(body)
                .map_err(|e| io_error("writing", path, e))?;
        }
        out.write_all(&trailer.encode())
            .map_err(|e| io_error("writing", path, e))?;
        out.flush().map_err(|e| io_error("writing", path, e))?;
        drop(out);
        let mut stats = self.stats.clone();
        self.file.persist()?;
        stats.file_bytes = file_len;
        stats.elapsed = self.started.elapsed();
        Ok(stats)
    }

    /// [`Self::finish`] with the state serialised as JSON.
    pub fn finish_json<T: Serialize>(self, state: &T) -> Result<WriteStats, WriteError> {
        let bytes = serde_json::to_vec(state).map_err(WriteError::State)?;
        self.finish(&bytes)
    }
}

/// Checks the caller's extents against memory and drives; returns them sorted by frame.
fn sorted_extents(
    layout: &MemoryLayout,
    drives: &[DriveInfo],
    extents: &[PageExtent],
) -> Result<Vec<(usize, PageExtent)>, WriteError> {
    let bad = |index: usize, detail: String| WriteError::Extent { index, detail };
    for (index, e) in extents.iter().enumerate() {
        let end = e
            .first_frame
            .checked_add(e.pages)
            .filter(|&end| e.pages > 0 && end <= u64::MAX / PAGE_SIZE)
            .ok_or_else(|| {
                bad(
                    index,
                    format!("{} pages at frame {:#x}", e.pages, e.first_frame),
                )
            })?;
        if !covered_by_memory(layout, e.first_frame, end) {
            return Err(bad(
                index,
                format!(
                    "frames {:#x}..{end:#x} are not all guest RAM",
                    e.first_frame
                ),
            ));
        }
        if let PageClass::Disk { drive, offset } = e.class {
            let Some(d) = drives.get(drive as usize) else {
                return Err(bad(
                    index,
                    format!("drive {drive} is not in the table of {}", drives.len()),
                ));
            };
            let fits = e
                .pages
                .checked_mul(PAGE_SIZE)
                .and_then(|len| offset.checked_add(len))
                .is_some_and(|end| end <= d.size);
            if !fits {
                return Err(bad(
                    index,
                    format!(
                        "bytes {offset:#x} + {} pages are beyond drive {drive} ({:?}, {} bytes)",
                        e.pages, d.id, d.size
                    ),
                ));
            }
        }
    }
    let mut sorted: Vec<(usize, PageExtent)> = extents.iter().copied().enumerate().collect();
    sorted.sort_by_key(|(_, e)| e.first_frame);
    for pair in sorted.windows(2) {
        let [(ia, a), (ib, b)] = pair else { continue };
        if b.first_frame < a.first_frame + a.pages {
            return Err(bad(*ib, format!("overlaps extent {ia}")));
        }
    }
    Ok(sorted)
}

/// Whether frames `first..end` all lie in guest RAM (possibly across adjacent regions).
fn covered_by_memory(layout: &MemoryLayout, first: u64, end: u64) -> bool {
    let mut next = first;
    for r in &layout.regions {
        let (start, stop) = (
            r.guest_addr / PAGE_SIZE,
            (r.guest_addr + r.size) / PAGE_SIZE,
        );
        if start <= next && next < stop {
            next = stop;
            if next >= end {
                return true;
            }
        }
    }
    false
}

/// A chunk on its way through the pipeline; buffers are reused.
struct ChunkBuf {
    seq: u64,
    pages: u32,
    raw: Vec<u8>,
    out: Vec<u8>,
    codec: Codec,
    crc: u32,
}

impl ChunkBuf {
    fn with_capacity(bytes: usize) -> Self {
        Self {
            seq: 0,
            pages: 0,
            raw: Vec::with_capacity(bytes),
            out: Vec::with_capacity(bytes),
            codec: Codec::None,
            crc: 0,
        }
    }

    fn stored(&self) -> &[u8] {
        match self.codec {
            Codec::None => &self.raw,
            Codec::Zstd => &self.out,
        }
    }
}

/// Walks guest memory in page order, building the page map and filling chunks.
struct Walker<'m> {
    memory: &'m GuestMemory,
    chunk_pages: u32,
    free: Receiver<ChunkBuf>,
    work: SyncSender<ChunkBuf>,
    builder: PageMapBuilder,
    stats: WriteStats,
    seq: u64,
    hashes: &'m PageHashes,
}

/// The walk stopped because the writing side is gone; its own error says why.
fn pipeline_gone() -> WriteError {
    WriteError::Sequence("the chunk pipeline stopped")
}

impl Walker<'_> {
    fn walk(
        mut self,
        layout: &MemoryLayout,
        extents: &[(usize, PageExtent)],
    ) -> Result<(PageMap, WriteStats), WriteError> {
        let mut chunk = self.free.recv().map_err(|_| pipeline_gone())?;
        let mut ext = extents.iter().map(|(_, e)| e).peekable();
        let mut scratch = vec![0u8; HASH_BATCH_PAGES as usize * PAGE];
        for region in &layout.regions {
            self.builder.begin_region(region.guest_addr);
            let mut frame = region.guest_addr / PAGE_SIZE;
            let end = frame + region.size / PAGE_SIZE;
            while frame < end {
                while ext.next_if(|e| e.first_frame + e.pages <= frame).is_some() {}
                match ext.peek() {
                    Some(e) if e.first_frame <= frame => {
                        let n = (e.first_frame + e.pages).min(end) - frame;
                        match e.class {
                            PageClass::Free => {
                                self.builder.push(n, RunKind::Zero);
                                self.stats.pages_free += n;
                            }
                            PageClass::Disk { drive, offset } => {
                                let offset = offset + (frame - e.first_frame) * PAGE_SIZE;
                                self.hash_pages(frame, n, drive, offset, &mut scratch)?;
                            }
                        }
                        frame += n;
                    }
                    next => {
                        let stop = next.map_or(end, |e| e.first_frame.min(end));
                        for f in frame..stop {
                            chunk = self.scan_page(f, chunk)?;
                        }
                        frame = stop;
                    }
                }
            }
        }
        if chunk.pages > 0 {
            self.send(chunk)?;
        }
        Ok((self.builder.finish(), self.stats))
    }

    /// Reads one page not classified by the caller into the chunk; a zero page is dropped again
    /// and recorded as zero. Sends the chunk on when full and returns the one to fill next.
    fn scan_page(&mut self, frame: u64, mut chunk: ChunkBuf) -> Result<ChunkBuf, WriteError> {
        let at = chunk.raw.len();
        chunk.raw.resize(at + PAGE, 0);
        let guest_addr = frame * PAGE_SIZE;
        self.memory
            .read_slice(&mut chunk.raw[at..], GuestAddress(guest_addr))
            .map_err(|source| WriteError::Memory { guest_addr, source })?;
        if is_zero(&chunk.raw[at..]) {
            chunk.raw.truncate(at);
            self.builder.push(1, RunKind::Zero);
            self.stats.pages_zero += 1;
            return Ok(chunk);
        }
        self.builder.push(1, RunKind::Saved);
        self.stats.pages_saved += 1;
        chunk.pages += 1;
        if chunk.pages < self.chunk_pages {
            return Ok(chunk);
        }
        self.send(chunk)?;
        self.free.recv().map_err(|_| pipeline_gone())
    }

    fn send(&mut self, mut chunk: ChunkBuf) -> Result<(), WriteError> {
        chunk.seq = self.seq;
        self.seq += 1;
        self.work.send(chunk).map_err(|_| pipeline_gone())
    }

    /// Records `pages` disk-referenced pages from `frame` with each page's SHA-256.
    fn hash_pages(
        &mut self,
        frame: u64,
        pages: u64,
        drive: u32,
        offset: u64,
        scratch: &mut [u8],
    ) -> Result<(), WriteError> {
        self.builder.push(pages, RunKind::Disk { drive, offset });
        self.stats.pages_disk += pages;
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(HASH_BATCH_PAGES);
            let first = frame + done;
            let known: Option<Vec<PageHash>> = (first..first + n)
                .map(|gfn| self.hashes.get(&gfn).copied())
                .collect();
            if let Some(known) = known {
                // Hashed ahead: the pages need not be read again.
                for hash in known {
                    self.builder.push_hash(hash);
                }
                done += n;
                continue;
            }
            let buf = &mut scratch[..n as usize * PAGE];
            let guest_addr = first * PAGE_SIZE;
            self.memory
                .read_slice(buf, GuestAddress(guest_addr))
                .map_err(|source| WriteError::Memory { guest_addr, source })?;
            for (i, page) in buf.chunks_exact(PAGE).enumerate() {
                let hash = match self.hashes.get(&(first + i as u64)) {
                    Some(h) => *h,
                    None => Sha256::digest(page).into(),
                };
                self.builder.push_hash(hash);
            }
            done += n;
        }
        Ok(())
    }
}

/// Whether a page is all zero. Reads 64 bytes at a time and stops at the first nonzero block,
/// so data pages cost a few bytes and zero pages one pass at memory speed.
pub fn is_zero(bytes: &[u8]) -> bool {
    let (blocks, tail) = bytes.as_chunks::<64>();
    blocks.iter().all(|block| {
        let (words, _) = block.as_chunks::<8>();
        words
            .iter()
            .fold(0u64, |acc, w| acc | u64::from_ne_bytes(*w))
            == 0
    }) && tail.iter().all(|&b| b == 0)
}

/// A worker: compresses (when `level` is set) and checksums chunks until the walk ends. A chunk
/// that zstd does not shrink is stored raw. Returns an error only if the compressor cannot be
/// made, after which it checksums raw chunks like the uncompressed path.
fn encode_chunks(
    level: Option<i32>,
    work: &Mutex<Receiver<ChunkBuf>>,
    done: &SyncSender<ChunkBuf>,
) -> Result<(), WriteError> {
    let mut compressor = match level {
        Some(level) => Some(zstd::bulk::Compressor::new(level).map_err(WriteError::Compressor)?),
        None => None,
    };
    loop {
        let next = work.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok(mut chunk) = next else {
            return Ok(());
        };
        chunk.codec = Codec::None;
        if let Some(c) = compressor.as_mut() {
            chunk.out.clear();
            chunk.out.reserve(chunk.raw.len());
            if let Ok(n) = c.compress_to_buffer(&chunk.raw[..], &mut chunk.out)
                && n < chunk.raw.len()
            {
                chunk.codec = Codec::Zstd;
            }
        }
        chunk.crc = checksum(chunk.stored());
        if done.send(chunk).is_err() {
            return Ok(());
        }
    }
}

/// What the chunk writer produced.
struct Written {
    chunks: Vec<ChunkEntry>,
    data_end: u64,
    stored_bytes: u64,
}

/// The writer thread: writes encoded chunks in sequence order right after the header and hands
/// their buffers back to the walk.
fn write_chunks(
    file: &File,
    path: &Path,
    done: Receiver<ChunkBuf>,
    free: SyncSender<ChunkBuf>,
) -> Result<Written, WriteError> {
    let mut out = BufWriter::with_capacity(WRITE_BUFFER, file);
    let mut pending = BTreeMap::new();
    let mut written = Written {
        chunks: Vec::new(),
        data_end: HEADER_LEN,
        stored_bytes: 0,
    };
    for chunk in done {
        pending.insert(chunk.seq, chunk);
        while let Some(mut chunk) = pending.remove(&(written.chunks.len() as u64)) {
            let stored = chunk.stored();
            out.write_all(stored)
                .map_err(|e| io_error("writing", path, e))?;
            written.chunks.push(ChunkEntry {
                offset: written.data_end,
                stored_len: stored.len() as u32,
                pages: chunk.pages,
                crc: chunk.crc,
                codec: chunk.codec,
            });
            written.data_end += stored.len() as u64;
            written.stored_bytes += stored.len() as u64;
            chunk.raw.clear();
            chunk.pages = 0;
            // The walk may be finished and gone: then the buffer is simply freed.
            let _ = free.send(chunk);
        }
    }
    if !pending.is_empty() {
        return Err(pipeline_gone());
    }
    out.flush().map_err(|e| io_error("writing", path, e))?;
    Ok(written)
}

fn io_error(op: &'static str, path: &Path, source: std::io::Error) -> WriteError {
    WriteError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}
