//! The side file of a checkpoint: the drive blocks a checkpoint references, as they were before
//! the still-running guest overwrote them (copy before write).
//!
//! For a checkpoint file `X` the side file is `X.blocks` ([`side_path`]). It is created (header
//! only, through [`super::durable`], so it appears complete or not at all) when protection of
//! the checkpoint's referenced blocks starts, and grows by appending: each record holds a drive
//! index, a byte offset on that drive, a length (a multiple of 4096) and the old bytes, under a
//! CRC-32C. Every append is made durable (`fdatasync`) before the guest write it protects reaches
//! the drive image, so after a crash the side file holds at least every block the image lost.
//!
//! [`SideFile::open`] parses the records in order and stops at the first one that is cut short
//! or does not match its checksum (a crash mid-append leaves at most one such record, last):
//! nothing after it is used. [`PreservedOverlay`] is a [`DriveReader`] that takes a block from
//! the side file when it holds it and from the drive image otherwise, so
//! [`super::fill_disk_refs`] restores the pages as they were at the checkpoint.
//!
//! When preserving fails (the side file cannot be written, the disk is full), the writer marks
//! the side file *lost* ([`SideFileWriter::mark_lost`]): restore then refuses the checkpoint with
//! [`SideFileError::Lost`] instead of failing on a page hash. `docs/checkpoint-format.md` gives
//! the byte layout.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::disk_refs::DriveReader;
use super::durable::PendingFile;
use super::error::WriteError;
use super::format::TRAILER_LEN;

/// The first 8 bytes of every side file.
pub const SIDE_MAGIC: [u8; 8] = *b"DITTOBLK";
/// The side-file format version this code writes and the only one it reads.
pub const SIDE_VERSION: u32 = 1;
/// Size of the side file's header.
pub const SIDE_HEADER_LEN: u64 = 64;
/// The first 4 bytes of every record.
pub const RECORD_MAGIC: [u8; 4] = *b"DBLK";
/// Size of a record's header (the data follows it).
pub const RECORD_HEADER_LEN: u64 = 32;
/// The unit of preservation: records cover whole, aligned blocks of this size.
pub const BLOCK_SIZE: u64 = 4096;
/// Most data bytes one record may hold (larger preservations take several records).
pub const MAX_RECORD_LEN: u64 = 16 << 20;
/// Header flag: blocks that had to be preserved were not; the checkpoint cannot be restored.
pub const FLAG_LOST: u32 = 1;
/// What [`side_path`] appends to the checkpoint's file name.
pub const SIDE_SUFFIX: &str = ".blocks";

/// What can go wrong writing or reading a side file.
#[derive(Debug, thiserror::Error)]
pub enum SideFileError {
    /// An I/O operation failed.
    #[error("{op} side file {path:?}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The side file (or the checkpoint it belongs to).
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The side file could not be created.
    #[error("creating side file: {0}")]
    Create(#[source] WriteError),
    /// The file does not start with the side-file magic.
    #[error("{path:?} is not a ditto side file (bad magic)")]
    NotASideFile {
        /// The file.
        path: PathBuf,
    },
    /// A side file of a format version this reader does not know.
    #[error("side file {path:?} has format version {version}; this reader knows version 1")]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// Its version.
        version: u32,
    },
    /// The header does not match its checksum.
    #[error("side file {path:?}: header checksum mismatch")]
    HeaderChecksum {
        /// The file.
        path: PathBuf,
    },
    /// The side file belongs to another checkpoint (an older file at the same path).
    #[error("side file {path:?} belongs to a different checkpoint than the one restored")]
    WrongCheckpoint {
        /// The file.
        path: PathBuf,
    },
    /// Preserving blocks failed while the VM ran on: the drive lost bytes the checkpoint needs.
    #[error(
        "this checkpoint's preserved blocks were lost ({path:?} is marked lost): the guest \
         overwrote drive blocks the checkpoint references and they could not be saved"
    )]
    Lost {
        /// The file.
        path: PathBuf,
    },
    /// A record to append is not whole, aligned blocks.
    #[error("cannot preserve {len} bytes at drive offset {offset:#x}: not whole 4 KiB blocks")]
    Unaligned {
        /// Where.
        offset: u64,
        /// How much.
        len: u64,
    },
    /// An earlier append failed; the file's end is unknown and nothing more is appended.
    #[error("side file {path:?}: an earlier append failed")]
    Poisoned {
        /// The file.
        path: PathBuf,
    },
}

/// The side file of checkpoint `checkpoint`: the same path with [`SIDE_SUFFIX`] appended
/// (`vm.ditto` → `vm.ditto.blocks`).
pub fn side_path(checkpoint: &Path) -> PathBuf {
    let mut name = checkpoint.as_os_str().to_owned();
    name.push(SIDE_SUFFIX);
    PathBuf::from(name)
}

/// What binds a side file to one checkpoint file: the checkpoint's length and its trailer's
/// CRC-32C (which covers the section directory and so every section checksum).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointIdentity {
    /// Length of the checkpoint file.
    pub file_len: u64,
    /// The checkpoint trailer's stored CRC (its last 4 bytes).
    pub trailer_crc: u32,
}

impl CheckpointIdentity {
    /// The identity of the checkpoint in `file`. The checkpoint is not validated here.
    pub fn of(file: &File) -> io::Result<Self> {
        let file_len = file.metadata()?.len();
        if file_len < TRAILER_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a {file_len}-byte file is not a complete checkpoint"),
            ));
        }
        let mut crc = [0u8; 4];
        file.read_exact_at(&mut crc, file_len - 4)?;
        Ok(Self {
            file_len,
            trailer_crc: u32::from_le_bytes(crc),
        })
    }

    /// The identity of the checkpoint at `path`.
    pub fn of_path(path: &Path) -> Result<Self, SideFileError> {
        let io = |source| SideFileError::Io {
            op: "reading the checkpoint of",
            path: path.to_owned(),
            source,
        };
        Self::of(&File::open(path).map_err(io)?).map_err(io)
    }
}

fn encode_header(identity: CheckpointIdentity, flags: u32) -> [u8; SIDE_HEADER_LEN as usize] {
    let mut b = [0u8; SIDE_HEADER_LEN as usize];
    b[0..8].copy_from_slice(&SIDE_MAGIC);
    b[8..12].copy_from_slice(&SIDE_VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&(SIDE_HEADER_LEN as u32).to_le_bytes());
    b[16..24].copy_from_slice(&identity.file_len.to_le_bytes());
    b[24..28].copy_from_slice(&identity.trailer_crc.to_le_bytes());
    b[28..32].copy_from_slice(&flags.to_le_bytes());
    let crc = crc32c::crc32c(&b[..60]);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
    b
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Checks a header: magic, version, checksum and header length. Returns the checkpoint
/// identity it records and its flags.
fn decode_header(
    b: &[u8; SIDE_HEADER_LEN as usize],
    path: &Path,
) -> Result<(CheckpointIdentity, u32), SideFileError> {
    let path = || path.to_owned();
    if b[0..8] != SIDE_MAGIC {
        return Err(SideFileError::NotASideFile { path: path() });
    }
    let version = le_u32(b, 8);
    if version != SIDE_VERSION {
        return Err(SideFileError::UnsupportedVersion {
            path: path(),
            version,
        });
    }
    if le_u32(b, 60) != crc32c::crc32c(&b[..60]) || u64::from(le_u32(b, 12)) != SIDE_HEADER_LEN {
        return Err(SideFileError::HeaderChecksum { path: path() });
    }
    let identity = CheckpointIdentity {
        file_len: le_u64(b, 16),
        trailer_crc: le_u32(b, 24),
    };
    Ok((identity, le_u32(b, 28)))
}

/// A record's 32-byte header with its checksum over the header and `data`.
fn encode_record_header(drive: u32, offset: u64, data: &[u8]) -> [u8; RECORD_HEADER_LEN as usize] {
    let mut h = [0u8; RECORD_HEADER_LEN as usize];
    h[0..4].copy_from_slice(&RECORD_MAGIC);
    h[4..8].copy_from_slice(&drive.to_le_bytes());
    h[8..16].copy_from_slice(&offset.to_le_bytes());
    h[16..20].copy_from_slice(&(data.len() as u32).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h[..28]), data);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The appending side of a side file. Not shared: one writer per checkpoint.
#[derive(Debug)]
pub struct SideFileWriter {
    path: PathBuf,
    file: File,
    identity: CheckpointIdentity,
    /// Where the next record goes.
    end: u64,
    /// An append failed part way; the bytes after `end` are unknown.
    poisoned: bool,
}

impl SideFileWriter {
    /// Creates the side file at `path` for the checkpoint `identity` names, with its header and
    /// no records, durably; an older file at `path` is replaced.
    pub fn create(path: &Path, identity: CheckpointIdentity) -> Result<Self, SideFileError> {
        let pending = PendingFile::create(path).map_err(SideFileError::Create)?;
        let io = |op, source| SideFileError::Io {
            op,
            path: path.to_owned(),
            source,
        };
        pending
            .file()
            .write_all_at(&encode_header(identity, 0), 0)
            .map_err(|e| io("writing the header of", e))?;
        let file = pending
            .file()
            .try_clone()
            .map_err(|e| io("duplicating the descriptor of", e))?;
        pending.persist().map_err(SideFileError::Create)?;
        Ok(Self {
            path: path.to_owned(),
            file,
            identity,
            end: SIDE_HEADER_LEN,
            poisoned: false,
        })
    }

    /// A writer appending to `file` as the side file at `path` (tests use it to make appends
    /// fail).
    #[cfg(test)]
    pub(crate) fn on_file_for_test(path: &Path, file: File, identity: CheckpointIdentity) -> Self {
        Self {
            path: path.to_owned(),
            file,
            identity,
            end: SIDE_HEADER_LEN,
            poisoned: false,
        }
    }

    /// The side file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open side file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Appends the old bytes of blocks of drive `drive` — each `(offset, data)` whole, aligned
    /// 4 KiB blocks — as records (at most [`MAX_RECORD_LEN`] each) and makes them durable
    /// (`fdatasync`) before returning. After an error nothing more is appended
    /// ([`SideFileError::Poisoned`]).
    pub fn append(&mut self, drive: u32, blocks: &[(u64, &[u8])]) -> Result<(), SideFileError> {
        if self.poisoned {
            return Err(SideFileError::Poisoned {
                path: self.path.clone(),
            });
        }
        for &(offset, data) in blocks {
            let len = data.len() as u64;
            if len == 0
                || !offset.is_multiple_of(BLOCK_SIZE)
                || !len.is_multiple_of(BLOCK_SIZE)
                || offset.checked_add(len).is_none()
            {
                return Err(SideFileError::Unaligned { offset, len });
            }
        }
        self.poisoned = true;
        let mut at = self.end;
        for &(offset, data) in blocks {
            for (i, piece) in data.chunks(MAX_RECORD_LEN as usize).enumerate() {
                let piece_offset = offset + i as u64 * MAX_RECORD_LEN;
                let header = encode_record_header(drive, piece_offset, piece);
                self.write_at(&header, at)?;
                self.write_at(piece, at + RECORD_HEADER_LEN)?;
                at += RECORD_HEADER_LEN + piece.len() as u64;
            }
        }
        self.file.sync_data().map_err(|source| SideFileError::Io {
            op: "syncing",
            path: self.path.clone(),
            source,
        })?;
        self.end = at;
        self.poisoned = false;
        Ok(())
    }

    fn write_at(&self, bytes: &[u8], at: u64) -> Result<(), SideFileError> {
        self.file
            .write_all_at(bytes, at)
            .map_err(|source| SideFileError::Io {
                op: "appending to",
                path: self.path.clone(),
                source,
            })
    }

    /// Marks the side file lost, so that restoring the checkpoint fails with
    /// [`SideFileError::Lost`]: the header is rewritten in place with [`FLAG_LOST`] (which needs
    /// no new space) and synced; if that fails the file is cut to zero length, which a reader
    /// also takes as lost. Returns the error only if neither worked.
    pub fn mark_lost(&mut self) -> Result<(), SideFileError> {
        self.poisoned = true;
        let header = encode_header(self.identity, FLAG_LOST);
        let rewritten = self
            .file
            .write_all_at(&header, 0)
            .and_then(|()| self.file.sync_data());
        let Err(first) = rewritten else {
            return Ok(());
        };
        self.file
            .set_len(0)
            .and_then(|()| self.file.sync_all())
            .map_err(|_| SideFileError::Io {
                op: "marking lost",
                path: self.path.clone(),
                source: first,
            })
    }
}

/// Why [`SideFile::open`] stopped reading records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tail {
    /// Every byte after the header belongs to an intact record.
    Clean,
    /// The record at `offset` is cut short by the end of the file (a crash mid-append).
    Torn {
        /// Where the incomplete record starts.
        offset: u64,
    },
    /// The record at `offset` is not a valid record (bad magic, length or checksum: a crash
    /// that left its bytes unwritten, or damage). It and everything after it are ignored.
    Damaged {
        /// Where the record starts.
        offset: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// A parsed side file: which `(drive, block offset)` it holds and where their bytes are.
#[derive(Debug)]
pub struct SideFile {
    path: PathBuf,
    file: File,
    /// `(drive, 4 KiB-aligned drive offset)` → position of that block's bytes in the file.
    index: BTreeMap<(u32, u64), u64>,
    records: u64,
    tail: Tail,
}

impl SideFile {
    /// Opens and parses the side file at `path`: header (magic, version, checksum), then with
    /// `identity` the checkpoint it was recorded for ([`SideFileError::WrongCheckpoint`]), then
    /// the lost flag ([`SideFileError::Lost`]; a file shorter than its header is lost too),
    /// then the records up to the first one not intact.
    pub fn open(path: &Path, identity: Option<CheckpointIdentity>) -> Result<Self, SideFileError> {
        let file = File::open(path).map_err(|source| SideFileError::Io {
            op: "opening",
            path: path.to_owned(),
            source,
        })?;
        Self::from_file(file, path, identity)
    }

    /// [`Self::open`] on an open file; `path` is for errors.
    pub fn from_file(
        file: File,
        path: &Path,
        identity: Option<CheckpointIdentity>,
    ) -> Result<Self, SideFileError> {
        let io = |source| SideFileError::Io {
            op: "reading",
            path: path.to_owned(),
            source,
        };
        let file_len = file.metadata().map_err(io)?.len();
        if file_len < SIDE_HEADER_LEN {
            return Err(SideFileError::Lost {
                path: path.to_owned(),
            });
        }
        let mut hb = [0u8; SIDE_HEADER_LEN as usize];
        file.read_exact_at(&mut hb, 0).map_err(io)?;
        let (recorded, flags) = decode_header(&hb, path)?;
        // Identity first: a lost side file of another checkpoint says nothing about this one.
        if identity.is_some_and(|id| id != recorded) {
            return Err(SideFileError::WrongCheckpoint {
                path: path.to_owned(),
            });
        }
        if flags & FLAG_LOST != 0 {
            return Err(SideFileError::Lost {
                path: path.to_owned(),
            });
        }
        let mut side = Self {
            path: path.to_owned(),
            file,
            index: BTreeMap::new(),
            records: 0,
            tail: Tail::Clean,
        };
        side.tail = side.parse_records(file_len).map_err(io)?;
        Ok(side)
    }

    /// Reads records from the header's end until the file ends or a record is not intact.
    fn parse_records(&mut self, file_len: u64) -> io::Result<Tail> {
        let mut at = SIDE_HEADER_LEN;
        let mut data = Vec::new();
        loop {
            if at == file_len {
                return Ok(Tail::Clean);
            }
            if file_len - at < RECORD_HEADER_LEN {
                return Ok(Tail::Torn { offset: at });
            }
            let mut h = [0u8; RECORD_HEADER_LEN as usize];
            self.file.read_exact_at(&mut h, at)?;
            let damaged = |reason| Tail::Damaged { offset: at, reason };
            if h[0..4] != RECORD_MAGIC {
                return Ok(damaged("bad record magic"));
            }
            let drive = le_u32(&h, 4);
            let offset = le_u64(&h, 8);
            let len = u64::from(le_u32(&h, 16));
            if len == 0
                || len > MAX_RECORD_LEN
                || !len.is_multiple_of(BLOCK_SIZE)
                || !offset.is_multiple_of(BLOCK_SIZE)
                || offset.checked_add(len).is_none()
            {
                return Ok(damaged("bad record offset or length"));
            }
            let data_at = at + RECORD_HEADER_LEN;
            if file_len - data_at < len {
                return Ok(Tail::Torn { offset: at });
            }
            // Bounded by MAX_RECORD_LEN above.
            data.resize(len as usize, 0);
            self.file.read_exact_at(&mut data, data_at)?;
            let crc = crc32c::crc32c_append(crc32c::crc32c(&h[..28]), &data);
            if crc != le_u32(&h, 28) {
                return Ok(damaged("record checksum mismatch"));
            }
            for i in 0..len / BLOCK_SIZE {
                // The first record of a block holds its bytes as of the checkpoint.
                self.index
                    .entry((drive, offset + i * BLOCK_SIZE))
                    .or_insert(data_at + i * BLOCK_SIZE);
            }
            self.records += 1;
            at = data_at + len;
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the bytes of the 4 KiB block at `offset` (aligned) of drive `drive` are in the
    /// file, if it holds them.
    pub fn lookup(&self, drive: u32, offset: u64) -> Option<u64> {
        self.index.get(&(drive, offset)).copied()
    }

    /// How many distinct blocks the file holds.
    pub fn blocks(&self) -> usize {
        self.index.len()
    }

    /// How many intact records were read.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Why reading stopped.
    pub fn tail(&self) -> &Tail {
        &self.tail
    }
}

/// Drive reads that prefer a side file: each 4 KiB block the side file holds is read from it,
/// everything else from `drives`.
#[derive(Clone, Debug)]
pub struct PreservedOverlay<D> {
    side: Arc<SideFile>,
    drives: D,
}

impl<D> PreservedOverlay<D> {
    /// Reads through `side` over `drives`.
    pub fn new(side: Arc<SideFile>, drives: D) -> Self {
        Self { side, drives }
    }

    /// The side file.
    pub fn side(&self) -> &SideFile {
        &self.side
    }
}

impl<D: DriveReader> DriveReader for PreservedOverlay<D> {
    fn read_exact_at(&mut self, drive: u32, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "read beyond 2^64"))?;
        let first_block = offset - offset % BLOCK_SIZE;
        // Bytes before `at` are filled; the side file's blocks in range come in offset order.
        let mut at = offset;
        let held = self.side.index.range((drive, first_block)..(drive, end));
        for (&(_, block), &pos) in held {
            let (from, to) = (block.max(offset), (block + BLOCK_SIZE).min(end));
            if at < from {
                let gap = &mut buf[(at - offset) as usize..(from - offset) as usize];
                self.drives.read_exact_at(drive, at, gap)?;
            }
            let part = &mut buf[(from - offset) as usize..(to - offset) as usize];
            self.side.file.read_exact_at(part, pos + (from - block))?;
            at = to;
        }
        if at < end {
            self.drives
                .read_exact_at(drive, at, &mut buf[(at - offset) as usize..])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
