//! The real binary on this machine: `run` with 64 MiB of anonymous memory and files in a temp
//! folder, `verify` passing with a heartbeat that advances, a flipped byte in a file on disk and
//! a flipped bit in an anonymous page each making `verify` exit 1 and name the culprit, `stop`,
//! and the exit status 2 for usage and connection errors.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const WORKLOAD: &str = env!("CARGO_BIN_EXE_ditto-workload");

/// A `ditto-workload run` process, stopped (or killed) when dropped.
struct Running {
    child: Child,
    control: PathBuf,
    files: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Running {
    fn start(anon_mib: u64, extra: &[&str]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let control = tmp.path().join("ctl.sock");
        let files = tmp.path().join("files");
        let child = Command::new(WORKLOAD)
            .args([
                "run",
                "--anon-mib",
                &anon_mib.to_string(),
                "--seed",
                "12345",
            ])
            .arg("--control")
            .arg(&control)
            .arg("--files")
            .arg(&files)
            .args(["--file-count", "4", "--file-mib", "8"])
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let running = Self {
            child,
            control,
            files,
            _tmp: tmp,
        };
        let status = running.cmd(&["status", "--json", "--wait", "60"]);
        assert!(status.status.success(), "{}", text(&status));
        running
    }

    fn cmd(&self, args: &[&str]) -> Output {
        Command::new(WORKLOAD)
            .args(args)
            .arg("--control")
            .arg(&self.control)
            .output()
            .unwrap()
    }

    fn verify(&self) -> (Option<i32>, Value) {
        let out = self.cmd(&["verify", "--json"]);
        let report =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
        (out.status.code(), report)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn file(dir: &Path, index: u32) -> PathBuf {
    dir.join(format!("ditto-workload-{index:04}.bin"))
}

#[test]
fn a_running_workload_verifies_keeps_beating_and_stops() {
    let mut w = Running::start(64, &[]);
    let status: Value = serde_json::from_slice(&w.cmd(&["status", "--json"]).stdout).unwrap();
    assert_eq!(status["anon_pages"], 64 * 256);
    assert_eq!(status["files"]["count"], 4);
    assert_eq!(status["files"]["bytes"], 8 << 20);
    assert_eq!(status["pid"], w.child.id());

    let (code, first) = w.verify();
    assert_eq!(code, Some(0), "{first}");
    assert_eq!(first["ok"], true);
    assert_eq!(first["memory"]["pages_checked"], 64 * 256);
    assert_eq!(first["memory"]["bad_pages"], 0);
    assert_eq!(first["files"]["checked"], 4);
    assert_eq!(first["files"]["bytes_read"], 8 << 20);
    assert_eq!(first["files"]["bad"], 0);
    assert_eq!(first["previous_heartbeats"], Value::Null);
    let memory = &first["memory"];
    println!(
        "measured: verify of {} MiB anonymous memory took {} us ({:.0} MiB/s, debug build)",
        memory["bytes_checked"].as_u64().unwrap() >> 20,
        memory["elapsed_us"],
        64.0 / (memory["elapsed_us"].as_f64().unwrap() / 1e6)
    );

    std::thread::sleep(Duration::from_millis(350));
    let (code, second) = w.verify();
    assert_eq!(code, Some(0), "{second}");
    assert_eq!(second["previous_heartbeats"], first["heartbeats"]);
    assert!(
        second["heartbeats"].as_u64().unwrap() > first["heartbeats"].as_u64().unwrap(),
        "{first}\n{second}"
    );
    assert!(second["uptime_ms"].as_u64().unwrap() >= first["uptime_ms"].as_u64().unwrap() + 350);

    let human = w.cmd(&["verify"]);
    assert!(human.status.success(), "{}", text(&human));
    assert!(text(&human).contains("verify: ok"), "{}", text(&human));

    let stop = w.cmd(&["stop"]);
    assert!(stop.status.success(), "{}", text(&stop));
    let start = Instant::now();
    let exit = loop {
        if let Some(exit) = w.child.try_wait().unwrap() {
            break exit;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "still running");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit}");
    assert!(!w.control.exists(), "the socket is removed");
    // The files stay: they are the workload's output.
    assert!(file(&w.files, 0).exists());
}

#[test]
fn a_flipped_byte_in_a_file_on_disk_is_named_and_fails_verify() {
    let w = Running::start(8, &[]);
    let victim = file(&w.files, 2);
    let disk = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&victim)
        .unwrap();
    let mut byte = [0u8];
    disk.read_exact_at(&mut byte, 1_000_000).unwrap();
    disk.write_all_at(&[!byte[0]], 1_000_000).unwrap();
    disk.sync_all().unwrap();

    let (code, report) = w.verify();
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["ok"], false);
    assert_eq!(report["memory"]["bad_pages"], 0);
    assert_eq!(report["files"]["bad"], 1);
    assert_eq!(
        report["files"]["bad_files"][0]["path"],
        victim.display().to_string()
    );
    let human = w.cmd(&["verify"]);
    assert_eq!(human.status.code(), Some(1));
    let out = text(&human);
    assert!(
        out.contains(&format!("bad file: {}: content differs", victim.display())),
        "{out}"
    );
    assert!(out.contains("verify: MISMATCH"), "{out}");

    // Put the byte back: the workload did not cache a verdict, it reads the disk each time.
    disk.write_all_at(&byte, 1_000_000).unwrap();
    assert_eq!(w.verify().0, Some(0));
}

#[test]
fn a_flipped_bit_in_anonymous_memory_is_named_and_fails_verify() {
    let w = Running::start(64, &[]);
    let status = |w: &Running| -> Value {
        serde_json::from_slice(&w.cmd(&["status", "--json"]).stdout).unwrap()
    };
    // One page a few heartbeats ahead of the heartbeat's cursor (it re-checks pages in turn and
    // must leave a wrong one wrong) and one it will not reach for minutes.
    let ahead = status(&w)["touched_pages"].as_u64().unwrap() + 40;
    for page in [ahead, 12345] {
        let out = w.cmd(&["corrupt-page", &page.to_string()]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let began = Instant::now();
    while status(&w)["touched_pages"].as_u64().unwrap() <= ahead + 4 {
        assert!(began.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, report) = w.verify();
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["memory"]["bad_pages"], 2);
    assert_eq!(
        report["memory"]["first_bad_pages"],
        serde_json::json!([ahead, 12345])
    );
    assert_eq!(report["files"]["bad"], 0);
    let status = status(&w);
    assert_eq!(status["touch_bad_pages"].as_u64().unwrap(), 1, "{status}");

    let human = text(&w.cmd(&["verify"]));
    assert!(
        human.contains(&format!("2 bad (first: {ahead}, 12345)")),
        "{human}"
    );

    // A page outside the region is refused with a clear error.
    let out = w.cmd(&["corrupt-page", &(64 * 256).to_string()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("outside the region"), "{}", text(&out));
}

#[test]
fn page_cache_folders_are_read_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fs::create_dir_all(data.join("sub")).unwrap();
    fs::write(data.join("a"), vec![1u8; 100_000]).unwrap();
    fs::write(data.join("sub/b"), vec![2u8; 23]).unwrap();
    let w = Running::start(1, &["--read", data.to_str().unwrap()]);
    let status: Value = serde_json::from_slice(&w.cmd(&["status", "--json"]).stdout).unwrap();
    assert_eq!(status["page_cache"]["files"], 2, "{status}");
    assert_eq!(status["page_cache"]["bytes"], 100_023);
    assert_eq!(status["page_cache"]["errors"], 0);
}

#[test]
fn usage_and_connection_errors_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let nowhere = tmp.path().join("nobody.sock");
    for args in [
        vec!["verify"],
        vec!["run", "--seed", "1", "--control", "x"],
        vec![
            "run",
            "--anon-mib",
            "1",
            "--seed",
            "1",
            "--control",
            "x",
            "--files",
            "d",
        ],
        vec![
            "run",
            "--anon-mib",
            "1",
            "--seed",
            "1",
            "--control",
            "x",
            "--file-count",
            "2",
        ],
        vec!["run", "--anon-mib", "-1", "--seed", "1", "--control", "x"],
        vec![
            "run",
            "--anon-mib",
            "1",
            "--seed",
            "1",
            "--control",
            "x",
            "--files",
            "d",
            "--file-count",
            "0",
            "--file-mib",
            "1",
        ],
    ] {
        let out = Command::new(WORKLOAD).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
    }
    for cmd in ["verify", "status", "stop"] {
        let out = Command::new(WORKLOAD)
            .args([cmd, "--control"])
            .arg(&nowhere)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{cmd}: {}", text(&out));
        assert!(text(&out).contains("no workload serves"), "{}", text(&out));
    }
    // --wait gives up after its time.
    let start = Instant::now();
    let out = Command::new(WORKLOAD)
        .args(["status", "--wait", "1", "--control"])
        .arg(&nowhere)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(start.elapsed() >= Duration::from_secs(1));

    // A folder to read that does not exist is refused before anything is set up.
    let out = Command::new(WORKLOAD)
        .args(["run", "--anon-mib", "1", "--seed", "1", "--control"])
        .arg(&nowhere)
        .arg("--read")
        .arg(tmp.path().join("missing"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("missing"), "{}", text(&out));
    assert!(!nowhere.exists());

    // Something that is not a socket at the control path is left alone.
    fs::write(&nowhere, b"precious").unwrap();
    let out = Command::new(WORKLOAD)
        .args(["run", "--anon-mib", "1", "--seed", "1", "--control"])
        .arg(&nowhere)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("not a socket"), "{}", text(&out));
    assert_eq!(fs::read(&nowhere).unwrap(), b"precious");
}

#[test]
fn a_second_workload_on_a_live_socket_is_refused_and_a_stale_one_is_replaced() {
    let mut w = Running::start(1, &[]);
    let out = Command::new(WORKLOAD)
        .args(["run", "--anon-mib", "1", "--seed", "1", "--control"])
        .arg(&w.control)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("another workload"), "{}", text(&out));
    assert_eq!(w.verify().0, Some(0), "the first one still serves");

    // Killed without a chance to clean up: its socket stays behind, stale.
    w.child.kill().unwrap();
    w.child.wait().unwrap();
    assert!(w.control.exists());
    let mut again = Command::new(WORKLOAD)
        .args(["run", "--anon-mib", "1", "--seed", "2", "--control"])
        .arg(&w.control)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let status = w.cmd(&["status", "--json", "--wait", "30"]);
    let _ = again.kill();
    let _ = again.wait();
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["seed"], 2);
}
