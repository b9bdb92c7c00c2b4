//! The checkpoint file: one self-describing, versioned, checksummed file holding a paused VM's
//! state (opaque bytes, JSON by convention), its memory layout and drive table, a page map that
//! says for every guest page whether it is saved, zero or a reference to a drive block (with
//! the page's SHA-256), and the saved pages in independent, optionally zstd-compressed chunks.
//! `docs/checkpoint-format.md` gives the byte layout.
//!
//! - [`format`]: the on-disk structures, constants and their encodings.
//! - [`page_map`]: the page map (runs of equal kind over the global page index).
//! - [`writer`]: [`CheckpointWriter`], streaming guest memory into the file.
//! - [`reader`]: [`CheckpointReader`], validating a file and restoring guest memory.
//! - [`disk_refs`]: filling disk-referenced pages from drive images, hash-checked.
//! - [`side_file`]: the blocks a running VM overwrote after a checkpoint referenced them
//!   (`X.blocks`), and the overlay restore reads through.
//! - [`durable`]: crash-safe creation of the file at its final name.
//! - [`error`]: [`WriteError`] and [`ReadError`].
//!
//! Taking a checkpoint (the VM paused):
//!
//! ```no_run
//! # use ditto_host::checkpoint::*;
//! # fn f(memory: &ditto_host::kvm::memory::GuestMemory, state: &[u8]) -> Result<(), WriteError> {
//! let drives = vec![DriveInfo { id: "root".into(), size: 2 << 30 }];
//! // Pages the guest agent reported and the host verified; everything else is saved or zero.
//! let extents = vec![PageExtent {
//!     first_frame: 0x1000,
//!     pages: 16,
//!     class: PageClass::Disk { drive: 0, offset: 0x20_0000 },
//! }];
//! let mut writer = CheckpointWriter::create("/var/lib/ditto/vm1.ckpt", WriteOptions::default())?;
//! writer.write_memory(memory, &drives, &extents)?;
//! let stats = writer.finish(state)?;
//! # Ok(()) }
//! ```
//!
//! Restoring it:
//!
//! ```no_run
//! # use ditto_host::checkpoint::*;
//! # fn f(images: &[std::fs::File]) -> Result<(), Box<dyn std::error::Error>> {
//! let reader = CheckpointReader::open("/var/lib/ditto/vm1.ckpt")?;
//! let memory = reader.layout().create()?; // fresh, zeroed
//! let disk_runs = reader.restore_memory(&memory, 2)?;
//! fill_disk_refs(&memory, &disk_runs, &mut DriveFiles(images))?;
//! let state: &[u8] = reader.state(); // or reader.state_json::<VmmState>()
//! # Ok(()) }
//! ```

pub mod disk_refs;
pub mod durable;
pub mod error;
pub mod format;
pub mod page_map;
pub mod reader;
pub mod side_file;
pub mod writer;

#[cfg(test)]
mod tests;

pub use disk_refs::{DiskRefRun, DriveFiles, DriveReader, fill_disk_refs, fill_disk_refs_parallel};
pub use error::{ReadError, WriteError};
pub use format::DriveInfo;
pub use page_map::{PageHash, PageMap, Run, RunKind};
pub use reader::CheckpointReader;
pub use side_file::{PreservedOverlay, SideFile, SideFileError, SideFileWriter, side_path};
pub use writer::{CheckpointWriter, PageClass, PageExtent, PageHashes, WriteOptions, WriteStats};
