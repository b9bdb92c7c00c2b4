//! The virtio-mmio transport (virtio 1.2, section 4.2, version 2 register layout): the register
//! model a driver programs, the device status state machine, feature negotiation, queue setup,
//! and interrupt status and acknowledge with an [`Interrupt`] line (an eventfd for KVM's irqfd).
//!
//! The driver is the guest and never trusted: writes out of order (queue setup before
//! FEATURES_OK, features after it, a status that drops bits) are ignored, FEATURES_OK is refused
//! for features the device did not offer, and queues are used only after DRIVER_OK with a valid
//! layout in guest memory.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config as status;
use virtio_bindings::virtio_mmio as regs;
use virtio_queue::{Queue, QueueState, QueueT};

use super::{VIRTIO_F_VERSION_1, VirtioDevice};
use crate::kvm::memory::GuestMemory;

/// Size of the register window of one device (registers plus configuration space).
pub const MMIO_WINDOW: u64 = 0x1000;

/// `INTERRUPT_STATUS` bit: the device used buffers.
pub const INT_USED_RING: u32 = regs::VIRTIO_MMIO_INT_VRING;
/// `INTERRUPT_STATUS` bit: the configuration changed.
pub const INT_CONFIG: u32 = regs::VIRTIO_MMIO_INT_CONFIG;
const MAGIC: u32 = 0x7472_6976;
const VENDOR: u32 = 0x0044_4954; // "TID\0": ditto

/// An interrupt line the transport raises (an eventfd registered as a KVM irqfd in the VMM).
pub trait Interrupt: Send {
    /// Raises the interrupt.
    fn trigger(&self) -> std::io::Result<()>;
}

impl Interrupt for vmm_sys_util::eventfd::EventFd {
    fn trigger(&self) -> std::io::Result<()> {
        self.write(1)
    }
}

/// The serialisable registers of one queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegs {
    /// Maximum size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// Whether the driver set the queue ready.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Next available index the device will read.
    pub next_avail: u16,
    /// Next used index the device will write.
    pub next_used: u16,
    /// Whether VIRTIO_F_RING_EVENT_IDX is on.
    pub event_idx: bool,
}

impl From<QueueState> for QueueRegs {
    fn from(s: QueueState) -> Self {
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }
}

impl From<QueueRegs> for QueueState {
    fn from(r: QueueRegs) -> Self {
        Self {
            max_size: r.max_size,
            size: r.size,
            ready: r.ready,
            desc_table: r.desc_table,
            avail_ring: r.avail_ring,
            used_ring: r.used_ring,
            next_avail: r.next_avail,
            next_used: r.next_used,
            event_idx_enabled: r.event_idx,
        }
    }
}

/// The serialisable state of the transport (the device's own state is captured by the device).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// Device status register.
    pub status: u32,
    /// `DEVICE_FEATURES_SEL`.
    pub device_features_sel: u32,
    /// `DRIVER_FEATURES_SEL`.
    pub driver_features_sel: u32,
    /// Features the driver wrote.
    pub acked_features: u64,
    /// `QUEUE_SEL`.
    pub queue_sel: u32,
    /// Pending interrupt causes.
    pub interrupt_status: u32,
    /// Configuration generation.
    pub config_generation: u32,
    /// Queue registers.
    pub queues: Vec<QueueRegs>,
}

/// What can go wrong when building a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// A queue size the device offers is not a power of two up to 32768, or a restored queue is
    /// inconsistent.
    #[error("invalid queue: {0}")]
    Queue(virtio_queue::Error),
    /// Restored state does not match the device (queue count).
    #[error("transport state has {got} queues, the device has {want}")]
    QueueCount {
        /// Queues in the state.
        got: usize,
        /// Queues of the device.
        want: usize,
    },
}

/// A virtio device behind the virtio-mmio register window.
pub struct MmioTransport<D> {
    device: D,
    mem: GuestMemory,
    interrupt: Box<dyn Interrupt>,
    queues: Vec<Queue>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
}

impl<D: VirtioDevice + std::fmt::Debug> std::fmt::Debug for MmioTransport<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device", &self.device)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

fn set_half(value: &mut u64, high: bool, half: u32) {
    *value = if high {
        (*value & 0xffff_ffff) | (u64::from(half) << 32)
    } else {
        (*value & !0xffff_ffff) | u64::from(half)
    };
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Puts `device` behind a fresh transport.
    pub fn new(
        device: D,
        mem: GuestMemory,
        interrupt: Box<dyn Interrupt>,
    ) -> Result<Self, MmioError> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max))
            .collect::<Result<Vec<_>, _>>()
            .map_err(MmioError::Queue)?;
        Ok(Self {
            device,
            mem,
            interrupt,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
        })
    }

    /// Rebuilds a transport from captured state around an already restored device.
    pub fn restore(
        device: D,
        mem: GuestMemory,
        interrupt: Box<dyn Interrupt>,
        state: &MmioState,
    ) -> Result<Self, MmioError> {
        let want = device.queue_max_sizes().len();
        if state.queues.len() != want {
            return Err(MmioError::QueueCount {
                got: state.queues.len(),
                want,
            });
        }
        let queues = state
            .queues
            .iter()
            .map(|&r| Queue::try_from(QueueState::from(r)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(MmioError::Queue)?;
        let mut transport = Self::new(device, mem, interrupt)?;
        transport.queues = queues;
        transport.status = state.status;
        transport.device_features_sel = state.device_features_sel;
        transport.driver_features_sel = state.driver_features_sel;
        transport.acked_features = state.acked_features;
        transport.queue_sel = state.queue_sel;
        transport.interrupt_status = state.interrupt_status;
        transport.config_generation = state.config_generation;
        Ok(transport)
    }

    /// The serialisable transport state.
    pub fn state(&self) -> MmioState {
        MmioState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self
                .queues
                .iter()
                .map(|q| QueueRegs::from(q.state()))
                .collect(),
        }
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Whether the driver finished initialisation and the device is running.
    pub fn is_active(&self) -> bool {
        self.status & status::VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.status & (status::VIRTIO_CONFIG_S_FAILED | status::VIRTIO_CONFIG_S_NEEDS_RESET)
                == 0
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(usize::try_from(self.queue_sel).ok()?)
    }

    fn selected_queue_mut(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(usize::try_from(self.queue_sel).ok()?)
    }

    /// A driver read of `data.len()` bytes at `offset` in the window. Registers are read as
    /// aligned 32-bit words; anything else reads as zeros.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let config = u64::from(regs::VIRTIO_MMIO_CONFIG);
        if offset >= config {
            self.device.read_config(offset - config, data);
            return;
        }
        data.fill(0);
        let Ok(offset) = u32::try_from(offset) else {
            return;
        };
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return;
        }
        let value = match offset {
            regs::VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            regs::VIRTIO_MMIO_VERSION => 2,
            regs::VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            regs::VIRTIO_MMIO_VENDOR_ID => VENDOR,
            regs::VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            regs::VIRTIO_MMIO_QUEUE_NUM_MAX => {
                self.selected_queue().map_or(0, |q| u32::from(q.max_size()))
            }
            regs::VIRTIO_MMIO_QUEUE_READY => {
                self.selected_queue().map_or(0, |q| u32::from(q.ready()))
            }
            regs::VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            regs::VIRTIO_MMIO_STATUS => self.status,
            regs::VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// A driver write of `data` at `offset` in the window. Registers take aligned 32-bit words;
    /// other writes, and writes out of order for the status, are ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let config = u64::from(regs::VIRTIO_MMIO_CONFIG);
        if offset >= config {
            if self.status & status::VIRTIO_CONFIG_S_DRIVER != 0 {
                self.device.write_config(offset - config, data);
            }
            return;
        }
        let Ok(offset) = u32::try_from(offset) else {
            return;
        };
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        let value = u32::from_le_bytes(bytes);
        let s = self.status;
        let features_phase =
            s & status::VIRTIO_CONFIG_S_DRIVER != 0 && s & status::VIRTIO_CONFIG_S_FEATURES_OK == 0;
        let queue_phase = s & status::VIRTIO_CONFIG_S_FEATURES_OK != 0
            && s & status::VIRTIO_CONFIG_S_DRIVER_OK == 0;
        match offset {
            regs::VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            regs::VIRTIO_MMIO_DRIVER_FEATURES if features_phase => match self.driver_features_sel {
                0 => set_half(&mut self.acked_features, false, value),
                1 => set_half(&mut self.acked_features, true, value),
                _ => {}
            },
            regs::VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            regs::VIRTIO_MMIO_QUEUE_NUM if queue_phase => {
                // A size that does not fit 16 bits is invalid, not truncated into a valid one.
                if let (Ok(size), Some(q)) = (u16::try_from(value), self.selected_queue_mut()) {
                    q.set_size(size);
                }
            }
            regs::VIRTIO_MMIO_QUEUE_READY if queue_phase => {
                if let Some(q) = self.selected_queue_mut() {
                    q.set_ready(value == 1);
                }
            }
            regs::VIRTIO_MMIO_QUEUE_DESC_LOW
            | regs::VIRTIO_MMIO_QUEUE_DESC_HIGH
            | regs::VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | regs::VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | regs::VIRTIO_MMIO_QUEUE_USED_LOW
            | regs::VIRTIO_MMIO_QUEUE_USED_HIGH
                if queue_phase =>
            {
                self.set_queue_address(offset, value);
            }
            regs::VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(value),
            regs::VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !value,
            regs::VIRTIO_MMIO_STATUS => self.set_status(value),
            _ => {}
        }
    }

    fn set_queue_address(&mut self, offset: u32, value: u32) {
        let Some(q) = self.selected_queue_mut() else {
            return;
        };
        if q.ready() {
            return;
        }
        let (low, high) = if offset.is_multiple_of(8) {
            (Some(value), None)
        } else {
            (None, Some(value))
        };
        match offset & !7 {
            regs::VIRTIO_MMIO_QUEUE_DESC_LOW => q.set_desc_table_address(low, high),
            regs::VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.set_avail_ring_address(low, high),
            _ => q.set_used_ring_address(low, high),
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver may only add bits (or set FAILED).
        if value & self.status != self.status {
            return;
        }
        let added = value & !self.status;
        if added & status::VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device.avail_features();
            let acceptable = self.acked_features & !offered == 0
                && self.acked_features & VIRTIO_F_VERSION_1 != 0
                && self.status & status::VIRTIO_CONFIG_S_DRIVER != 0;
            if !acceptable {
                // Refused: the driver reads the status back and sees FEATURES_OK missing.
                self.status = value & !status::VIRTIO_CONFIG_S_FEATURES_OK;
                return;
            }
        }
        if added & status::VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            let ready_ok = value & status::VIRTIO_CONFIG_S_FEATURES_OK != 0
                && self
                    .queues
                    .iter()
                    .all(|q| !q.ready() || q.is_valid(&self.mem));
            if !ready_ok {
                self.status = value & !status::VIRTIO_CONFIG_S_DRIVER_OK
                    | status::VIRTIO_CONFIG_S_NEEDS_RESET;
                return;
            }
            self.device.activate(self.acked_features);
        }
        self.status = value;
    }

    fn reset(&mut self) {
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.device.reset();
    }

    /// The driver notified queue `index`: process it and raise the interrupt when the device
    /// used buffers. Ignored before DRIVER_OK and for queues that are not ready.
    pub fn notify(&mut self, index: u32) {
        if !self.is_active() {
            return;
        }
        let Ok(i) = usize::try_from(index) else {
            return;
        };
        let Some(queue) = self.queues.get_mut(i) else {
            return;
        };
        if !queue.ready() {
            return;
        }
        if self.device.process_queue(i, queue, &self.mem) {
            self.raise(INT_USED_RING);
        }
    }

    /// Tells the driver the device changed its configuration space: a new configuration
    /// generation, and the configuration-change interrupt.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.raise(INT_CONFIG);
    }

    /// Sets interrupt causes and triggers the interrupt line.
    pub fn raise(&mut self, cause: u32) {
        self.interrupt_status |= cause;
        // A failed eventfd write (counter overflow) still leaves an interrupt pending.
        let _ = self.interrupt.trigger();
    }
}
