//! Restoring disk-referenced pages: reading them from the drive images and checking each page
//! against the SHA-256 the checkpoint recorded, so that a drive image that changed since the
//! checkpoint is refused instead of resuming a guest with wrong memory. [`fill_disk_refs`] reads
//! on the calling thread; [`fill_disk_refs_parallel`] spreads the offset-sorted reads over a few
//! threads with the same result and error.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

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
#[derive(Clone, Copy, Debug)]
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
    let batches = plan(runs);
    fill_batches(memory, &batches, 0, drives, &|_| false).map_err(|(_, e)| e)
}

/// [`fill_disk_refs`] on up to `threads` threads (0 counts as 1). The batches, sorted by
/// (drive, offset), are cut into `threads` contiguous slices of about equal pages, and each
/// thread reads its slice in offset order through its own clone of `drives`.
///
/// The error is the one [`fill_disk_refs`] would return: that of the first failing page in
/// (drive, offset) order. A thread stops once a page before its own position has failed;
/// pages after a failure may have been written by other threads, so on an error the memory
/// must be discarded as with one thread.
pub fn fill_disk_refs_parallel<R>(
    memory: &GuestMemory,
    runs: &[DiskRefRun],
    drives: &R,
    threads: usize,
) -> Result<u64, ReadError>
where
    R: DriveReader + Clone + Send,
{
    let batches = plan(runs);
    let slices = split(&batches, threads.max(1));
    if slices.len() <= 1 {
        return fill_batches(memory, &batches, 0, &mut drives.clone(), &|_| false)
            .map_err(|(_, e)| e);
    }
    // The lowest failed batch index so far (usize::MAX: none).
    let first_failure = AtomicUsize::new(usize::MAX);
    let error: Mutex<Option<(usize, ReadError)>> = Mutex::new(None);
    let outcome = std::thread::scope(|s| {
        let handles: Vec<_> = slices
            .iter()
            .map(|&(base, slice)| {
                let mut reader = drives.clone();
                let (first_failure, error) = (&first_failure, &error);
                s.spawn(move || {
                    let stop = |i: usize| i > first_failure.load(Ordering::Relaxed);
                    let result = fill_batches(memory, slice, base, &mut reader, &stop);
                    result.map_err(|(i, e)| {
                        first_failure.fetch_min(i, Ordering::Relaxed);
                        let mut slot = error.lock().unwrap_or_else(PoisonError::into_inner);
                        if slot.as_ref().is_none_or(|(j, _)| i < *j) {
                            *slot = Some((i, e));
                        }
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect::<Vec<_>>()
    });
    let mut filled = 0;
    for joined in outcome {
        match joined {
            Ok(Ok(n)) => filled += n,
            Ok(Err(())) => {}
            Err(_) => return Err(ReadError::WorkerPanicked),
        }
    }
    match error.into_inner().unwrap_or_else(PoisonError::into_inner) {
        Some((_, e)) => Err(e),
        None => Ok(filled),
    }
}

/// Up to [`FILL_BATCH_PAGES`] consecutive pages of one run.
#[derive(Clone, Copy, Debug)]
struct Batch<'r> {
    run: &'r DiskRefRun,
    /// Index of the first page in the run.
    first: u64,
    pages: u64,
}

/// The runs cut into batches, in (drive, offset) order.
fn plan(runs: &[DiskRefRun]) -> Vec<Batch<'_>> {
    let mut order: Vec<&DiskRefRun> = runs.iter().collect();
    order.sort_by_key(|r| (r.drive, r.drive_offset));
    let mut batches = Vec::new();
    for run in order {
        let mut first = 0;
        while first < run.pages {
            let pages = (run.pages - first).min(FILL_BATCH_PAGES);
            batches.push(Batch { run, first, pages });
            first += pages;
        }
    }
    batches
}

/// Cuts `batches` into at most `parts` contiguous, nonempty slices of about equal pages; each
/// comes with the index of its first batch.
fn split<'b, 'r>(batches: &'b [Batch<'r>], parts: usize) -> Vec<(usize, &'b [Batch<'r>])> {
    let total: u64 = batches.iter().map(|b| b.pages).sum();
    let mut slices = Vec::with_capacity(parts);
    let (mut start, mut done) = (0, 0u64);
    for (i, b) in batches.iter().enumerate() {
        done += b.pages;
        // Close slice k once its share (k+1)/parts of the pages is reached.
        let k = slices.len() as u64 + 1;
        if slices.len() + 1 < parts && done * parts as u64 >= total * k {
            slices.push((start, &batches[start..=i]));
            start = i + 1;
        }
    }
    if start < batches.len() {
        slices.push((start, &batches[start..]));
    }
    slices
}

/// Reads, checks and writes `batches` (whose first is batch number `base`) in order; before
/// each batch `stop(index)` may end the work early. On an error returns the failing batch's
/// index with it.
fn fill_batches(
    memory: &GuestMemory,
    batches: &[Batch<'_>],
    base: usize,
    drives: &mut impl DriveReader,
    stop: &dyn Fn(usize) -> bool,
) -> Result<u64, (usize, ReadError)> {
    let mut buf = Vec::new();
    let mut filled = 0;
    for (i, batch) in batches.iter().enumerate() {
        let index = base + i;
        if stop(index) {
            break;
        }
        fill_batch(memory, batch, drives, &mut buf).map_err(|e| (index, e))?;
        filled += batch.pages;
    }
    Ok(filled)
}

fn fill_batch(
    memory: &GuestMemory,
    batch: &Batch<'_>,
    drives: &mut impl DriveReader,
    buf: &mut Vec<u8>,
) -> Result<(), ReadError> {
    let run = batch.run;
    buf.resize(batch.pages as usize * PAGE, 0);
    let offset = run.drive_offset + batch.first * PAGE_SIZE;
    drives
        .read_exact_at(run.drive, offset, buf)
        .map_err(|source| ReadError::DriveRead {
            drive: run.drive,
            offset,
            source,
        })?;
    for (i, page) in buf.chunks_exact(PAGE).enumerate() {
        let index = batch.first + i as u64;
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
    let guest_addr = run.guest_addr + batch.first * PAGE_SIZE;
    memory
        .write_slice(buf, GuestAddress(guest_addr))
        .map_err(|source| ReadError::Memory { guest_addr, source })
}
