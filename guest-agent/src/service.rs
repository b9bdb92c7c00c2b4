//! The `ditto.agent.v1.Agent` gRPC service: `Info`, `Scan` (a server stream: the disk table,
//! extent batches, then the summary) and `Exec`.

use std::sync::Arc;
use std::time::Duration;

use ditto_proto::agent::v1 as pb;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::census;
use crate::exec::{self, ExecError, ExecRequest};
use crate::fault::Fault;
use crate::frames::{FrameReader, PAGE_SIZE};
use crate::kpageblock;
use crate::scan::{self, Method, ScanError, ScanEvent, ScanOptions, Summary};

pub use pb::agent_server::AgentServer;

/// The service's settings.
#[derive(Clone, Debug)]
pub struct AgentService {
    exec_enabled: bool,
    include_loop_devices: bool,
    method: Option<Method>,
    fault: Option<Fault>,
    scans: Arc<Semaphore>,
}

impl AgentService {
    /// A service; `exec_enabled` false refuses `Exec`.
    pub fn new(exec_enabled: bool, include_loop_devices: bool) -> Self {
        Self {
            exec_enabled,
            include_loop_devices,
            method: None,
            fault: None,
            scans: Arc::new(Semaphore::new(1)),
        }
    }

    /// The method of scans whose request names none (`None`: the fast path when
    /// /proc/kpageblock is readable, else the walk).
    pub fn with_method(mut self, method: Option<Method>) -> Self {
        self.method = method;
        self
    }

    /// Fault injection for testing hosts: the service misbehaves as `fault` says.
    pub fn with_fault(mut self, fault: Option<Fault>) -> Self {
        self.fault = fault;
        self
    }

    /// The fault this service injects, if any.
    pub fn fault(&self) -> Option<Fault> {
        self.fault
    }
}

/// The running kernel's release.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn disk_table(disks: Vec<crate::disks::Disk>) -> pb::ScanChunk {
    pb::ScanChunk {
        body: Some(pb::scan_chunk::Body::Disks(pb::DiskTable {
            disks: disks
                .into_iter()
                .map(|d| pb::Disk {
                    id: d.id,
                    dev: format!("{}:{}", d.dev.0, d.dev.1),
                    path: d.path.display().to_string(),
                    size_bytes: d.size_bytes,
                })
                .collect(),
        })),
    }
}

fn summary_chunk(
    s: Summary,
    guest_frames: std::collections::BTreeMap<String, u64>,
) -> pb::ScanChunk {
    pb::ScanChunk {
        body: Some(pb::scan_chunk::Body::Summary(pb::ScanSummary {
            files_visited: s.files_visited,
            files_skipped: s.files_skipped.into_iter().collect(),
            filesystems_skipped: s.filesystems_skipped.into_iter().collect(),
            pages_resident: s.pages_resident,
            pages_reported: s.pages_reported,
            pages_excluded: s.pages_excluded.into_iter().collect(),
            elapsed_us: s.elapsed_us,
            budget_exhausted: s.budget_exhausted,
            pages_refaulted: s.pages_refaulted,
            guest_frames: guest_frames.into_iter().collect(),
            method: s.method.as_str().to_owned(),
        })),
    }
}

fn event_chunk(event: ScanEvent, skew: u64) -> pb::ScanChunk {
    match event {
        ScanEvent::Disks(disks) => disk_table(disks),
        ScanEvent::Extents(batch) => pb::ScanChunk {
            body: Some(pb::scan_chunk::Body::Extents(pb::ExtentBatch {
                extents: batch
                    .into_iter()
                    .map(|e| pb::CacheExtent {
                        pfn: e.pfn,
                        pages: e.pages,
                        disk: e.disk,
                        offset: e.offset.wrapping_add(skew),
                    })
                    .collect(),
            })),
        },
    }
}

#[tonic::async_trait]
impl pb::agent_server::Agent for AgentService {
    async fn info(
        &self,
        _request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let mut capabilities = Vec::new();
        if FrameReader::open().is_ok() {
            capabilities.push("kpageflags".to_owned());
            capabilities.push("pagemap-pfn".to_owned());
        }
        if kpageblock::available() {
            capabilities.push("kpageblock".to_owned());
        }
        if self.exec_enabled {
            capabilities.push("exec".to_owned());
        }
        Ok(Response::new(pb::InfoResponse {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            kernel_release: kernel_release(),
            page_size: PAGE_SIZE as u32,
            capabilities,
        }))
    }

    type ScanStream = ReceiverStream<Result<pb::ScanChunk, Status>>;

    async fn scan(
        &self,
        request: Request<pb::ScanRequest>,
    ) -> Result<Response<Self::ScanStream>, Status> {
        let permit = self
            .scans
            .clone()
            .try_acquire_owned()
            .map_err(|_| Status::resource_exhausted("a scan is already running"))?;
        let (tx, rx) = mpsc::channel(4);
        if let Some(fault) = self.fault.filter(|f| f.replaces_scan()) {
            tokio::spawn(async move {
                let _permit = permit;
                fault.send_stream(tx).await;
            });
            return Ok(Response::new(ReceiverStream::new(rx)));
        }
        let request = request.into_inner();
        let method = Method::parse_request(&request.method)
            .map_err(|e| Status::invalid_argument(e.to_string()))?
            .or(self.method);
        let options = ScanOptions {
            paths: request.paths.iter().map(Into::into).collect(),
            method,
            time_budget: (request.time_budget_ms > 0)
                .then(|| Duration::from_millis(request.time_budget_ms.into())),
            include_loop_devices: self.include_loop_devices,
            after_mincore: None,
            kpageblock_path: None,
        };
        let skew = self.fault.map_or(0, Fault::offset_skew);
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let result = scan::scan(&options, |event| {
                tx.blocking_send(Ok(event_chunk(event, skew)))
                    .map_err(|_| ())
            });
            let last = match result {
                // The census is a measurement for the host; a scan without it is still whole.
                Ok(summary) => Ok(summary_chunk(summary, census::census().unwrap_or_default())),
                Err(ScanError::Sink(())) => return, // the client went away
                Err(
                    e @ (ScanError::Frames(_) | ScanError::Unsupported | ScanError::Kpageblock(_)),
                ) => Err(Status::failed_precondition(e.to_string())),
                Err(e @ (ScanError::Path { .. } | ScanError::PathsNeedWalk)) => {
                    Err(Status::invalid_argument(e.to_string()))
                }
                Err(e) => Err(Status::internal(e.to_string())),
            };
            let _ = tx.blocking_send(last);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn exec(
        &self,
        request: Request<pb::ExecRequest>,
    ) -> Result<Response<pb::ExecResponse>, Status> {
        if !self.exec_enabled {
            return Err(Status::permission_denied(
                "exec is disabled: the agent was started with --no-exec",
            ));
        }
        let r = request.into_inner();
        let outcome = exec::run(ExecRequest {
            program: r.program,
            args: r.args,
            env: r.env,
            stdin: r.stdin,
            timeout: (r.timeout_ms > 0).then(|| Duration::from_millis(r.timeout_ms.into())),
        })
        .await
        .map_err(|e| match e {
            ExecError::NoProgram => Status::invalid_argument(e.to_string()),
            ExecError::Spawn { .. } => Status::failed_precondition(e.to_string()),
            ExecError::Wait { .. } => Status::internal(e.to_string()),
        })?;
        Ok(Response::new(pb::ExecResponse {
            exit_code: outcome.exit_code,
            signal: outcome.signal,
            stdout: outcome.stdout,
            stderr: outcome.stderr,
            timed_out: outcome.timed_out,
        }))
    }
}
