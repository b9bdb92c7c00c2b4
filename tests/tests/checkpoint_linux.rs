//! Checkpoint and restore of a Linux guest under ditto-vmm, in the KVM test box. A 1 GiB guest
//! runs `ditto-workload` with 300 MiB of anonymous memory and fsynced files; it is checkpointed
//! through the control socket while it keeps running (its disk copied while it was paused for
//! it) and again with a stop. Each checkpoint restores into new `ditto-vmm restore` processes —
//! two clones at once from one file, one on the stopped VM's own disk and one on a copy, with
//! their own vsock cids and sockets — whose
//! workload verifies every page and file, is the same process with its heartbeat carrying on,
//! and whose clock did not go back. Damaged copies of the file are refused before any guest
//! runs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ditto_host::control::{AfterCheckpoint, CheckpointSpec, VmState};
use ditto_tests::microvm::images_dir;
use ditto_tests::vmm::{TestVm as Vm, VmmProcess, sparse_copy, uptime};
use ditto_tests::workload::{CONTROL, WORKLOAD, count, sh, try_sh, verify};
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(240);
const MEM_MIB: u64 = 1024;
const ANON_MIB: u64 = 300;
const FILE_MIB: u64 = 8;
const FILES: u64 = 4;

/// Checks a restored workload against the report taken just before the checkpoint: intact,
/// the same process, its heartbeat carried on from where it was.
fn assert_continues(before: &Value, after: &Value, what: &str) {
    assert_eq!(after["ok"], true, "{what}: {after}");
    assert_eq!(
        count(&after["memory"]["pages_checked"]),
        ANON_MIB * 256,
        "{what}"
    );
    assert_eq!(count(&after["memory"]["bad_pages"]), 0, "{what}: {after}");
    assert_eq!(count(&after["files"]["checked"]), FILES, "{what}");
    assert_eq!(after["pid"], before["pid"], "{what}: the same process");
    assert_eq!(
        after["previous_heartbeats"], before["heartbeats"],
        "{what}: the workload's last verify was the one before the checkpoint"
    );
    assert!(
        count(&after["heartbeats"]) > count(&before["heartbeats"]),
        "{what}: the heartbeat carries on\n{before}\n{after}"
    );
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// Flips one byte of a copy of `file` at `at` (from the end when negative), or truncates it.
fn damaged_copy(file: &Path, dst: &Path, damage: &str) {
    std::fs::copy(file, dst).expect("copy the checkpoint");
    let len = std::fs::metadata(dst).expect("len").len();
    match damage {
        "truncate" => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(dst)
                .expect("open");
            f.set_len(len / 2).expect("truncate");
        }
        "flip" => {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(dst)
                .expect("open");
            // A saved page in the middle of the chunk data.
            let at = len / 3;
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, at).expect("read");
            b[0] ^= 0x10;
            f.write_all_at(&b, at).expect("write");
        }
        other => panic!("unknown damage {other}"),
    }
}

#[test]
#[ignore = "boots Linux: runs in the KVM test box"]
fn checkpointed_guests_restore_with_their_memory_and_files_and_keep_running() {
    let images = images_dir().expect("images");
    let work = tempfile::tempdir().expect("tmp");
    let dir = |name: &str| {
        let d = work.path().join(name);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    };
    let original_dir = dir("original");
    let root = original_dir.join("rootfs.ext4");
    sparse_copy(&images.join("rootfs.ext4"), &root).expect("root copy");
    let booted = Instant::now();
    let mut original = Vm::boot(&original_dir, &root, 3, MEM_MIB);
    original.process.wait_for("ditto-agent serving", BOOT);
    println!(
        "measured: boot of the {MEM_MIB} MiB guest to a serving agent: {:.1} s",
        booted.elapsed().as_secs_f64()
    );
    let ckpt_dir = dir("checkpoints");
    let running_ckpt = ckpt_dir.join("running.ditto");
    let stopped_ckpt = ckpt_dir.join("stopped.ditto");
    let running_root = ckpt_dir.join("running-root.ext4");

    ditto_tests::block_on(async {
        let mut agent = original.agent().await;
        let (code, _) = sh(
            &mut agent,
            &format!(
                "setsid {WORKLOAD} run --anon-mib {ANON_MIB} --seed 99 --control {CONTROL} \
                 --files /root/workload --file-count {FILES} --file-mib {FILE_MIB} \
                 </dev/null >/dev/null 2>&1 &"
            ),
        )
        .await;
        assert_eq!(code, 0);
        let (code, out) = sh(
            &mut agent,
            &format!("{WORKLOAD} status --json --wait 600 --control {CONTROL}"),
        )
        .await;
        assert_eq!(code, 0, "{out}");
        let control = original.control().await;

        // Destinations that cannot be written are refused before the guest is paused.
        for bad in ["/nonexistent-folder/c.ditto", "/proc/c.ditto"] {
            let refused = control
                .checkpoint(CheckpointSpec {
                    path: PathBuf::from(bad),
                    after: AfterCheckpoint::Stop,
                    uncompressed: false,
                    ..Default::default()
                })
                .await
                .expect_err("not writable");
            assert_eq!(
                refused.code(),
                Some(tonic::Code::InvalidArgument),
                "{bad}: {refused}"
            );
        }
        assert_eq!(
            control.status().await.expect("status").state,
            VmState::Running,
            "the VM runs on"
        );

        // Checkpoint while running: paused for the disk copy and the checkpoint, then on.
        let (code, before_running) = verify(&mut agent).await;
        assert_eq!(code, 0, "{before_running}");
        let uptime_at_running = uptime(&mut agent).await;
        assert_eq!(control.pause().await.expect("pause").state, VmState::Paused);
        sparse_copy(&root, &running_root).expect("disk copy");
        let result = control
            .checkpoint(CheckpointSpec {
                path: running_ckpt.clone(),
                after: AfterCheckpoint::Resume,
                uncompressed: false,
                ..Default::default()
            })
            .await
            .expect("checkpoint of a paused VM");
        assert_eq!(result.state, VmState::Paused, "a paused VM stays paused");
        assert_eq!(
            control.resume().await.expect("resume").state,
            VmState::Running
        );
        assert_eq!(result.pages_disk, 0);
        assert_eq!(result.pages_free, 0);
        let total_pages = result.pages_saved + result.pages_zero;
        assert_eq!(total_pages, MEM_MIB * 256, "every page is saved or zero");
        assert!(
            result.pages_saved >= ANON_MIB * 256,
            "the workload's pages are saved: {result:?}"
        );
        // The original runs on, intact.
        let (code, after) = verify(&mut agent).await;
        assert_eq!(code, 0, "{after}");
        assert_continues(&before_running, &after, "the original after its checkpoint");

        // Checkpoint with a stop, timed from the caller: the VMM ends cleanly.
        let (code, before_stop) = verify(&mut agent).await;
        assert_eq!(code, 0, "{before_stop}");
        let uptime_at_stop = uptime(&mut agent).await;
        let t = Instant::now();
        let stopped = control
            .checkpoint(CheckpointSpec {
                path: stopped_ckpt.clone(),
                after: AfterCheckpoint::Stop,
                uncompressed: false,
                ..Default::default()
            })
            .await
            .expect("checkpoint and stop");
        let checkpoint_wall = t.elapsed();
        assert_eq!(stopped.state, VmState::Stopped);
        let status = original.process.wait_exit(Duration::from_secs(60));
        assert!(
            status.success(),
            "{status}\n{}",
            original.process.transcript()
        );
        assert!(
            original.process.stderr_text().contains("checkpointed to"),
            "{}",
            original.process.stderr_text()
        );
        println!(
            "measured: full checkpoint of the {MEM_MIB} MiB guest ({ANON_MIB} MiB workload): \
             {:.1} MiB stored in a {:.1} MiB file ({} pages saved, {} zero); \
             pause {} ms, total {} ms in the VMM, {} ms at the caller",
            mib(stopped.stored_bytes),
            mib(stopped.file_bytes),
            stopped.pages_saved,
            stopped.pages_zero,
            stopped.pause.as_millis(),
            stopped.total.as_millis(),
            checkpoint_wall.as_millis()
        );
        drop(agent);

        // Two clones of the stopped checkpoint at once: one on the very disk the stopped VM had
        // (no --drive: the same file), one on a copy made before either runs.
        let copy_dir = dir("clone-b");
        let copy = copy_dir.join("rootfs.ext4");
        sparse_copy(&root, &copy).expect("disk copy");
        let mut clones = Vec::new();
        for (name, cid, disk) in [("clone-a", 4, None), ("clone-b", 5, Some(copy.as_path()))] {
            let d = dir(name);
            let t = Instant::now();
            let vm = Vm::restore(&stopped_ckpt, &d, disk, cid);
            clones.push((name, cid, vm, t));
        }
        for (name, cid, vm, t) in &clones {
            let control = vm.control().await;
            let status = control.status().await.expect("status");
            let running_after = t.elapsed();
            assert_eq!(status.state, VmState::Running, "{name}");
            assert_eq!(status.vsock.as_ref().map(|v| v.guest_cid), Some(*cid));
            let restored = status.restored.expect("the status says it was restored");
            assert_eq!(restored.checkpoint, stopped_ckpt);
            assert_eq!(restored.pages_saved, stopped.pages_saved);
            println!(
                "measured: restore of {name} (cid {cid}): memory filled in {} ms, VM ready in \
                 {} ms in the VMM, running {} ms after the process started",
                restored.memory.as_millis(),
                restored.total.as_millis(),
                running_after.as_millis()
            );
            // The device drops packets that do not come from the clone's cid: the agent answers
            // only if the guest took the new one from the transport reset.
            let mut agent = vm.agent().await;
            let verify_cmd = format!("{WORKLOAD} verify --json --control {CONTROL}");
            let (code, out) = match try_sh(&mut agent, &verify_cmd).await {
                Ok(r) => r,
                Err(status) => {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    panic!(
                        "{name}: the first exec after the restore failed: {status:?}\n{}",
                        vm.process.transcript()
                    )
                }
            };
            let after: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
            assert_eq!(code, 0, "{name}: {after}\n{}", vm.process.transcript());
            assert_continues(&before_stop, &after, name);
            let up = uptime(&mut agent).await;
            assert!(
                up >= uptime_at_stop,
                "{name}: the guest clock went back: {up} < {uptime_at_stop}"
            );
            // The files are readable and writable on the clone's own disk.
            let (code, out) = sh(
                &mut agent,
                &format!("echo {name} > /root/who && sync && cat /root/who"),
            )
            .await;
            assert_eq!((code, out.trim()), (0, *name));
        }
        drop(clones);

        // The checkpoint taken while running restores too, on the disk copied with it.
        let d = dir("from-running");
        let vm = Vm::restore(&running_ckpt, &d, Some(&running_root), 6);
        let mut agent = vm.agent().await;
        let (code, after) = verify(&mut agent).await;
        assert_eq!(code, 0, "{after}\n{}", vm.process.transcript());
        assert_continues(&before_running, &after, "restore of the running checkpoint");
        assert!(uptime(&mut agent).await >= uptime_at_running);
        drop(agent);
        drop(vm);
    });

    // Damaged copies are refused before any guest runs.
    for damage in ["truncate", "flip"] {
        let d = dir(&format!("damaged-{damage}"));
        let copy = d.join("damaged.ditto");
        damaged_copy(&stopped_ckpt, &copy, damage);
        let disk = d.join("rootfs.ext4");
        sparse_copy(&root, &disk).expect("disk copy");
        let mut vm = Vm::restore(&copy, &d, Some(&disk), 7);
        let status = vm.process.wait_exit(Duration::from_secs(120));
        assert!(
            !status.success(),
            "{damage}: restore of a damaged file must fail"
        );
        let stderr = vm.process.stderr_text();
        assert!(stderr.contains("cannot restore from"), "{damage}: {stderr}");
        assert!(
            vm.process.console_text().is_empty(),
            "{damage}: no guest ran: {}",
            vm.process.console_text()
        );
        println!("{damage}: refused: {}", stderr.trim());
        std::fs::remove_file(&copy).expect("remove the damaged copy");
    }

    // A drive the checkpoint does not have, and a missing image, are refused before memory is
    // touched.
    let d = dir("bad-drives");
    let missing = d.join("missing.ext4");
    for (drive, expect) in [
        (
            format!("id=nope,path={}", root.display()),
            "is not a drive of the checkpointed VM",
        ),
        (
            format!("id=root,path={}", missing.display()),
            "cannot open disk image",
        ),
    ] {
        let mut vm = VmmProcess::restore(&stopped_ckpt, &d, &["--drive", &drive]);
        let status = vm.wait_exit(Duration::from_secs(120));
        assert!(!status.success(), "{drive}");
        let stderr = vm.stderr_text();
        assert!(stderr.contains(expect), "{drive}: {stderr}");
    }

    // A drive of another size is refused.
    let d = dir("wrong-size");
    let disk = d.join("rootfs.ext4");
    sparse_copy(&root, &disk).expect("disk copy");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .expect("open");
    f.set_len(f.metadata().expect("len").len() + (1 << 20))
        .expect("grow");
    let mut vm = Vm::restore(&stopped_ckpt, &d, Some(&disk), 8);
    let status = vm.process.wait_exit(Duration::from_secs(120));
    assert!(!status.success());
    let stderr = vm.process.stderr_text();
    assert!(stderr.contains("sectors but the guest knew"), "{stderr}");
}
