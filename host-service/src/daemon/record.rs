//! What dittod remembers, in its state directory: one folder per VM (`vms/<id>/`) holding the
//! VM's record (`vm.json`, replaced atomically), its VMM's control and hybrid vsock sockets,
//! its console and VMM logs and the VMM's exit file; the API socket `dittod.sock`; and the
//! lock file `dittod.lock` that keeps a second daemon off the same directory.
//!
//! A record holds the VM's id, name, configuration and state and, while a VMM runs, its pid and
//! the process's start time (`/proc/PID/stat` field 22, clock ticks since boot), so that a
//! restarted daemon re-attaches only to the very process it started and never to an unrelated
//! one that reused the pid.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::vmm::config::VmConfig;

/// Longest path a Unix socket can have (`sun_path` holds 108 bytes with the final NUL).
const SUN_PATH_MAX: usize = 107;
/// Bytes a VM's socket path adds to the state directory: `/vms/<32 hex>/control.sock`.
const VM_SOCKET_SUFFIX: usize = "/vms/".len() + 32 + "/control.sock".len();

/// Why the state directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    /// Another daemon holds the directory's lock.
    #[error("another dittod is using the state directory {0}")]
    Locked(PathBuf),
    /// The path is too long for the Unix sockets inside it.
    #[error(
        "the state directory {0} is too long: Unix socket paths inside it would exceed \
         {SUN_PATH_MAX} bytes (use a shorter --state-dir)"
    )]
    TooLong(PathBuf),
    /// A file could not be created, read or locked.
    #[error("state directory {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// The life cycle of a VM as the daemon sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmPhase {
    /// Recorded; no VMM process.
    Created,
    /// The VMM process is starting.
    Starting,
    /// The vCPUs run.
    Running,
    /// The vCPUs are stopped.
    Paused,
    /// A stop is under way.
    Stopping,
    /// The VMM ended normally.
    Stopped,
    /// The VMM failed, crashed or was killed.
    Failed,
}

impl VmPhase {
    /// Every phase, in life-cycle order.
    pub const ALL: [Self; 7] = [
        Self::Created,
        Self::Starting,
        Self::Running,
        Self::Paused,
        Self::Stopping,
        Self::Stopped,
        Self::Failed,
    ];

    /// Whether a VMM process belongs to the VM in this phase.
    pub fn has_process(self) -> bool {
        matches!(
            self,
            Self::Starting | Self::Running | Self::Paused | Self::Stopping
        )
    }

    /// The lower-case name (`running`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
        }
    }
}

impl fmt::Display for VmPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One VM, as persisted in `vms/<id>/vm.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// 32 lowercase hex digits, chosen at creation.
    pub id: String,
    /// Unique on this host.
    pub name: String,
    /// The configuration, with the paths inside the VM's folder filled in.
    pub config: VmConfig,
    /// Where the VM is in its life cycle.
    pub state: VmPhase,
    /// The VMM's pid while one runs.
    pub pid: Option<u32>,
    /// The VMM process's start time (`/proc/PID/stat` field 22) while one runs.
    pub pid_start_ticks: Option<u64>,
    /// When the VMM process started, in milliseconds since the Unix epoch, while one runs.
    pub started_at_ms: Option<u64>,
    /// When the VM was created, in milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// Why the VM last failed or how it last ended.
    pub last_error: Option<String>,
    /// Set while the VM's next start continues a checkpoint instead of booting: the checkpoint
    /// file. Cleared once the restored VM runs.
    #[serde(default)]
    pub restore_from: Option<PathBuf>,
}

/// The files of one VM's folder.
#[derive(Clone, Debug)]
pub struct VmPaths {
    /// The folder.
    pub dir: PathBuf,
    /// The record.
    pub record: PathBuf,
    /// The VMM's control socket.
    pub control: PathBuf,
    /// The VMM's hybrid vsock socket.
    pub vsock: PathBuf,
    /// The guest's serial console.
    pub console: PathBuf,
    /// The VMM's standard output and error.
    pub log: PathBuf,
    /// Why the VMM last ended (written by `ditto-vmm --exit-file`).
    pub exit: PathBuf,
    /// The last failure: its reason and the guest's last console lines, kept until the next
    /// failure (a new start removes `exit.json`, not this).
    pub failure: PathBuf,
}

impl VmPaths {
    fn new(dir: PathBuf) -> Self {
        Self {
            record: dir.join("vm.json"),
            control: dir.join("control.sock"),
            vsock: dir.join("vsock.sock"),
            console: dir.join("console.log"),
            log: dir.join("vmm.log"),
            exit: dir.join("exit.json"),
            failure: dir.join("last-failure.log"),
            dir,
        }
    }
}

/// What [`StateDir::load`] found.
#[derive(Debug)]
pub struct Loaded {
    /// The readable records, by name.
    pub records: Vec<VmRecord>,
    /// Records that cannot be read: the file and why.
    pub unreadable: Vec<(PathBuf, String)>,
}

/// The daemon's state directory, locked for this daemon while the value lives.
#[derive(Debug)]
pub struct StateDir {
    root: PathBuf,
    _lock: File,
}

impl StateDir {
    /// Creates (mode 0700) and locks the state directory at `root`, which must be absolute.
    pub fn open(root: &Path) -> Result<Self, StateDirError> {
        let io_error = |path: &Path| {
            let path = path.to_owned();
            move |source| StateDirError::Io { path, source }
        };
        if root.as_os_str().len() + VM_SOCKET_SUFFIX > SUN_PATH_MAX {
            return Err(StateDirError::TooLong(root.to_owned()));
        }
        let vms = root.join("vms");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&vms)
            .map_err(io_error(&vms))?;
        let lock_path = root.join("dittod.lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_error(&lock_path))?;
        match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(StateDirError::Locked(root.to_owned()));
            }
            Err(e) => return Err(io_error(&lock_path)(e.into())),
        }
        Ok(Self {
            root: root.to_owned(),
            _lock: lock,
        })
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The API socket's default path.
    pub fn socket_path(&self) -> PathBuf {
        self.root.join("dittod.sock")
    }

    /// The files of the VM with this id.
    pub fn vm_paths(&self, id: &str) -> VmPaths {
        VmPaths::new(self.root.join("vms").join(id))
    }

    /// Every readable record. A folder whose record cannot be read is reported in
    /// [`Loaded::unreadable`] and left alone, so nothing is lost.
    pub fn load(&self) -> Result<Loaded, StateDirError> {
        let vms = self.root.join("vms");
        let entries = std::fs::read_dir(&vms).map_err(|source| StateDirError::Io {
            path: vms.clone(),
            source,
        })?;
        let (mut records, mut unreadable) = (Vec::new(), Vec::new());
        for entry in entries {
            let entry = entry.map_err(|source| StateDirError::Io {
                path: vms.clone(),
                source,
            })?;
            let paths = VmPaths::new(entry.path());
            let parsed = std::fs::read(&paths.record)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<VmRecord>(&b).map_err(|e| e.to_string()));
            match parsed {
                Ok(r) if entry.file_name().to_str() == Some(r.id.as_str()) => records.push(r),
                Ok(r) => unreadable.push((
                    paths.record,
                    format!("the record's id {} is not its folder's name", r.id),
                )),
                Err(e) => unreadable.push((paths.record, e)),
            }
        }
        records.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Loaded {
            records,
            unreadable,
        })
    }

    /// Writes a VM's record atomically, creating its folder (mode 0700) if needed.
    pub fn save(&self, record: &VmRecord) -> io::Result<()> {
        let paths = self.vm_paths(&record.id);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&paths.dir)?;
        let json = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
        crate::atomic_file::write(&paths.record, &json)
    }

    /// The folder of the checkpoint with this id (under `checkpoints/`).
    pub fn checkpoint_dir(&self, id: &str) -> PathBuf {
        self.checkpoints_root().join(id)
    }

    /// The folder holding every checkpoint's folder.
    pub fn checkpoints_root(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    /// Removes a VM's folder and everything in it.
    pub fn remove(&self, id: &str) -> io::Result<()> {
        match std::fs::remove_dir_all(self.vm_paths(id).dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::config::{Console, DEFAULT_CMDLINE};

    fn record(id: &str, name: &str) -> VmRecord {
        VmRecord {
            id: id.into(),
            name: name.into(),
            config: VmConfig {
                kernel: "/k".into(),
                initrd: None,
                cmdline: DEFAULT_CMDLINE.into(),
                virtio_mmio_cmdline: false,
                vcpus: 1,
                mem_mib: 256,
                drives: vec![],
                vsock: None,
                balloon: false,
                console: Console::Off,
            },
            state: VmPhase::Running,
            pid: Some(42),
            pid_start_ticks: Some(7),
            started_at_ms: Some(1),
            created_at_ms: 0,
            last_error: None,
            restore_from: None,
        }
    }

    #[test]
    fn records_round_trip_and_bad_ones_are_reported_not_lost() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = StateDir::open(tmp.path()).expect("open");
        let a = record(&"a".repeat(32), "alpha");
        let b = record(&"b".repeat(32), "beta");
        dir.save(&b).expect("save b");
        dir.save(&a).expect("save a");
        let bad = tmp.path().join("vms").join("c".repeat(32));
        std::fs::create_dir(&bad).expect("bad dir");
        std::fs::write(bad.join("vm.json"), b"{").expect("bad record");
        let Loaded {
            records,
            unreadable,
        } = dir.load().expect("load");
        assert_eq!(records, vec![a.clone(), b]);
        assert_eq!(unreadable.len(), 1);
        assert!(bad.join("vm.json").exists(), "an unreadable record is kept");
        dir.remove(&a.id).expect("remove");
        dir.remove(&a.id).expect("removing twice is fine");
        assert_eq!(dir.load().expect("load").records.len(), 1);
    }

    #[test]
    fn one_daemon_per_directory_and_short_paths_only() {
        let tmp = tempfile::tempdir().expect("tmp");
        let _first = StateDir::open(tmp.path()).expect("open");
        assert!(matches!(
            StateDir::open(tmp.path()),
            Err(StateDirError::Locked(_))
        ));
        let long = tmp.path().join("x".repeat(80));
        assert!(matches!(
            StateDir::open(&long),
            Err(StateDirError::TooLong(_))
        ));
    }
}
