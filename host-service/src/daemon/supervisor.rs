//! The life cycle of each VM's `ditto-vmm` process: start, pause, resume, stop, guest exec,
//! and the supervisor task that turns the process's end into STOPPED or FAILED with the reason.
//!
//! - **Start** spawns the VMM detached ([`VmmProcess::spawn`]), then waits until its control
//!   socket reports the vCPUs running. A VMM that ends first fails the start with its own
//!   reason.
//! - **Supervision**: one task per VMM waits on its pidfd. An end the daemon asked for (a stop)
//!   or a clean one (the guest powered off) is STOPPED; anything else — a non-zero exit, a
//!   signal, an end without an exit file — is FAILED, with the reason in `last_error` and in an
//!   `Exited` event. Only that VM changes.
//! - **Stop** is graceful first: a paused VM is resumed, the guest agent runs `poweroff`, and
//!   the guest has the caller's timeout to power off; then the control socket's `Shutdown`
//!   (the VMM stops the vCPUs and exits) with [`SHUTDOWN_WAIT`]; then SIGKILL.
//! - **Recovery**: [`Registry::recover`] loads the records of a previous daemon and re-attaches
//!   to each VMM still running (same pid and start time), or records how it ended meanwhile.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ditto_proto::agent::v1 as agent_pb;
use tokio::sync::watch;

use super::error::Error;
use super::metrics as daemon_metrics;
use super::process::{RawExit, VmmProcess};
use super::record::{VmPaths, VmPhase, VmRecord};
use super::registry::{EventKind, Registry, Running, Vm, now_ms};
use crate::agent::{self, AGENT_PORT};
use crate::control::{ClientError, VmState, VmmClient};
use crate::vmm::exit_file::ExitRecord;

/// How long a VMM may take to serve its control socket with the vCPUs running.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a VMM may take to exit after the control socket's `Shutdown`.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);
/// The graceful part of a stop when the caller names no timeout.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `StartVm` waits for the agent when the caller names no timeout.
pub const DEFAULT_AGENT_WAIT: Duration = Duration::from_secs(120);
/// How long the guest may take to accept a connection to its agent.
const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// What a guest exec may take beyond its own time limit (connection, output transfer).
const EXEC_MARGIN: Duration = Duration::from_secs(15);
/// The agent's own time limit when a request names none.
const AGENT_DEFAULT_EXEC_LIMIT: Duration = Duration::from_secs(60);

/// How a stop ended the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMethod {
    /// The guest powered off when the agent asked.
    GuestPoweroff,
    /// The VMM exited when its control socket asked.
    VmmShutdown,
    /// The VMM was killed.
    Killed,
    /// The VMM had ended already.
    AlreadyEnded,
}

fn vmm_error(vm: &str, what: &str) -> impl FnOnce(ClientError) -> Error {
    let context = format!("VM {vm:?}: {what}");
    move |e| match e.code() {
        Some(tonic::Code::FailedPrecondition) => Error::Precondition(format!("{context}: {e}")),
        _ => Error::Vmm(format!("{context}: {e}")),
    }
}

fn wrong_state(vm: &Vm, op: &'static str, hint: &'static str) -> Error {
    let inner = vm.lock();
    Error::WrongState {
        vm: inner.record.name.clone(),
        op,
        state: inner.record.state,
        hint,
    }
}

/// Waits until `ended` turns true, at most `limit`; true when it did.
pub(super) async fn ended_within(ended: &mut watch::Receiver<bool>, limit: Duration) -> bool {
    matches!(
        tokio::time::timeout(limit, ended.wait_for(|e| *e)).await,
        Ok(Ok(_))
    )
}

/// What a VMM's end means: the state it leaves the VM in and the reason.
fn judge_exit(
    pid: u32,
    raw: &std::io::Result<RawExit>,
    file: Option<ExitRecord>,
) -> (bool, String) {
    match (file, raw) {
        (Some(record), _) => (record.clean, record.reason),
        (None, Ok(RawExit::Signal(signal))) => (
            false,
            format!(
                "ditto-vmm (pid {pid}) was killed by signal {signal}{}",
                if *signal == libc::SIGKILL {
                    " (SIGKILL)"
                } else {
                    ""
                }
            ),
        ),
        (None, Ok(RawExit::Code(code))) => (
            *code == 0,
            format!(
                "ditto-vmm (pid {pid}) exited with status {code} without saying why (see vmm.log)"
            ),
        ),
        (None, Ok(RawExit::Unknown)) => (
            false,
            format!(
                "ditto-vmm (pid {pid}) ended without recording why: it was killed or crashed \
                 (see vmm.log)"
            ),
        ),
        (None, Err(e)) => (
            false,
            format!("waiting for ditto-vmm (pid {pid}) failed: {e}"),
        ),
    }
}

/// The kind of a VMM's end and the guest's last console lines, from its exit file (`vmm_gone`
/// and nothing when it left none).
fn failure_details(file: Option<&ExitRecord>) -> (String, Vec<String>) {
    match file {
        Some(f) if !f.kind.is_empty() => (f.kind.clone(), f.console_tail.clone()),
        Some(f) => ("unknown".to_owned(), f.console_tail.clone()),
        None => ("vmm_gone".to_owned(), Vec::new()),
    }
}

/// Counts a FAILED end in the metrics and keeps its reason and the guest's last console lines
/// in the VM's folder (`last-failure.log`), which the next start does not remove.
fn record_failure(paths: &VmPaths, kind: &str, reason: &str, console_tail: &[String]) {
    daemon_metrics::vm_failure(kind);
    let mut text = format!("{reason}\nkind: {kind}\n");
    if console_tail.is_empty() {
        text.push_str("the guest's console: nothing recorded\n");
    } else {
        text.push_str("the guest's last console lines:\n");
        for line in console_tail {
            text.push_str(line);
            text.push('\n');
        }
    }
    if let Err(e) = crate::atomic_file::write(&paths.failure, text.as_bytes()) {
        tracing::warn!(path = %paths.failure.display(), error = %e, "cannot keep the failure");
    }
}

impl Registry {
    /// Starts watching `process`, the VMM of `vm`; returns what the VM's [`Running`] is.
    fn supervise(self: &Arc<Self>, vm: &Arc<Vm>, process: VmmProcess) -> Running {
        let process = Arc::new(process);
        let (ended_tx, ended) = watch::channel(false);
        let running = Running {
            process: process.clone(),
            ended,
        };
        vm.lock().running = Some(running.clone());
        let registry = self.clone();
        let vm = vm.clone();
        tokio::spawn(async move {
            let raw = process.wait().await;
            let file = ExitRecord::read(&vm.paths.exit).unwrap_or_else(|e| {
                Some(ExitRecord {
                    clean: false,
                    reason: format!("unreadable exit file: {e}"),
                    ..ExitRecord::default()
                })
            });
            let (kind, console_tail) = failure_details(file.as_ref());
            let (clean, reason) = judge_exit(process.pid(), &raw, file);
            let requested = {
                let mut inner = vm.lock();
                inner.running = None;
                std::mem::take(&mut inner.stop_requested)
            };
            let (state, message) = if requested {
                (VmPhase::Stopped, format!("stopped on request: {reason}"))
            } else if clean {
                (VmPhase::Stopped, reason)
            } else {
                (VmPhase::Failed, reason)
            };
            tracing::info!(vm = %vm.id, pid = process.pid(), %state, reason = %message, "VMM ended");
            let saved = registry.transition(&vm, state, message.clone(), |r| {
                r.pid = None;
                r.pid_start_ticks = None;
                r.started_at_ms = None;
                r.last_error = Some(message.clone());
            });
            if let Err(e) = saved {
                tracing::error!(vm = %vm.id, error = %e, "cannot record the VMM's end");
            }
            registry.emit(&vm, EventKind::Exited, message.clone());
            if state == VmPhase::Failed {
                record_failure(&vm.paths, &kind, &message, &console_tail);
                registry.emit(&vm, EventKind::Error, message);
            }
            let _ = ended_tx.send(true);
        });
        running
    }

    /// Starts the VMM of a VM that does not run, and waits until its vCPUs run.
    pub async fn start(self: &Arc<Self>, vm: &Arc<Vm>) -> Result<VmRecord, Error> {
        let _op = vm.op.lock().await;
        let record = {
            let inner = vm.lock();
            if inner.deleted {
                return Err(Error::NotFound(vm.id.clone()));
            }
            inner.record.clone()
        };
        if record.state.has_process() {
            return Err(wrong_state(vm, "start", "; it runs already"));
        }
        for stale in [&vm.paths.control, &vm.paths.vsock, &vm.paths.exit] {
            match std::fs::remove_file(stale) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::io(format!("cannot remove {}", stale.display()))(e));
                }
                _ => {}
            }
        }
        let bin = &self.options.vmm_bin;
        let process = match VmmProcess::spawn(
            bin,
            &record.config,
            record.restore_from.as_deref(),
            &vm.paths,
        ) {
            Ok(p) => p,
            Err(e) => {
                let why = format!("cannot run {}: {e}", bin.display());
                self.transition(vm, VmPhase::Failed, why.clone(), |r| {
                    r.last_error = Some(why.clone());
                })?;
                return Err(Error::Vmm(why));
            }
        };
        let (pid, ticks) = (process.pid(), process.start_ticks());
        self.transition(vm, VmPhase::Starting, format!("ditto-vmm pid {pid}"), |r| {
            r.pid = Some(pid);
            r.pid_start_ticks = Some(ticks);
            r.started_at_ms = Some(now_ms());
            r.last_error = None;
        })?;
        let Running { process, mut ended } = self.supervise(vm, process);

        // A restore fills guest memory before it serves its control socket: give it time in
        // proportion (16 s per GiB on top, ample for disks far slower than the page cache).
        let restoring = match record.restore_from {
            Some(_) => Duration::from_secs(record.config.mem_mib / 64),
            None => Duration::ZERO,
        };
        let deadline = Instant::now() + START_TIMEOUT + restoring;
        loop {
            if *ended.borrow() {
                let why = vm.record().last_error.unwrap_or_default();
                return Err(Error::Vmm(format!(
                    "ditto-vmm ended while starting VM {:?}: {why}",
                    record.name
                )));
            }
            if let Ok(client) = VmmClient::connect(&vm.paths.control).await
                && let Ok(status) = client.status().await
                && status.state == VmState::Running
            {
                break;
            }
            if Instant::now() >= deadline {
                let _ = process.kill();
                ended_within(&mut ended, SHUTDOWN_WAIT).await;
                return Err(Error::Vmm(format!(
                    "ditto-vmm did not report VM {:?} running within {} s and was killed \
                     (see {})",
                    record.name,
                    (START_TIMEOUT + restoring).as_secs(),
                    vm.paths.log.display()
                )));
            }
            ended_within(&mut ended, Duration::from_millis(50)).await;
        }
        let _ = &process;
        // A restored VM that ends later boots afresh from its disks.
        self.transition(vm, VmPhase::Running, "the vCPUs run", |r| {
            r.restore_from = None;
        })
    }

    /// Waits until the guest agent of a running VM answers, at most `limit`.
    pub async fn wait_for_agent(&self, vm: &Vm, limit: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + limit;
        let mut last = String::from("not tried yet");
        loop {
            if vm.state() != VmPhase::Running {
                return Err(Error::Precondition(format!(
                    "VM {:?} is {} while waiting for its agent: {}",
                    vm.name(),
                    vm.state(),
                    vm.record().last_error.unwrap_or_default()
                )));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Deadline(format!(
                    "the guest agent of VM {:?} did not answer within {} s (the VM keeps \
                     running): {last}",
                    vm.name(),
                    limit.as_secs()
                )));
            }
            let attempt = async {
                let mut client =
                    agent::connect(&vm.paths.vsock, AGENT_PORT, AGENT_CONNECT_TIMEOUT.min(left))
                        .await
                        .map_err(|e| e.to_string())?;
                client
                    .info(agent_pb::InfoRequest {})
                    .await
                    .map_err(|e| e.message().to_owned())
            };
            match tokio::time::timeout(left, attempt).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => last = e,
                Err(_) => last = "timed out".into(),
            }
            tokio::time::sleep(Duration::from_millis(500).min(left)).await;
        }
    }

    /// Pauses (`pause = true`) or resumes a VM through its VMM's control socket.
    pub async fn pause_or_resume(&self, vm: &Arc<Vm>, pause: bool) -> Result<VmRecord, Error> {
        let _op = vm.op.lock().await;
        let (op, from, to, hint) = if pause {
            (
                "pause",
                VmPhase::Running,
                VmPhase::Paused,
                "; only a running VM can be paused",
            )
        } else {
            (
                "resume",
                VmPhase::Paused,
                VmPhase::Running,
                "; only a paused VM can be resumed",
            )
        };
        if vm.state() != from {
            return Err(wrong_state(vm, op, hint));
        }
        let name = vm.name();
        let client = VmmClient::connect(&vm.paths.control)
            .await
            .map_err(vmm_error(&name, "cannot reach its VMM"))?;
        let change = if pause {
            client.pause().await
        } else {
            client.resume().await
        }
        .map_err(vmm_error(&name, op))?;
        self.transition(
            vm,
            to,
            format!("{op}d in {} us", change.elapsed.as_micros()),
            |_| {},
        )
    }

    /// Stops a VM: graceful for up to `graceful`, then forced. Returns the record after the
    /// VMM ended and how it was ended.
    pub async fn stop(
        &self,
        vm: &Arc<Vm>,
        graceful: Duration,
    ) -> Result<(VmRecord, StopMethod), Error> {
        let _op = vm.op.lock().await;
        let before = vm.state();
        if !before.has_process() {
            return Err(wrong_state(vm, "stop", "; it does not run"));
        }
        let Some(Running { process, mut ended }) = vm.running() else {
            return Ok((vm.record(), StopMethod::AlreadyEnded));
        };
        vm.lock().stop_requested = true;
        self.transition(vm, VmPhase::Stopping, "stop requested", |_| {})?;
        let name = vm.name();
        let start = Instant::now();
        let control = VmmClient::connect(&vm.paths.control).await;

        if !graceful.is_zero() && !*ended.borrow() {
            let mut running = before == VmPhase::Running;
            if before == VmPhase::Paused
                && let Ok(client) = &control
            {
                running = client.resume().await.is_ok();
            }
            if running {
                match self.ask_guest_to_power_off(vm, graceful).await {
                    Ok(()) => {
                        let left = graceful.saturating_sub(start.elapsed());
                        if ended_within(&mut ended, left).await {
                            return Ok((vm.record(), StopMethod::GuestPoweroff));
                        }
                        tracing::warn!(vm = %vm.id, "the guest did not power off in time");
                    }
                    Err(e) => tracing::warn!(vm = %vm.id, error = %e, "no graceful stop"),
                }
            }
        }
        if *ended.borrow() {
            return Ok((vm.record(), StopMethod::AlreadyEnded));
        }
        match &control {
            Ok(client) => match client.shutdown().await {
                Ok(()) => {
                    if ended_within(&mut ended, SHUTDOWN_WAIT).await {
                        return Ok((vm.record(), StopMethod::VmmShutdown));
                    }
                }
                Err(e) => tracing::warn!(vm = %vm.id, error = %e, "control shutdown failed"),
            },
            Err(e) => tracing::warn!(vm = %vm.id, error = %e, "control socket unreachable"),
        }
        if *ended.borrow() {
            return Ok((vm.record(), StopMethod::AlreadyEnded));
        }
        process
            .kill()
            .map_err(Error::io(format!("cannot kill the VMM of VM {name}")))?;
        if ended_within(&mut ended, SHUTDOWN_WAIT).await {
            Ok((vm.record(), StopMethod::Killed))
        } else {
            Err(Error::Vmm(format!(
                "the VMM of VM {name:?} (pid {}) did not end after SIGKILL",
                process.pid()
            )))
        }
    }

    /// Has the guest agent run `poweroff`. Ok when the request reached the agent.
    async fn ask_guest_to_power_off(&self, vm: &Vm, limit: Duration) -> Result<(), Error> {
        let name = vm.name();
        let unavailable = |reason: String| Error::AgentUnavailable {
            vm: name.clone(),
            reason,
        };
        let mut client = agent::connect(
            &vm.paths.vsock,
            AGENT_PORT,
            AGENT_CONNECT_TIMEOUT.min(limit),
        )
        .await
        .map_err(|e| unavailable(e.to_string()))?;
        let request = agent_pb::ExecRequest {
            program: "poweroff".into(),
            timeout_ms: 5000,
            ..Default::default()
        };
        // The agent may be killed by the shutdown before it answers: a reply is not needed.
        let _ =
            tokio::time::timeout(Duration::from_secs(10).min(limit), client.exec(request)).await;
        Ok(())
    }

    /// Runs a program in a running VM's guest through its agent (`timeout_ms` 0: the agent's
    /// default limit).
    pub async fn exec(
        &self,
        vm: &Vm,
        request: agent_pb::ExecRequest,
    ) -> Result<agent_pb::ExecResponse, Error> {
        if request.program.is_empty() {
            return Err(Error::invalid("program", "no program given"));
        }
        match vm.state() {
            VmPhase::Running => {}
            VmPhase::Paused => {
                return Err(wrong_state(vm, "run a program in", "; resume it first"));
            }
            _ => return Err(wrong_state(vm, "run a program in", "; start it first")),
        }
        let name = vm.name();
        let unavailable = |reason: String| Error::AgentUnavailable {
            vm: name.clone(),
            reason,
        };
        let mut client = agent::connect(&vm.paths.vsock, AGENT_PORT, AGENT_CONNECT_TIMEOUT)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let limit = match request.timeout_ms {
            0 => AGENT_DEFAULT_EXEC_LIMIT,
            ms => Duration::from_millis(u64::from(ms)),
        };
        let call = client.exec(request);
        let reply = match tokio::time::timeout(limit + EXEC_MARGIN, call).await {
            Ok(Ok(reply)) => reply.into_inner(),
            Ok(Err(status)) => {
                return Err(match status.code() {
                    tonic::Code::InvalidArgument => {
                        Error::invalid("program", status.message().to_owned())
                    }
                    tonic::Code::FailedPrecondition | tonic::Code::PermissionDenied => {
                        Error::Precondition(format!(
                            "the guest agent of VM {name:?} refused: {}",
                            status.message()
                        ))
                    }
                    _ => unavailable(status.message().to_owned()),
                });
            }
            Err(_) => {
                return Err(Error::Deadline(format!(
                    "the guest agent of VM {name:?} did not answer within {} s",
                    (limit + EXEC_MARGIN).as_secs()
                )));
            }
        };
        Ok(reply)
    }

    /// Loads the records a previous daemon left and re-attaches to the VMMs that still run.
    /// Returns the number of VMs re-attached.
    pub async fn recover(self: &Arc<Self>) -> Result<usize, super::record::StateDirError> {
        let super::record::Loaded {
            records,
            unreadable,
        } = self.dir.load()?;
        for (path, why) in unreadable {
            tracing::warn!(record = %path.display(), reason = %why, "skipping an unreadable VM record");
        }
        let mut attached = 0;
        for record in records {
            let (state, pid, ticks) = (record.state, record.pid, record.pid_start_ticks);
            let vm = self.insert(record);
            if !state.has_process() {
                continue;
            }
            let process = match pid.zip(ticks) {
                Some((pid, ticks)) => VmmProcess::attach(pid, ticks).unwrap_or_else(|e| {
                    tracing::warn!(vm = %vm.id, pid, error = %e, "cannot re-attach");
                    None
                }),
                None => None,
            };
            match process {
                Some(process) => {
                    let pid = process.pid();
                    self.supervise(&vm, process);
                    let now = match VmmClient::connect(&vm.paths.control).await {
                        Ok(client) => client
                            .status()
                            .await
                            .map(|s| s.state)
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    let result = match now {
                        Ok(VmState::Paused) => {
                            self.transition(&vm, VmPhase::Paused, "re-attached", |_| {})
                        }
                        Ok(_) => self.transition(&vm, VmPhase::Running, "re-attached", |_| {}),
                        Err(e) => {
                            let why = format!("re-attached, but its control socket fails: {e}");
                            self.transition(&vm, state, why.clone(), |r| {
                                r.last_error = Some(why.clone())
                            })
                        }
                    };
                    if let Err(e) = result {
                        tracing::error!(vm = %vm.id, error = %e, "cannot record the re-attached VM");
                    }
                    tracing::info!(vm = %vm.id, pid, "re-attached to a running VMM");
                    attached += 1;
                }
                None => {
                    let file = ExitRecord::read(&vm.paths.exit).ok().flatten();
                    let (kind, console_tail) = failure_details(file.as_ref());
                    let (clean, reason) = match file {
                        Some(f) => (f.clean, f.reason),
                        None => (
                            false,
                            "its VMM is gone and left no exit reason (killed, crashed, or the \
                             host restarted)"
                                .to_owned(),
                        ),
                    };
                    let why = format!("ended while dittod was not running: {reason}");
                    let to = if clean || state == VmPhase::Stopping {
                        VmPhase::Stopped
                    } else {
                        VmPhase::Failed
                    };
                    if let Err(e) = self.transition(&vm, to, why.clone(), |r| {
                        r.pid = None;
                        r.pid_start_ticks = None;
                        r.started_at_ms = None;
                        r.last_error = Some(why.clone());
                    }) {
                        tracing::error!(vm = %vm.id, error = %e, "cannot record the VM's end");
                    }
                    if to == VmPhase::Failed {
                        record_failure(&vm.paths, &kind, &why, &console_tail);
                    }
                }
            }
        }
        self.publish_counts();
        Ok(attached)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_judged() {
        let clean = Some(ExitRecord {
            clean: true,
            reason: "the guest powered off".into(),
            ..ExitRecord::default()
        });
        assert_eq!(
            judge_exit(1, &Ok(RawExit::Code(0)), clean),
            (true, "the guest powered off".into())
        );
        let (ok, why) = judge_exit(1, &Ok(RawExit::Signal(9)), None);
        assert!(!ok && why.contains("SIGKILL"), "{why}");
        let (ok, why) = judge_exit(1, &Ok(RawExit::Unknown), None);
        assert!(!ok && why.contains("killed or crashed"), "{why}");
        assert!(judge_exit(1, &Ok(RawExit::Code(0)), None).0);
        assert!(!judge_exit(1, &Ok(RawExit::Code(1)), None).0);
    }
}
