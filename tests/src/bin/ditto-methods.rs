//! `ditto-methods`: what `cargo xtask bench --methods` runs with a real KVM (in the KVM test
//! box), on the patched guest kernel (`$DITTO_GUEST_KERNEL=ditto`, which the xtask sets; it
//! refuses to run on another). One guest, one workload, one page cache: a second agent in the
//! guest serves on its own vsock port forced to the walk (`ditto-agent serve --method walk`),
//! and ditto checkpoints alternate between it and the default agent (auto, which picks
//! /proc/kpageblock), twice each. Prints per checkpoint the scan time the VMM measured, the
//! pages the agent reported and the VMM omitted, the stored bytes and the pause, then the
//! fast path's figures as ratios of the walk's. The last checkpoint of each method is restored
//! and verified. It asserts nothing about speed; it exits 1 when a restored workload did not
//! verify or a checkpoint did not use the method it was meant to.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use ditto_host::omission::Mode;
use ditto_tests::microvm::{KernelChoice, images_dir};
use ditto_tests::scenario::{Measurement, Scenario, WorkloadPlan, exit_status};

/// The vsock port of the second agent, forced to the walk.
const WALK_PORT: u32 = 10500;

/// Benchmark the agent's walk against the kernel fast path on one page cache.
#[derive(Parser)]
struct Args {
    /// Folder for the guest's disk and the checkpoints (RAM-backed /tmp in the box).
    #[arg(long, default_value = "/tmp/ditto-methods")]
    work: PathBuf,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 1024)]
    mem_mib: u64,
    /// Files of the workload, MiB in all (clean page cache).
    #[arg(long, default_value_t = 400)]
    file_mib: u64,
    /// Number of those files.
    #[arg(long, default_value_t = 64)]
    file_count: u64,
}

fn main() -> ExitCode {
    exit_status("ditto-methods", run(&Args::parse()))
}

/// One checkpoint: which method it meant to use, and what it measured.
struct Row {
    method: &'static str,
    measured: Measurement,
}

fn run(args: &Args) -> Result<bool> {
    if KernelChoice::from_env()? != KernelChoice::Ditto {
        bail!(
            "the fast path needs the patched kernel: run with DITTO_GUEST_KERNEL=ditto \
             (cargo xtask bench --methods does)"
        );
    }
    let images = images_dir()?;
    let plan = WorkloadPlan {
        name: "methods".into(),
        anon_mib: 32,
        file_count: args.file_count,
        file_mib: args.file_mib,
        // The image's binaries too, and the second agent.
        extra: Some(format!(
            "cat /usr/bin/* /usr/sbin/* /bin/busybox > /dev/null 2>&1; \
             setsid ditto-agent serve --listen vsock:{WALK_PORT} --method walk \
             </dev/null >/run/walk-agent.log 2>&1 & sleep 2; kill -0 $!"
        )),
    };
    let _ = std::fs::remove_dir_all(&args.work);
    std::fs::create_dir_all(&args.work)
        .with_context(|| format!("creating {}", args.work.display()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let rows = runtime.block_on(async {
        let mut scenario = Scenario::start(&images, &args.work, args.mem_mib, &plan).await?;
        // Each method's own account of a scan, in the guest (no transfer to the host).
        let mut agent = scenario.vm.agent().await?;
        let scans = scenario
            .vm
            .sh(
                &mut agent,
                "for m in walk kpageblock walk kpageblock; do \
                 ditto-agent scan --method $m | grep '^method'; done",
            )
            .await?;
        print!("in the guest, `ditto-agent scan`:\n{scans}");
        drop(agent);
        let mut rows = Vec::new();
        for round in 1..=2 {
            for (method, port) in [("walk", Some(WALK_PORT)), ("kpageblock", None)] {
                let restore = round == 2;
                let measured = scenario
                    .measure_through(&plan.name, Mode::Ditto, restore, port)
                    .await?;
                rows.push(Row { method, measured });
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        anyhow::Ok(rows)
    });
    let _ = std::fs::remove_dir_all(&args.work);
    let rows = rows?;
    print!("{}", table(args, &rows));
    let mut ok = true;
    for r in &rows {
        let used = r
            .measured
            .omission
            .as_ref()
            .map_or("", |o| o.scan_method.as_str());
        if used != r.method {
            println!("a checkpoint meant for {} used {used:?}", r.method);
            ok = false;
        }
        if r.measured.restore.is_some_and(|x| !x.verified) {
            ok = false;
        }
    }
    Ok(ok)
}

/// The table: one line per checkpoint, then the fast path's means as ratios of the walk's.
fn table(args: &Args, rows: &[Row]) -> String {
    let mut out = format!(
        "\nditto methods: a {} MiB guest on the patched kernel, {} MiB in {} files, \
         the same page cache for every checkpoint\n",
        args.mem_mib, args.file_mib, args.file_count
    );
    out.push_str(&format!(
        "{:>10}  {:>9}  {:>12}  {:>12}  {:>10}  {:>9}  {:>9}  {}\n",
        "method",
        "scan ms",
        "reported pg",
        "omitted pg",
        "stored MiB",
        "pause ms",
        "rejected",
        "restored"
    ));
    for r in rows {
        let Figures {
            scan,
            reported,
            omitted,
            stored,
            pause,
            rejected,
        } = Figures::of(&r.measured);
        let restored = match r.measured.restore {
            Some(x) if x.verified => "verified",
            Some(_) => "NOT verified",
            None => "-",
        };
        out.push_str(&format!(
            "{:>10}  {scan:>9.1}  {reported:>12}  {omitted:>12}  {stored:>10.1}  {pause:>9.0}  \
             {rejected:>9}  {restored}\n",
            r.method
        ));
    }
    let mean = |method: &str, pick: fn(&Figures) -> f64| {
        let values: Vec<f64> = rows
            .iter()
            .filter(|r| r.method == method)
            .map(|r| pick(&Figures::of(&r.measured)))
            .collect();
        values.iter().sum::<f64>() / values.len().max(1) as f64
    };
    let ratio = |name: &str, pick: fn(&Figures) -> f64| {
        let (walk, fast) = (mean("walk", pick), mean("kpageblock", pick));
        let r = if walk > 0.0 {
            format!("{:.3}", fast / walk)
        } else {
            "-".into()
        };
        format!("  {name}: walk {walk:.1}, kpageblock {fast:.1}, kpageblock / walk {r}\n")
    };
    out.push_str("means over the rounds (reported, not asserted):\n");
    out.push_str(&ratio("scan ms", |f| f.scan));
    out.push_str(&ratio("pages reported", |f| f.reported));
    out.push_str(&ratio("pages omitted", |f| f.omitted));
    out.push_str(&ratio("stored MiB", |f| f.stored));
    out.push_str(&ratio("pause ms", |f| f.pause));
    out
}

/// The figures of one checkpoint the table shows.
struct Figures {
    /// The agent's scan as the VMM timed it, ms.
    scan: f64,
    /// Pages the agent reported as clean page cache.
    reported: f64,
    /// Of those, pages the VMM omitted.
    omitted: f64,
    /// Bytes stored, MiB.
    stored: f64,
    /// The pause, ms.
    pause: f64,
    /// Reported pages refused, all reasons.
    rejected: u64,
}

impl Figures {
    fn of(m: &Measurement) -> Self {
        let o = m.omission.clone().unwrap_or_default();
        Self {
            scan: o.scan_us as f64 / 1e3,
            reported: o.pages_reported_cache as f64,
            omitted: o.pages_omitted_cache as f64,
            stored: m.stored_bytes as f64 / f64::from(1 << 20),
            pause: m.checkpoint_ms,
            rejected: o.rejected_guest_write
                + o.rejected_vmm_write
                + o.rejected_disk_write
                + o.rejected_validation
                + o.rejected_verification,
        }
    }
}
