//! Copy before write: keeping a checkpoint restorable while its VM runs on.
//!
//! A ditto checkpoint stores some guest pages as references to drive blocks. When the VM keeps
//! running, the guest may overwrite such a block; [`ReferencedBlocks`] lists the blocks of one
//! drive that one checkpoint still needs, and before a guest write reaches a listed block the
//! device reads the block's old bytes, appends them to the checkpoint's side file
//! ([`crate::checkpoint::side_file`]), waits for them to be durable, and only then writes. Each
//! block is preserved once and then leaves the list.
//!
//! One [`PreservedCheckpoint`] per checkpoint is shared by the [`ReferencedBlocks`] of all its
//! drives (they append to the same side file). It holds the checkpoint file open: once that
//! file has no name left (deleted, or replaced by a newer file), protection ends and the side
//! file is removed.
//!
//! Failure policy: the guest never sees an error because of preservation. If the old bytes
//! cannot be read or the side file cannot be written (disk full, I/O error), the checkpoint is
//! marked lost ([`crate::checkpoint::SideFileWriter::mark_lost`]), protection of it ends on
//! every drive, an error is logged, and the guest's write goes ahead; restoring that
//! checkpoint then fails saying its preserved blocks were lost, instead of resuming a guest
//! with wrong memory. Failing the guest's writes instead would turn a full host disk into a
//! broken guest filesystem, which is worse than losing one checkpoint.
//!
//! Only `VIRTIO_BLK_T_OUT` changes the image: the device offers neither discard nor
//! write-zeroes (`VIRTIO_BLK_F_DISCARD`, `VIRTIO_BLK_F_WRITE_ZEROES`), so the guest cannot send
//! them ([`super::request`] answers them `VIRTIO_BLK_S_UNSUPP`). A device that adds them must
//! call [`before_write`] for their ranges too.

use std::fs::File;
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use crate::checkpoint::side_file::{
    BLOCK_SIZE, CheckpointIdentity, SideFileError, SideFileWriter, side_path,
};
use crate::devices::virtio::ranges::RangeSet;

/// Why protection of a checkpoint's blocks cannot start.
#[derive(Debug, thiserror::Error)]
pub enum PreserveError {
    /// The checkpoint file cannot be opened or read.
    #[error("checkpoint {path:?}: {source}")]
    Checkpoint {
        /// The checkpoint.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The side file cannot be created.
    #[error(transparent)]
    Side(#[from] SideFileError),
    /// A referenced range is empty, not 4 KiB aligned, or wraps.
    #[error("referenced range {offset:#x}+{len:#x} is not whole, aligned 4 KiB blocks")]
    Range {
        /// Where it starts.
        offset: u64,
        /// Its length.
        len: u64,
    },
}

/// What became of a checkpoint's side file.
#[derive(Debug)]
enum SideState {
    /// Blocks are being preserved.
    Active(SideFileWriter),
    /// Preserving failed; the side file is marked lost.
    Lost,
    /// The checkpoint was deleted.
    Ended,
}

/// One checkpoint whose referenced blocks are protected, shared by its drives.
#[derive(Debug)]
pub struct PreservedCheckpoint {
    path: PathBuf,
    /// Held open so that its link count tells whether the checkpoint still exists.
    checkpoint: File,
    side: Mutex<SideState>,
}

impl PreservedCheckpoint {
    /// Starts protecting the checkpoint at `path`: opens it and creates its side file
    /// ([`side_path`]), replacing any older one. Call it while the VM is paused, before it
    /// resumes after the checkpoint.
    pub fn open(path: &Path) -> Result<Arc<Self>, PreserveError> {
        let err = |source| PreserveError::Checkpoint {
            path: path.to_owned(),
            source,
        };
        let checkpoint = File::open(path).map_err(err)?;
        let identity = CheckpointIdentity::of(&checkpoint).map_err(err)?;
        let writer = SideFileWriter::create(&side_path(path), identity)?;
        Ok(Arc::new(Self {
            path: path.to_owned(),
            checkpoint,
            side: Mutex::new(SideState::Active(writer)),
        }))
    }

    /// Protection of the checkpoint at `path` appending through `writer` (tests use it to
    /// make appends fail).
    #[cfg(test)]
    pub(crate) fn with_writer_for_test(path: &Path, writer: SideFileWriter) -> Arc<Self> {
        Arc::new(Self {
            path: path.to_owned(),
            checkpoint: File::open(path).expect("the test's checkpoint"),
            side: Mutex::new(SideState::Active(writer)),
        })
    }

    /// The checkpoint's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether blocks are still being preserved (not lost or deleted).
    pub fn is_active(&self) -> bool {
        matches!(*self.state(), SideState::Active(_))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SideState> {
        self.side.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the checkpoint file has no name left. An `fstat` that fails counts as not
    /// deleted: protecting too long is harmless.
    fn deleted(&self) -> bool {
        self.checkpoint.metadata().is_ok_and(|m| m.nlink() == 0)
    }

    /// Ends protection because the checkpoint is gone, and removes its side file if the side
    /// file's name is still this one's (a newer checkpoint at the same path has its own).
    fn end_deleted(&self) {
        let mut state = self.state();
        if let SideState::Active(writer) = &*state {
            let ours = (writer.file().metadata(), std::fs::metadata(writer.path()));
            if let (Ok(open), Ok(named)) = ours
                && (open.dev(), open.ino()) == (named.dev(), named.ino())
                && let Err(e) = std::fs::remove_file(writer.path())
            {
                tracing::warn!(
                    side_file = %writer.path().display(),
                    "the checkpoint was deleted but its side file cannot be removed: {e}"
                );
            }
            tracing::info!(
                checkpoint = %self.path.display(),
                "checkpoint deleted: its drive blocks are no longer preserved"
            );
        }
        *state = SideState::Ended;
    }

    /// Appends the old bytes of blocks of drive `drive` to the side file, durably. On failure
    /// marks the checkpoint lost (see the module documentation) and returns false.
    fn append(&self, drive: u32, blocks: &[(u64, &[u8])]) -> bool {
        let mut state = self.state();
        let SideState::Active(writer) = &mut *state else {
            return false;
        };
        match writer.append(drive, blocks) {
            Ok(()) => true,
            Err(e) => {
                drop(state);
                self.lose(&e.to_string());
                false
            }
        }
    }

    /// Marks the checkpoint lost because of `why` and ends its protection.
    fn lose(&self, why: &str) {
        let mut state = self.state();
        if let SideState::Active(writer) = &mut *state {
            let marked = writer.mark_lost();
            tracing::error!(
                checkpoint = %self.path.display(),
                side_file = %writer.path().display(),
                "cannot preserve drive blocks the checkpoint references ({why}); the guest's \
                 write goes ahead and the checkpoint can no longer be restored{}",
                match &marked {
                    Ok(()) => String::new(),
                    Err(e) => format!(" (marking its side file lost failed too: {e})"),
                }
            );
        }
        *state = SideState::Lost;
    }
}

/// The blocks of one drive that one checkpoint references and that the guest has not
/// overwritten since: the device preserves each before its first overwrite.
#[derive(Debug)]
pub struct ReferencedBlocks {
    checkpoint: Arc<PreservedCheckpoint>,
    drive: u32,
    /// Protected byte ranges, 4 KiB aligned.
    protected: RangeSet,
}

impl ReferencedBlocks {
    /// The blocks of drive `drive` (its index in the checkpoint's drive table) in `ranges`,
    /// each `(offset, len)` whole, aligned 4 KiB blocks, in any order (overlaps merge).
    pub fn new(
        checkpoint: Arc<PreservedCheckpoint>,
        drive: u32,
        ranges: &[(u64, u64)],
    ) -> Result<Self, PreserveError> {
        let mut protected = RangeSet::default();
        for &(offset, len) in ranges {
            let end = offset.checked_add(len).filter(|_| {
                len > 0 && offset.is_multiple_of(BLOCK_SIZE) && len.is_multiple_of(BLOCK_SIZE)
            });
            let Some(end) = end else {
                return Err(PreserveError::Range { offset, len });
            };
            protected.insert(offset, end);
        }
        Ok(Self {
            checkpoint,
            drive,
            protected,
        })
    }

    /// [`PreservedCheckpoint::open`] and [`Self::new`] in one, for a checkpoint that references
    /// one drive only.
    pub fn open(
        checkpoint: &Path,
        drive: u32,
        ranges: &[(u64, u64)],
    ) -> Result<Self, PreserveError> {
        Self::new(PreservedCheckpoint::open(checkpoint)?, drive, ranges)
    }

    /// The checkpoint's path.
    pub fn checkpoint(&self) -> &Path {
        self.checkpoint.path()
    }

    /// Whether this still protects blocks for the checkpoint file now at `path` (not lost,
    /// and that file not deleted or replaced since).
    pub fn protects(&self, path: &Path) -> bool {
        self.checkpoint.path() == path && self.checkpoint.is_active() && !self.checkpoint.deleted()
    }

    /// The drive's index in the checkpoint's drive table.
    pub fn drive(&self) -> u32 {
        self.drive
    }

    /// The protected ranges still waiting for a first overwrite, in order.
    pub fn protected(&self) -> Vec<(u64, u64)> {
        self.protected.0.iter().map(|(&s, &e)| (s, e - s)).collect()
    }

    /// Whether a byte of `start..end` is protected.
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.protected
            .0
            .range(..end)
            .next_back()
            .is_some_and(|(_, &e)| e > start)
    }

    /// Removes the protected blocks that `start..end` touches from the set and returns them as
    /// aligned `(offset, len)` ranges in order.
    fn take(&mut self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let lo = start - start % BLOCK_SIZE;
        let hi = end.div_ceil(BLOCK_SIZE).saturating_mul(BLOCK_SIZE);
        let set = &mut self.protected.0;
        let touched: Vec<(u64, u64)> = set
            .range(..hi)
            .rev()
            .take_while(|&(_, &e)| e > lo)
            .map(|(&s, &e)| (s, e))
            .collect();
        let mut taken = Vec::with_capacity(touched.len());
        for (s, e) in touched.into_iter().rev() {
            set.remove(&s);
            if s < lo {
                set.insert(s, lo);
            }
            if e > hi {
                set.insert(hi, e);
            }
            let (from, to) = (s.max(lo), e.min(hi));
            taken.push((from, to - from));
        }
        taken
    }
}

/// Preserves, for every checkpoint in `list`, the protected blocks that a guest write of bytes
/// `start..end` touches, reading their old bytes from `image`; called before the write reaches
/// the image. Drops the entries whose checkpoint was deleted or lost, and those with
/// nothing left to protect. The link count of a checkpoint is checked only when the write hits
/// one of its blocks.
pub(super) fn before_write(list: &mut Vec<ReferencedBlocks>, image: &File, start: u64, end: u64) {
    let mut buf = Vec::new();
    list.retain_mut(|refs| {
        if !refs.checkpoint.is_active() {
            return false;
        }
        if !refs.overlaps(start, end) {
            return true;
        }
        if refs.checkpoint.deleted() {
            refs.checkpoint.end_deleted();
            return false;
        }
        let taken = refs.take(start, end);
        let total: u64 = taken.iter().map(|&(_, len)| len).sum();
        // At most the request plus a block at each end: bounded by the request size limit.
        buf.resize(total as usize, 0);
        let mut at = 0usize;
        for &(offset, len) in &taken {
            let part = &mut buf[at..at + len as usize];
            if let Err(e) = read_block_bytes(image, part, offset) {
                refs.checkpoint
                    .lose(&format!("reading drive offset {offset:#x}: {e}"));
                return false;
            }
            at += len as usize;
        }
        let mut blocks = Vec::with_capacity(taken.len());
        let mut rest = &buf[..];
        for &(offset, len) in &taken {
            let (now, later) = rest.split_at(len as usize);
            blocks.push((offset, now));
            rest = later;
        }
        refs.checkpoint.append(refs.drive, &blocks) && !refs.protected.0.is_empty()
    });
}

/// Reads `buf.len()` bytes at `offset`; bytes past the end of the image (the rest of a last,
/// partial block) read as zero.
fn read_block_bytes(image: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match image.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

/// Ends protection for the checkpoint at `checkpoint` in `list` (see [`super::Block::release_preserved`]).
pub(super) fn release(list: &mut Vec<ReferencedBlocks>, checkpoint: &Path) -> bool {
    let before = list.len();
    list.retain(|refs| {
        if refs.checkpoint.path() != checkpoint {
            return true;
        }
        // Other drives may still protect blocks for it: only a deleted checkpoint ends for all.
        if refs.checkpoint.deleted() {
            refs.checkpoint.end_deleted();
        }
        false
    });
    list.len() != before
}
