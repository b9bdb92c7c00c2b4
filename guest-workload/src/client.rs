//! The client side of the control protocol: connect (optionally waiting for the workload to
//! finish its set-up and serve its socket), send one request, read the one-line JSON reply.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::protocol::{MAX_REPLY_LEN, Reply, Request, Status, VerifyReport};

/// How long a reply may take (a verify of a large workload in a slow guest takes a while).
const REPLY_TIMEOUT: Duration = Duration::from_secs(600);
/// Pause between connection attempts while waiting.
const RETRY: Duration = Duration::from_millis(100);

/// What can go wrong talking to a workload.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing serves the socket.
    #[error("no workload serves {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The last connection error.
        source: io::Error,
    },
    /// The connection failed mid-request.
    #[error("talking to the workload at {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The reply was not the protocol's.
    #[error("the workload at {path} sent a malformed reply: {reason}")]
    BadReply {
        /// The socket path.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The workload refused the request.
    #[error("the workload refused: {0}")]
    Refused(String),
}

/// A workload's control socket.
pub struct Control {
    path: PathBuf,
    wait: Duration,
}

impl Control {
    /// The socket at `path`; connections wait up to `wait` for it to be served (a workload
    /// binds it only when its set-up is complete).
    pub fn new(path: &Path, wait: Duration) -> Self {
        Self {
            path: path.to_path_buf(),
            wait,
        }
    }

    fn connect(&self) -> Result<UnixStream, ClientError> {
        let deadline = Instant::now() + self.wait;
        loop {
            match UnixStream::connect(&self.path) {
                Ok(stream) => return Ok(stream),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) && Instant::now() < deadline =>
                {
                    std::thread::sleep(RETRY);
                }
                Err(source) => {
                    return Err(ClientError::Connect {
                        path: self.path.clone(),
                        source,
                    });
                }
            }
        }
    }

    /// Sends `request` and returns the reply (an error reply becomes [`ClientError::Refused`]).
    pub fn request(&self, request: Request) -> Result<Reply, ClientError> {
        let io_err = |source| ClientError::Io {
            path: self.path.clone(),
            source,
        };
        let mut stream = self.connect()?;
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(io_err)?;
        stream
            .write_all(request.line().as_bytes())
            .map_err(io_err)?;
        let mut line = String::new();
        BufReader::new((&stream).take(MAX_REPLY_LEN as u64))
            .read_line(&mut line)
            .map_err(io_err)?;
        if !line.ends_with('\n') {
            return Err(self.bad_reply(if line.is_empty() {
                "the connection closed without a reply".into()
            } else {
                format!("no complete line within {MAX_REPLY_LEN} bytes")
            }));
        }
        match serde_json::from_str(&line) {
            Ok(Reply::Error { message }) => Err(ClientError::Refused(message)),
            Ok(reply) => Ok(reply),
            Err(e) => Err(self.bad_reply(e.to_string())),
        }
    }

    fn bad_reply(&self, reason: String) -> ClientError {
        ClientError::BadReply {
            path: self.path.clone(),
            reason,
        }
    }

    fn unexpected(&self, reply: &Reply) -> ClientError {
        self.bad_reply(format!("unexpected reply {reply:?}"))
    }

    /// `status`.
    pub fn status(&self) -> Result<Status, ClientError> {
        match self.request(Request::Status)? {
            Reply::Status(status) => Ok(status),
            other => Err(self.unexpected(&other)),
        }
    }

    /// `verify`.
    pub fn verify(&self) -> Result<VerifyReport, ClientError> {
        match self.request(Request::Verify)? {
            Reply::Verify(report) => Ok(report),
            other => Err(self.unexpected(&other)),
        }
    }

    /// `stop`: returns the final heartbeat count.
    pub fn stop(&self) -> Result<u64, ClientError> {
        match self.request(Request::Stop)? {
            Reply::Stopping { heartbeats } => Ok(heartbeats),
            other => Err(self.unexpected(&other)),
        }
    }

    /// `corrupt-page N`: returns the offset of the flipped byte.
    pub fn corrupt_page(&self, page: u64) -> Result<usize, ClientError> {
        match self.request(Request::CorruptPage(page))? {
            Reply::Corrupted { offset, .. } => Ok(offset),
            other => Err(self.unexpected(&other)),
        }
    }
}
