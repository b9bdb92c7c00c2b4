//! Serving Unix sockets safely: [`OwnerOnlySocket::bind`] binds a listening socket owner-only
//! (mode 0600), replaces a stale socket file that nobody accepts on, refuses a live one or
//! anything that is not a socket, and removes the socket file when dropped — but only if the
//! path still names the socket bound here. The VMM's control socket and `dittod`'s API socket
//! both use it. [`channel`] is the client side: a tonic channel to a Unix socket.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;
use tonic::transport::{Channel, Endpoint, Uri};

/// A tonic channel to the gRPC server on the Unix socket at `path` (connected now).
pub async fn channel(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let socket = path.to_owned();
    Endpoint::from_static("http://unix.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
}

/// Why a socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Something that is not a socket is at the path; it is left alone.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// A live socket is at the path: another process serves on it.
    #[error("another process is serving on {0}")]
    InUse(PathBuf),
    /// The path could not be inspected, cleared or bound.
    #[error("cannot listen on {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// Removes the socket file when dropped, if the path still names the socket bound here.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && m.dev() == self.dev && m.ino() == self.ino)
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A bound, owner-only Unix socket. Dropping it (or the [`SocketFile`] of
/// [`into_parts`](Self::into_parts)) removes the socket file.
#[derive(Debug)]
pub struct OwnerOnlySocket {
    listener: UnixListener,
    file: SocketFile,
}

impl OwnerOnlySocket {
    /// Binds a Unix socket at `path`, owner-only (mode 0600). A stale socket file (nobody
    /// accepts on it) is replaced; a live one is [`BindError::InUse`], anything else at the path
    /// is [`BindError::NotASocket`]. Must be called inside a tokio runtime.
    pub fn bind(path: &Path) -> Result<Self, BindError> {
        let io_error = |source| BindError::Io {
            path: path.to_owned(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(e)),
            Ok(m) if !m.file_type().is_socket() => {
                return Err(BindError::NotASocket(path.to_owned()));
            }
            Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(BindError::InUse(path.to_owned())),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path).map_err(io_error)?;
                }
                Err(e) => return Err(io_error(e)),
            },
        }
        let listener = UnixListener::bind(path).map_err(io_error)?;
        let meta = std::fs::symlink_metadata(path).map_err(io_error)?;
        let file = SocketFile {
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_error)?;
        Ok(Self { listener, file })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// The listener, and the guard that removes the socket file when dropped.
    pub fn into_parts(self) -> (UnixListener, SocketFile) {
        (self.listener, self.file)
    }
}
