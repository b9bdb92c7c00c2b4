//! The patched guest kernel's fast path end to end (`vmlinuz-ditto` of `cargo xtask kernel`,
//! whatever `$DITTO_GUEST_KERNEL` says: this test is about that kernel, and it fails, never
//! skips, when the kernel is missing). A guest under ditto-vmm in the KVM test box, with files
//! in its page cache:
//!
//! 1. the agent's `scan --method kpageblock --json` agrees with /proc/kpageblock on every frame
//!    it reports, names pages of the block device's own cache (filesystem metadata), and every
//!    page of a cached file is in it with its bytes equal to the disk (`kpageblock-check`, in
//!    the guest);
//! 2. a file unlinked while a process holds it open: its pages have records equal to the disk
//!    and are in the agent's report;
//! 3. a file just written (dirty): none of its pages has a record or is in the report;
//! 4. a ditto checkpoint through the default agent (auto, which picks kpageblock on this
//!    kernel) with full content verification: the host compared every omitted page of guest
//!    memory with the disk and found none differing, and the report says the scan used
//!    kpageblock. Restored in a new VMM on the disk copied with it, the workload verifies, the
//!    page cache agrees with the disk, and the unlinked and the dirty file read back unchanged.

use std::time::Duration;

use ditto_host::omission::Verification;
use ditto_proto::agent::v1::InfoRequest;
use ditto_tests::microvm::{KernelChoice, images_dir};
use ditto_tests::rounds::{Guest, Take, agent_degradations, discard};
use ditto_tests::vmm::{TestVm, sparse_copy};
use ditto_tests::workload::{CONTROL, WORKLOAD, sh};

const BOOT: Duration = Duration::from_secs(240);
const GUEST: Guest = Guest {
    mem_mib: 512,
    files: 8,
};
const ANON_MIB: u64 = 32;
const FILE_MIB: u64 = 48;
/// The file unlinked while open (the guest keeps its hash and its holder's pid in /root).
const UNLINKED: &str = "/data/unlinked";
/// The file left dirty.
const DIRTY: &str = "/data/dirty";

/// Step 5's script: two readers of /proc/kpageblock (30 whole reads each, 64 KiB at a time)
/// and three fast-path scans of the agent, beside 15 rounds that write a file, read it, cut it
/// in half, read it again, unlink it and drop the page cache. Fails when a read or a scan
/// failed or the kernel logged a new BUG, Oops or WARNING (the lines that match are printed).
const STRESS: &str = "\
warnings() { dmesg | grep -c -E 'BUG|Oops|WARNING'; }
before=$(warnings)
pids=
for r in 1 2; do
  (i=0; while [ $i -lt 30 ]; do
     dd if=/proc/kpageblock of=/dev/null bs=65536 2>/dev/null || { echo reader $r: read failed; exit 1; }
     i=$((i + 1))
   done) &
  pids=\"$pids $!\"
done
(for i in 1 2 3; do ditto-agent scan --method kpageblock > /dev/null || { echo scan $i failed; exit 1; }; done) &
pids=\"$pids $!\"
i=0
while [ $i -lt 15 ]; do
  dd if=/dev/urandom of=/data/churn bs=65536 count=32 2>/dev/null
  sync
  cat /data/churn > /dev/null
  truncate -s 1M /data/churn
  cat /data/churn > /dev/null
  rm /data/churn
  echo 3 > /proc/sys/vm/drop_caches
  i=$((i + 1))
done
fail=0
for p in $pids; do wait $p || fail=1; done
after=$(warnings)
echo \"concurrent readers: 2 x 30 whole reads and 3 scans beside 15 write/truncate/unlink/drop_caches rounds, failed $fail, kernel warnings $before -> $after\"
dmesg | grep -E 'BUG|Oops|WARNING'
test $fail = 0 && test $after = $before";

/// The number right before the first `suffix` in `text` (`kpageblock-check` prints "N pages,
/// V with a record, …"); panics with the text when there is none.
fn number_before(text: &str, suffix: &str) -> u64 {
    text.split(suffix)
        .next()
        .filter(|head| head.len() < text.len())
        .and_then(|head| {
            let digits = head.len() - head.trim_end_matches(|c: char| c.is_ascii_digit()).len();
            head[head.len() - digits..].parse().ok()
        })
        .unwrap_or_else(|| panic!("no number before {suffix:?} in:\n{text}"))
}

#[test]
#[ignore = "boots Linux with the patched kernel: runs in the KVM test box"]
fn kpageblock_reports_equal_the_disk_and_a_ditto_checkpoint_uses_them() {
    let images = images_dir().unwrap_or_else(|e| panic!("{e}"));
    let kernel = KernelChoice::Ditto.in_images(&images).unwrap_or_else(|e| {
        panic!("{e}: this test is about the patched kernel; it fails rather than skip")
    });
    let work = tempfile::tempdir().expect("tmp");
    let work = work.path();
    let ckpts = work.join("checkpoints");
    let dir = work.join("original");
    std::fs::create_dir_all(&ckpts).expect("mkdir");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let root = dir.join("rootfs.ext4");
    sparse_copy(&images.join("rootfs.ext4"), &root).expect("root copy");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut vm = TestVm::boot_kernel(&kernel, &dir, &root, 3, GUEST.mem_mib, "rw");
        vm.process.wait_for("ditto-agent serving", BOOT);
        let mut agent = vm.agent().await;
        let info = agent.info(InfoRequest {}).await.expect("info").into_inner();
        println!(
            "guest kernel {}, agent capabilities {:?}",
            info.kernel_release, info.capabilities
        );
        assert!(
            info.capabilities.iter().any(|c| c == "kpageblock"),
            "the agent finds /proc/kpageblock on the patched kernel: {info:?}"
        );

        // The workload's files and the image's binaries in the page cache.
        let (code, out) = sh(
            &mut agent,
            &format!(
                "setsid {WORKLOAD} run --anon-mib {ANON_MIB} --seed 7 --control {CONTROL} \
                 --files /data/workload --file-count {} --file-mib {FILE_MIB} \
                 </dev/null >/dev/null 2>&1 &\n\
                 {WORKLOAD} status --json --wait 600 --control {CONTROL} && \
                 cat /data/workload/* /usr/bin/* /usr/sbin/* > /dev/null 2>&1; true",
                GUEST.files
            ),
        )
        .await;
        assert_eq!(code, 0, "{out}");

        // 1. The agent's fast-path report against /proc/kpageblock and the disk.
        let (code, out) = sh(
            &mut agent,
            // Directory blocks (read, not written: clean metadata in the device's own cache)
            // before anything reads /dev/vda itself, whose pages would be the device's cache
            // too: the metadata counted is the filesystem's.
            "find / -xdev > /dev/null && ls -lR /usr /etc > /dev/null && sync && \
             ditto-agent scan --method kpageblock --json > /tmp/kpb.json && \
             grep -o '\"summary\".*' /tmp/kpb.json; \
             kpageblock-check /usr/sbin/ditto-agent /dev/vda --agent-json /tmp/kpb.json \
             --in-report",
        )
        .await;
        println!("{out}");
        assert_eq!(code, 0, "kpageblock-check failed:\n{out}");
        let (code, walk) = sh(
            &mut agent,
            "ditto-agent scan --method walk; ditto-agent scan --method kpageblock",
        )
        .await;
        assert_eq!(code, 0, "{walk}");
        println!("the same page cache, both methods:\n{walk}");

        let own_cache = number_before(&out, " of the device's own cache");
        assert!(
            own_cache > 0,
            "the fast path reports filesystem metadata (the block device's own cache): {out}"
        );
        // 2. A file unlinked while a process holds it open.
        let (code, out) = sh(
            &mut agent,
            &format!(
                "set -e\n\
                 head -c 4194304 /dev/urandom > {UNLINKED}\n\
                 sync\n\
                 sha256sum {UNLINKED} | cut -d' ' -f1 > /root/unlinked.sha\n\
                 setsid sh -c 'exec 3< {UNLINKED}; exec sleep 1000000' \
                 </dev/null >/dev/null 2>&1 &\n\
                 echo $! > /root/holder.pid\n\
                 sleep 1\n\
                 fd=/proc/$(cat /root/holder.pid)/fd/3\n\
                 cat $fd > /dev/null\n\
                 rm {UNLINKED}\n\
                 ls -l $fd\n\
                 ditto-agent scan --method kpageblock --json > /tmp/unlinked.json\n\
                 kpageblock-check $fd /dev/vda --agent-json /tmp/unlinked.json --in-report"
            ),
        )
        .await;
        println!("{out}");
        assert_eq!(code, 0, "the unlinked file:\n{out}");
        assert!(out.contains("(deleted)"), "the file is unlinked: {out}");
        let with_record = number_before(&out, " with a record");
        assert_eq!(
            (
                number_before(&out, " equal to the disk"),
                number_before(&out, " in the agent's report")
            ),
            (with_record, with_record),
            "every page with a record equals the disk and is reported: {out}"
        );
        assert!(
            with_record >= 1000,
            "the unlinked file's 1024 pages are (nearly all) reported: {out}"
        );

        // 3. A file just written, not written back: no record, not reported. Writeback is held
        // off while it is checked.
        let (code, out) = sh(
            &mut agent,
            &format!(
                "echo 0 > /proc/sys/vm/dirty_writeback_centisecs && \
                 dd if=/dev/urandom of={DIRTY} bs=4096 count=256 2>/dev/null && \
                 sha256sum {DIRTY} | cut -d' ' -f1 > /root/dirty.sha && \
                 ditto-agent scan --method kpageblock --json > /tmp/dirty.json && \
                 kpageblock-check --expect-none {DIRTY} /dev/vda --agent-json /tmp/dirty.json; \
                 r=$?; grep -E 'Dirty|Writeback:' /proc/meminfo; \
                 echo 500 > /proc/sys/vm/dirty_writeback_centisecs; exit $r"
            ),
        )
        .await;
        println!("{out}");
        assert_eq!(code, 0, "the dirty file:\n{out}");

        // 4. A ditto checkpoint through the default agent, every reported page compared with
        // the disk by the host.
        let control = vm.control().await;
        let take = Take {
            verification: Verification::Full,
            ..Take::default()
        };
        let (r, file, disk) = GUEST.checkpoint(&control, &ckpts, "kpageblock", take).await;
        let o = r.omission.clone().expect("report");
        assert_eq!(
            o.scan_method, "kpageblock",
            "the default agent's method: {o:?}"
        );
        assert!(
            agent_degradations(&o).is_empty(),
            "nothing degraded: {:?}",
            o.degraded
        );
        assert!(r.pages_disk > 0, "page cache omitted: {o:?}");
        assert_eq!(o.pages_mismatched, 0, "no reported page differs: {o:?}");
        assert!(
            o.pages_verified >= o.pages_omitted_cache,
            "every omitted page was compared with the disk: {o:?}"
        );
        drop(agent);
        vm.shutdown(&control).await;
        drop(vm);

        let (restored, mut agent) = GUEST
            .restore_and_check(work, "restored", &file, &disk, 4, "", "/data /usr /etc")
            .await;
        let (code, out) = sh(
            &mut agent,
            &format!(
                "fd=/proc/$(cat /root/holder.pid)/fd/3; \
                 test \"$(sha256sum < $fd | cut -d' ' -f1)\" = \"$(cat /root/unlinked.sha)\" && \
                 echo unlinked file intact && \
                 test \"$(sha256sum < {DIRTY} | cut -d' ' -f1)\" = \"$(cat /root/dirty.sha)\" && \
                 echo dirty file intact"
            ),
        )
        .await;
        assert_eq!(code, 0, "the restored guest's files: {out}");
        println!("{}", out.trim());

        // 5. Concurrent readers, in the restored guest: two reading the whole file over and
        // over and the agent's fast path scanning, while files are written, read, truncated
        // and unlinked and the page cache is dropped under them. Every read must succeed and
        // the kernel must not warn.
        let (code, out) = sh(&mut agent, STRESS).await;
        println!("{}", out.trim());
        assert_eq!(code, 0, "concurrent readers:\n{out}");
        drop(agent);
        drop(restored);
        discard(&[&file, &disk]);
    });
}
