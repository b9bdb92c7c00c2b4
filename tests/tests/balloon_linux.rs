//! Free-page hinting with a real Linux 6.1 guest under ditto's own VMM, in the KVM test box:
//! an idle 512 MiB guest with `virtio_balloon` loaded hints more than half of its RAM as free,
//! every hinted frame inside guest RAM; the guest gets its blocks back after DONE, a second
//! round works the same, and a VM captured mid-round and rebuilt from its state is told DONE
//! and gets its blocks back too. Driven through the `Vmm` library API in this process, as the
//! checkpoint code calls it.

use std::path::Path;
use std::time::{Duration, Instant};

use ditto_host::devices::virtio::balloon::{CMD_ID_DONE, FrameRange};
use ditto_host::kvm::memory::MemoryLayout;
use ditto_host::vmm::free_hints::FreeHints;
use ditto_host::vmm::{Vmm, VmmState};
use ditto_tests::microvm::images_dir;
use ditto_tests::vmm::shell_guest_config;

const BOOT: Duration = Duration::from_secs(180);
const ROUND: Duration = Duration::from_secs(60);
const MEM_MIB: u64 = 512;
const PAGE_KIB: u64 = 4;

/// The `free <kB>` lines the guest prints twice a second, in order.
fn free_lines(console: &Path) -> Vec<u64> {
    std::fs::read_to_string(console)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("free "))
        .filter_map(|t| t.trim().parse().ok())
        .collect()
}

fn console_text(console: &Path) -> String {
    std::fs::read_to_string(console).unwrap_or_default()
}

/// Waits until the guest printed a `free` line after the first `seen` that satisfies `ok`;
/// returns it.
fn wait_free(console: &Path, seen: usize, what: &str, ok: impl Fn(u64) -> bool) -> u64 {
    wait_free_for(console, seen, what, ROUND, ok)
}

fn wait_free_for(
    console: &Path,
    seen: usize,
    what: &str,
    timeout: Duration,
    ok: impl Fn(u64) -> bool,
) -> u64 {
    let start = Instant::now();
    loop {
        let lines = free_lines(console);
        if let Some(&kib) = lines.iter().skip(seen).find(|&&k| ok(k)) {
            return kib;
        }
        assert!(
            start.elapsed() < timeout,
            "{what}: MemFree lines {:?}; console:\n{}",
            &lines[seen.min(lines.len())..],
            console_text(console)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn check_ranges(hints: &FreeHints, ram: &MemoryLayout) {
    let mut last_end = None;
    for &FrameRange { first, count } in &hints.ranges {
        assert!(count > 0);
        let (start, end) = (first * 4096, (first + count) * 4096);
        assert!(
            ram.regions
                .iter()
                .any(|r| start >= r.guest_addr && end <= r.guest_addr + r.size),
            "frames {first:#x}+{count} outside guest RAM {ram:?}"
        );
        if let Some(e) = last_end {
            assert!(first > e, "ranges not coalesced or not in order");
        }
        last_end = Some(first + count);
    }
    assert_eq!(
        hints.pages,
        hints.ranges.iter().map(|r| r.count).sum::<u64>()
    );
}

fn report(what: &str, hints: &FreeHints) {
    let total = MEM_MIB * 256;
    println!(
        "measured: {what}: {} of {total} pages hinted ({:.1} % of guest RAM, {} MiB) in {} \
         ranges, complete {}, in {:.1} ms; dropped {:?}",
        hints.pages,
        100.0 * hints.pages as f64 / total as f64,
        hints.pages / 256,
        hints.ranges.len(),
        hints.complete,
        hints.elapsed.as_secs_f64() * 1000.0,
        hints.dropped
    );
}

fn round(vmm: &Vmm, what: &str) -> FreeHints {
    let hints = vmm
        .hint_free_pages(ROUND)
        .expect("hint")
        .expect("the guest's driver acknowledged free-page hinting");
    report(what, &hints);
    assert!(hints.complete, "{what}: the guest did not finish the round");
    assert!(
        hints.pages > MEM_MIB * 256 / 2,
        "{what}: only {} pages hinted",
        hints.pages
    );
    check_ranges(&hints, &MemoryLayout::of(vmm.vm().memory()));
    hints
}

#[test]
#[ignore = "boots Linux: runs in the KVM test box"]
fn an_idle_linux_guest_hints_most_of_its_memory_free_and_gets_it_back() {
    let images = images_dir().expect("images");
    let dir = tempfile::tempdir().expect("tmp");
    let console = dir.path().join("console.log");
    let config = shell_guest_config(
        &images,
        &console,
        2,
        MEM_MIB,
        "mount -t proc proc /proc; mount -t sysfs sys /sys; until ls \
         /sys/bus/virtio/drivers/virtio_balloon | grep -q virtio; do sleep 0.2; done; echo \
         balloon-ready; dmesg | grep 'mem auto-init'; while true; do echo free $(awk \
         '/MemFree/ {print $2}' /proc/meminfo); sleep 0.5; done",
    );
    let (mut vmm, events) = Vmm::build(config).expect("build");
    vmm.start().expect("start");
    let booted = Instant::now();
    // Idle: a few MemFree lines after the driver is bound.
    let before = wait_free_for(&console, 3, "boot", BOOT, |_| true);
    println!(
        "measured: boot to balloon driver bound and idle: {:.1} s; MemFree {before} kB",
        booted.elapsed().as_secs_f64()
    );
    if let Some(line) = console_text(&console)
        .lines()
        .find(|l| l.contains("mem auto-init:"))
    {
        println!("guest: {}", line.trim());
    }

    // Round 1: hints, the guest holds them, DONE gives them back.
    let first = round(&vmm, "round 1");
    assert!(
        first.pages * PAGE_KIB <= before + 64 * 1024,
        "more hinted ({} kB) than was free ({before} kB)",
        first.pages * PAGE_KIB
    );
    let seen = free_lines(&console).len();
    let held = wait_free(&console, seen, "while held", |_| true);
    vmm.end_free_hinting();
    let seen = free_lines(&console).len();
    let back = wait_free(&console, seen, "after DONE", |k| k * 10 >= before * 8);
    println!("measured: MemFree before {before} kB, while hinted {held} kB, after DONE {back} kB");

    // Round 2: a new command id, the same picture.
    let second = round(&vmm, "round 2");
    assert_ne!(second.cmd_id, first.cmd_id);
    vmm.end_free_hinting();
    let seen = free_lines(&console).len();
    wait_free(&console, seen, "after DONE 2", |k| k * 10 >= before * 8);

    // Round 3 is caught by a capture: the rebuilt VM's balloon tells the guest DONE.
    let third = round(&vmm, "round 3 (then captured)");
    assert_ne!(third.cmd_id, second.cmd_id);
    vmm.pause().expect("pause");
    let state = vmm.capture().expect("capture");
    let json = serde_json::to_string(&state).expect("serialise");
    let decoded: VmmState = serde_json::from_str(&json).expect("deserialise");
    assert_eq!(
        decoded.devices.balloon.as_ref().map(|(b, _)| b.cmd_id),
        Some(third.cmd_id)
    );
    vmm.rebuild_from(&decoded).expect("rebuild");
    let cmd_id = vmm
        .devices()
        .balloon
        .as_ref()
        .expect("balloon")
        .lock()
        .expect("balloon")
        .device()
        .cmd_id();
    assert_eq!(cmd_id, CMD_ID_DONE, "the rebuilt balloon ends the round");
    let seen = free_lines(&console).len();
    vmm.resume().expect("resume");
    let back = wait_free(&console, seen, "after the rebuild", |k| {
        k * 10 >= before * 8
    });
    println!("measured: MemFree after the rebuild {back} kB");
    // And the rebuilt VM hints again.
    let fourth = round(&vmm, "round 4 (rebuilt VM)");
    assert_ne!(fourth.cmd_id, third.cmd_id);
    vmm.end_free_hinting();
    vmm.check_alive().expect("vCPU threads alive");
    vmm.stop().expect("stop");
    drop(events);
}

/// `--no-balloon` (here `balloon: false`): no device, no hints, `Ok(None)`.
#[test]
#[ignore = "boots Linux: runs in the KVM test box"]
fn a_vm_without_a_balloon_has_no_hints() {
    let images = images_dir().expect("images");
    let dir = tempfile::tempdir().expect("tmp");
    let console = dir.path().join("console.log");
    let mut config = shell_guest_config(
        &images,
        &console,
        1,
        256,
        "mount -t proc proc /proc; while true; do echo free 0; sleep 0.5; done",
    );
    config.balloon = false;
    let (mut vmm, events) = Vmm::build(config).expect("build");
    assert!(vmm.devices().balloon.is_none());
    vmm.start().expect("start");
    wait_free_for(&console, 0, "boot", BOOT, |_| true);
    assert_eq!(vmm.hint_free_pages(Duration::from_secs(1)), Ok(None));
    vmm.end_free_hinting();
    vmm.stop().expect("stop");
    drop(events);
}
