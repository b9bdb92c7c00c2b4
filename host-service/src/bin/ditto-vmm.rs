//! `ditto-vmm`: one process, one VM. `ditto-vmm run …` builds the VM (every input checked before
//! the guest starts), runs it until the guest powers off or reboots (exit status 0), a signal or
//! the control socket asks it to end (0), a checkpoint stops it (0), or the guest fails (1).
//! `ditto-vmm restore --from FILE …` continues a checkpointed VM the same way. With
//! `--exit-file` it writes why it ended there as it exits (see `ditto_host::vmm::exit_file`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ditto_host::control::ControlSocket;
use ditto_host::vmm::config::{RestoreArgs, RunArgs};
use ditto_host::vmm::control::VmmControl;
use ditto_host::vmm::exit_file::{CONSOLE_LINES, ExitRecord};
use ditto_host::vmm::{ExitReason, Vmm, VmmEvents};

#[derive(Parser)]
#[command(version, about = "ditto's KVM microVM monitor: one process per VM")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boots a Linux guest and runs it until it powers off.
    Run(Box<RunArgs>),
    /// Continues a checkpointed VM and runs it until it powers off.
    Restore(Box<RestoreArgs>),
}

/// How the vCPUs begin: a fresh boot, or the resume of a restored VM.
#[derive(Clone, Copy)]
enum Begin {
    Boot,
    Resume,
}

/// How the VM ended, with the guest's last console lines.
struct Ended {
    reason: ExitReason,
    console_tail: Vec<String>,
}

/// Runs a built VM until it ends: signals, the control socket, the guest's power events.
fn serve(vmm: Vmm, events: VmmEvents, control: Option<&Path>, begin: Begin) -> Result<Ended> {
    let sender = vmm.event_sender();
    let vmm = Arc::new(Mutex::new(vmm));
    let lock = || vmm.lock().unwrap_or_else(PoisonError::into_inner);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    {
        let sender = sender.clone();
        runtime.spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            sender.send(ExitReason::Requested);
        });
    }
    let (stop_control, control_stopped) = tokio::sync::oneshot::channel::<()>();
    let control = match control {
        Some(path) => {
            let socket = {
                let _guard = runtime.enter();
                ControlSocket::bind(path)
                    .with_context(|| format!("cannot serve control socket {}", path.display()))?
            };
            let handle = Arc::new(VmmControl::new(vmm.clone()));
            Some(runtime.spawn(socket.serve(handle, async move {
                let _ = control_stopped.await;
            })))
        }
        None => None,
    };

    match begin {
        Begin::Boot => lock().start().context("cannot start the vCPUs")?,
        Begin::Resume => {
            lock()
                .resume()
                .context("cannot resume the restored vCPUs")?;
        }
    }
    let reason = events.wait(|| lock().check_alive());
    let stopped = lock().stop().context("cannot stop the VM");
    let (reason, console_tail) = {
        let vmm = lock();
        let tail = vmm.console_tail();
        (reason.with_console(tail), tail.last_lines(CONSOLE_LINES))
    };
    let _ = stop_control.send(());
    if let Some(server) = control {
        match runtime.block_on(server) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("ditto-vmm: control socket: {e}"),
            Err(e) => eprintln!("ditto-vmm: control socket task: {e}"),
        }
    }
    runtime.shutdown_background();
    stopped?;
    Ok(Ended {
        reason,
        console_tail,
    })
}

fn run(args: &RunArgs) -> Result<Ended> {
    let (vmm, events) = Vmm::build(args.config()).context("cannot build the VM")?;
    serve(vmm, events, args.process.control.as_deref(), Begin::Boot)
}

fn restore(args: &RestoreArgs) -> Result<Ended> {
    let (vmm, events, report) = Vmm::restore(&args.from, &args.options())
        .with_context(|| format!("cannot restore from {}", args.from.display()))?;
    eprintln!(
        "ditto-vmm: restored {}: {} pages from the file in {:.1} ms, {} from drives in {:.1} ms, \
         {} zero; ready in {:.1} ms",
        args.from.display(),
        report.pages_saved,
        report.memory.as_secs_f64() * 1e3,
        report.pages_disk,
        report.disk.as_secs_f64() * 1e3,
        report.pages_zero,
        report.total.as_secs_f64() * 1e3,
    );
    serve(vmm, events, args.process.control.as_deref(), Begin::Resume)
}

/// Reports how the VM ended, on standard error and in the exit file.
fn finish(outcome: Result<Ended>, exit_file: Option<&PathBuf>) -> ExitCode {
    let record = match outcome {
        Ok(Ended {
            reason,
            console_tail,
        }) => ExitRecord {
            clean: reason.is_clean(),
            reason: reason.to_string(),
            kind: reason.kind().to_owned(),
            console_tail,
        },
        Err(e) => ExitRecord {
            clean: false,
            reason: format!("{e:#}"),
            kind: "vmm_error".to_owned(),
            console_tail: Vec::new(),
        },
    };
    eprintln!("ditto-vmm: VM ended: {}", record.reason);
    if !record.clean && !record.console_tail.is_empty() {
        eprintln!("ditto-vmm: the guest's last console lines:");
        for line in &record.console_tail {
            eprintln!("  | {line}");
        }
    }
    if let Some(path) = exit_file
        && let Err(e) = record.write(path)
    {
        eprintln!("ditto-vmm: cannot write {}: {e}", path.display());
    }
    if record.clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => finish(run(&args), args.process.exit_file.as_ref()),
        Command::Restore(args) => finish(restore(&args), args.process.exit_file.as_ref()),
    }
}
