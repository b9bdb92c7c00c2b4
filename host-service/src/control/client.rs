//! A client of one VMM's control socket, with typed methods that speak the plain types of
//! [`super::handle`]; [`VmmClient::connect_vsock`] returns a byte stream to a guest vsock port.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use ditto_proto::vmm::v1 as pb;
use pb::connect_vsock_request::Body;
use pb::vmm_control_client::VmmControlClient;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tokio_util::io::StreamReader;
use tokio_util::sync::PollSender;
use tonic::transport::Channel;

use super::convert::InvalidReply;
use super::handle::{CheckpointResult, CheckpointSpec, StateChange, VmStatus};
use super::server::{TUNNEL_CHUNK, TUNNEL_DEPTH};

/// What can go wrong talking to a VMM.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The control socket could not be reached.
    #[error("cannot connect to the VMM control socket {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: tonic::transport::Error,
    },
    /// The VMM refused or failed the call; the status code says why (`FAILED_PRECONDITION`:
    /// wrong state or no vsock device, `UNAVAILABLE`: guest port unreachable, ...).
    #[error("the VMM answered {}: {}", .0.code(), .0.message())]
    Rpc(#[from] tonic::Status),
    /// The VMM's reply could not be read.
    #[error("the VMM sent an invalid reply: {0}")]
    InvalidReply(#[from] InvalidReply),
}

impl ClientError {
    /// The gRPC status code, when the VMM answered with an error.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::Rpc(status) => Some(status.code()),
            _ => None,
        }
    }
}

/// A channel to the control socket at `path`.
pub(crate) async fn channel(path: &Path) -> Result<Channel, ClientError> {
    crate::unix_socket::channel(path)
        .await
        .map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })
}

/// A client of one VMM's control socket. Cloning is cheap and shares the connection.
#[derive(Clone, Debug)]
pub struct VmmClient {
    inner: VmmControlClient<Channel>,
}

impl VmmClient {
    /// Connects to the control socket at `path`.
    pub async fn connect(path: &Path) -> Result<Self, ClientError> {
        Ok(Self {
            inner: VmmControlClient::new(channel(path).await?),
        })
    }

    /// What the VM is and how it is configured.
    pub async fn status(&self) -> Result<VmStatus, ClientError> {
        let reply = self.inner.clone().status(pb::StatusRequest {}).await?;
        Ok(reply.into_inner().try_into()?)
    }

    /// Pauses the VM; `FAILED_PRECONDITION` unless it is running.
    pub async fn pause(&self) -> Result<StateChange, ClientError> {
        let reply = self.inner.clone().pause(pb::PauseRequest {}).await?;
        Ok(reply.into_inner().try_into()?)
    }

    /// Resumes the VM; `FAILED_PRECONDITION` unless it is paused.
    pub async fn resume(&self) -> Result<StateChange, ClientError> {
        let reply = self.inner.clone().resume(pb::ResumeRequest {}).await?;
        Ok(reply.into_inner().try_into()?)
    }

    /// Asks the VMM to end; returns once the VMM took the request.
    pub async fn shutdown(&self) -> Result<(), ClientError> {
        self.inner.clone().shutdown(pb::ShutdownRequest {}).await?;
        Ok(())
    }

    /// Writes a checkpoint of the VM ([`VmmHandle::checkpoint`](super::VmmHandle::checkpoint)).
    pub async fn checkpoint(&self, spec: CheckpointSpec) -> Result<CheckpointResult, ClientError> {
        let reply = self
            .inner
            .clone()
            .checkpoint(pb::CheckpointRequest::from(spec))
            .await?;
        Ok(reply.into_inner().try_into()?)
    }

    /// Opens a tunnel to `port` of the guest's vsock. Returns once the guest accepted the
    /// connection; `FAILED_PRECONDITION` when the VM has no vsock device, `UNAVAILABLE` when
    /// nothing accepts on the port.
    pub async fn connect_vsock(&self, port: u32) -> Result<VsockStream, ClientError> {
        let (tx, rx) = mpsc::channel(TUNNEL_DEPTH);
        let open = pb::ConnectVsockRequest {
            body: Some(Body::Port(port)),
        };
        let outbound = tokio_stream::once(open).chain(ReceiverStream::new(rx));
        let inbound = self
            .inner
            .clone()
            .connect_vsock(outbound)
            .await?
            .into_inner()
            .map(|message| match message {
                Ok(message) => Ok(Bytes::from(message.data)),
                Err(status) => Err(io::Error::other(status)),
            });
        Ok(VsockStream {
            reader: StreamReader::new(Box::pin(inbound)),
            writer: PollSender::new(tx),
        })
    }
}

type Inbound = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// A byte stream to a guest vsock port through the control socket.
///
/// Reads return the guest's bytes, then end of file when the guest closes its side; a tunnel
/// the VMM ended with an error reads as an [`io::Error`] whose inner error is the
/// [`tonic::Status`]. Writes queue at most [`TUNNEL_DEPTH`] messages of at most
/// [`TUNNEL_CHUNK`] bytes (flush does not wait for the guest); `shutdown` ends the client's
/// side, which the guest reads as end of file. Dropping the stream closes both sides.
pub struct VsockStream {
    reader: StreamReader<Inbound, Bytes>,
    writer: PollSender<pb::ConnectVsockRequest>,
}

impl std::fmt::Debug for VsockStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockStream")
            .field("write_closed", &self.writer.is_closed())
            .finish_non_exhaustive()
    }
}

fn tunnel_closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the vsock tunnel is closed")
}

impl AsyncRead for VsockStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.reader).poll_read(cx, buf)
    }
}

impl AsyncWrite for VsockStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(self.writer.poll_reserve(cx)).map_err(|_| tunnel_closed())?;
        let n = buf.len().min(TUNNEL_CHUNK);
        let message = pb::ConnectVsockRequest {
            body: Some(Body::Data(buf[..n].to_vec())),
        };
        self.writer
            .send_item(message)
            .map_err(|_| tunnel_closed())?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.writer.close();
        Poll::Ready(Ok(()))
    }
}
