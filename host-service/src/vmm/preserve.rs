//! Copy before write for a VM that runs on after a ditto checkpoint: hands each writable drive
//! the blocks the checkpoint references ([`Vmm::preserve_referenced`]), so the drive preserves
//! their old bytes in the checkpoint's side file before the guest overwrites them
//! ([`crate::devices::virtio::block::preserve`]). Read-only drives need no protection.
//!
//! On restore, [`fill_disk_pages`] reads the disk-referenced pages through the checkpoint's
//! side file when it has one, so blocks the guest overwrote after the checkpoint come back as
//! they were.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use super::Vmm;
use super::snapshot::SnapshotError;
use crate::checkpoint::side_file::{BLOCK_SIZE, CheckpointIdentity, SideFileError};
use crate::checkpoint::{
    DiskRefRun, DriveFiles, PageClass, PageExtent, PreservedOverlay, SideFile,
    fill_disk_refs_parallel, side_path,
};
use crate::devices::virtio::block::{self, PreservedCheckpoint, ReferencedBlocks};
use crate::kvm::memory::GuestMemory;

/// Why protection of a checkpoint's blocks cannot start. Nothing is protected then: a VM that
/// resumes anyway can break the checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum PreserveError {
    /// A reference names a drive the VM does not have.
    #[error("drive {drive} is referenced but the VM has {drives} drives")]
    UnknownDrive {
        /// The drive index.
        drive: u32,
        /// How many drives the VM has.
        drives: usize,
    },
    /// A reference lies beyond the end of its drive.
    #[error("drive {drive}: bytes {offset:#x}+{len:#x} lie beyond its {size} bytes")]
    OutOfRange {
        /// The drive index.
        drive: u32,
        /// Where the reference starts.
        offset: u64,
        /// Its length.
        len: u64,
        /// The drive's size.
        size: u64,
    },
    /// The checkpoint is protected already; making its side file again would drop the blocks
    /// preserved so far.
    #[error("the blocks of checkpoint {0:?} are protected already")]
    AlreadyProtected(std::path::PathBuf),
    /// The checkpoint or its side file cannot be opened or created.
    #[error(transparent)]
    Device(#[from] block::PreserveError),
}

/// What the planner needs to know about one drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DriveView {
    /// Whether the guest can write it (a read-only drive needs no protection).
    pub read_only: bool,
    /// Its size in bytes.
    pub size: u64,
}

/// The drive ranges `(drive, offset, len)` that the disk extents among `extents` reference.
pub fn disk_ranges(extents: &[PageExtent]) -> Vec<(u32, u64, u64)> {
    extents
        .iter()
        .filter_map(|e| match e.class {
            PageClass::Disk { drive, offset } => {
                Some((drive, offset, e.pages.saturating_mul(BLOCK_SIZE)))
            }
            PageClass::Free => None,
        })
        .collect()
}

/// Groups references `(drive, offset, len)` by writable drive as whole 4 KiB blocks (each range
/// widened to the blocks it touches), checking each against the drive's size. Empty ranges
/// and read-only drives are left out.
pub fn plan(
    refs: &[(u32, u64, u64)],
    drives: &[DriveView],
) -> Result<BTreeMap<u32, Vec<(u64, u64)>>, PreserveError> {
    let mut plan: BTreeMap<u32, Vec<(u64, u64)>> = BTreeMap::new();
    for &(drive, offset, len) in refs {
        let view = drives
            .get(drive as usize)
            .ok_or(PreserveError::UnknownDrive {
                drive,
                drives: drives.len(),
            })?;
        let end = offset.checked_add(len).filter(|&end| end <= view.size);
        let Some(end) = end else {
            return Err(PreserveError::OutOfRange {
                drive,
                offset,
                len,
                size: view.size,
            });
        };
        if len == 0 || view.read_only {
            continue;
        }
        let lo = offset - offset % BLOCK_SIZE;
        // `end` ≤ the drive's size < 2^64 - 4096 for any real image.
        let hi = end.div_ceil(BLOCK_SIZE).saturating_mul(BLOCK_SIZE);
        plan.entry(drive).or_default().push((lo, hi - lo));
    }
    Ok(plan)
}

/// Fills the disk-referenced pages `runs` of the checkpoint at `checkpoint` into `memory`
/// from the drive images `drives` on `threads` threads, every page's hash checked. When the
/// checkpoint has a side file, each block it holds is read from there instead of the drive.
/// A side file marked lost refuses the restore ([`SideFileError::Lost`]); one recorded for
/// another checkpoint (an older file of the same name) is ignored. Returns the pages filled.
pub fn fill_disk_pages(
    checkpoint: &Path,
    memory: &GuestMemory,
    runs: &[DiskRefRun],
    drives: &[File],
    threads: usize,
) -> Result<u64, SnapshotError> {
    let plain = DriveFiles(drives);
    if runs.is_empty() {
        return Ok(0);
    }
    let path = side_path(checkpoint);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(fill_disk_refs_parallel(memory, runs, &plain, threads)?);
        }
        Err(source) => {
            return Err(SideFileError::Io {
                op: "opening",
                path,
                source,
            }
            .into());
        }
    };
    let identity = CheckpointIdentity::of_path(checkpoint)?;
    let side = match SideFile::from_file(file, &path, Some(identity)) {
        Ok(side) => side,
        Err(SideFileError::WrongCheckpoint { path }) => {
            tracing::warn!(
                side_file = %path.display(),
                "ignoring a side file left by another checkpoint at this path"
            );
            return Ok(fill_disk_refs_parallel(memory, runs, &plain, threads)?);
        }
        Err(e) => return Err(e.into()),
    };
    if *side.tail() != crate::checkpoint::side_file::Tail::Clean {
        tracing::warn!(
            side_file = %path.display(),
            tail = ?side.tail(),
            "the side file ends in an incomplete record, which is ignored"
        );
    }
    tracing::info!(
        side_file = %path.display(),
        blocks = side.blocks(),
        "restoring overwritten drive blocks from the checkpoint's side file"
    );
    let overlay = PreservedOverlay::new(Arc::new(side), plain);
    Ok(fill_disk_refs_parallel(memory, runs, &overlay, threads)?)
}

impl Vmm {
    /// Protects the blocks that the checkpoint at `checkpoint` references, given as `(drive
    /// index in the checkpoint's drive table, byte offset, length)` (see [`disk_ranges`]):
    /// creates the side file `<checkpoint>.blocks` and hands each writable drive its
    /// [`ReferencedBlocks`]. Call it after the checkpoint file is durable and before the VM
    /// resumes. Without a reference to a writable drive, nothing is created. A checkpoint that
    /// is protected already is refused ([`PreserveError::AlreadyProtected`]).
    pub fn preserve_referenced(
        &mut self,
        checkpoint: &Path,
        refs: &[(u32, u64, u64)],
    ) -> Result<(), PreserveError> {
        let views: Vec<DriveView> = self
            .devices
            .blocks
            .iter()
            .map(|b| {
                let t = b.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let block = t.device();
                DriveView {
                    read_only: block.config().read_only,
                    size: block.nsectors() * block::SECTOR_SIZE,
                }
            })
            .collect();
        let plan = plan(refs, &views)?;
        if plan.is_empty() {
            return Ok(());
        }
        let protected = self.devices.blocks.iter().any(|b| {
            let t = b.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            t.device()
                .preserved()
                .iter()
                .any(|r| r.protects(checkpoint))
        });
        if protected {
            return Err(PreserveError::AlreadyProtected(checkpoint.to_owned()));
        }
        let shared = PreservedCheckpoint::open(checkpoint)?;
        let mut given = Vec::with_capacity(plan.len());
        for (drive, ranges) in plan {
            let refs = ReferencedBlocks::new(shared.clone(), drive, &ranges)
                .map_err(PreserveError::Device)?;
            given.push(refs);
        }
        for refs in given {
            if let Some(b) = self.devices.blocks.get(refs.drive() as usize) {
                let mut t = b.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                t.device_mut().preserve(refs);
            }
        }
        Ok(())
    }

    /// Stops protecting blocks for the checkpoint at `checkpoint` on every drive (see
    /// [`block::Block::release_preserved`]); returns whether any drive protected it.
    pub fn release_preserved(&mut self, checkpoint: &Path) -> bool {
        let mut any = false;
        for b in &self.devices.blocks {
            let mut t = b.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            any |= t.device_mut().release_preserved(checkpoint);
        }
        any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RW: DriveView = DriveView {
        read_only: false,
        size: 1 << 20,
    };
    const RO: DriveView = DriveView {
        read_only: true,
        size: 1 << 20,
    };

    #[test]
    fn plan_widens_to_blocks_and_skips_read_only_drives() {
        let refs = [
            (0, 0x1000, 0x2000),
            (1, 0, 0x1000),
            (2, 0x1800, 0x1000),
            (2, 0x8000, 0),
            (0, 0x10_0000 - 0x1000, 0x1000),
        ];
        let plan = plan(&refs, &[RW, RO, RW]).expect("plan");
        assert_eq!(
            plan.into_iter().collect::<Vec<_>>(),
            vec![
                (0, vec![(0x1000, 0x2000), (0x10_0000 - 0x1000, 0x1000)]),
                (2, vec![(0x1000, 0x2000)]),
            ]
        );
    }

    #[test]
    fn plan_refuses_unknown_drives_and_ranges_beyond_the_drive() {
        assert!(matches!(
            plan(&[(3, 0, 4096)], &[RW]),
            Err(PreserveError::UnknownDrive {
                drive: 3,
                drives: 1
            })
        ));
        for (offset, len) in [(1 << 20, 1), (u64::MAX, 2), (0x10_0000 - 0x800, 0x1000)] {
            assert!(
                matches!(
                    plan(&[(0, offset, len)], &[RW]),
                    Err(PreserveError::OutOfRange { .. })
                ),
                "{offset:#x}+{len:#x}"
            );
        }
        // Read-only drives are checked too.
        assert!(plan(&[(0, 1 << 20, 4096)], &[RO]).is_err());
    }

    #[test]
    fn disk_ranges_of_extents() {
        let extents = [
            PageExtent {
                first_frame: 1,
                pages: 3,
                class: PageClass::Disk {
                    drive: 1,
                    offset: 0x2000,
                },
            },
            PageExtent {
                first_frame: 9,
                pages: 2,
                class: PageClass::Free,
            },
        ];
        assert_eq!(disk_ranges(&extents), vec![(1, 0x2000, 0x3000)]);
    }
}
