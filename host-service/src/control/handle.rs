//! What the control endpoint needs from the VMM: the [`VmmHandle`] trait and the plain Rust
//! types it speaks (no protobuf types; the server and the client convert).

use std::fmt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

pub use crate::omission::{Mode, OmissionReport, Verification};

/// The life cycle of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VmState {
    /// The vCPUs run.
    Running,
    /// The vCPUs are stopped and the devices quiesced.
    Paused,
    /// A shutdown was requested and the VMM is ending.
    ShuttingDown,
    /// The guest has stopped; the VMM is about to exit.
    Stopped,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::ShuttingDown => "shutting down",
            Self::Stopped => "stopped",
        })
    }
}

/// The VM's virtio-vsock device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockInfo {
    /// The guest's context id.
    pub guest_cid: u32,
    /// The host Unix socket of the hybrid vsock, when one is configured.
    pub uds_path: Option<PathBuf>,
}

/// A virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriveInfo {
    /// The drive's id (also its virtio-blk serial).
    pub id: String,
    /// The host file behind the disk.
    pub path: PathBuf,
    /// True when the guest cannot write to the disk.
    pub read_only: bool,
}

/// What the VM is and how it is configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmStatus {
    /// The VM's state now.
    pub state: VmState,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// How long the VMM process has been running (travels in whole milliseconds).
    pub uptime: Duration,
    /// The vsock device, if the VM has one.
    pub vsock: Option<VsockInfo>,
    /// The disks, in the order the guest sees them.
    pub drives: Vec<DriveInfo>,
    /// The VMM's process id.
    pub pid: u32,
    /// How the VMM came back from a checkpoint, when it did.
    pub restored: Option<RestoreInfo>,
}

/// How a VMM came back from a checkpoint (durations travel in whole microseconds).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreInfo {
    /// The checkpoint file.
    pub checkpoint: PathBuf,
    /// Filling memory from the saved pages.
    pub memory: Duration,
    /// Filling disk-referenced pages from the drive images, hashes checked.
    pub disk: Duration,
    /// From opening the file to the vCPUs running again.
    pub total: Duration,
    /// Pages read from the file.
    pub pages_saved: u64,
    /// Pages that were zero.
    pub pages_zero: u64,
    /// Pages read from drives.
    pub pages_disk: u64,
}

/// What the VM does once its checkpoint is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AfterCheckpoint {
    /// Runs on if it was running, stays paused if it was paused.
    #[default]
    Resume,
    /// Never runs again: the VMM ends cleanly.
    Stop,
}

/// A checkpoint to take.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckpointSpec {
    /// The file to write (absolute, in an existing folder).
    pub path: PathBuf,
    /// What the VM does afterwards.
    pub after: AfterCheckpoint,
    /// Store saved pages raw instead of zstd-compressed.
    pub uncompressed: bool,
    /// Which pages to store.
    pub mode: Mode,
    /// How the agent's report is checked (ditto mode).
    pub verification: Verification,
    /// How long the agent's scan and the free-page round may take in all, a tenth of it (at
    /// most 2 s) kept for the free-page round (`None`: the VMM's default; travels in whole
    /// milliseconds).
    pub scan_timeout: Option<Duration>,
    /// Drives to copy while the VM is paused: (drive id, new file).
    pub drive_copies: Vec<(String, PathBuf)>,
    /// The guest vsock port of the agent (`None`: the agent's default).
    pub agent_port: Option<u32>,
}

/// A written checkpoint (durations travel in whole microseconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointResult {
    /// The file.
    pub path: PathBuf,
    /// Its length.
    pub file_bytes: u64,
    /// Bytes the saved pages take in it.
    pub stored_bytes: u64,
    /// Pages saved.
    pub pages_saved: u64,
    /// Pages found all zero.
    pub pages_zero: u64,
    /// Pages known free, stored as zero.
    pub pages_free: u64,
    /// Pages stored as drive references.
    pub pages_disk: u64,
    /// How long the guest did not run because of the checkpoint.
    pub pause: Duration,
    /// The whole operation.
    pub total: Duration,
    /// The VM's state afterwards.
    pub state: VmState,
    /// What a ditto or free-only checkpoint omitted and refused.
    pub omission: Option<OmissionReport>,
    /// Bytes the drive copies take (allocated).
    pub drive_copy_bytes: u64,
    /// How long the drive copies took (travels in whole microseconds).
    pub drive_copy: Duration,
}

/// The outcome of a pause or a resume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateChange {
    /// The VM's state after the operation.
    pub state: VmState,
    /// How long the operation took inside the VMM (travels in whole microseconds).
    pub elapsed: Duration,
}

/// Why the VMM refused or failed a control request. The server maps each variant to a gRPC
/// status code: [`WrongState`](Self::WrongState) and [`NoVsock`](Self::NoVsock) to
/// `FAILED_PRECONDITION`, [`PortUnreachable`](Self::PortUnreachable) to `UNAVAILABLE`,
/// [`InvalidArgument`](Self::InvalidArgument) to `INVALID_ARGUMENT`, [`Failed`](Self::Failed) to
/// `INTERNAL`.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The operation does not apply to the VM's current state (pausing a paused VM, ...).
    #[error("cannot {op} a VM that is {state}")]
    WrongState {
        /// The refused operation ("pause", "resume").
        op: &'static str,
        /// The state the VM is in.
        state: VmState,
    },
    /// The VM has no vsock device.
    #[error("the VM has no vsock device")]
    NoVsock,
    /// Nothing in the guest accepted a connection on the port (refused, reset, timed out).
    #[error("guest vsock port {port} is unreachable: {source}")]
    PortUnreachable {
        /// The guest port.
        port: u32,
        /// Why.
        source: std::io::Error,
    },
    /// A request field is unusable (a checkpoint destination that cannot be written, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// The VMM failed on its side.
    #[error("{0}")]
    Failed(String),
}

/// The VMM as the control endpoint sees it; the VMM implements it.
///
/// The server calls every method on a thread of tokio's blocking pool, so a method may block
/// (pausing waits for the vCPUs to leave `KVM_RUN`), and calls can run concurrently: the
/// implementation serialises what must not overlap.
pub trait VmmHandle: Send + Sync + 'static {
    /// What the VM is now.
    fn status(&self) -> VmStatus;
    /// Stops the vCPUs and quiesces the devices; returns the new state.
    /// [`VmmError::WrongState`] unless the VM is running.
    fn pause(&self) -> Result<VmState, VmmError>;
    /// Lets a paused VM run again; returns the new state.
    /// [`VmmError::WrongState`] unless the VM is paused.
    fn resume(&self) -> Result<VmState, VmmError>;
    /// Asks the VMM to end: stop the vCPUs and exit. Returns once the request is taken, not
    /// when the VMM has ended; the VMM then fires the shutdown future given to
    /// [`serve`](super::serve) so the control socket goes away.
    fn shutdown(&self);
    /// A connection to `port` of the guest's vsock, as one end of a Unix stream socket (a hybrid
    /// vsock connection after its `CONNECT`/`OK` exchange, or a socket pair the device pumps).
    /// The returned stream may be blocking or not; the server makes it non-blocking.
    fn connect_vsock(&self, port: u32) -> Result<UnixStream, VmmError>;
    /// Writes a checkpoint of the VM to `spec.path`, then lets the VM run on or ends it.
    /// [`VmmError::WrongState`] when the VM is shutting down or stopped,
    /// [`VmmError::InvalidArgument`] for a destination that cannot be written.
    fn checkpoint(&self, spec: CheckpointSpec) -> Result<CheckpointResult, VmmError>;
}
