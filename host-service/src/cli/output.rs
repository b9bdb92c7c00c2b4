//! What `dittoctl` prints: a table or `key: value` lines for people, JSON for scripts
//! (`--json`: one object per VM with at least `id`, `name`, `state` and `pid`; events as one
//! JSON object per line).

use std::fmt::Write as _;
use std::time::Duration;

use ditto_proto::host::v1 as pb;
use serde_json::{Value, json};

/// The lower-case name of a protobuf enum value without its prefix, or `unknown(N)`.
fn enum_name(name: Option<&str>, prefix: &str, raw: i32) -> String {
    match name {
        Some(n) => n.trim_start_matches(prefix).to_ascii_lowercase(),
        None => format!("unknown({raw})"),
    }
}

/// The lower-case name of a state (`running`), or `unknown(N)`.
pub fn state_name(state: i32) -> String {
    let name = pb::VmState::try_from(state).ok().map(|s| s.as_str_name());
    enum_name(name, "VM_STATE_", state)
}

/// The lower-case name of an event kind (`state_changed`).
pub fn event_kind_name(kind: i32) -> String {
    let name = pb::EventKind::try_from(kind).ok().map(|k| k.as_str_name());
    enum_name(name, "EVENT_KIND_", kind)
}

/// The lower-case name of a stop method (`guest_poweroff`).
pub fn stop_method_name(method: i32) -> String {
    let name = pb::StopMethod::try_from(method)
        .ok()
        .map(|m| m.as_str_name());
    enum_name(name, "STOP_METHOD_", method)
}

/// A duration for people: `3.2s`, `4m05s`, `2h03m`, `1d04h`.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{:.1}s", d.as_secs_f64()),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// A VM as JSON.
pub fn vm_json(vm: &pb::Vm) -> Value {
    let spec = vm.spec.clone().unwrap_or_default();
    json!({
        "id": vm.id,
        "name": vm.name,
        "state": state_name(vm.state),
        "pid": (vm.pid != 0).then_some(vm.pid),
        "uptime_ms": vm.uptime_ms,
        "last_error": (!vm.last_error.is_empty()).then_some(&vm.last_error),
        "created_at_ms": vm.created_at_ms,
        "dir": vm.dir,
        "spec": {
            "kernel": spec.kernel,
            "initrd": spec.initrd,
            "cmdline": spec.cmdline,
            "vcpus": spec.vcpus,
            "memory_mib": spec.memory_mib,
            "vsock_cid": spec.vsock_cid,
            "drives": spec.drives.iter().map(|d| json!({
                "id": d.id, "path": d.path, "read_only": d.read_only,
            })).collect::<Vec<_>>(),
        },
    })
}

/// A VM for people: `key: value` lines.
pub fn vm_detail(vm: &pb::Vm) -> String {
    let spec = vm.spec.clone().unwrap_or_default();
    let mut out = String::new();
    let mut line = |k: &str, v: &dyn std::fmt::Display| {
        let _ = writeln!(out, "{k:<11} {v}");
    };
    line("name:", &vm.name);
    line("id:", &vm.id);
    line("state:", &state_name(vm.state));
    if vm.pid != 0 {
        line("pid:", &vm.pid);
        line(
            "uptime:",
            &human_duration(Duration::from_millis(vm.uptime_ms)),
        );
    }
    line("vcpus:", &spec.vcpus);
    line("memory:", &format!("{} MiB", spec.memory_mib));
    line("kernel:", &spec.kernel);
    if let Some(initrd) = &spec.initrd {
        line("initrd:", initrd);
    }
    line("cmdline:", &spec.cmdline);
    for d in &spec.drives {
        line(
            "drive:",
            &format!(
                "{} {}{}",
                d.id,
                d.path,
                if d.read_only { " (ro)" } else { "" }
            ),
        );
    }
    line("vsock cid:", &spec.vsock_cid);
    line("folder:", &vm.dir);
    if !vm.last_error.is_empty() {
        line("last end:", &vm.last_error);
    }
    out
}

/// VMs for people: a table.
pub fn vm_table(vms: &[pb::Vm]) -> String {
    let rows: Vec<[String; 7]> = vms
        .iter()
        .map(|vm| {
            let spec = vm.spec.clone().unwrap_or_default();
            [
                vm.name.clone(),
                vm.id.chars().take(12).collect(),
                state_name(vm.state),
                if vm.pid == 0 {
                    "-".into()
                } else {
                    vm.pid.to_string()
                },
                spec.vcpus.to_string(),
                format!("{} MiB", spec.memory_mib),
                if vm.pid == 0 {
                    "-".into()
                } else {
                    human_duration(Duration::from_millis(vm.uptime_ms))
                },
            ]
        })
        .collect();
    let header = ["NAME", "ID", "STATE", "PID", "VCPUS", "MEMORY", "UPTIME"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    out
}

/// An event as JSON.
pub fn event_json(e: &pb::VmEvent) -> Value {
    json!({
        "vm_id": e.vm_id,
        "vm_name": e.vm_name,
        "kind": event_kind_name(e.kind),
        "state": state_name(e.state),
        "message": e.message,
        "at_ms": e.at_ms,
    })
}

/// An event for people: one line.
pub fn event_line(e: &pb::VmEvent) -> String {
    format!(
        "{} {} {} {}: {}",
        e.at_ms,
        e.vm_name,
        event_kind_name(e.kind),
        state_name(e.state),
        e.message
    )
}

/// A guest exec's result as JSON (output as lossy UTF-8).
pub fn exec_json(r: &pb::GuestExecResponse) -> Value {
    json!({
        "exit_code": r.exit_code,
        "signal": r.signal,
        "timed_out": r.timed_out,
        "stdout": String::from_utf8_lossy(&r.stdout),
        "stderr": String::from_utf8_lossy(&r.stderr),
    })
}

/// A checkpoint mode's name on the command line.
pub fn mode_name(mode: i32) -> &'static str {
    match pb::CheckpointMode::try_from(mode) {
        Ok(pb::CheckpointMode::Ditto) => "ditto",
        Ok(pb::CheckpointMode::FreeOnly) => "free-only",
        _ => "full",
    }
}

/// What a ditto or free-only checkpoint omitted, as JSON (`null` for a full one). The
/// `floor_bytes` are what no method could omit (anonymous, kernel and dirty pages: every frame
/// that is neither free nor clean page cache), from the agent's census when it sent one.
pub fn omission_json(o: Option<&ditto_proto::vmm::v1::OmissionReport>) -> Value {
    let Some(o) = o else { return Value::Null };
    let frame = |k: &str| o.guest_frames.get(k).copied();
    let floor_bytes = match (frame("total"), frame("free"), frame("file_clean")) {
        (Some(t), Some(f), Some(c)) => json!(t.saturating_sub(f).saturating_sub(c) * 4096),
        _ => Value::Null,
    };
    json!({
        "reported": { "cache": o.pages_reported_cache, "free": o.pages_hinted_free },
        "omitted": { "cache": o.pages_omitted_cache, "free": o.pages_omitted_free },
        "rejected": {
            "guest_write": o.rejected_guest_write,
            "vmm_write": o.rejected_vmm_write,
            "disk_write": o.rejected_disk_write,
            "validation": o.rejected_validation,
            "verification": o.rejected_verification,
        },
        "verified": { "pages": o.pages_verified, "mismatched": o.pages_mismatched },
        "scan_ms": o.scan_us / 1000,
        "hint_ms": o.hint_us / 1000,
        "scan_method": o.scan_method,
        "degraded": o.degraded,
        "guest_frames": o.guest_frames,
        "floor_bytes": floor_bytes,
    })
}

/// A checkpoint as JSON.
pub fn checkpoint_json(c: &pb::CheckpointInfo) -> Value {
    json!({
        "id": c.id,
        "vm_id": c.vm_id,
        "vm_name": c.vm_name,
        "mode": mode_name(c.mode),
        "omission": omission_json(c.omission.as_ref()),
        "created_at_ms": c.created_at_ms,
        "path": c.path,
        "file_bytes": c.file_bytes,
        "stored_bytes": c.stored_bytes,
        "disk_copy_bytes": c.disk_copy_bytes,
        "pages": {
            "saved": c.pages_saved,
            "zero": c.pages_zero,
            "free": c.pages_free,
            "disk": c.pages_disk,
        },
    })
}

/// The result of `dittoctl checkpoint --json`: the checkpoint's fields, its timings and the
/// VM afterwards.
pub fn checkpoint_result_json(r: &pb::CheckpointResponse) -> Value {
    let mut v = checkpoint_json(&r.checkpoint.clone().unwrap_or_default());
    v["pause_ms"] = json!(r.pause_ms);
    v["total_ms"] = json!(r.total_ms);
    v["vm"] = vm_json(&r.vm.clone().unwrap_or_default());
    v
}

/// A byte count for people: `512 B`, `3.5 MiB`, `1.2 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Checkpoints as a table for people.
pub fn checkpoint_table(checkpoints: &[pb::CheckpointInfo]) -> String {
    let mut out = format!(
        "{:<32}  {:<20}  {:>10}  {:>10}  {:>10}\n",
        "ID", "VM", "STORED", "FILE", "DISKS"
    );
    for c in checkpoints {
        let _ = writeln!(
            out,
            "{:<32}  {:<20}  {:>10}  {:>10}  {:>10}",
            c.id,
            c.vm_name,
            human_bytes(c.stored_bytes),
            human_bytes(c.file_bytes),
            human_bytes(c.disk_copy_bytes)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, state: pb::VmState, pid: u32) -> pb::Vm {
        pb::Vm {
            id: "0123456789abcdef0123456789abcdef".into(),
            name: name.into(),
            state: state.into(),
            spec: Some(pb::VmSpec {
                kernel: "/k".into(),
                vcpus: 1,
                memory_mib: 256,
                drives: vec![pb::Drive {
                    id: "root".into(),
                    path: "/r".into(),
                    read_only: true,
                }],
                vsock_cid: 3,
                ..Default::default()
            }),
            pid,
            uptime_ms: 65_000,
            ..Default::default()
        }
    }

    #[test]
    fn json_has_the_fields_scripts_use() {
        let v = vm_json(&vm("web", pb::VmState::Running, 42));
        assert_eq!(v["name"], "web");
        assert_eq!(v["state"], "running");
        assert_eq!(v["pid"], 42);
        assert_eq!(v["spec"]["drives"][0]["read_only"], true);
        assert!(vm_json(&vm("db", pb::VmState::Created, 0))["pid"].is_null());
    }

    #[test]
    fn tables_align_and_durations_read_well() {
        let t = vm_table(&[
            vm("web", pb::VmState::Running, 42),
            vm("a-longer-name", pb::VmState::Stopped, 0),
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("NAME           ID"), "{t}");
        assert!(
            lines[1].contains("running") && lines[1].contains("1m05s"),
            "{t}"
        );
        assert_eq!(human_duration(Duration::from_millis(3200)), "3.2s");
        assert_eq!(human_duration(Duration::from_secs(7380)), "2h03m");
        assert_eq!(state_name(99), "unknown(99)");
        assert_eq!(stop_method_name(1), "guest_poweroff");
    }

    #[test]
    fn checkpoint_json_has_the_fields_scripts_use() {
        let r = pb::CheckpointResponse {
            checkpoint: Some(pb::CheckpointInfo {
                id: "c".repeat(32),
                stored_bytes: 5 << 20,
                pages_saved: 1280,
                mode: pb::CheckpointMode::Ditto.into(),
                omission: Some(ditto_proto::vmm::v1::OmissionReport {
                    pages_omitted_cache: 7,
                    rejected_disk_write: 3,
                    scan_us: 2500,
                    degraded: vec!["no balloon".into()],
                    guest_frames: [("total", 100), ("free", 20), ("file_clean", 30)]
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            pause_ms: 12,
            total_ms: 34,
            vm: Some(vm("web", pb::VmState::Running, 42)),
        };
        let v = checkpoint_result_json(&r);
        assert_eq!(v["id"], "c".repeat(32));
        assert_eq!(v["stored_bytes"], 5 << 20);
        assert_eq!(v["pause_ms"], 12);
        assert_eq!(v["total_ms"], 34);
        assert_eq!(v["pages"]["saved"], 1280);
        assert_eq!(v["mode"], "ditto");
        assert_eq!(v["omission"]["omitted"]["cache"], 7);
        assert_eq!(v["omission"]["rejected"]["disk_write"], 3);
        assert_eq!(v["omission"]["scan_ms"], 2);
        assert_eq!(v["omission"]["degraded"][0], "no balloon");
        assert_eq!(v["omission"]["floor_bytes"], 50 * 4096);
        assert_eq!(v["vm"]["state"], "running");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(5 << 20), "5.0 MiB");
        let t = checkpoint_table(&[r.checkpoint.unwrap()]);
        assert!(
            t.lines().nth(1).is_some_and(|l| l.contains("5.0 MiB")),
            "{t}"
        );
    }
}
