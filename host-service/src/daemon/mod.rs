//! `dittod`, the orchestration daemon: it serves `ditto.host.v1.Host` (proto/ditto/host/v1)
//! and runs each VM as one supervised `ditto-vmm` process.
//!
//! - [`record`]: the state directory — one folder per VM with its record (`vm.json`, written
//!   atomically), sockets, logs and exit file; the daemon's lock.
//! - [`validate`]: checks of every request field, errors naming the field.
//! - [`process`]: one detached `ditto-vmm` process held by a pidfd (works after a re-attach).
//! - [`registry`]: the VMs by id and name, creation and deletion, events.
//! - [`supervisor`]: start, pause, resume, graceful-then-forced stop, guest exec, the task that
//!   turns a VMM's end into STOPPED or FAILED, and re-attaching after a daemon restart.
//! - [`service`]: the gRPC service over the registry, logged and measured.
//! - [`listen`]: the Unix socket (0600), optional TCP with the TLS policy, reflection and health.
//! - [`metrics`]: Prometheus metrics on `--metrics ADDR`.
//! - [`checkpoints`]: checkpoints in the state directory (file, disk copies, record); taking
//!   one of a running VM, restoring one as a new VM, listing and deleting them.
//! - [`error`]: the daemon's error enum and the gRPC code of each variant.
//!
//! VMs outlive the daemon: a VMM runs in its own session, and a daemon that starts over the
//! same state directory re-attaches to every VMM still running (checked by pid and process
//! start time), so the daemon can be upgraded or restarted without stopping guests.

pub mod checkpoints;
pub mod error;
pub mod listen;
pub mod metrics;
pub mod process;
pub mod record;
pub mod registry;
pub mod service;
pub mod supervisor;
pub mod validate;

pub use error::Error;
pub use listen::{ListenError, ListenOptions, TlsFiles};
pub use record::{StateDir, StateDirError, VmPhase, VmRecord};
pub use registry::{Registry, RegistryOptions};
pub use service::HostService;

/// The state directory when none is given: `/var/lib/ditto` for root, else
/// `$XDG_STATE_HOME/ditto` (default `~/.local/state/ditto`).
pub fn default_state_dir() -> std::path::PathBuf {
    if rustix::process::geteuid().is_root() {
        return "/var/lib/ditto".into();
    }
    std::env::var_os("XDG_STATE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".local/state")))
        .unwrap_or_else(std::env::temp_dir)
        .join("ditto")
}
