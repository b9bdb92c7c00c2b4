//! The host's client of the guest agent (`ditto.agent.v1.Agent`, served by `ditto-agent` in
//! the guest on vsock port [`AGENT_PORT`]): a tonic channel through the VMM's hybrid vsock Unix
//! socket (`CONNECT <port>\n`, then `OK <hostport>\n`, as Firecracker).
//!
//! Every connection is fresh: the channel dials the hybrid socket when it is created, and a
//! guest that does not accept within the timeout is [`AgentError::Connect`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use ditto_proto::agent::v1::agent_client::AgentClient;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::devices::virtio::vsock::unix;
use crate::error_text;

/// The agent's vsock port in ditto's guest images (`ditto-agent serve`'s default).
pub const AGENT_PORT: u32 = 10240;

/// Largest reply accepted from the agent: its exec output cap (16 MiB each for stdout and
/// stderr) plus room for the rest of the message.
pub const MAX_REPLY_BYTES: usize = 40 << 20;

/// Why the agent could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The hybrid vsock socket did not lead to a serving agent.
    #[error(
        "cannot reach the guest agent on vsock port {port} through {} within {timeout:?}: {}",
        uds.display(),
        error_text::full(source)
    )]
    Connect {
        /// How long the guest had to accept the connection.
        timeout: Duration,
        /// The hybrid vsock socket.
        uds: PathBuf,
        /// The guest port.
        port: u32,
        /// Why.
        source: tonic::transport::Error,
    },
}

/// A gRPC client of the guest agent on `port`, through the hybrid vsock socket `uds`. The
/// guest has `timeout` to accept the connection.
pub async fn connect(
    uds: &Path,
    port: u32,
    timeout: Duration,
) -> Result<AgentClient<Channel>, AgentError> {
    let socket = uds.to_owned();
    let channel = Endpoint::from_static("http://guest-agent")
        .connect_timeout(timeout)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                let stream =
                    tokio::task::spawn_blocking(move || unix::connect(&socket, port, timeout))
                        .await
                        .map_err(std::io::Error::other)?
                        .map_err(std::io::Error::other)?;
                stream.set_nonblocking(true)?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::from_std(stream)?,
                ))
            }
        }))
        .await
        .map_err(|source| AgentError::Connect {
            timeout,
            uds: uds.to_owned(),
            port,
            source,
        })?;
    Ok(AgentClient::new(channel).max_decoding_message_size(MAX_REPLY_BYTES))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unreachable_agent_says_why_not_just_transport_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("no-vmm.sock");
        let err = connect(&missing, AGENT_PORT, Duration::from_secs(1))
            .await
            .expect_err("nothing listens");
        let text = err.to_string();
        assert!(text.contains("within 1s: transport error: "), "{text}");
        assert!(text.contains("No such file or directory"), "{text}");
    }
}
