//! The command line: a clear error without the capability, clap errors for unknown options, and
//! a JSON document from `scan --json`.

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
