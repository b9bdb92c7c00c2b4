//! The command line: a clear error without the capability, clap errors for unknown options,
//! a JSON document from `scan --json`, and what `serve` logs about its connections.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

mod common;

use std::os::unix::process::CommandExt;
use std::process::Command;

use ditto_agent::frames::PAGE_SIZE;

const AGENT: &str = env!("CARGO_BIN_EXE_ditto-agent");

#[test]
fn without_cap_sys_admin_the_scan_says_what_it_needs() {
    common::require_root();
    let out = Command::new(AGENT)
        .arg("scan")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("CAP_SYS_ADMIN"), "{stderr}");
}

#[test]
fn unknown_options_are_clap_errors() {
    let out = Command::new(AGENT)
        .args(["scan", "--bogus"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bogus"));
}

#[test]
fn scan_json_is_the_documented_document() {
    let fs = common::LoopFs::new(32, 4096);
    let path = fs.mnt.join("data");
    common::write_tagged(&path, 21, 10 * PAGE_SIZE, true);
    common::recache(&path);
    let out = Command::new(AGENT)
        .args(["scan", "--json", "--include-loop-devices", "--path"])
        .arg(&fs.mnt)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["page_size"], 4096);
    let disk = doc["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["path"] == fs.device.display().to_string())
        .unwrap()
        .clone();
    assert!(disk["dev"].as_str().unwrap().contains(':'));
    assert!(disk["size_bytes"].as_u64().unwrap() >= 32 << 20);
    let extents = doc["cache_extents"].as_array().unwrap();
    assert!(extents.iter().all(|e| e["disk"] == disk["id"]));
    let pages: u64 = extents.iter().map(|e| e["pages"].as_u64().unwrap()).sum();
    assert_eq!(pages, doc["summary"]["pages_reported"].as_u64().unwrap());
    assert!(pages >= 10);
    assert_eq!(doc["summary"]["method"], "walk", "--path scans by the walk");
}

#[test]
fn the_method_is_chosen_reported_and_checked() {
    let fs = common::LoopFs::new(32, 4096);
    let out = Command::new(AGENT)
        .args([
            "scan",
            "--method",
            "walk",
            "--include-loop-devices",
            "--path",
        ])
        .arg(&fs.mnt)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("method walk: "), "{stdout}");

    let out = Command::new(AGENT)
        .args(["scan", "--method", "bogus"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("walk and kpageblock"), "{stderr}");

    let out = Command::new(AGENT)
        .args(["scan", "--method", "kpageblock", "--path"])
        .arg(&fs.mnt)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot be limited to paths"), "{stderr}");

    let info = Command::new(AGENT).arg("info").output().unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("kpageblock fast path: "), "{info}");
    if std::path::Path::new("/proc/kpageblock").exists() {
        return; // a patched kernel: the box tests cover the fast path
    }
    assert!(info.contains("does not exist"), "{info}");
    let out = Command::new(AGENT)
        .args(["scan", "--method", "kpageblock"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/proc/kpageblock does not exist") && stderr.contains("--method walk"),
        "{stderr}"
    );
}

/// `serve` with its default log filter says why a client's connection failed, and says nothing
/// for a client that was served and went away.
#[test]
fn serve_logs_a_failed_connection_and_not_a_finished_one() {
    use std::io::Write;
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let log = dir.path().join("agent.log");
    /// Kills the agent however the test ends.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _agent = Killed(
        Command::new(AGENT)
            .arg("serve")
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .env_remove("RUST_LOG")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    while !socket.exists() {
        assert!(started.elapsed() < Duration::from_secs(10), "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut client = common::client(&socket).await;
        client
            .info(ditto_proto::agent::v1::InfoRequest {})
            .await
            .unwrap();
    });
    drop(runtime);
    // Not HTTP/2: the agent gives up on this connection.
    let mut junk = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\nHost: agent\r\n\r\n")
        .unwrap();
    drop(junk);
    let started = Instant::now();
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("failed serving connection") || started.elapsed() > Duration::from_secs(10)
        {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        text.matches("failed serving connection").count(),
        1,
        "one failed connection, one served: {text}"
    );
}
