//! `dittoctl`: the command line of `dittod`. One subcommand per RPC of `ditto.host.v1.Host`
//! (`checkpoint`, `restore`, `checkpoints` and `delete-checkpoint` for checkpoints);
//! VMs are named by name or id; readable output by default, `--json` for scripts; `exec`
//! passes the guest program's output through and exits with its status.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use clap::{CommandFactory, Parser, Subcommand};
use ditto_host::cli::connect::{Target, connect};
use ditto_host::cli::output;
use ditto_host::daemon::default_state_dir;
use ditto_host::error_text::{sources, with_causes};
use ditto_host::vmm::config::MachineArgs;
use ditto_proto::host::v1 as pb;
use indicatif::{ProgressBar, ProgressDrawTarget};

#[derive(Parser)]
#[command(version, about = "Control dittod: create, run and inspect VMs")]
struct Cli {
    /// dittod's Unix socket (default: dittod.sock in the default state directory).
    #[arg(long, global = true, env = "DITTO_SOCKET")]
    socket: Option<PathBuf>,
    /// dittod's TCP address instead: http://HOST:PORT, or https://HOST:PORT with --tls-ca.
    #[arg(long, global = true, env = "DITTO_ADDR", conflicts_with = "socket")]
    addr: Option<String>,
    /// The CA that dittod's certificate chains to (PEM), for https addresses.
    #[arg(long, global = true)]
    tls_ca: Option<PathBuf>,
    /// This client's certificate (PEM), for mutual TLS.
    #[arg(long, global = true, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// This client's private key (PEM), for mutual TLS.
    #[arg(long, global = true, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Print JSON for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Records a new VM (it does not start).
    Create {
        /// Its name, unique on this host.
        name: String,
        #[command(flatten)]
        machine: MachineArgs,
        /// The guest's vsock context id (default: dittod picks a free one).
        #[arg(long)]
        vsock_cid: Option<u32>,
    },
    /// Starts a VM.
    Start {
        /// Name or id.
        vm: String,
        /// Return only once the guest agent answers.
        #[arg(long)]
        wait: bool,
        /// How long --wait may take, in seconds.
        #[arg(long, default_value_t = 120.0)]
        wait_timeout: f64,
    },
    /// Pauses a running VM.
    Pause {
        /// Name or id.
        vm: String,
    },
    /// Resumes a paused VM.
    Resume {
        /// Name or id.
        vm: String,
    },
    /// Stops a VM: the guest powers off, or after --timeout it is forced.
    Stop {
        /// Name or id.
        vm: String,
        /// Seconds the guest gets to power off before the stop is forced (0: force at once).
        #[arg(long)]
        timeout: Option<f64>,
    },
    /// Deletes a VM that does not run (its disk images are left alone).
    Delete {
        /// Name or id.
        vm: String,
    },
    /// Shows one VM.
    Get {
        /// Name or id.
        vm: String,
    },
    /// Lists the VMs.
    List,
    /// Prints events as they happen (of one VM, or of all).
    Events {
        /// Name or id (default: every VM).
        vm: Option<String>,
    },
    /// Runs a program in the guest: `dittoctl exec NAME -- PROGRAM ARGS…`.
    Exec {
        /// Name or id.
        vm: String,
        /// An environment variable for the program: KEY=VALUE. Repeatable.
        #[arg(long = "env", value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// Send this program's standard input to the guest program.
        #[arg(long, short = 'i')]
        stdin: bool,
        /// The program's time limit in seconds (default: the agent's).
        #[arg(long)]
        timeout: Option<f64>,
        /// The program and its arguments.
        #[arg(last = true, required = true, value_name = "PROGRAM")]
        command: Vec<String>,
    },
    /// Checkpoints a running or paused VM (its memory, state and a copy of its disks).
    Checkpoint {
        /// Name or id.
        vm: String,
        /// What to store: `ditto` (free pages and verified clean page cache omitted, the
        /// rest saved), `free-only` (free and zero pages omitted) or `full` (every page;
        /// all-zero pages as zero). A ditto path that fails saves those pages and says why.
        #[arg(long, default_value = "ditto", value_parser = ["ditto", "free-only", "full"])]
        mode: String,
        /// How the guest agent's report is checked in ditto mode: `dirty-log` (the write
        /// tracking alone), `sample=N%` (also compare N % of the pages with the disk) or
        /// `full` (compare every page). One mismatch distrusts the whole report.
        #[arg(long = "verify", default_value = "dirty-log",
              value_parser = |s: &str| s.parse::<ditto_host::omission::Verification>().map(|v| v.to_string()))]
        verification: String,
        /// Seconds the agent's scan and the free-page round may take in all, a tenth of it (at
        /// most 2 s) kept for the free-page round (default: the VMM's, 60).
        #[arg(long, value_name = "SECONDS")]
        scan_timeout: Option<f64>,
        /// End the VM once the checkpoint is written.
        #[arg(long)]
        stop: bool,
        /// Store pages raw instead of zstd-compressed.
        #[arg(long)]
        uncompressed: bool,
        /// A folder to put the checkpoint in (default: dittod's state directory).
        #[arg(long)]
        destination: Option<PathBuf>,
    },
    /// Starts a new VM from a checkpoint, where its guest was.
    Restore {
        /// The checkpoint's id (see `dittoctl checkpoints`).
        checkpoint: String,
        /// The new VM's name (default: the checkpointed VM's).
        #[arg(long)]
        name: Option<String>,
        /// The new VM's vsock context id (default: a free one).
        #[arg(long)]
        vsock_cid: Option<u32>,
        /// An image to use instead of a copy of the checkpoint's disk: `id=ID,path=PATH`.
        /// Repeatable.
        #[arg(long = "drive", value_parser = ditto_host::vmm::config::parse_drive_path)]
        drives: Vec<(String, PathBuf)>,
    },
    /// Lists the checkpoints.
    Checkpoints,
    /// Deletes a checkpoint and its disk copies.
    DeleteCheckpoint {
        /// The checkpoint's id.
        checkpoint: String,
    },
    /// Prints a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

fn millis(seconds: f64, what: &str) -> Result<u32> {
    if !(0.0..=4_294_967.0).contains(&seconds) {
        return Err(anyhow!("{what}: {seconds} s is out of range"));
    }
    Ok((seconds * 1000.0).round() as u32)
}

fn absolute(path: &std::path::Path) -> Result<String> {
    let p = std::path::absolute(path).with_context(|| format!("bad path {}", path.display()))?;
    p.into_os_string()
        .into_string()
        .map_err(|p| anyhow!("{} is not UTF-8", p.display()))
}

fn spec(machine: &MachineArgs, vsock_cid: Option<u32>) -> Result<pb::VmSpec> {
    Ok(pb::VmSpec {
        kernel: absolute(&machine.kernel)?,
        initrd: machine.initrd.as_deref().map(absolute).transpose()?,
        cmdline: machine.cmdline.clone(),
        vcpus: u32::from(machine.vcpus),
        memory_mib: machine.mem_mib,
        drives: machine
            .drives
            .iter()
            .map(|d| {
                Ok(pb::Drive {
                    id: d.id.clone(),
                    path: absolute(&d.path)?,
                    read_only: d.read_only,
                })
            })
            .collect::<Result<_>>()?,
        vsock_cid: vsock_cid.unwrap_or(0),
    })
}

/// A spinner on stderr for a long operation (hidden for --json or without a terminal).
fn spinner(json: bool, message: String) -> ProgressBar {
    let bar = if json || !std::io::stderr().is_terminal() {
        ProgressBar::hidden()
    } else {
        ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
    };
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

fn print_json(value: &serde_json::Value) {
    println!("{value}");
}

fn print_vm(json: bool, vm: &pb::Vm) {
    if json {
        print_json(&output::vm_json(vm));
    } else {
        println!("{} ({}): {}", vm.name, vm.id, output::state_name(vm.state));
    }
}

/// Runs the command; returns the process's exit status.
async fn run(cli: Cli) -> Result<u8> {
    let Cli {
        socket,
        addr,
        tls_ca,
        tls_cert,
        tls_key,
        json,
        command,
    } = cli;
    if let Command::Completions { shell } = command {
        clap_complete::generate(
            shell,
            &mut Cli::command(),
            "dittoctl",
            &mut std::io::stdout(),
        );
        return Ok(0);
    }
    let target = match addr {
        Some(url) => Target::Addr {
            url,
            ca: tls_ca,
            identity: tls_cert.zip(tls_key),
        },
        None => Target::Socket(socket.unwrap_or_else(|| default_state_dir().join("dittod.sock"))),
    };
    let mut client = connect(&target).await?;
    match command {
        Command::Completions { .. } => {}
        Command::Create {
            name,
            machine,
            vsock_cid,
        } => {
            let spec = spec(&machine, vsock_cid)?;
            let vm = client
                .create_vm(pb::CreateVmRequest {
                    name,
                    spec: Some(spec),
                })
                .await?
                .into_inner();
            print_vm(json, &vm);
        }
        Command::Start {
            vm,
            wait,
            wait_timeout,
        } => {
            let bar = spinner(
                json,
                if wait {
                    format!("starting {vm} and waiting for its guest agent")
                } else {
                    format!("starting {vm}")
                },
            );
            let reply = client
                .start_vm(pb::StartVmRequest {
                    vm,
                    wait_for_agent: wait,
                    agent_timeout_ms: millis(wait_timeout, "--wait-timeout")?,
                })
                .await;
            bar.finish_and_clear();
            print_vm(json, &reply?.into_inner());
        }
        Command::Pause { vm } => {
            let vm = client
                .pause_vm(pb::PauseVmRequest { vm })
                .await?
                .into_inner();
            print_vm(json, &vm);
        }
        Command::Resume { vm } => {
            let vm = client
                .resume_vm(pb::ResumeVmRequest { vm })
                .await?
                .into_inner();
            print_vm(json, &vm);
        }
        Command::Stop { vm, timeout } => {
            let bar = spinner(json, format!("stopping {vm}"));
            let timeout_ms = timeout.map(|t| millis(t, "--timeout")).transpose()?;
            let reply = client.stop_vm(pb::StopVmRequest { vm, timeout_ms }).await;
            bar.finish_and_clear();
            let reply = reply?.into_inner();
            let vm = reply.vm.unwrap_or_default();
            if json {
                print_json(&serde_json::json!({
                    "vm": output::vm_json(&vm),
                    "method": output::stop_method_name(reply.method),
                    "elapsed_ms": reply.elapsed_ms,
                }));
            } else {
                println!(
                    "{}: {} in {} ({})",
                    vm.name,
                    output::state_name(vm.state),
                    output::human_duration(Duration::from_millis(reply.elapsed_ms)),
                    output::stop_method_name(reply.method).replace('_', " ")
                );
            }
        }
        Command::Delete { vm } => {
            client
                .delete_vm(pb::DeleteVmRequest { vm: vm.clone() })
                .await?;
            if json {
                print_json(&serde_json::json!({ "deleted": vm }));
            } else {
                println!("{vm}: deleted");
            }
        }
        Command::Get { vm } => {
            let vm = client.get_vm(pb::GetVmRequest { vm }).await?.into_inner();
            if json {
                print_json(&output::vm_json(&vm));
            } else {
                print!("{}", output::vm_detail(&vm));
            }
        }
        Command::List => {
            let vms = client
                .list_vms(pb::ListVmsRequest {})
                .await?
                .into_inner()
                .vms;
            if json {
                print_json(&serde_json::Value::Array(
                    vms.iter().map(output::vm_json).collect(),
                ));
            } else {
                print!("{}", output::vm_table(&vms));
            }
        }
        Command::Events { vm } => {
            let mut stream = client
                .watch_events(pb::WatchEventsRequest {
                    vm: vm.unwrap_or_default(),
                })
                .await?
                .into_inner();
            let mut out = std::io::stdout().lock();
            while let Some(event) = stream.message().await? {
                if json {
                    writeln!(out, "{}", output::event_json(&event))?;
                } else {
                    writeln!(out, "{}", output::event_line(&event))?;
                }
                out.flush()?;
            }
        }
        Command::Exec {
            vm,
            env,
            stdin,
            timeout,
            command,
        } => {
            let mut input = Vec::new();
            if stdin {
                std::io::stdin()
                    .read_to_end(&mut input)
                    .context("cannot read standard input")?;
            }
            let mut command = command.into_iter();
            let program = command.next().unwrap_or_default();
            let reply = client
                .guest_exec(pb::GuestExecRequest {
                    vm,
                    program,
                    args: command.collect(),
                    env: env.into_iter().collect(),
                    stdin: input,
                    timeout_ms: timeout
                        .map(|t| millis(t, "--timeout"))
                        .transpose()?
                        .unwrap_or(0),
                })
                .await?
                .into_inner();
            if json {
                print_json(&output::exec_json(&reply));
            } else {
                std::io::stdout().write_all(&reply.stdout)?;
                std::io::stderr().write_all(&reply.stderr)?;
                if reply.timed_out {
                    eprintln!("dittoctl: the program ran out of time and was killed");
                }
            }
            return Ok(match (reply.exit_code, reply.signal) {
                (_, s) if s > 0 => 128u8.saturating_add(u8::try_from(s).unwrap_or(127)),
                (c, _) => u8::try_from(c).unwrap_or(1),
            });
        }
        Command::Checkpoint {
            vm,
            mode,
            verification,
            scan_timeout,
            stop,
            uncompressed,
            destination,
        } => {
            let bar = spinner(json, format!("checkpointing {vm}"));
            let destination = destination.as_deref().map(absolute).transpose()?;
            let reply = client
                .checkpoint(pb::CheckpointRequest {
                    vm,
                    mode: match mode.as_str() {
                        "full" => pb::CheckpointMode::Full,
                        "free-only" => pb::CheckpointMode::FreeOnly,
                        _ => pb::CheckpointMode::Ditto,
                    }
                    .into(),
                    stop,
                    uncompressed,
                    destination: destination.unwrap_or_default(),
                    verification,
                    scan_timeout_ms: scan_timeout.map_or(0, |s| {
                        (s.max(0.001) * 1000.0).min(f64::from(u32::MAX)) as u32
                    }),
                })
                .await;
            bar.finish_and_clear();
            let reply = reply?.into_inner();
            if json {
                print_json(&output::checkpoint_result_json(&reply));
            } else {
                let c = reply.checkpoint.unwrap_or_default();
                let vm = reply.vm.unwrap_or_default();
                println!(
                    "checkpoint {} of {} ({}): {} stored ({} file, {} of disk copies); pages: {} \
                     saved, {} zero, {} free, {} on disk; paused {} ms, took {} ms; {} is {}",
                    c.id,
                    c.vm_name,
                    output::mode_name(c.mode),
                    output::human_bytes(c.stored_bytes),
                    output::human_bytes(c.file_bytes),
                    output::human_bytes(c.disk_copy_bytes),
                    c.pages_saved,
                    c.pages_zero,
                    c.pages_free,
                    c.pages_disk,
                    reply.pause_ms,
                    reply.total_ms,
                    vm.name,
                    output::state_name(vm.state)
                );
                for why in c.omission.iter().flat_map(|o| &o.degraded) {
                    println!("  saved instead of omitted: {why}");
                }
            }
        }
        Command::Restore {
            checkpoint,
            name,
            vsock_cid,
            drives,
        } => {
            let bar = spinner(json, format!("restoring {checkpoint}"));
            let drives = drives
                .iter()
                .map(|(id, path)| {
                    Ok(pb::Drive {
                        id: id.clone(),
                        path: absolute(path)?,
                        read_only: false,
                    })
                })
                .collect::<Result<_>>()?;
            let reply = client
                .restore(pb::RestoreRequest {
                    checkpoint,
                    name: name.unwrap_or_default(),
                    vsock_cid: vsock_cid.unwrap_or(0),
                    drives,
                })
                .await;
            bar.finish_and_clear();
            let reply = reply?.into_inner();
            let vm = reply.vm.unwrap_or_default();
            if json {
                let mut v = output::vm_json(&vm);
                v["memory_ms"] = serde_json::json!(reply.memory_ms);
                v["disk_copy_ms"] = serde_json::json!(reply.disk_copy_ms);
                v["total_ms"] = serde_json::json!(reply.total_ms);
                print_json(&v);
            } else {
                println!(
                    "{} ({}): {} after {} ms (memory {} ms, disk copies {} ms)",
                    vm.name,
                    vm.id,
                    output::state_name(vm.state),
                    reply.total_ms,
                    reply.memory_ms,
                    reply.disk_copy_ms
                );
            }
        }
        Command::Checkpoints => {
            let list = client
                .list_checkpoints(pb::ListCheckpointsRequest {})
                .await?
                .into_inner()
                .checkpoints;
            if json {
                print_json(&serde_json::Value::Array(
                    list.iter().map(output::checkpoint_json).collect(),
                ));
            } else {
                print!("{}", output::checkpoint_table(&list));
            }
        }
        Command::DeleteCheckpoint { checkpoint } => {
            client
                .delete_checkpoint(pb::DeleteCheckpointRequest {
                    checkpoint: checkpoint.clone(),
                })
                .await?;
            if json {
                print_json(&serde_json::json!({ "deleted": checkpoint }));
            } else {
                println!("checkpoint {checkpoint}: deleted");
            }
        }
    }
    Ok(0)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dittoctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            match e.downcast_ref::<tonic::Status>() {
                Some(status) if json => eprintln!(
                    "{}",
                    serde_json::json!({"error": {
                        "code": format!("{:?}", status.code()),
                        "message": status.message(),
                    }})
                ),
                Some(status) => eprintln!(
                    "dittoctl: {:?}: {}",
                    status.code(),
                    with_causes(status.message().to_owned(), sources(status))
                ),
                None => eprintln!(
                    "dittoctl: {}",
                    with_causes(
                        e.to_string(),
                        e.chain().skip(1).map(|c| c as &dyn std::error::Error)
                    )
                ),
            }
            ExitCode::FAILURE
        }
    }
}
