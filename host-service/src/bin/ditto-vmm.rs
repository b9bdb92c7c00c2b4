//! `ditto-vmm`: one process, one VM. `ditto-vmm run …` builds the VM (every input checked before
//! the guest starts), runs it until the guest powers off or reboots (exit status 0), a signal or
//! the control socket asks it to end (0), or the guest fails (1).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ditto_host::control::ControlSocket;
use ditto_host::devices::virtio::block::BlockConfig;
use ditto_host::vmm::config::{self, Console, VmConfig, VsockConfig};
use ditto_host::vmm::control::VmmControl;
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
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// The guest kernel (bzImage).
    #[arg(long)]
    kernel: PathBuf,
    /// The initrd.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// The kernel command line.
    #[arg(long, default_value = config::DEFAULT_CMDLINE)]
    cmdline: String,
    /// Also describe the virtio-mmio devices with `virtio_mmio.device=` (for kernels built with
    /// that option; ACPI always describes them).
    #[arg(long)]
    virtio_mmio_cmdline: bool,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    mem_mib: u64,
    /// A disk: `id=ID,path=PATH[,ro]`; the id is the serial the guest sees. Repeatable.
    #[arg(long = "drive", value_parser = config::parse_drive)]
    drives: Vec<BlockConfig>,
    /// The guest's vsock context id (needs --vsock-uds).
    #[arg(long, requires = "vsock_uds")]
    vsock_cid: Option<u64>,
    /// The Unix socket host programs connect to (`CONNECT <port>\n`); guest connections to host
    /// port P go to `<PATH>_P`.
    #[arg(long, requires = "vsock_cid")]
    vsock_uds: Option<PathBuf>,
    /// Where the serial console goes: `stdout`, `off` or a file.
    #[arg(long, default_value = "stdout")]
    console: Console,
    /// A host port the guest may connect to over vsock, served by `<--vsock-uds>_PORT`.
    /// Repeatable.
    #[arg(long = "vsock-host-port", requires = "vsock_uds")]
    vsock_host_ports: Vec<u32>,
    /// The control socket (status, pause, resume, shutdown, vsock connections).
    #[arg(long)]
    control: Option<PathBuf>,
}

impl RunArgs {
    fn config(&self) -> VmConfig {
        VmConfig {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            virtio_mmio_cmdline: self.virtio_mmio_cmdline,
            vcpus: self.vcpus,
            mem_mib: self.mem_mib,
            drives: self.drives.clone(),
            vsock: self
                .vsock_cid
                .zip(self.vsock_uds.clone())
                .map(|(cid, uds)| VsockConfig {
                    cid,
                    uds,
                    host_ports: self.vsock_host_ports.clone(),
                }),
            console: self.console.clone(),
        }
    }
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
        Command::Run(args) => match run(&args) {
            Ok(reason) => {
                eprintln!("ditto-vmm: VM ended: {reason:?}");
                if reason.is_clean() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("ditto-vmm: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
