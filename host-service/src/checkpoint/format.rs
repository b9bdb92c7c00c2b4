//! The on-disk structures of a checkpoint file and their byte encodings: the header, the trailer
//! with its section directory, the layout section (memory regions and drives) and chunk-table
//! records. The page map has its own module ([`super::page_map`]).
//!
//! Every integer is little-endian. `docs/checkpoint-format.md` describes the same layout for
//! readers written elsewhere; the constants here are the normative values.

use std::fmt;

use crate::kvm::memory::{MemoryLayout, RegionLayout};

use super::error::ReadError;

/// The first 8 bytes of every checkpoint file.
pub const MAGIC: [u8; 8] = *b"DITTOCKP";
/// The first 8 bytes of the trailer, the last 128 bytes of a complete file.
pub const TRAILER_MAGIC: [u8; 8] = *b"DITTOEND";
/// The format version this code writes and the only one it reads.
pub const VERSION: u32 = 1;
/// Size of the header at offset 0.
pub const HEADER_LEN: u64 = 64;
/// Size of the trailer at the end of the file.
pub const TRAILER_LEN: u64 = 128;
/// The guest page size every page count and page map entry is in.
pub const PAGE_SIZE: u64 = crate::kvm::PAGE_SIZE;
/// Incompatible flag: chunks may be zstd-compressed. A reader that does not know a set
/// incompatible flag must refuse the file.
pub const INCOMPAT_ZSTD: u64 = 1;
/// Every incompatible flag this version knows.
pub const KNOWN_INCOMPAT: u64 = INCOMPAT_ZSTD;

/// Largest state section accepted (the VM configuration and device state; a few KiB in practice).
pub const MAX_STATE_LEN: u64 = 64 << 20;
/// Most guest memory regions a file may describe.
pub const MAX_REGIONS: u32 = 64;
/// Most drives a file may describe.
pub const MAX_DRIVES: u32 = 64;
/// Longest drive id, in bytes of UTF-8.
pub const MAX_DRIVE_ID_LEN: usize = 255;
/// Largest total guest memory a file may describe (16 TiB).
pub const MAX_GUEST_BYTES: u64 = 1 << 44;
/// Most pages one chunk may hold (16 MiB of raw data): bounds every buffer a reader allocates.
pub const MAX_CHUNK_PAGES: u32 = 4096;
/// Size of one chunk-table record.
pub const CHUNK_RECORD_LEN: u64 = 24;
/// Size of the chunk table's own header (the chunk count).
pub const CHUNK_TABLE_HEADER_LEN: u64 = 8;
/// Largest layout section: counts, every region, every drive with the longest id.
pub const MAX_LAYOUT_LEN: u64 =
    8 + MAX_REGIONS as u64 * 16 + MAX_DRIVES as u64 * (8 + 2 + MAX_DRIVE_ID_LEN as u64);

/// The four sections the trailer's directory points at, in directory order.
pub const SECTION_COUNT: u32 = 4;
/// Most records reserved at once when their count comes from the file; beyond it, memory grows
/// only as records are actually read.
pub const RESERVE_LIMIT: u64 = 1 << 16;

/// A part of the file that carries its own checksum, named in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    /// The 64-byte header at offset 0.
    Header,
    /// The 128-byte trailer at the end.
    Trailer,
    /// The caller's serialised VM state.
    State,
    /// Memory regions and drives.
    Layout,
    /// The page map.
    PageMap,
    /// The chunk table.
    ChunkTable,
    /// Saved-page chunk number N (0-based, in table order).
    Chunk(u64),
}

impl Section {
    /// The directory sections in trailer order.
    pub const DIRECTORY: [Section; 4] = [
        Section::State,
        Section::Layout,
        Section::PageMap,
        Section::ChunkTable,
    ];
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Section::Header => f.write_str("header"),
            Section::Trailer => f.write_str("trailer"),
            Section::State => f.write_str("state section"),
            Section::Layout => f.write_str("layout section"),
            Section::PageMap => f.write_str("page map"),
            Section::ChunkTable => f.write_str("chunk table"),
            Section::Chunk(i) => write!(f, "chunk {i}"),
        }
    }
}

/// CRC-32C (Castagnoli) of `bytes`, the checksum of every section.
pub fn checksum(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

/// A checksum-mismatch error for `section` unless the two agree.
pub fn verify_checksum(section: Section, stored: u32, computed: u32) -> Result<(), ReadError> {
    if stored == computed {
        return Ok(());
    }
    Err(ReadError::Checksum {
        section,
        stored,
        computed,
    })
}

/// The fixed header at offset 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Flags a reader must understand to read the file.
    pub incompat_flags: u64,
    /// Flags a reader may ignore.
    pub compat_flags: u64,
}

impl Header {
    /// The 64 header bytes, checksum included.
    pub fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut b = [0u8; HEADER_LEN as usize];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        b[16..20].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        b[24..32].copy_from_slice(&self.incompat_flags.to_le_bytes());
        b[32..40].copy_from_slice(&self.compat_flags.to_le_bytes());
        let crc = checksum(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// The header's checksum (what the trailer records to bind itself to the header).
    pub fn crc(&self) -> u32 {
        le_u32(&self.encode(), 60)
    }

    /// Checks and decodes the header. The order of the checks is part of the format: magic,
    /// then version (a later version may lay the rest out differently), then checksum, then the
    /// fields.
    pub fn decode(b: &[u8; HEADER_LEN as usize]) -> Result<(Self, u32), ReadError> {
        if b[0..8] != MAGIC {
            return Err(ReadError::NotACheckpoint);
        }
        let version = le_u32(b, 8);
        if version != VERSION {
            return Err(ReadError::UnsupportedVersion { version });
        }
        let stored = le_u32(b, 60);
        verify_checksum(Section::Header, stored, checksum(&b[..60]))?;
        let header_len = le_u32(b, 12);
        if u64::from(header_len) != HEADER_LEN {
            return Err(malformed(
                Section::Header,
                format!("header length {header_len}, expected {HEADER_LEN}"),
            ));
        }
        let page_size = le_u32(b, 16);
        if u64::from(page_size) != PAGE_SIZE {
            return Err(ReadError::UnsupportedPageSize { page_size });
        }
        let incompat_flags = le_u64(b, 24);
        let unknown = incompat_flags & !KNOWN_INCOMPAT;
        if unknown != 0 {
            return Err(ReadError::UnknownIncompatFlags { flags: unknown });
        }
        let header = Header {
            incompat_flags,
            compat_flags: le_u64(b, 32),
        };
        Ok((header, stored))
    }
}

/// Where one directory section is and its checksum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SectionEntry {
    /// Byte offset in the file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// CRC-32C of the section's bytes.
    pub crc: u32,
}

impl SectionEntry {
    /// One past the last byte (saturating; bounds are checked separately).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// The trailer: written last, so a file without a valid one was never completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trailer {
    /// Length of the whole file, trailer included.
    pub file_len: u64,
    /// The header's checksum, binding trailer and header together.
    pub header_crc: u32,
    /// State, layout, page map and chunk table, in that order.
    pub sections: [SectionEntry; 4],
}

impl Trailer {
    /// The 128 trailer bytes, checksum included.
    pub fn encode(&self) -> [u8; TRAILER_LEN as usize] {
        let mut b = [0u8; TRAILER_LEN as usize];
        b[0..8].copy_from_slice(&TRAILER_MAGIC);
        b[8..16].copy_from_slice(&self.file_len.to_le_bytes());
        b[16..20].copy_from_slice(&self.header_crc.to_le_bytes());
        b[20..24].copy_from_slice(&SECTION_COUNT.to_le_bytes());
        for (i, s) in self.sections.iter().enumerate() {
            let at = 24 + 24 * i;
            b[at..at + 8].copy_from_slice(&s.offset.to_le_bytes());
            b[at + 8..at + 16].copy_from_slice(&s.len.to_le_bytes());
            b[at + 16..at + 20].copy_from_slice(&s.crc.to_le_bytes());
        }
        let crc = checksum(&b[..124]);
        b[124..128].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Checks and decodes the trailer of a file of `file_len` bytes whose trailer starts at
    /// `file_len - TRAILER_LEN`.
    pub fn decode(b: &[u8; TRAILER_LEN as usize], file_len: u64) -> Result<Self, ReadError> {
        if b[0..8] != TRAILER_MAGIC {
            return Err(ReadError::Incomplete { file_len });
        }
        verify_checksum(Section::Trailer, le_u32(b, 124), checksum(&b[..124]))?;
        let recorded = le_u64(b, 8);
        if recorded != file_len {
            return Err(ReadError::LengthMismatch {
                recorded,
                actual: file_len,
            });
        }
        let count = le_u32(b, 20);
        if count != SECTION_COUNT {
            return Err(malformed(
                Section::Trailer,
                format!("{count} sections, expected {SECTION_COUNT}"),
            ));
        }
        let mut sections = [SectionEntry::default(); 4];
        for (i, s) in sections.iter_mut().enumerate() {
            let at = 24 + 24 * i;
            *s = SectionEntry {
                offset: le_u64(b, at),
                len: le_u64(b, at + 8),
                crc: le_u32(b, at + 16),
            };
        }
        Ok(Trailer {
            file_len,
            header_crc: le_u32(b, 16),
            sections,
        })
    }
}

/// One drive that disk-referenced pages point into.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriveInfo {
    /// The drive's id (as in the VM configuration), 1 to 255 bytes of UTF-8.
    pub id: String,
    /// The drive's size in bytes when the checkpoint was taken; every reference lies inside it.
    pub size: u64,
}

/// Checks a memory layout for the file: 1 to [`MAX_REGIONS`] page-aligned, nonempty regions in
/// ascending guest address order without overlap, at most [`MAX_GUEST_BYTES`] in total.
/// Returns the detail of the first problem.
pub fn check_layout(layout: &MemoryLayout) -> Result<(), String> {
    let count = layout.regions.len();
    if count == 0 || count > MAX_REGIONS as usize {
        return Err(format!("{count} memory regions, need 1..={MAX_REGIONS}"));
    }
    let mut total: u64 = 0;
    let mut prev_end: u64 = 0;
    for (i, r) in layout.regions.iter().enumerate() {
        if r.size == 0 || r.size % PAGE_SIZE != 0 || r.guest_addr % PAGE_SIZE != 0 {
            return Err(format!(
                "region {i} at {:#x} of {:#x} bytes is empty or not page aligned",
                r.guest_addr, r.size
            ));
        }
        let end = r
            .guest_addr
            .checked_add(r.size)
            .ok_or_else(|| format!("region {i} at {:#x} wraps the address space", r.guest_addr))?;
        if i > 0 && r.guest_addr < prev_end {
            return Err(format!(
                "region {i} at {:#x} overlaps or precedes the region before it",
                r.guest_addr
            ));
        }
        prev_end = end;
        total = total.saturating_add(r.size);
    }
    if total > MAX_GUEST_BYTES {
        return Err(format!(
            "{total} bytes of guest memory, more than the {MAX_GUEST_BYTES} a file may hold"
        ));
    }
    Ok(())
}

/// Checks a drive table: at most [`MAX_DRIVES`] drives with ids of 1 to [`MAX_DRIVE_ID_LEN`]
/// bytes. Returns the detail of the first problem.
pub fn check_drives(drives: &[DriveInfo]) -> Result<(), String> {
    if drives.len() > MAX_DRIVES as usize {
        return Err(format!("{} drives, at most {MAX_DRIVES}", drives.len()));
    }
    for (i, d) in drives.iter().enumerate() {
        if d.id.is_empty() || d.id.len() > MAX_DRIVE_ID_LEN {
            return Err(format!(
                "drive {i} has an id of {} bytes, need 1..={MAX_DRIVE_ID_LEN}",
                d.id.len()
            ));
        }
    }
    Ok(())
}

/// Encodes the layout section. The caller has checked both with [`check_layout`] and
/// [`check_drives`].
pub fn encode_layout(layout: &MemoryLayout, drives: &[DriveInfo]) -> Vec<u8> {
    let mut b = Vec::with_capacity(64);
    b.extend_from_slice(&(layout.regions.len() as u32).to_le_bytes());
    b.extend_from_slice(&(drives.len() as u32).to_le_bytes());
    for r in &layout.regions {
        b.extend_from_slice(&r.guest_addr.to_le_bytes());
        b.extend_from_slice(&r.size.to_le_bytes());
    }
    for d in drives {
        b.extend_from_slice(&d.size.to_le_bytes());
        b.extend_from_slice(&(d.id.len() as u16).to_le_bytes());
        b.extend_from_slice(d.id.as_bytes());
    }
    b
}

/// Decodes and checks the layout section (already checksummed).
pub fn decode_layout(bytes: &[u8]) -> Result<(MemoryLayout, Vec<DriveInfo>), ReadError> {
    let bad = |detail: String| malformed(Section::Layout, detail);
    let mut c = Cursor::new(bytes, Section::Layout);
    let region_count = c.u32()?;
    let drive_count = c.u32()?;
    if region_count == 0 || region_count > MAX_REGIONS {
        return Err(bad(format!(
            "{region_count} memory regions, need 1..={MAX_REGIONS}"
        )));
    }
    if drive_count > MAX_DRIVES {
        return Err(bad(format!("{drive_count} drives, at most {MAX_DRIVES}")));
    }
    let mut regions = Vec::with_capacity(region_count as usize);
    for _ in 0..region_count {
        regions.push(RegionLayout {
            guest_addr: c.u64()?,
            size: c.u64()?,
        });
    }
    let layout = MemoryLayout { regions };
    check_layout(&layout).map_err(bad)?;
    let mut drives = Vec::with_capacity(drive_count as usize);
    for i in 0..drive_count {
        let size = c.u64()?;
        let id_len = usize::from(c.u16()?);
        let id = std::str::from_utf8(c.bytes(id_len)?)
            .map_err(|_| bad(format!("drive {i} id is not UTF-8")))?
            .to_owned();
        drives.push(DriveInfo { id, size });
    }
    check_drives(&drives).map_err(bad)?;
    if c.remaining() != 0 {
        return Err(bad(format!("{} bytes after the last drive", c.remaining())));
    }
    Ok((layout, drives))
}

/// How a chunk's bytes are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// The raw pages.
    None,
    /// One zstd frame that decompresses to exactly the raw pages.
    Zstd,
}

impl Codec {
    fn to_byte(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Zstd => 1,
        }
    }
}

/// One chunk-table record: a run of consecutive saved pages stored together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkEntry {
    /// Byte offset of the stored bytes in the file.
    pub offset: u64,
    /// Number of stored bytes.
    pub stored_len: u32,
    /// Number of pages (raw length is `pages * PAGE_SIZE`).
    pub pages: u32,
    /// CRC-32C of the stored bytes.
    pub crc: u32,
    /// How the pages are stored.
    pub codec: Codec,
}

impl ChunkEntry {
    /// Length of the chunk's pages once decoded.
    pub fn raw_len(&self) -> usize {
        self.pages as usize * PAGE_SIZE as usize
    }

    /// Appends the 24-byte record.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.stored_len.to_le_bytes());
        out.extend_from_slice(&self.pages.to_le_bytes());
        out.extend_from_slice(&self.crc.to_le_bytes());
        out.push(self.codec.to_byte());
        out.extend_from_slice(&[0u8; 3]);
    }

    /// Decodes record `index` and checks what a record alone can show: page count, codec, and
    /// the stored length for that codec.
    pub fn decode(
        rec: &[u8; CHUNK_RECORD_LEN as usize],
        index: u64,
        header: &Header,
    ) -> Result<Self, ReadError> {
        let bad =
            |detail: String| malformed(Section::ChunkTable, format!("chunk {index}: {detail}"));
        let offset = le_u64(rec, 0);
        let stored_len = le_u32(rec, 8);
        let pages = le_u32(rec, 12);
        let crc = le_u32(rec, 16);
        if pages == 0 || pages > MAX_CHUNK_PAGES {
            return Err(bad(format!("{pages} pages, need 1..={MAX_CHUNK_PAGES}")));
        }
        let raw_len = u64::from(pages) * PAGE_SIZE;
        let codec = match rec[20] {
            0 => Codec::None,
            1 if header.incompat_flags & INCOMPAT_ZSTD != 0 => Codec::Zstd,
            1 => return Err(bad("zstd chunk in a file without the zstd flag".into())),
            other => return Err(bad(format!("unknown codec {other}"))),
        };
        match codec {
            Codec::None if u64::from(stored_len) != raw_len => {
                return Err(bad(format!(
                    "uncompressed chunk of {pages} pages stores {stored_len} bytes"
                )));
            }
            Codec::Zstd if stored_len == 0 || u64::from(stored_len) >= raw_len => {
                return Err(bad(format!(
                    "compressed chunk of {pages} pages stores {stored_len} bytes \
                     (must be 1..{raw_len})"
                )));
            }
            _ => {}
        }
        Ok(ChunkEntry {
            offset,
            stored_len,
            pages,
            crc,
            codec,
        })
    }
}

/// A "malformed section" error.
pub fn malformed(section: Section, detail: String) -> ReadError {
    ReadError::Malformed { section, detail }
}

/// Little-endian u32 at `at` of a fixed-size record (offsets are constants within the record).
pub fn le_u32<const N: usize>(b: &[u8; N], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

/// Little-endian u64 at `at` of a fixed-size record.
pub fn le_u64<const N: usize>(b: &[u8; N], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// Reads little-endian values from a section held in memory; running off the end is a
/// malformed-section error.
pub struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    section: Section,
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `bytes`, which are `section`.
    pub fn new(bytes: &'a [u8], section: Section) -> Self {
        Self {
            bytes,
            pos: 0,
            section,
        }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], ReadError> {
        if self.remaining() < n {
            return Err(malformed(
                self.section,
                format!(
                    "ends at byte {} while {n} more bytes were expected",
                    self.bytes.len()
                ),
            ));
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ReadError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    /// The next little-endian u16.
    pub fn u16(&mut self) -> Result<u16, ReadError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    /// The next little-endian u32.
    pub fn u32(&mut self) -> Result<u32, ReadError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    /// The next little-endian u64.
    pub fn u64(&mut self) -> Result<u64, ReadError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}
