//! Copying a raw disk image the way its file system stores it: only the data extents
//! (`SEEK_DATA`/`SEEK_HOLE`), each with `copy_file_range` (which lets the kernel share or
//! offload the bytes where the file system can), holes left as holes, the copy fsynced. A guest
//! disk of a few GiB that holds a few hundred MiB copies in the time of those MiB.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use rustix::fs::SeekFrom;

/// Bytes `copy_file_range` is asked for at once.
const STEP: usize = 64 << 20;

/// Why an image could not be copied.
#[derive(Debug, thiserror::Error)]
#[error("cannot copy disk image {from} to {to}: {source}")]
pub struct CopyError {
    /// The source image.
    pub from: PathBuf,
    /// The copy.
    pub to: PathBuf,
    /// Why.
    #[source]
    pub source: io::Error,
}

/// What a copy took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Copied {
    /// The image's length (the copy has the same).
    pub len: u64,
    /// Bytes of data copied (the holes are not).
    pub data_bytes: u64,
    /// Bytes the copy occupies on disk.
    pub allocated_bytes: u64,
}

/// Copies the image at `from` to a new file `to` (which must not exist), sparse.
pub fn copy_sparse(from: &Path, to: &Path) -> Result<Copied, CopyError> {
    let err = |source| CopyError {
        from: from.to_owned(),
        to: to.to_owned(),
        source,
    };
    let src = File::open(from).map_err(err)?;
    let len = src.metadata().map_err(err)?.len();
    let dst = File::options()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(err)?;
    let copied = copy_extents(&src, &dst, len).and_then(|data_bytes| {
        dst.set_len(len)?;
        dst.sync_all()?;
        Ok(Copied {
            len,
            data_bytes,
            allocated_bytes: dst.metadata()?.blocks() * 512,
        })
    });
    if copied.is_err() {
        let _ = std::fs::remove_file(to);
    }
    copied.map_err(err)
}

/// Copies every data extent of `src` (of length `len`) to the same offset of `dst`; returns
/// the bytes copied.
fn copy_extents(src: &File, dst: &File, len: u64) -> io::Result<u64> {
    let mut at = 0u64;
    let mut copied = 0u64;
    while at < len {
        let start = match rustix::fs::seek(src, SeekFrom::Data(at)) {
            Ok(s) => s,
            // No data after `at`: the rest is a hole.
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = rustix::fs::seek(src, SeekFrom::Hole(start))?.min(len);
        let mut off_in = start;
        let mut off_out = start;
        while off_in < end {
            let want = usize::try_from(end - off_in).unwrap_or(STEP).min(STEP);
            let n =
                rustix::fs::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), want)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the image ended at {off_in} while being copied"),
                ));
            }
            copied += n as u64;
        }
        at = end;
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt as _;

    #[test]
    fn data_is_copied_and_holes_stay_holes() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("disk.img");
        let f = File::create(&from).unwrap();
        let len = 64u64 << 20;
        f.set_len(len).unwrap();
        let a: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        f.write_all_at(&a, 0).unwrap();
        f.write_all_at(&a, 40 << 20).unwrap();
        f.write_all_at(b"tail", len - 4).unwrap();
        f.sync_all().unwrap();

        let to = dir.path().join("copy.img");
        let copied = copy_sparse(&from, &to).unwrap();
        assert_eq!(copied.len, len);
        assert_eq!(std::fs::read(&from).unwrap(), std::fs::read(&to).unwrap());
        // Data extents and their block rounding; far less than the whole length.
        assert!(copied.data_bytes >= (2 << 20) + 4, "{copied:?}");
        assert!(copied.allocated_bytes < 8 << 20, "{copied:?}");

        let again = copy_sparse(&from, &to).unwrap_err();
        assert_eq!(again.source.kind(), io::ErrorKind::AlreadyExists);
        let missing = copy_sparse(&dir.path().join("nope"), &dir.path().join("x")).unwrap_err();
        assert_eq!(missing.source.kind(), io::ErrorKind::NotFound);
        assert!(!dir.path().join("x").exists());
    }
}
