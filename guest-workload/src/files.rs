//! The workload's files: `count` files of seeded content totalling a given size, written into a
//! folder, fsynced (files and folder) and recorded with their SHA-256; verified later by reading
//! them back with plain reads (through the page cache, as any program would) and comparing.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::pattern::{PAGE_SIZE, Pattern, Stream};

/// Bytes written or read per system call.
const CHUNK: usize = 1 << 20;

/// What can go wrong while writing the files.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// No files asked for.
    #[error("the file count must be at least 1")]
    NoFiles,
    /// Fewer bytes than files.
    #[error("{bytes} bytes cannot be spread over {count} files")]
    TooSmall {
        /// Total bytes asked for.
        bytes: u64,
        /// Files asked for.
        count: u64,
    },
    /// A file or the folder could not be created, written or synced.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> FilesError + '_ {
    move |source| FilesError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sha256Digest(pub [u8; 32]);

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// One written file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileRecord {
    /// Where it is.
    pub path: PathBuf,
    /// Its length in bytes.
    pub size: u64,
    /// The SHA-256 of its content.
    pub sha256: Sha256Digest,
}

/// Why a file failed its check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileProblem {
    /// Its bytes hash differently.
    Content {
        /// The hash of what was read.
        sha256: Sha256Digest,
    },
    /// It has another length.
    Size {
        /// Its length now.
        size: u64,
    },
    /// It could not be opened or read.
    Unreadable {
        /// The error.
        error: String,
    },
}

impl fmt::Display for FileProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Content { sha256 } => write!(f, "content differs (sha256 {sha256})"),
            Self::Size { size } => write!(f, "size is now {size} bytes"),
            Self::Unreadable { error } => write!(f, "unreadable: {error}"),
        }
    }
}

/// The result of checking the files.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FilesCheck {
    /// Files checked.
    pub checked: u64,
    /// Bytes read back.
    pub bytes_read: u64,
    /// The files that failed, with why.
    pub bad: Vec<(PathBuf, FileProblem)>,
}

/// The name of file `index` in the folder.
pub fn file_name(index: u64) -> String {
    format!("ditto-workload-{index:04}.bin")
}

/// Writes `count` files of together `bytes` bytes into `dir` (created if missing; files of the
/// same names are replaced), with content from `seed`, and makes them durable: each file is
/// fsynced, then the folder. Sizes differ by at most one byte.
pub fn write_files(
    dir: &Path,
    count: u64,
    bytes: u64,
    seed: u64,
) -> Result<Vec<FileRecord>, FilesError> {
    if count == 0 {
        return Err(FilesError::NoFiles);
    }
    if bytes < count {
        return Err(FilesError::TooSmall { bytes, count });
    }
    fs::create_dir_all(dir).map_err(io_at(dir))?;
    let mut buf = vec![0u8; CHUNK];
    let mut records = Vec::new();
    for index in 0..count {
        let size = bytes / count + u64::from(index < bytes % count);
        let path = dir.join(file_name(index));
        let sha256 = write_one(
            &path,
            size,
            Pattern::new(seed, Stream::File(index)),
            &mut buf,
        )
        .map_err(io_at(&path))?;
        records.push(FileRecord { path, size, sha256 });
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))?;
    Ok(records)
}

fn write_one(path: &Path, size: u64, pattern: Pattern, buf: &mut [u8]) -> io::Result<Sha256Digest> {
    let mut file = File::create(path)?;
    let mut hash = Sha256::new();
    let mut page = 0u64;
    let mut left = size;
    while left > 0 {
        let n = (left.min(buf.len() as u64)) as usize;
        for chunk in buf[..n].chunks_mut(PAGE_SIZE) {
            pattern.fill_page(page, chunk);
            page += 1;
        }
        file.write_all(&buf[..n])?;
        hash.update(&buf[..n]);
        left -= n as u64;
    }
    file.sync_all()?;
    Ok(Sha256Digest(hash.finalize().into()))
}

/// Reads every recorded file back and compares its length and hash.
pub fn verify_files(records: &[FileRecord]) -> FilesCheck {
    let mut check = FilesCheck::default();
    let mut buf = vec![0u8; CHUNK];
    for record in records {
        check.checked += 1;
        let problem = match hash_file(&record.path, &mut buf) {
            Ok((size, sha256)) => {
                check.bytes_read += size;
                if size != record.size {
                    Some(FileProblem::Size { size })
                } else if sha256 != record.sha256 {
                    Some(FileProblem::Content { sha256 })
                } else {
                    None
                }
            }
            Err(e) => Some(FileProblem::Unreadable {
                error: e.to_string(),
            }),
        };
        if let Some(problem) = problem {
            check.bad.push((record.path.clone(), problem));
        }
    }
    check
}

/// Reads a whole file, returning its length and SHA-256.
fn hash_file(path: &Path, buf: &mut [u8]) -> io::Result<(u64, Sha256Digest)> {
    let mut file = File::open(path)?;
    let mut hash = Sha256::new();
    let mut size = 0u64;
    loop {
        let n = match file.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hash.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, Sha256Digest(hash.finalize().into())))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    #[test]
    fn files_are_written_durably_with_their_hashes_and_verify() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("new/files");
        let bytes = 3 * CHUNK as u64 + 5;
        let records = write_files(&dir, 3, bytes, 9).unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(records.iter().map(|r| r.size).sum::<u64>(), bytes);
        assert_eq!(
            records.iter().map(|r| r.size).collect::<Vec<_>>(),
            vec![CHUNK as u64 + 2, CHUNK as u64 + 2, CHUNK as u64 + 1]
        );
        for (index, record) in (0..).zip(&records) {
            assert_eq!(record.path, dir.join(file_name(index)));
            let content = fs::read(&record.path).unwrap();
            assert_eq!(content.len() as u64, record.size);
            assert_eq!(Sha256Digest(Sha256::digest(&content).into()), record.sha256);
            // The content is the file's pattern stream, page by page.
            let pattern = Pattern::new(9, Stream::File(index));
            assert_eq!(
                pattern.check_page(7, &content[7 * PAGE_SIZE..8 * PAGE_SIZE]),
                None
            );
        }
        assert_ne!(records[0].sha256, records[1].sha256);
        let check = verify_files(&records);
        assert_eq!(check.checked, 3);
        assert_eq!(check.bytes_read, bytes);
        assert!(check.bad.is_empty(), "{:?}", check.bad);
        // The same seed writes the same files again.
        assert_eq!(write_files(&dir, 3, bytes, 9).unwrap(), records);
    }

    #[test]
    fn a_flipped_byte_a_changed_length_and_a_missing_file_are_each_named() {
        let tmp = tempfile::tempdir().unwrap();
        let records = write_files(tmp.path(), 4, 4 * 100_000, 1).unwrap();
        let file = fs::OpenOptions::new()
            .write(true)
            .open(&records[1].path)
            .unwrap();
        let mut byte = [0u8];
        File::open(&records[1].path)
            .unwrap()
            .read_exact_at(&mut byte, 54_321)
            .unwrap();
        file.write_all_at(&[byte[0] ^ 0x80], 54_321).unwrap();
        fs::OpenOptions::new()
            .append(true)
            .open(&records[2].path)
            .unwrap()
            .write_all(b"x")
            .unwrap();
        fs::remove_file(&records[3].path).unwrap();

        let check = verify_files(&records);
        assert_eq!(check.checked, 4);
        let bad: Vec<_> = check.bad.iter().map(|(p, _)| p.clone()).collect();
        assert_eq!(
            bad,
            vec![
                records[1].path.clone(),
                records[2].path.clone(),
                records[3].path.clone()
            ]
        );
        assert!(matches!(check.bad[0].1, FileProblem::Content { .. }));
        assert_eq!(check.bad[1].1, FileProblem::Size { size: 100_001 });
        assert!(matches!(check.bad[2].1, FileProblem::Unreadable { .. }));
        assert!(check.bad[2].1.to_string().contains("unreadable"));

        // Flipping the byte back makes that file good again.
        file.write_all_at(&byte, 54_321).unwrap();
        assert_eq!(verify_files(&records[..2]).bad, vec![]);
    }

    #[test]
    fn impossible_requests_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(matches!(
            write_files(tmp.path(), 0, 10, 1),
            Err(FilesError::NoFiles)
        ));
        assert!(matches!(
            write_files(tmp.path(), 5, 4, 1),
            Err(FilesError::TooSmall { .. })
        ));
        let not_a_dir = tmp.path().join("plain");
        fs::write(&not_a_dir, b"").unwrap();
        let err = write_files(&not_a_dir.join("sub"), 1, 10, 1).unwrap_err();
        assert!(err.to_string().contains("plain"), "{err}");
    }
}
