//! The devices of one VM, wired up: the serial console, the power device and the keyboard
//! controller's reset line on the port I/O bus, one virtio-mmio slot per drive, then one for
//! vsock and one for the balloon on the MMIO bus, each interrupt an eventfd registered as a KVM
//! irqfd. The whole set is
//! captured into and rebuilt from a plain serialisable [`DevicesState`].

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::config::{Console, VmConfig};
use crate::boot::layout::{Layout, MmioSlot};
use crate::devices::bus::{BusError, Buses};
use crate::devices::legacy::console_tail::{ConsoleTail, TailWriter};
use crate::devices::legacy::i8042::{self, KeyboardControllerReset};
use crate::devices::legacy::power::{self, OnPowerEvent, PowerDevice};
use crate::devices::legacy::serial::{self, SerialConsole, SerialConsoleState};
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::balloon::{Balloon, BalloonError, BalloonState};
use crate::devices::virtio::block::{Block, BlockError, BlockState};
use crate::devices::virtio::mmio::{MmioError, MmioState, MmioTransport};
use crate::devices::virtio::vsock::device::{Vsock, VsockState};
use crate::devices::virtio::vsock::muxer::{Muxer, MuxerConfig};
use crate::kvm::memory::GuestMemory;
use crate::kvm::vm::Vm;

/// Receive buffer each vsock connection announces to the guest.
const VSOCK_BUF_ALLOC: u32 = 256 * 1024;
/// Most simultaneous vsock connections.
const VSOCK_MAX_CONNECTIONS: usize = 1024;

/// Why the devices cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    /// A disk cannot be opened.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// The balloon's state cannot be restored.
    #[error(transparent)]
    Balloon(#[from] BalloonError),
    /// A transport cannot be built or restored.
    #[error(transparent)]
    Mmio(#[from] MmioError),
    /// The bus layout is inconsistent.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The console file cannot be opened.
    #[error("cannot open console file {path}: {source}")]
    Console {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// An eventfd or irqfd cannot be made.
    #[error("cannot set up interrupt line {gsi}: {source}")]
    Irq {
        /// The interrupt line.
        gsi: u32,
        /// The error.
        source: std::io::Error,
    },
    /// The serial console state cannot be restored.
    #[error("cannot restore the serial console: {0:?}")]
    Serial(String),
    /// The captured state does not match the configuration.
    #[error("device state does not match the VM configuration: {0}")]
    Mismatch(&'static str),
    /// More devices than the layout has slots.
    #[error("no virtio-mmio slot left for device {0}")]
    NoSlot(usize),
}

/// A virtio device behind its transport, shared between the bus and the VMM.
pub type Shared<D> = Arc<Mutex<MmioTransport<D>>>;

/// The serialisable state of all devices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    /// The serial console's registers.
    pub serial: SerialConsoleState,
    /// Each drive: device and transport.
    pub blocks: Vec<(BlockState, MmioState)>,
    /// The vsock device and its transport, if configured.
    pub vsock: Option<(VsockState, MmioState)>,
    /// The balloon and its transport, if configured (absent in states from before it).
    #[serde(default)]
    pub balloon: Option<(BalloonState, MmioState)>,
}

/// The live devices of one VM.
pub struct Devices {
    /// The serial console.
    pub serial: Arc<Mutex<SerialConsole>>,
    /// The last lines the guest wrote to the serial console.
    pub console_tail: ConsoleTail,
    /// The drives, in configuration order.
    pub blocks: Vec<Shared<Block>>,
    /// The vsock device.
    pub vsock: Option<Shared<Vsock>>,
    /// The balloon (free-page hints).
    pub balloon: Option<Shared<Balloon>>,
    /// The buses the vCPUs' exits go to.
    pub buses: Arc<Buses>,
}

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devices")
            .field("blocks", &self.blocks.len())
            .field("vsock", &self.vsock.is_some())
            .field("balloon", &self.balloon.is_some())
            .finish_non_exhaustive()
    }
}

/// An eventfd raising `gsi` through KVM; the returned half goes to the device.
fn irq_line(vm: &Vm, gsi: u32) -> Result<Box<EventFd>, DevicesError> {
    let err = |source| DevicesError::Irq { gsi, source };
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(err)?;
    vm.fd()
        .register_irqfd(&evt, gsi)
        .map_err(|e| err(std::io::Error::from_raw_os_error(e.errno())))?;
    Ok(Box::new(evt))
}

fn console_writer(console: &Console) -> Result<Box<dyn Write + Send>, DevicesError> {
    Ok(match console {
        Console::Stdout => Box::new(std::io::stdout()),
        Console::Off => Box::new(std::io::sink()),
        Console::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| DevicesError::Console {
                    path: path.clone(),
                    source,
                })?,
        ),
    })
}

/// Puts a virtio device behind a transport in `slot` on the MMIO bus.
fn attach<D: VirtioDevice + Send + 'static>(
    vm: &Vm,
    buses: &mut Buses,
    slot: MmioSlot,
    device: D,
    state: Option<&MmioState>,
) -> Result<Shared<D>, DevicesError> {
    let irq = irq_line(vm, slot.irq)?;
    let mem: GuestMemory = vm.memory().clone();
    let transport = match state {
        Some(s) => MmioTransport::restore(device, mem, irq, s)?,
        None => MmioTransport::new(device, mem, irq)?,
    };
    let shared = Arc::new(Mutex::new(transport));
    buses.mmio.insert(slot.base, slot.len, shared.clone())?;
    Ok(shared)
}

impl Devices {
    /// Builds the devices of `config` into `vm` — fresh, or from `state` when restoring — with
    /// `on_power` called when the guest powers off or resets.
    pub fn build(
        vm: &Vm,
        config: &VmConfig,
        layout: &Layout,
        state: Option<&DevicesState>,
        on_power: OnPowerEvent,
    ) -> Result<Self, DevicesError> {
        let mut buses = Buses::default();
        let console_tail = ConsoleTail::default();
        let out: Box<dyn Write + Send> = Box::new(TailWriter::new(
            console_writer(&config.console)?,
            console_tail.clone(),
        ));
        let serial_irq = irq_line(vm, serial::COM1_IRQ)?;
        let serial = match state {
            Some(s) => SerialConsole::restore(&s.serial, serial_irq, out)
                .map_err(|e| DevicesError::Serial(format!("{e:?}")))?,
            None => SerialConsole::new(serial_irq, out),
        };
        let serial = Arc::new(Mutex::new(serial));
        buses
            .pio
            .insert(serial::COM1_PORT, serial::PORT_COUNT, serial.clone())?;
        buses.pio.insert(
            u64::from(power::SLEEP_CONTROL_PORT),
            power::PORT_COUNT,
            Arc::new(Mutex::new(PowerDevice::new(on_power.clone()))),
        )?;
        buses.pio.insert(
            u64::from(i8042::COMMAND_PORT),
            i8042::PORT_COUNT,
            Arc::new(Mutex::new(KeyboardControllerReset::new(on_power))),
        )?;

        if let Some(s) = state
            && (s.blocks.len() != config.drives.len()
                || s.vsock.is_some() != config.vsock.is_some()
                || s.balloon.is_some() != config.balloon)
        {
            return Err(DevicesError::Mismatch("device count"));
        }
        let mut slots = layout.devices.iter().copied();
        let mut next_slot = || {
            slots
                .next()
                .ok_or(DevicesError::NoSlot(layout.devices.len()))
        };
        let mut blocks = Vec::with_capacity(config.drives.len());
        for (i, drive) in config.drives.iter().enumerate() {
            let slot = next_slot()?;
            let saved = state.map(|s| &s.blocks[i]);
            let block = match saved {
                Some((b, _)) if b.config != *drive => {
                    return Err(DevicesError::Mismatch("drive configuration"));
                }
                Some((b, _)) => Block::restore(b)?,
                None => Block::open(drive.clone())?,
            };
            blocks.push(attach(vm, &mut buses, slot, block, saved.map(|(_, m)| m))?);
        }
        let vsock = match &config.vsock {
            Some(v) => {
                let slot = next_slot()?;
                let saved = state.and_then(|s| s.vsock.as_ref());
                let device = match saved {
                    Some((d, _)) => Vsock::restore(d.clone()),
                    None => Vsock::new(Muxer::new(MuxerConfig {
                        guest_cid: v.cid,
                        buf_alloc: VSOCK_BUF_ALLOC,
                        max_connections: VSOCK_MAX_CONNECTIONS,
                    })),
                };
                Some(attach(vm, &mut buses, slot, device, saved.map(|(_, m)| m))?)
            }
            None => None,
        };
        let balloon = if config.balloon {
            let slot = next_slot()?;
            let saved = state.and_then(|s| s.balloon.as_ref());
            let device = match saved {
                Some((b, _)) => Balloon::restore(b)?,
                None => Balloon::new(),
            };
            Some(attach(vm, &mut buses, slot, device, saved.map(|(_, m)| m))?)
        } else {
            None
        };
        Ok(Self {
            serial,
            console_tail,
            blocks,
            vsock,
            balloon,
            buses: Arc::new(buses),
        })
    }

    /// What restored devices tell the guest once its vCPUs exist with their restored interrupt
    /// state: the balloon ends a hinting round the checkpoint caught, so the guest takes its
    /// hinted blocks back.
    pub fn resume_after_restore(&self) {
        if let Some(b) = &self.balloon {
            b.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .resume_after_restore();
        }
    }

    /// Captures every device. The vCPUs and the device threads must be paused.
    pub fn state(&self) -> DevicesState {
        fn capture<D: VirtioDevice, S>(
            shared: &Shared<D>,
            device_state: impl Fn(&D) -> S,
        ) -> (S, MmioState) {
            let t = shared
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            (device_state(t.device()), t.state())
        }
        DevicesState {
            serial: self
                .serial
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .state(),
            blocks: self
                .blocks
                .iter()
                .map(|b| capture(b, Block::state))
                .collect(),
            vsock: self.vsock.as_ref().map(|v| capture(v, Vsock::state)),
            balloon: self.balloon.as_ref().map(|b| capture(b, Balloon::state)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_states_from_before_the_balloon_read_as_without_one() {
        let serial = SerialConsole::new(
            Box::new(EventFd::new(0).expect("eventfd")),
            Box::new(std::io::sink()),
        );
        let state = DevicesState {
            serial: serial.state(),
            blocks: vec![],
            vsock: None,
            balloon: Some((BalloonState::default(), MmioState::default())),
        };
        let mut json = serde_json::to_value(&state).expect("json");
        let back: DevicesState = serde_json::from_value(json.clone()).expect("state");
        assert_eq!(back, state);
        json.as_object_mut().expect("object").remove("balloon");
        let old: DevicesState = serde_json::from_value(json).expect("old state");
        assert_eq!(old.balloon, None);
    }
}
