//! `ditto-vmm`: one process, one VM. `ditto-vmm run …` builds the VM (every input checked before
//! the guest starts), runs it until the guest powers off or reboots (exit status 0), a signal or
//! the control socket asks it to end (0), or the guest fails (1). With `--exit-file` it writes
//! why it ended there as it exits (see `ditto_host::vmm::exit_file`).

use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ditto_host::control::ControlSocket;
use ditto_host::vmm::config::RunArgs;
use ditto_host::vmm::control::VmmControl;
use ditto_host::vmm::exit_file::ExitRecord;
use ditto_host::vmm::{ExitReason, Vmm};

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
}

fn run(args: &RunArgs) -> Result<ExitReason> {
    let (vmm, events) = Vmm::build(args.config()).context("cannot build the VM")?;
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
    let control = match &args.control {
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

    lock().start().context("cannot start the vCPUs")?;
    let reason = events.wait(|| lock().check_alive());
    let stopped = lock().stop().context("cannot stop the VM");
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
    Ok(reason)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let record = match run(&args) {
                Ok(reason) => ExitRecord {
                    clean: reason.is_clean(),
                    reason: reason.to_string(),
                },
                Err(e) => ExitRecord {
                    clean: false,
                    reason: format!("{e:#}"),
                },
            };
            eprintln!("ditto-vmm: VM ended: {}", record.reason);
            if let Some(path) = &args.exit_file
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
    }
}
