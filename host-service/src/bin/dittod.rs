//! `dittod`: the orchestration daemon. It serves `ditto.host.v1.Host` on a Unix socket (and on
//! TCP when asked), keeps its VMs' records in a state directory, runs each VM as one detached
//! `ditto-vmm` process it supervises, and re-attaches to the VMMs still running when it starts
//! again. SIGTERM or SIGINT end the daemon; the VMs keep running.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;
use ditto_host::daemon::validate::HostLimits;
use ditto_host::daemon::{
    HostService, ListenOptions, Registry, RegistryOptions, StateDir, TlsFiles, default_state_dir,
    metrics,
};

#[derive(Parser)]
#[command(
    version,
    about = "ditto's orchestration daemon: the gRPC API over ditto-vmm processes"
)]
struct Args {
    /// The state directory: VM records, sockets and logs (default /var/lib/ditto as root, else
    /// $XDG_STATE_HOME/ditto).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The API's Unix socket (default: dittod.sock in the state directory).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Also serve the API on TCP: `PORT` (on loopback, 127.0.0.1) or `ADDRESS:PORT`. A
    /// non-loopback address needs mutual TLS (--tls-cert, --tls-key, --tls-client-ca) or
    /// --insecure.
    #[arg(long, value_parser = parse_tcp)]
    tcp: Option<SocketAddr>,
    /// The TCP listener's certificate chain (PEM).
    #[arg(long, requires_all = ["tcp", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// The TCP listener's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The CA that client certificates must chain to (PEM): mutual TLS.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Serve a non-loopback TCP address without mutual TLS.
    #[arg(long)]
    insecure: bool,
    /// The ditto-vmm binary (default: next to this executable).
    #[arg(long)]
    vmm_bin: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (GET /metrics).
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Most VMs this daemon manages at once.
    #[arg(long, default_value_t = 256)]
    max_vms: usize,
}

/// A TCP listening address: a bare port means loopback.
fn parse_tcp(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse()
        .map_err(|_| format!("{s:?} is neither a port nor ADDRESS:PORT"))
}

fn vmm_bin(given: Option<PathBuf>) -> Result<PathBuf> {
    let bin = match given {
        Some(bin) => bin,
        None => std::env::current_exe()
            .context("cannot find this executable")?
            .with_file_name("ditto-vmm"),
    };
    let bin = std::path::absolute(&bin).context("cannot resolve the ditto-vmm path")?;
    if !bin.is_file() {
        bail!("no ditto-vmm at {} (use --vmm-bin)", bin.display());
    }
    Ok(bin)
}

async fn run(args: Args) -> Result<()> {
    let state_dir = std::path::absolute(args.state_dir.unwrap_or_else(default_state_dir))
        .context("cannot resolve the state directory")?;
    let dir = StateDir::open(&state_dir)?;
    let socket = args.socket.unwrap_or_else(|| dir.socket_path());
    let listen = ListenOptions {
        socket,
        tcp: args.tcp,
        tls: args.tls_cert.zip(args.tls_key).map(|(cert, key)| TlsFiles {
            cert,
            key,
            client_ca: args.tls_client_ca,
        }),
        insecure: args.insecure,
    };
    listen.check()?;
    let options = RegistryOptions {
        vmm_bin: vmm_bin(args.vmm_bin)?,
        max_vms: args.max_vms,
        host: HostLimits::probe().context("cannot read this host's memory size")?,
    };
    if let Some(addr) = args.metrics {
        metrics::install(addr).with_context(|| format!("cannot serve metrics on {addr}"))?;
        tracing::info!(%addr, "serving Prometheus metrics");
    }
    tracing::info!(
        state_dir = %state_dir.display(),
        vmm = %options.vmm_bin.display(),
        "dittod starting"
    );
    let registry = Registry::new(dir, options);
    let attached = registry
        .recover()
        .await
        .context("cannot load the VM records")?;
    tracing::info!(vms = registry.list().len(), attached, "VM records loaded");

    let shutdown = async {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            std::future::pending::<()>().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("dittod stopping; the VMs keep running");
    };
    ditto_host::daemon::listen::serve(HostService::new(registry), &listen, shutdown).await?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dittod: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dittod: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_port_listens_on_loopback() {
        assert_eq!(parse_tcp("7000"), Ok("127.0.0.1:7000".parse().unwrap()));
        assert_eq!(parse_tcp("[::1]:7000"), Ok("[::1]:7000".parse().unwrap()));
        assert_eq!(
            parse_tcp("0.0.0.0:7000"),
            Ok("0.0.0.0:7000".parse().unwrap())
        );
        assert!(parse_tcp("localhost").is_err());
        assert!(parse_tcp("70000").is_err());
    }
}
