//! Restoring disk-referenced pages: reading them from the drive images and checking each page
//! against the SHA-256 the checkpoint recorded, so that a drive image that changed since the
//! checkpoint is refused instead of resuming a guest with wrong memory.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;

use sha2::{Digest, Sha256};
use vm_memory::{Bytes as _, GuestAddress};

use crate::kvm::memory::GuestMemory;

use super::error::ReadError;
use super::format::PAGE_SIZE;
use super::page_map::PageHash;

/// Pages read from a drive at once.
const FILL_BATCH_PAGES: u64 = 256;
const PAGE: usize = PAGE_SIZE as usize;

/// Pages of guest memory whose contents are bytes of a drive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskRefRun {
    /// Guest physical address of the first page.
    pub guest_addr: u64,
    /// Number of pages.
    pub pages: u64,
    /// Index of the drive in the checkpoint's drive table.
    pub drive: u32,
    /// Byte offset of the first page on the drive; page `i` is at `drive_offset + i * 4096`.
    pub drive_offset: u64,
    /// SHA-256 of each page, in order.
    pub hashes: Vec<PageHash>,
}

/// Reads bytes of the drives a checkpoint references.
pub trait DriveReader {
    /// Fills `buf` with the bytes of drive `drive` (an index into the checkpoint's drive table)
    /// starting at byte `offset`.
    fn read_exact_at(&mut self, drive: u32, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

impl<F> DriveReader for F
where
    F: FnMut(u32, u64, &mut [u8]) -> io::Result<()>,
{
    fn read_exact_at(&mut self, drive: u32, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self(drive, offset, buf)
    }
}

/// Drive images as open files, drive `i` being `files[i]`.
#[derive(Debug)]
pub struct DriveFiles<'a>(pub &'a [File]);

impl DriveReader for DriveFiles<'_> {
    fn read_exact_at(&mut self, drive: u32, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let file = self.0.get(drive as usize).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no image for drive {drive} ({} given)", self.0.len()),
            )
        })?;
        file.read_exact_at(buf, offset)
    }
}

/// Fills the pages of `runs` in `memory` from the drives, reading each drive in offset order
/// and checking every page's SHA-256 before writing it. Returns the number of pages filled.
/// On a mismatch nothing more is written and the error names the page and the drive; pages
/// written before it remain, so the memory must be discarded.
pub fn fill_disk_refs(
    memory: &GuestMemory,
    runs: &[DiskRefRun],
    drives: &mut impl DriveReader,
) -> Result<u64, ReadError> {
    let mut order: Vec<&DiskRefRun> = runs.iter().collect();
    order.sort_by_key(|r| (r.drive, r.drive_offset));
    let mut buf = Vec::new();
    let mut filled = 0;
    for run in order {
        let mut done = 0;
        while done < run.pages {
            let n = (run.pages - done).min(FILL_BATCH_PAGES);
            buf.resize(n as usize * PAGE, 0);
            let offset = run.drive_offset + done * PAGE_SIZE;
            drives
                .read_exact_at(run.drive, offset, &mut buf)
                .map_err(|source| ReadError::DriveRead {
                    drive: run.drive,
                    offset,
                    source,
                })?;
            for (i, page) in buf.chunks_exact(PAGE).enumerate() {
                let index = done + i as u64;
                let expected = usize::try_from(index).ok().and_then(|i| run.hashes.get(i));
                let actual: PageHash = Sha256::digest(page).into();
                if expected != Some(&actual) {
                    return Err(ReadError::HashMismatch {
                        guest_addr: run.guest_addr + index * PAGE_SIZE,
                        drive: run.drive,
                        drive_offset: run.drive_offset + index * PAGE_SIZE,
                    });
                }
            }
            let guest_addr = run.guest_addr + done * PAGE_SIZE;
            memory
                .write_slice(&buf, GuestAddress(guest_addr))
                .map_err(|source| ReadError::Memory { guest_addr, source })?;
            done += n;
            filled += n;
        }
    }
    Ok(filled)
}
