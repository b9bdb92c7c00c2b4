//! The virtio-vsock device model: the guest's transmit queue feeds the [`Muxer`], the receive
//! queue is filled from it. The host side (Unix sockets, the hybrid handshake) talks to the
//! muxer's connections and learns about accepted and closed connections from
//! [`Vsock::take_events`]. An optional waker ([`Vsock::set_waker`]) tells the host side's event
//! loop when processing a queue (on a vCPU thread) left something for it to do.
//!
//! Descriptor chains are read and written through virtio-vsock's [`VsockPacket`], which checks
//! them like any guest input: a transmit chain must be device-readable and inside guest memory,
//! with the header in its first descriptor and at most [`MAX_PAYLOAD`] bytes of payload after it
//! (in the same descriptor or the next one); a receive chain device-writable and inside guest
//! memory, with the header's room in its first descriptor and the data's after it or in the next
//! one. A bad chain is returned unused (length 0) and only that packet is lost. Writes into
//! receive buffers go through `VsockPacket`'s slices of guest memory and so are marked in the
//! VMM's dirty bitmap.
//!
//! `VsockPacket` takes the payload from one place only (rust-vmm/vm-virtio#216), but since Linux
//! 6.17 (commit 6693731487a8) the guest sends packets above 32 KiB as a header descriptor
//! followed by one descriptor per page fragment. Transmit chains of such a layout (and any other the spec allows: a header split
//! over descriptors, payload following the header in the first descriptor of a longer chain) are
//! gathered with virtio-queue's [`Reader`] instead, bounded to [`MAX_DESCRIPTORS`] descriptors.
//! Receive chains are always filled by `VsockPacket`: Linux and virtio-drivers give the device
//! receive buffers of a layout it handles, and one it would fill wrongly (more than the header in
//! the first descriptor of a longer chain) is refused.

use std::io::Read;

use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader};
use virtio_vsock::packet::{Error as PacketReadError, PKT_HEADER_SIZE, VsockPacket};
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;

use super::muxer::{ConnKey, MuxEvent, Muxer, MuxerState};
use super::packet::{Header, MAX_PAYLOAD, PacketError};
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
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`: the device lost its connections and the guest must drop
/// its own and read the guest cid again.
pub const EVENT_TRANSPORT_RESET: u32 = 0;
/// Most descriptors a gathered transmit packet may span (Linux uses at most 17: a header and
/// one fragment per page of a 64 KiB payload).
pub const MAX_DESCRIPTORS: usize = 64;

/// A descriptor chain guest memory hands out.
pub type Chain<'m> = DescriptorChain<&'m GuestMemory>;

/// A bad descriptor chain.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// virtio-vsock refused the chain: a descriptor of the wrong direction, outside guest
    /// memory or too short, or a payload above [`MAX_PAYLOAD`].
    #[error("bad vsock descriptor chain: {0}")]
    Packet(#[source] PacketReadError),
    /// The header's fields are refused.
    #[error(transparent)]
    Header(#[from] PacketError),
    /// A gathered transmit chain lies outside guest memory.
    #[error("vsock descriptor chain outside guest memory: {0}")]
    OutsideMemory(#[source] virtio_queue::Error),
    /// A gathered transmit chain has a device-writable descriptor.
    #[error("device-writable descriptor in a vsock transmit chain")]
    Direction,
    /// A gathered transmit chain has more than [`MAX_DESCRIPTORS`] descriptors.
    #[error("vsock transmit chain of more than {MAX_DESCRIPTORS} descriptors")]
    TooLong,
    /// A gathered transmit chain ends before the packet its header announces.
    #[error("vsock transmit chain shorter than its packet")]
    TooShort,
    /// A receive chain whose first descriptor holds more than the header and that goes on:
    /// `VsockPacket` would put the data in the second descriptor, not after the header.
    #[error("vsock receive chain with room after the header and more descriptors")]
    Layout,
    /// Copying from or to a packet's guest memory failed.
    #[error("vsock packet memory: {0}")]
    Memory(#[from] vm_memory::VolatileMemoryError),
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
    /// A transport-reset event waits for a buffer of the guest's event queue.
    #[serde(default)]
    pub transport_reset_pending: bool,
    /// The event was delivered and the guest has not yet kicked its event queue (it does so
    /// once it has handled the event and taken the new cid).
    #[serde(default)]
    pub transport_reset_unacked: bool,
}

/// A virtio-vsock device.
#[derive(Debug)]
pub struct Vsock {
    muxer: Muxer,
    acked_features: u64,
    events: Vec<VsockEvent>,
    queue_sizes: [u16; 3],
    waker: Option<EventFd>,
    transport_reset_pending: bool,
    transport_reset_unacked: bool,
}

/// Whether the chain's first descriptor holds more than a header and the chain goes on: a
/// layout `VsockPacket` reads and writes as if the data started in the second descriptor.
fn data_after_header_and_more(chain: &Chain<'_>) -> bool {
    chain
        .clone()
        .next()
        .is_some_and(|head| head.has_next() && head.len() as usize > PKT_HEADER_SIZE)
}

/// Reads the packet of one transmit chain: its validated header and its payload.
fn read_tx_packet(mem: &GuestMemory, chain: Chain<'_>) -> Result<(Header, Vec<u8>), ChainError> {
    if !data_after_header_and_more(&chain) {
        match VsockPacket::from_tx_virtq_chain(mem, &mut chain.clone(), MAX_PAYLOAD) {
            Ok(pkt) => {
                let header = Header::from_packet(&pkt)?;
                let mut payload = vec![0u8; header.len as usize];
                if let Some(data) = pkt.data_slice() {
                    // virtio-vsock's data slice is exactly the header's length.
                    data.read_slice(&mut payload, 0)?;
                }
                return Ok((header, payload));
            }
            // Layouts it cannot represent; the chain may still be a valid packet.
            Err(
                PacketReadError::DescriptorChainTooShort
                | PacketReadError::DescriptorLengthTooSmall
                | PacketReadError::FragmentedMemory,
            ) => {}
            Err(e) => return Err(ChainError::Packet(e)),
        }
    }
    read_gathered_tx_packet(mem, chain)
}

/// Reads a transmit packet spread over the chain in any layout, with virtio-queue's [`Reader`].
fn read_gathered_tx_packet(
    mem: &GuestMemory,
    chain: Chain<'_>,
) -> Result<(Header, Vec<u8>), ChainError> {
    for (i, desc) in chain.clone().enumerate() {
        if i == MAX_DESCRIPTORS {
            return Err(ChainError::TooLong);
        }
        if desc.is_write_only() {
            return Err(ChainError::Direction);
        }
    }
    let mut reader = Reader::new(mem, chain).map_err(ChainError::OutsideMemory)?;
    let mut raw = [0u8; PKT_HEADER_SIZE];
    reader
        .read_exact(&mut raw)
        .map_err(|_| ChainError::TooShort)?;
    let header = Header::from_bytes(&raw)?;
    let mut payload = vec![0u8; header.len as usize];
    reader
        .read_exact(&mut payload)
        .map_err(|_| ChainError::TooShort)?;
    Ok((header, payload))
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
            transport_reset_pending: false,
            transport_reset_unacked: false,
        }
    }

    /// Rebuilds a device from captured state.
    pub fn restore(state: VsockState) -> Self {
        let mut dev = Self::new(Muxer::restore(state.muxer));
        dev.acked_features = state.acked_features;
        dev.transport_reset_pending = state.transport_reset_pending;
        dev.transport_reset_unacked = state.transport_reset_unacked;
        dev
    }

    /// Captures the device state.
    pub fn state(&self) -> VsockState {
        VsockState {
            muxer: self.muxer.state(),
            acked_features: self.acked_features,
            transport_reset_pending: self.transport_reset_pending,
            transport_reset_unacked: self.transport_reset_unacked,
        }
    }

    /// Makes the device of a restored VM forget the connections it had (their host ends stayed
    /// with the process that was checkpointed), gives the guest `guest_cid` (a restored clone
    /// may get a new one), and queues a transport-reset event: on it the guest's driver resets
    /// every connected socket and reads the cid again, while listening sockets stay. The event
    /// goes out when [`EVENT_QUEUE`] is processed and the guest has a buffer there (Linux keeps
    /// its event queue filled); notify that queue once the device is in place.
    ///
    /// Until the guest has handled the event, nothing goes to its receive queue: a host
    /// connection request it read first would be answered from the old cid and lost. Linux
    /// kicks the event queue when it has handled events and refilled the buffer; that kick
    /// releases the receive queue.
    pub fn reset_transport(&mut self, guest_cid: u64) {
        for key in self.muxer.drop_connections() {
            self.events.push(VsockEvent::Closed(key));
        }
        self.muxer.set_guest_cid(guest_cid);
        self.transport_reset_pending = true;
    }

    /// Whether a transport-reset event still waits for the guest's event queue.
    pub fn transport_reset_pending(&self) -> bool {
        self.transport_reset_pending
    }

    /// Whether the receive queue is held until the guest has handled a transport reset.
    fn rx_held(&self) -> bool {
        self.transport_reset_pending || self.transport_reset_unacked
    }

    /// Writes the pending transport-reset event into the next event-queue buffer; returns
    /// whether a buffer was used. A buffer too small or not device-writable is returned unused
    /// and the event waits for the next one.
    fn deliver_transport_reset(&mut self, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let mut used = false;
        while self.transport_reset_pending {
            let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let written = match chain.next() {
                Some(d) if d.is_write_only() && d.len() >= 4 => mem
                    .write_obj(EVENT_TRANSPORT_RESET.to_le(), d.addr())
                    .is_ok(),
                _ => false,
            };
            let len = if written { 4 } else { 0 };
            if queue.add_used(mem, head, len).is_err() {
                break;
            }
            used = true;
            if written {
                self.transport_reset_pending = false;
                self.transport_reset_unacked = true;
            }
        }
        used
    }

    /// The connection table (the host side sends, receives and closes through it).
    pub fn muxer(&mut self) -> &mut Muxer {
        &mut self.muxer
    }

    /// Whether packets wait for the guest's receive queue (the event loop should then process
    /// [`RX_QUEUE`]).
    pub fn rx_pending(&self) -> bool {
        !self.rx_held() && self.muxer.has_packet()
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
    pub fn process_tx_chain(
        &mut self,
        mem: &GuestMemory,
        chain: Chain<'_>,
    ) -> Result<(), ChainError> {
        let (header, payload) = read_tx_packet(mem, chain)?;
        match self.muxer.on_guest_packet(&header, &payload) {
            Ok(MuxEvent::Accepted(key)) => self.events.push(VsockEvent::Accepted(key)),
            Ok(MuxEvent::Connected(key)) => self.events.push(VsockEvent::Connected(key)),
            Ok(MuxEvent::Closed(key)) => self.events.push(VsockEvent::Closed(key)),
            // Malformed packets are dropped; the muxer already reset what needed resetting.
            Ok(MuxEvent::None) | Err(_) => {}
        }
        Ok(())
    }

    /// Fills one receive chain with the next packet; returns the bytes written, or `None` when
    /// no packet is waiting (the chain stays unused). A bad chain takes no packet.
    pub fn fill_rx_chain(
        &mut self,
        mem: &GuestMemory,
        mut chain: Chain<'_>,
    ) -> Result<Option<u32>, ChainError> {
        if data_after_header_and_more(&chain) {
            return Err(ChainError::Layout);
        }
        // No limit on the buffer: what is taken for one packet is bounded below.
        let mut pkt = VsockPacket::from_rx_virtq_chain(mem, &mut chain, u32::MAX)
            .map_err(ChainError::Packet)?;
        let room = pkt
            .data_slice()
            .map_or(0, |data| u32::try_from(data.len()).unwrap_or(u32::MAX))
            .min(MAX_PAYLOAD);
        let mut closed = Vec::new();
        let packet = self.muxer.next_packet(room, &mut closed);
        self.events
            .extend(closed.into_iter().map(VsockEvent::Closed));
        let Some(packet) = packet else {
            return Ok(None);
        };
        if let Some(data) = pkt.data_slice() {
            // At most `room` bytes: they fit.
            data.write_slice(&packet.payload, 0)?;
        }
        packet.header.write_to(&mut pkt);
        Ok(Some((PKT_HEADER_SIZE + packet.payload.len()) as u32))
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
                    let _ = self.process_tx_chain(mem, chain);
                    if queue.add_used(mem, head, 0).is_err() {
                        break;
                    }
                    used = true;
                }
            }
            RX_QUEUE => {
                while self.rx_pending() {
                    let Some(chain) = queue.pop_descriptor_chain(mem) else {
                        break;
                    };
                    let head = chain.head_index();
                    let len = match self.fill_rx_chain(mem, chain) {
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
            EVENT_QUEUE => {
                if self.transport_reset_unacked {
                    // The guest handled the reset: what waits for its receive queue can go.
                    self.transport_reset_unacked = false;
                    if self.muxer.has_packet() {
                        self.wake();
                    }
                }
                used = self.deliver_transport_reset(queue, mem);
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
    use super::super::packet::Op;
    use super::*;
    use crate::kvm::memory::MemoryLayout;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryBackend};

    const GUEST: u64 = 3;
    const MEM: u64 = 1 << 20;
    const W: u16 = 2; // VRING_DESC_F_WRITE
    const N: u16 = 1; // VRING_DESC_F_NEXT
    /// Size of the test queues (their rings sit in the first page of guest memory).
    const QSIZE: u16 = 128;
    const KEY: ConnKey = ConnKey {
        local_port: 52,
        peer_port: 1025,
    };

    fn setup() -> (GuestMemory, Vsock) {
        let mem = MemoryLayout::single(MEM).create().expect("memory");
        let mut muxer = Muxer::new(MuxerConfig {
            guest_cid: GUEST,
            buf_alloc: 4096,
            max_connections: 4,
        });
        muxer.listen(52);
        (mem, Vsock::new(muxer))
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    /// The chain of `descs` as the guest would offer it (next flags and indices set in order).
    fn chain<'m>(mem: &'m GuestMemory, descs: &[RawDescriptor]) -> Chain<'m> {
        let last = descs.len() - 1;
        let linked: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &raw)| {
                let d = Descriptor::from(raw);
                let (flags, next) = if i == last {
                    (d.flags() & !N, 0)
                } else {
                    (d.flags() | N, i as u16 + 1)
                };
                RawDescriptor::from(Descriptor::new(d.addr().0, d.len(), flags, next))
            })
            .collect();
        table_chain(mem, &linked).expect("chain")
    }

    /// The chain that starts at descriptor 0 of a table holding `table` as given.
    fn table_chain<'m>(mem: &'m GuestMemory, table: &[RawDescriptor]) -> Option<Chain<'m>> {
        let vq = MockSplitQueue::new(mem, QSIZE);
        vq.add_desc_chains(table, 0).ok()?;
        let mut queue: Queue = vq.create_queue().ok()?;
        queue.pop_descriptor_chain(mem)
    }

    fn header(op: Op, len: u32) -> Header {
        Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port: 1025,
            dst_port: 52,
            len,
            op,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 0,
        }
    }

    /// A guest packet's bytes.
    fn wire(h: &Header, payload: &[u8]) -> Vec<u8> {
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend_from_slice(payload);
        bytes
    }

    /// Writes `bytes` into guest memory across the buffers `pieces` (address, length) in turn
    /// and returns their device-readable descriptors.
    fn scatter(mem: &GuestMemory, bytes: &[u8], pieces: &[(u64, u32)]) -> Vec<RawDescriptor> {
        let mut at = 0;
        pieces
            .iter()
            .map(|&(addr, len)| {
                let n = (len as usize).min(bytes.len() - at);
                mem.write_slice(&bytes[at..at + n], GuestAddress(addr))
                    .expect("in memory");
                at += n;
                desc(addr, len, 0)
            })
            .collect()
    }

    /// A guest packet in the layout Linux used up to 6.1: header and payload descriptors.
    fn guest_packet(mem: &GuestMemory, op: Op, payload: &[u8]) -> Vec<RawDescriptor> {
        let bytes = wire(&header(op, payload.len() as u32), payload);
        scatter(mem, &bytes, &[(0x1000, 44), (0x2000, payload.len() as u32)])
    }

    fn send(dev: &mut Vsock, mem: &GuestMemory, descs: &[RawDescriptor]) -> Result<(), ChainError> {
        dev.process_tx_chain(mem, chain(mem, descs))
    }

    fn connect(dev: &mut Vsock, mem: &GuestMemory) {
        send(dev, mem, &guest_packet(mem, Op::Request, &[])).expect("tx");
        assert_eq!(dev.take_events(), [VsockEvent::Accepted(KEY)]);
        let (h, _) = rx(dev, mem).expect("response");
        assert_eq!(h.op, Op::Response);
    }

    /// Reads a packet the device wrote into a header buffer at `head` and data at `data`.
    fn written(mem: &GuestMemory, head: u64, data: u64, len: u32) -> (Header, Vec<u8>) {
        let mut raw = [0u8; PKT_HEADER_SIZE];
        mem.read_slice(&mut raw, GuestAddress(head)).expect("read");
        let h = Header::from_bytes(&raw).expect("header");
        assert_eq!(len as usize, PKT_HEADER_SIZE + h.len as usize);
        let mut payload = vec![0u8; h.len as usize];
        mem.read_slice(&mut payload, GuestAddress(data))
            .expect("read");
        (h, payload)
    }

    /// Receives one packet into a header descriptor and a 4 KiB data descriptor.
    fn rx(dev: &mut Vsock, mem: &GuestMemory) -> Option<(Header, Vec<u8>)> {
        let descs = [desc(0x8000, 44, W), desc(0x9000, 4096, W)];
        let len = dev.fill_rx_chain(mem, chain(mem, &descs)).expect("chain")?;
        Some(written(mem, 0x8000, 0x9000, len))
    }

    fn vmm_bitmap(mem: &GuestMemory) -> &vm_memory::bitmap::AtomicBitmap {
        vm_memory::MmapRegion::bitmap(mem.iter().next().expect("region"))
    }

    #[test]
    fn connect_exchange_data_over_descriptor_chains() {
        let (mem, mut dev) = setup();
        connect(&mut dev, &mem);
        assert!(rx(&mut dev, &mem).is_none());

        send(&mut dev, &mem, &guest_packet(&mem, Op::Rw, b"ping")).expect("tx");
        let conn = dev.muxer().connection(KEY).expect("conn");
        assert_eq!(conn.recv(100), b"ping");
        assert_eq!(conn.send(b"pong"), 4);
        assert!(dev.rx_pending());
        let (h, payload) = rx(&mut dev, &mem).expect("data");
        assert_eq!((h.op, h.len, h.fwd_cnt), (Op::Rw, 4, 4));
        assert_eq!(payload, b"pong");

        assert_eq!(dev.read_config_u64(), GUEST);
        let state = dev.state();
        assert_eq!(Vsock::restore(state.clone()).state(), state);
    }

    /// Packets the guest's receive queue takes are written through guest memory: every page
    /// the device wrote is in the VMM's dirty bitmap (KVM's log never sees these writes), and
    /// no other.
    #[test]
    fn rx_writes_are_in_the_vmm_dirty_bitmap() {
        let (mem, mut dev) = setup();
        connect(&mut dev, &mem);
        let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(dev.muxer().connection(KEY).expect("conn").send(&data), 3000);
        // Two receive chains: header and 2 KiB data descriptors (Linux up to 6.1), then one
        // descriptor for both (Linux 6.2 on, virtio-drivers).
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x4_0000), 16);
        vq.add_desc_chains(
            &[
                RawDescriptor::from(Descriptor::new(0x8000, 44, W | N, 1)),
                desc(0x9000, 2048, W),
                desc(0xa000, 4096, W),
            ],
            0,
        )
        .expect("chains");
        let mut queue: Queue = vq.create_queue().expect("queue");
        vmm_bitmap(&mem).reset();
        assert!(dev.process_queue(RX_QUEUE, &mut queue, &mem));

        let (h, first) = written(&mem, 0x8000, 0x9000, 44 + 2048);
        assert_eq!((h.op, h.len), (Op::Rw, 2048));
        let (h, second) = written(&mem, 0xa000, 0xa000 + 44, 44 + 952);
        assert_eq!((h.op, h.len), (Op::Rw, 952));
        assert_eq!([first, second].concat(), data);
        let bitmap = vmm_bitmap(&mem);
        let dirty: Vec<usize> = (0..(MEM / 4096) as usize)
            .filter(|&page| bitmap.is_bit_set(page))
            .collect();
        // The two receive chains' pages, and the used ring's page at 0x40000.
        assert_eq!(dirty, [0x8, 0x9, 0xa, 0x40]);
    }

    /// A restored device drops its connections, takes the new cid and tells the guest through
    /// the event queue: a read-only or short buffer is skipped, the next good one gets the
    /// transport-reset id, and nothing more is sent after it.
    #[test]
    fn transport_reset_goes_to_the_event_queue_once() {
        let (mem, mut dev) = setup();
        connect(&mut dev, &mem);
        dev.take_events();
        dev.reset_transport(77);
        assert_eq!(dev.take_events(), [VsockEvent::Closed(KEY)]);
        assert!(dev.muxer().connection(KEY).is_none());
        let mut cid = [0u8; 8];
        dev.read_config(0, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), 77);
        assert!(dev.state().transport_reset_pending);

        mem.write_obj(0xffff_ffffu32, GuestAddress(0x8000))
            .expect("poison");
        mem.write_obj(0xffff_ffffu32, GuestAddress(0x9000))
            .expect("poison");
        mem.write_obj(0xffff_ffffu32, GuestAddress(0xa000))
            .expect("poison");
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x4_0000), 16);
        vq.add_desc_chains(
            &[
                desc(0x8000, 4, 0),
                desc(0x9000, 2, W),
                desc(0xa000, 4, W),
                desc(0xb000, 4, W),
            ],
            0,
        )
        .expect("chains");
        let mut queue: Queue = vq.create_queue().expect("queue");
        assert!(dev.process_queue(EVENT_QUEUE, &mut queue, &mem));
        assert!(!dev.transport_reset_pending());
        let at = |addr| mem.read_obj::<u32>(GuestAddress(addr)).expect("read");
        assert_eq!(at(0x8000), 0xffff_ffff, "read-only buffer untouched");
        assert_eq!(at(0x9000), 0xffff_ffff, "short buffer untouched");
        assert_eq!(at(0xa000), EVENT_TRANSPORT_RESET);
        // Three buffers used (two of them with length 0); the fourth stays with the device.
        let used = vq.used();
        assert_eq!(used.idx().load(), 3);
        // A host connection made now waits until the guest kicks its event queue.
        let key = dev.muxer().connect(1234).expect("connect");
        assert!(dev.muxer().has_packet());
        assert!(!dev.rx_pending(), "held until the guest handled the reset");
        assert!(dev.state().transport_reset_unacked);
        assert!(!dev.process_queue(EVENT_QUEUE, &mut queue, &mem));
        assert_eq!(used.idx().load(), 3);
        assert!(dev.rx_pending(), "released by the guest's kick");
        let _ = key;
        // The state carries a pending reset into a checkpoint.
        let mut again = Vsock::restore(dev.state());
        again.reset_transport(78);
        assert!(Vsock::restore(again.state()).transport_reset_pending());
    }

    #[test]
    fn linux_transmit_layouts_are_read_whole() {
        let (mem, mut dev) = setup();
        connect(&mut dev, &mem);
        let payload: Vec<u8> = (0..2500u32).map(|i| (i % 253) as u8).collect();
        let bytes = wire(&header(Op::Rw, 2500), &payload);
        let layouts: [&[(u64, u32)]; 4] = [
            // Linux 6.2 on: header and payload in one descriptor.
            &[(0x1000, 44 + 2500)],
            // Linux 6.17 on, packets above 32 KiB: one descriptor per page fragment.
            &[(0x1000, 44), (0x2000, 1000), (0x3000, 1000), (0x4000, 500)],
            // What the spec allows besides: a header over two descriptors, payload starting
            // in the header's descriptor.
            &[(0x1000, 20), (0x2000, 24), (0x3000, 2500)],
            &[(0x1000, 44 + 10), (0x2000, 4096)],
        ];
        for pieces in layouts {
            send(&mut dev, &mem, &scatter(&mem, &bytes, pieces)).expect("tx");
            let conn = dev.muxer().connection(KEY).expect("conn");
            assert_eq!(conn.recv(4096), payload, "{pieces:?}");
        }
    }

    #[test]
    fn bad_chains_are_refused_and_the_device_keeps_working() {
        let (mem, mut dev) = setup();
        let ping = wire(&header(Op::Rw, 4), b"ping");
        let err =
            |dev: &mut Vsock, descs: &[RawDescriptor]| send(dev, &mem, descs).expect_err("refused");
        // Header in a device-writable buffer, payload in one.
        mem.write_slice(&ping, GuestAddress(0x1000)).expect("write");
        assert!(matches!(
            err(&mut dev, &[desc(0x1000, 44, W)]),
            ChainError::Packet(PacketReadError::UnexpectedWriteOnlyDescriptor)
        ));
        assert!(matches!(
            err(&mut dev, &[desc(0x1000, 44, 0), desc(0x2000, 4, W)]),
            ChainError::Packet(PacketReadError::UnexpectedWriteOnlyDescriptor)
        ));
        // A writable descriptor among the fragments of a gathered packet.
        assert!(matches!(
            err(
                &mut dev,
                &[desc(0x1000, 44, 0), desc(0x2000, 2, 0), desc(0x3000, 2, W)]
            ),
            ChainError::Direction
        ));
        // Outside guest memory, and across its end.
        assert!(matches!(
            err(&mut dev, &[desc(MEM + 0x1000, 44, 0)]),
            ChainError::Packet(PacketReadError::InvalidMemoryAccess(_))
        ));
        assert!(matches!(
            err(&mut dev, &[desc(MEM - 8, 44, 0)]),
            ChainError::OutsideMemory(_)
        ));
        // Too short for a header.
        assert!(matches!(
            err(&mut dev, &[desc(0x1000, 20, 0)]),
            ChainError::TooShort
        ));
        // A header announcing more than the buffers hold, or than a packet may carry.
        assert!(matches!(
            err(
                &mut dev,
                &scatter(
                    &mem,
                    &wire(&header(Op::Rw, 100), &[1; 50]),
                    &[(0x1000, 44), (0x2000, 50)]
                )
            ),
            ChainError::TooShort
        ));
        let huge = header(Op::Rw, MAX_PAYLOAD + 1).to_bytes();
        assert!(matches!(
            err(
                &mut dev,
                &scatter(&mem, &huge, &[(0x1000, 44), (0x2000, 4096)])
            ),
            ChainError::Packet(PacketReadError::InvalidHeaderLen(_))
        ));
        // A header virtio-vsock reads but ditto refuses.
        let mut bad_type = header(Op::Request, 0).to_bytes();
        bad_type[28] = 2;
        assert!(matches!(
            err(&mut dev, &scatter(&mem, &bad_type, &[(0x1000, 44)])),
            ChainError::Header(PacketError::Type(2))
        ));
        // A chain whose next descriptor is outside the table ends early.
        mem.write_slice(&ping, GuestAddress(0x1000)).expect("write");
        let dangling = table_chain(
            &mem,
            &[RawDescriptor::from(Descriptor::new(0x1000, 44, N, 999))],
        )
        .expect("chain");
        assert!(matches!(
            dev.process_tx_chain(&mem, dangling),
            Err(ChainError::TooShort)
        ));
        // More descriptors than any driver uses.
        let many: Vec<(u64, u32)> = (0..=MAX_DESCRIPTORS as u64)
            .map(|i| (0x1000 + i, 1))
            .collect();
        let padded = wire(&header(Op::Rw, 21), &[1; 21]);
        assert!(matches!(
            err(&mut dev, &scatter(&mem, &padded, &many)),
            ChainError::TooLong
        ));
        assert!(dev.muxer().is_empty() && !dev.rx_pending());

        // Still working: a packet for a connection that does not exist is answered with a
        // reset.
        send(&mut dev, &mem, &guest_packet(&mem, Op::Rw, b"x")).expect("tx");
        // Receive chains that are too small for a header, read-only, outside memory, without
        // room after the header, or with room after it in a chain that goes on: refused, and
        // the reset stays queued.
        for (descs, what) in [
            (vec![desc(0x8000, 40, W)], "small"),
            (vec![desc(0x8000, 100, 0)], "read-only"),
            (vec![desc(MEM, 100, W)], "outside"),
            (vec![desc(0x8000, 44, W)], "header only"),
            (
                vec![desc(0x8000, 100, W), desc(0x9000, 100, W)],
                "room after the header",
            ),
        ] {
            let result = dev.fill_rx_chain(&mem, chain(&mem, &descs));
            assert!(result.is_err(), "{what}: {result:?}");
            assert!(dev.rx_pending(), "{what}");
        }
        assert!(matches!(
            dev.fill_rx_chain(
                &mem,
                chain(&mem, &[desc(0x8000, 100, W), desc(0x9000, 100, W)])
            ),
            Err(ChainError::Layout)
        ));
        let (h, _) = rx(&mut dev, &mem).expect("reset");
        assert_eq!(h.op, Op::Rst);
    }

    fn any_desc() -> impl proptest::strategy::Strategy<Value = RawDescriptor> {
        use proptest::prelude::*;
        let addr = prop_oneof![0x1000u64..0x3000, MEM - 64..MEM + 64, Just(u64::MAX - 8)];
        let len = prop_oneof![0u32..200, 0u32..70_000, Just(u32::MAX)];
        (addr, len, 0u16..8, 0u16..(QSIZE + 4))
            .prop_map(|(a, l, f, n)| RawDescriptor::from(Descriptor::new(a, l, f, n)))
    }

    proptest::proptest! {
        /// Whatever descriptors the guest offers (any direction, length, address, next index,
        /// indirect flag) over whatever header bytes, nothing panics, a receive chain never
        /// reports more than one packet's bytes, and the device still serves good chains.
        #[test]
        fn arbitrary_chains_never_break_the_device(
            descs in proptest::collection::vec(any_desc(), 1..6),
            garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..0x2000),
            op in 1u16..=7,
            len in proptest::prop_oneof![0u32..100, 0u32..=MAX_PAYLOAD + 1],
        ) {
            let (mem, mut dev) = setup();
            connect(&mut dev, &mem);
            dev.muxer().connection(KEY).expect("conn").send(&[9; 3000]);
            mem.write_slice(&garbage, GuestAddress(0x1000)).expect("write");
            let h = header(Op::from_raw(op).expect("1..=7"), len);
            mem.write_slice(&h.to_bytes(), GuestAddress(0x1000)).expect("write");
            if let Some(c) = table_chain(&mem, &descs) {
                let _ = dev.process_tx_chain(&mem, c);
            }
            if let Some(c) = table_chain(&mem, &descs)
                && let Ok(Some(n)) = dev.fill_rx_chain(&mem, c)
            {
                proptest::prop_assert!(n as usize <= PKT_HEADER_SIZE + MAX_PAYLOAD as usize);
            }
            send(&mut dev, &mem, &guest_packet(&mem, Op::CreditRequest, &[])).expect("tx");
            proptest::prop_assert!(rx(&mut dev, &mem).is_some());
        }
    }

    impl Vsock {
        fn read_config_u64(&self) -> u64 {
            let mut b = [0u8; 8];
            self.read_config(0, &mut b);
            u64::from_le_bytes(b)
        }
    }
}
