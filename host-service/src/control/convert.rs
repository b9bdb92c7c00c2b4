//! Conversions between the plain types of [`super::handle`] and the `ditto.vmm.v1` messages:
//! to the messages for the server, back (checked) for the client.

use std::path::PathBuf;
use std::time::Duration;

use ditto_proto::vmm::v1 as pb;

use super::handle::{DriveInfo, StateChange, VmState, VmStatus, VsockInfo};

/// A reply the client cannot read.
#[derive(Debug, thiserror::Error)]
pub enum InvalidReply {
    /// The state is not one of the known states.
    #[error("unknown VM state {0}")]
    State(i32),
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
        });
        assert_eq!(status.uptime_ms, u64::MAX);
        assert!(status.vsock.is_none());
    }
}
