//! Linux guests under ditto's own VMM, in the KVM test box: boot with 2 vCPUs and 512 MiB to a
//! serving agent, ext4 root writes that reach the disk image, the agent's Info and Scan over
//! the hybrid vsock socket, pause and resume through the control socket, poweroff ending the
//! VMM with status 0, reboot (every method a stock kernel uses) ending it with status 0 too, two
//! VMs at once, a capture → rebuild → resume round trip in one process, and the agent reached
//! through the control socket's ConnectVsock tunnel instead of the hybrid socket.

use std::path::Path;
use std::time::{Duration, Instant};

use ditto_host::control::{VmState, VmmClient};
use ditto_host::vmm::{ExitReason, Vmm, VmmState};
use ditto_proto::agent::v1::{ExecRequest, InfoRequest, ScanRequest, scan_chunk};
use ditto_tests::dittod::bzimage_release;
use ditto_tests::microvm::{guest_kernel, images_dir};
use ditto_tests::vmm::{
    AGENT_PORT, AgentGuest, VmmProcess, agent_over_control_tunnel, agent_over_hybrid_vsock,
    shell_guest_config, spawn_agent_guest,
};

const BOOT: Duration = Duration::from_secs(180);
/// How long the steps of a test that talk to the guest may take together.
const STEPS: Duration = Duration::from_secs(300);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

async fn exec(
    agent: &mut ditto_proto::agent::v1::agent_client::AgentClient<tonic::transport::Channel>,
    script: &str,
) -> String {
    let reply = agent
        .exec(ExecRequest {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            ..Default::default()
        })
        .await
        .expect("exec")
        .into_inner();
    assert_eq!(reply.exit_code, 0, "{script}: {reply:?}");
    String::from_utf8_lossy(&reply.stdout).into_owned()
}

fn uptime(text: &str) -> f64 {
    text.split_whitespace()
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("not an uptime: {text:?}"))
}

#[test]
#[ignore = "boots Linux: runs in the KVM test box"]
fn guest_boots_writes_its_disk_serves_the_agent_pauses_and_powers_off() {
    let images = images_dir().expect("images");
    let release = bzimage_release(&guest_kernel(&images).kernel);
    let dir = tempfile::tempdir().expect("tmp");
    let AgentGuest {
        mut vmm,
        root,
        uds,
        control,
        boot,
    } = spawn_agent_guest(&images, dir.path(), 2, 512, BOOT);
    println!(
        "measured: ditto-vmm start to agent serving: {:.2} s",
        boot.as_secs_f64()
    );

    let token = format!("ditto-e2e-{}", std::process::id());
    let steps = runtime().block_on(async {
        tokio::time::timeout(STEPS, async {
            let mut agent = agent_over_hybrid_vsock(uds.clone(), AGENT_PORT).await;
            println!("step: info");
            let info = agent.info(InfoRequest {}).await.expect("info").into_inner();
            // The release of the kernel the guest booted (stock or patched).
            assert_eq!(info.kernel_release, release, "{info:?}");
            let cpus = exec(&mut agent, "grep -c ^processor /proc/cpuinfo").await;
            assert_eq!(cpus.trim(), "2");
            let mem_kib: u64 = exec(&mut agent, "awk '/MemTotal/ {print $2}' /proc/meminfo")
                .await
                .trim()
                .parse()
                .expect("MemTotal");
            assert!((400_000..=524_288).contains(&mem_kib), "{mem_kib} KiB");

            println!("step: ext4 write and read back");
            // ext4 over virtio-blk: write, sync, drop the cache, read back from the disk.
            let read = exec(
                &mut agent,
                &format!(
                    "echo {token} > /root/e2e && sync && echo 3 > /proc/sys/vm/drop_caches && \
                 cat /root/e2e"
                ),
            )
            .await;
            assert_eq!(read.trim(), token);

            println!("step: scan");
            let mut scan = agent
                .scan(ScanRequest::default())
                .await
                .expect("scan")
                .into_inner();
            let mut summary = None;
            while let Some(chunk) = scan.message().await.expect("scan chunk") {
                if let Some(scan_chunk::Body::Summary(s)) = chunk.body {
                    summary = Some(s);
                }
            }
            let summary = summary.expect("scan summary");
            assert!(summary.pages_reported > 0, "{summary:?}");

            println!("step: pause and resume");
            // Pause for two seconds through the control socket; the guest carries on after.
            let client = VmmClient::connect(&control).await.expect("control");
            let before = uptime(&exec(&mut agent, "cat /proc/uptime").await);
            let paused = client.pause().await.expect("pause");
            assert_eq!(paused.state, VmState::Paused);
            assert!(client.pause().await.is_err(), "pausing twice is refused");
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert_eq!(
                client.status().await.expect("status").state,
                VmState::Paused
            );
            let resumed = client.resume().await.expect("resume");
            assert_eq!(resumed.state, VmState::Running);
            println!(
                "measured: pause {} us, resume {} us",
                paused.elapsed.as_micros(),
                resumed.elapsed.as_micros()
            );
            println!("step: uptime after the resume");
            let after = uptime(&exec(&mut agent, "cat /proc/uptime").await);
            assert!(after > before, "uptime {before} then {after}");

            exec(
                &mut agent,
                "setsid sh -c 'sleep 1; poweroff -f' </dev/null >/dev/null 2>&1 &",
            )
            .await;
        })
        .await
    });
    assert!(
        steps.is_ok(),
        "the guest's agent stopped answering within {STEPS:?} (the step printed last is \
         the one that hung); console:\n{}",
        vmm.transcript()
    );
    let status = vmm.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "ditto-vmm: {status}");
    assert!(
        vmm.stderr_text()
            .contains(&format!("VM ended: {}", ExitReason::PowerOff)),
        "{}",
        vmm.transcript()
    );

    // The write reached the disk image: the token is in one of its blocks (the guest only ever
    // had it in the file it wrote; ext4's ordered mode does not journal data).
    assert!(
        image_contains(&root, token.as_bytes()),
        "{token} not on the image"
    );
}

fn image_contains(image: &Path, needle: &[u8]) -> bool {
    use std::io::Read;
    let mut file = std::fs::File::open(image).expect("image");
    let mut buf = vec![0u8; 1 << 20];
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let n = file.read(&mut buf).expect("read image");
        if n == 0 {
            return false;
        }
        carry.extend_from_slice(&buf[..n]);
        if carry.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
        let keep = carry.len().saturating_sub(needle.len());
        carry.drain(..keep);
    }
}

#[test]
#[ignore = "boots Linux: runs in the KVM test box"]
fn two_vms_run_at_once() {
    let images = images_dir().expect("images");
    let root = format!("id=root,path={},ro", images.join("rootfs.ext4").display());
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().expect("tmp")).collect();
    let mut vms: Vec<_> = dirs
        .iter()
        .enumerate()
        .map(|(i, dir)| {
            let cmdline = format!(
                "ro init=/bin/sh -- -c \"mount -t proc proc /proc; echo vm-{i} says hi; \
                 sleep 2; poweroff -f\""
            );
            VmmProcess::spawn(&images, &root, dir.path(), &cmdline, &["--mem-mib", "256"])
        })
        .collect();
    for (i, vm) in vms.iter_mut().enumerate() {
        vm.wait_for(&format!("vm-{i} says hi"), BOOT);
    }
    for (i, vm) in vms.iter_mut().enumerate() {
        assert!(vm.wait_exit(Duration::from_secs(60)).success());
        assert!(!vm.console_text().contains(&format!("vm-{} says hi", 1 - i)));
    }
}

/// A stock kernel on a hardware-reduced ACPI platform without EFI reboots "through the BIOS"
/// (a far jump to the reset vector) unless told `reboot=a`; both ways end the VMM cleanly as a
/// reset, and so does the keyboard-controller method Firecracker's guests are told to use.
#[test]
#[ignore = "boots Linux: runs in the KVM test box"]
fn guest_reboot_ends_the_vmm_cleanly() {
    let images = images_dir().expect("images");
    let root = format!("id=root,path={},ro", images.join("rootfs.ext4").display());
    for method in ["", "reboot=a", "reboot=k"] {
        let dir = tempfile::tempdir().expect("tmp");
        let cmdline =
            format!("{method} ro init=/bin/sh -- -c \"echo rebooting now; /sbin/reboot -f\"");
        let mut vmm =
            VmmProcess::spawn(&images, &root, dir.path(), &cmdline, &["--mem-mib", "256"]);
        vmm.wait_for("rebooting now", BOOT);
        let status = vmm.wait_exit(Duration::from_secs(60));
        assert!(status.success(), "{method:?}: ditto-vmm {status}");
        assert!(
            vmm.stderr_text()
                .contains(&format!("VM ended: {}", ExitReason::Reset)),
            "{method:?}: {}",
            vmm.transcript()
        );
    }
}

/// Pause, capture every piece of state into plain structs (and through JSON), build a fresh KVM
/// VM from them over the same memory, resume: the guest's clock and its loop keep going.
#[test]
#[ignore = "boots Linux: runs in the KVM test box"]
fn captured_state_rebuilds_a_vm_that_continues() {
    let images = images_dir().expect("images");
    let dir = tempfile::tempdir().expect("tmp");
    let console = dir.path().join("console.log");
    // With the default devices, the balloon included, through capture and rebuild.
    let config = shell_guest_config(
        &images,
        &console,
        2,
        256,
        "mount -t proc proc /proc; while true; do echo tick $(cut -d. -f1 /proc/uptime); \
         sleep 0.3; done",
    );
    let (mut vmm, events) = Vmm::build(config).expect("build");
    vmm.start().expect("start");
    let ticks = || {
        std::fs::read_to_string(&console)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("tick "))
            .filter_map(|t| t.trim().parse::<u64>().ok())
            .collect::<Vec<_>>()
    };
    let wait_ticks = |n: usize| {
        let start = Instant::now();
        while ticks().len() < n {
            assert!(
                start.elapsed() < BOOT,
                "console:\n{}",
                std::fs::read_to_string(&console).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_ticks(3);
    assert!(vmm.capture().is_err(), "capture needs a paused VM");
    vmm.pause().expect("pause");
    let seen = ticks();
    let state = vmm.capture().expect("capture");
    let json = serde_json::to_string(&state).expect("serialise");
    let decoded: VmmState = serde_json::from_str(&json).expect("deserialise");
    vmm.rebuild_from(&decoded).expect("rebuild");
    vmm.resume().expect("resume");
    wait_ticks(seen.len() + 5);
    let after = ticks();
    assert!(
        after.last() >= seen.last(),
        "uptime went back: {seen:?} then {after:?}"
    );
    vmm.check_alive().expect("vCPU threads alive");
    vmm.stop().expect("stop");
    drop(events);
}

/// The control socket's ConnectVsock tunnel against a real guest: the agent's Info and an
/// Exec that moves a MiB each way through it, a refused port, and the same Info as through the
/// hybrid socket.
#[test]
#[ignore = "boots Linux: runs in the KVM test box"]
fn control_socket_tunnels_to_the_guest_agent() {
    let images = images_dir().expect("images");
    let release = bzimage_release(&guest_kernel(&images).kernel);
    let dir = tempfile::tempdir().expect("tmp");
    let guest = spawn_agent_guest(&images, dir.path(), 1, 256, BOOT);
    let (uds, control) = (guest.uds.clone(), guest.control.clone());
    runtime().block_on(async {
        let mut tunneled = agent_over_control_tunnel(control.clone(), AGENT_PORT).await;
        let info = tunneled
            .info(InfoRequest {})
            .await
            .expect("Info through the tunnel")
            .into_inner();
        assert_eq!(info.kernel_release, release, "{info:?}");
        let mut hybrid = agent_over_hybrid_vsock(uds.clone(), AGENT_PORT).await;
        let direct = hybrid
            .info(InfoRequest {})
            .await
            .expect("info")
            .into_inner();
        assert_eq!(info, direct, "the same agent either way");

        // A MiB of standard input goes to the guest and comes back through cat: the tunnel
        // carries bulk data both ways, complete and in order.
        let input: Vec<u8> = (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let reply = tunneled
            .exec(ExecRequest {
                program: "/bin/cat".into(),
                stdin: input.clone(),
                ..Default::default()
            })
            .await
            .expect("exec through the tunnel")
            .into_inner();
        assert_eq!(
            reply.exit_code,
            0,
            "{:?}",
            String::from_utf8_lossy(&reply.stderr)
        );
        assert!(
            reply.stdout == input,
            "cat returned {} other bytes",
            reply.stdout.len()
        );

        // Nothing listens on this port in the guest: the tunnel is refused, the VMM carries on.
        let refused = VmmClient::connect(&control)
            .await
            .expect("control")
            .connect_vsock(4242)
            .await
            .expect_err("no listener on port 4242");
        assert_eq!(refused.code(), Some(tonic::Code::Unavailable), "{refused}");
        let again = tunneled.info(InfoRequest {}).await.expect("info again");
        assert_eq!(again.into_inner().kernel_release, info.kernel_release);
    });
}
