//! Where the agent listens: AF_VSOCK (the default, for the host), a Unix socket or TCP (tests).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_stream::Stream;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::Server;
use tonic::transport::server::Connected;

use crate::DEFAULT_VSOCK_PORT;
use crate::fault::{self, Fault};
use crate::service::{AgentServer, AgentService};

/// What can go wrong while listening.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The server failed.
    #[error("serving failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// A listening address: `vsock:PORT`, `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// AF_VSOCK on any CID.
    Vsock(u32),
    /// A Unix socket at this path.
    Unix(PathBuf),
    /// TCP.
    Tcp(SocketAddr),
}

impl Default for ListenAddr {
    fn default() -> Self {
        Self::Vsock(DEFAULT_VSOCK_PORT)
    }
}

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, rest) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: expected vsock:PORT, unix:PATH or tcp:HOST:PORT"))?;
        match kind {
            "vsock" => rest
                .parse()
                .map(Self::Vsock)
                .map_err(|_| format!("{rest:?} is not a vsock port")),
            "unix" if !rest.is_empty() => Ok(Self::Unix(rest.into())),
            "tcp" => rest
                .parse()
                .map(Self::Tcp)
                .map_err(|_| format!("{rest:?} is not HOST:PORT")),
            _ => Err(format!(
                "{s:?}: expected vsock:PORT, unix:PATH or tcp:HOST:PORT"
            )),
        }
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Vsock(port) => write!(f, "vsock:{port}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

/// Logs that the agent serves on `addr`. Called once the listener is bound and listening, so
/// that a client that waits for this line (the tests watch the console for it) can connect at
/// once: a connection made now queues in the backlog instead of being refused.
fn announce(addr: &ListenAddr) {
    tracing::info!(listen = %addr, "ditto-agent serving");
}

/// Serves the agent on `addr` until `shutdown` completes.
pub async fn serve(
    addr: &ListenAddr,
    service: AgentService,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ListenError> {
    let bind_error = |source| ListenError::Bind {
        addr: addr.to_string(),
        source,
    };
    match addr {
        ListenAddr::Vsock(port) => {
            let listener = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(
                tokio_vsock::VMADDR_CID_ANY,
                *port,
            ))
            .map_err(bind_error)?;
            announce(addr);
            serve_on(listener.incoming(), service, shutdown).await
        }
        ListenAddr::Unix(path) => {
            // A socket left by an earlier run would make bind fail.
            if std::fs::symlink_metadata(path)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            {
                let _ = std::fs::remove_file(path);
            }
            let listener = tokio::net::UnixListener::bind(path).map_err(bind_error)?;
            announce(addr);
            serve_on(UnixListenerStream::new(listener), service, shutdown).await
        }
        ListenAddr::Tcp(sock) => {
            let listener = tokio::net::TcpListener::bind(sock)
                .await
                .map_err(bind_error)?;
            announce(addr);
            serve_on(TcpListenerStream::new(listener), service, shutdown).await
        }
    }
}

/// Serves the connections `incoming` yields: gRPC, or junk when the service is to inject
/// [`Fault::Garbage`].
async fn serve_on<S, IO>(
    incoming: S,
    service: AgentService,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ListenError>
where
    S: Stream<Item = std::io::Result<IO>>,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
{
    if service.fault() == Some(Fault::Garbage) {
        fault::answer_with_garbage(incoming, shutdown).await;
        return Ok(());
    }
    Server::builder()
        .add_service(AgentServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!("vsock:10240".parse(), Ok(ListenAddr::Vsock(10240)));
        assert_eq!(
            "unix:/run/a.sock".parse(),
            Ok(ListenAddr::Unix("/run/a.sock".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:9".parse(),
            Ok(ListenAddr::Tcp("127.0.0.1:9".parse().unwrap()))
        );
        for bad in ["10240", "vsock:x", "unix:", "tcp:nowhere", "udp:1"] {
            assert!(bad.parse::<ListenAddr>().is_err(), "{bad}");
        }
    }
}
