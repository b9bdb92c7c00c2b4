//! What can go wrong writing or reading a checkpoint file. Every read error names what is wrong
//! and where (section, offset, chunk, page, drive), so an operator can tell a truncated copy from
//! bit rot from a drive image that changed.

use std::io;
use std::path::PathBuf;

use super::format::{MAX_STATE_LEN, Section};

/// Why a checkpoint could not be written. The destination is never left holding a partial file.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The destination path cannot name a file.
    #[error("checkpoint path {path:?}: {reason}")]
    Path {
        /// The path given.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An I/O operation on the destination failed.
    #[error("{op} {path:?}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The guest memory cannot be described by the format.
    #[error("guest memory layout: {0}")]
    Layout(String),
    /// The drive table cannot be described by the format.
    #[error("drive table: {0}")]
    Drives(String),
    /// A caller-supplied page classification extent is invalid.
    #[error("page extent {index}: {detail}")]
    Extent {
        /// Position of the extent in the caller's list.
        index: usize,
        /// What is wrong with it.
        detail: String,
    },
    /// Reading guest memory failed.
    #[error("reading guest memory at {guest_addr:#x}: {source}")]
    Memory {
        /// Where.
        guest_addr: u64,
        /// The error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The options are out of range.
    #[error("checkpoint write options: {0}")]
    Options(String),
    /// The zstd compressor could not be set up.
    #[error("zstd compressor: {0}")]
    Compressor(#[source] io::Error),
    /// The serialised state is larger than the format allows.
    #[error("the VM state is {len} bytes, more than the {MAX_STATE_LEN} a checkpoint may hold")]
    StateTooLarge {
        /// Its length.
        len: usize,
    },
    /// The state could not be serialised.
    #[error("serialising the VM state: {0}")]
    State(#[source] serde_json::Error),
    /// The writer's steps were called out of order.
    #[error("checkpoint writer: {0}")]
    Sequence(&'static str),
    /// A worker thread panicked (a bug).
    #[error("a checkpoint writer thread panicked")]
    WorkerPanicked,
}

/// Why a checkpoint could not be read or restored.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file could not be opened.
    #[error("opening checkpoint {path:?}: {source}")]
    Open {
        /// The path given.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Reading the file failed.
    #[error("reading the checkpoint at offset {offset}: {source}")]
    Io {
        /// Where the read started.
        offset: u64,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The file does not start with the checkpoint magic.
    #[error("not a ditto checkpoint (bad magic)")]
    NotACheckpoint,
    /// The file is a checkpoint of a format version this reader does not know.
    #[error("unsupported checkpoint format version {version} (this reader knows version 1)")]
    UnsupportedVersion {
        /// The file's version.
        version: u32,
    },
    /// The file counts pages of a size this reader does not know.
    #[error("unsupported page size {page_size} (this reader knows 4096)")]
    UnsupportedPageSize {
        /// The file's page size.
        page_size: u32,
    },
    /// The header sets incompatible flags this reader does not know.
    #[error("checkpoint needs unknown features (incompatible flags {flags:#x})")]
    UnknownIncompatFlags {
        /// The unknown bits.
        flags: u64,
    },
    /// The file ends before a part that must be there.
    #[error("truncated at offset {file_len}: the {section} needs bytes up to offset {needed}")]
    Truncated {
        /// The part that does not fit.
        section: Section,
        /// Where it would end.
        needed: u64,
        /// Where the file ends.
        file_len: u64,
    },
    /// The file has no valid trailer: it was cut short or never finished.
    #[error(
        "no trailer at the end of the {file_len}-byte file: it is truncated or was never finished"
    )]
    Incomplete {
        /// The file's length.
        file_len: u64,
    },
    /// The trailer records a different file length.
    #[error("the trailer records a {recorded}-byte file but the file has {actual} bytes")]
    LengthMismatch {
        /// The length in the trailer.
        recorded: u64,
        /// The file's length.
        actual: u64,
    },
    /// A section's bytes do not match its checksum.
    #[error("checksum mismatch in the {section}: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// The section.
        section: Section,
        /// The checksum the file records.
        stored: u32,
        /// The checksum of the bytes.
        computed: u32,
    },
    /// A section has the right checksum but breaks a rule of the format.
    #[error("malformed {section}: {detail}")]
    Malformed {
        /// The section.
        section: Section,
        /// The rule broken.
        detail: String,
    },
    /// The target memory does not have the layout the checkpoint was taken from.
    #[error("the target memory layout {target} differs from the checkpoint's {file}")]
    LayoutMismatch {
        /// The checkpoint's layout.
        file: String,
        /// The target's layout.
        target: String,
    },
    /// A compressed chunk does not decompress.
    #[error("chunk {chunk} does not decompress: {source}")]
    Decompress {
        /// The chunk's index.
        chunk: u64,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Writing guest memory failed.
    #[error("writing guest memory at {guest_addr:#x}: {source}")]
    Memory {
        /// Where.
        guest_addr: u64,
        /// The error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Reading a drive for disk-referenced pages failed.
    #[error("reading drive {drive} at byte offset {offset:#x}: {source}")]
    DriveRead {
        /// The drive's index.
        drive: u32,
        /// Where.
        offset: u64,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A disk-referenced page read from a drive does not have the hash the checkpoint recorded.
    #[error(
        "page at guest address {guest_addr:#x} does not match drive {drive} at byte offset \
         {drive_offset:#x}: the drive image changed since the checkpoint was taken"
    )]
    HashMismatch {
        /// The page's guest physical address.
        guest_addr: u64,
        /// The drive's index.
        drive: u32,
        /// The page's byte offset on the drive.
        drive_offset: u64,
    },
    /// The state section does not deserialise to the requested type.
    #[error("decoding the VM state: {0}")]
    State(#[source] serde_json::Error),
    /// A worker thread panicked (a bug).
    #[error("a checkpoint reader thread panicked")]
    WorkerPanicked,
}
