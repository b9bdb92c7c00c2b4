//! `ditto-demo`: what `cargo xtask demo` runs with a real KVM (in the KVM test box). Boots the
//! sample guest, runs `ditto-workload` with a few hundred MiB of files (fsynced, so clean page
//! cache) and some anonymous memory, takes a full and a ditto checkpoint of the same running VM,
//! restores the ditto one in a new `ditto-vmm restore` process, verifies the workload there and
//! prints a table. Exits 1 when the verification fails.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use ditto_host::omission::Mode;
use ditto_tests::microvm::images_dir;
use ditto_tests::scenario::{Scenario, WorkloadPlan, exit_status, share_floors, table};

/// Checkpoint a running guest in full and ditto mode, restore the ditto one, compare.
#[derive(Parser)]
struct Args {
    /// Folder for the guest's disks and the checkpoints (RAM-backed /tmp in the box).
    #[arg(long, default_value = "/tmp/ditto-demo")]
    work: PathBuf,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 1024)]
    mem_mib: u64,
    /// Files the workload writes and keeps in the page cache, MiB in all.
    #[arg(long, default_value_t = 300)]
    file_mib: u64,
    /// How many files.
    #[arg(long, default_value_t = 64)]
    file_count: u64,
    /// Anonymous memory of the workload, MiB.
    #[arg(long, default_value_t = 100)]
    anon_mib: u64,
}

fn main() -> ExitCode {
    exit_status("ditto-demo", run(&Args::parse()))
}

fn run(args: &Args) -> Result<bool> {
    let images = images_dir()?;
    let _ = std::fs::remove_dir_all(&args.work);
    std::fs::create_dir_all(&args.work)
        .with_context(|| format!("creating {}", args.work.display()))?;
    let plan = WorkloadPlan {
        name: "demo".into(),
        anon_mib: args.anon_mib,
        file_count: args.file_count,
        file_mib: args.file_mib,
        extra: None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut rows = runtime.block_on(async {
        let mut scenario = Scenario::start(&images, &args.work, args.mem_mib, &plan).await?;
        let full = scenario.measure(&plan.name, Mode::Full, false).await?;
        let ditto = scenario.measure(&plan.name, Mode::Ditto, true).await?;
        anyhow::Ok(vec![full, ditto])
    })?;
    let _ = std::fs::remove_dir_all(&args.work);
    share_floors(&mut rows);
    println!(
        "\nditto demo: a {} MiB guest, {} MiB of files in {} files, {} MiB anonymous",
        args.mem_mib, args.file_mib, args.file_count, args.anon_mib
    );
    print!("{}", table(&rows));
    let verified = rows.iter().filter_map(|r| r.restore).all(|r| r.verified);
    println!(
        "restored ditto checkpoint: workload {}",
        if verified {
            "verified"
        } else {
            "did NOT verify"
        }
    );
    Ok(verified)
}
