//! `ditto-agent`: the guest half of ditto. `serve` runs the gRPC service (on vsock by default),
//! `scan` runs one scan and prints it, `info` prints what this agent can do here.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ditto_agent::fault::Fault;
use ditto_agent::frames::{FrameReader, PAGE_SIZE};
use ditto_agent::kpageblock::{KPAGEBLOCK, KpageblockReader};
use ditto_agent::listen::{self, ListenAddr};
use ditto_agent::report::JsonReport;
use ditto_agent::scan::{self, Method, ScanEvent, ScanOptions};
use ditto_agent::service::{self, AgentService};

/// The guest agent of ditto.
#[derive(Parser)]
#[command(name = "ditto-agent", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the agent's gRPC service.
    Serve {
        /// Where to listen: vsock:PORT, unix:PATH or tcp:HOST:PORT.
        #[arg(long, default_value_t = ListenAddr::default())]
        listen: ListenAddr,
        /// Refuse Exec requests.
        #[arg(long)]
        no_exec: bool,
        /// Treat loop devices as disks (for hosts that are not ditto guests, such as tests).
        #[arg(long)]
        include_loop_devices: bool,
        /// Scan method of requests that name none: walk or kpageblock (default: kpageblock
        /// when /proc/kpageblock is readable, else walk).
        #[arg(long, value_name = "walk|kpageblock")]
        method: Option<Method>,
        /// Fault injection for testing hosts: misreport-offsets=BYTES, extents-first,
        /// oversized, flood, stall or garbage (see the `fault` module). Never use it in a real
        /// guest.
        #[arg(long, hide = true, value_name = "KIND")]
        fault: Option<Fault>,
    },
    /// Scan once and print a summary, or the whole report as JSON.
    Scan {
        /// Limit the walk to this directory (repeatable).
        #[arg(long = "path", value_name = "DIR")]
        paths: Vec<PathBuf>,
        /// Print the report as one JSON document.
        #[arg(long)]
        json: bool,
        /// Stop walking after this many milliseconds.
        #[arg(long, value_name = "MS")]
        time_budget_ms: Option<u64>,
        /// Treat loop devices as disks (for hosts that are not ditto guests, such as tests).
        #[arg(long)]
        include_loop_devices: bool,
        /// Scan method: walk or kpageblock (default: kpageblock when /proc/kpageblock is
        /// readable and no --path is given, else walk).
        #[arg(long, value_name = "walk|kpageblock")]
        method: Option<Method>,
    },
    /// Print the agent's version, the kernel release and what can be read here.
    Info,
}

/// Lets a closed stdout (`ditto-agent scan --json | head`) end the process quietly, as it does
/// other command-line tools, instead of failing a print.
fn default_sigpipe() {
    // SAFETY: restoring the default disposition of SIGPIPE at start-up, before any thread runs.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve { .. }) {
        default_sigpipe();
    }
    match cli.command {
        Command::Serve {
            listen,
            no_exec,
            include_loop_devices,
            method,
            fault,
        } => serve(
            &listen,
            AgentService::new(!no_exec, include_loop_devices)
                .with_method(method)
                .with_fault(fault),
        ),
        Command::Scan {
            paths,
            json,
            time_budget_ms,
            include_loop_devices,
            method,
        } => scan_once(
            ScanOptions {
                paths,
                method,
                time_budget: time_budget_ms.map(Duration::from_millis),
                include_loop_devices,
                after_mincore: None,
                kpageblock_path: None,
            },
            json,
        ),
        Command::Info => {
            println!("ditto-agent {}", env!("CARGO_PKG_VERSION"));
            println!("kernel {}", service::kernel_release());
            println!("page size {PAGE_SIZE}");
            match FrameReader::open() {
                Ok(_) => println!("kpageflags and pagemap frame numbers: readable"),
                Err(e) => println!("kpageflags and pagemap frame numbers: {e}"),
            }
            match KpageblockReader::open(std::path::Path::new(KPAGEBLOCK)) {
                Ok(_) => println!("kpageblock fast path: readable"),
                Err(e) => println!("kpageblock fast path: {e}"),
            }
            Ok(())
        }
    }
}

/// The agent's log filter when `RUST_LOG` is not set: its own news, and why a client's
/// connection failed (tonic says that only at debug level, and a connection the agent drops is
/// otherwise a bare broken pipe on the host).
const DEFAULT_LOG_FILTER: &str = "info,tonic::transport::server=debug";

fn serve(listen: &ListenAddr, service: AgentService) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            tracing::info!("ditto-agent stopping");
        };
        listen::serve(listen, service, shutdown).await
    })?;
    Ok(())
}

fn scan_once(options: ScanOptions, json: bool) -> anyhow::Result<()> {
    if json {
        let stdout = std::io::stdout().lock();
        let mut report = JsonReport::new(std::io::BufWriter::new(stdout));
        let mut failure = None;
        let summary = scan::scan(&options, |event| {
            report.event(event).map_err(|e| failure = Some(e))
        });
        if let Some(e) = failure {
            return Err(e.into());
        }
        let summary = summary.map_err(|e| anyhow::anyhow!("{e}"))?;
        report.finish(&summary)?;
        return Ok(());
    }
    let mut disks = Vec::new();
    let mut extents = 0u64;
    let summary = scan::scan(&options, |event| {
        match event {
            ScanEvent::Disks(d) => disks = d,
            ScanEvent::Extents(batch) => extents += batch.len() as u64,
        }
        Ok::<(), ()>(())
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    for disk in &disks {
        println!(
            "disk {} ({}, {}:{}, {} bytes)",
            disk.id,
            disk.path.display(),
            disk.dev.0,
            disk.dev.1,
            disk.size_bytes
        );
    }
    println!(
        "method {}: {} files visited, {} pages resident, {} reported in {} extents, {:.3} s",
        summary.method,
        summary.files_visited,
        summary.pages_resident,
        summary.pages_reported,
        extents,
        summary.elapsed_us as f64 / 1e6
    );
    for (title, map) in [
        ("pages excluded", &summary.pages_excluded),
        ("files skipped", &summary.files_skipped),
        ("filesystems skipped", &summary.filesystems_skipped),
    ] {
        for (reason, n) in map {
            println!("{title}: {reason}: {n}");
        }
    }
    if summary.budget_exhausted {
        println!("the time budget ran out before the walk finished");
    }
    Ok(())
}
