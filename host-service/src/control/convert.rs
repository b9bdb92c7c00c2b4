//! Conversions between the plain types of [`super::handle`] and the `ditto.vmm.v1` messages:
//! to the messages for the server, back (checked) for the client.

use std::path::PathBuf;
use std::time::Duration;

use ditto_proto::vmm::v1 as pb;

use super::handle::{
    AfterCheckpoint, CheckpointResult, CheckpointSpec, DriveInfo, Mode, OmissionReport,
    RestoreInfo, StateChange, Verification, VmState, VmStatus, VsockInfo,
};

/// A reply the client cannot read.
#[derive(Debug, thiserror::Error)]
pub enum InvalidReply {
    /// The state is not one of the known states.
    #[error("unknown VM state {0}")]
    State(i32),
}

/// A checkpoint request the server cannot take.
#[derive(Debug, thiserror::Error)]
pub enum InvalidRequest {
    /// The mode is unset or unknown.
    #[error("mode: unknown checkpoint mode {0} (FULL, DITTO or FREE_ONLY)")]
    Mode(i32),
    /// What to do afterwards is unknown.
    #[error("after: unknown value {0}")]
    After(i32),
    /// The destination is not an absolute path.
    #[error("path: the checkpoint destination must be an absolute path, not {0:?}")]
    Path(String),
    /// The verification policy is unknown or its sample share out of range.
    #[error("verification: {0}")]
    Verification(String),
    /// A drive copy has no drive id or no absolute path.
    #[error("drive_copies: {0}")]
    DriveCopy(String),
}

/// The checked plain form of a checkpoint request.
pub fn checkpoint_spec_from_pb(r: pb::CheckpointRequest) -> Result<CheckpointSpec, InvalidRequest> {
    let mode = match pb::CheckpointMode::try_from(r.mode) {
        Ok(pb::CheckpointMode::Full) => Mode::Full,
        Ok(pb::CheckpointMode::Ditto) => Mode::Ditto,
        Ok(pb::CheckpointMode::FreeOnly) => Mode::FreeOnly,
        Ok(pb::CheckpointMode::Unspecified) | Err(_) => return Err(InvalidRequest::Mode(r.mode)),
    };
    let after = match pb::AfterCheckpoint::try_from(r.after) {
        Ok(pb::AfterCheckpoint::Resume) => AfterCheckpoint::Resume,
        Ok(pb::AfterCheckpoint::Stop) => AfterCheckpoint::Stop,
        Err(_) => return Err(InvalidRequest::After(r.after)),
    };
    let verification = match pb::Verification::try_from(r.verification) {
        Ok(pb::Verification::DirtyLog) => Verification::DirtyLog,
        Ok(pb::Verification::Full) => Verification::Full,
        Ok(pb::Verification::Sample) => match u8::try_from(r.sample_percent) {
            Ok(p @ 1..=100) => Verification::Sample(p),
            _ => {
                return Err(InvalidRequest::Verification(format!(
                    "a sample of {} % (1 to 100)",
                    r.sample_percent
                )));
            }
        },
        Err(_) => {
            return Err(InvalidRequest::Verification(format!(
                "unknown policy {}",
                r.verification
            )));
        }
    };
    let path = PathBuf::from(&r.path);
    if !path.is_absolute() {
        return Err(InvalidRequest::Path(r.path));
    }
    let drive_copies = r
        .drive_copies
        .into_iter()
        .map(|c| {
            let path = PathBuf::from(&c.path);
            if c.drive_id.is_empty() || !path.is_absolute() {
                return Err(InvalidRequest::DriveCopy(format!(
                    "drive {:?} to {:?}: a drive id and an absolute path are needed",
                    c.drive_id, c.path
                )));
            }
            Ok((c.drive_id, path))
        })
        .collect::<Result<_, _>>()?;
    Ok(CheckpointSpec {
        path,
        after,
        uncompressed: r.uncompressed,
        mode,
        verification,
        scan_timeout: (r.scan_timeout_ms > 0)
            .then(|| Duration::from_millis(r.scan_timeout_ms.into())),
        drive_copies,
        agent_port: (r.agent_port > 0).then_some(r.agent_port),
    })
}

impl From<CheckpointSpec> for pb::CheckpointRequest {
    fn from(s: CheckpointSpec) -> Self {
        let after = match s.after {
            AfterCheckpoint::Resume => pb::AfterCheckpoint::Resume,
            AfterCheckpoint::Stop => pb::AfterCheckpoint::Stop,
        };
        let mode = match s.mode {
            Mode::Full => pb::CheckpointMode::Full,
            Mode::Ditto => pb::CheckpointMode::Ditto,
            Mode::FreeOnly => pb::CheckpointMode::FreeOnly,
        };
        let (verification, sample_percent) = match s.verification {
            Verification::DirtyLog => (pb::Verification::DirtyLog, 0),
            Verification::Full => (pb::Verification::Full, 0),
            Verification::Sample(p) => (pb::Verification::Sample, u32::from(p)),
        };
        Self {
            path: s.path.to_string_lossy().into_owned(),
            mode: mode.into(),
            after: after.into(),
            uncompressed: s.uncompressed,
            verification: verification.into(),
            sample_percent,
            scan_timeout_ms: s.scan_timeout.map_or(0, |t| {
                u32::try_from(t.as_millis()).unwrap_or(u32::MAX).max(1)
            }),
            drive_copies: s
                .drive_copies
                .into_iter()
                .map(|(drive_id, path)| pb::DriveCopy {
                    drive_id,
                    path: path.to_string_lossy().into_owned(),
                })
                .collect(),
            agent_port: s.agent_port.unwrap_or(0),
        }
    }
}

impl From<OmissionReport> for pb::OmissionReport {
    fn from(r: OmissionReport) -> Self {
        Self {
            pages_reported_cache: r.pages_reported_cache,
            pages_hinted_free: r.pages_hinted_free,
            pages_omitted_cache: r.pages_omitted_cache,
            pages_omitted_free: r.pages_omitted_free,
            rejected_guest_write: r.rejected_guest_write,
            rejected_vmm_write: r.rejected_vmm_write,
            rejected_disk_write: r.rejected_disk_write,
            rejected_validation: r.rejected_validation,
            rejected_verification: r.rejected_verification,
            pages_verified: r.pages_verified,
            pages_mismatched: r.pages_mismatched,
            scan_us: r.scan_us,
            hint_us: r.hint_us,
            degraded: r.degraded,
            guest_frames: r.guest_frames.into_iter().collect(),
            scan_method: r.scan_method,
        }
    }
}

impl From<pb::OmissionReport> for OmissionReport {
    fn from(r: pb::OmissionReport) -> Self {
        Self {
            pages_reported_cache: r.pages_reported_cache,
            pages_hinted_free: r.pages_hinted_free,
            pages_omitted_cache: r.pages_omitted_cache,
            pages_omitted_free: r.pages_omitted_free,
            rejected_guest_write: r.rejected_guest_write,
            rejected_vmm_write: r.rejected_vmm_write,
            rejected_disk_write: r.rejected_disk_write,
            rejected_validation: r.rejected_validation,
            rejected_verification: r.rejected_verification,
            pages_verified: r.pages_verified,
            pages_mismatched: r.pages_mismatched,
            scan_us: r.scan_us,
            hint_us: r.hint_us,
            degraded: r.degraded,
            guest_frames: r.guest_frames.into_iter().collect(),
            scan_method: r.scan_method,
        }
    }
}

impl From<CheckpointResult> for pb::CheckpointResponse {
    fn from(r: CheckpointResult) -> Self {
        Self {
            path: r.path.to_string_lossy().into_owned(),
            file_bytes: r.file_bytes,
            stored_bytes: r.stored_bytes,
            pages_saved: r.pages_saved,
            pages_zero: r.pages_zero,
            pages_free: r.pages_free,
            pages_disk: r.pages_disk,
            pause_us: saturating_u64(r.pause.as_micros()),
            total_us: saturating_u64(r.total.as_micros()),
            state: pb::VmState::from(r.state).into(),
            omission: r.omission.map(Into::into),
            drive_copy_bytes: r.drive_copy_bytes,
            drive_copy_us: saturating_u64(r.drive_copy.as_micros()),
        }
    }
}

impl TryFrom<pb::CheckpointResponse> for CheckpointResult {
    type Error = InvalidReply;
    fn try_from(r: pb::CheckpointResponse) -> Result<Self, InvalidReply> {
        Ok(Self {
            path: r.path.into(),
            file_bytes: r.file_bytes,
            stored_bytes: r.stored_bytes,
            pages_saved: r.pages_saved,
            pages_zero: r.pages_zero,
            pages_free: r.pages_free,
            pages_disk: r.pages_disk,
            pause: Duration::from_micros(r.pause_us),
            total: Duration::from_micros(r.total_us),
            state: state_from_pb(r.state)?,
            omission: r.omission.map(Into::into),
            drive_copy_bytes: r.drive_copy_bytes,
            drive_copy: Duration::from_micros(r.drive_copy_us),
        })
    }
}

impl From<RestoreInfo> for pb::RestoreInfo {
    fn from(r: RestoreInfo) -> Self {
        Self {
            checkpoint: r.checkpoint.to_string_lossy().into_owned(),
            memory_us: saturating_u64(r.memory.as_micros()),
            disk_us: saturating_u64(r.disk.as_micros()),
            total_us: saturating_u64(r.total.as_micros()),
            pages_saved: r.pages_saved,
            pages_zero: r.pages_zero,
            pages_disk: r.pages_disk,
        }
    }
}

impl From<pb::RestoreInfo> for RestoreInfo {
    fn from(r: pb::RestoreInfo) -> Self {
        Self {
            checkpoint: r.checkpoint.into(),
            memory: Duration::from_micros(r.memory_us),
            disk: Duration::from_micros(r.disk_us),
            total: Duration::from_micros(r.total_us),
            pages_saved: r.pages_saved,
            pages_zero: r.pages_zero,
            pages_disk: r.pages_disk,
        }
    }
}

impl From<VmState> for pb::VmState {
    fn from(state: VmState) -> Self {
        match state {
            VmState::Running => Self::Running,
            VmState::Paused => Self::Paused,
            VmState::ShuttingDown => Self::ShuttingDown,
            VmState::Stopped => Self::Stopped,
        }
    }
}

fn state_from_pb(state: i32) -> Result<VmState, InvalidReply> {
    match pb::VmState::try_from(state) {
        Ok(pb::VmState::Running) => Ok(VmState::Running),
        Ok(pb::VmState::Paused) => Ok(VmState::Paused),
        Ok(pb::VmState::ShuttingDown) => Ok(VmState::ShuttingDown),
        Ok(pb::VmState::Stopped) => Ok(VmState::Stopped),
        Ok(pb::VmState::Unspecified) | Err(_) => Err(InvalidReply::State(state)),
    }
}

fn saturating_u64(value: u128) -> u64 {
    u64::try_from(value).unwrap_or(u64::MAX)
}

impl From<VmStatus> for pb::StatusResponse {
    fn from(s: VmStatus) -> Self {
        Self {
            state: pb::VmState::from(s.state).into(),
            vcpus: s.vcpus,
            mem_mib: s.mem_mib,
            uptime_ms: saturating_u64(s.uptime.as_millis()),
            vsock: s.vsock.map(|v| pb::VsockDevice {
                guest_cid: v.guest_cid,
                uds_path: v.uds_path.map(|p| p.to_string_lossy().into_owned()),
            }),
            drives: s
                .drives
                .into_iter()
                .map(|d| pb::Drive {
                    id: d.id,
                    path: d.path.to_string_lossy().into_owned(),
                    read_only: d.read_only,
                })
                .collect(),
            pid: s.pid,
            restored: s.restored.map(Into::into),
        }
    }
}

impl TryFrom<pb::StatusResponse> for VmStatus {
    type Error = InvalidReply;
    fn try_from(s: pb::StatusResponse) -> Result<Self, InvalidReply> {
        Ok(Self {
            state: state_from_pb(s.state)?,
            vcpus: s.vcpus,
            mem_mib: s.mem_mib,
            uptime: Duration::from_millis(s.uptime_ms),
            vsock: s.vsock.map(|v| VsockInfo {
                guest_cid: v.guest_cid,
                uds_path: v.uds_path.map(PathBuf::from),
            }),
            drives: s
                .drives
                .into_iter()
                .map(|d| DriveInfo {
                    id: d.id,
                    path: d.path.into(),
                    read_only: d.read_only,
                })
                .collect(),
            pid: s.pid,
            restored: s.restored.map(Into::into),
        })
    }
}

impl From<StateChange> for pb::StateChange {
    fn from(c: StateChange) -> Self {
        Self {
            state: pb::VmState::from(c.state).into(),
            elapsed_us: saturating_u64(c.elapsed.as_micros()),
        }
    }
}

impl TryFrom<pb::StateChange> for StateChange {
    type Error = InvalidReply;
    fn try_from(c: pb::StateChange) -> Result<Self, InvalidReply> {
        Ok(Self {
            state: state_from_pb(c.state)?,
            elapsed: Duration::from_micros(c.elapsed_us),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_survives_the_trip() {
        for state in [
            VmState::Running,
            VmState::Paused,
            VmState::ShuttingDown,
            VmState::Stopped,
        ] {
            let wire: i32 = pb::VmState::from(state).into();
            assert_eq!(state_from_pb(wire).unwrap(), state);
        }
    }

    #[test]
    fn unspecified_and_unknown_states_are_refused() {
        for wire in [0, 5, -1] {
            assert!(matches!(state_from_pb(wire), Err(InvalidReply::State(w)) if w == wire));
        }
    }

    #[test]
    fn checkpoint_requests_are_checked() {
        let spec = CheckpointSpec {
            path: "/var/lib/ditto/c1.ckpt".into(),
            after: AfterCheckpoint::Stop,
            uncompressed: true,
            mode: Mode::Ditto,
            verification: Verification::Sample(5),
            scan_timeout: Some(Duration::from_millis(1500)),
            drive_copies: vec![("root".into(), "/var/lib/ditto/root.img".into())],
            agent_port: Some(4000),
        };
        let wire = pb::CheckpointRequest::from(spec.clone());
        assert_eq!(checkpoint_spec_from_pb(wire.clone()).unwrap(), spec);
        for mode in [Mode::Full, Mode::FreeOnly] {
            for verification in [Verification::DirtyLog, Verification::Full] {
                let spec = CheckpointSpec {
                    mode,
                    verification,
                    scan_timeout: None,
                    drive_copies: vec![],
                    agent_port: None,
                    ..spec.clone()
                };
                let wire = pb::CheckpointRequest::from(spec.clone());
                assert_eq!(checkpoint_spec_from_pb(wire).unwrap(), spec);
            }
        }
        for (verification, sample_percent) in [(1, 0), (1, 101), (9, 0)] {
            let bad = pb::CheckpointRequest {
                verification,
                sample_percent,
                ..wire.clone()
            };
            assert!(matches!(
                checkpoint_spec_from_pb(bad),
                Err(InvalidRequest::Verification(_))
            ));
        }
        for (drive_id, path) in [("", "/a"), ("root", "a")] {
            let bad = pb::CheckpointRequest {
                drive_copies: vec![pb::DriveCopy {
                    drive_id: drive_id.into(),
                    path: path.into(),
                }],
                ..wire.clone()
            };
            assert!(matches!(
                checkpoint_spec_from_pb(bad),
                Err(InvalidRequest::DriveCopy(_))
            ));
        }
        let relative = pb::CheckpointRequest {
            path: "c1.ckpt".into(),
            ..wire.clone()
        };
        assert!(matches!(
            checkpoint_spec_from_pb(relative),
            Err(InvalidRequest::Path(p)) if p == "c1.ckpt"
        ));
        for mode in [0, 9] {
            let bad = pb::CheckpointRequest {
                mode,
                ..wire.clone()
            };
            assert!(
                matches!(checkpoint_spec_from_pb(bad), Err(InvalidRequest::Mode(m)) if m == mode)
            );
        }
        let bad = pb::CheckpointRequest { after: 7, ..wire };
        assert!(matches!(
            checkpoint_spec_from_pb(bad),
            Err(InvalidRequest::After(7))
        ));
    }

    #[test]
    fn durations_travel_truncated_and_saturate() {
        let change = pb::StateChange::from(StateChange {
            state: VmState::Paused,
            elapsed: Duration::from_nanos(1_999),
        });
        assert_eq!(change.elapsed_us, 1);
        let status = pb::StatusResponse::from(VmStatus {
            state: VmState::Running,
            vcpus: 1,
            mem_mib: 1,
            uptime: Duration::MAX,
            vsock: None,
            drives: Vec::new(),
            pid: 1,
            restored: None,
        });
        assert_eq!(status.uptime_ms, u64::MAX);
        assert!(status.vsock.is_none());
    }
}
