//! `ditto-workload` in a Linux guest under ditto's own VMM, in the KVM test box: started in the
//! background through the agent's Exec, it verifies its 64 MiB of anonymous memory and its
//! fsynced files, its heartbeat advances between two verifies, and it keeps running (and
//! verifying) across a two-second pause of the VM.

use std::time::{Duration, Instant};

use ditto_host::control::{VmState, VmmClient};
use ditto_tests::microvm::images_dir;
use ditto_tests::vmm::{AGENT_PORT, AgentGuest, agent_over_hybrid_vsock, spawn_agent_guest};
use ditto_tests::workload::{CONTROL, WORKLOAD, count, sh, verify};
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(180);
const ANON_MIB: u64 = 64;
const FILE_MIB: u64 = 16;

#[test]
#[ignore = "boots Linux: runs in the KVM test box"]
fn the_workload_verifies_in_a_guest_and_its_heartbeat_advances_across_a_pause() {
    let images = images_dir().expect("images");
    let dir = tempfile::tempdir().expect("tmp");
    let AgentGuest {
        vmm: _vmm,
        uds,
        control,
        ..
    } = spawn_agent_guest(&images, dir.path(), 1, 256, BOOT);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut agent = agent_over_hybrid_vsock(uds.clone(), AGENT_PORT).await;
        let started = Instant::now();
        let (code, _) = sh(
            &mut agent,
            &format!(
                "setsid {WORKLOAD} run --anon-mib {ANON_MIB} --seed 4242 --control {CONTROL} \
                 --files /root/workload --file-count 4 --file-mib {FILE_MIB} --read /usr \
                 </dev/null >/dev/null 2>&1 &"
            ),
        )
        .await;
        assert_eq!(code, 0);
        let (code, out) = sh(
            &mut agent,
            &format!("{WORKLOAD} status --json --wait 300 --control {CONTROL}"),
        )
        .await;
        assert_eq!(code, 0, "{out}");
        let status: Value = serde_json::from_str(&out).expect("status JSON");
        println!(
            "measured: workload set-up in the guest (fill {ANON_MIB} MiB, write and fsync \
             {FILE_MIB} MiB, read /usr): {} ms (ready after {:.1} s)",
            status["setup_ms"],
            started.elapsed().as_secs_f64()
        );
        assert_eq!(count(&status["anon_pages"]), ANON_MIB * 256, "{status}");
        assert_eq!(count(&status["files"]["count"]), 4, "{status}");
        // /usr holds the agent and the workload binaries themselves.
        assert!(count(&status["page_cache"]["bytes"]) > 1 << 20, "{status}");
        assert_eq!(count(&status["page_cache"]["errors"]), 0, "{status}");

        let (code, first) = verify(&mut agent).await;
        assert_eq!(code, 0, "{first}");
        assert_eq!(first["ok"], true);
        assert_eq!(count(&first["memory"]["pages_checked"]), ANON_MIB * 256);
        assert_eq!(count(&first["memory"]["bad_pages"]), 0);
        assert_eq!(count(&first["files"]["checked"]), 4);
        assert_eq!(count(&first["files"]["bytes_read"]), FILE_MIB << 20);
        assert_eq!(first["previous_heartbeats"], Value::Null);
        let us = count(&first["memory"]["elapsed_us"]).max(1);
        println!(
            "measured: verify of {ANON_MIB} MiB anonymous memory in the guest: {:.3} s \
             ({:.0} MiB/s); {FILE_MIB} MiB of files read back in {:.3} s",
            us as f64 / 1e6,
            ANON_MIB as f64 / (us as f64 / 1e6),
            count(&first["files"]["elapsed_us"]) as f64 / 1e6
        );

        tokio::time::sleep(Duration::from_secs(1)).await;
        let (code, second) = verify(&mut agent).await;
        assert_eq!(code, 0, "{second}");
        assert_eq!(second["previous_heartbeats"], first["heartbeats"]);
        assert!(
            count(&second["heartbeats"]) > count(&first["heartbeats"]),
            "{first}\n{second}"
        );
        assert_eq!(second["pid"], first["pid"]);

        // Two seconds paused: the same process is still there, intact, and still beating.
        let vm = VmmClient::connect(&control).await.expect("control");
        assert_eq!(vm.pause().await.expect("pause").state, VmState::Paused);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(vm.resume().await.expect("resume").state, VmState::Running);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (code, third) = verify(&mut agent).await;
        assert_eq!(code, 0, "{third}");
        assert_eq!(third["pid"], first["pid"]);
        assert_eq!(third["previous_heartbeats"], second["heartbeats"]);
        assert!(
            count(&third["heartbeats"]) > count(&second["heartbeats"]),
            "{second}\n{third}"
        );

        let (code, out) = sh(&mut agent, &format!("{WORKLOAD} stop --control {CONTROL}")).await;
        assert_eq!(code, 0, "{out}");
    });
}
