//! The `ditto.vmm.v1.VmmControl` server: serves a [`VmmHandle`] on a Unix socket until a
//! shutdown future fires, then removes the socket file.
//!
//! `ConnectVsock` tunnels pump between the gRPC streams and the Unix stream the handle returns,
//! one task a direction, at most [`TUNNEL_DEPTH`] messages of at most [`TUNNEL_CHUNK`] bytes
//! queued a direction. When the shutdown future fires, open tunnels end with `UNAVAILABLE` and
//! the server stops; calls still running after [`SHUTDOWN_GRACE`] are dropped.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ditto_proto::vmm::v1 as pb;
use pb::connect_vsock_request::Body;
use pb::vmm_control_server::{VmmControl, VmmControlServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status, Streaming};

use super::convert::checkpoint_spec_from_pb;
use super::handle::{StateChange, VmState, VmmError, VmmHandle};
use crate::unix_socket::{BindError, OwnerOnlySocket};

/// Most bytes one tunnel message carries.
pub const TUNNEL_CHUNK: usize = 64 * 1024;
/// Most messages a tunnel queues a direction.
pub const TUNNEL_DEPTH: usize = 8;
/// How long calls may run on after the shutdown future fired.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// What can go wrong while serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Something that is not a socket is at the path; it is left alone.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// A live socket is at the path: another process serves on it.
    #[error("another process is serving on {0}")]
    InUse(PathBuf),
    /// The path could not be inspected, cleared or bound.
    #[error("cannot listen on {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The server failed.
    #[error("serving on {path} failed: {source}")]
    Serve {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: tonic::transport::Error,
    },
}

impl From<BindError> for ServeError {
    fn from(e: BindError) -> Self {
        match e {
            BindError::NotASocket(path) => Self::NotASocket(path),
            BindError::InUse(path) => Self::InUse(path),
            BindError::Io { path, source } => Self::Bind { path, source },
        }
    }
}

/// A bound control socket, not yet served. Dropping it removes the socket file.
#[derive(Debug)]
pub struct ControlSocket {
    socket: OwnerOnlySocket,
}

impl ControlSocket {
    /// Binds a Unix socket at `path`, owner-only (mode 0600). A stale socket file (nobody
    /// accepts on it) is replaced; a live one is [`ServeError::InUse`], anything else at the path
    /// is [`ServeError::NotASocket`]. Must be called inside a tokio runtime.
    pub fn bind(path: &Path) -> Result<Self, ServeError> {
        Ok(Self {
            socket: OwnerOnlySocket::bind(path)?,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        self.socket.path()
    }

    /// Serves `handle` until `shutdown` completes, then removes the socket file.
    pub async fn serve(
        self,
        handle: Arc<dyn VmmHandle>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        let (listener, file) = self.socket.into_parts();
        let (stop_tx, stop) = watch::channel(false);
        let mut stopped = stop.clone();
        let service = ControlService { handle, stop };
        let signal = async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        };
        let server = tonic::transport::Server::builder()
            .add_service(VmmControlServer::new(service))
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), signal);
        let grace_over = async move {
            let _ = stopped.wait_for(|s| *s).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        let result = tokio::select! {
            result = server => result.map_err(|source| ServeError::Serve {
                path: file.path().to_owned(),
                source,
            }),
            () = grace_over => Ok(()),
        };
        drop(file);
        result
    }
}

/// Binds a control socket at `path` ([`ControlSocket::bind`]) and serves `handle` on it until
/// `shutdown` completes ([`ControlSocket::serve`]).
pub async fn serve(
    path: &Path,
    handle: Arc<dyn VmmHandle>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    ControlSocket::bind(path)?.serve(handle, shutdown).await
}

/// The gRPC status for a refusal of the VMM.
fn status_of(error: VmmError) -> Status {
    match error {
        VmmError::WrongState { .. } | VmmError::NoVsock => {
            Status::failed_precondition(error.to_string())
        }
        VmmError::PortUnreachable { .. } => Status::unavailable(error.to_string()),
        VmmError::InvalidArgument(_) => Status::invalid_argument(error.to_string()),
        VmmError::Failed(_) => Status::internal(error.to_string()),
    }
}

struct ControlService {
    handle: Arc<dyn VmmHandle>,
    /// Turns true when the server is stopping.
    stop: watch::Receiver<bool>,
}

impl ControlService {
    /// Runs `call` on the handle on tokio's blocking pool.
    async fn call<T: Send + 'static>(
        &self,
        call: impl FnOnce(&dyn VmmHandle) -> T + Send + 'static,
    ) -> Result<T, Status> {
        let handle = self.handle.clone();
        tokio::task::spawn_blocking(move || call(handle.as_ref()))
            .await
            .map_err(|e| Status::internal(format!("the VMM call failed: {e}")))
    }

    /// Runs a pause or a resume and times it.
    async fn transition(
        &self,
        op: fn(&dyn VmmHandle) -> Result<VmState, VmmError>,
    ) -> Result<Response<pb::StateChange>, Status> {
        let change = self
            .call(move |handle| {
                let start = Instant::now();
                op(handle).map(|state| StateChange {
                    state,
                    elapsed: start.elapsed(),
                })
            })
            .await?
            .map_err(status_of)?;
        Ok(Response::new(change.into()))
    }
}

#[tonic::async_trait]
impl VmmControl for ControlService {
    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let status = self.call(|handle| handle.status()).await?;
        Ok(Response::new(status.into()))
    }

    async fn pause(
        &self,
        _request: Request<pb::PauseRequest>,
    ) -> Result<Response<pb::StateChange>, Status> {
        self.transition(|handle| handle.pause()).await
    }

    async fn resume(
        &self,
        _request: Request<pb::ResumeRequest>,
    ) -> Result<Response<pb::StateChange>, Status> {
        self.transition(|handle| handle.resume()).await
    }

    async fn shutdown(
        &self,
        _request: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownResponse>, Status> {
        self.call(|handle| handle.shutdown()).await?;
        Ok(Response::new(pb::ShutdownResponse {}))
    }

    async fn checkpoint(
        &self,
        request: Request<pb::CheckpointRequest>,
    ) -> Result<Response<pb::CheckpointResponse>, Status> {
        let spec = checkpoint_spec_from_pb(request.into_inner())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let result = self
            .call(move |handle| handle.checkpoint(spec))
            .await?
            .map_err(status_of)?;
        Ok(Response::new(result.into()))
    }

    type ConnectVsockStream = ReceiverStream<Result<pb::ConnectVsockResponse, Status>>;

    async fn connect_vsock(
        &self,
        request: Request<Streaming<pb::ConnectVsockRequest>>,
    ) -> Result<Response<Self::ConnectVsockStream>, Status> {
        let mut inbound = request.into_inner();
        let Some(pb::ConnectVsockRequest {
            body: Some(Body::Port(port)),
        }) = inbound.message().await?
        else {
            return Err(Status::invalid_argument(
                "the first ConnectVsock message must name the guest port",
            ));
        };
        let guest = self
            .call(move |handle| handle.connect_vsock(port))
            .await?
            .map_err(status_of)?;
        let guest = guest
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(guest))
            .map_err(|e| Status::internal(format!("cannot use the guest connection: {e}")))?;
        let (guest_read, guest_write) = guest.into_split();
        let (tx, rx) = mpsc::channel(TUNNEL_DEPTH);
        let (failed_tx, failed_rx) = mpsc::channel(1);
        tokio::spawn(client_to_guest(
            inbound,
            guest_write,
            failed_tx,
            self.stop.clone(),
        ));
        tokio::spawn(guest_to_client(
            guest_read,
            tx,
            failed_rx,
            self.stop.clone(),
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Resolves when the server is stopping (or is gone).
async fn stopping(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Copies the client's data to the guest. The client's end of stream becomes the guest's end
/// of file; a failure is handed to [`guest_to_client`], which owns the response stream.
async fn client_to_guest(
    mut inbound: Streaming<pb::ConnectVsockRequest>,
    mut guest: OwnedWriteHalf,
    failed: mpsc::Sender<Status>,
    mut stop: watch::Receiver<bool>,
) {
    let outcome = loop {
        let message = tokio::select! {
            message = inbound.message() => message,
            () = stopping(&mut stop) => break Ok(()),
        };
        let data = match message {
            Ok(Some(pb::ConnectVsockRequest {
                body: Some(Body::Data(data)),
            })) => data,
            Ok(Some(_)) => {
                break Err(Status::invalid_argument(
                    "after the first ConnectVsock message, every message carries data",
                ));
            }
            // The client is done sending, or it went away (then the response stream is dropped
            // too and guest_to_client ends).
            Ok(None) | Err(_) => break Ok(()),
        };
        let written = tokio::select! {
            written = guest.write_all(&data) => written,
            () = stopping(&mut stop) => break Ok(()),
        };
        if let Err(e) = written {
            break Err(Status::unavailable(format!(
                "writing to the guest failed: {e}"
            )));
        }
    };
    match outcome {
        Ok(()) => {
            let _ = guest.shutdown().await;
        }
        Err(status) => {
            let _ = failed.try_send(status);
        }
    }
}

/// Sends `item` to the client; false when the client went away or the server is stopping.
async fn send(
    tx: &mpsc::Sender<Result<pb::ConnectVsockResponse, Status>>,
    item: Result<pb::ConnectVsockResponse, Status>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        sent = tx.send(item) => sent.is_ok(),
        () = stopping(stop) => false,
    }
}

/// Copies the guest's data to the client. The guest's end of file ends the response stream
/// with OK; a failure in either direction or the server stopping ends it with an error.
async fn guest_to_client(
    mut guest: OwnedReadHalf,
    tx: mpsc::Sender<Result<pb::ConnectVsockResponse, Status>>,
    mut failed: mpsc::Receiver<Status>,
    mut stop: watch::Receiver<bool>,
) {
    let mut buf = vec![0; TUNNEL_CHUNK];
    loop {
        let read = tokio::select! {
            read = guest.read(&mut buf) => read,
            Some(status) = failed.recv() => {
                send(&tx, Err(status), &mut stop).await;
                return;
            }
            () = stopping(&mut stop) => {
                // Not `send`: it would see the stop and give up at once.
                let closing = Err(Status::unavailable("the VMM is shutting down"));
                let _ = tokio::time::timeout(SHUTDOWN_GRACE, tx.send(closing)).await;
                return;
            }
            () = tx.closed() => return,
        };
        let item = match read {
            Ok(0) => return,
            Ok(n) => Ok(pb::ConnectVsockResponse {
                data: buf[..n].to_vec(),
            }),
            Err(e) => Err(Status::unavailable(format!(
                "reading from the guest failed: {e}"
            ))),
        };
        let last = item.is_err();
        if !send(&tx, item, &mut stop).await || last {
            return;
        }
    }
}
