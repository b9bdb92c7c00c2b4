//! The free-only mode, and ditto checkpoints when a part of the guest is missing or hostile, with
//! a real Linux guest under ditto-vmm in the KVM test box. Each checkpoint is restored in a new
//! VMM on the disk copied with it, and the restored guest must pass the workload's verify (every
//! page and file) with a page cache that agrees with its disk.
//!
//! 1. `free-only`: the balloon's free pages are omitted, the agent is never asked, and no page
//!    cache is omitted.
//! 2. Fake agents on a real vsock socket (`ditto-agent serve --fault KIND` on a port of its
//!    own): a stream out of order, a message larger than the host takes, a flood of extents
//!    beyond the guest's frames, a stream that stalls, and bytes that are not gRPC at all. Each
//!    gives a correct checkpoint that saved the page cache, with the reason in the result, and
//!    the free pages still omitted.
//! 3. A guest whose balloon driver is not loaded (`module_blacklist=virtio_balloon` for the stock
//!    kernel's module, `initcall_blacklist=virtio_balloon_driver_init` for the patched kernel's
//!    built-in driver): the ditto checkpoint omits page cache only, and says why it has no free
//!    pages.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ditto_host::control::VmmClient;
use ditto_host::omission::Mode;
use ditto_proto::agent::v1::agent_client::AgentClient;
use ditto_tests::microvm::images_dir;
use ditto_tests::rounds::{Guest, Take, agent_degradations, discard};
use ditto_tests::vmm::{TestVm, sparse_copy};
use ditto_tests::workload::{CONTROL, WORKLOAD, sh};
use tonic::transport::Channel;

const BOOT: Duration = Duration::from_secs(240);
const GUEST: Guest = Guest {
    mem_mib: 512,
    files: 12,
};
const ANON_MIB: u64 = 48;
const FILE_MIB: u64 = 48;
/// The fake agents' first port.
const FAKE_PORT: u32 = 10400;
/// What the checkpoint with a stalling agent waits for.
const STALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Boots a guest on a copy of the root image with `cmdline`, starts the workload, and reads
/// its files into the page cache. Returns the VM, its agent and control clients.
async fn guest_with_workload(
    work: &Path,
    cmdline: &str,
) -> (TestVm, AgentClient<Channel>, VmmClient) {
    let dir = work.join("original");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let root = dir.join("rootfs.ext4");
    sparse_copy(&images_dir().expect("images").join("rootfs.ext4"), &root).expect("root copy");
    let mut vm = TestVm::boot_with_cmdline(&dir, &root, 3, GUEST.mem_mib, cmdline);
    vm.process.wait_for("ditto-agent serving", BOOT);
    let mut agent = vm.agent().await;
    let (code, out) = sh(
        &mut agent,
        &format!(
            "setsid {WORKLOAD} run --anon-mib {ANON_MIB} --seed 11 --control {CONTROL} \
             --files /data/workload --file-count {} --file-mib {FILE_MIB} \
             </dev/null >/dev/null 2>&1 &\n\
             {WORKLOAD} status --json --wait 600 --control {CONTROL} && \
             cat /data/workload/* /usr/bin/* > /dev/null 2>&1; true",
            GUEST.files
        ),
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let control = vm.control().await;
    (vm, agent, control)
}

/// A folder for the test (with `checkpoints/` in it) and a runtime.
fn setup() -> (tempfile::TempDir, PathBuf, tokio::runtime::Runtime) {
    let work = tempfile::tempdir().expect("tmp");
    let ckpts = work.path().join("checkpoints");
    std::fs::create_dir_all(&ckpts).expect("mkdir");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    (work, ckpts, runtime)
}

/// Restores a round and drops the restored VM; removes the round's files.
async fn restore_and_discard(work: &Path, name: &str, file: &Path, disk: &Path, cid: u32) {
    let (vm, _agent) = GUEST
        .restore_and_check(work, name, file, disk, cid, "", "/data /usr /etc")
        .await;
    drop(vm);
    discard(&[file, disk]);
}

#[test]
#[ignore = "boots Linux: runs in the KVM test box"]
fn free_only_omits_free_pages_and_hostile_agent_streams_only_cost_the_page_cache() {
    let (tmp, ckpts, runtime) = setup();
    let work = tmp.path();
    runtime.block_on(async {
        let (mut vm, mut agent, control) = guest_with_workload(work, "rw").await;

        // 1. Free-only: free pages omitted, the agent not asked, the page cache saved.
        let take = Take {
            mode: Mode::FreeOnly,
            ..Take::default()
        };
        let (r, file, disk) = GUEST.checkpoint(&control, &ckpts, "free-only", take).await;
        let o = r.omission.clone().expect("report");
        assert_eq!(r.pages_disk, 0, "free-only omits no page cache: {o:?}");
        assert_eq!(o.pages_reported_cache, 0, "the agent was not asked: {o:?}");
        assert_eq!(o.scan_us, 0, "no scan: {o:?}");
        assert!(o.degraded.is_empty(), "{:?}", o.degraded);
        assert!(
            r.pages_free > GUEST.mem_mib * 256 / 8,
            "an idle guest has free pages to omit: {o:?}"
        );
        restore_and_discard(work, "free-only", &file, &disk, 4).await;

        // 2. Fake agents, each on its own port: the checkpoint saves the page cache, says why,
        // and still omits the free pages.
        let faults = [
            ("extents-first", "malformed: extents before the disk table"),
            ("oversized", "too large"),
            ("flood", "too large: more extents than the guest's"),
            ("stall", "did not finish within"),
            ("garbage", "agent"),
        ];
        for (i, (fault, why)) in faults.into_iter().enumerate() {
            let port = FAKE_PORT + i as u32;
            let (code, out) = sh(
                &mut agent,
                &format!(
                    "setsid ditto-agent serve --listen vsock:{port} --fault {fault} \
                     </dev/null >/dev/null 2>/root/fake-{fault}.log & echo $! > /root/fake.pid; \
                     sleep 2; kill -0 $(cat /root/fake.pid)"
                ),
            )
            .await;
            assert_eq!(code, 0, "{fault}: the fake agent runs: {out}");
            let take = Take {
                agent_port: Some(port),
                scan_timeout: Some(STALL_TIMEOUT),
                ..Take::default()
            };
            let (r, file, disk) = GUEST.checkpoint(&control, &ckpts, fault, take).await;
            let o = r.omission.clone().expect("report");
            assert_eq!(r.pages_disk, 0, "{fault}: nothing omitted as cache: {o:?}");
            let reasons = agent_degradations(&o);
            assert_eq!(reasons.len(), 1, "{fault}: one reason: {:?}", o.degraded);
            assert!(
                reasons[0].contains(why) && reasons[0].contains("the page cache is saved"),
                "{fault}: the reason names the fault ({why:?}): {:?}",
                reasons[0]
            );
            assert!(r.pages_free > 0, "{fault}: free pages still omitted: {o:?}");
            println!("{fault}: degraded: {}", reasons[0]);
            let (code, out) = sh(&mut agent, "kill -9 $(cat /root/fake.pid)").await;
            assert_eq!(code, 0, "{fault}: stop the fake agent: {out}");
            restore_and_discard(work, fault, &file, &disk, 5 + i as u32).await;
        }

        // The real agent was not disturbed by any of that: a ditto checkpoint omits cache.
        let (r, file, disk) = GUEST
            .checkpoint(&control, &ckpts, "after", Take::default())
            .await;
        let o = r.omission.clone().expect("report");
        assert!(agent_degradations(&o).is_empty(), "{:?}", o.degraded);
        assert!(r.pages_disk > 0 && r.pages_free > 0, "{o:?}");
        discard(&[&file, &disk]);
        drop(agent);
        vm.shutdown(&control).await;
        drop(vm);
    });
}

#[test]
#[ignore = "boots Linux: runs in the KVM test box"]
fn a_guest_without_the_balloon_driver_checkpoints_correctly_and_says_why() {
    let (tmp, ckpts, runtime) = setup();
    let work = tmp.path();
    runtime.block_on(async {
        let (mut vm, mut agent, control) =
            // The stock kernel's driver is a module; the patched kernel's is built in, and
            // only initcall_blacklist= keeps it from registering (it has CONFIG_KALLSYMS).
            guest_with_workload(
                work,
                "rw module_blacklist=virtio_balloon \
                 initcall_blacklist=virtio_balloon_driver_init",
            )
            .await;
        let (code, out) = sh(
            &mut agent,
            "test ! -e /sys/bus/virtio/drivers/virtio_balloon && \
             ls /sys/bus/virtio/devices/*/driver 2>/dev/null | wc -l",
        )
        .await;
        assert_eq!(code, 0, "the balloon driver is not loaded: {out}");

        let (r, file, disk) = GUEST
            .checkpoint(&control, &ckpts, "no-balloon-driver", Take::default())
            .await;
        let o = r.omission.clone().expect("report");
        assert_eq!(r.pages_free, 0, "no hints, no free pages omitted: {o:?}");
        assert_eq!(o.pages_hinted_free, 0, "{o:?}");
        assert!(
            o.degraded
                .iter()
                .any(|d| d.contains("does not take free-page hints")),
            "the result says why: {:?}",
            o.degraded
        );
        assert!(
            agent_degradations(&o).is_empty(),
            "the agent's part works: {:?}",
            o.degraded
        );
        assert!(r.pages_disk > 0, "page cache is still omitted: {o:?}");
        restore_and_discard(work, "no-balloon-driver", &file, &disk, 4).await;
        drop(agent);
        vm.shutdown(&control).await;
        drop(vm);
    });
}
