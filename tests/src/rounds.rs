//! Rounds of the end-to-end ditto tests: a checkpoint of a running guest, with its root disk
//! copied by the VMM while the guest is paused, and a restore of that checkpoint in a new VMM on
//! the copy, whose guest must pass `ditto-workload verify` (every page and file) and whose page
//! cache must agree with its disk. Also the restore that must refuse (a referenced block that
//! does not match its hash).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ditto_host::control::{AfterCheckpoint, CheckpointResult, CheckpointSpec, VmmClient};
use ditto_host::omission::{Mode, OmissionReport, Verification};
use ditto_proto::agent::v1::agent_client::AgentClient;
use tonic::transport::Channel;

use crate::vmm::{AGENT_PORT, TestVm};
use crate::workload::{count, try_sh, verify_command};

/// The guest the rounds checkpoint: its RAM and the number of files its workload keeps.
#[derive(Clone, Copy, Debug)]
pub struct Guest {
    /// RAM in MiB.
    pub mem_mib: u64,
    /// Files `ditto-workload run --file-count` keeps (its verify checks each).
    pub files: u64,
}

/// How a round checkpoints.
#[derive(Clone, Copy, Debug)]
pub struct Take {
    /// The mode.
    pub mode: Mode,
    /// The verification policy.
    pub verification: Verification,
    /// The agent's vsock port (`None`: the default agent).
    pub agent_port: Option<u32>,
    /// The scan's deadline (`None`: the VMM's default).
    pub scan_timeout: Option<Duration>,
}

impl Default for Take {
    fn default() -> Self {
        Self {
            mode: Mode::Ditto,
            verification: Verification::DirtyLog,
            agent_port: None,
            scan_timeout: None,
        }
    }
}

impl Guest {
    /// A checkpoint of the running VM into `dir/NAME.ditto`, its root disk copied to
    /// `dir/NAME.ext4` while paused. Prints the round's numbers and checks that every page is
    /// accounted for.
    pub async fn checkpoint(
        &self,
        control: &VmmClient,
        dir: &Path,
        name: &str,
        take: Take,
    ) -> (CheckpointResult, PathBuf, PathBuf) {
        self.checkpoint_explained(control, dir, name, take, |e| e)
            .await
    }

    /// [`Guest::checkpoint`], whose failure message is what `explain` makes of the error (say,
    /// with the VMM's exit status and log).
    pub async fn checkpoint_explained(
        &self,
        control: &VmmClient,
        dir: &Path,
        name: &str,
        take: Take,
        explain: impl FnOnce(String) -> String,
    ) -> (CheckpointResult, PathBuf, PathBuf) {
        let (file, disk) = (
            dir.join(format!("{name}.ditto")),
            dir.join(format!("{name}.ext4")),
        );
        let result = control
            .checkpoint(CheckpointSpec {
                path: file.clone(),
                after: AfterCheckpoint::Resume,
                mode: take.mode,
                verification: take.verification,
                scan_timeout: take.scan_timeout,
                agent_port: take.agent_port,
                drive_copies: vec![("root".into(), disk.clone())],
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{name}: checkpoint: {}", explain(e.to_string())));
        assert_eq!(
            result.omission.is_some(),
            take.mode != Mode::Full,
            "{name}: an omission report exactly when the mode omits"
        );
        let o = result.omission.clone().unwrap_or_default();
        println!(
            "measured: round {name}: {} MiB stored, pause {} ms (drive copy {} ms), scan {} ms, \
             hints {} ms; pages: {} saved, {} zero, {} on disk, {} free; reported {} cache, \
             {} hinted free; rejected: guest write {}, VMM write {}, disk write {}, validation {}, \
             verification {}; verified {} ({} differing); degraded: {:?}",
            result.stored_bytes >> 20,
            result.pause.as_millis(),
            result.drive_copy.as_millis(),
            o.scan_us / 1000,
            o.hint_us / 1000,
            result.pages_saved,
            result.pages_zero,
            result.pages_disk,
            result.pages_free,
            o.pages_reported_cache,
            o.pages_hinted_free,
            o.rejected_guest_write,
            o.rejected_vmm_write,
            o.rejected_disk_write,
            o.rejected_validation,
            o.rejected_verification,
            o.pages_verified,
            o.pages_mismatched,
            o.degraded
        );
        assert_eq!(
            result.pages_saved + result.pages_zero + result.pages_disk + result.pages_free,
            self.mem_mib * 256,
            "{name}: every page is accounted for"
        );
        assert_eq!(o.pages_omitted_cache, result.pages_disk, "{name}");
        assert_eq!(o.pages_omitted_free, result.pages_free, "{name}");
        (result, file, disk)
    }

    /// Restores `file` on `disk` with `cid` in `work/name`, and checks the guest: the workload
    /// verifies every page and file, and the page cache under `coherent_dirs` agrees with the
    /// disk. Runs `first` in the guest before the checks (to stop loops the checkpoint caught
    /// running).
    #[allow(clippy::too_many_arguments)]
    pub async fn restore_and_check(
        &self,
        work: &Path,
        name: &str,
        file: &Path,
        disk: &Path,
        cid: u32,
        first: &str,
        coherent_dirs: &str,
    ) -> (TestVm, AgentClient<Channel>) {
        let dir = work.join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let vm = TestVm::restore(file, &dir, Some(disk), cid);
        let status = bounded(RESTORE_LIMIT, vm.control().await.status(), || {
            format!(
                "{name}: the restored VM's status\n{}",
                vm.process.transcript()
            )
        })
        .await
        .expect("status");
        let restored = status.restored.clone().expect("restored");
        println!(
            "measured: restore {name}: memory {} ms, disk-referenced pages {} ({} ms), total {} ms",
            restored.memory.as_millis(),
            restored.pages_disk,
            restored.disk.as_millis(),
            restored.total.as_millis()
        );
        let mut agent = agent_when_up(&vm).await;
        // The restored guest's console and the VMM's log say more than a broken connection.
        let in_guest = async |agent: &mut AgentClient<Channel>, script: &str| {
            bounded(RESTORE_LIMIT, try_sh(agent, script), || {
                format!("{name}: {script:?}\n{}", vm.process.transcript())
            })
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{name}: exec of {script:?}: {e:?}\n{}",
                    vm.process.transcript()
                )
            })
        };
        if !first.is_empty() {
            in_guest(&mut agent, first).await;
        }
        let (code, out) = in_guest(&mut agent, &verify_command()).await;
        let report: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{name}: {e}: {out}"));
        assert_eq!(code, 0, "{name}: {report}\n{}", vm.process.transcript());
        assert_eq!(count(&report["memory"]["bad_pages"]), 0, "{name}");
        assert_eq!(count(&report["files"]["checked"]), self.files, "{name}");
        let (code, out) = in_guest(&mut agent, &coherence_check(coherent_dirs)).await;
        assert_eq!(code, 0, "{name}: page cache and disk disagree: {out}");
        println!(
            "{name}: {} files agree through the cache and on disk",
            out.trim()
        );
        (vm, agent)
    }
}

/// How long a restore may take before the test gives up on it and shows the VMM's log.
pub const RESTORE_LIMIT: Duration = Duration::from_secs(300);

/// Awaits `work` for at most `limit`; past it, panics with `what()` (which should say what
/// hung and include the VMM's transcript), so a hang shows its cause instead of stalling the
/// run.
pub async fn bounded<T>(
    limit: Duration,
    work: impl Future<Output = T>,
    what: impl FnOnce() -> String,
) -> T {
    match tokio::time::timeout(limit, work).await {
        Ok(value) => value,
        Err(_) => panic!("{} did not finish within {limit:?}", what()),
    }
}

/// A shell check that the page cache agrees with the disk under `dirs`: the hashes through the
/// cache (after `sync` wrote every dirty page back) equal those read after dropping the cache.
pub fn coherence_check(dirs: &str) -> String {
    format!(
        "sync; find {dirs} -type f | sort | xargs sha256sum > /tmp/cached; \
         echo 3 > /proc/sys/vm/drop_caches; \
         find {dirs} -type f | sort | xargs sha256sum > /tmp/ondisk; \
         if cmp -s /tmp/cached /tmp/ondisk; then wc -l < /tmp/cached; \
         else diff /tmp/cached /tmp/ondisk; exit 1; fi"
    )
}

/// Degradations other than the balloon's (which the guest may lack).
pub fn agent_degradations(o: &OmissionReport) -> Vec<&String> {
    o.degraded
        .iter()
        .filter(|d| !d.contains("balloon"))
        .collect()
}

/// The guest agent of a restored VM, waiting up to 30 s for it: a guest checkpointed while its
/// agent was dead gets it back when busybox init starts it again.
pub async fn agent_when_up(vm: &TestVm) -> AgentClient<Channel> {
    vm.control().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match ditto_host::agent::connect(&vm.uds, AGENT_PORT, Duration::from_secs(5)).await {
            Ok(c) => return c.max_decoding_message_size(ditto_host::agent::MAX_REPLY_BYTES),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!(
                "the restored guest's agent: {e}\n{}",
                vm.process.transcript()
            ),
        }
    }
}

/// Removes the files of a finished round (the box keeps /tmp in RAM).
pub fn discard(files: &[&Path]) {
    for f in files {
        let _ = std::fs::remove_file(f);
    }
}

/// A restore of `file` on `disk` must fail before any guest runs, naming the hash check.
pub fn refused(work: &Path, name: &str, file: &Path, disk: &Path, cid: u32) {
    let dir = work.join(name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let t = Instant::now();
    let mut vm = TestVm::restore(file, &dir, Some(disk), cid);
    let status = vm.process.wait_exit(Duration::from_secs(300));
    assert!(!status.success(), "{name}: the restore must refuse");
    let stderr = vm.process.stderr_text();
    assert!(stderr.contains("does not match drive"), "{name}: {stderr}");
    assert!(
        vm.process.console_text().is_empty(),
        "{name}: no guest ran: {}",
        vm.process.console_text()
    );
    println!(
        "{name}: refused after {} ms: {}",
        t.elapsed().as_millis(),
        stderr.trim()
    );
}
