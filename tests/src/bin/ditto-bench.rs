//! `ditto-bench`: what `cargo xtask bench` runs with a real KVM (in the KVM test box). For four
//! workloads (read-heavy, small-file churn, anonymous-heavy, mixed), each in its own freshly
//! booted guest, takes a full, a free-only and a ditto checkpoint of the same running VM,
//! restores each in a new VMM and verifies the workload there; prints a table with ratios
//! against full and the targets, and with `--json FILE` writes one record per workload and
//! mode. Exits 1 when a restored workload did not verify.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use ditto_host::omission::Mode;
use ditto_tests::microvm::images_dir;
use ditto_tests::scenario::{
    Scenario, WorkloadPlan, exit_status, share_floors, table, targets, write_json,
};

/// The name of the workload the size and time targets are about.
const READ_HEAVY: &str = "read-heavy";

/// Benchmark full, free-only and ditto checkpoints on four workloads.
#[derive(Parser)]
struct Args {
    /// Write the records as a JSON array to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// A quarter of the sizes (and of the churn) for a faster run.
    #[arg(long)]
    quick: bool,
    /// Folder for the guests' disks and the checkpoints (RAM-backed /tmp in the box).
    #[arg(long, default_value = "/tmp/ditto-bench")]
    work: PathBuf,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 1024)]
    mem_mib: u64,
}

/// A guest script that creates, appends to, reads and deletes many small files (PostMark-like)
/// in /root/churn: `ops` operations over `names` file names, then `sync`.
fn churn(ops: u64, names: u64) -> String {
    format!(
        "set -e; d=/root/churn; mkdir -p $d; head -c 16384 /dev/urandom > $d/chunk; i=0; \
         while [ $i -lt {ops} ]; do \
           cat $d/chunk >> $d/f$((i % {names})); \
           cat $d/f$(((i * 7) % {names})) > /dev/null 2>&1 || true; \
           if [ $((i % 3)) -eq 0 ]; then rm -f $d/f$(((i * 13) % {names})); fi; \
           i=$((i + 1)); \
         done; sync; echo $(ls $d | wc -l) files left"
    )
}

/// The four workloads; `scale` divides their sizes.
fn plans(scale: u64) -> Vec<WorkloadPlan> {
    let plan = |name: &str, anon_mib: u64, file_count: u64, file_mib: u64| WorkloadPlan {
        name: name.into(),
        anon_mib: (anon_mib / scale).max(1),
        file_count,
        file_mib: (file_mib / scale).max(1),
        extra: None,
    };
    vec![
        plan(READ_HEAVY, 32, 64, 700),
        WorkloadPlan {
            extra: Some(churn(3000 / scale, 400 / scale)),
            ..plan("small-file-churn", 64, 4, 16)
        },
        plan("anon-heavy", 700, 1, 4),
        plan("mixed", 300, 16, 300),
    ]
}

fn main() -> ExitCode {
    exit_status("ditto-bench", run(&Args::parse()))
}

fn run(args: &Args) -> Result<bool> {
    let images = images_dir()?;
    let scale = if args.quick { 4 } else { 1 };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    for plan in plans(scale) {
        let work = args.work.join(&plan.name);
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        let measured = runtime.block_on(async {
            let mut scenario = Scenario::start(&images, &work, args.mem_mib, &plan).await?;
            let mut measured = Vec::new();
            for mode in [Mode::Full, Mode::FreeOnly, Mode::Ditto] {
                measured.push(scenario.measure(&plan.name, mode, true).await?);
            }
            anyhow::Ok(measured)
        });
        let _ = std::fs::remove_dir_all(&work);
        rows.extend(measured.with_context(|| format!("workload {}", plan.name))?);
    }
    share_floors(&mut rows);
    println!(
        "\nditto bench{}: a {} MiB guest per workload",
        if args.quick {
            " (quick: a quarter of the sizes)"
        } else {
            ""
        },
        args.mem_mib
    );
    print!("{}", table(&rows));
    println!("targets (reported, not asserted):");
    for line in targets(&rows, READ_HEAVY) {
        println!("  {line}");
    }
    if let Some(path) = &args.json {
        write_json(path, &rows)?;
        println!("records written to {}", path.display());
    }
    Ok(rows.iter().all(|r| r.restore.is_some_and(|x| x.verified)))
}
