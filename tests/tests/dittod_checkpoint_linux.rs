//! Checkpoints through the real `dittod` and `dittoctl`, in the KVM test box: a guest running
//! `ditto-workload` is checkpointed while it keeps running and then with `--stop`; the stopped
//! checkpoint restores twice at once (two clones with their own names, vsock cids and disk
//! copies) and both verify every page and file and carry on; restoring under a taken name,
//! from a damaged or unknown checkpoint, and checkpointing a VM that does not run are refused
//! with the codes the API promises, and a refused restore leaves no VM behind.

use std::path::{Path, PathBuf};

use ditto_tests::dittod::Daemon;
use ditto_tests::microvm::{guest_kernel, images_dir};
use ditto_tests::vmm::{BASE_CMDLINE, sparse_copy};
use ditto_tests::workload::{CONTROL, WORKLOAD};
use serde_json::Value;

const BOOT_SECS: &str = "240";
const ANON_MIB: u64 = 200;
const FILES: u64 = 3;

fn count(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// `dittoctl exec NAME -- sh -c SCRIPT`: exit status and standard output; standard error is
/// printed, so a failure shows what the guest (or dittoctl) said.
fn sh(daemon: &Daemon, name: &str, script: &str) -> (i32, String) {
    let out = daemon.ctl(&[
        "exec",
        name,
        "--timeout",
        "600",
        "--",
        "/bin/sh",
        "-c",
        script,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !stderr.trim().is_empty() {
        eprintln!("{name}: `{script}` ({}): {stderr}", out.status);
    }
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The workload's `verify --json` report in VM `name`, which must pass.
fn verify(daemon: &Daemon, name: &str) -> Value {
    let (code, out) = sh(
        daemon,
        name,
        &format!("{WORKLOAD} verify --json --control {CONTROL}"),
    );
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| {
        panic!(
            "{name}: verify exited with {code} and no report ({e}): {out:?}\ndittod log:\n{}",
            daemon.log_text()
        )
    });
    assert_eq!(code, 0, "{name}: {report}");
    assert_eq!(count(&report["memory"]["pages_checked"]), ANON_MIB * 256);
    assert_eq!(count(&report["memory"]["bad_pages"]), 0, "{name}: {report}");
    assert_eq!(count(&report["files"]["checked"]), FILES);
    report
}

fn checkpoint_file(daemon: &Daemon, id: &str) -> PathBuf {
    daemon
        .state_dir
        .join("checkpoints")
        .join(id)
        .join("checkpoint.ditto")
}

fn names(daemon: &Daemon) -> Vec<String> {
    daemon
        .ctl_json(&["list"])
        .as_array()
        .expect("a list")
        .iter()
        .map(|v| v["name"].as_str().expect("name").to_owned())
        .collect()
}

fn flip_byte(file: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .expect("open");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).expect("read");
    b[0] ^= 0x40;
    f.write_all_at(&b, at).expect("write");
}

#[test]
#[ignore = "boots Linux: runs in the KVM test box"]
fn checkpoints_restore_as_clones_through_dittod_and_bad_requests_are_refused() {
    let images = images_dir().expect("images");
    let work = tempfile::tempdir().expect("tmp");
    let daemon = Daemon::start(&work.path().join("state"), &[]);
    let root = work.path().join("root.ext4");
    sparse_copy(&images.join("rootfs.ext4"), &root).expect("root copy");
    let s = |p: PathBuf| p.to_str().expect("utf8").to_owned();
    let mut create = vec!["create".to_owned(), "origin".into()];
    create.extend(guest_kernel(&images).args());
    create.extend([
        "--cmdline".into(),
        format!("{BASE_CMDLINE} rw"),
        "--vcpus".into(),
        "1".into(),
        "--mem-mib".into(),
        "512".into(),
        "--drive".into(),
        format!("id=root,path={}", root.display()),
    ]);
    daemon.ctl_json(&create.iter().map(String::as_str).collect::<Vec<_>>());
    daemon.ctl_json(&["start", "origin", "--wait", "--wait-timeout", BOOT_SECS]);
    let (code, out) = sh(
        &daemon,
        "origin",
        &format!(
            "setsid {WORKLOAD} run --anon-mib {ANON_MIB} --seed 5 --control {CONTROL} \
             --files /root/workload --file-count {FILES} --file-mib 4 \
             </dev/null >/dev/null 2>&1 & {WORKLOAD} status --json --wait 600 --control {CONTROL}"
        ),
    );
    assert_eq!(code, 0, "{out}");
    let first = verify(&daemon, "origin");

    // A destination that is not a folder is refused before anything is paused.
    let err = daemon.ctl_fails(
        &[
            "checkpoint",
            "origin",
            "--destination",
            "/nonexistent-folder",
        ],
        "InvalidArgument",
    );
    assert!(err.contains("destination"), "{err}");

    // A checkpoint of the running VM into a folder of the caller's: it runs on, intact.
    let dest = work.path().join("dest");
    std::fs::create_dir(&dest).expect("mkdir");
    let running = daemon.ctl_json(&["checkpoint", "origin", "--destination", &s(dest.clone())]);
    let running_file = PathBuf::from(running["path"].as_str().expect("path"));
    assert!(running_file.starts_with(&dest), "{running}");
    assert!(running_file.is_file());
    for field in ["id", "stored_bytes", "pause_ms", "total_ms"] {
        assert!(!running[field].is_null(), "{field} in {running}");
    }
    assert_eq!(running["vm"]["state"], "running", "{running}");
    assert!(count(&running["stored_bytes"]) > 0);
    assert!(
        count(&running["disk_copy_bytes"]) > 0,
        "the root disk is copied"
    );
    assert!(
        count(&running["pages"]["saved"]) >= ANON_MIB * 256,
        "{running}"
    );
    println!(
        "measured: dittod checkpoint of a running 512 MiB guest ({ANON_MIB} MiB workload): \
         {} stored bytes, {} bytes of disk copies, pause {} ms, total {} ms",
        running["stored_bytes"],
        running["disk_copy_bytes"],
        running["pause_ms"],
        running["total_ms"]
    );
    let after = verify(&daemon, "origin");
    assert_eq!(after["pid"], first["pid"]);
    assert!(count(&after["heartbeats"]) > count(&first["heartbeats"]));

    // A checkpoint with --stop: the VM ends with it.
    let before_stop = verify(&daemon, "origin");
    let stopped = daemon.ctl_json(&["checkpoint", "origin", "--mode", "full", "--stop"]);
    let stopped_id = stopped["id"].as_str().expect("id").to_owned();
    let origin = daemon.ctl_json(&["get", "origin"]);
    assert_eq!(origin["state"], "stopped", "{origin}");
    assert!(
        origin["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("checkpointed")),
        "{origin}"
    );
    daemon.ctl_fails(&["checkpoint", "origin"], "FailedPrecondition");
    // The name is taken by the stopped original.
    daemon.ctl_fails(&["restore", &stopped_id], "AlreadyExists");

    // Two clones from one checkpoint, at once.
    let mut cids = Vec::new();
    for clone in ["clone-a", "clone-b"] {
        let vm = daemon.ctl_json(&["restore", &stopped_id, "--name", clone]);
        assert_eq!(vm["state"], "running", "{vm}");
        assert!(!vm["total_ms"].is_null(), "{vm}");
        println!(
            "measured: restore of {clone}: total {} ms (memory {} ms, disk copies {} ms)",
            vm["total_ms"], vm["memory_ms"], vm["disk_copy_ms"]
        );
        cids.push(vm["spec"]["vsock_cid"].clone());
        let drive = vm["spec"]["drives"][0]["path"].as_str().expect("path");
        assert_ne!(Path::new(drive), root, "a clone writes its own disk copy");
    }
    assert_ne!(cids[0], cids[1], "each clone has its own vsock cid");
    daemon.ctl_fails(
        &["restore", &stopped_id, "--name", "clone-a"],
        "AlreadyExists",
    );
    for clone in ["clone-a", "clone-b"] {
        let report = verify(&daemon, clone);
        assert_eq!(
            report["pid"], before_stop["pid"],
            "{clone}: the same process"
        );
        assert_eq!(
            report["previous_heartbeats"], before_stop["heartbeats"],
            "{clone}"
        );
        assert!(count(&report["heartbeats"]) > count(&before_stop["heartbeats"]));
        let (code, out) = sh(
            &daemon,
            clone,
            &format!("echo {clone} > /root/who && sync && cat /root/who"),
        );
        assert_eq!((code, out.trim()), (0, clone));
    }
    for clone in ["clone-a", "clone-b"] {
        daemon.ctl_ok(&["stop", clone, "--timeout", "60"]);
        daemon.ctl_ok(&["delete", clone]);
    }

    // The checkpoints are listed; bad ids are refused.
    let list = daemon.ctl_json(&["checkpoints"]);
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");
    daemon.ctl_fails(&["restore", "0123456789abcdef0123456789abcdef"], "NotFound");
    daemon.ctl_fails(&["restore", "../../etc"], "InvalidArgument");

    // A damaged checkpoint is refused and leaves no VM: a flipped page byte is found by the
    // VMM while it fills memory, a truncated file by dittod before it starts one.
    let running_id = running["id"].as_str().expect("id").to_owned();
    let file = running_file.clone();
    let len = std::fs::metadata(&file).expect("checkpoint file").len();
    flip_byte(&file, len / 3);
    let err = daemon.ctl_fails(
        &["restore", &running_id, "--name", "bad"],
        "FailedPrecondition",
    );
    assert!(err.contains("cannot be restored"), "{err}");
    println!("flipped byte: {}", err.trim());
    assert!(!names(&daemon).contains(&"bad".to_owned()));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .expect("open")
        .set_len(len / 2)
        .expect("truncate");
    let err = daemon.ctl_fails(
        &["restore", &running_id, "--name", "bad"],
        "FailedPrecondition",
    );
    println!("truncated: {}", err.trim());
    assert!(!names(&daemon).contains(&"bad".to_owned()));

    daemon.ctl_ok(&["delete-checkpoint", &running_id]);
    daemon.ctl_fails(&["delete-checkpoint", &running_id], "NotFound");
    let list = daemon.ctl_json(&["checkpoints"]);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert!(
        !daemon
            .state_dir
            .join("checkpoints")
            .join(&running_id)
            .exists(),
        "the record's folder is gone"
    );
    assert!(!dest.join(&running_id).exists(), "the data folder is gone");
    assert!(
        checkpoint_file(&daemon, &stopped_id).is_file(),
        "the other checkpoint is in the state directory"
    );
}
