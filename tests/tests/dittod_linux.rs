//! The real `dittod` and the real `dittoctl` over a real Unix socket, with Linux guests under
//! KVM in the test box: a VM's whole life through `dittoctl` (create, start, `exec uname -r`,
//! pause, resume, stop, delete) with `get --json` checked at each step and the socket's mode;
//! two VMs at once where `kill -9` of one VMM fails that VM alone, with the event on
//! `dittoctl events` and on a filtered WatchEvents stream; a daemon killed or stopped and
//! started again that re-attaches to its running VM (and a VMM that died while no daemon ran
//! found FAILED); a guest that crashes (a triple fault, with `reboot=t`) found FAILED with the
//! reason, an error event and its last console lines kept in `last-failure.log`; and every
//! error code of the API provoked and checked through a tonic client
//! and through `dittoctl`'s exit status and message.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ditto_proto::host::v1 as pb;
use ditto_tests::dittod::{Daemon, alive, bzimage_release, signal, vmm_pids};
use ditto_tests::microvm::{guest_kernel, images_dir};
use ditto_tests::vmm::{BASE_CMDLINE, sparse_copy};
use serde_json::Value;
use tonic::Code;

/// How long a guest may take to boot to a serving agent (two at once on the box's TCG CPUs).
const BOOT_SECS: &str = "300";
/// How long an event may take to show after what causes it.
const EVENT: Duration = Duration::from_secs(30);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A writable copy of the guest's root image for one VM.
fn root_copy(dir: &Path, vm: &str) -> PathBuf {
    let root = dir.join(format!("{vm}.ext4"));
    sparse_copy(&images_dir().expect("images").join("rootfs.ext4"), &root).expect("root copy");
    root
}

/// `dittoctl create NAME` arguments: 1 vCPU, 256 MiB, the guest images, `root` as its disk.
fn create_args(name: &str, root: &Path, cmdline: &str, read_only: bool) -> Vec<String> {
    let kernel = guest_kernel(&images_dir().expect("images"));
    let mut args = vec!["create".into(), name.into()];
    args.extend(kernel.args());
    args.extend([
        "--cmdline".into(),
        format!("{BASE_CMDLINE} {cmdline}"),
        "--vcpus".into(),
        "1".into(),
        "--mem-mib".into(),
        "256".into(),
        "--drive".into(),
        format!(
            "id=root,path={}{}",
            root.display(),
            if read_only { ",ro" } else { "" }
        ),
    ]);
    args
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Creates VM `name` with its own writable root through `dittoctl create --json`.
fn create(daemon: &Daemon, dir: &Path, name: &str) -> Value {
    let root = root_copy(dir, name);
    daemon.ctl_json(&strs(&create_args(name, &root, "rw", false)))
}

/// `dittoctl start --wait --json NAME`.
fn start(daemon: &Daemon, name: &str) -> Value {
    daemon.ctl_json(&["start", name, "--wait", "--wait-timeout", BOOT_SECS])
}

fn get(daemon: &Daemon, name: &str) -> Value {
    daemon.ctl_json(&["get", name])
}

/// Runs `dittoctl exec NAME -- ARGS…`, asserts exit status 0, returns its standard output.
fn exec(daemon: &Daemon, name: &str, args: &[&str]) -> String {
    let mut all = vec!["exec", name, "--"];
    all.extend_from_slice(args);
    daemon.ctl_ok(&all)
}

fn boot_id(daemon: &Daemon, name: &str) -> String {
    let id = exec(daemon, name, &["cat", "/proc/sys/kernel/random/boot_id"]);
    assert_eq!(id.trim().len(), 36, "{id:?}");
    id.trim().to_owned()
}

fn pid_of(vm: &Value) -> u32 {
    let pid = vm["pid"].as_u64().unwrap_or_else(|| panic!("no pid: {vm}"));
    u32::try_from(pid).expect("pid")
}

/// Asserts that the text `value[key]` contains `needle`.
fn assert_mentions(value: &Value, key: &str, needle: &str) {
    assert!(
        value[key].as_str().is_some_and(|m| m.contains(needle)),
        "{key} of {value} should mention {needle:?}"
    );
}

fn assert_vm(vm: &Value, name: &str, state: &str) {
    assert_eq!(vm["name"], name, "{vm}");
    assert_eq!(vm["state"], state, "{vm}");
    let id = vm["id"].as_str().expect("id");
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "id {id:?}"
    );
    if matches!(state, "running" | "paused") {
        assert!(alive(pid_of(vm)), "the VMM of {vm} is not running");
    } else {
        assert!(vm["pid"].is_null(), "{vm}");
    }
}

#[test]
#[ignore = "boots Linux: runs in the KVM test box"]
fn a_vm_lives_its_whole_life_through_dittoctl() {
    let dir = tempfile::tempdir().expect("tmp");
    let state_dir = dir.path().join("state");
    let daemon = Daemon::start(&state_dir, &[]);

    // The API socket is the owner's alone, in a state directory that is the owner's alone.
    let socket = std::fs::symlink_metadata(&daemon.socket).expect("socket");
    assert!(socket.file_type().is_socket());
    assert_eq!(socket.permissions().mode() & 0o7777, 0o600, "socket mode");
    let state = std::fs::metadata(&state_dir).expect("state dir");
    assert_eq!(state.permissions().mode() & 0o7777, 0o700, "state dir mode");

    let created = create(&daemon, dir.path(), "alpha");
    assert_vm(&created, "alpha", "created");
    let id = created["id"].as_str().expect("id").to_owned();
    assert_eq!(created["spec"]["vcpus"], 1);
    assert_eq!(created["spec"]["memory_mib"], 256);
    let by_id = get(&daemon, &id);
    assert_vm(&by_id, "alpha", "created");
    assert_eq!(by_id["id"], id.as_str());

    let started = start(&daemon, "alpha");
    assert_vm(&started, "alpha", "running");
    let pid = pid_of(&started);
    assert_eq!(
        vmm_pids(&state_dir),
        vec![pid],
        "one ditto-vmm, the one get names"
    );
    let running = get(&daemon, "alpha");
    assert_vm(&running, "alpha", "running");
    assert_eq!(pid_of(&running), pid);
    assert_eq!(running["id"], id.as_str());
    assert!(running["uptime_ms"].as_u64() > Some(0), "{running}");

    // The guest runs the image's kernel.
    let release = bzimage_release(&guest_kernel(&images_dir().expect("images")).kernel);
    assert!(release.starts_with("6.1."), "{release}");
    assert_eq!(exec(&daemon, "alpha", &["uname", "-r"]).trim(), release);
    // The guest program's exit status is dittoctl's.
    let out = daemon.ctl(&["exec", "alpha", "--", "sh", "-c", "echo out; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");

    let paused = daemon.ctl_json(&["pause", "alpha"]);
    assert_vm(&paused, "alpha", "paused");
    assert_eq!(pid_of(&paused), pid);
    let got = get(&daemon, "alpha");
    assert_vm(&got, "alpha", "paused");
    let why = daemon.ctl_fails(&["exec", "alpha", "--", "true"], "FailedPrecondition");
    assert!(why.contains("paused") && why.contains("resume"), "{why}");

    let resumed = daemon.ctl_json(&["resume", "alpha"]);
    assert_vm(&resumed, "alpha", "running");
    assert_eq!(pid_of(&resumed), pid);
    assert_eq!(exec(&daemon, "alpha", &["uname", "-r"]).trim(), release);

    let stopped = daemon.ctl_json(&["stop", "alpha"]);
    assert_vm(&stopped["vm"], "alpha", "stopped");
    assert_eq!(stopped["method"], "guest_poweroff", "{stopped}");
    assert!(!alive(pid), "the VMM ended");
    let got = get(&daemon, "alpha");
    assert_vm(&got, "alpha", "stopped");
    assert!(got["last_error"].is_string(), "how it ended: {got}");
    let list = daemon.ctl_json(&["list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list[0]["id"], id.as_str());

    let deleted = daemon.ctl_json(&["delete", "alpha"]);
    assert_eq!(deleted["deleted"], "alpha");
    daemon.ctl_fails(&["get", "alpha"], "NotFound");
    daemon.ctl_fails(&["get", &id], "NotFound");
    assert!(
        !state_dir.join("vms").join(&id).exists(),
        "its folder is gone"
    );
    assert_eq!(daemon.ctl_json(&["list"]), Value::Array(vec![]));
}

#[test]
#[ignore = "boots Linux: runs in the KVM test box"]
fn a_killed_vmm_fails_its_vm_alone() {
    let dir = tempfile::tempdir().expect("tmp");
    let daemon = Daemon::start(&dir.path().join("state"), &[]);
    let rt = runtime();
    let events = daemon.events(None);

    // A WatchEvents stream of VM "one" only, through tonic.
    create(&daemon, dir.path(), "one");
    let filtered: Arc<Mutex<Vec<pb::VmEvent>>> = Arc::default();
    {
        let sink = filtered.clone();
        let mut client = rt.block_on(daemon.client());
        let mut stream = rt
            .block_on(client.watch_events(pb::WatchEventsRequest { vm: "one".into() }))
            .expect("watch one")
            .into_inner();
        rt.spawn(async move {
            let _channel = client;
            while let Ok(Some(e)) = stream.message().await {
                sink.lock().expect("events").push(e);
            }
        });
    }
    create(&daemon, dir.path(), "two");
    // Both creations were seen: the watcher is subscribed.
    for name in ["one", "two"] {
        events.wait_for(EVENT, |e| e["vm_name"] == name && e["kind"] == "created");
    }

    let (one, two) = std::thread::scope(|s| {
        let one = s.spawn(|| start(&daemon, "one"));
        let two = s.spawn(|| start(&daemon, "two"));
        (
            one.join().expect("start one"),
            two.join().expect("start two"),
        )
    });
    let (pid1, pid2) = (pid_of(&one), pid_of(&two));
    assert_ne!(pid1, pid2);
    let (boot1, boot2) = (boot_id(&daemon, "one"), boot_id(&daemon, "two"));
    assert_ne!(boot1, boot2, "two guests");
    let events_before_kill = events.seen().len();

    signal(pid1, "KILL");
    let exited = events.wait_for(EVENT, |e| e["vm_name"] == "one" && e["kind"] == "exited");
    assert_eq!(exited["state"], "failed", "{exited}");
    assert_mentions(&exited, "message", "SIGKILL");
    let error = events.wait_for(EVENT, |e| e["vm_name"] == "one" && e["kind"] == "error");
    assert_eq!(error["state"], "failed", "{error}");
    let failed = get(&daemon, "one");
    assert_vm(&failed, "one", "failed");
    assert_mentions(&failed, "last_error", "SIGKILL");
    daemon.ctl_fails(&["exec", "one", "--", "true"], "FailedPrecondition");

    // The other VM did not notice: same process, same boot, still answering.
    let still = get(&daemon, "two");
    assert_vm(&still, "two", "running");
    assert_eq!(pid_of(&still), pid2);
    assert_eq!(boot_id(&daemon, "two"), boot2);
    let after: Vec<Value> = events.seen().split_off(events_before_kill);
    assert!(
        after.iter().all(|e| e["vm_name"] != "two"),
        "VM two had events after one was killed: {after:#?}"
    );

    // The filtered stream saw one's end and nothing of two.
    let seen = filtered.lock().expect("events").clone();
    assert!(
        seen.iter().any(
            |e| e.kind == pb::EventKind::Exited as i32 && e.state == pb::VmState::Failed as i32
        ),
        "{seen:#?}"
    );
    assert!(seen.iter().all(|e| e.vm_name == "one"), "{seen:#?}");

    let stopped = daemon.ctl_json(&["stop", "two"]);
    assert_vm(&stopped["vm"], "two", "stopped");
    for name in ["one", "two"] {
        daemon.ctl_json(&["delete", name]);
    }
}

#[test]
#[ignore = "boots Linux: runs in the KVM test box"]
fn a_guest_that_crashes_fails_its_vm_with_the_reason_and_its_console() {
    let dir = tempfile::tempdir().expect("tmp");
    let state = dir.path().join("state");
    let daemon = Daemon::start(&state, &[]);
    let events = daemon.events(None);
    // With reboot=t the guest kernel restarts by a triple fault: a real one, on demand.
    let root = root_copy(dir.path(), "crash");
    let created = daemon.ctl_json(&strs(&create_args("crash", &root, "rw reboot=t", false)));
    let id = created["id"].as_str().expect("id").to_owned();
    start(&daemon, "crash");
    // The guest's last words, to find among the kept console lines.
    exec(
        &daemon,
        "crash",
        &["sh", "-c", "echo ditto-crash-marker > /dev/console"],
    );
    exec(
        &daemon,
        "crash",
        &[
            "sh",
            "-c",
            "(sleep 1; reboot -f) </dev/null >/dev/null 2>&1 &",
        ],
    );
    let exited = events.wait_for(Duration::from_secs(120), |e| {
        e["vm_name"] == "crash" && e["kind"] == "exited"
    });
    assert_eq!(
        exited["state"], "failed",
        "a crash is no clean stop: {exited}"
    );
    assert_mentions(&exited, "message", "triple fault");
    let error = events.wait_for(EVENT, |e| e["vm_name"] == "crash" && e["kind"] == "error");
    assert_mentions(&error, "message", "triple fault");
    let failed = get(&daemon, "crash");
    assert_vm(&failed, "crash", "failed");
    assert_mentions(&failed, "last_error", "triple fault");
    let vm_dir = state.join("vms").join(&id);
    let exit: Value = serde_json::from_slice(
        &std::fs::read(vm_dir.join("exit.json")).expect("the VMM's exit file"),
    )
    .expect("exit.json");
    assert_eq!(exit["clean"], false, "{exit}");
    assert_eq!(exit["kind"], "triple_fault", "{exit}");
    let kept = std::fs::read_to_string(vm_dir.join("last-failure.log")).expect("last-failure.log");
    assert!(
        kept.contains("triple fault") && kept.contains("kind: triple_fault"),
        "{kept}"
    );
    assert!(
        kept.contains("ditto-crash-marker"),
        "the console's last lines: {kept}"
    );
    // The kept failure outlives a new start (which clears the exit file).
    start(&daemon, "crash");
    assert!(vm_dir.join("last-failure.log").exists());
    let stopped = daemon.ctl_json(&["stop", "crash"]);
    assert_vm(&stopped["vm"], "crash", "stopped");
    daemon.ctl_json(&["delete", "crash"]);
}

#[test]
#[ignore = "boots Linux: runs in the KVM test box"]
fn a_restarted_daemon_reattaches_to_its_running_vm() {
    let dir = tempfile::tempdir().expect("tmp");
    let state_dir = dir.path().join("state");
    let mut daemon = Daemon::start(&state_dir, &[]);
    create(&daemon, dir.path(), "solo");
    let pid = pid_of(&start(&daemon, "solo"));
    let boot = boot_id(&daemon, "solo");

    // A crash of the daemon: the VM keeps running, the next daemon finds it.
    daemon.kill9();
    assert!(alive(pid), "the VMM outlives the daemon");
    daemon.restart();
    let got = get(&daemon, "solo");
    assert_vm(&got, "solo", "running");
    assert_eq!(pid_of(&got), pid, "same VMM");
    assert_eq!(boot_id(&daemon, "solo"), boot, "same guest boot");
    assert!(
        daemon.log_text().contains("re-attached to a running VMM"),
        "{}",
        daemon.log_text()
    );

    // An orderly stop of the daemon (an upgrade) leaves the VM running too, here paused: the
    // next daemon finds it paused and can resume it.
    assert_vm(&daemon.ctl_json(&["pause", "solo"]), "solo", "paused");
    daemon.terminate();
    assert!(alive(pid), "the VMM outlives the daemon");
    daemon.restart();
    let got = get(&daemon, "solo");
    assert_vm(&got, "solo", "paused");
    assert_eq!(pid_of(&got), pid);
    assert_vm(&daemon.ctl_json(&["resume", "solo"]), "solo", "running");
    assert_eq!(boot_id(&daemon, "solo"), boot);

    // The re-attached VMM is supervised: pausing works, and its end is seen.
    assert_vm(&daemon.ctl_json(&["pause", "solo"]), "solo", "paused");
    assert_vm(&daemon.ctl_json(&["resume", "solo"]), "solo", "running");
    let stopped = daemon.ctl_json(&["stop", "solo"]);
    assert_vm(&stopped["vm"], "solo", "stopped");
    assert_eq!(stopped["method"], "guest_poweroff", "{stopped}");
    assert!(!alive(pid));

    // A VMM that dies while no daemon runs: the next daemon records the VM as FAILED.
    let pid = pid_of(&start(&daemon, "solo"));
    daemon.kill9();
    signal(pid, "KILL");
    let start = std::time::Instant::now();
    while alive(pid) {
        assert!(start.elapsed() < EVENT, "ditto-vmm {pid} survived SIGKILL");
        std::thread::sleep(Duration::from_millis(50));
    }
    daemon.restart();
    let got = get(&daemon, "solo");
    assert_vm(&got, "solo", "failed");
    assert_mentions(&got, "last_error", "while dittod was not running");
    daemon.ctl_json(&["delete", "solo"]);
}

/// A VM spec over the guest images (1 vCPU, 256 MiB) with `root` as its disk.
fn spec(root: &Path, cmdline: &str, read_only: bool) -> pb::VmSpec {
    let kernel = guest_kernel(&images_dir().expect("images"));
    let s = |p: PathBuf| p.to_str().expect("utf8").to_owned();
    pb::VmSpec {
        kernel: s(kernel.kernel),
        initrd: kernel.initrd.map(s),
        cmdline: format!("{BASE_CMDLINE} {cmdline}"),
        vcpus: 1,
        memory_mib: 256,
        drives: vec![pb::Drive {
            id: "root".into(),
            path: s(root.to_owned()),
            read_only,
        }],
        vsock_cid: 0,
    }
}

fn assert_code<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    message_has: &str,
) -> String {
    let status = result.expect_err("the request should be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(message_has),
        "{:?} should mention {message_has:?}",
        status.message()
    );
    status.message().to_owned()
}

#[test]
#[ignore = "boots Linux: runs in the KVM test box"]
fn every_error_code_means_what_it_says() {
    let dir = tempfile::tempdir().expect("tmp");
    let daemon = Daemon::start(&dir.path().join("state"), &["--max-vms", "3"]);
    let images = images_dir().expect("images");
    let shared_ro = images.join("rootfs.ext4");
    let rt = runtime();
    let mut c = rt.block_on(daemon.client());
    let create = |name: &str, spec: pb::VmSpec| pb::CreateVmRequest {
        name: name.into(),
        spec: Some(spec),
    };
    let good = || spec(&shared_ro, "ro", true);

    rt.block_on(async {
        // NOT_FOUND.
        let get = c.get_vm(pb::GetVmRequest { vm: "ghost".into() }).await;
        assert_code(get, Code::NotFound, "ghost");
        let start = c
            .start_vm(pb::StartVmRequest {
                vm: "0123456789abcdef0123456789abcdef".into(),
                ..Default::default()
            })
            .await;
        assert_code(start, Code::NotFound, "0123456789abcdef0123456789abcdef");

        // INVALID_ARGUMENT, naming the field.
        let m = assert_code(
            c.get_vm(pb::GetVmRequest { vm: String::new() }).await,
            Code::InvalidArgument,
            "vm",
        );
        assert!(m.starts_with("vm: "), "{m}");
        let invalid: Vec<(&str, pb::CreateVmRequest)> = vec![
            ("name: ", create("bad name!", good())),
            ("name: ", create("", good())),
            ("name: ", create("0123456789abcdef0123456789abcdef", good())),
            (
                "spec: ",
                pb::CreateVmRequest {
                    name: "nospec".into(),
                    spec: None,
                },
            ),
            (
                "spec.kernel: ",
                create(
                    "k1",
                    pb::VmSpec {
                        kernel: "/nonexistent/vmlinuz".into(),
                        ..good()
                    },
                ),
            ),
            (
                "spec.kernel: ",
                create(
                    "k2",
                    pb::VmSpec {
                        kernel: "vmlinuz".into(),
                        ..good()
                    },
                ),
            ),
            (
                "spec.kernel: ",
                create(
                    "k3",
                    pb::VmSpec {
                        kernel: images.to_str().expect("utf8").into(),
                        ..good()
                    },
                ),
            ),
            (
                "spec.initrd: ",
                create(
                    "i1",
                    pb::VmSpec {
                        initrd: Some("/nonexistent/initrd".into()),
                        ..good()
                    },
                ),
            ),
            (
                "spec.vcpus: ",
                create(
                    "v1",
                    pb::VmSpec {
                        vcpus: 1000,
                        ..good()
                    },
                ),
            ),
            (
                "spec.vsock_cid: ",
                create(
                    "c1",
                    pb::VmSpec {
                        vsock_cid: 2,
                        ..good()
                    },
                ),
            ),
            (
                "spec.cmdline: ",
                create(
                    "l1",
                    pb::VmSpec {
                        cmdline: "console=ttyS0\nroot=/dev/vda".into(),
                        ..good()
                    },
                ),
            ),
            (
                "spec.drives[0].path: ",
                create("d1", spec(Path::new("/nonexistent/disk.img"), "ro", true)),
            ),
            (
                "spec.drives[0].id: ",
                create(
                    "d2",
                    pb::VmSpec {
                        drives: vec![pb::Drive {
                            id: "an-id-longer-than-twenty-bytes".into(),
                            path: shared_ro.to_str().expect("utf8").into(),
                            read_only: true,
                        }],
                        ..good()
                    },
                ),
            ),
        ];
        for (field, request) in invalid {
            let m = assert_code(
                c.create_vm(request.clone()).await,
                Code::InvalidArgument,
                "",
            );
            assert!(
                m.starts_with(field),
                "{request:?}: {m:?} should start with {field:?}"
            );
        }

        // RESOURCE_EXHAUSTED: more memory than the host has.
        let huge = create(
            "huge",
            pb::VmSpec {
                memory_mib: 1 << 24,
                ..good()
            },
        );
        assert_code(
            c.create_vm(huge).await,
            Code::ResourceExhausted,
            "spec.memory_mib",
        );

        // A VM without an agent: its init is a shell loop.
        let mute = c
            .create_vm(create(
                "mute",
                spec(
                    &shared_ro,
                    "ro init=/bin/sh -- -c \"mount -t proc proc /proc; echo mute guest up; \
                     while true; do sleep 10; done\"",
                    true,
                ),
            ))
            .await
            .expect("create mute")
            .into_inner();
        assert_eq!(mute.state, pb::VmState::Created as i32);

        // ALREADY_EXISTS: the name, and the vsock cid.
        assert_code(
            c.create_vm(create("mute", good())).await,
            Code::AlreadyExists,
            "mute",
        );
        let cid = mute.spec.as_ref().expect("spec").vsock_cid;
        assert!(cid >= 3, "{mute:?}");
        let m = assert_code(
            c.create_vm(create(
                "samecid",
                pb::VmSpec {
                    vsock_cid: cid,
                    ..good()
                },
            ))
            .await,
            Code::AlreadyExists,
            "spec.vsock_cid",
        );
        assert!(m.contains("mute"), "{m}");

        // FAILED_PRECONDITION: the wrong state for the operation.
        let vm = || "mute".to_owned();
        let run_true = || pb::GuestExecRequest {
            vm: vm(),
            program: "true".into(),
            ..Default::default()
        };
        let m = assert_code(
            c.pause_vm(pb::PauseVmRequest { vm: vm() }).await,
            Code::FailedPrecondition,
            "created",
        );
        assert!(m.contains("pause"), "{m}");
        assert_code(
            c.resume_vm(pb::ResumeVmRequest { vm: vm() }).await,
            Code::FailedPrecondition,
            "created",
        );
        assert_code(
            c.stop_vm(pb::StopVmRequest {
                vm: vm(),
                timeout_ms: None,
            })
            .await,
            Code::FailedPrecondition,
            "does not run",
        );
        assert_code(
            c.guest_exec(run_true()).await,
            Code::FailedPrecondition,
            "start it first",
        );
        // ... and a disk two VMs would both write.
        let writable = root_copy(dir.path(), "shared-rw");
        c.create_vm(create("writer", spec(&writable, "rw", false)))
            .await
            .expect("create writer");
        let m = assert_code(
            c.create_vm(create("writer2", spec(&writable, "rw", false)))
                .await,
            Code::FailedPrecondition,
            "spec.drives[0].path",
        );
        assert!(m.contains("writer"), "{m}");

        // RESOURCE_EXHAUSTED: --max-vms 3 (mute, writer, and one more).
        c.create_vm(create("third", good())).await.expect("third");
        assert_code(
            c.create_vm(create("fourth", good())).await,
            Code::ResourceExhausted,
            "--max-vms",
        );
        for extra in ["writer", "third"] {
            c.delete_vm(pb::DeleteVmRequest { vm: extra.into() })
                .await
                .expect("delete");
        }

        // DEADLINE_EXCEEDED: a start that waits for an agent the guest does not have; the VM
        // keeps running.
        let m = assert_code(
            c.start_vm(pb::StartVmRequest {
                vm: vm(),
                wait_for_agent: true,
                agent_timeout_ms: 4000,
            })
            .await,
            Code::DeadlineExceeded,
            "did not answer within 4 s",
        );
        assert!(m.contains("keeps running"), "{m}");
        let started = c
            .get_vm(pb::GetVmRequest { vm: vm() })
            .await
            .expect("get mute")
            .into_inner();
        assert_eq!(started.state, pb::VmState::Running as i32, "{started:?}");
        assert!(started.pid > 0, "{started:?}");
        let console = Path::new(&started.dir).join("console.log");
        let deadline = std::time::Instant::now() + Duration::from_secs(180);
        while !std::fs::read_to_string(&console)
            .unwrap_or_default()
            .contains("mute guest up")
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the mute guest did not boot: {}",
                std::fs::read_to_string(&console).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // FAILED_PRECONDITION on a running VM.
        assert_code(
            c.start_vm(pb::StartVmRequest {
                vm: vm(),
                ..Default::default()
            })
            .await,
            Code::FailedPrecondition,
            "runs already",
        );
        assert_code(
            c.delete_vm(pb::DeleteVmRequest { vm: vm() }).await,
            Code::FailedPrecondition,
            "stop it first",
        );
        assert_code(
            c.resume_vm(pb::ResumeVmRequest { vm: vm() }).await,
            Code::FailedPrecondition,
            "running",
        );

        // INVALID_ARGUMENT for an exec without a program.
        let m = assert_code(
            c.guest_exec(pb::GuestExecRequest {
                vm: vm(),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            "program",
        );
        assert!(m.starts_with("program: "), "{m}");

        // UNAVAILABLE: the guest runs, its agent does not.
        let m = assert_code(c.guest_exec(run_true()).await, Code::Unavailable, "agent");
        assert!(m.contains("mute"), "{m}");
    });

    // The same codes through dittoctl: exit status 1 and the code in its message.
    daemon.ctl_fails(&["get", "ghost"], "NotFound");
    daemon.ctl_fails(&["exec", "mute", "--", "true"], "Unavailable");
    daemon.ctl_fails(&["delete", "mute"], "FailedPrecondition");
    let root = root_copy(dir.path(), "cli");
    let mut args = create_args("bad name!", &root, "rw", false);
    let m = daemon.ctl_fails(&strs(&args), "InvalidArgument");
    assert!(m.contains("name: "), "{m}");
    args[1] = "mute".into();
    daemon.ctl_fails(&strs(&args), "AlreadyExists");
    args[1] = "big".into();
    // Where --mem-mib is depends on the kernel's arguments (an initramfs or none).
    let mem = 1 + args
        .iter()
        .position(|a| a == "--mem-mib")
        .expect("create_args gives --mem-mib");
    args[mem] = (1u64 << 24).to_string();
    daemon.ctl_fails(&strs(&args), "ResourceExhausted");
    let out = daemon.ctl(&["--json", "get", "ghost"]);
    assert_eq!(out.status.code(), Some(1));
    let error: Value = serde_json::from_slice(&out.stderr).expect("a JSON error");
    assert_eq!(error["error"]["code"], "NotFound", "{error}");

    // A stop without an agent to power the guest off falls back to the VMM's shutdown.
    rt.block_on(async {
        let stopped = c
            .stop_vm(pb::StopVmRequest {
                vm: "mute".into(),
                timeout_ms: Some(5000),
            })
            .await
            .expect("stop mute")
            .into_inner();
        assert_eq!(
            stopped.method,
            pb::StopMethod::VmmShutdown as i32,
            "{stopped:?}"
        );
        assert_eq!(stopped.vm.expect("vm").state, pb::VmState::Stopped as i32);
        c.delete_vm(pb::DeleteVmRequest { vm: "mute".into() })
            .await
            .expect("delete mute");
    });
}
