//! Unit tests of the balloon with a fake guest driver: it negotiates through the virtio-mmio
//! registers, puts its queues in guest memory (virtio-queue's mock rings) and answers hinting
//! rounds the way Linux does, or the way a hostile guest might.

use std::sync::atomic::Ordering;

use proptest::prelude::*;
use virtio_bindings::virtio_mmio as regs;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::hinting::{FrameRange, HintRound, MAX_RANGES};
use super::*;
use crate::devices::virtio::driver_tests::Counter;
use crate::devices::virtio::mmio::{INT_CONFIG, INT_USED_RING, MmioState, MmioTransport};
use crate::devices::virtio::{VIRTIO_F_VERSION_1, VirtioDevice};
use crate::kvm::memory::{GuestMemory, MemoryLayout, RegionLayout};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// Guest RAM of the tests: 16 MiB low, and 8 MiB above 4 GiB (a hole between, as in a VM).
const LOW: u64 = 16 * MIB;
const HIGH: u64 = 4 << 30;
const HIGH_LEN: u64 = 8 * MIB;
/// Where the fake driver keeps its rings and its command-id buffers.
const RINGS: u64 = 0x1_0000;
const IDS: u64 = 0x8_0000;
const RING_SIZE: u16 = 16;
const W: u16 = 2; // VRING_DESC_F_WRITE
const HINT_FEATURES: u64 = VIRTIO_F_VERSION_1 | 1 << VIRTIO_BALLOON_F_FREE_PAGE_HINT;

fn memory() -> &'static GuestMemory {
    let layout = MemoryLayout {
        regions: vec![
            RegionLayout {
                guest_addr: 0,
                size: LOW,
            },
            RegionLayout {
                guest_addr: HIGH,
                size: HIGH_LEN,
            },
        ],
    };
    // Each test has its own memory; the rings borrow it for the whole test.
    Box::leak(Box::new(layout.create().expect("memory")))
}

/// A guest driver: the transport, its memory, its three rings.
struct Guest {
    t: MmioTransport<Balloon>,
    mem: &'static GuestMemory,
    rings: Vec<MockSplitQueue<'static, GuestMemory>>,
    next_desc: [u16; 3],
    next_id_buf: u64,
    interrupts: Counter,
}

impl Guest {
    fn new() -> Self {
        let mem = memory();
        let interrupts = Counter::default();
        let t = MmioTransport::new(Balloon::new(), mem.clone(), Box::new(interrupts.clone()))
            .expect("transport");
        let rings = (0..3)
            .map(|i| MockSplitQueue::create(mem, GuestAddress(RINGS + i * 0x1000), RING_SIZE))
            .collect();
        Self {
            t,
            mem,
            rings,
            next_desc: [0; 3],
            next_id_buf: IDS,
            interrupts,
        }
    }

    fn write(&mut self, offset: u32, value: u32) {
        self.t.write(u64::from(offset), &value.to_le_bytes());
    }

    fn read(&self, offset: u32) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(u64::from(offset), &mut b);
        u32::from_le_bytes(b)
    }

    fn config(&self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t
            .read(u64::from(regs::VIRTIO_MMIO_CONFIG) + offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.t
            .write(u64::from(regs::VIRTIO_MMIO_CONFIG) + offset, data);
    }

    fn device_features(&mut self) -> u64 {
        self.write(regs::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let low = self.read(regs::VIRTIO_MMIO_DEVICE_FEATURES);
        self.write(regs::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        u64::from(low) | u64::from(self.read(regs::VIRTIO_MMIO_DEVICE_FEATURES)) << 32
    }

    /// The Linux init sequence with `features`; sets up `queues` queues. Returns whether the
    /// device took the features.
    fn init(&mut self, features: u64, queues: usize) -> bool {
        self.write(regs::VIRTIO_MMIO_STATUS, 0);
        self.write(regs::VIRTIO_MMIO_STATUS, 1);
        self.write(regs::VIRTIO_MMIO_STATUS, 1 | 2);
        self.write(regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.write(regs::VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        self.write(regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.write(regs::VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        self.write(regs::VIRTIO_MMIO_STATUS, 1 | 2 | 8);
        if self.read(regs::VIRTIO_MMIO_STATUS) & 8 == 0 {
            return false;
        }
        for q in 0..queues {
            let ring = &self.rings[q];
            let (d, a, u) = (
                ring.desc_table_addr().0,
                ring.avail_addr().0,
                ring.used_addr().0,
            );
            self.write(regs::VIRTIO_MMIO_QUEUE_SEL, q as u32);
            assert_eq!(
                self.read(regs::VIRTIO_MMIO_QUEUE_NUM_MAX),
                u32::from(QUEUE_SIZE)
            );
            self.write(regs::VIRTIO_MMIO_QUEUE_NUM, u32::from(RING_SIZE));
            for (low, addr) in [
                (regs::VIRTIO_MMIO_QUEUE_DESC_LOW, d),
                (regs::VIRTIO_MMIO_QUEUE_AVAIL_LOW, a),
                (regs::VIRTIO_MMIO_QUEUE_USED_LOW, u),
            ] {
                self.write(low, addr as u32);
                self.write(low + 4, (addr >> 32) as u32);
            }
            self.write(regs::VIRTIO_MMIO_QUEUE_READY, 1);
        }
        self.write(regs::VIRTIO_MMIO_STATUS, 1 | 2 | 8 | 4);
        self.read(regs::VIRTIO_MMIO_STATUS) == 1 | 2 | 8 | 4
    }

    /// Puts one chain of `descs` (address, length, device-writable) on queue `q`.
    fn push(&mut self, q: usize, descs: &[(u64, u32, bool)]) {
        let n = descs.len() as u16;
        if self.next_desc[q] + n > RING_SIZE {
            self.next_desc[q] = 0;
        }
        let first = self.next_desc[q];
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, write))| {
                let i = i as u16;
                let next = i + 1 < n;
                let flags = if write { W } else { 0 } | if next { 1 } else { 0 };
                RawDescriptor::from(Descriptor::new(addr, len, flags, first + i + 1))
            })
            .collect();
        self.rings[q].add_desc_chains(&raw, first).expect("chain");
        self.next_desc[q] += n;
    }

    /// A command id in a fresh read-only buffer, as its own chain on the free-page queue.
    fn send_id(&mut self, id: u32) {
        let at = self.next_id_buf;
        self.next_id_buf += 4;
        self.mem
            .write_obj(id.to_le(), GuestAddress(at))
            .expect("id");
        self.push(FREE_PAGE_QUEUE, &[(at, 4, false)]);
    }

    fn hint(&mut self, addr: u64, len: u32) {
        self.push(FREE_PAGE_QUEUE, &[(addr, len, true)]);
    }

    fn kick(&mut self, q: usize) {
        self.write(regs::VIRTIO_MMIO_QUEUE_NOTIFY, q as u32);
    }

    fn used(&self, q: usize) -> u16 {
        self.rings[q].used().idx().load()
    }

    fn interrupts(&self) -> usize {
        self.interrupts.0.load(Ordering::SeqCst)
    }

    fn ack(&mut self) -> u32 {
        let status = self.read(regs::VIRTIO_MMIO_INTERRUPT_STATUS);
        self.write(regs::VIRTIO_MMIO_INTERRUPT_ACK, status);
        status
    }
}

fn frames(ranges: &[(u64, u64)]) -> Vec<FrameRange> {
    ranges
        .iter()
        .map(|&(first, count)| FrameRange { first, count })
        .collect()
}

#[test]
fn offers_version_1_and_free_page_hints_only_and_negotiates() {
    let mut g = Guest::new();
    assert_eq!(g.read(regs::VIRTIO_MMIO_DEVICE_ID), VIRTIO_ID_BALLOON);
    assert_eq!(g.device_features(), HINT_FEATURES);
    for unoffered in [
        VIRTIO_BALLOON_F_STATS_VQ,
        VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
        VIRTIO_BALLOON_F_PAGE_POISON,
        VIRTIO_BALLOON_F_REPORTING,
    ] {
        assert!(
            !g.init(HINT_FEATURES | 1 << unoffered, 3),
            "feature {unoffered} must be refused"
        );
    }
    assert!(!g.t.hinting_available());

    // A driver without hinting: two queues, running, but no rounds to ask for.
    assert!(g.init(VIRTIO_F_VERSION_1, 2));
    assert!(g.t.is_active() && !g.t.hinting_available());

    assert!(g.init(HINT_FEATURES, 3));
    assert!(g.t.hinting_available());
    assert_eq!(g.t.device().state().acked_features, HINT_FEATURES);
    assert_eq!(g.config(0), 0, "num_pages: never asks for memory");
    assert_eq!(g.config(8), CMD_ID_STOP, "no round yet");
}

#[test]
fn a_full_round_hints_coalesced_frames_and_done_gives_them_back() {
    let mut g = Guest::new();
    assert!(g.init(HINT_FEATURES, 3));
    let generation = g.read(regs::VIRTIO_MMIO_CONFIG_GENERATION);
    let id = g.t.start_hinting();
    assert!(id >= CMD_ID_FIRST);
    assert_eq!(g.config(8), id);
    assert_ne!(g.read(regs::VIRTIO_MMIO_CONFIG_GENERATION), generation);
    assert_eq!(g.interrupts(), 1);
    assert_eq!(g.ack(), INT_CONFIG);
    let status = g.t.hinting();
    assert!(status.open && !status.started && !status.complete);

    // Linux: the id, then 4 MiB blocks (two touching ones, one above the hole), then stop.
    g.send_id(id);
    g.kick(FREE_PAGE_QUEUE);
    assert!(g.t.hinting().started && !g.t.hinting_complete(id));
    g.hint(4 * MIB, 4 << 20);
    g.hint(8 * MIB, 4 << 20);
    g.kick(FREE_PAGE_QUEUE);
    g.hint(HIGH, 4 << 20);
    g.send_id(CMD_ID_STOP);
    g.kick(FREE_PAGE_QUEUE);
    assert_eq!(
        g.used(FREE_PAGE_QUEUE),
        5,
        "every chain is returned at once"
    );
    assert!(g.t.hinting_complete(id));
    let status = g.t.hinting();
    assert!(status.complete);
    assert_eq!(
        status.ranges,
        frames(&[(4 * MIB / PAGE, 2048), (HIGH / PAGE, 1024)])
    );
    assert_eq!(status.pages, 3072);
    assert_eq!(status.dropped, Default::default());
    // Nothing was written into the free blocks (they are the guest's, and free).
    assert!(g.mem.read_obj::<u64>(GuestAddress(4 * MIB)).expect("read") == 0);

    g.t.finish_hinting();
    assert_eq!(g.config(8), CMD_ID_DONE);
    // The used free-page buffers raised the used-ring interrupt too (this ring asks for it).
    assert_eq!(g.ack(), INT_CONFIG | INT_USED_RING);
    let status = g.t.hinting();
    assert!(!status.open && status.ranges.is_empty());
    assert!(!g.t.hinting_complete(id));

    // The next round has a new id.
    let next = g.t.start_hinting();
    assert_eq!(next, id + 1);
}

#[test]
fn buffers_tagged_with_another_round_or_outside_one_are_ignored() {
    let mut g = Guest::new();
    assert!(g.init(HINT_FEATURES, 3));
    // No round yet: a start and hints are returned but count nowhere.
    g.send_id(9);
    g.hint(4 * MIB, 4 << 20);
    g.send_id(CMD_ID_STOP);
    g.kick(FREE_PAGE_QUEUE);
    assert_eq!(g.used(FREE_PAGE_QUEUE), 3);

    let first = g.t.start_hinting();
    let second = g.t.start_hinting();
    assert_ne!(first, second);
    // The guest is still answering the first round: all of it is stale, its stop too.
    g.send_id(first);
    g.hint(4 * MIB, 4 << 20);
    g.send_id(CMD_ID_STOP);
    // Hints before any id, and with a made-up id.
    g.hint(8 * MIB, 4 << 20);
    g.send_id(second + 7);
    g.hint(8 * MIB, 4 << 20);
    g.send_id(CMD_ID_STOP);
    g.kick(FREE_PAGE_QUEUE);
    let status = g.t.hinting();
    assert_eq!(status.cmd_id, second);
    assert!(!status.started && !status.complete && status.ranges.is_empty());
    assert_eq!(status.dropped.stale_buffers, 3);

    // Now the second round, and hints after its stop are stale too.
    g.send_id(second);
    g.hint(12 * MIB, 4 << 20);
    g.send_id(CMD_ID_STOP);
    g.hint(0, 4 << 20);
    g.kick(FREE_PAGE_QUEUE);
    let status = g.t.hinting();
    assert!(status.complete);
    assert_eq!(status.ranges, frames(&[(12 * MIB / PAGE, 1024)]));
    assert_eq!(status.dropped.stale_buffers, 4);

    // After DONE the round is closed: a late start of it counts nothing.
    g.t.finish_hinting();
    g.send_id(second);
    g.hint(0, 4 << 20);
    g.kick(FREE_PAGE_QUEUE);
    assert!(g.t.hinting().ranges.is_empty());
}

#[test]
fn hints_outside_ram_or_in_partial_pages_are_dropped_without_panicking() {
    let mut g = Guest::new();
    assert!(g.init(HINT_FEATURES, 3));
    let id = g.t.start_hinting();
    g.send_id(id);
    // Straddling the end of low RAM: only the part inside counts.
    g.hint(LOW - 2 * PAGE, 4 * PAGE as u32);
    // Entirely in the hole, and beyond the end of RAM.
    g.hint(LOW + MIB, MIB as u32);
    g.hint(HIGH + HIGH_LEN, MIB as u32);
    // Unaligned: the whole pages inside count, the partial ones do not.
    g.hint(MIB + 100, 3 * PAGE as u32);
    g.hint(2 * MIB, 100);
    // Empty, and at the top of the address space.
    g.hint(3 * MIB, 0);
    g.hint(u64::MAX - 10, u32::MAX);
    // Straddling the start of high RAM.
    g.hint(HIGH - PAGE, 2 * PAGE as u32);
    g.send_id(CMD_ID_STOP);
    g.kick(FREE_PAGE_QUEUE);
    let status = g.t.hinting();
    assert!(status.complete);
    assert_eq!(
        status.ranges,
        frames(&[(MIB / PAGE + 1, 2), (LOW / PAGE - 2, 2), (HIGH / PAGE, 1)])
    );
    let d = status.dropped;
    assert_eq!(
        d.outside_ram_bytes,
        2 * PAGE + 2 * MIB + u64::from(u32::MAX) + PAGE
    );
    assert_eq!(d.partial_page_bytes, (PAGE - 100) + 100 + 100);
    // Every frame lies in RAM.
    for r in &status.ranges {
        let (s, e) = (r.first * PAGE, (r.first + r.count) * PAGE);
        assert!(e <= LOW || (s >= HIGH && e <= HIGH + HIGH_LEN), "{r:?}");
    }
}

#[test]
fn a_round_keeps_a_bounded_number_of_ranges() {
    // Every other page, one page each: one range per hint, past the bound.
    let big = MemoryLayout::single((2 * MAX_RANGES as u64 + 32) * PAGE)
        .create()
        .expect("memory");
    let mut round = HintRound::default();
    round.open(CMD_ID_FIRST);
    round.command(CMD_ID_FIRST);
    for i in 0..MAX_RANGES as u64 + 10 {
        round.hint(&big, i * 2 * PAGE, PAGE as u32);
    }
    let status = round.status();
    assert_eq!(status.ranges.len(), MAX_RANGES);
    assert_eq!(status.pages, MAX_RANGES as u64);
    assert_eq!(status.dropped.over_limit_pages, 10);
    // Closing the round frees its record.
    round.close();
    assert!(round.status().ranges.is_empty());
}

#[test]
fn inflate_and_deflate_buffers_are_used_and_nothing_else_happens() {
    let mut g = Guest::new();
    assert!(g.init(HINT_FEATURES, 3));
    let pfns: Vec<u8> = (0x100u32..0x110).flat_map(u32::to_le_bytes).collect();
    g.mem.write_slice(&pfns, GuestAddress(IDS)).expect("pfns");
    g.push(INFLATE_QUEUE, &[(IDS, pfns.len() as u32, false)]);
    g.kick(INFLATE_QUEUE);
    assert_eq!(g.used(INFLATE_QUEUE), 1);
    assert_eq!(g.interrupts(), 1, "inflate waits for the used buffer");
    assert_eq!(g.ack(), INT_USED_RING);
    g.push(DEFLATE_QUEUE, &[(IDS, 8, false)]);
    g.kick(DEFLATE_QUEUE);
    assert_eq!(g.used(DEFLATE_QUEUE), 1);
    assert_eq!(g.t.device().ballooned_pfns(), (16, 2));
    // The guest says how much it gave: `actual` is the only field it writes.
    g.write_config(4, &16u32.to_le_bytes());
    assert_eq!(g.t.device().actual(), 16);
    assert_eq!(g.config(0), 0, "still never asks for more");
    // A notification for a queue that does not exist does nothing.
    g.kick(7);
    assert_eq!(g.interrupts(), 2);
}

#[test]
fn guest_writes_to_host_fields_of_config_space_are_ignored() {
    let mut g = Guest::new();
    assert!(g.init(HINT_FEATURES, 3));
    let id = g.t.start_hinting();
    g.write_config(0, &77u32.to_le_bytes());
    g.write_config(8, &CMD_ID_DONE.to_le_bytes());
    g.write_config(12, &0xaau32.to_le_bytes());
    g.write_config(2, &[1, 2, 3, 4]); // straddles num_pages and actual
    g.write_config(6, &[1, 2, 3, 4]); // straddles actual and cmd id
    g.write_config(u64::MAX - 0x200, &[1; 4]);
    assert_eq!((g.config(0), g.config(4), g.config(8)), (0, 0, id));
    assert_eq!(g.config(12), 0, "poison_val");
    // Byte writes inside `actual` are fine.
    g.write_config(5, &[1]);
    assert_eq!(g.config(4), 0x100);
    let mut wide = [0xffu8; 8];
    g.t.read(u64::from(regs::VIRTIO_MMIO_CONFIG) + 12, &mut wide);
    assert_eq!(wide, [0; 8], "past the end reads zero");
}

#[test]
fn state_round_trips_and_a_restored_balloon_sends_done() {
    let mut g = Guest::new();
    assert!(g.init(HINT_FEATURES, 3));
    g.write_config(4, &5u32.to_le_bytes());
    let id = g.t.start_hinting();
    g.send_id(id);
    g.hint(4 * MIB, 4 << 20);
    g.kick(FREE_PAGE_QUEUE);
    let (state, mmio) = (g.t.device().state(), g.t.state());
    assert_eq!(
        state,
        BalloonState {
            acked_features: HINT_FEATURES,
            actual: 5,
            cmd_id: id,
            last_round: id,
        }
    );
    let json = serde_json::to_string(&(state.clone(), mmio.clone())).expect("json");
    let (state, mmio): (BalloonState, MmioState) = serde_json::from_str(&json).expect("json");

    let counter = Counter::default();
    let mut restored = MmioTransport::restore(
        Balloon::restore(&state).expect("balloon"),
        g.mem.clone(),
        Box::new(counter.clone()),
        &mmio,
    )
    .expect("transport");
    assert_eq!(restored.state(), mmio);
    assert_eq!(restored.device().state(), state);
    assert!(restored.hinting_available());
    // Caught mid-round: the guest holds its blocks; the restored device tells it DONE.
    restored.resume_after_restore();
    assert_eq!(restored.device().cmd_id(), CMD_ID_DONE);
    assert_eq!(counter.0.load(Ordering::SeqCst), 1);
    assert_ne!(restored.state().interrupt_status & INT_CONFIG, 0);
    // Once is enough; a new round does not reuse an id the guest has seen.
    restored.resume_after_restore();
    assert_eq!(counter.0.load(Ordering::SeqCst), 1);
    assert_eq!(restored.start_hinting(), id + 1);

    // State a device would never have is refused.
    let bad = BalloonState {
        acked_features: HINT_FEATURES | 1 << VIRTIO_BALLOON_F_STATS_VQ,
        ..state
    };
    assert!(matches!(
        Balloon::restore(&bad),
        Err(BalloonError::Features(_))
    ));
}

#[test]
fn reset_closes_the_round_and_ids_keep_counting() {
    let mut g = Guest::new();
    assert!(g.init(HINT_FEATURES, 3));
    let id = g.t.start_hinting();
    g.write(regs::VIRTIO_MMIO_STATUS, 0);
    assert!(!g.t.hinting().open);
    assert_eq!(g.config(8), CMD_ID_STOP);
    assert!(g.init(HINT_FEATURES, 3));
    assert_eq!(g.t.start_hinting(), id + 1);
    let mut b = Balloon::restore(&BalloonState {
        last_round: u32::MAX,
        ..Default::default()
    })
    .expect("balloon");
    b.reset();
    let mut t = MmioTransport::new(b, g.mem.clone(), Box::new(Counter::default())).expect("t");
    assert_eq!(
        t.start_hinting(),
        CMD_ID_FIRST,
        "ids wrap past stop and done"
    );
}

proptest! {
    #[test]
    fn random_hints_only_ever_count_whole_pages_inside_ram(
        hints in prop::collection::vec(
            (prop_oneof![0u64..LOW + MIB, HIGH - MIB..HIGH + HIGH_LEN + MIB, any::<u64>()],
             prop_oneof![0u32..(1 << 23), any::<u32>()]),
            0..64),
    ) {
        static MEM: std::sync::OnceLock<&'static GuestMemory> = std::sync::OnceLock::new();
        let mem = *MEM.get_or_init(memory);
        let mut round = HintRound::default();
        round.open(CMD_ID_FIRST);
        round.command(CMD_ID_FIRST);
        for &(addr, len) in &hints {
            round.hint(mem, addr, len);
        }
        let status = round.status();
        let mut last_end = None;
        for r in &status.ranges {
            prop_assert!(r.count > 0);
            let (s, e) = (r.first * PAGE, (r.first + r.count) * PAGE);
            prop_assert!(e <= LOW || (s >= HIGH && e <= HIGH + HIGH_LEN), "{:?}", r);
            // In order and coalesced: a gap between ranges.
            if let Some(end) = last_end {
                prop_assert!(r.first > end);
            }
            last_end = Some(r.first + r.count);
            // Each frame was inside one hint.
            prop_assert!(hints.iter().any(|&(a, l)| a <= s && (s + PAGE) <= a.saturating_add(u64::from(l))));
        }
        prop_assert_eq!(status.pages, status.ranges.iter().map(|r| r.count).sum::<u64>());
    }
}
