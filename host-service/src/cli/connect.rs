//! How `dittoctl` reaches `dittod`: its Unix socket (the default, or `--socket`), or a TCP
//! address (`--addr http://HOST:PORT`, or `https://…` with `--tls-ca` and, for mutual TLS,
//! `--tls-cert` and `--tls-key`).

use std::path::{Path, PathBuf};

use ditto_proto::host::v1::host_client::HostClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::agent::MAX_REPLY_BYTES;

/// Where the daemon is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Its Unix socket.
    Socket(PathBuf),
    /// A TCP address, with TLS files for `https://` addresses.
    Addr {
        /// `http://HOST:PORT` or `https://HOST:PORT`.
        url: String,
        /// The CA the server's certificate must chain to.
        ca: Option<PathBuf>,
        /// The client's certificate and key, for mutual TLS.
        identity: Option<(PathBuf, PathBuf)>,
    },
}

/// Why the daemon cannot be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The address is not a URL tonic accepts.
    #[error("bad address {url:?}: {source}")]
    Address {
        /// What was given.
        url: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// A TLS file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Nothing answered.
    #[error("cannot reach dittod at {target} (is dittod running?)")]
    Connect {
        /// Where.
        target: String,
        /// Why.
        source: tonic::transport::Error,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, ConnectError> {
    std::fs::read(path).map_err(|source| ConnectError::Read {
        path: path.to_owned(),
        source,
    })
}

/// A client of the daemon at `target`.
pub async fn connect(target: &Target) -> Result<HostClient<Channel>, ConnectError> {
    let channel = match target {
        Target::Socket(path) => {
            crate::unix_socket::channel(path)
                .await
                .map_err(|source| ConnectError::Connect {
                    target: path.display().to_string(),
                    source,
                })?
        }
        Target::Addr { url, ca, identity } => {
            let bad = |source| ConnectError::Address {
                url: url.clone(),
                source,
            };
            let mut endpoint = Endpoint::from_shared(url.clone()).map_err(bad)?;
            if url.starts_with("https://") {
                let mut tls = ClientTlsConfig::new();
                if let Some(ca) = ca {
                    tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
                }
                if let Some((cert, key)) = identity {
                    tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
                }
                endpoint = endpoint.tls_config(tls).map_err(bad)?;
            }
            endpoint
                .connect()
                .await
                .map_err(|source| ConnectError::Connect {
                    target: url.clone(),
                    source,
                })?
        }
    };
    Ok(HostClient::new(channel).max_decoding_message_size(MAX_REPLY_BYTES))
}
