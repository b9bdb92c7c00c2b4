//! What the control endpoint needs from the VMM: the [`VmmHandle`] trait and the plain Rust
//! types it speaks (no protobuf types; the server and the client convert).

use std::fmt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

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
/// [`Failed`](Self::Failed) to `INTERNAL`.
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
}
