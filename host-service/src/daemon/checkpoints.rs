//! Checkpoints kept by dittod. Each has a folder (`checkpoints/<id>/` of the state directory,
//! or `<destination>/<id>/` when the caller names a destination) holding
//!
//! - `checkpoint.ditto`: the checkpoint file the VMM wrote (state and memory);
//! - `drive-<n>.img`: a sparse copy of each writable disk, taken while the VM was paused for
//!   the checkpoint, so the disks match the memory (read-only disks are referenced where they
//!   are);
//!
//! and a record, `checkpoints/<id>/checkpoint.json` in the state directory, written last and
//! atomically. A folder there without one is an unfinished checkpoint (the daemon stopped in
//! the middle): it is not listed, and it is removed when found.
//!
//! A restore makes a new VM whose writable disks are fresh copies of the checkpoint's (or
//! images the caller names), so one checkpoint gives any number of independent clones and
//! stays valid while they run.

use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::error::Error;
use super::record::{VmPhase, VmRecord};
use super::registry::{Registry, Vm, now_ms};
use crate::checkpoint::CheckpointReader;
use crate::control::{AfterCheckpoint, CheckpointSpec, VmState, VmmClient};
use crate::disk_copy;
use crate::omission::{Mode, OmissionReport, Verification};
use crate::vmm::config::{Console, VsockConfig};

/// The checkpoint file in a checkpoint's folder.
const FILE: &str = "checkpoint.ditto";
/// The record in a checkpoint's folder.
const RECORD: &str = "checkpoint.json";
/// How long a VM stopped by its checkpoint may take to end.
const STOP_WAIT: Duration = Duration::from_secs(30);

/// One checkpoint, as persisted in `checkpoints/<id>/checkpoint.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// 32 lowercase hex digits.
    pub id: String,
    /// The VM it was taken of.
    pub vm_id: String,
    /// That VM's name then.
    pub vm_name: String,
    /// When it was taken, in milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// The VM's record then (configuration included).
    pub vm: VmRecord,
    /// The folder holding the checkpoint file and the disk copies.
    pub dir: PathBuf,
    /// For each drive of the configuration: the copy in this folder, or `None` for a
    /// read-only drive used where it is.
    pub drive_copies: Vec<Option<PathBuf>>,
    /// Length of the checkpoint file.
    pub file_bytes: u64,
    /// Bytes the saved pages take in it.
    pub stored_bytes: u64,
    /// Bytes the disk copies occupy.
    pub disk_copy_bytes: u64,
    /// Pages saved.
    pub pages_saved: u64,
    /// Pages found zero.
    pub pages_zero: u64,
    /// Pages known free.
    pub pages_free: u64,
    /// Pages stored as disk references.
    pub pages_disk: u64,
    /// Which pages it stores (records from before modes existed are full).
    #[serde(default)]
    pub mode: Mode,
    /// What a ditto or free-only checkpoint omitted and why it saved the rest.
    #[serde(default)]
    pub omission: Option<OmissionReport>,
}

/// How to take a checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckpointAsk {
    /// An existing folder for the checkpoint's folder (default: the state directory).
    pub destination: Option<PathBuf>,
    /// End the VM with the checkpoint.
    pub stop: bool,
    /// Store saved pages raw.
    pub uncompressed: bool,
    /// Which pages to store.
    pub mode: Mode,
    /// How the agent's report is checked.
    pub verification: Verification,
    /// The VMM's time limit for the scan and the free-page round (`None`: its default).
    pub scan_timeout: Option<Duration>,
}

impl CheckpointRecord {
    /// The checkpoint file.
    pub fn file(&self) -> PathBuf {
        self.dir.join(FILE)
    }
}

/// What a checkpoint cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointTiming {
    /// How long the guest did not run because of it.
    pub pause: Duration,
    /// The whole operation.
    pub total: Duration,
}

/// What a restore cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestoreTiming {
    /// Filling guest memory (as the VMM measured it).
    pub memory: Duration,
    /// Copying the disks for the new VM.
    pub disk_copy: Duration,
    /// From the request to the guest running.
    pub total: Duration,
}

/// What a restore should change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreRequest {
    /// The checkpoint's id.
    pub checkpoint: String,
    /// The new VM's name (default: the checkpointed VM's).
    pub name: Option<String>,
    /// The new VM's vsock cid (default: a free one).
    pub vsock_cid: Option<u64>,
    /// Images to use instead of copies, by drive id.
    pub drives: Vec<(String, PathBuf)>,
}

fn is_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Registry {
    /// The folder of checkpoint `id`, which must look like an id.
    fn checkpoint_dir_of(&self, id: &str) -> Result<PathBuf, Error> {
        if !is_id(id) {
            return Err(Error::invalid(
                "checkpoint",
                format!("{id:?} is not a checkpoint id (32 lowercase hex digits)"),
            ));
        }
        Ok(self.state_dir().checkpoint_dir(id))
    }

    /// The record of checkpoint `id`.
    pub fn checkpoint_record(&self, id: &str) -> Result<CheckpointRecord, Error> {
        let dir = self.checkpoint_dir_of(id)?;
        let bytes = match std::fs::read(dir.join(RECORD)) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::CheckpointNotFound(id.to_owned()));
            }
            Err(e) => return Err(Error::io(format!("cannot read checkpoint {id}"))(e)),
        };
        serde_json::from_slice(&bytes).map_err(|e| {
            Error::io(format!("cannot read checkpoint {id}"))(std::io::Error::other(e))
        })
    }

    /// Every checkpoint, oldest first. Unfinished folders (no record) are removed; records
    /// that cannot be read are logged and left alone.
    pub fn list_checkpoints(&self) -> Result<Vec<CheckpointRecord>, Error> {
        let root = self.state_dir().checkpoints_root();
        let entries = match std::fs::read_dir(&root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("cannot list {}", root.display()))(e)),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let Some(id) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if !is_id(&id) {
                continue;
            }
            match self.checkpoint_record(&id) {
                Ok(r) => out.push(r),
                Err(Error::CheckpointNotFound(_)) => {
                    tracing::warn!(checkpoint = %id, "removing an unfinished checkpoint");
                    let _ = std::fs::remove_dir_all(entry.path());
                }
                Err(e) => tracing::warn!(checkpoint = %id, error = %e, "unreadable checkpoint"),
            }
        }
        out.sort_by_key(|r| (r.created_at_ms, r.id.clone()));
        Ok(out)
    }

    /// Removes checkpoint `id` and its disk copies.
    pub async fn delete_checkpoint(&self, id: &str) -> Result<(), Error> {
        let _membership = self.membership.lock().await;
        let record = self.checkpoint_record(id)?;
        let dir = self.checkpoint_dir_of(id)?;
        // The record goes first: a half-removed folder is an unfinished checkpoint.
        std::fs::remove_file(dir.join(RECORD))
            .and_then(|()| match std::fs::remove_dir_all(&record.dir) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            })
            .and_then(|()| match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            })
            .map_err(Error::io(format!("cannot remove checkpoint {id}")))
    }

    /// Takes a checkpoint of a running or paused VM (see the module documentation) as `ask`
    /// says: into its destination (an existing folder; default: the state directory), in its
    /// mode; with `stop` the VM ends with it. The VMM pauses the VM and copies the writable
    /// disks while it is paused.
    pub async fn checkpoint(
        self: &Arc<Self>,
        vm: &Arc<Vm>,
        ask: &CheckpointAsk,
    ) -> Result<(CheckpointRecord, CheckpointTiming), Error> {
        let stop = ask.stop;
        if let Some(d) = ask.destination.as_deref()
            && (!d.is_absolute() || !d.is_dir())
        {
            return Err(Error::invalid(
                "destination",
                format!("{} is not an absolute path to a folder", d.display()),
            ));
        }
        let started = Instant::now();
        let _op = vm.op.lock().await;
        let record = vm.record();
        if !matches!(record.state, VmPhase::Running | VmPhase::Paused) {
            return Err(Error::WrongState {
                vm: record.name.clone(),
                op: "checkpoint",
                state: record.state,
                hint: "; only a running or paused VM can be checkpointed",
            });
        }
        let name = record.name.clone();
        let vmm_failed = |what: &'static str| {
            let name = name.clone();
            move |e: crate::control::ClientError| match e.code() {
                Some(tonic::Code::FailedPrecondition) => {
                    Error::Precondition(format!("cannot {what} VM {name:?}: {e}"))
                }
                _ => Error::Vmm(format!("cannot {what} VM {name:?}: {e}")),
            }
        };
        let client = VmmClient::connect(&vm.paths.control)
            .await
            .map_err(vmm_failed("reach the VMM of"))?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let record_dir = self.state_dir().checkpoint_dir(&id);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&record_dir)
            .map_err(Error::io(format!("cannot create {}", record_dir.display())))?;
        let dir = match ask.destination.as_deref() {
            None => record_dir.clone(),
            Some(d) => {
                let dir = d.join(&id);
                if let Err(e) = std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                    let _ = std::fs::remove_dir_all(&record_dir);
                    return Err(Error::invalid(
                        "destination",
                        format!("cannot create {}: {e}", dir.display()),
                    ));
                }
                dir
            }
        };
        let remove = || {
            let _ = std::fs::remove_dir_all(&dir);
            let _ = std::fs::remove_dir_all(&record_dir);
        };

        let taken = write_checkpoint(Job {
            client: &client,
            record: &record,
            dir: &dir,
            record_dir: &record_dir,
            id: &id,
            ask,
        })
        .await;
        let (checkpoint, pause) = match taken {
            Ok(c) => c,
            Err(e) => {
                remove();
                return Err(e);
            }
        };
        if stop && let Some(mut running) = vm.running().map(|r| r.ended) {
            super::supervisor::ended_within(&mut running, STOP_WAIT).await;
        }
        tracing::info!(vm = %vm.id, checkpoint = %id, stored = checkpoint.stored_bytes,
            pause_ms = pause.as_millis() as u64, "checkpoint taken");
        Ok((
            checkpoint,
            CheckpointTiming {
                pause,
                total: started.elapsed(),
            },
        ))
    }

    /// Makes a new VM from a checkpoint and starts it (see the module documentation).
    pub async fn restore(
        self: &Arc<Self>,
        request: RestoreRequest,
    ) -> Result<(Arc<Vm>, RestoreTiming), Error> {
        let started = Instant::now();
        let checkpoint = self.checkpoint_record(&request.checkpoint)?;
        // The file's structure and metadata checksums (the VMM checks every chunk as it
        // restores).
        let file = checkpoint.file();
        let opened = tokio::task::spawn_blocking(move || CheckpointReader::open(&file).map(drop))
            .await
            .map_err(|e| Error::Vmm(format!("checking the checkpoint failed: {e}")))?;
        if let Err(e) = opened {
            return Err(Error::Precondition(format!(
                "checkpoint {} cannot be restored: {e}",
                checkpoint.id
            )));
        }
        let name = request
            .name
            .clone()
            .unwrap_or_else(|| checkpoint.vm_name.clone());
        let config = &checkpoint.vm.config;
        for (i, (id, path)) in request.drives.iter().enumerate() {
            if !config.drives.iter().any(|d| d.id == *id) {
                return Err(Error::invalid(
                    format!("drives[{i}].id"),
                    format!("the checkpointed VM has no drive {id:?}"),
                ));
            }
            if !path.is_absolute() || !path.is_file() {
                return Err(Error::invalid(
                    format!("drives[{i}].path"),
                    format!(
                        "{} is not an absolute path to a regular file",
                        path.display()
                    ),
                ));
            }
        }

        let (record, disk_copy) = {
            let _membership = self.membership.lock().await;
            // Each drive: an image the caller named, else a fresh copy of the checkpoint's
            // (`None` below: made once admitted), else (read-only) the image it had.
            let given = |id: &str| request.drives.iter().find(|(d, _)| d == id).map(|(_, p)| p);
            let mut drives = config.drives.clone();
            let mut to_copy = Vec::new();
            for ((i, drive), copy) in drives.iter_mut().enumerate().zip(&checkpoint.drive_copies) {
                match (given(&drive.id), copy) {
                    (Some(path), _) => drive.path = path.clone(),
                    (None, Some(copy)) => to_copy.push((i, copy)),
                    (None, None) => {}
                }
            }
            // Admission sees the drives the new VM shares with others: not its own copies.
            let shared: Vec<_> = drives
                .iter()
                .enumerate()
                .filter(|(i, _)| !to_copy.iter().any(|(c, _)| c == i))
                .map(|(_, d)| d.clone())
                .collect();
            let cid = self.admit(&name, request.vsock_cid, &shared)?;
            let id = uuid::Uuid::new_v4().simple().to_string();
            let paths = self.state_dir().vm_paths(&id);
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&paths.dir)
                .map_err(Error::io(format!("cannot create {}", paths.dir.display())))?;
            let t = Instant::now();
            for (i, copy) in to_copy {
                let to = paths.dir.join(format!("drive-{i}.img"));
                if let Err(e) = copy_disk(copy, &to).await {
                    let _ = std::fs::remove_dir_all(&paths.dir);
                    return Err(e);
                }
                drives[i].path = to;
            }
            let disk_copy = t.elapsed();
            let mut vm_config = config.clone();
            vm_config.drives = drives;
            vm_config.vsock = Some(VsockConfig {
                cid,
                uds: paths.vsock.clone(),
                host_ports: vec![],
            });
            vm_config.console = Console::File(paths.console.clone());
            let record = VmRecord {
                id,
                name: name.clone(),
                config: vm_config,
                state: VmPhase::Created,
                pid: None,
                pid_start_ticks: None,
                started_at_ms: None,
                created_at_ms: now_ms(),
                last_error: None,
                restore_from: Some(checkpoint.file()),
            };
            let how = format!("created from checkpoint {}", checkpoint.id);
            let record = self.register(record, &how).inspect_err(|_| {
                let _ = std::fs::remove_dir_all(&paths.dir);
            })?;
            (record, disk_copy)
        };
        let vm = self.find(&record.id)?;
        if let Err(e) = self.start(&vm).await {
            // A VM that could not come back is not left behind.
            if let Err(del) = self.delete(&vm).await {
                tracing::warn!(vm = %vm.id, error = %del, "cannot remove a failed restore");
            }
            return Err(match e {
                // The VMM refused the file (a damaged chunk, a drive of the wrong size, ...).
                Error::Vmm(why) => Error::Precondition(format!(
                    "checkpoint {} cannot be restored: {why}",
                    checkpoint.id
                )),
                e => e,
            });
        }
        let memory = match VmmClient::connect(&vm.paths.control).await {
            Ok(client) => match client.status().await {
                Ok(s) if s.state == VmState::Running => s.restored.map(|r| r.memory),
                _ => None,
            },
            Err(_) => None,
        }
        .unwrap_or_default();
        Ok((
            vm,
            RestoreTiming {
                memory,
                disk_copy,
                total: started.elapsed(),
            },
        ))
    }
}

/// A sparse copy of a disk image, off the async threads.
async fn copy_disk(from: &Path, to: &Path) -> Result<disk_copy::Copied, Error> {
    let (from, to) = (from.to_owned(), to.to_owned());
    tokio::task::spawn_blocking(move || disk_copy::copy_sparse(&from, &to))
        .await
        .map_err(|e| Error::Vmm(format!("the disk copy failed: {e}")))?
        .map_err(|e| Error::io(e.to_string())(e.source))
}

/// One checkpoint being written.
struct Job<'a> {
    client: &'a VmmClient,
    record: &'a VmRecord,
    /// The folder for the file and the disk copies.
    dir: &'a Path,
    /// The folder for the record.
    record_dir: &'a Path,
    id: &'a str,
    ask: &'a CheckpointAsk,
}

/// Has the VMM write the checkpoint file into `job.dir` (copying the writable disks there
/// while the VM is paused), then writes the record into `job.record_dir`. Returns the record
/// and how long the guest was paused.
async fn write_checkpoint(job: Job<'_>) -> Result<(CheckpointRecord, Duration), Error> {
    let Job {
        client,
        record,
        dir,
        record_dir,
        id,
        ask,
    } = job;
    let mut drive_copies = Vec::with_capacity(record.config.drives.len());
    let mut copies = Vec::new();
    for (i, drive) in record.config.drives.iter().enumerate() {
        if drive.read_only {
            drive_copies.push(None);
            continue;
        }
        let to = dir.join(format!("drive-{i}.img"));
        copies.push((drive.id.clone(), to.clone()));
        drive_copies.push(Some(to));
    }
    let result = client
        .checkpoint(CheckpointSpec {
            path: dir.join(FILE),
            after: if ask.stop {
                AfterCheckpoint::Stop
            } else {
                AfterCheckpoint::Resume
            },
            uncompressed: ask.uncompressed,
            mode: ask.mode,
            verification: ask.verification,
            scan_timeout: ask.scan_timeout,
            drive_copies: copies,
            agent_port: None,
        })
        .await
        .map_err(|e| match e.code() {
            Some(tonic::Code::FailedPrecondition) => {
                Error::Precondition(format!("cannot checkpoint VM {:?}: {e}", record.name))
            }
            _ => Error::Vmm(format!(
                "the VMM could not checkpoint {:?}: {e}",
                record.name
            )),
        })?;
    let checkpoint = CheckpointRecord {
        id: id.to_owned(),
        vm_id: record.id.clone(),
        vm_name: record.name.clone(),
        created_at_ms: now_ms(),
        vm: record.clone(),
        dir: dir.to_owned(),
        drive_copies,
        file_bytes: result.file_bytes,
        stored_bytes: result.stored_bytes,
        disk_copy_bytes: result.drive_copy_bytes,
        pages_saved: result.pages_saved,
        pages_zero: result.pages_zero,
        pages_free: result.pages_free,
        pages_disk: result.pages_disk,
        mode: ask.mode,
        omission: result.omission,
    };
    let json = serde_json::to_vec_pretty(&checkpoint)
        .map_err(|e| Error::io("cannot encode the checkpoint record")(std::io::Error::other(e)))?;
    crate::atomic_file::write(&record_dir.join(RECORD), &json).map_err(Error::io(format!(
        "cannot write the record of checkpoint {id}"
    )))?;
    Ok((checkpoint, result.pause))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(is_id("0123456789abcdef0123456789abcdef"));
        assert!(!is_id("0123456789ABCDEF0123456789abcdef"));
        assert!(!is_id("../../etc"));
        assert!(!is_id(""));
    }
}
