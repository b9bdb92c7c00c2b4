//! Filling the page cache: read every regular file under some folders once, with plain reads.
//! The walk does not follow symlinks and stays on the filesystem of each folder it starts from
//! (as `find -xdev`), so `--read /` reads the root disk and not `/proc` or `/sys`. Files that
//! cannot be read (permissions, vanished during the walk) are counted, not fatal.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Bytes read per system call.
const CHUNK: usize = 1 << 20;

/// What can go wrong before the walk starts.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// A folder to read is missing or not a folder.
    #[error("{path}: {problem}")]
    NotAFolder {
        /// The path given.
        path: PathBuf,
        /// Why it cannot be read.
        problem: String,
    },
}

/// What reading the folders did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadSummary {
    /// Regular files read to the end.
    pub files: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Files and folders that could not be read.
    pub errors: u64,
    /// The first such error, for the report.
    pub first_error: Option<String>,
}

impl ReadSummary {
    fn error(&mut self, path: &Path, e: &io::Error) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{}: {e}", path.display()));
        }
    }
}

/// Checks that every path of `dirs` is a folder.
pub fn check_folders(dirs: &[PathBuf]) -> Result<(), ReadError> {
    roots(dirs).map(drop)
}

/// Each folder with the device of its filesystem.
fn roots(dirs: &[PathBuf]) -> Result<Vec<(&PathBuf, u64)>, ReadError> {
    dirs.iter()
        .map(|dir| match fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => Ok((dir, meta.dev())),
            Ok(_) => Err(ReadError::NotAFolder {
                path: dir.clone(),
                problem: "not a folder".into(),
            }),
            Err(e) => Err(ReadError::NotAFolder {
                path: dir.clone(),
                problem: e.to_string(),
            }),
        })
        .collect()
}

/// Reads every regular file under each folder of `dirs` once. Every folder is checked before
/// anything is read.
pub fn read_folders(dirs: &[PathBuf]) -> Result<ReadSummary, ReadError> {
    let roots = roots(dirs)?;
    let mut summary = ReadSummary::default();
    let mut buf = vec![0u8; CHUNK];
    for (root, dev) in roots {
        let mut pending = vec![root.clone()];
        while let Some(dir) = pending.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) => {
                    summary.error(&dir, &e);
                    continue;
                }
            };
            for entry in entries {
                let entry = match entry {
                    Ok(entry) => entry,
                    Err(e) => {
                        summary.error(&dir, &e);
                        continue;
                    }
                };
                let path = entry.path();
                // Not followed: a symlink's own metadata, which is neither a file nor a folder.
                let meta = match entry.metadata() {
                    Ok(meta) => meta,
                    Err(e) => {
                        summary.error(&path, &e);
                        continue;
                    }
                };
                if meta.dev() != dev {
                    continue;
                }
                if meta.is_dir() {
                    pending.push(path);
                } else if meta.is_file() {
                    match read_to_end(&path, &mut buf) {
                        Ok(n) => {
                            summary.files += 1;
                            summary.bytes += n;
                        }
                        Err(e) => summary.error(&path, &e),
                    }
                }
            }
        }
    }
    Ok(summary)
}

fn read_to_end(path: &Path, buf: &mut [u8]) -> io::Result<u64> {
    let mut file = File::open(path)?;
    let mut total = 0u64;
    loop {
        match file.read(buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn every_regular_file_is_read_once_and_symlinks_are_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::write(root.join("top"), vec![1u8; 3000]).unwrap();
        fs::write(root.join("a/mid"), vec![2u8; CHUNK + 17]).unwrap();
        fs::write(root.join("a/b/empty"), b"").unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("big"), vec![3u8; 50_000]).unwrap();
        symlink(&outside, root.join("a/to-outside")).unwrap();
        symlink(outside.join("big"), root.join("link-to-big")).unwrap();

        let summary = read_folders(std::slice::from_ref(&root)).unwrap();
        assert_eq!(summary.files, 3);
        assert_eq!(summary.bytes, 3000 + CHUNK as u64 + 17);
        assert_eq!(summary.errors, 0);

        // Two folders: both are read.
        let both = read_folders(&[root, outside]).unwrap();
        assert_eq!(both.files, 4);
        assert_eq!(both.bytes, summary.bytes + 50_000);
    }

    #[test]
    fn missing_folders_and_plain_files_are_refused_before_reading() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("file");
        fs::write(&file, b"x").unwrap();
        let err = read_folders(&[tmp.path().to_path_buf(), file.clone()]).unwrap_err();
        assert!(err.to_string().contains("not a folder"), "{err}");
        let missing = tmp.path().join("missing");
        let err = read_folders(&[missing]).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn the_walk_stays_on_its_filesystem() {
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        assert_eq!(uid, 0, "this test mounts a tmpfs: run it as root");
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("here"), vec![0u8; 100]).unwrap();
        let mnt = tmp.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "workload-test"])
            .arg(&mnt)
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs: {status}");
        let written = fs::write(mnt.join("other-fs"), vec![0u8; 200]);
        let outer = read_folders(&[tmp.path().to_path_buf()]);
        let inner = read_folders(std::slice::from_ref(&mnt));
        let status = std::process::Command::new("umount")
            .arg(&mnt)
            .status()
            .unwrap();
        written.unwrap();
        assert!(status.success(), "umount: {status}");
        let (outer, inner) = (outer.unwrap(), inner.unwrap());
        assert_eq!((outer.files, outer.bytes), (1, 100));
        assert_eq!((inner.files, inner.bytes), (1, 200));
    }
}
