//! The running VMM as the control endpoint sees it: [`VmmControl`] implements
//! [`crate::control::VmmHandle`] over a shared [`Vmm`].

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::omit::DEFAULT_SCAN_TIMEOUT;
use super::snapshot::{After, CheckpointOptions, SnapshotError};
use super::{EventSender, ExitReason, RunState, Vmm, VmmError as Error};
use crate::agent::AGENT_PORT;
use crate::checkpoint::WriteOptions;
use crate::control::{
    AfterCheckpoint, CheckpointResult, CheckpointSpec, DriveInfo, VmState, VmStatus, VmmError,
    VmmHandle, VsockInfo,
};
use crate::devices::virtio::vsock::unix;

/// How long a vsock connection through the control socket may take to be accepted.
const VSOCK_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A shared VMM with its event sender: what the control server drives.
#[derive(Debug)]
pub struct VmmControl {
    vmm: Arc<Mutex<Vmm>>,
    events: EventSender,
    shutting_down: AtomicBool,
}

impl VmmControl {
    /// A handle on `vmm`.
    pub fn new(vmm: Arc<Mutex<Vmm>>) -> Self {
        let events = lock(&vmm).event_sender();
        Self {
            vmm,
            events,
            shutting_down: AtomicBool::new(false),
        }
    }

    fn state(&self, vmm: &Vmm) -> VmState {
        match vmm.run_state() {
            _ if self.shutting_down.load(Ordering::SeqCst) => VmState::ShuttingDown,
            RunState::Running => VmState::Running,
            // Built but not started counts as paused: nothing runs.
            RunState::Created | RunState::Paused => VmState::Paused,
            RunState::Stopped => VmState::Stopped,
        }
    }

    fn change(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut Vmm) -> Result<Duration, Error>,
    ) -> Result<VmState, VmmError> {
        let mut vmm = lock(&self.vmm);
        match f(&mut vmm) {
            Ok(_) => Ok(self.state(&vmm)),
            Err(Error::WrongState(_)) => Err(VmmError::WrongState {
                op,
                state: self.state(&vmm),
            }),
            Err(e) => Err(VmmError::Failed(e.to_string())),
        }
    }
}

fn lock(vmm: &Mutex<Vmm>) -> MutexGuard<'_, Vmm> {
    vmm.lock().unwrap_or_else(PoisonError::into_inner)
}

impl VmmHandle for VmmControl {
    fn status(&self) -> VmStatus {
        let vmm = lock(&self.vmm);
        let config = vmm.config();
        VmStatus {
            state: self.state(&vmm),
            vcpus: u32::from(config.vcpus),
            mem_mib: vmm.mem_mib(),
            uptime: vmm.started().elapsed(),
            vsock: config.vsock.as_ref().map(|v| VsockInfo {
                guest_cid: u32::try_from(v.cid).unwrap_or(u32::MAX),
                uds_path: Some(v.uds.clone()),
            }),
            drives: config
                .drives
                .iter()
                .map(|d| DriveInfo {
                    id: d.id.clone(),
                    path: d.path.clone(),
                    read_only: d.read_only,
                })
                .collect(),
            pid: std::process::id(),
            restored: vmm.restored().cloned(),
        }
    }

    fn pause(&self) -> Result<VmState, VmmError> {
        self.change("pause", Vmm::pause)
    }

    fn resume(&self) -> Result<VmState, VmmError> {
        self.change("resume", Vmm::resume)
    }

    fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.events.send(ExitReason::Requested);
    }

    fn checkpoint(&self, spec: CheckpointSpec) -> Result<CheckpointResult, VmmError> {
        let mut vmm = lock(&self.vmm);
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(VmmError::WrongState {
                op: "checkpoint",
                state: VmState::ShuttingDown,
            });
        }
        let options = CheckpointOptions {
            path: spec.path.clone(),
            after: match spec.after {
                AfterCheckpoint::Resume => After::Resume,
                AfterCheckpoint::Stop => After::Stop,
            },
            write: WriteOptions {
                compression: if spec.uncompressed {
                    None
                } else {
                    WriteOptions::default().compression
                },
                ..WriteOptions::default()
            },
            mode: spec.mode,
            verification: spec.verification,
            scan_timeout: spec.scan_timeout.unwrap_or(DEFAULT_SCAN_TIMEOUT),
            drive_copies: spec.drive_copies.clone(),
            agent_port: spec.agent_port.unwrap_or(AGENT_PORT),
        };
        let report = vmm.checkpoint(&options).map_err(|e| match e {
            Error::WrongState(_) => VmmError::WrongState {
                op: "checkpoint",
                state: self.state(&vmm),
            },
            // The destination's folder is missing or not writable.
            Error::Snapshot(e @ SnapshotError::Destination(_)) => {
                VmmError::InvalidArgument(format!("path: {e}"))
            }
            Error::Snapshot(e @ (SnapshotError::CopyPlan(_) | SnapshotError::UnknownDrive(_))) => {
                VmmError::InvalidArgument(format!("drive_copies: {e}"))
            }
            e => VmmError::Failed(e.to_string()),
        })?;
        if spec.after == AfterCheckpoint::Stop {
            // The checkpoint continues this VM; it must not run again here.
            self.shutting_down.store(true, Ordering::SeqCst);
            self.events
                .send(ExitReason::Checkpointed(report.path.clone()));
        }
        let s = &report.stats;
        Ok(CheckpointResult {
            path: report.path.clone(),
            file_bytes: s.file_bytes,
            stored_bytes: s.stored_bytes,
            pages_saved: s.pages_saved,
            pages_zero: s.pages_zero,
            pages_free: s.pages_free,
            pages_disk: s.pages_disk,
            pause: report.pause,
            total: report.total,
            state: match spec.after {
                AfterCheckpoint::Stop => VmState::Stopped,
                AfterCheckpoint::Resume => self.state(&vmm),
            },
            omission: report.omission.clone(),
            drive_copy_bytes: report.drive_copy_bytes,
            drive_copy: report.drive_copy,
        })
    }

    fn connect_vsock(&self, port: u32) -> Result<UnixStream, VmmError> {
        let uds = {
            let vmm = lock(&self.vmm);
            let v = vmm.config().vsock.as_ref().ok_or(VmmError::NoVsock)?;
            v.uds.clone()
        };
        unix::connect(&uds, port, VSOCK_CONNECT_TIMEOUT).map_err(|e| VmmError::PortUnreachable {
            port,
            source: std::io::Error::other(e.to_string()),
        })
    }
}
