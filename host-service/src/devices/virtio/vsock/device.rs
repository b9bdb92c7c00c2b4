//! The virtio-vsock device model: the guest's transmit queue feeds the [`Muxer`], the receive
//! queue is filled from it. The host side (Unix sockets, the hybrid handshake) talks to the
//! muxer's connections and learns about accepted and closed connections from
//! [`Vsock::take_events`]. An optional waker ([`Vsock::set_waker`]) tells the host side's event
//! loop when processing a queue (on a vCPU thread) left something for it to do.
//!
//! Each descriptor chain is checked like any guest input: transmit chains must be
//! device-readable, inside guest memory and at most one header plus [`MAX_PAYLOAD`] bytes;
//! receive chains device-writable, inside guest memory and large enough for a header. A bad
//! chain is returned unused (length 0) and only that packet is lost. Writes into receive buffers
//! go through guest memory and so are marked in the VMM's dirty bitmap.

use serde::{Deserialize, Serialize};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::muxer::{ConnKey, MuxEvent, Muxer, MuxerState};
use super::packet::{HEADER_BYTES, MAX_PAYLOAD};
use crate::devices::virtio::{VIRTIO_F_VERSION_1, VirtioDevice, read_config_space};
use crate::kvm::memory::GuestMemory;

/// The virtio device id of a socket device.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Index of the receive queue (device to guest).
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue (guest to device).
pub const TX_QUEUE: usize = 1;
/// Index of the event queue.
pub const EVENT_QUEUE: usize = 2;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most descriptors one packet may span.
const MAX_DESCRIPTORS: usize = 64;

/// A bad descriptor chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A descriptor has the wrong direction.
    #[error("descriptor with the wrong direction")]
    Direction,
    /// A descriptor lies outside guest memory.
    #[error("descriptor outside guest memory")]
    OutsideMemory,
    /// The chain is too long, loops or has too many bytes.
    #[error("descriptor chain too long")]
    TooLong,
    /// The chain cannot hold a packet header.
    #[error("descriptor chain shorter than a packet header")]
    TooShort,
}

/// What happened to the host side's connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VsockEvent {
    /// The guest connected to a listening host port.
    Accepted(ConnKey),
    /// The guest accepted a host-initiated connection.
    Connected(ConnKey),
    /// A connection finished or was reset.
    Closed(ConnKey),
}

/// The device's serialisable state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The connection table.
    pub muxer: MuxerState,
    /// Features the driver acknowledged.
    pub acked_features: u64,
}

/// A virtio-vsock device.
#[derive(Debug)]
pub struct Vsock {
    muxer: Muxer,
    acked_features: u64,
    events: Vec<VsockEvent>,
    queue_sizes: [u16; 3],
    waker: Option<EventFd>,
}

/// Checks a chain's descriptors: all of one direction, inside guest memory, bounded in number
/// and bytes. Returns the buffers and their total length.
fn buffers(
    mem: &GuestMemory,
    descs: impl IntoIterator<Item = Descriptor>,
    writable: bool,
    max_bytes: u64,
) -> Result<(Vec<(GuestAddress, usize)>, u64), ChainError> {
    let mut out = Vec::new();
    let mut total = 0u64;
    let mut last_has_next = false;
    for d in descs.into_iter().take(MAX_DESCRIPTORS + 1) {
        if out.len() >= MAX_DESCRIPTORS {
            return Err(ChainError::TooLong);
        }
        if d.is_write_only() != writable {
            return Err(ChainError::Direction);
        }
        let len = d.len() as usize;
        if len > 0 && !GuestMemoryBackend::check_range(mem, d.addr(), len) {
            return Err(ChainError::OutsideMemory);
        }
        total += u64::from(d.len());
        if total > max_bytes {
            return Err(ChainError::TooLong);
        }
        last_has_next = d.has_next();
        out.push((d.addr(), len));
    }
    // The chain iterator stops early on loops and bad indices, leaving a "next" behind.
    if last_has_next {
        return Err(ChainError::TooLong);
    }
    Ok((out, total))
}

impl Vsock {
    /// A device with an empty connection table.
    pub fn new(muxer: Muxer) -> Self {
        Self {
            muxer,
            acked_features: 0,
            events: Vec::new(),
            queue_sizes: [QUEUE_SIZE; 3],
            waker: None,
        }
    }

    /// Rebuilds a device from captured state.
    pub fn restore(state: VsockState) -> Self {
        let mut dev = Self::new(Muxer::restore(state.muxer));
        dev.acked_features = state.acked_features;
        dev
    }

    /// Captures the device state.
    pub fn state(&self) -> VsockState {
        VsockState {
            muxer: self.muxer.state(),
            acked_features: self.acked_features,
        }
    }

    /// The connection table (the host side sends, receives and closes through it).
    pub fn muxer(&mut self) -> &mut Muxer {
        &mut self.muxer
    }

    /// Whether packets wait for the guest's receive queue (the event loop should then process
    /// [`RX_QUEUE`]).
    pub fn rx_pending(&self) -> bool {
        self.muxer.has_packet()
    }

    /// Sets the eventfd the device writes when the host side has work: the guest's transmit
    /// queue was processed (data, credit or control packets arrived) or connection events wait
    /// in [`take_events`](Vsock::take_events). The host side's event loop reads it.
    pub fn set_waker(&mut self, waker: EventFd) {
        self.waker = Some(waker);
    }

    fn wake(&self) {
        if let Some(waker) = &self.waker {
            // A failed write means the counter is saturated: the loop is woken anyway.
            let _ = waker.write(1);
        }
    }

    /// Takes the connection events since the last call.
    pub fn take_events(&mut self) -> Vec<VsockEvent> {
        std::mem::take(&mut self.events)
    }

    /// Handles one transmit chain: reads the packet and gives it to the muxer.
    pub fn process_tx_descriptors(
        &mut self,
        mem: &GuestMemory,
        descs: impl IntoIterator<Item = Descriptor>,
    ) -> Result<(), ChainError> {
        let max = (HEADER_BYTES as u64) + u64::from(MAX_PAYLOAD);
        let (bufs, total) = buffers(mem, descs, false, max)?;
        if total < HEADER_BYTES as u64 {
            return Err(ChainError::TooShort);
        }
        let mut bytes = vec![0u8; total as usize];
        let mut at = 0;
        for (addr, len) in bufs {
            mem.read_slice(&mut bytes[at..at + len], addr)
                .map_err(|_| ChainError::OutsideMemory)?;
            at += len;
        }
        let (header, rest) = bytes.split_at(HEADER_BYTES);
        // The header's length field decides how much of the rest is payload; a mismatch is
        // refused by the muxer.
        let announced = u32::from_le_bytes([header[24], header[25], header[26], header[27]]);
        let payload = &rest[..rest.len().min(announced as usize)];
        match self.muxer.on_guest_packet(header, payload) {
            Ok(MuxEvent::Accepted(key)) => self.events.push(VsockEvent::Accepted(key)),
            Ok(MuxEvent::Connected(key)) => self.events.push(VsockEvent::Connected(key)),
            Ok(MuxEvent::Closed(key)) => self.events.push(VsockEvent::Closed(key)),
            // Malformed packets are dropped; the muxer already reset what needed resetting.
            Ok(MuxEvent::None) | Err(_) => {}
        }
        Ok(())
    }

    /// Fills one receive chain with the next packet; returns the bytes written, or `None` when
    /// no packet is waiting (the chain stays unused).
    pub fn fill_rx_descriptors(
        &mut self,
        mem: &GuestMemory,
        descs: impl IntoIterator<Item = Descriptor>,
    ) -> Result<Option<u32>, ChainError> {
        let (bufs, total) = buffers(mem, descs, true, u64::from(u32::MAX))?;
        if total < HEADER_BYTES as u64 {
            return Err(ChainError::TooShort);
        }
        let room = u32::try_from(total - HEADER_BYTES as u64)
            .unwrap_or(u32::MAX)
            .min(MAX_PAYLOAD);
        let mut closed = Vec::new();
        let packet = self.muxer.next_packet(room, &mut closed);
        self.events
            .extend(closed.into_iter().map(VsockEvent::Closed));
        let Some(packet) = packet else {
            return Ok(None);
        };
        let mut bytes = packet.header.to_bytes().to_vec();
        bytes.extend_from_slice(&packet.payload);
        let mut at = 0;
        for (addr, len) in bufs {
            if at == bytes.len() {
                break;
            }
            let n = len.min(bytes.len() - at);
            mem.write_slice(&bytes[at..at + n], addr)
                .map_err(|_| ChainError::OutsideMemory)?;
            at += n;
        }
        Ok(Some(bytes.len() as u32))
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // guest_cid (le64) is the whole configuration space.
        read_config_space(&self.muxer.guest_cid().to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, acked_features: u64) {
        self.acked_features = acked_features;
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemory) -> bool {
        if !queue.is_valid(mem) {
            return false;
        }
        let mut used = false;
        match index {
            TX_QUEUE => {
                while let Some(chain) = queue.pop_descriptor_chain(mem) {
                    let head = chain.head_index();
                    // A bad chain loses only its own packet.
                    let _ = self.process_tx_descriptors(mem, chain);
                    if queue.add_used(mem, head, 0).is_err() {
                        break;
                    }
                    used = true;
                }
            }
            RX_QUEUE => {
                while self.muxer.has_packet() {
                    let Some(chain) = queue.pop_descriptor_chain(mem) else {
                        break;
                    };
                    let head = chain.head_index();
                    let len = match self.fill_rx_descriptors(mem, chain) {
                        Ok(Some(len)) => len,
                        Ok(None) => {
                            queue.go_to_previous_position();
                            break;
                        }
                        Err(_) => 0,
                    };
                    if queue.add_used(mem, head, len).is_err() {
                        break;
                    }
                    used = true;
                }
            }
            _ => {}
        }
        if (index == TX_QUEUE && used) || !self.events.is_empty() {
            self.wake();
        }
        used && queue.needs_notification(mem).unwrap_or(true)
    }

    fn reset(&mut self) {
        self.acked_features = 0;
        // Listening ports are host configuration and survive a reset; connections do not.
        for key in self.muxer.drop_connections() {
            self.events.push(VsockEvent::Closed(key));
        }
        if !self.events.is_empty() {
            self.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::connection::HOST_CID;
    use super::super::muxer::MuxerConfig;
    use super::super::packet::{Header, Op};
    use super::*;
    use crate::kvm::memory::MemoryLayout;

    const GUEST: u64 = 3;
    const W: u16 = 2; // VRING_DESC_F_WRITE
    const N: u16 = 1; // VRING_DESC_F_NEXT

    fn setup() -> (GuestMemory, Vsock) {
        let mem = MemoryLayout::single(1 << 20).create().expect("memory");
        let mut muxer = Muxer::new(MuxerConfig {
            guest_cid: GUEST,
            buf_alloc: 4096,
            max_connections: 4,
        });
        muxer.listen(52);
        (mem, Vsock::new(muxer))
    }

    fn guest_packet(mem: &GuestMemory, op: Op, payload: &[u8]) -> Vec<Descriptor> {
        let h = Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port: 1025,
            dst_port: 52,
            len: payload.len() as u32,
            op,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 0,
        };
        mem.write_slice(&h.to_bytes(), GuestAddress(0x1000))
            .expect("header");
        mem.write_slice(payload, GuestAddress(0x2000))
            .expect("data");
        vec![
            Descriptor::new(0x1000, HEADER_BYTES as u32, N, 1),
            Descriptor::new(0x2000, payload.len() as u32, 0, 0),
        ]
    }

    fn rx(dev: &mut Vsock, mem: &GuestMemory) -> Option<(Header, Vec<u8>)> {
        let descs = vec![
            Descriptor::new(0x8000, 16, W | N, 1),
            Descriptor::new(0x9000, 4096, W, 0),
        ];
        let len = dev.fill_rx_descriptors(mem, descs).expect("chain")?;
        let mut bytes = vec![0u8; len as usize];
        mem.read_slice(&mut bytes[..16], GuestAddress(0x8000))
            .expect("read");
        mem.read_slice(&mut bytes[16..], GuestAddress(0x9000))
            .expect("read");
        let h = Header::parse(&bytes).expect("header");
        Some((h, bytes[HEADER_BYTES..].to_vec()))
    }

    #[test]
    fn connect_exchange_data_over_descriptor_chains() {
        let (mem, mut dev) = setup();
        let descs = guest_packet(&mem, Op::Request, &[]);
        dev.process_tx_descriptors(&mem, descs).expect("tx");
        let key = ConnKey {
            local_port: 52,
            peer_port: 1025,
        };
        assert_eq!(dev.take_events(), [VsockEvent::Accepted(key)]);
        let (h, _) = rx(&mut dev, &mem).expect("response");
        assert_eq!(h.op, Op::Response);
        assert!(rx(&mut dev, &mem).is_none());

        let descs = guest_packet(&mem, Op::Rw, b"ping");
        dev.process_tx_descriptors(&mem, descs).expect("tx");
        let conn = dev.muxer().connection(key).expect("conn");
        assert_eq!(conn.recv(100), b"ping");
        assert_eq!(conn.send(b"pong"), 4);
        assert!(dev.rx_pending());
        let (h, payload) = rx(&mut dev, &mem).expect("data");
        assert_eq!((h.op, h.len, h.fwd_cnt), (Op::Rw, 4, 4));
        assert_eq!(payload, b"pong");
        // The receive buffers were written by the VMM: the dirty bitmap says so.
        let region = mem.iter().next().expect("region");
        let bitmap = vm_memory::MmapRegion::bitmap(region);
        assert!(bitmap.is_bit_set(8) && bitmap.is_bit_set(9));

        assert_eq!(dev.read_config_u64(), GUEST);
        let state = dev.state();
        assert_eq!(Vsock::restore(state.clone()).state(), state);
    }

    #[test]
    fn bad_chains_are_refused() {
        let (mem, mut dev) = setup();
        // Header in a device-writable buffer.
        let wrong = vec![Descriptor::new(0x1000, 44, W, 0)];
        assert_eq!(
            dev.process_tx_descriptors(&mem, wrong),
            Err(ChainError::Direction)
        );
        let outside = vec![Descriptor::new((1 << 20) - 8, 44, 0, 0)];
        assert_eq!(
            dev.process_tx_descriptors(&mem, outside),
            Err(ChainError::OutsideMemory)
        );
        let short = vec![Descriptor::new(0x1000, 20, 0, 0)];
        assert_eq!(
            dev.process_tx_descriptors(&mem, short),
            Err(ChainError::TooShort)
        );
        let huge = vec![Descriptor::new(0, 1 << 19, 0, 0)];
        assert_eq!(
            dev.process_tx_descriptors(&mem, huge),
            Err(ChainError::TooLong)
        );
        let dangling = vec![Descriptor::new(0x1000, 44, N, 7)];
        assert_eq!(
            dev.process_tx_descriptors(&mem, dangling),
            Err(ChainError::TooLong)
        );
        let many = vec![Descriptor::new(0x1000, 1, N, 1); MAX_DESCRIPTORS + 1];
        assert_eq!(
            dev.process_tx_descriptors(&mem, many),
            Err(ChainError::TooLong)
        );
        // A packet for a connection that does not exist is answered with a reset.
        let descs = guest_packet(&mem, Op::Rw, b"x");
        dev.process_tx_descriptors(&mem, descs).expect("tx");
        // Receive chain too small for a header, or read-only: refused, packet kept.
        let small = vec![Descriptor::new(0x8000, 40, W, 0)];
        assert_eq!(
            dev.fill_rx_descriptors(&mem, small),
            Err(ChainError::TooShort)
        );
        let read_only = vec![Descriptor::new(0x8000, 100, 0, 0)];
        assert_eq!(
            dev.fill_rx_descriptors(&mem, read_only),
            Err(ChainError::Direction)
        );
        let (h, _) = rx(&mut dev, &mem).expect("reset");
        assert_eq!(h.op, Op::Rst);
    }

    impl Vsock {
        fn read_config_u64(&self) -> u64 {
            let mut b = [0u8; 8];
            self.read_config(0, &mut b);
            u64::from_le_bytes(b)
        }
    }
}
