//! Repeated checkpoints of a busy guest, in the KVM test box: a 2-vCPU, 512 MiB guest churns
//! small files (rewrite, truncate, delete, re-read, drop caches) on both vCPUs while its VMM
//! takes checkpoint after checkpoint of it, the VM left running. The test fails when the original
//! guest dies (its VMM ends, or its agent stops answering) or when a checkpoint does not restore
//! into a guest whose workload verifies.
//!
//! The regular run takes a few checkpoints in each mode (`ditto`, then `free-only` and `full` as
//! controls). `cargo xtask soak` runs the same test with `DITTO_SOAK_CHECKPOINTS`,
//! `DITTO_SOAK_MODES`, `DITTO_SOAK_RESTORE_EVERY` and `DITTO_SOAK_BALLOON` set, for the long
//! soak and for the experiments that isolate a cause.

use std::time::{Duration, Instant};

use ditto_host::control::VmmClient;
use ditto_host::omission::Mode;
use ditto_proto::agent::v1::agent_client::AgentClient;
use ditto_tests::microvm::images_dir;
use ditto_tests::rounds::{Guest, Take, bounded, discard};
use ditto_tests::vmm::{TestVm, sparse_copy};
use ditto_tests::workload::{CONTROL, WORKLOAD, try_sh};
use tonic::transport::Channel;

const BOOT: Duration = Duration::from_secs(240);
const MEM_MIB: u64 = 512;
const VCPUS: u8 = 2;
/// Files `ditto-workload` keeps and verifies (besides the churned ones).
const FILES: u64 = 8;
/// How long the original's agent may take to answer between checkpoints.
const ALIVE_LIMIT: Duration = Duration::from_secs(120);

/// 24 files of 0.5 to 1 MiB in /data/churn, rewritten, truncated, deleted, re-read and dropped
/// from the cache by two loops (one per vCPU), until the guest stops them.
const CHURN: &str = r#"mkdir -p /data/churn
i=0
for n in $(seq 0 23); do head -c $(( (512 + n * 21) * 1024 )) /dev/urandom > /data/churn/f$n; done
sync
loop() {
  i=$1
  while :; do
    i=$((i + 1)); n=$((i % 24)); m=$(((i * 7) % 24))
    dd if=/dev/urandom of=/data/churn/f$n bs=4096 count=16 seek=$((i % 128)) conv=notrunc 2>/dev/null
    truncate -s $(( (256 + i % 512) * 1024 )) /data/churn/f$m
    cat /data/churn/f$(((i + 3) % 24)) /data/churn/f$(((i + 11) % 24)) > /dev/null
    if [ $((i % 9)) -eq 0 ]; then rm -f /data/churn/f$n; head -c 786432 /dev/urandom > /data/churn/f$n; fi
    if [ $((i % 5)) -eq 0 ]; then sync; fi
    if [ $((i % 17)) -eq 0 ]; then echo 3 > /proc/sys/vm/drop_caches; fi
  done
}
loop 0 &
loop 1000 &
wait"#;

/// Stops the churn (its whole process group) and waits until it is gone.
const STOP_CHURN: &str = "kill -9 -- -$(cat /root/churn.pid) 2>/dev/null; \
     while kill -0 -- -$(cat /root/churn.pid) 2>/dev/null; do usleep 100000; done; sync";

/// The settings of one run, from the environment (`cargo xtask soak` sets them).
struct Plan {
    /// Checkpoints per mode.
    checkpoints: Vec<(Mode, u32)>,
    /// Restore every n-th checkpoint (1: each).
    restore_every: u32,
    /// Whether the guest's balloon driver is loaded.
    balloon: bool,
}

impl Plan {
    fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let count = |name: &str, default: u32| {
            var(name).map_or(default, |v| {
                v.parse()
                    .unwrap_or_else(|e| panic!("{name}={v:?} is not a count: {e}"))
            })
        };
        let checkpoints = match var("DITTO_SOAK_MODES") {
            Some(modes) => {
                let n = count("DITTO_SOAK_CHECKPOINTS", 200);
                modes
                    .split(',')
                    .map(|m| {
                        let mode = match m.trim() {
                            "ditto" => Mode::Ditto,
                            "free-only" => Mode::FreeOnly,
                            "full" => Mode::Full,
                            other => panic!(
                                "DITTO_SOAK_MODES: {other:?} is not ditto, free-only or full"
                            ),
                        };
                        (mode, n)
                    })
                    .collect()
            }
            None => vec![(Mode::Ditto, 8), (Mode::FreeOnly, 3), (Mode::Full, 2)],
        };
        let restore_every = count("DITTO_SOAK_RESTORE_EVERY", 2).max(1);
        let balloon = var("DITTO_SOAK_BALLOON").is_none_or(|v| v != "0");
        Self {
            checkpoints,
            restore_every,
            balloon,
        }
    }
}

/// Fails the test when the original VM is gone or its agent does not answer: prints how many
/// checkpoints it lived through, what the guest and its VMM say, and its console and VMM log.
/// A broken connection to a guest that still answers on a new one is told apart from a death.
async fn assert_alive(
    vm: &mut TestVm,
    agent: &mut AgentClient<Channel>,
    control: &VmmClient,
    after: &str,
) {
    let why = match tokio::time::timeout(ALIVE_LIMIT, try_sh(agent, "cat /proc/uptime")).await {
        Ok(Ok((0, _))) => return,
        Ok(Ok((code, out))) => format!("`cat /proc/uptime` said {code}: {out}"),
        Ok(Err(e)) => format!("its agent: {e:?}"),
        Err(_) => format!("its agent did not answer within {ALIVE_LIMIT:?}"),
    };
    // A guest that crashed takes its VMM with it within moments.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && vm.process.try_exit_status().is_none() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let vmm = match vm.process.try_exit_status() {
        Some(status) => format!("its VMM ended ({status})"),
        None => match control.status().await {
            Ok(s) => format!("its VMM runs (state {:?})", s.state),
            Err(e) => format!("its VMM runs, but its control socket fails: {e}"),
        },
    };
    let fresh = match tokio::time::timeout(
        Duration::from_secs(30),
        ditto_host::agent::connect(
            &vm.uds,
            ditto_tests::vmm::AGENT_PORT,
            Duration::from_secs(10),
        ),
    )
    .await
    {
        Ok(Ok(mut client)) => match tokio::time::timeout(
            Duration::from_secs(30),
            try_sh(&mut client, "cat /proc/uptime; dmesg | tail -n 30"),
        )
        .await
        {
            Ok(Ok((code, out))) => format!("a new connection to the agent works ({code}):\n{out}"),
            Ok(Err(e)) => format!("a new connection to the agent fails: {e:?}"),
            Err(_) => "a new connection to the agent does not answer".to_owned(),
        },
        Ok(Err(e)) => format!("no new connection to the agent: {e}"),
        Err(_) => "no new connection to the agent within 30 s".to_owned(),
    };
    panic!(
        "the original guest failed after {after}: {why}\n{vmm}; {fresh}\n\
         the VMM's threads:\n{}\nthe host kernel's last messages:\n{}\n{}",
        thread_report(vm.process.pid()),
        host_kernel_tail(),
        vm.process.transcript()
    )
}

/// Whether the VMM runs, its threads, the host kernel's last messages, and its transcript.
fn vmm_report(vm: &mut TestVm) -> String {
    let status = match vm.process.try_exit_status() {
        Some(status) => format!("its VMM ended ({status})"),
        None => format!(
            "its VMM runs; its threads:\n{}",
            thread_report(vm.process.pid())
        ),
    };
    format!(
        "{status}\nthe host kernel's last messages:\n{}\n{}",
        host_kernel_tail(),
        vm.process.transcript()
    )
}

/// The last 40 lines of this (host or box) kernel's log, where KVM and the scheduler report
/// trouble.
fn host_kernel_tail() -> String {
    match std::process::Command::new("dmesg").output() {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        }
        Err(e) => format!("(dmesg: {e})"),
    }
}

/// Each thread of process `pid`: its name, state and where it waits in the kernel (its kernel
/// stack, when this host lets root read it), to tell a parked vCPU thread from one in the guest
/// or halted in KVM.
fn thread_report(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("(no /proc/{pid}/task)");
    };
    let mut out = String::new();
    for task in tasks.flatten() {
        let path = task.path();
        let read = |name: &str| std::fs::read_to_string(path.join(name)).unwrap_or_default();
        let stat = read("stat");
        // The state is the field after the parenthesised name.
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or("?");
        out.push_str(&format!(
            "{} {} state {state} wchan {}\n",
            task.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan").trim()
        ));
        for frame in read("stack").lines().take(12) {
            out.push_str(&format!("    {frame}\n"));
        }
    }
    out
}

#[test]
#[ignore = "boots Linux: runs in the KVM test box"]
fn a_busy_guest_lives_through_repeated_checkpoints_and_each_restores() {
    let plan = Plan::from_env();
    let images = images_dir().expect("images");
    let work = tempfile::tempdir().expect("tmp");
    let work = work.path();
    let original_dir = work.join("original");
    std::fs::create_dir_all(&original_dir).expect("mkdir");
    let root = original_dir.join("rootfs.ext4");
    sparse_copy(&images.join("rootfs.ext4"), &root).expect("root copy");
    let cmdline = if plan.balloon {
        "rw"
    } else {
        "rw module_blacklist=virtio_balloon initcall_blacklist=virtio_balloon_driver_init"
    };
    let mut original = TestVm::boot_smp(&original_dir, &root, 3, MEM_MIB, VCPUS, cmdline);
    original.process.wait_for("ditto-agent serving", BOOT);

    ditto_tests::block_on(async {
        let mut agent = original.agent().await;
        let (code, out) = original
            .sh(
                &mut agent,
                &format!(
                    "setsid {WORKLOAD} run --anon-mib 32 --seed 11 --control {CONTROL} \
                     --files /data/workload --file-count {FILES} --file-mib 16 \
                     </dev/null >/dev/null 2>&1 &\n\
                     {WORKLOAD} status --json --wait 600 --control {CONTROL} >/dev/null\n\
                     cat > /root/churn.sh <<'SCRIPT'\n{CHURN}\nSCRIPT\n\
                     setsid sh /root/churn.sh </dev/null >/dev/null 2>&1 & echo $! > /root/churn.pid"
                ),
            )
            .await;
        assert_eq!(code, 0, "{out}");
        let control = original.control().await;
        let ckpts = work.join("checkpoints");
        std::fs::create_dir_all(&ckpts).expect("mkdir");
        let guest = Guest {
            mem_mib: MEM_MIB,
            files: FILES,
        };
        let started = Instant::now();
        let mut taken = 0u32;
        let mut restored = 0u32;
        let mut cid = 10u32;
        for &(mode, count) in &plan.checkpoints {
            let mode_started = Instant::now();
            for n in 1..=count {
                // The churn runs a moment between checkpoints, as for an operator's schedule.
                tokio::time::sleep(Duration::from_secs(2)).await;
                let name = format!("{mode}-{n}");
                let take = Take {
                    mode,
                    ..Take::default()
                };
                let (_, file, disk) = guest
                    .checkpoint_explained(&control, &ckpts, &name, take, |e| {
                        format!(
                            "{e}\nafter {taken} checkpoints; {}",
                            vmm_report(&mut original)
                        )
                    })
                    .await;
                taken += 1;
                assert_alive(
                    &mut original,
                    &mut agent,
                    &control,
                    &format!("{taken} checkpoints ({name})"),
                )
                .await;
                if n % plan.restore_every == 0 || n == count {
                    // One busy guest at a time: the original waits while its copy is checked.
                    bounded(ALIVE_LIMIT, control.pause(), || {
                        format!("pausing the original for {name}")
                    })
                    .await
                    .expect("pause");
                    cid += 1;
                    let (vm, _clone) = guest
                        .restore_and_check(
                            work,
                            &name,
                            &file,
                            &disk,
                            cid,
                            STOP_CHURN,
                            "/data/workload /data/churn",
                        )
                        .await;
                    drop(vm);
                    restored += 1;
                    let _ = std::fs::remove_dir_all(work.join(&name));
                    bounded(ALIVE_LIMIT, control.resume(), || {
                        format!("resuming the original after {name}")
                    })
                    .await
                    .expect("resume");
                }
                discard(&[&file, &disk]);
            }
            println!(
                "measured: soak: {count} {mode} checkpoints of a busy {VCPUS}-vCPU guest in {:.0} s \
                 (balloon driver {}), the original alive after each",
                mode_started.elapsed().as_secs_f64(),
                if plan.balloon { "loaded" } else { "not loaded" }
            );
        }
        println!(
            "measured: soak: {taken} checkpoints in {:.0} s, {restored} restored and verified, \
             the original alive throughout",
            started.elapsed().as_secs_f64()
        );
        original.sh(&mut agent, STOP_CHURN).await;
        original.shutdown(&control).await;
    });
}
