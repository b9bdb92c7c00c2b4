//! Our device models driven by an independent driver: the `virtio-drivers` crate (a guest-side
//! virtio driver) runs in this process against [`MmioTransport`] over guest memory in a host
//! buffer. Its [`Hal`] hands out DMA pages from that guest memory and bounces shared buffers
//! through it; its [`Transport`] is implemented on our register model, so every register access
//! goes through the same code a guest's MMIO exits would. The glue ([`GuestHal`], [`Regs`],
//! [`Counter`], [`memory`]) is shared with the vsock host-side tests.

use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use virtio_bindings::virtio_mmio as regs;
use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::block::{Block, BlockConfig, SECTOR_SIZE, SectorRange};
use super::mmio::{Interrupt, MmioTransport};
use super::{VIRTIO_F_VERSION_1, VirtioDevice};
use crate::kvm::memory::{GuestMemory, MemoryLayout};

const PAGE: u64 = 4096;
/// Guest memory shared by every test (the `Hal` is static): 64 MiB, allocated by bumping.
const MEM_BYTES: u64 = 64 << 20;

pub(super) fn memory() -> &'static GuestMemory {
    static MEM: OnceLock<GuestMemory> = OnceLock::new();
    MEM.get_or_init(|| {
        MemoryLayout::single(MEM_BYTES)
            .create()
            .expect("guest memory")
    })
}

/// Guest pages handed back by `unshare`, by run length, for reuse (bounce buffers come and go
/// with every request; the tests that stream data would exhaust memory otherwise).
static FREE: Mutex<BTreeMap<usize, Vec<u64>>> = Mutex::new(BTreeMap::new());

/// Allocates zeroed guest pages: a freed run of the same length, or fresh ones.
fn alloc_pages(pages: usize) -> PhysAddr {
    static NEXT: Mutex<u64> = Mutex::new(PAGE);
    let pages = pages.max(1);
    let reused = FREE
        .lock()
        .expect("free list")
        .get_mut(&pages)
        .and_then(Vec::pop);
    let addr = reused.unwrap_or_else(|| {
        let mut next = NEXT.lock().expect("allocator");
        let addr = *next;
        *next += pages as u64 * PAGE;
        assert!(*next <= MEM_BYTES, "test guest memory exhausted");
        addr
    });
    memory()
        .write_slice(&vec![0u8; pages * PAGE as usize], GuestAddress(addr))
        .expect("zero");
    addr
}

/// Returns pages from [`alloc_pages`] for reuse.
fn free_pages(addr: PhysAddr, pages: usize) {
    FREE.lock()
        .expect("free list")
        .entry(pages.max(1))
        .or_default()
        .push(addr);
}

fn host_ptr(paddr: PhysAddr) -> NonNull<u8> {
    let ptr = memory()
        .get_host_address(GuestAddress(paddr))
        .expect("inside guest memory");
    NonNull::new(ptr).expect("non-null mapping")
}

/// DMA from the shared test guest memory.
pub(super) struct GuestHal;

// SAFETY: `dma_alloc` returns fresh, zeroed, page-aligned pages of a mapping that lives for the
// whole process and is never handed out twice; `share` copies buffers into such pages and
// `unshare` copies them back (and only then recycles the bounce pages, which the device is done
// with once the driver unshares), so the driver's buffers are never accessed behind its back.
unsafe impl Hal for GuestHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let paddr = alloc_pages(pages);
        (paddr, host_ptr(paddr))
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        0
    }

    unsafe fn mmio_phys_to_virt(_paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        unreachable!("the test transport does not map registers")
    }

    unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> PhysAddr {
        let paddr = alloc_pages(buffer.len().div_ceil(PAGE as usize));
        if direction != BufferDirection::DeviceToDriver {
            // SAFETY: the driver passes a buffer it owns and does not touch until `unshare`.
            let bytes = unsafe { buffer.as_ref() };
            memory()
                .write_slice(bytes, GuestAddress(paddr))
                .expect("bounce in");
        }
        paddr
    }

    unsafe fn unshare(paddr: PhysAddr, mut buffer: NonNull<[u8]>, direction: BufferDirection) {
        if direction != BufferDirection::DriverToDevice {
            // SAFETY: as in `share`; the driver gets the buffer back only after this returns.
            let bytes = unsafe { buffer.as_mut() };
            memory()
                .read_slice(bytes, GuestAddress(paddr))
                .expect("bounce out");
        }
        free_pages(paddr, buffer.len().div_ceil(PAGE as usize));
    }
}

/// Counts interrupts the transport raises.
#[derive(Clone, Default)]
pub(super) struct Counter(pub(super) Arc<AtomicUsize>);

impl Interrupt for Counter {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// virtio-drivers' view of our transport: every call becomes register reads and writes.
pub(super) struct Regs<D>(pub(super) Arc<Mutex<MmioTransport<D>>>);

impl<D: VirtioDevice> Regs<D> {
    fn read(&self, offset: u32) -> u32 {
        let mut buf = [0u8; 4];
        self.0
            .lock()
            .expect("transport")
            .read(u64::from(offset), &mut buf);
        u32::from_le_bytes(buf)
    }

    fn write(&self, offset: u32, value: u32) {
        self.0
            .lock()
            .expect("transport")
            .write(u64::from(offset), &value.to_le_bytes());
    }

    fn write64(&self, low: u32, value: u64) {
        self.write(low, value as u32);
        self.write(low + 4, (value >> 32) as u32);
    }
}

impl<D: VirtioDevice> Transport for Regs<D> {
    fn device_type(&self) -> DeviceType {
        DeviceType::try_from(self.read(regs::VIRTIO_MMIO_DEVICE_ID)).expect("known device")
    }

    fn read_device_features(&mut self) -> u64 {
        self.write(regs::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let low = self.read(regs::VIRTIO_MMIO_DEVICE_FEATURES);
        self.write(regs::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        u64::from(low) | u64::from(self.read(regs::VIRTIO_MMIO_DEVICE_FEATURES)) << 32
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.write(regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.write(regs::VIRTIO_MMIO_DRIVER_FEATURES, driver_features as u32);
        self.write(regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.write(
            regs::VIRTIO_MMIO_DRIVER_FEATURES,
            (driver_features >> 32) as u32,
        );
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.write(regs::VIRTIO_MMIO_QUEUE_SEL, u32::from(queue));
        self.read(regs::VIRTIO_MMIO_QUEUE_NUM_MAX)
    }

    fn notify(&mut self, queue: u16) {
        self.write(regs::VIRTIO_MMIO_QUEUE_NOTIFY, u32::from(queue));
    }

    fn get_status(&self) -> DeviceStatus {
        DeviceStatus::from_bits_retain(self.read(regs::VIRTIO_MMIO_STATUS))
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.write(regs::VIRTIO_MMIO_STATUS, status.bits());
    }

    fn set_guest_page_size(&mut self, _guest_page_size: u32) {}

    fn requires_legacy_layout(&self) -> bool {
        false
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        desc: PhysAddr,
        driver: PhysAddr,
        device: PhysAddr,
    ) {
        self.write(regs::VIRTIO_MMIO_QUEUE_SEL, u32::from(queue));
        self.write(regs::VIRTIO_MMIO_QUEUE_NUM, size);
        self.write64(regs::VIRTIO_MMIO_QUEUE_DESC_LOW, desc);
        self.write64(regs::VIRTIO_MMIO_QUEUE_AVAIL_LOW, driver);
        self.write64(regs::VIRTIO_MMIO_QUEUE_USED_LOW, device);
        self.write(regs::VIRTIO_MMIO_QUEUE_READY, 1);
    }

    fn queue_unset(&mut self, queue: u16) {
        self.write(regs::VIRTIO_MMIO_QUEUE_SEL, u32::from(queue));
        self.write(regs::VIRTIO_MMIO_QUEUE_READY, 0);
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.write(regs::VIRTIO_MMIO_QUEUE_SEL, u32::from(queue));
        self.read(regs::VIRTIO_MMIO_QUEUE_READY) != 0
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        let status = self.read(regs::VIRTIO_MMIO_INTERRUPT_STATUS);
        self.write(regs::VIRTIO_MMIO_INTERRUPT_ACK, status);
        InterruptStatus::from_bits_retain(status)
    }

    fn read_config_generation(&self) -> u32 {
        self.read(regs::VIRTIO_MMIO_CONFIG_GENERATION)
    }

    fn read_config_space<T: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<T> {
        let mut value = T::new_zeroed();
        let at = u64::from(regs::VIRTIO_MMIO_CONFIG) + offset as u64;
        self.0
            .lock()
            .expect("transport")
            .read(at, value.as_mut_bytes());
        Ok(value)
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> virtio_drivers::Result<()> {
        let at = u64::from(regs::VIRTIO_MMIO_CONFIG) + offset as u64;
        self.0
            .lock()
            .expect("transport")
            .write(at, value.as_bytes());
        Ok(())
    }
}

struct Disk {
    _file: tempfile::NamedTempFile,
    transport: Arc<Mutex<MmioTransport<Block>>>,
    interrupts: Counter,
}

const DISK_SECTORS: u64 = 256;

fn disk(read_only: bool) -> Disk {
    let file = tempfile::NamedTempFile::new().expect("temp");
    let content: Vec<u8> = (0..DISK_SECTORS * SECTOR_SIZE)
        .map(|i| (i / SECTOR_SIZE) as u8 ^ (i as u8))
        .collect();
    std::fs::write(file.path(), &content).expect("fill");
    let config = BlockConfig {
        id: "vda-serial".into(),
        path: file.path().to_path_buf(),
        read_only,
    };
    let interrupts = Counter::default();
    let block = Block::open(config).expect("open");
    let transport = MmioTransport::new(block, memory().clone(), Box::new(interrupts.clone()))
        .expect("transport");
    Disk {
        _file: file,
        transport: Arc::new(Mutex::new(transport)),
        interrupts,
    }
}

fn expected(sector: u64, len: usize) -> Vec<u8> {
    let start = sector * SECTOR_SIZE;
    (start..start + len as u64)
        .map(|i| (i / SECTOR_SIZE) as u8 ^ (i as u8))
        .collect()
}

#[test]
fn virtio_drivers_blk_reads_writes_flushes_and_reads_the_serial() {
    let d = disk(false);
    let mut blk = VirtIOBlk::<GuestHal, _>::new(Regs(d.transport.clone())).expect("driver init");
    assert_eq!(blk.capacity(), DISK_SECTORS);
    assert!(!blk.readonly());

    let mut buf = vec![0u8; 3 * SECTOR_SIZE as usize];
    blk.read_blocks(5, &mut buf).expect("read");
    assert_eq!(buf, expected(5, buf.len()));

    let data: Vec<u8> = (0..2 * SECTOR_SIZE).map(|i| (i * 7) as u8).collect();
    blk.write_blocks(100, &data).expect("write");
    blk.write_blocks(102, &data[..SECTOR_SIZE as usize])
        .expect("write");
    blk.flush().expect("flush");
    let mut back = vec![0u8; data.len()];
    blk.read_blocks(100, &mut back).expect("read back");
    assert_eq!(back, data);

    let mut id = [0u8; 20];
    let len = blk.device_id(&mut id).expect("GET_ID");
    assert_eq!(&id[..len], b"vda-serial");

    let mut t = d.transport.lock().expect("transport");
    assert!(t.is_active());
    assert_eq!(
        t.device().state().acked_features & VIRTIO_F_VERSION_1,
        VIRTIO_F_VERSION_1
    );
    assert_eq!(
        t.device_mut().take_written_sectors(),
        vec![SectorRange {
            start: 100,
            count: 3
        }]
    );
    assert!(
        d.interrupts.0.load(Ordering::SeqCst) > 0,
        "used buffers raise the interrupt"
    );
}

#[test]
fn virtio_drivers_blk_sees_errors_for_read_only_and_out_of_range() {
    let d = disk(true);
    let mut blk = VirtIOBlk::<GuestHal, _>::new(Regs(d.transport.clone())).expect("driver init");
    assert!(blk.readonly());
    let data = vec![0xeeu8; SECTOR_SIZE as usize];
    assert!(
        blk.write_blocks(0, &data).is_err(),
        "write to a read-only disk fails"
    );
    let mut buf = vec![0u8; SECTOR_SIZE as usize];
    blk.read_blocks(0, &mut buf).expect("read still works");
    assert_eq!(buf, expected(0, buf.len()));
    assert!(
        blk.read_blocks(DISK_SECTORS as usize, &mut buf).is_err(),
        "beyond the end"
    );
    let mut two = vec![0u8; 2 * SECTOR_SIZE as usize];
    assert!(
        blk.read_blocks(DISK_SECTORS as usize - 1, &mut two)
            .is_err(),
        "straddling the end"
    );
    assert!(
        d.transport
            .lock()
            .expect("transport")
            .device_mut()
            .take_written_sectors()
            .is_empty()
    );
}

/// Drives the status state machine by hand, as a hostile or buggy driver would.
#[test]
fn mmio_transport_enforces_the_init_sequence() {
    let d = disk(false);
    let r = Regs(d.transport.clone());
    assert_eq!(r.read(regs::VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(r.read(regs::VIRTIO_MMIO_VERSION), 2);
    assert_eq!(r.read(regs::VIRTIO_MMIO_DEVICE_ID), 2);
    // Unaligned and odd-sized register accesses read zero and are ignored.
    let mut b = [0xffu8; 2];
    d.transport
        .lock()
        .expect("t")
        .read(u64::from(regs::VIRTIO_MMIO_MAGIC_VALUE), &mut b);
    assert_eq!(b, [0, 0]);

    // Features before DRIVER are ignored; an unoffered feature makes FEATURES_OK fail.
    r.write(regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    r.write(regs::VIRTIO_MMIO_DRIVER_FEATURES, 1);
    r.write(regs::VIRTIO_MMIO_STATUS, 1 | 2);
    r.write(regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    r.write(regs::VIRTIO_MMIO_DRIVER_FEATURES, 1 | 1 << 20); // VERSION_1 and bit 52
    r.write(regs::VIRTIO_MMIO_STATUS, 1 | 2 | 8);
    assert_eq!(
        r.read(regs::VIRTIO_MMIO_STATUS) & 8,
        0,
        "FEATURES_OK refused"
    );
    assert_eq!(
        d.transport.lock().expect("t").state().acked_features,
        1 << 20 << 32 | VIRTIO_F_VERSION_1
    );

    // Reset, then a proper negotiation; queue registers only count after FEATURES_OK.
    r.write(regs::VIRTIO_MMIO_STATUS, 0);
    assert_eq!(d.transport.lock().expect("t").state().acked_features, 0);
    r.write(regs::VIRTIO_MMIO_QUEUE_SEL, 0);
    r.write(regs::VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(
        r.read(regs::VIRTIO_MMIO_QUEUE_READY),
        0,
        "queue setup before FEATURES_OK"
    );
    r.write(regs::VIRTIO_MMIO_STATUS, 1 | 2);
    r.write(regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    r.write(regs::VIRTIO_MMIO_DRIVER_FEATURES, 1);
    r.write(regs::VIRTIO_MMIO_STATUS, 1 | 2 | 8);
    assert_eq!(r.read(regs::VIRTIO_MMIO_STATUS), 1 | 2 | 8);
    // Dropping a bit is ignored.
    r.write(regs::VIRTIO_MMIO_STATUS, 1 | 8);
    assert_eq!(r.read(regs::VIRTIO_MMIO_STATUS), 1 | 2 | 8);

    // A size that only fits after truncation to 16 bits is ignored (the queue keeps its size).
    r.write(regs::VIRTIO_MMIO_QUEUE_NUM, 0x1_0010);
    let size = d.transport.lock().expect("t").state().queues[0].size;
    assert_ne!(size, 0x10, "0x10010 must not become 16");
    // A ready queue whose rings lie outside guest memory: DRIVER_OK fails with NEEDS_RESET.
    r.write(regs::VIRTIO_MMIO_QUEUE_NUM, 16);
    r.write64(regs::VIRTIO_MMIO_QUEUE_DESC_LOW, MEM_BYTES + PAGE);
    r.write64(regs::VIRTIO_MMIO_QUEUE_AVAIL_LOW, MEM_BYTES + 2 * PAGE);
    r.write64(regs::VIRTIO_MMIO_QUEUE_USED_LOW, MEM_BYTES + 3 * PAGE);
    r.write(regs::VIRTIO_MMIO_QUEUE_READY, 1);
    r.write(regs::VIRTIO_MMIO_STATUS, 1 | 2 | 8 | 4);
    let status = r.read(regs::VIRTIO_MMIO_STATUS);
    assert_eq!(status & 4, 0);
    assert_ne!(status & 64, 0, "DEVICE_NEEDS_RESET");
    // Notifications to an inactive device, or to a queue that does not exist, do nothing.
    r.write(regs::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    r.write(regs::VIRTIO_MMIO_QUEUE_NOTIFY, 7);
    assert_eq!(d.interrupts.0.load(Ordering::SeqCst), 0);
    // Interrupt acknowledge clears only the acknowledged bits.
    let mut t = d.transport.lock().expect("t");
    t.raise(super::mmio::INT_USED_RING | super::mmio::INT_CONFIG);
    drop(t);
    r.write(regs::VIRTIO_MMIO_INTERRUPT_ACK, 1);
    assert_eq!(r.read(regs::VIRTIO_MMIO_INTERRUPT_STATUS), 2);
}

#[test]
fn transport_and_device_state_round_trip() {
    let d = disk(false);
    let mut blk = VirtIOBlk::<GuestHal, _>::new(Regs(d.transport.clone())).expect("driver init");
    blk.write_blocks(7, &[1u8; 512]).expect("write");
    let (mmio_state, block_state) = {
        let t = d.transport.lock().expect("t");
        (t.state(), t.device().state())
    };
    let block = Block::restore(&block_state).expect("restore block");
    let restored = MmioTransport::restore(
        block,
        memory().clone(),
        Box::new(Counter::default()),
        &mmio_state,
    )
    .expect("restore transport");
    assert_eq!(restored.state(), mmio_state);
    assert_eq!(restored.device().state(), block_state);
    // The restored transport keeps serving the same driver.
    *d.transport.lock().expect("t") = restored;
    let mut back = [0u8; 512];
    blk.read_blocks(7, &mut back).expect("read after restore");
    assert_eq!(back, [1u8; 512]);
}

/// virtio-drivers' socket driver (its connection manager) against our vsock device: a guest
/// connection to a listening host port, data both ways with credit, a host connection the guest
/// accepts, and shutdown. The test plays the event loop: after each driver step it processes the
/// receive queue when the device has packets waiting.
#[test]
fn virtio_drivers_vsock_connects_exchanges_data_and_closes() {
    use super::vsock::device::{RX_QUEUE, Vsock, VsockEvent};
    use super::vsock::muxer::{ConnKey, Muxer, MuxerConfig};
    use virtio_drivers::device::socket::{
        VMADDR_CID_HOST, VirtIOSocket, VsockAddr, VsockConnectionManager, VsockEventType,
    };

    const GUEST_CID: u64 = 42;
    let mut muxer = Muxer::new(MuxerConfig {
        guest_cid: GUEST_CID,
        buf_alloc: 64 << 10,
        max_connections: 8,
    });
    muxer.listen(52);
    let transport = Arc::new(Mutex::new(
        MmioTransport::new(
            Vsock::new(muxer),
            memory().clone(),
            Box::new(Counter::default()),
        )
        .expect("transport"),
    ));
    let pump = || {
        let mut t = transport.lock().expect("transport");
        if t.device().rx_pending() {
            t.notify(RX_QUEUE as u32);
        }
    };
    let driver = VirtIOSocket::<GuestHal, _>::new(Regs(transport.clone())).expect("driver init");
    let mut socket = VsockConnectionManager::new(driver);
    assert_eq!(socket.guest_cid(), GUEST_CID);

    // Guest to host.
    let host = VsockAddr {
        cid: VMADDR_CID_HOST,
        port: 52,
    };
    socket.connect(host, 1025).expect("connect");
    let key = ConnKey {
        local_port: 52,
        peer_port: 1025,
    };
    assert_eq!(
        transport.lock().expect("t").device_mut().take_events(),
        [VsockEvent::Accepted(key)]
    );
    pump();
    let event = socket.poll().expect("poll").expect("event");
    assert_eq!(event.event_type, VsockEventType::Connected);
    socket.send(host, 1025, b"ping").expect("send");
    {
        let mut t = transport.lock().expect("t");
        let conn = t.device_mut().muxer().connection(key).expect("conn");
        assert_eq!(conn.recv(100), b"ping");
        let big: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        assert_eq!(conn.send(&big), big.len());
    }
    pump();
    let mut got = Vec::new();
    while got.len() < 3000 {
        match socket.poll().expect("poll") {
            Some(e) if matches!(e.event_type, VsockEventType::Received { .. }) => {
                let mut buf = [0u8; 4096];
                let n = socket.recv(host, 1025, &mut buf).expect("recv");
                got.extend_from_slice(&buf[..n]);
                // The driver's buffer is 1 KiB: return the credit so the device sends more.
                socket.update_credit(host, 1025).expect("credit");
            }
            Some(_) => {}
            None => pump(),
        }
    }
    assert_eq!(got, (0..3000u32).map(|i| i as u8).collect::<Vec<_>>());

    // Host to guest: the guest listens, our connection gets accepted.
    socket.listen(1234);
    let hkey = transport
        .lock()
        .expect("t")
        .device_mut()
        .muxer()
        .connect(1234)
        .expect("host connect");
    pump();
    let event = socket.poll().expect("poll").expect("request");
    assert_eq!(event.event_type, VsockEventType::ConnectionRequest);
    {
        let mut t = transport.lock().expect("t");
        let conn = t.device_mut().muxer().connection(hkey).expect("conn");
        assert_eq!(conn.phase(), super::vsock::connection::Phase::Established);
    }

    // The guest shuts the first connection down: the device resets it and reports it closed.
    socket.shutdown(host, 1025).expect("shutdown");
    pump();
    let mut closed = false;
    for _ in 0..10 {
        if let Some(e) = socket.poll().expect("poll")
            && matches!(e.event_type, VsockEventType::Disconnected { .. })
        {
            closed = true;
            break;
        }
        pump();
    }
    assert!(closed, "the guest saw the reset");
    let events = transport.lock().expect("t").device_mut().take_events();
    assert!(events.contains(&VsockEvent::Closed(key)), "{events:?}");
}
