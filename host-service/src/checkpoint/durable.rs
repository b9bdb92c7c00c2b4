//! Crash-safe creation of a file at its final name.
//!
//! The file is written without a name in the destination directory (`O_TMPFILE`) where the
//! filesystem supports it, else under a hidden temporary name (`.NAME.PID.N.tmp`) there. When it
//! is complete it is fsynced and given its final name — an unnamed file is linked there at
//! once when the name is free, else linked under a temporary name and renamed over it, as a
//! named file is — and the directory is fsynced. So at every instant the final name holds either
//! what it held before or the complete new file; a crash leaves nothing behind for an unnamed
//! file at a new name, and at most a hidden temporary file otherwise (for an instant before the
//! rename when an unnamed file replaces one); dropping an unfinished file removes it.

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{AtFlags, CWD, Mode, OFlags};

use super::error::WriteError;

/// Permissions of a new checkpoint: guest memory holds the guest's secrets.
const FILE_MODE: u32 = 0o600;

/// Tries at a fresh temporary name before giving up.
const NAME_TRIES: u32 = 16;

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A file being written for a final path; it appears there only through [`Self::persist`].
#[derive(Debug)]
pub struct PendingFile {
    file: File,
    dir: File,
    dir_path: PathBuf,
    final_name: OsString,
    path: PathBuf,
    /// The temporary name while the file has one and is ours to remove.
    temp_name: Option<OsString>,
}

impl PendingFile {
    /// Starts a file for `path`: unnamed if the filesystem allows, else under a temporary name.
    pub fn create(path: &Path) -> Result<Self, WriteError> {
        Self::create_unnamed(path).or_else(|_| Self::create_named(path))
    }

    /// Starts an unnamed (`O_TMPFILE`) file in the directory of `path`.
    pub fn create_unnamed(path: &Path) -> Result<Self, WriteError> {
        let (dir, dir_path, final_name) = open_dir(path)?;
        let fd = rustix::fs::openat(
            &dir,
            ".",
            OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
            Mode::from_raw_mode(FILE_MODE),
        )
        .map_err(|e| io_error("creating an unnamed file in", &dir_path, e.into()))?;
        Ok(Self {
            file: File::from(fd),
            dir,
            dir_path,
            final_name,
            path: path.to_owned(),
            temp_name: None,
        })
    }

    /// Starts a file under a hidden temporary name in the directory of `path`.
    pub fn create_named(path: &Path) -> Result<Self, WriteError> {
        let (dir, dir_path, final_name) = open_dir(path)?;
        let mut last = None;
        for _ in 0..NAME_TRIES {
            let name = temp_name(&final_name);
            match rustix::fs::openat(
                &dir,
                name.as_os_str(),
                OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::CLOEXEC,
                Mode::from_raw_mode(FILE_MODE),
            ) {
                Ok(fd) => {
                    return Ok(Self {
                        file: File::from(fd),
                        dir,
                        dir_path,
                        final_name,
                        path: path.to_owned(),
                        temp_name: Some(name),
                    });
                }
                Err(rustix::io::Errno::EXIST) => last = Some(rustix::io::Errno::EXIST),
                Err(e) => {
                    return Err(io_error(
                        "creating a temporary file in",
                        &dir_path,
                        e.into(),
                    ));
                }
            }
        }
        let err = last.unwrap_or(rustix::io::Errno::EXIST);
        Err(io_error(
            "creating a temporary file in",
            &dir_path,
            err.into(),
        ))
    }

    /// The file being written.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The final path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The temporary path while the file has one (`None` for an unnamed file).
    pub fn temp_path(&self) -> Option<PathBuf> {
        self.temp_name.as_ref().map(|n| self.dir_path.join(n))
    }

    /// Makes the complete file durable and gives it its final name, replacing any file there:
    /// fsync the file, name it, rename it into place, fsync the directory.
    pub fn persist(mut self) -> Result<(), WriteError> {
        self.file
            .sync_all()
            .map_err(|e| io_error("syncing", &self.path, e))?;
        let temp = match self.temp_name.clone() {
            Some(name) => name,
            None => {
                // A new final name is linked at once: no temporary name ever exists.
                match self.link_as(&self.final_name) {
                    Ok(()) => return self.sync_dir(),
                    Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(io_error("naming", &self.path, e.into())),
                }
                let name = self.link_unnamed()?;
                self.temp_name = Some(name.clone());
                name
            }
        };
        rustix::fs::renameat(&self.dir, temp.as_os_str(), &self.dir, &self.final_name)
            .map_err(|e| io_error("renaming into place", &self.path, e.into()))?;
        // The temporary name is gone: nothing for Drop to remove.
        self.temp_name = None;
        self.sync_dir()
    }

    fn sync_dir(&self) -> Result<(), WriteError> {
        rustix::fs::fsync(&self.dir)
            .map_err(|e| io_error("syncing the directory", &self.dir_path, e.into()))
    }

    /// Links the unnamed file as `name` in its directory (`EEXIST` when the name is taken).
    /// `AT_EMPTY_PATH` needs `CAP_DAC_READ_SEARCH`; without it the file is linked through
    /// `/proc/self/fd`.
    fn link_as(&self, name: &std::ffi::OsStr) -> Result<(), rustix::io::Errno> {
        let direct =
            rustix::fs::linkat(self.file.as_fd(), "", &self.dir, name, AtFlags::EMPTY_PATH);
        match direct {
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::PERM) => {
                let proc_path = format!("/proc/self/fd/{}", fd_number(&self.file));
                rustix::fs::linkat(
                    CWD,
                    proc_path.as_str(),
                    &self.dir,
                    name,
                    AtFlags::SYMLINK_FOLLOW,
                )
            }
            other => other,
        }
    }

    /// Gives the unnamed file a temporary name (the final name is taken: the rename will
    /// replace it).
    fn link_unnamed(&self) -> Result<OsString, WriteError> {
        let mut last = rustix::io::Errno::EXIST;
        for _ in 0..NAME_TRIES {
            let name = temp_name(&self.final_name);
            match self.link_as(&name) {
                Ok(()) => return Ok(name),
                Err(rustix::io::Errno::EXIST) => last = rustix::io::Errno::EXIST,
                Err(e) => return Err(io_error("naming", &self.path, e.into())),
            }
        }
        Err(io_error("naming", &self.path, last.into()))
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if let Some(name) = self.temp_name.take() {
            // Best effort: an unfinished file must not linger; there is nobody to tell if the
            // directory refuses.
            let _ = rustix::fs::unlinkat(&self.dir, name.as_os_str(), AtFlags::empty());
        }
    }
}

fn fd_number(file: &File) -> i32 {
    use std::os::fd::AsRawFd as _;
    file.as_raw_fd()
}

/// Opens the directory of `path` and returns it with its path and the final file name.
fn open_dir(path: &Path) -> Result<(File, PathBuf, OsString), WriteError> {
    let final_name = path
        .file_name()
        .ok_or_else(|| WriteError::Path {
            path: path.to_owned(),
            reason: "it does not end in a file name",
        })?
        .to_owned();
    let dir_path = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let dir = rustix::fs::openat(
        CWD,
        &dir_path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_error("opening directory", &dir_path, e.into()))?;
    Ok((File::from(dir), dir_path, final_name))
}

/// A fresh hidden name beside `final_name`.
fn temp_name(final_name: &OsString) -> OsString {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut name = OsString::from(".");
    name.push(final_name);
    name.push(format!(".{}.{n}.tmp", std::process::id()));
    name
}

fn io_error(op: &'static str, path: &Path, source: std::io::Error) -> WriteError {
    WriteError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}
