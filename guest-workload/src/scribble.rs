//! Writing a file through a shared memory mapping: the guest changes page-cache pages with
//! plain stores, no write(2), so only the page tables and the dirty log see it. Tests use it
//! to dirty cached pages while a checkpoint is being taken.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PAGE: usize = 4096;

/// Why scribbling failed.
#[derive(Debug, thiserror::Error)]
pub enum ScribbleError {
    /// The file cannot be opened or measured.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is empty or too large to map.
    #[error("{0} has no whole page to write")]
    Empty(PathBuf),
    /// The mapping failed.
    #[error("cannot map {path}: {source}")]
    Map {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Stores a counter into one page after another of `path` (cycling through its whole pages),
/// one page every `every`, through a shared writable mapping, until `duration` has passed.
/// Returns the number of pages written.
pub fn scribble(path: &Path, duration: Duration, every: Duration) -> Result<u64, ScribbleError> {
    let open_err = |source| ScribbleError::Open {
        path: path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(open_err)?;
    let len = usize::try_from(file.metadata().map_err(open_err)?.len()).unwrap_or(0);
    let pages = len / PAGE;
    if pages == 0 {
        return Err(ScribbleError::Empty(path.to_owned()));
    }
    // SAFETY: a new shared mapping of `pages` whole pages of an open file, at an address the
    // kernel chooses; nothing else in this process refers to that range.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            pages * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(ScribbleError::Map {
            path: path.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    let started = Instant::now();
    let mut written = 0u64;
    while started.elapsed() < duration {
        let page = (written as usize) % pages;
        // SAFETY: `page < pages`, so the 8 bytes at the start of that page lie inside the
        // mapping; the file is not truncated by this process while mapped (another process
        // truncating it would raise SIGBUS, which ends the scribbler, as intended for a test
        // tool).
        unsafe {
            base.cast::<u8>()
                .add(page * PAGE)
                .cast::<u64>()
                .write_volatile(written ^ 0x5c5c_5c5c_5c5c_5c5c);
        }
        written += 1;
        std::thread::sleep(every);
    }
    // SAFETY: unmapping exactly the mapping made above, which nothing uses any more.
    unsafe { libc::munmap(base, pages * PAGE) };
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_through_the_mapping_reach_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 3 * PAGE + 100]).unwrap();
        let n = scribble(&path, Duration::from_millis(50), Duration::from_millis(1)).unwrap();
        assert!(n >= 3, "{n}");
        let bytes = std::fs::read(&path).unwrap();
        for page in 0..3 {
            assert_ne!(bytes[page * PAGE..page * PAGE + 8], [0u8; 8], "page {page}");
        }
        assert!(
            bytes[3 * PAGE..].iter().all(|&b| b == 0),
            "the partial page is left"
        );
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(
            scribble(&path, Duration::ZERO, Duration::ZERO),
            Err(ScribbleError::Empty(_))
        ));
        assert!(matches!(
            scribble(&dir.path().join("missing"), Duration::ZERO, Duration::ZERO),
            Err(ScribbleError::Open { .. })
        ));
    }
}
