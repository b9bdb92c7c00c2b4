//! The workload's control socket: claiming its path (a stale socket left by a workload that
//! died is replaced; a live one, or anything that is not a socket, is refused), and serving the
//! [`protocol`](crate::protocol) one request at a time until `stop`.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::protocol::{MAX_REQUEST_LEN, Reply, Request};
use crate::workload::Workload;

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to take the reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// What can go wrong with the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another workload answers on the path.
    #[error("{0}: another workload is serving this socket")]
    InUse(PathBuf),
    /// Something other than a socket is at the path; it is left alone.
    #[error("{0}: exists and is not a socket (not replaced)")]
    NotASocket(PathBuf),
    /// The path could not be examined, cleared or bound.
    #[error("{path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// Makes sure a control socket can be bound at `path`: nothing there, or a stale socket (which
/// is removed). Call it before a long set-up to fail early; [`Server::bind`] calls it again.
pub fn claim(path: &Path) -> Result<(), ServerError> {
    let io_err = |source| ServerError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ServerError::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ServerError::InUse(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            fs::remove_file(path).map_err(io_err)
        }
        Err(e) => Err(io_err(e)),
    }
}

/// A workload serving its control socket.
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    /// The inode of the socket this server bound, so that it removes only its own.
    ino: u64,
    workload: Workload,
}

impl Server {
    /// Binds the control socket at `path` for `workload`.
    pub fn bind(path: &Path, workload: Workload) -> Result<Self, ServerError> {
        claim(path)?;
        let io_err = |source| ServerError::Io {
            path: path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(io_err)?;
        let ino = fs::symlink_metadata(path).map_err(io_err)?.ino();
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            ino,
            workload,
        })
    }

    /// The workload.
    pub fn workload(&self) -> &Workload {
        &self.workload
    }

    /// Serves requests until `stop`, then removes the socket.
    pub fn run(mut self) -> Result<(), ServerError> {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if is_transient(&e) => {
                    // Out of descriptors or memory for a moment: let it pass, do not spin.
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                Err(source) => {
                    return Err(ServerError::Io {
                        path: self.path.clone(),
                        source,
                    });
                }
            };
            if self.serve_one(stream) {
                return Ok(());
            }
        }
    }

    /// Answers one connection; true when the request was `stop`.
    fn serve_one(&mut self, stream: UnixStream) -> bool {
        let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
        let _ = stream.set_write_timeout(Some(REPLY_TIMEOUT));
        let mut line = String::new();
        let read = BufReader::new((&stream).take(MAX_REQUEST_LEN as u64)).read_line(&mut line);
        let (reply, stop) = match read {
            // A connection that closes without a request: a liveness probe such as `claim`'s.
            Ok(0) => return false,
            Ok(_) if !line.ends_with('\n') => (
                Reply::Error {
                    message: format!("a request is one line of at most {MAX_REQUEST_LEN} bytes"),
                },
                false,
            ),
            Ok(_) => self.answer(&line),
            Err(e) => (
                Reply::Error {
                    message: format!("reading the request: {e}"),
                },
                false,
            ),
        };
        if let Ok(mut text) = serde_json::to_string(&reply) {
            text.push('\n');
            let _ = (&stream).write_all(text.as_bytes());
        }
        stop
    }

    fn answer(&mut self, line: &str) -> (Reply, bool) {
        let request = match Request::parse(line) {
            Ok(request) => request,
            Err(e) => {
                return (
                    Reply::Error {
                        message: e.to_string(),
                    },
                    false,
                );
            }
        };
        match request {
            Request::Status => (Reply::Status(self.workload.status()), false),
            Request::Verify => (Reply::Verify(self.workload.verify()), false),
            Request::Stop => (
                Reply::Stopping {
                    heartbeats: self.workload.heartbeats(),
                },
                true,
            ),
            Request::CorruptPage(page) => match self.workload.corrupt_page(page) {
                Ok(offset) => (Reply::Corrupted { page, offset }, false),
                Err(e) => (
                    Reply::Error {
                        message: e.to_string(),
                    },
                    false,
                ),
            },
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::ECONNABORTED)
    ) || e.kind() == io::ErrorKind::Interrupted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_sockets_are_replaced_and_other_files_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("ctl.sock");
        claim(&path).unwrap();

        // A socket nobody listens on any more.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        claim(&path).unwrap();
        assert!(!path.exists());

        // A live listener.
        let live = UnixListener::bind(&path).unwrap();
        assert!(matches!(claim(&path), Err(ServerError::InUse(_))));
        drop(live);

        // A plain file is never removed.
        fs::remove_file(&path).unwrap();
        fs::write(&path, b"keep me").unwrap();
        assert!(matches!(claim(&path), Err(ServerError::NotASocket(_))));
        assert_eq!(fs::read(&path).unwrap(), b"keep me");
    }
}
