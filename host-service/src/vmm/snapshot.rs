//! Checkpoint and restore of a whole VM through a checkpoint file ([`crate::checkpoint`]).
//!
//! [`Vmm::checkpoint`] opens the destination first (a bad destination costs the guest no
//! pause), pauses a running VM, captures its [`VmmState`], writes every page of guest memory
//! (all-zero pages as zero) and the state, and makes the file durable under its final name;
//! then the VM runs on, or stays paused for the owner to end it.
//!
//! [`Vmm::restore`] builds a VM in a new process from such a file: it checks the file, the
//! drives (each must exist and have the size the guest knew) and the host's memory before
//! anything is mapped, fills fresh memory from the saved pages in parallel, fills
//! disk-referenced pages from the drive images in parallel, through the checkpoint's side file
//! when it has one (their hashes checked; [`super::preserve::fill_disk_pages`]), rebuilds the in-kernel
//! devices, vCPUs and devices from the captured structs and resets the vsock transport, so the
//! guest drops its old connections and takes the (possibly new) context id. The VM is left
//! paused; [`Vmm::resume`] lets it continue where it was.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryBackend as _;

use super::config::Console;
use super::devices::DevicesError;
use super::omit::Claims;
use super::preserve::disk_ranges;
use super::{RunState, Vmm, VmmError, VmmEvents, VmmState};
use crate::checkpoint::{
    CheckpointReader, CheckpointWriter, DriveInfo, PageHashes, ReadError, SideFileError,
    WriteError, WriteOptions, WriteStats,
};
use crate::control::RestoreInfo;
use crate::devices::virtio::block::BlockError;
use crate::devices::virtio::vsock::device::EVENT_QUEUE;
use crate::omission::{Mode, OmissionReport, Verification};

/// What can go wrong taking or restoring a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The destination cannot take a checkpoint file (its folder is missing or not writable);
    /// nothing was paused.
    #[error("cannot create the checkpoint: {0}")]
    Destination(WriteError),
    /// The checkpoint file cannot be written.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The checkpoint file cannot be used.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// A drive named for the restore is not one of the checkpoint's.
    #[error("drive {0:?} is not a drive of the checkpointed VM")]
    UnknownDrive(String),
    /// A new vsock device was asked for, but the checkpointed VM had none.
    #[error("the checkpointed VM has no vsock device to give a new cid or socket")]
    NoVsock,
    /// The drive copies asked for cannot be made as asked.
    #[error("drive_copies: {0}")]
    CopyPlan(String),
    /// A drive copy failed.
    #[error(transparent)]
    Copy(crate::disk_copy::CopyError),
    /// The referenced blocks of a checkpoint the VM runs on after cannot be preserved.
    #[error("cannot preserve the blocks the checkpoint references: {0}")]
    Preserve(super::preserve::PreserveError),
    /// The checkpoint's side file (drive blocks preserved after it) cannot be used.
    #[error(transparent)]
    Preserved(#[from] SideFileError),
    /// The file's drive table and the state disagree.
    #[error("the checkpoint's drive table does not match its VM state: {0}")]
    Inconsistent(String),
}

/// What the VM does once its checkpoint is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum After {
    /// Runs on if it was running; stays paused if it was paused.
    #[default]
    Resume,
    /// Stays paused for good: the owner ends the VMM.
    Stop,
}

/// A checkpoint to take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointOptions {
    /// The file to write (its folder must exist).
    pub path: PathBuf,
    /// What the VM does afterwards.
    pub after: After,
    /// How to write the file.
    pub write: WriteOptions,
    /// Which pages to store.
    pub mode: Mode,
    /// How the agent's report is checked (ditto mode).
    pub verification: Verification,
    /// How long the agent's scan and the free-page round may take in all (a tenth of it, at
    /// most 2 s, is kept for the free-page round).
    pub scan_timeout: Duration,
    /// Drives to copy while the VM is paused: (drive id, new file).
    pub drive_copies: Vec<(String, PathBuf)>,
    /// The guest vsock port of the agent.
    pub agent_port: u32,
}

/// A written checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointReport {
    /// The file.
    pub path: PathBuf,
    /// What the file holds.
    pub stats: WriteStats,
    /// How long the guest did not run because of the checkpoint (for a stop, until the file
    /// was durable; zero when the VM was already paused).
    pub pause: Duration,
    /// The whole operation.
    pub total: Duration,
    /// What a ditto or free-only checkpoint omitted and refused.
    pub omission: Option<OmissionReport>,
    /// Bytes the drive copies take (allocated).
    pub drive_copy_bytes: u64,
    /// How long the drive copies took.
    pub drive_copy: Duration,
}

/// How a restore changes the checkpointed VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreOptions {
    /// New image paths by drive id (for copied disks); the others keep their paths.
    pub drives: Vec<(String, PathBuf)>,
    /// A new guest context id for the vsock device.
    pub vsock_cid: Option<u64>,
    /// A new host socket for the vsock device (the checkpointed VMM may still hold the old).
    pub vsock_uds: Option<PathBuf>,
    /// New host ports the guest may connect to (empty: those of the checkpointed VM).
    pub vsock_host_ports: Vec<u32>,
    /// Where the serial console goes now.
    pub console: Console,
}

/// What a restore did: the control endpoint's [`RestoreInfo`], which the VMM's status carries.
pub type RestoreReport = RestoreInfo;

/// Threads that fill memory on restore: one per host CPU, at most 8.
fn restore_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().min(8))
}

impl Vmm {
    /// The drive table of a checkpoint of this VM: each drive's id and the size the guest sees.
    pub(super) fn drive_table(&self) -> Vec<DriveInfo> {
        self.devices
            .blocks
            .iter()
            .map(|b| {
                let t = b.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let block = t.device();
                DriveInfo {
                    id: block.config().id.clone(),
                    size: block.nsectors() * 512,
                }
            })
            .collect()
    }

    /// Writes a checkpoint of the running or paused VM to `options.path` (see the module
    /// documentation). On an error the VM is as it was before (a running VM runs on) and no
    /// file is left at the destination (nor any drive copy).
    pub fn checkpoint(
        &mut self,
        options: &CheckpointOptions,
    ) -> Result<CheckpointReport, VmmError> {
        let started = Instant::now();
        if !matches!(self.state, RunState::Running | RunState::Paused) {
            return Err(VmmError::WrongState(self.state));
        }
        let copies = self.drive_copy_plan(&options.drive_copies)?;
        let writer = CheckpointWriter::create(&options.path, options.write.clone())
            .map_err(SnapshotError::Destination)?;
        let was_running = self.state == RunState::Running;

        // While the guest runs: arm the tracking, then ask the guest what it may omit.
        let mut omission = (options.mode != Mode::Full).then(OmissionReport::default);
        let claims = match &mut omission {
            Some(report) if !was_running => {
                report.degrade(
                    "the VM was paused, so neither its agent nor its balloon could be asked; \
                     every page is saved",
                );
                None
            }
            Some(report) => self
                .arm_tracking(report)
                .then(|| self.ask_guest(options, report)),
            None => None,
        };

        let paused_at = Instant::now();
        if was_running && let Err(e) = self.pause() {
            self.disarm_tracking();
            return Err(e);
        }
        let written = self.write_paused(writer, options, &copies, claims.as_ref(), &mut omission);
        self.disarm_tracking();
        if claims.is_some() {
            self.end_free_hinting();
        }
        let (stats, copied) = match written {
            Ok(done) => done,
            Err(e) => {
                for (_, to) in &copies {
                    let _ = std::fs::remove_file(to);
                }
                if was_running {
                    // The guest runs on as before; the write error is the one to report.
                    let _ = self.resume();
                }
                return Err(e);
            }
        };
        let pause = if was_running {
            if options.after == After::Resume {
                self.resume()?;
            }
            paused_at.elapsed()
        } else {
            Duration::ZERO
        };
        if let Some(report) = &omission {
            tracing::info!(
                path = %options.path.display(),
                mode = %options.mode,
                omitted_cache = report.pages_omitted_cache,
                omitted_free = report.pages_omitted_free,
                degraded = report.degraded.len(),
                "checkpoint written"
            );
        }
        Ok(CheckpointReport {
            path: options.path.clone(),
            stats,
            pause,
            total: started.elapsed(),
            omission,
            drive_copy_bytes: copied.0,
            drive_copy: copied.1,
        })
    }

    /// Each requested drive copy as (drive index, new file), checked before anything pauses.
    fn drive_copy_plan(
        &self,
        copies: &[(String, PathBuf)],
    ) -> Result<Vec<(usize, PathBuf)>, VmmError> {
        let mut plan: Vec<(usize, PathBuf)> = Vec::with_capacity(copies.len());
        for (id, to) in copies {
            let index = self
                .config
                .drives
                .iter()
                .position(|d| d.id == *id)
                .ok_or_else(|| SnapshotError::UnknownDrive(id.clone()))?;
            if plan.iter().any(|(i, _)| *i == index) {
                return Err(
                    SnapshotError::CopyPlan(format!("drive {id:?} is copied twice")).into(),
                );
            }
            if !to.is_absolute() || to.exists() || !to.parent().is_some_and(Path::is_dir) {
                return Err(SnapshotError::CopyPlan(format!(
                    "the copy of drive {id:?} must be a new file in an existing folder, not {}",
                    to.display()
                ))
                .into());
            }
            plan.push((index, to.clone()));
        }
        Ok(plan)
    }

    /// With the VM paused: copies the drives, decides what to omit, and writes the file.
    /// Returns the file's statistics and the drive copies' allocated bytes and time.
    fn write_paused(
        &mut self,
        mut writer: CheckpointWriter,
        options: &CheckpointOptions,
        copies: &[(usize, PathBuf)],
        claims: Option<&Claims>,
        omission: &mut Option<OmissionReport>,
    ) -> Result<(WriteStats, (u64, Duration)), VmmError> {
        let t = Instant::now();
        let mut copied = 0;
        for (index, to) in copies {
            let from = &self.config.drives[*index].path;
            copied += crate::disk_copy::copy_sparse(from, to)
                .map_err(SnapshotError::Copy)?
                .allocated_bytes;
        }
        let copy_time = t.elapsed();
        let no_hashes = PageHashes::new();
        let (extents, hashes) = match (claims, omission.as_mut()) {
            (Some(claims), Some(report)) => (
                self.decide_omissions(claims, options.verification, report),
                &claims.hashes,
            ),
            _ => (Vec::new(), &no_hashes),
        };
        let state = self.capture()?;
        writer
            .write_memory_hashed(self.vm.memory(), &self.drive_table(), &extents, hashes)
            .map_err(SnapshotError::from)?;
        let stats = writer.finish_json(&state).map_err(SnapshotError::from)?;
        // The guest may run on and overwrite blocks the checkpoint references: those of drives
        // not copied with it are preserved first (copy before write).
        let refs: Vec<_> = disk_ranges(&extents)
            .into_iter()
            .filter(|(drive, _, _)| !copies.iter().any(|(i, _)| *i == *drive as usize))
            .collect();
        if options.after == After::Resume
            && !refs.is_empty()
            && let Err(e) = self.preserve_referenced(&options.path, &refs)
        {
            // Without its blocks preserved the checkpoint would not stay restorable.
            let _ = std::fs::remove_file(&options.path);
            return Err(SnapshotError::Preserve(e).into());
        }
        Ok((stats, (copied, copy_time)))
    }

    /// Builds a paused VM from the checkpoint at `path` with the changes of `options` (see the
    /// module documentation).
    pub fn restore(
        path: &Path,
        options: &RestoreOptions,
    ) -> Result<(Self, VmmEvents, RestoreReport), VmmError> {
        let started = Instant::now();
        let reader = CheckpointReader::open(path).map_err(SnapshotError::from)?;
        let mut state: VmmState = reader.state_json().map_err(SnapshotError::from)?;
        apply_restore_options(&mut state, options)?;
        state.config.validate()?;
        check_drive_table(&state, reader.drives())?;
        super::check_host_memory(state.config.mem_mib)?;
        if state.layout.memory != *reader.layout() {
            return Err(SnapshotError::Inconsistent(
                "the memory layout of the state differs from the file's".into(),
            )
            .into());
        }
        // Every drive opens and has its size before memory is filled.
        let drive_files = state
            .config
            .drives
            .iter()
            .zip(&state.devices.blocks)
            .map(|(d, (block, _))| open_drive(&d.path, block.nsectors))
            .collect::<Result<Vec<_>, _>>()?;

        let memory = reader
            .layout()
            .create()
            .map_err(|e| VmmError::Vm(e.into()))?;
        let t = Instant::now();
        let disk_runs = reader
            .restore_memory(&memory, restore_threads())
            .map_err(SnapshotError::from)?;
        let memory_time = t.elapsed();
        let t = Instant::now();
        let pages_disk = super::preserve::fill_disk_pages(
            path,
            &memory,
            &disk_runs,
            &drive_files,
            restore_threads(),
        )?;
        let disk_time = t.elapsed();
        // Filling memory is not a device write the guest made.
        for region in memory.iter() {
            vm_memory::MmapRegion::bitmap(region).reset();
        }

        let (mut vmm, events) = Self::assemble(memory, &state)?;
        vmm.state = RunState::Paused;
        if let (Some(v), Some(transport)) = (&state.config.vsock, &vmm.devices.vsock) {
            let mut t = transport
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            t.device_mut().reset_transport(v.cid);
            t.notify(EVENT_QUEUE as u32);
        }
        let map = reader.page_map();
        let report = RestoreReport {
            checkpoint: path.to_owned(),
            memory: memory_time,
            disk: disk_time,
            total: started.elapsed(),
            pages_saved: map.saved_pages(),
            pages_zero: map.zero_pages(),
            pages_disk,
        };
        vmm.restored = Some(report.clone());
        Ok((vmm, events, report))
    }
}

/// Opens a drive image for reading and checks it has the `nsectors` the guest knew.
fn open_drive(path: &Path, nsectors: u64) -> Result<File, VmmError> {
    let err = |e: BlockError| VmmError::Devices(DevicesError::Block(e));
    let file = File::open(path).map_err(|source| {
        err(BlockError::Open {
            path: path.to_owned(),
            source,
        })
    })?;
    let len = file
        .metadata()
        .map_err(|source| {
            err(BlockError::Size {
                path: path.to_owned(),
                source,
            })
        })?
        .len();
    if len / 512 != nsectors {
        return Err(err(BlockError::SizeChanged {
            path: path.to_owned(),
            was: nsectors,
            now: len / 512,
        }));
    }
    Ok(file)
}

/// Applies new drive paths, vsock and console to the captured state (configuration and
/// device state alike).
fn apply_restore_options(
    state: &mut VmmState,
    options: &RestoreOptions,
) -> Result<(), SnapshotError> {
    for (id, path) in &options.drives {
        let index = state
            .config
            .drives
            .iter()
            .position(|d| d.id == *id)
            .ok_or_else(|| SnapshotError::UnknownDrive(id.clone()))?;
        state.config.drives[index].path = path.clone();
        if let Some((block, _)) = state.devices.blocks.get_mut(index) {
            block.config.path = path.clone();
        }
    }
    let wants_vsock = options.vsock_cid.is_some()
        || options.vsock_uds.is_some()
        || !options.vsock_host_ports.is_empty();
    if wants_vsock {
        let Some(v) = &mut state.config.vsock else {
            return Err(SnapshotError::NoVsock);
        };
        if let Some(cid) = options.vsock_cid {
            v.cid = cid;
        }
        if let Some(uds) = &options.vsock_uds {
            v.uds = uds.clone();
        }
        if !options.vsock_host_ports.is_empty() {
            v.host_ports = options.vsock_host_ports.clone();
        }
    }
    state.config.console = options.console.clone();
    Ok(())
}

/// The state must be one VM's: a vCPU state per configured vCPU, and the file's drive table
/// naming the state's drives in order, with the sizes the devices had.
fn check_drive_table(state: &VmmState, table: &[DriveInfo]) -> Result<(), SnapshotError> {
    if state.vcpus.len() != usize::from(state.config.vcpus) {
        return Err(SnapshotError::Inconsistent(format!(
            "{} vCPU states for {} vCPUs",
            state.vcpus.len(),
            state.config.vcpus
        )));
    }
    if table.len() != state.config.drives.len() || table.len() != state.devices.blocks.len() {
        return Err(SnapshotError::Inconsistent(format!(
            "{} drives in the table, {} configured",
            table.len(),
            state.config.drives.len()
        )));
    }
    for ((info, drive), (block, _)) in table
        .iter()
        .zip(&state.config.drives)
        .zip(&state.devices.blocks)
    {
        if info.id != drive.id || info.size != block.nsectors * 512 {
            return Err(SnapshotError::Inconsistent(format!(
                "drive {:?} of {} bytes in the table, {:?} of {} bytes in the state",
                info.id,
                info.size,
                drive.id,
                block.nsectors * 512
            )));
        }
    }
    Ok(())
}
