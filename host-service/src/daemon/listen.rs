//! Where dittod listens and how: its Unix socket always (owner-only, mode 0600), TCP only when
//! asked. A TCP address that is not loopback needs mutual TLS (a certificate, its key and a CA
//! that client certificates must chain to) unless the operator passes `--insecure`; TLS can
//! be used on loopback too. Every listener serves the `ditto.host.v1.Host` service, gRPC
//! server reflection (v1 and v1alpha) and the standard health service.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ditto_proto::host::v1::host_server::HostServer;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::service::Routes;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use super::service::HostService;
use crate::agent::MAX_REPLY_BYTES;
use crate::unix_socket::{BindError, OwnerOnlySocket};

/// TLS files of the TCP listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA client certificates must chain to (PEM); without it clients are not
    /// authenticated.
    pub client_ca: Option<PathBuf>,
}

/// Where to listen.
#[derive(Clone, Debug)]
pub struct ListenOptions {
    /// The Unix socket.
    pub socket: PathBuf,
    /// A TCP address, if asked for.
    pub tcp: Option<SocketAddr>,
    /// TLS for the TCP listener.
    pub tls: Option<TlsFiles>,
    /// Allow a non-loopback TCP address without mutual TLS.
    pub insecure: bool,
}

/// Why dittod cannot listen as asked.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// A non-loopback address without TLS.
    #[error(
        "{0} is not a loopback address: anyone who can reach it could control every VM. Give \
         --tls-cert, --tls-key and --tls-client-ca for mutual TLS, or --insecure if you mean it"
    )]
    PlaintextRemote(SocketAddr),
    /// A non-loopback address with TLS but no client authentication.
    #[error(
        "{0} is not a loopback address and --tls-client-ca is missing: any client could \
         control every VM. Give --tls-client-ca, or --insecure if you mean it"
    )]
    NoClientAuth(SocketAddr),
    /// TLS options without a TCP address.
    #[error("TLS options need a TCP address (--tcp)")]
    TlsWithoutTcp,
    /// A TLS file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The Unix socket cannot be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// A server failed.
    #[error("serving {what} failed: {source}")]
    Serve {
        /// Which listener.
        what: String,
        /// Why.
        source: tonic::transport::Error,
    },
}

impl ListenOptions {
    /// Checks the listening policy.
    pub fn check(&self) -> Result<(), ListenError> {
        match (self.tcp, &self.tls) {
            (None, Some(_)) => Err(ListenError::TlsWithoutTcp),
            (Some(addr), None) if !addr.ip().is_loopback() && !self.insecure => {
                Err(ListenError::PlaintextRemote(addr))
            }
            (Some(addr), Some(tls))
                if !addr.ip().is_loopback() && tls.client_ca.is_none() && !self.insecure =>
            {
                Err(ListenError::NoClientAuth(addr))
            }
            _ => Ok(()),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ListenError> {
    std::fs::read(path).map_err(|source| ListenError::Read {
        path: path.to_owned(),
        source,
    })
}

fn routes(service: &HostService) -> Routes {
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ditto_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1();
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ditto_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha();
    let (health, health_service) = tonic_health::server::health_reporter();
    let mut routes =
        Routes::new(HostServer::new(service.clone()).max_decoding_message_size(MAX_REPLY_BYTES))
            .add_service(health_service);
    // Both always build from the compiled-in descriptor sets; a failure is a build defect
    // and only costs reflection, not the API.
    match (reflection_v1, reflection_v1alpha) {
        (Ok(v1), Ok(v1alpha)) => routes = routes.add_service(v1).add_service(v1alpha),
        (Err(e), _) | (_, Err(e)) => tracing::error!(error = %e, "no server reflection"),
    }
    tokio::spawn(async move {
        health.set_serving::<HostServer<HostService>>().await;
    });
    routes
}

/// Serves `service` as `options` say until `shutdown` completes. The Unix socket file is
/// removed at the end.
pub async fn serve(
    service: HostService,
    options: &ListenOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ListenError> {
    options.check()?;
    let (listener, socket_file) = OwnerOnlySocket::bind(&options.socket)?.into_parts();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let unix = Server::builder()
        .add_routes(routes(&service))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stopped(stop_rx.clone()));
    tracing::info!(socket = %options.socket.display(), "listening on the Unix socket");
    let tcp = match options.tcp {
        Some(addr) => {
            let mut builder = Server::builder();
            if let Some(tls) = &options.tls {
                let mut config = ServerTlsConfig::new()
                    .identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?));
                if let Some(ca) = &tls.client_ca {
                    config = config.client_ca_root(Certificate::from_pem(read(ca)?));
                }
                builder = builder
                    .tls_config(config)
                    .map_err(|source| ListenError::Serve {
                        what: format!("TLS on {addr}"),
                        source,
                    })?;
            }
            tracing::info!(%addr, tls = options.tls.is_some(), "listening on TCP");
            Some(
                builder
                    .add_routes(routes(&service))
                    .serve_with_shutdown(addr, stopped(stop_rx)),
            )
        }
        None => None,
    };
    let result = match tcp {
        Some(tcp) => {
            let addr = options.tcp.map(|a| a.to_string()).unwrap_or_default();
            let (u, t) = tokio::join!(unix, tcp);
            u.map_err(|source| ListenError::Serve {
                what: "the Unix socket".into(),
                source,
            })
            .and(t.map_err(|source| ListenError::Serve { what: addr, source }))
        }
        None => unix.await.map_err(|source| ListenError::Serve {
            what: "the Unix socket".into(),
            source,
        }),
    };
    drop(socket_file);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(tcp: &str, tls: Option<bool>, insecure: bool) -> ListenOptions {
        ListenOptions {
            socket: "/run/ditto/dittod.sock".into(),
            tcp: Some(tcp.parse().expect("addr")),
            tls: tls.map(|with_ca| TlsFiles {
                cert: "/c".into(),
                key: "/k".into(),
                client_ca: with_ca.then(|| "/ca".into()),
            }),
            insecure,
        }
    }

    #[test]
    fn remote_tcp_needs_mutual_tls_or_insecure() {
        assert!(options("127.0.0.1:7000", None, false).check().is_ok());
        assert!(options("[::1]:7000", None, false).check().is_ok());
        assert!(matches!(
            options("0.0.0.0:7000", None, false).check(),
            Err(ListenError::PlaintextRemote(_))
        ));
        assert!(matches!(
            options("10.0.0.1:7000", Some(false), false).check(),
            Err(ListenError::NoClientAuth(_))
        ));
        assert!(options("10.0.0.1:7000", Some(true), false).check().is_ok());
        assert!(options("0.0.0.0:7000", None, true).check().is_ok());
        let mut no_tcp = options("127.0.0.1:1", Some(true), false);
        no_tcp.tcp = None;
        assert!(matches!(no_tcp.check(), Err(ListenError::TlsWithoutTcp)));
    }
}
