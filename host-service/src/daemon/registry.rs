//! The set of VMs one daemon manages: [`Registry`] finds VMs by id or name, creates and
//! deletes them, keeps each VM's record in the state directory in step with its state, and
//! publishes every change as an [`Event`] (and as the VM-count gauges of [`super::metrics`]).
//!
//! Each VM ([`Vm`]) carries an operation lock, so life-cycle operations on one VM (start,
//! pause, resume, stop, delete) run one at a time while reads (get, list) never wait for them,
//! and different VMs never wait for each other.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, watch};

use super::error::Error;
use super::metrics;
use super::process::VmmProcess;
use super::record::{StateDir, VmPaths, VmPhase, VmRecord};
use super::validate::{self, HostLimits, Machine};
use crate::devices::virtio::block::BlockConfig;
use crate::vmm::config::{Console, VmConfig, VsockConfig};

/// Events kept for watchers that fall behind.
const EVENT_BACKLOG: usize = 1024;
/// The lowest vsock context id a guest may have.
const FIRST_CID: u64 = 3;

/// What happened to a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// It was created.
    Created,
    /// Its state changed.
    StateChanged,
    /// Its VMM process ended.
    Exited,
    /// Something failed.
    Error,
    /// It was deleted.
    Deleted,
}

/// One event.
#[derive(Clone, Debug)]
pub struct Event {
    /// The VM's id.
    pub vm_id: String,
    /// The VM's name.
    pub vm_name: String,
    /// What happened.
    pub kind: EventKind,
    /// The VM's state after it.
    pub state: VmPhase,
    /// Details for a person.
    pub message: String,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The VMM process of a VM that runs, and the signal its supervisor raises once it has ended
/// and the record says so.
#[derive(Clone, Debug)]
pub(super) struct Running {
    pub process: Arc<VmmProcess>,
    pub ended: watch::Receiver<bool>,
}

#[derive(Debug)]
pub(super) struct Inner {
    pub record: VmRecord,
    pub running: Option<Running>,
    /// A stop is under way: the process's end is a normal one, however it comes.
    pub stop_requested: bool,
    pub deleted: bool,
}

/// One VM the daemon manages.
#[derive(Debug)]
pub struct Vm {
    /// Its id.
    pub id: String,
    /// Its files.
    pub paths: VmPaths,
    /// Held by life-cycle operations.
    pub(super) op: tokio::sync::Mutex<()>,
    pub(super) inner: Mutex<Inner>,
}

impl Vm {
    fn new(record: VmRecord, paths: VmPaths) -> Self {
        Self {
            id: record.id.clone(),
            paths,
            op: tokio::sync::Mutex::new(()),
            inner: Mutex::new(Inner {
                record,
                running: None,
                stop_requested: false,
                deleted: false,
            }),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of the record now.
    pub fn record(&self) -> VmRecord {
        self.lock().record.clone()
    }

    /// The state now.
    pub fn state(&self) -> VmPhase {
        self.lock().record.state
    }

    /// The name.
    pub fn name(&self) -> String {
        self.lock().record.name.clone()
    }

    /// How long the VMM process has been running, while one runs.
    pub fn uptime(&self) -> Option<Duration> {
        let inner = self.lock();
        let started = inner.record.started_at_ms?;
        inner.running.as_ref()?;
        Some(Duration::from_millis(now_ms().saturating_sub(started)))
    }

    pub(super) fn running(&self) -> Option<Running> {
        self.lock().running.clone()
    }
}

/// Settings of a registry.
#[derive(Clone, Debug)]
pub struct RegistryOptions {
    /// The `ditto-vmm` binary.
    pub vmm_bin: PathBuf,
    /// Most VMs recorded at once.
    pub max_vms: usize,
    /// What the host offers.
    pub host: HostLimits,
}

/// The VMs of one daemon.
#[derive(Debug)]
pub struct Registry {
    pub(super) dir: StateDir,
    pub(super) options: RegistryOptions,
    vms: Mutex<BTreeMap<String, Arc<Vm>>>,
    events: broadcast::Sender<Event>,
    /// Serialises creation and deletion, which check names, ids and cids across VMs.
    pub(super) membership: tokio::sync::Mutex<()>,
}

impl Registry {
    /// An empty registry over `dir` (records are loaded by [`Registry::recover`]).
    pub fn new(dir: StateDir, options: RegistryOptions) -> Arc<Self> {
        Arc::new(Self {
            dir,
            options,
            vms: Mutex::new(BTreeMap::new()),
            events: broadcast::channel(EVENT_BACKLOG).0,
            membership: tokio::sync::Mutex::new(()),
        })
    }

    fn map(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Vm>>> {
        self.vms.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn insert(&self, record: VmRecord) -> Arc<Vm> {
        let paths = self.dir.vm_paths(&record.id);
        let vm = Arc::new(Vm::new(record, paths));
        self.map().insert(vm.id.clone(), vm.clone());
        vm
    }

    /// The state directory.
    pub fn state_dir(&self) -> &StateDir {
        &self.dir
    }

    /// The VM with this id or name.
    pub fn find(&self, vm: &str) -> Result<Arc<Vm>, Error> {
        if vm.is_empty() {
            return Err(Error::invalid("vm", "no VM named (give its name or id)"));
        }
        let map = self.map();
        if let Some(found) = map.get(vm) {
            return Ok(found.clone());
        }
        map.values()
            .find(|v| v.lock().record.name == vm)
            .cloned()
            .ok_or_else(|| Error::NotFound(vm.to_owned()))
    }

    /// Every VM, by name.
    pub fn list(&self) -> Vec<Arc<Vm>> {
        let mut vms: Vec<_> = self.map().values().cloned().collect();
        vms.sort_by_key(|v| v.name());
        vms
    }

    /// A receiver of every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Publishes an event about `vm`.
    pub(super) fn emit(&self, vm: &Vm, kind: EventKind, message: impl Into<String>) {
        let (name, state) = {
            let inner = vm.lock();
            (inner.record.name.clone(), inner.record.state)
        };
        // Nobody watching is fine.
        let _ = self.events.send(Event {
            vm_id: vm.id.clone(),
            vm_name: name,
            kind,
            state,
            message: message.into(),
            at_ms: now_ms(),
        });
    }

    /// Sets the VM-count gauges from the VMs now.
    pub(super) fn publish_counts(&self) {
        let states: Vec<VmPhase> = self.map().values().map(|v| v.state()).collect();
        metrics::vm_counts(&states);
    }

    /// Changes `vm`'s record with `edit`, moves it to `state`, saves it and publishes the
    /// change (a `StateChanged` event when the state differs). Returns the new record.
    pub(super) fn transition(
        &self,
        vm: &Vm,
        state: VmPhase,
        message: impl Into<String>,
        edit: impl FnOnce(&mut VmRecord),
    ) -> Result<VmRecord, Error> {
        let (record, changed) = {
            let mut inner = vm.lock();
            let before = inner.record.state;
            edit(&mut inner.record);
            inner.record.state = state;
            (inner.record.clone(), before != state)
        };
        let saved = if vm.lock().deleted {
            Ok(())
        } else {
            self.dir.save(&record).map_err(Error::io(format!(
                "cannot save the record of VM {}",
                record.name
            )))
        };
        if changed {
            tracing::info!(vm = %vm.id, name = %record.name, state = %state, "state changed");
            self.emit(vm, EventKind::StateChanged, message);
            self.publish_counts();
        }
        saved.map(|()| record)
    }

    /// Checks that a new VM named `name` with these drives may join (the name is free, the
    /// VM count below its limit, no writable disk shared) and returns its vsock cid: `cid` if
    /// it is free, else the first free one. The caller holds the membership lock.
    pub(super) fn admit(
        &self,
        name: &str,
        cid: Option<u64>,
        drives: &[BlockConfig],
    ) -> Result<u64, Error> {
        validate::name(name)?;
        let existing = self.list();
        if existing.iter().any(|v| v.name() == name) {
            return Err(Error::AlreadyExists(format!(
                "a VM named {name:?} exists already"
            )));
        }
        if existing.len() >= self.options.max_vms {
            return Err(Error::ResourceExhausted(format!(
                "this dittod manages at most {} VMs (--max-vms); delete one first",
                self.options.max_vms
            )));
        }
        let records: Vec<VmRecord> = existing.iter().map(|v| v.record()).collect();
        let used_cids: Vec<u64> = records
            .iter()
            .filter_map(|r| r.config.vsock.as_ref().map(|v| v.cid))
            .collect();
        let cid = match cid {
            Some(cid) => {
                if let Some(other) = records
                    .iter()
                    .find(|r| r.config.vsock.as_ref().is_some_and(|v| v.cid == cid))
                {
                    return Err(Error::AlreadyExists(format!(
                        "spec.vsock_cid: {cid} is used by VM {:?}",
                        other.name
                    )));
                }
                cid
            }
            None => (FIRST_CID..u64::from(u32::MAX))
                .find(|c| !used_cids.contains(c))
                .ok_or_else(|| Error::ResourceExhausted("no free vsock cid".into()))?,
        };
        for (i, drive) in drives.iter().enumerate() {
            let mine = std::fs::canonicalize(&drive.path).unwrap_or_else(|_| drive.path.clone());
            for other in &records {
                for theirs in &other.config.drives {
                    let same = std::fs::canonicalize(&theirs.path)
                        .unwrap_or_else(|_| theirs.path.clone())
                        == mine;
                    if same && !(drive.read_only && theirs.read_only) {
                        return Err(Error::Precondition(format!(
                            "spec.drives[{i}].path: {} is also a disk of VM {:?} and one of \
                             them may write it; share a disk only read-only",
                            drive.path.display(),
                            other.name
                        )));
                    }
                }
            }
        }
        Ok(cid)
    }

    /// Records a new VM.
    pub async fn create(&self, name: &str, machine: Machine) -> Result<VmRecord, Error> {
        let _membership = self.membership.lock().await;
        let cid = self.admit(name, machine.vsock_cid, &machine.drives)?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let paths = self.dir.vm_paths(&id);
        let record = VmRecord {
            id: id.clone(),
            name: name.to_owned(),
            config: VmConfig {
                kernel: machine.kernel,
                initrd: machine.initrd,
                cmdline: machine.cmdline,
                virtio_mmio_cmdline: false,
                vcpus: machine.vcpus,
                mem_mib: machine.mem_mib,
                drives: machine.drives,
                vsock: Some(VsockConfig {
                    cid,
                    uds: paths.vsock.clone(),
                    host_ports: vec![],
                }),
                balloon: true,
                console: Console::File(paths.console.clone()),
            },
            state: VmPhase::Created,
            pid: None,
            pid_start_ticks: None,
            started_at_ms: None,
            created_at_ms: now_ms(),
            last_error: None,
            restore_from: None,
        };
        self.register(record, "created")
    }

    /// Saves a new VM's record and adds the VM. The caller holds the membership lock and has
    /// [`admit`](Self::admit)ted it.
    pub(super) fn register(&self, record: VmRecord, how: &str) -> Result<VmRecord, Error> {
        self.dir.save(&record).map_err(Error::io(format!(
            "cannot save the record of VM {}",
            record.name
        )))?;
        let vm = self.insert(record.clone());
        self.emit(&vm, EventKind::Created, how);
        self.publish_counts();
        Ok(record)
    }

    /// Forgets a VM that does not run and removes its folder.
    pub async fn delete(&self, vm: &Arc<Vm>) -> Result<(), Error> {
        let _membership = self.membership.lock().await;
        let _op = vm.op.lock().await;
        let (name, state) = {
            let inner = vm.lock();
            if inner.deleted {
                return Err(Error::NotFound(vm.id.clone()));
            }
            (inner.record.name.clone(), inner.record.state)
        };
        if state.has_process() {
            return Err(Error::WrongState {
                vm: name,
                op: "delete",
                state,
                hint: "; stop it first",
            });
        }
        self.dir
            .remove(&vm.id)
            .map_err(Error::io(format!("cannot remove the folder of VM {name}")))?;
        vm.lock().deleted = true;
        self.map().remove(&vm.id);
        self.emit(vm, EventKind::Deleted, "deleted");
        self.publish_counts();
        Ok(())
    }
}
