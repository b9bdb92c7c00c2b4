//! `ditto-workload`: `run` sets up seeded anonymous memory, files and page cache and serves a
//! control socket; `verify`, `status` and `stop` talk to a running workload. Exit status: 0 on
//! success, 1 when `verify` found a mismatch, 2 for usage errors and anything that kept the
//! command from doing its job (no workload at the socket, set-up failures).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ditto_workload::client::Control;
use ditto_workload::protocol::{Status, VerifyReport};
use ditto_workload::server::{self, Server};
use ditto_workload::workload::{FilesSpec, Workload, WorkloadSpec};

/// A guest workload whose memory and files can be proven intact.
#[derive(Parser)]
#[command(name = "ditto-workload", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The control socket of a running workload.
#[derive(Args)]
struct ControlArgs {
    /// The workload's control socket.
    #[arg(long, value_name = "PATH")]
    control: PathBuf,
    /// Wait up to this many seconds for the workload to serve the socket (it does once its
    /// set-up is complete).
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    wait: u64,
}

impl ControlArgs {
    fn control(&self) -> Control {
        Control::new(&self.control, Duration::from_secs(self.wait))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Fill memory, write files, read folders, then keep running and serve the control socket
    /// (in the foreground, until `stop`).
    Run {
        /// Anonymous memory to fill, in MiB (0 for none).
        #[arg(long, value_name = "N")]
        anon_mib: u64,
        /// Seed of the memory and file content.
        #[arg(long, value_name = "S")]
        seed: u64,
        /// Where to serve the control socket.
        #[arg(long, value_name = "PATH")]
        control: PathBuf,
        /// Write seeded files into this folder (created if missing) and fsync them.
        #[arg(long, value_name = "DIR", requires_all = ["file_count", "file_mib"])]
        files: Option<PathBuf>,
        /// How many files to write.
        #[arg(long, value_name = "K", requires = "files",
              value_parser = clap::value_parser!(u64).range(1..))]
        file_count: Option<u64>,
        /// Total size of the files, in MiB.
        #[arg(long, value_name = "M", requires = "files",
              value_parser = clap::value_parser!(u64).range(1..=1 << 30))]
        file_mib: Option<u64>,
        /// Read every file under this folder once, to fill the page cache (repeatable; the walk
        /// stays on the folder's filesystem and follows no symlinks).
        #[arg(long = "read", value_name = "DIR")]
        read: Vec<PathBuf>,
    },
    /// Verify all memory and files of a running workload: exit 0 if everything matches, 1 if
    /// not.
    Verify {
        #[command(flatten)]
        control: ControlArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a running workload's state (checks nothing).
    Status {
        #[command(flatten)]
        control: ControlArgs,
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop a running workload (it removes its socket and exits).
    Stop {
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Write FILE through a shared memory mapping (plain stores into its page cache, no
    /// write(2)), one page every few milliseconds, for SECS seconds.
    Scribble {
        /// The file (its whole pages are written in turn).
        file: PathBuf,
        /// How long to keep writing.
        #[arg(long, value_name = "SECS", default_value_t = 10)]
        secs: u64,
    },
    /// Debugging aid for tests: flip one bit of anonymous page N of a running workload.
    #[command(hide = true)]
    CorruptPage {
        #[command(flatten)]
        control: ControlArgs,
        /// The page index.
        page: u64,
    },
}

/// Exit status when a verification found a mismatch.
const MISMATCH: u8 = 1;
/// Exit status for usage errors and failures to do the job.
const FAILURE: u8 = 2;

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    match execute(cli.command, started) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ditto-workload: {e:#}");
            ExitCode::from(FAILURE)
        }
    }
}

fn execute(command: Command, started: Instant) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run {
            anon_mib,
            seed,
            control,
            files,
            file_count,
            file_mib,
            read,
        } => {
            let files = match (files, file_count, file_mib) {
                (Some(dir), Some(count), Some(mib)) => Some(FilesSpec { dir, count, mib }),
                _ => None,
            };
            let spec = WorkloadSpec {
                anon_mib,
                seed,
                files,
                read,
            };
            run(spec, &control, started)?;
        }
        Command::Verify { control, json } => {
            let report = control.control().verify()?;
            print(json, &report, print_verify)?;
            if !report.ok {
                return Ok(ExitCode::from(MISMATCH));
            }
        }
        Command::Status { control, json } => {
            print(json, &control.control().status()?, print_status)?;
        }
        Command::Stop { control } => {
            let heartbeats = control.control().stop()?;
            println!("stopped after {heartbeats} heartbeats");
        }
        Command::Scribble { file, secs } => {
            let n = ditto_workload::scribble::scribble(
                &file,
                Duration::from_secs(secs),
                Duration::from_millis(5),
            )?;
            println!(
                "wrote {n} pages of {} through a shared mapping",
                file.display()
            );
        }
        Command::CorruptPage { control, page } => {
            let offset = control.control().corrupt_page(page)?;
            println!("flipped the lowest bit of byte {offset} of page {page}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run(spec: WorkloadSpec, control: &std::path::Path, started: Instant) -> anyhow::Result<()> {
    server::claim(control)?;
    let workload = Workload::start(spec, started).context("setting the workload up")?;
    let server = Server::bind(control, workload)?;
    let status = server.workload().status();
    // The workload outlives whoever started it: a closed stdout must not end it.
    let _ = writeln!(
        std::io::stdout(),
        "ready in {:.3} s: pid {}, {} MiB anonymous, {} files ({} bytes), {} bytes read from {} \
         files, control {}",
        status.setup_ms as f64 / 1e3,
        status.pid,
        status.anon_mib,
        status.files.as_ref().map_or(0, |f| f.count),
        status.files.as_ref().map_or(0, |f| f.bytes),
        status.page_cache.as_ref().map_or(0, |p| p.bytes),
        status.page_cache.as_ref().map_or(0, |p| p.files),
        control.display()
    );
    let _ = std::io::stdout().flush();
    server.run()?;
    Ok(())
}

fn print<T: serde::Serialize>(json: bool, value: &T, human: fn(&T)) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        human(value);
    }
    Ok(())
}

fn mib_per_s(bytes: u64, us: u64) -> f64 {
    (bytes as f64 / (1 << 20) as f64) / (us.max(1) as f64 / 1e6)
}

fn print_verify(r: &VerifyReport) {
    let m = &r.memory;
    println!(
        "memory: {} pages ({} MiB) checked in {:.3} s ({:.0} MiB/s), {} bad{}",
        m.pages_checked,
        m.bytes_checked >> 20,
        m.elapsed_us as f64 / 1e6,
        mib_per_s(m.bytes_checked, m.elapsed_us),
        m.bad_pages,
        if m.first_bad_pages.is_empty() {
            String::new()
        } else {
            let list: Vec<_> = m.first_bad_pages.iter().map(u64::to_string).collect();
            format!(" (first: {})", list.join(", "))
        }
    );
    let f = &r.files;
    println!(
        "files: {} checked ({} bytes read in {:.3} s), {} bad",
        f.checked,
        f.bytes_read,
        f.elapsed_us as f64 / 1e6,
        f.bad
    );
    for bad in &f.bad_files {
        println!("bad file: {}: {}", bad.path, bad.problem);
    }
    let previous = r
        .previous_heartbeats
        .map_or_else(|| "first verify".into(), |p| format!("previous verify {p}"));
    println!(
        "heartbeats: {} ({previous}); workload pid {}, up {:.1} s",
        r.heartbeats,
        r.pid,
        r.uptime_ms as f64 / 1e3
    );
    println!("verify: {}", if r.ok { "ok" } else { "MISMATCH" });
}

fn print_status(s: &Status) {
    println!(
        "pid {}, up {:.1} s, {} heartbeats, seed {}, set up in {:.3} s",
        s.pid,
        s.uptime_ms as f64 / 1e3,
        s.heartbeats,
        s.seed,
        s.setup_ms as f64 / 1e3
    );
    println!(
        "anonymous memory: {} MiB ({} pages); heartbeat touched {} pages, {} found bad",
        s.anon_mib, s.anon_pages, s.touched_pages, s.touch_bad_pages
    );
    if let Some(f) = &s.files {
        println!("files: {} ({} bytes) in {}", f.count, f.bytes, f.dir);
    }
    if let Some(p) = &s.page_cache {
        println!(
            "page cache: read {} bytes from {} files under {} ({} errors{})",
            p.bytes,
            p.files,
            p.dirs.join(", "),
            p.errors,
            p.first_error
                .as_ref()
                .map_or_else(String::new, |e| format!(", first: {e}"))
        );
    }
    println!("verifies: {}", s.verifies);
}
