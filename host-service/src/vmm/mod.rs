//! One VM in one process: built from a [`VmConfig`] (everything checked before the guest
//! starts), its vCPUs running in their own threads, paused and resumed as a whole, captured
//! into a plain serialisable [`VmmState`] and rebuilt from it.
//!
//! The guest ends the VM by powering off or resetting (the ACPI power device), by a triple
//! fault, or by a vCPU failing; the owner learns it from [`VmmEvents::wait`] and ends the
//! process with [`Vmm::stop`].

pub mod config;
pub mod control;
pub mod devices;
pub mod exit_file;
pub mod free_hints;
mod omit;
pub mod preserve;
pub mod snapshot;

use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use kvm_bindings::CpuId;
use serde::{Deserialize, Serialize};

use crate::acpi::tables::{self, AcpiError};
use crate::boot::cpu::{self, CpuSetupError};
use crate::boot::layout::{Layout, LayoutError, MIB};
use crate::boot::loader::{self, LoadError};
use crate::boot::reset_vector::{self, ResetVectorError};
use crate::devices::legacy::console_tail::ConsoleTail;
use crate::devices::legacy::power::{OnPowerEvent, PowerEvent};
use crate::devices::virtio::vsock::unix::{self as vsock_unix, VsockUnixError, VsockUnixThread};
use crate::kvm::memory::GuestMemory;
use crate::kvm::runner::{ExitAction, RunnerError, VcpuThread};
use crate::kvm::vcpu::{Vcpu, VcpuError, VcpuExitKind, VcpuState};
use crate::kvm::vm::{Vm, VmDevicesState, VmError};
use config::{ConfigError, VmConfig};
use devices::{Devices, DevicesError, DevicesState};
use snapshot::{RestoreReport, SnapshotError};

/// How long a vCPU may take to leave `KVM_RUN` when pausing.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often [`VmmEvents::wait`] checks that the vCPU threads are alive.
const WATCH_INTERVAL: Duration = Duration::from_millis(200);

/// What can go wrong building or driving a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The memory layout does not fit.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// The guest memory is larger than this host's RAM.
    #[error("{want_mib} MiB of guest memory is more than this host's {host_mib} MiB of RAM")]
    HostMemory {
        /// Requested.
        want_mib: u64,
        /// Host RAM.
        host_mib: u64,
    },
    /// KVM or guest memory.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A vCPU operation.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// vCPU setup.
    #[error(transparent)]
    CpuSetup(#[from] CpuSetupError),
    /// vCPU threads.
    #[error(transparent)]
    Runner(#[from] RunnerError),
    /// Loading the kernel or initrd.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// The reset stub.
    #[error(transparent)]
    ResetVector(#[from] ResetVectorError),
    /// Devices.
    #[error(transparent)]
    Devices(#[from] DevicesError),
    /// The vsock host side.
    #[error(transparent)]
    Vsock(#[from] VsockUnixError),
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("cannot read the CPUID KVM supports: {0}")]
    Cpuid(kvm_ioctls::Error),
    /// Taking or restoring a checkpoint.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The operation needs the VM paused (or running) and it is not.
    #[error("the VM is {0:?}")]
    WrongState(RunState),
}

/// Whether the vCPUs run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    /// Built, not started yet.
    Created,
    /// vCPUs running.
    Running,
    /// vCPUs stopped, devices quiet.
    Paused,
    /// Stopped for good.
    Stopped,
}

/// Why the VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off.
    PowerOff,
    /// The guest rebooted (ACPI reset or the keyboard controller's reset line); the VMM ends
    /// the VM instead of booting it again.
    Reset,
    /// A vCPU shut down (triple fault): the guest crashed.
    TripleFault {
        /// The vCPU.
        vcpu: u8,
    },
    /// The guest's kernel panicked (its console says so) and then reset or shut down.
    GuestPanic {
        /// The console line that reports the panic.
        line: String,
    },
    /// The owner asked the VM to end.
    Requested,
    /// A checkpoint was written and the VM stopped with it (it must not run on: the
    /// checkpoint continues it).
    Checkpointed(std::path::PathBuf),
    /// A vCPU failed (a KVM error or an exit the VMM cannot handle); the guest cannot continue.
    Failed(String),
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PowerOff => f.write_str("the guest powered off"),
            Self::Reset => f.write_str("the guest rebooted"),
            Self::TripleFault { vcpu } => {
                write!(f, "the guest crashed: vCPU {vcpu} shut down (triple fault)")
            }
            Self::GuestPanic { line } => write!(f, "the guest's kernel panicked: {line}"),
            Self::Requested => f.write_str("the VMM was asked to end"),
            Self::Checkpointed(path) => {
                write!(
                    f,
                    "the VM was checkpointed to {} and stopped",
                    path.display()
                )
            }
            Self::Failed(why) => write!(f, "a vCPU failed: {why}"),
        }
    }
}

impl ExitReason {
    /// Whether this is a normal end of the guest (exit status 0). A crash of the guest (triple
    /// fault, kernel panic) and a failed vCPU are not.
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            Self::PowerOff | Self::Reset | Self::Requested | Self::Checkpointed(_)
        )
    }

    /// A short name of the kind of end, for metrics and scripts.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::PowerOff => "power_off",
            Self::Reset => "reset",
            Self::TripleFault { .. } => "triple_fault",
            Self::GuestPanic { .. } => "guest_panic",
            Self::Requested => "requested",
            Self::Checkpointed(_) => "checkpointed",
            Self::Failed(_) => "vcpu_failed",
        }
    }

    /// This end in the light of the guest's console: a reset or a triple fault that follows a
    /// kernel panic is the panic's.
    pub fn with_console(self, tail: &ConsoleTail) -> Self {
        match self {
            Self::Reset | Self::TripleFault { .. } => match tail.panic_line() {
                Some(line) => Self::GuestPanic { line },
                None => self,
            },
            other => other,
        }
    }
}

/// Sends events to the VMM's owner.
#[derive(Clone, Debug)]
pub struct EventSender(mpsc::Sender<ExitReason>);

impl EventSender {
    /// Asks the VM to end with `reason`.
    pub fn send(&self, reason: ExitReason) {
        // The owner is gone only when the process is ending anyway.
        let _ = self.0.send(reason);
    }
}

/// The owner's end of the VM's events.
#[derive(Debug)]
pub struct VmmEvents {
    rx: mpsc::Receiver<ExitReason>,
}

impl VmmEvents {
    /// Waits until the VM should end. `alive` is polled so a vCPU thread that died on a KVM
    /// error ends the VM too.
    pub fn wait(&self, alive: impl Fn() -> Result<(), String>) -> ExitReason {
        loop {
            match self.rx.recv_timeout(WATCH_INTERVAL) {
                Ok(reason) => return reason,
                Err(mpsc::RecvTimeoutError::Disconnected) => return ExitReason::Requested,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Err(e) = alive() {
                        return ExitReason::Failed(e);
                    }
                }
            }
        }
    }
}

/// Everything needed to rebuild the VM, apart from guest memory contents.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmmState {
    /// The configuration.
    pub config: VmConfig,
    /// The guest physical layout.
    pub layout: Layout,
    /// In-kernel interrupt controllers, PIT and clock.
    pub vm: VmDevicesState,
    /// Every vCPU.
    pub vcpus: Vec<VcpuState>,
    /// Every device.
    pub devices: DevicesState,
}

enum VcpuSlot {
    Running(VcpuThread),
    Parked(Vcpu),
}

/// A VM and its vCPUs.
pub struct Vmm {
    config: VmConfig,
    layout: Layout,
    vm: Vm,
    devices: Devices,
    vsock_host: Option<VsockUnixThread>,
    vcpus: Vec<VcpuSlot>,
    state: RunState,
    cpuid: CpuId,
    events: EventSender,
    started: Instant,
    restored: Option<RestoreReport>,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("config", &self.config)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// This host's RAM in MiB, from /proc/meminfo.
fn host_mem_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Refuses guest memory larger than this host's RAM.
fn check_host_memory(want_mib: u64) -> Result<(), VmmError> {
    match host_mem_mib() {
        Some(host_mib) if want_mib > host_mib => Err(VmmError::HostMemory { want_mib, host_mib }),
        _ => Ok(()),
    }
}

fn power_callback(events: &EventSender) -> OnPowerEvent {
    let events = events.clone();
    Arc::new(move |e| {
        events.send(match e {
            PowerEvent::PowerOff => ExitReason::PowerOff,
            PowerEvent::Reset => ExitReason::Reset,
        })
    })
}

/// `vm` (fresh, over the guest's memory) with in-kernel devices, devices and parked vCPUs
/// rebuilt from `state`.
fn build_from_state(
    mut vm: Vm,
    state: &VmmState,
    events: &EventSender,
    cpuid: &CpuId,
) -> Result<(Vm, Devices, Vec<VcpuSlot>), VmmError> {
    vm.create_irqchip()?;
    vm.restore_devices(&state.vm)?;
    let devices = Devices::build(
        &vm,
        &state.config,
        &state.layout,
        Some(&state.devices),
        power_callback(events),
    )?;
    let vcpu_count = u8::try_from(state.vcpus.len()).unwrap_or(u8::MAX);
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for s in &state.vcpus {
        let mut vcpu = vm.create_vcpu(s.index)?;
        cpu::setup_vcpu(&vcpu, cpuid, vcpu_count, true)?;
        vcpu.restore_state(s)?;
        vcpus.push(VcpuSlot::Parked(vcpu));
    }
    devices.resume_after_restore();
    Ok((vm, devices, vcpus))
}

/// Starts the host side of the vsock device: the hybrid Unix socket and its event thread.
fn start_vsock_host(
    config: &VmConfig,
    devices: &Devices,
) -> Result<Option<VsockUnixThread>, VmmError> {
    let (Some(v), Some(transport)) = (&config.vsock, &devices.vsock) else {
        return Ok(None);
    };
    let mut unix = vsock_unix::VsockUnixConfig::new(&v.uds);
    unix.host_ports = v.host_ports.clone();
    let backend = vsock_unix::VsockUnixBackend::new(unix, transport.clone())?;
    Ok(Some(vsock_unix::spawn(backend)?))
}

impl Vmm {
    /// Builds the VM of `config`, ready to start: memory, kernel, initrd, boot parameters,
    /// ACPI tables, devices and vCPUs. Every input is checked here, before the guest runs.
    pub fn build(config: VmConfig) -> Result<(Self, VmmEvents), VmmError> {
        config.validate()?;
        check_host_memory(config.mem_mib)?;
        let layout = Layout::plan(config.mem_mib, config.virtio_devices())?;
        let mut vm = Vm::new(&layout.memory)?;
        vm.create_irqchip()?;
        let mem = vm.memory().clone();

        let kernel = loader::load_kernel(&mem, &config.kernel)?;
        let initrd = match &config.initrd {
            Some(path) => Some(loader::load_initrd(&mem, path, &kernel)?),
            None => None,
        };
        let cmdline =
            loader::command_line(&config.cmdline, &layout.devices, config.virtio_mmio_cmdline)?;
        loader::write_boot_params(&mem, &layout, &kernel, initrd, &cmdline)?;
        tables::write(&mem, usize::from(config.vcpus), &layout.devices)?;
        reset_vector::write(&mem)?;

        let (tx, rx) = mpsc::channel();
        let events = EventSender(tx);
        let devices = Devices::build(&vm, &config, &layout, None, power_callback(&events))?;
        let vsock_host = start_vsock_host(&config, &devices)?;

        let cpuid = vm
            .kvm()
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(VmmError::Cpuid)?;
        let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
        for index in 0..config.vcpus {
            let vcpu = vm.create_vcpu(index)?;
            cpu::setup_vcpu(&vcpu, &cpuid, config.vcpus, true)?;
            if index == 0 {
                cpu::setup_boot_vcpu(&vcpu, &mem, kernel.entry)?;
            }
            vcpus.push(VcpuSlot::Parked(vcpu));
        }
        let vmm = Self {
            config,
            layout,
            vm,
            devices,
            vsock_host,
            vcpus,
            state: RunState::Created,
            cpuid,
            events,
            started: Instant::now(),
            restored: None,
        };
        Ok((vmm, VmmEvents { rx }))
    }

    /// A VM over `memory` (already holding the guest's pages) whose in-kernel devices, vCPUs
    /// and devices are rebuilt from `state`, not started. The vsock host side is started and
    /// paused, like the vCPUs.
    fn assemble(memory: GuestMemory, state: &VmmState) -> Result<(Self, VmmEvents), VmmError> {
        let (tx, rx) = mpsc::channel();
        let events = EventSender(tx);
        let vm = Vm::with_memory(memory)?;
        let cpuid = vm
            .kvm()
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(VmmError::Cpuid)?;
        let (vm, devices, vcpus) = build_from_state(vm, state, &events, &cpuid)?;
        let vsock_host = start_vsock_host(&state.config, &devices)?;
        if let Some(v) = &vsock_host {
            v.pause();
        }
        let vmm = Self {
            config: state.config.clone(),
            layout: state.layout.clone(),
            vm,
            devices,
            vsock_host,
            vcpus,
            state: RunState::Created,
            cpuid,
            events,
            started: Instant::now(),
            restored: None,
        };
        Ok((vmm, VmmEvents { rx }))
    }

    /// How this VM came from a checkpoint, when it did ([`Vmm::restore`]).
    pub fn restored(&self) -> Option<&RestoreReport> {
        self.restored.as_ref()
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Whether the vCPUs run.
    pub fn run_state(&self) -> RunState {
        self.state
    }

    /// When the VMM was built.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The KVM VM (memory, dirty tracking).
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The live devices.
    pub fn devices(&self) -> &Devices {
        &self.devices
    }

    /// The last lines the guest wrote to its serial console.
    pub fn console_tail(&self) -> &ConsoleTail {
        &self.devices.console_tail
    }

    /// A sender for asking the VM to end.
    pub fn event_sender(&self) -> EventSender {
        self.events.clone()
    }

    /// Starts (or resumes) every vCPU.
    fn spawn_vcpus(&mut self) -> Result<(), VmmError> {
        let slots = std::mem::take(&mut self.vcpus);
        for slot in slots {
            let vcpu = match slot {
                VcpuSlot::Parked(v) => v,
                running @ VcpuSlot::Running(_) => {
                    self.vcpus.push(running);
                    continue;
                }
            };
            let index = vcpu.index();
            let events = self.events.clone();
            let on_exit = move |exit: &VcpuExitKind| match exit {
                VcpuExitKind::Shutdown => {
                    events.send(ExitReason::TripleFault { vcpu: index });
                    ExitAction::Stop
                }
                VcpuExitKind::Other(what) => {
                    events.send(ExitReason::Failed(format!("vCPU {index}: exit {what}")));
                    ExitAction::Stop
                }
                _ => ExitAction::Continue,
            };
            let thread = VcpuThread::spawn(vcpu, self.devices.buses.clone(), on_exit)?;
            self.vcpus.push(VcpuSlot::Running(thread));
        }
        Ok(())
    }

    /// Starts the guest.
    pub fn start(&mut self) -> Result<(), VmmError> {
        if self.state != RunState::Created {
            return Err(VmmError::WrongState(self.state));
        }
        self.spawn_vcpus()?;
        self.state = RunState::Running;
        Ok(())
    }

    /// Whether every running vCPU thread is alive; a thread that ended on its own means the
    /// guest cannot continue.
    pub fn check_alive(&self) -> Result<(), String> {
        for (i, slot) in self.vcpus.iter().enumerate() {
            if let VcpuSlot::Running(t) = slot
                && t.is_finished()
            {
                return Err(format!("vCPU {i} stopped running"));
            }
        }
        Ok(())
    }

    /// Stops every vCPU thread and parks the vCPUs. Returns the first error (a vCPU whose
    /// thread failed is lost).
    fn park_vcpus(&mut self) -> Result<(), VmmError> {
        let mut first_error = None;
        for slot in std::mem::take(&mut self.vcpus) {
            match slot {
                VcpuSlot::Running(thread) => match thread.stop(PAUSE_TIMEOUT) {
                    Ok(v) => self.vcpus.push(VcpuSlot::Parked(v)),
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                },
                parked => self.vcpus.push(parked),
            }
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Pauses the guest: every vCPU out of `KVM_RUN`, then the vsock event thread. Block
    /// requests are served on the vCPU threads, so once they stop the disks are quiet too.
    pub fn pause(&mut self) -> Result<Duration, VmmError> {
        if self.state != RunState::Running {
            return Err(VmmError::WrongState(self.state));
        }
        let t = Instant::now();
        let result = self.park_vcpus();
        if let Some(v) = &self.vsock_host {
            v.pause();
        }
        self.state = if result.is_ok() {
            RunState::Paused
        } else {
            RunState::Stopped
        };
        result.map(|()| t.elapsed())
    }

    /// Resumes a paused guest.
    pub fn resume(&mut self) -> Result<Duration, VmmError> {
        if self.state != RunState::Paused {
            return Err(VmmError::WrongState(self.state));
        }
        let t = Instant::now();
        if let Some(v) = &self.vsock_host {
            v.resume();
        }
        self.spawn_vcpus()?;
        self.state = RunState::Running;
        Ok(t.elapsed())
    }

    /// Stops the VM for good (idempotent).
    pub fn stop(&mut self) -> Result<(), VmmError> {
        if self.state == RunState::Stopped {
            return Ok(());
        }
        self.state = RunState::Stopped;
        let parked = self.park_vcpus();
        if let Some(v) = self.vsock_host.take() {
            v.stop()?;
        }
        parked
    }

    /// Captures the whole VM apart from memory contents. The VM must be paused.
    pub fn capture(&self) -> Result<VmmState, VmmError> {
        if self.state != RunState::Paused {
            return Err(VmmError::WrongState(self.state));
        }
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for slot in &self.vcpus {
            match slot {
                VcpuSlot::Parked(v) => vcpus.push(v.save_state()?),
                VcpuSlot::Running(_) => return Err(VmmError::WrongState(RunState::Running)),
            }
        }
        Ok(VmmState {
            config: self.config.clone(),
            layout: self.layout.clone(),
            vm: self.vm.save_devices()?,
            vcpus,
            devices: self.devices.state(),
        })
    }

    /// Replaces the paused VM with a new KVM VM built from `state` over the same guest memory:
    /// in-kernel devices, vCPUs and devices all come from the captured structs. The VM stays
    /// paused; [`Vmm::resume`] continues the guest.
    pub fn rebuild_from(&mut self, state: &VmmState) -> Result<(), VmmError> {
        if self.state != RunState::Paused {
            return Err(VmmError::WrongState(self.state));
        }
        let (vm, devices, vcpus) = build_from_state(
            Vm::with_memory(self.vm.memory().clone())?,
            state,
            &self.events,
            &self.cpuid,
        )?;
        // The new host side resets the restored connections: host clients reconnect, as after
        // a restore from a file.
        if let Some(v) = self.vsock_host.take() {
            v.stop()?;
        }
        let vsock_host = start_vsock_host(&state.config, &devices)?;
        if let Some(v) = &vsock_host {
            v.pause();
        }
        self.vsock_host = vsock_host;
        // The old vCPUs close before the old VM.
        self.vcpus = vcpus;
        self.devices = devices;
        self.vm = vm;
        self.config = state.config.clone();
        self.layout = state.layout.clone();
        Ok(())
    }

    /// Guest RAM in MiB.
    pub fn mem_mib(&self) -> u64 {
        self.layout.memory.total_bytes() / MIB
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use config::Console;

    fn config(mem_mib: u64) -> VmConfig {
        VmConfig {
            kernel: "/nonexistent/vmlinuz".into(),
            initrd: None,
            cmdline: config::DEFAULT_CMDLINE.into(),
            virtio_mmio_cmdline: false,
            vcpus: 1,
            mem_mib,
            drives: vec![],
            vsock: None,
            balloon: false,
            console: Console::Off,
        }
    }

    fn build_error(mem_mib: u64) -> VmmError {
        match Vmm::build(config(mem_mib)) {
            Ok(_) => panic!("a VM with a missing kernel was built"),
            Err(e) => e,
        }
    }

    #[test]
    fn a_crashed_guest_is_not_a_clean_end() {
        let quiet = ConsoleTail::default();
        quiet.push(b"[ 5.0] reboot: Restarting system\n");
        let panicked = ConsoleTail::default();
        panicked.push(b"[ 9.1] Kernel panic - not syncing: Attempted to kill init!\n[ 9.2] end\n");

        let triple = ExitReason::TripleFault { vcpu: 1 };
        assert!(!triple.is_clean());
        assert_eq!(triple.kind(), "triple_fault");
        assert!(triple.to_string().contains("crashed"), "{triple}");
        assert_eq!(triple.clone().with_console(&quiet), triple);
        assert!(!ExitReason::Failed("KVM_RUN: EFAULT".into()).is_clean());

        // A reboot is a clean end, unless the console shows it followed a kernel panic.
        assert!(ExitReason::Reset.with_console(&quiet).is_clean());
        for end in [ExitReason::Reset, triple] {
            let judged = end.with_console(&panicked);
            assert!(!judged.is_clean(), "{judged}");
            assert_eq!(judged.kind(), "guest_panic");
            assert!(
                judged.to_string().contains("Attempted to kill init"),
                "{judged}"
            );
        }
        for clean in [
            ExitReason::PowerOff,
            ExitReason::Requested,
            ExitReason::Checkpointed("/c".into()),
        ] {
            assert!(clean.is_clean(), "{clean}");
            assert_eq!(clean.clone().with_console(&panicked), clean);
        }
    }

    #[test]
    fn memory_larger_than_the_host_is_refused_before_anything_is_built() {
        let host_mib = host_mem_mib().expect("MemTotal in /proc/meminfo");
        assert!(host_mib > 0);
        for want in [host_mib + 1, 2 * host_mib, u64::MAX] {
            let e = build_error(want);
            match &e {
                VmmError::HostMemory {
                    want_mib,
                    host_mib: seen,
                } => {
                    assert_eq!((*want_mib, *seen), (want, host_mib));
                }
                other => panic!("{want} MiB: {other} instead of HostMemory"),
            }
            let message = e.to_string();
            assert!(
                message.contains(&format!("{want} MiB"))
                    && message.contains(&format!("{host_mib} MiB of RAM")),
                "{message}"
            );
        }
        // Up to the host's size the memory check passes and the build fails later (here: on
        // the missing kernel, or earlier on a machine without KVM), never on HostMemory.
        for want in [256, host_mib] {
            let e = build_error(want);
            assert!(
                !matches!(e, VmmError::HostMemory { .. }),
                "{want} MiB refused: {e}"
            );
        }
    }
}
