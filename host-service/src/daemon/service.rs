//! The `ditto.host.v1.Host` gRPC service over a [`Registry`]: requests are checked
//! ([`super::validate`]), turned into registry operations, and every operation is logged
//! (`tracing`: VM id, operation, duration, outcome) and measured ([`super::metrics`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ditto_proto::host::v1 as pb;
use pb::host_server::Host;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::checkpoints::{CheckpointAsk, CheckpointRecord, RestoreRequest};
use super::error::Error;
use super::metrics;
use super::record::{VmPhase, VmRecord};
use super::registry::{Event, EventKind, Registry, Vm};
use super::supervisor::{DEFAULT_AGENT_WAIT, DEFAULT_STOP_TIMEOUT, StopMethod};
use super::validate;
use crate::omission::{Mode, Verification};
use ditto_proto::agent::v1 as agent_pb;

/// The service; cloning shares the registry.
#[derive(Clone, Debug)]
pub struct HostService {
    registry: Arc<Registry>,
}

impl HostService {
    /// A service over `registry`.
    pub fn new(registry: Arc<Registry>) -> Self {
        Self { registry }
    }

    /// Runs one operation, logging and measuring it.
    async fn run<T>(
        &self,
        op: &'static str,
        vm: &str,
        work: impl Future<Output = Result<T, Error>>,
    ) -> Result<Response<T>, Status> {
        let start = Instant::now();
        let result = work.await;
        let took = start.elapsed();
        let duration_ms = took.as_secs_f64() * 1e3;
        match &result {
            Ok(_) => {
                tracing::info!(op, vm, duration_ms, "ok");
                metrics::operation(op, "ok", took);
            }
            Err(e) => {
                let code = e.code();
                tracing::warn!(op, vm, duration_ms, code = ?code, error = %e, "refused or failed");
                metrics::operation(op, code_name(code), took);
            }
        }
        result.map(Response::new).map_err(Status::from)
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::NotFound => "not_found",
        C::InvalidArgument => "invalid_argument",
        C::AlreadyExists => "already_exists",
        C::FailedPrecondition => "failed_precondition",
        C::ResourceExhausted => "resource_exhausted",
        C::Unavailable => "unavailable",
        C::DeadlineExceeded => "deadline_exceeded",
        _ => "internal",
    }
}

/// The wire form of a state.
pub fn phase_to_pb(phase: VmPhase) -> pb::VmState {
    match phase {
        VmPhase::Created => pb::VmState::Created,
        VmPhase::Starting => pb::VmState::Starting,
        VmPhase::Running => pb::VmState::Running,
        VmPhase::Paused => pb::VmState::Paused,
        VmPhase::Stopping => pb::VmState::Stopping,
        VmPhase::Stopped => pb::VmState::Stopped,
        VmPhase::Failed => pb::VmState::Failed,
    }
}

fn path_string(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

fn record_to_pb(record: &VmRecord, uptime: Option<Duration>, dir: &std::path::Path) -> pb::Vm {
    pb::Vm {
        id: record.id.clone(),
        name: record.name.clone(),
        state: phase_to_pb(record.state).into(),
        spec: Some(spec_to_pb(&record.config)),
        pid: if record.state.has_process() {
            record.pid.unwrap_or(0)
        } else {
            0
        },
        uptime_ms: uptime.map_or(0, |u| u64::try_from(u.as_millis()).unwrap_or(u64::MAX)),
        last_error: record.last_error.clone().unwrap_or_default(),
        created_at_ms: record.created_at_ms,
        dir: path_string(dir),
    }
}

fn spec_to_pb(c: &crate::vmm::config::VmConfig) -> pb::VmSpec {
    pb::VmSpec {
        kernel: path_string(&c.kernel),
        initrd: c.initrd.as_deref().map(path_string),
        cmdline: c.cmdline.clone(),
        vcpus: u32::from(c.vcpus),
        memory_mib: c.mem_mib,
        drives: c
            .drives
            .iter()
            .map(|d| pb::Drive {
                id: d.id.clone(),
                path: path_string(&d.path),
                read_only: d.read_only,
            })
            .collect(),
        vsock_cid: c
            .vsock
            .as_ref()
            .map_or(0, |v| u32::try_from(v.cid).unwrap_or(0)),
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn checkpoint_to_pb(c: &CheckpointRecord) -> pb::CheckpointInfo {
    pb::CheckpointInfo {
        id: c.id.clone(),
        vm_id: c.vm_id.clone(),
        vm_name: c.vm_name.clone(),
        mode: match c.mode {
            Mode::Full => pb::CheckpointMode::Full,
            Mode::Ditto => pb::CheckpointMode::Ditto,
            Mode::FreeOnly => pb::CheckpointMode::FreeOnly,
        }
        .into(),
        created_at_ms: c.created_at_ms,
        path: path_string(&c.file()),
        file_bytes: c.file_bytes,
        stored_bytes: c.stored_bytes,
        disk_copy_bytes: c.disk_copy_bytes,
        pages_saved: c.pages_saved,
        pages_zero: c.pages_zero,
        pages_free: c.pages_free,
        pages_disk: c.pages_disk,
        spec: Some(spec_to_pb(&c.vm.config)),
        omission: c.omission.clone().map(Into::into),
    }
}

fn vm_to_pb(vm: &Arc<Vm>) -> pb::Vm {
    record_to_pb(&vm.record(), vm.uptime(), &vm.paths.dir)
}

fn event_to_pb(e: Event) -> pb::VmEvent {
    pb::VmEvent {
        vm_id: e.vm_id,
        vm_name: e.vm_name,
        kind: match e.kind {
            EventKind::Created => pb::EventKind::Created,
            EventKind::StateChanged => pb::EventKind::StateChanged,
            EventKind::Exited => pb::EventKind::Exited,
            EventKind::Error => pb::EventKind::Error,
            EventKind::Deleted => pb::EventKind::Deleted,
        }
        .into(),
        state: phase_to_pb(e.state).into(),
        message: e.message,
        at_ms: e.at_ms,
    }
}

#[tonic::async_trait]
impl Host for HostService {
    async fn create_vm(
        &self,
        request: Request<pb::CreateVmRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        let r = request.into_inner();
        let registry = &self.registry;
        self.run("create", &r.name.clone(), async move {
            validate::name(&r.name)?;
            let machine = validate::spec(r.spec.as_ref(), registry.options.host)?;
            let record = registry.create(&r.name, machine).await?;
            let vm = registry.find(&record.id)?;
            Ok(vm_to_pb(&vm))
        })
        .await
    }

    async fn start_vm(
        &self,
        request: Request<pb::StartVmRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        let r = request.into_inner();
        let registry = &self.registry;
        self.run("start", &r.vm.clone(), async move {
            let vm = registry.find(&r.vm)?;
            registry.start(&vm).await?;
            if r.wait_for_agent {
                let limit = match r.agent_timeout_ms {
                    0 => DEFAULT_AGENT_WAIT,
                    ms => Duration::from_millis(u64::from(ms)),
                };
                registry.wait_for_agent(&vm, limit).await?;
            }
            Ok(vm_to_pb(&vm))
        })
        .await
    }

    async fn pause_vm(
        &self,
        request: Request<pb::PauseVmRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        let r = request.into_inner();
        let registry = &self.registry;
        self.run("pause", &r.vm.clone(), async move {
            let vm = registry.find(&r.vm)?;
            registry.pause_or_resume(&vm, true).await?;
            Ok(vm_to_pb(&vm))
        })
        .await
    }

    async fn resume_vm(
        &self,
        request: Request<pb::ResumeVmRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        let r = request.into_inner();
        let registry = &self.registry;
        self.run("resume", &r.vm.clone(), async move {
            let vm = registry.find(&r.vm)?;
            registry.pause_or_resume(&vm, false).await?;
            Ok(vm_to_pb(&vm))
        })
        .await
    }

    async fn stop_vm(
        &self,
        request: Request<pb::StopVmRequest>,
    ) -> Result<Response<pb::StopVmResponse>, Status> {
        let r = request.into_inner();
        let registry = &self.registry;
        self.run("stop", &r.vm.clone(), async move {
            let vm = registry.find(&r.vm)?;
            let graceful = r.timeout_ms.map_or(DEFAULT_STOP_TIMEOUT, |ms| {
                Duration::from_millis(u64::from(ms))
            });
            let start = Instant::now();
            let (_, method) = registry.stop(&vm, graceful).await?;
            Ok(pb::StopVmResponse {
                vm: Some(vm_to_pb(&vm)),
                method: match method {
                    StopMethod::GuestPoweroff => pb::StopMethod::GuestPoweroff,
                    StopMethod::VmmShutdown => pb::StopMethod::VmmShutdown,
                    StopMethod::Killed => pb::StopMethod::Killed,
                    StopMethod::AlreadyEnded => pb::StopMethod::AlreadyEnded,
                }
                .into(),
                elapsed_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
            })
        })
        .await
    }

    async fn delete_vm(
        &self,
        request: Request<pb::DeleteVmRequest>,
    ) -> Result<Response<pb::DeleteVmResponse>, Status> {
        let r = request.into_inner();
        let registry = &self.registry;
        self.run("delete", &r.vm.clone(), async move {
            let vm = registry.find(&r.vm)?;
            registry.delete(&vm).await?;
            Ok(pb::DeleteVmResponse {})
        })
        .await
    }

    async fn get_vm(&self, request: Request<pb::GetVmRequest>) -> Result<Response<pb::Vm>, Status> {
        let r = request.into_inner();
        let registry = &self.registry;
        self.run("get", &r.vm.clone(), async move {
            Ok(vm_to_pb(&registry.find(&r.vm)?))
        })
        .await
    }

    async fn list_vms(
        &self,
        _request: Request<pb::ListVmsRequest>,
    ) -> Result<Response<pb::ListVmsResponse>, Status> {
        let registry = &self.registry;
        self.run("list", "", async move {
            Ok(pb::ListVmsResponse {
                vms: registry.list().iter().map(vm_to_pb).collect(),
            })
        })
        .await
    }

    type WatchEventsStream = ReceiverStream<Result<pb::VmEvent, Status>>;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let r = request.into_inner();
        let registry = &self.registry;
        self.run("watch", &r.vm.clone(), async move {
            let only = if r.vm.is_empty() {
                None
            } else {
                Some(registry.find(&r.vm)?.id.clone())
            };
            let mut events = registry.subscribe();
            let (tx, rx) = mpsc::channel(64);
            tokio::spawn(async move {
                loop {
                    let item = tokio::select! {
                        item = events.recv() => item,
                        () = tx.closed() => return,
                    };
                    let sent = match item {
                        Ok(e) if only.as_ref().is_none_or(|id| *id == e.vm_id) => {
                            tx.send(Ok(event_to_pb(e))).await
                        }
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            let _ = tx
                                .send(Err(Status::resource_exhausted(format!(
                                    "this watcher fell {n} events behind; list the VMs and \
                                     watch again"
                                ))))
                                .await;
                            return;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    };
                    if sent.is_err() {
                        return;
                    }
                }
            });
            Ok(ReceiverStream::new(rx))
        })
        .await
    }

    async fn guest_exec(
        &self,
        request: Request<pb::GuestExecRequest>,
    ) -> Result<Response<pb::GuestExecResponse>, Status> {
        let r = request.into_inner();
        let registry = &self.registry;
        self.run("exec", &r.vm.clone(), async move {
            let vm = registry.find(&r.vm)?;
            let reply = registry
                .exec(
                    &vm,
                    agent_pb::ExecRequest {
                        program: r.program,
                        args: r.args,
                        env: r.env,
                        stdin: r.stdin,
                        timeout_ms: r.timeout_ms,
                    },
                )
                .await?;
            Ok(pb::GuestExecResponse {
                exit_code: reply.exit_code,
                signal: reply.signal,
                stdout: reply.stdout,
                stderr: reply.stderr,
                timed_out: reply.timed_out,
            })
        })
        .await
    }

    async fn checkpoint(
        &self,
        request: Request<pb::CheckpointRequest>,
    ) -> Result<Response<pb::CheckpointResponse>, Status> {
        let r = request.into_inner();
        let registry = &self.registry;
        self.run("checkpoint", &r.vm.clone(), async move {
            let mode = match pb::CheckpointMode::try_from(r.mode) {
                Ok(pb::CheckpointMode::Full | pb::CheckpointMode::Unspecified) => Mode::Full,
                Ok(pb::CheckpointMode::Ditto) => Mode::Ditto,
                Ok(pb::CheckpointMode::FreeOnly) => Mode::FreeOnly,
                Err(_) => {
                    return Err(Error::invalid(
                        "mode",
                        format!("unknown checkpoint mode {}", r.mode),
                    ));
                }
            };
            let verification = if r.verification.is_empty() {
                Verification::DirtyLog
            } else {
                r.verification
                    .parse()
                    .map_err(|e: String| Error::invalid("verification", e))?
            };
            let vm = registry.find(&r.vm)?;
            let ask = CheckpointAsk {
                destination: (!r.destination.is_empty()).then(|| PathBuf::from(&r.destination)),
                stop: r.stop,
                uncompressed: r.uncompressed,
                mode,
                verification,
                scan_timeout: (r.scan_timeout_ms > 0)
                    .then(|| Duration::from_millis(r.scan_timeout_ms.into())),
            };
            let (checkpoint, timing) = registry.checkpoint(&vm, &ask).await?;
            Ok(pb::CheckpointResponse {
                checkpoint: Some(checkpoint_to_pb(&checkpoint)),
                pause_ms: ms(timing.pause),
                total_ms: ms(timing.total),
                vm: Some(vm_to_pb(&vm)),
            })
        })
        .await
    }

    async fn restore(
        &self,
        request: Request<pb::RestoreRequest>,
    ) -> Result<Response<pb::RestoreResponse>, Status> {
        let r = request.into_inner();
        let registry = &self.registry;
        self.run("restore", &r.checkpoint.clone(), async move {
            let vsock_cid = match r.vsock_cid {
                0 => None,
                cid @ 1..=2 => {
                    return Err(Error::invalid(
                        "vsock_cid",
                        format!("{cid} is reserved (need 3 or more)"),
                    ));
                }
                cid => Some(u64::from(cid)),
            };
            let request = RestoreRequest {
                checkpoint: r.checkpoint,
                name: (!r.name.is_empty()).then_some(r.name),
                vsock_cid,
                drives: r
                    .drives
                    .into_iter()
                    .map(|d| (d.id, PathBuf::from(d.path)))
                    .collect(),
            };
            let (vm, timing) = registry.restore(request).await?;
            Ok(pb::RestoreResponse {
                vm: Some(vm_to_pb(&vm)),
                memory_ms: ms(timing.memory),
                disk_copy_ms: ms(timing.disk_copy),
                total_ms: ms(timing.total),
            })
        })
        .await
    }

    async fn list_checkpoints(
        &self,
        _request: Request<pb::ListCheckpointsRequest>,
    ) -> Result<Response<pb::ListCheckpointsResponse>, Status> {
        let registry = &self.registry;
        self.run("list_checkpoints", "", async move {
            let checkpoints = registry
                .list_checkpoints()?
                .iter()
                .map(checkpoint_to_pb)
                .collect();
            Ok(pb::ListCheckpointsResponse { checkpoints })
        })
        .await
    }

    async fn delete_checkpoint(
        &self,
        request: Request<pb::DeleteCheckpointRequest>,
    ) -> Result<Response<pb::DeleteCheckpointResponse>, Status> {
        let r = request.into_inner();
        let registry = &self.registry;
        self.run("delete_checkpoint", &r.checkpoint.clone(), async move {
            registry.delete_checkpoint(&r.checkpoint).await?;
            Ok(pb::DeleteCheckpointResponse {})
        })
        .await
    }
}
