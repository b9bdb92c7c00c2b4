//! Unit tests of the block device with hand-built descriptor chains, a queue in guest memory for
//! looping chains, and property tests of request parsing.

use std::io::{Read, Seek, SeekFrom, Write};

use proptest::prelude::*;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use super::request::{self, MAX_REQUEST_BYTES, ParseError};
use super::*;
use crate::devices::virtio::VirtioDevice;
use crate::kvm::memory::{GuestMemory, MemoryLayout};

pub(super) const MEM: u64 = 1 << 20;
const DISK_SECTORS: u64 = 64;
pub(super) const W: u16 = 2; // VRING_DESC_F_WRITE
pub(super) const HDR: u64 = 0x1_0000;
pub(super) const DATA: u64 = 0x2_0000;
pub(super) const STATUS: u64 = 0x3_0000;

pub(super) fn memory() -> GuestMemory {
    MemoryLayout::single(MEM).create().expect("memory")
}

fn disk(read_only: bool) -> (tempfile::NamedTempFile, Block) {
    let mut file = tempfile::NamedTempFile::new().expect("temp");
    let content: Vec<u8> = (0..DISK_SECTORS * SECTOR_SIZE)
        .map(|i| (i / SECTOR_SIZE) as u8)
        .collect();
    file.write_all(&content).expect("fill");
    let config = BlockConfig {
        id: "disk-7".into(),
        path: file.path().to_path_buf(),
        read_only,
    };
    (file, Block::open(config).expect("open"))
}

pub(super) fn header(mem: &GuestMemory, kind: u32, sector: u64) -> Descriptor {
    mem.write_obj(kind.to_le(), GuestAddress(HDR)).expect("hdr");
    mem.write_obj(0u32, GuestAddress(HDR + 4)).expect("hdr");
    mem.write_obj(sector.to_le(), GuestAddress(HDR + 8))
        .expect("hdr");
    Descriptor::new(HDR, 16, 0, 0)
}

pub(super) fn status_desc() -> Descriptor {
    Descriptor::new(STATUS, 1, W, 0)
}

pub(super) fn status(mem: &GuestMemory) -> u32 {
    u32::from(mem.read_obj::<u8>(GuestAddress(STATUS)).expect("status"))
}

pub(super) fn run(block: &mut Block, mem: &GuestMemory, descs: Vec<Descriptor>) -> (u32, u32) {
    mem.write_obj(0xffu8, GuestAddress(STATUS)).expect("status");
    let len = block.process_descriptors(mem, descs);
    (status(mem), len)
}

#[test]
fn read_write_flush_and_id() {
    let mem = memory();
    let (file, mut block) = disk(false);
    assert_eq!(block.nsectors(), DISK_SECTORS);

    // Read sectors 3..5 into two buffers.
    let h = header(&mem, VIRTIO_BLK_T_IN, 3);
    let d = vec![
        h,
        Descriptor::new(DATA, 512, W, 0),
        Descriptor::new(DATA + 4096, 512, W, 0),
        status_desc(),
    ];
    assert_eq!(run(&mut block, &mem, d), (VIRTIO_BLK_S_OK, 1025));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA + 511)).expect("rd"), 3);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(DATA + 4096)).expect("rd"),
        4
    );

    // Write sectors 10 and 11, then 12 (merged into one range), and 40.
    mem.write_slice(&[0xaa; 1024], GuestAddress(DATA))
        .expect("wr");
    for (sector, len) in [(10, 1024), (12, 512), (40, 512)] {
        let d = vec![
            header(&mem, VIRTIO_BLK_T_OUT, sector),
            Descriptor::new(DATA, len, 0, 0),
            status_desc(),
        ];
        assert_eq!(run(&mut block, &mem, d), (VIRTIO_BLK_S_OK, 1));
    }
    let mut on_disk = vec![0u8; 512];
    let mut f = std::fs::File::open(file.path()).expect("open");
    f.seek(SeekFrom::Start(11 * 512)).expect("seek");
    f.read_exact(&mut on_disk).expect("read");
    assert!(on_disk.iter().all(|&b| b == 0xaa));
    assert_eq!(
        block.state().written,
        vec![
            SectorRange {
                start: 10,
                count: 3
            },
            SectorRange {
                start: 40,
                count: 1
            }
        ]
    );
    assert_eq!(block.take_written_sectors().len(), 2);
    assert!(block.take_written_sectors().is_empty());

    let d = vec![header(&mem, VIRTIO_BLK_T_FLUSH, 0), status_desc()];
    assert_eq!(run(&mut block, &mem, d), (VIRTIO_BLK_S_OK, 1));

    let d = vec![
        header(&mem, VIRTIO_BLK_T_GET_ID, 0),
        Descriptor::new(DATA, 20, W, 0),
        status_desc(),
    ];
    assert_eq!(run(&mut block, &mem, d), (VIRTIO_BLK_S_OK, 21));
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).expect("id");
    assert_eq!(&id[..7], b"disk-7\0");
}

#[test]
fn reads_into_guest_memory_mark_the_vmm_bitmap() {
    let mem = memory();
    let (_file, mut block) = disk(false);
    let region = vm_memory::GuestMemoryBackend::iter(&mem)
        .next()
        .expect("region");
    let bitmap = vm_memory::MmapRegion::bitmap(region);
    header(&mem, VIRTIO_BLK_T_IN, 0);
    bitmap.reset();
    let d = vec![
        Descriptor::new(HDR, 16, 0, 0),
        Descriptor::new(DATA + 0x5000, 8192, W, 0),
        status_desc(),
    ];
    assert_eq!(run(&mut block, &mem, d).0, VIRTIO_BLK_S_OK);
    let dirty: Vec<usize> = (0..(MEM / 4096) as usize)
        .filter(|&p| bitmap.is_bit_set(p))
        .collect();
    // Data pages 0x25 and 0x26, and the status page 0x30 (the test's own status reset too).
    assert_eq!(dirty, vec![0x25, 0x26, 0x30]);
}

#[test]
fn bad_requests_fail_with_the_right_status() {
    let mem = memory();
    let (_file, mut rw) = disk(false);
    let (_rofile, mut ro) = disk(true);
    assert_ne!(ro.avail_features() & 1 << 5, 0, "VIRTIO_BLK_F_RO offered");

    let write = |mem: &GuestMemory, sector| {
        vec![
            header(mem, VIRTIO_BLK_T_OUT, sector),
            Descriptor::new(DATA, 512, 0, 0),
            status_desc(),
        ]
    };
    // Read-only disk: the write fails, nothing recorded.
    assert_eq!(run(&mut ro, &mem, write(&mem, 0)), (VIRTIO_BLK_S_IOERR, 1));
    assert!(ro.take_written_sectors().is_empty());
    // Beyond the end, and a sector number that overflows.
    assert_eq!(
        run(&mut rw, &mem, write(&mem, DISK_SECTORS)).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        run(&mut rw, &mem, write(&mem, u64::MAX)).0,
        VIRTIO_BLK_S_IOERR
    );
    let read_last_two = vec![
        header(&mem, VIRTIO_BLK_T_IN, DISK_SECTORS - 1),
        Descriptor::new(DATA, 1024, W, 0),
        status_desc(),
    ];
    assert_eq!(run(&mut rw, &mem, read_last_two).0, VIRTIO_BLK_S_IOERR);
    // Wrong direction: a read into a device-readable buffer, a write from a writable one.
    let d = vec![
        header(&mem, VIRTIO_BLK_T_IN, 0),
        Descriptor::new(DATA, 512, 0, 0),
        status_desc(),
    ];
    assert_eq!(run(&mut rw, &mem, d).0, VIRTIO_BLK_S_IOERR);
    let d = vec![
        header(&mem, VIRTIO_BLK_T_OUT, 0),
        Descriptor::new(DATA, 512, W, 0),
        status_desc(),
    ];
    assert_eq!(run(&mut rw, &mem, d).0, VIRTIO_BLK_S_IOERR);
    // Data outside guest memory, and straddling its end.
    let d = vec![
        header(&mem, VIRTIO_BLK_T_IN, 0),
        Descriptor::new(MEM, 512, W, 0),
        status_desc(),
    ];
    assert_eq!(run(&mut rw, &mem, d).0, VIRTIO_BLK_S_IOERR);
    let d = vec![
        header(&mem, VIRTIO_BLK_T_IN, 0),
        Descriptor::new(MEM - 256, 512, W, 0),
        status_desc(),
    ];
    assert_eq!(run(&mut rw, &mem, d).0, VIRTIO_BLK_S_IOERR);
    // Not a multiple of the sector size; too large.
    let d = vec![
        header(&mem, VIRTIO_BLK_T_IN, 0),
        Descriptor::new(DATA, 100, W, 0),
        status_desc(),
    ];
    assert_eq!(run(&mut rw, &mem, d).0, VIRTIO_BLK_S_IOERR);
    let big = u32::try_from(MAX_REQUEST_BYTES / 2 + 512).expect("u32");
    let d = vec![
        header(&mem, VIRTIO_BLK_T_IN, 0),
        Descriptor::new(0, big, W, 0),
        Descriptor::new(0, big, W, 0),
        status_desc(),
    ];
    assert_eq!(run(&mut rw, &mem, d).0, VIRTIO_BLK_S_IOERR);
    // A writable header; no header at all; an unknown type.
    let d = vec![Descriptor::new(HDR, 16, W, 0), status_desc()];
    assert_eq!(run(&mut rw, &mem, d).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(
        run(&mut rw, &mem, vec![status_desc()]).0,
        VIRTIO_BLK_S_IOERR
    );
    let d = vec![header(&mem, 77, 0), status_desc()];
    assert_eq!(run(&mut rw, &mem, d), (VIRTIO_BLK_S_UNSUPP, 1));
    // No usable status byte: nothing written, used length 0.
    for last in [
        Descriptor::new(STATUS, 1, 0, 0),
        Descriptor::new(MEM, 1, W, 0),
        Descriptor::new(STATUS, 0, W, 0),
    ] {
        let d = vec![header(&mem, VIRTIO_BLK_T_FLUSH, 0), last];
        assert_eq!(run(&mut rw, &mem, d), (0xff, 0));
    }
    assert!(rw.take_written_sectors().is_empty());
}

#[test]
fn looping_chain_in_a_queue_fails_without_hanging() {
    let mem = memory();
    let (_file, mut block) = disk(false);
    let mock = MockSplitQueue::new(&mem, 16);
    // 0 -> 1 -> 0 -> ...: a header and a data buffer pointing at each other.
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let descs = [
        RawDescriptor::from(Descriptor::new(HDR, 16, 1, 1)),
        RawDescriptor::from(Descriptor::new(DATA, 512, 1 | W, 0)),
    ];
    mock.add_desc_chains(&descs, 0).expect("chain");
    let mut queue: Queue = mock.create_queue().expect("queue");
    block.process_queue(0, &mut queue, &mem);
    assert_eq!(queue.next_used(), 1, "the looping chain is returned");
    assert_eq!(
        mem.read_obj::<u32>(mock.used_addr().unchecked_add(8))
            .expect("used len"),
        0
    );
}

fn arb_descriptor() -> impl Strategy<Value = Descriptor> {
    let addr = prop_oneof![0u64..MEM + 8192, Just(u64::MAX - 4), any::<u64>()];
    let len = prop_oneof![0u32..8192, Just(16u32), Just(512u32), any::<u32>()];
    (addr, len, any::<bool>()).prop_map(|(a, l, w)| Descriptor::new(a, l, if w { W } else { 0 }, 0))
}

proptest! {
    #[test]
    fn parse_never_accepts_out_of_bounds(
        descs in prop::collection::vec(arb_descriptor(), 0..8),
        kind in prop_oneof![Just(VIRTIO_BLK_T_IN), Just(VIRTIO_BLK_T_OUT), Just(VIRTIO_BLK_T_GET_ID), any::<u32>()],
        sector in prop_oneof![0u64..80, any::<u64>()],
    ) {
        let mem = memory();
        for d in &descs {
            // Put a header at every descriptor that could be one.
            let _ = mem.write_obj(kind, d.addr());
            if let Some(a) = d.addr().checked_add(8) {
                let _ = mem.write_obj(sector, a);
            }
        }
        match request::parse(&mem, descs.clone(), DISK_SECTORS) {
            Ok(req) => {
                let in_mem = |a: GuestAddress, l: u64| a.0.checked_add(l).is_some_and(|e| e <= MEM);
                prop_assert!(in_mem(req.status, 1));
                for &(a, l) in &req.data {
                    prop_assert!(in_mem(a, u64::from(l)));
                }
                prop_assert!(req.data_len() <= MAX_REQUEST_BYTES);
                if matches!(req.kind, request::RequestType::In | request::RequestType::Out) {
                    prop_assert!(req.sector.checked_add(req.data_len() / SECTOR_SIZE).is_some_and(|e| e <= DISK_SECTORS));
                }
            }
            Err(ParseError::Bad { status_addr, .. }) => prop_assert!(status_addr.0 < MEM),
            Err(ParseError::NoStatus) => {}
        }
    }

    #[test]
    fn random_descriptor_tables_never_panic_or_grow_the_disk(
        table in prop::collection::vec((arb_descriptor(), any::<u16>(), 0u16..4), 1..16),
        heads in prop::collection::vec(0u16..16, 1..8),
    ) {
        let mem = memory();
        let (file, mut block) = disk(false);
        let mock = MockSplitQueue::new(&mem, 16);
        let raw: Vec<RawDescriptor> = table
            .iter()
            .map(|(d, next, flags)| RawDescriptor::from(Descriptor::new(d.addr().0, d.len(), d.flags() | (flags & 1), next % 20)))
            .collect();
        mock.add_desc_chains(&raw, 0).expect("table");
        for (i, h) in heads.iter().enumerate() {
            let _ = mem.write_obj(*h, mock.avail_addr().unchecked_add(4 + 2 * i as u64));
        }
        let _ = mem.write_obj(heads.len() as u16, mock.avail_addr().unchecked_add(2));
        let mut queue: Queue = mock.create_queue().expect("queue");
        block.process_queue(0, &mut queue, &mem);
        prop_assert_eq!(std::fs::metadata(file.path()).expect("meta").len(), DISK_SECTORS * SECTOR_SIZE);
        for r in block.take_written_sectors() {
            prop_assert!(r.start + r.count <= DISK_SECTORS);
        }
    }
}

/// A restored device refuses an image whose size is not the one the guest knew, and takes one
/// of the same size with its written-sector record.
#[test]
fn restore_checks_the_disk_size_and_keeps_the_record() {
    let (file, mut block) = disk(false);
    let mem = memory();
    let d = vec![
        header(&mem, VIRTIO_BLK_T_OUT, 3),
        Descriptor::new(DATA, 512, 0, 0),
        status_desc(),
    ];
    assert_eq!(run(&mut block, &mem, d), (VIRTIO_BLK_S_OK, 1));
    let state = block.state();
    let restored = Block::restore(&state).expect("same image");
    assert_eq!(restored.state().written, state.written);

    file.as_file()
        .set_len(state.nsectors * 512 + 4096)
        .expect("grow");
    match Block::restore(&state) {
        Err(BlockError::SizeChanged { was, now, .. }) => {
            assert_eq!((was, now), (state.nsectors, state.nsectors + 8));
        }
        other => panic!("a grown disk must be refused: {other:?}"),
    }
}
