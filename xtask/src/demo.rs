//! `cargo xtask demo` and `cargo xtask bench`: build what they need (setup, guest images,
//! release musl binaries), then run the in-box programs `ditto-demo` and `ditto-bench` (crate
//! `ditto-tests`) with a real KVM: inside the KVM test box, or on this host when it has
//! hardware virtualisation. `bench --json FILE` has `ditto-bench` write its records to a file
//! below the shared target folder and copies it to FILE. `bench --methods` builds the patched
//! guest kernel too and runs `ditto-methods` on it instead: the agent's walk against the
//! kernel's fast path on one page cache.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::testbox::{self, BoxArgs};
use crate::{images, kernel, paths, setup};

/// Memory of the box: a 1 GiB guest and a restored clone of it at once, with the guest's disk,
/// its copy and a checkpoint file in the box's RAM-backed /tmp.
const BOX_MEM_MIB: u64 = 6144;

/// Options of `cargo xtask demo`.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Time limit of the run in the box, in seconds.
    #[arg(long, default_value_t = 1800, value_name = "SECONDS")]
    pub box_timeout: u64,
}

/// Options of `cargo xtask bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Write one JSON record per workload and mode (an array) to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// A quarter of the sizes, for a faster run.
    #[arg(long, conflicts_with = "methods")]
    pub quick: bool,
    /// Instead of the four workloads: on the patched guest kernel, ditto checkpoints through
    /// the agent's walk and through the kernel fast path (/proc/kpageblock) of one page cache.
    #[arg(long, conflicts_with = "json")]
    pub methods: bool,
    /// Time limit of the run in the box, in seconds.
    #[arg(long, default_value_t = 5400, value_name = "SECONDS")]
    pub box_timeout: u64,
}

/// `cargo xtask demo`: returns `ditto-demo`'s exit status.
pub fn demo(args: &DemoArgs) -> Result<i32> {
    with_kvm(vec!["ditto-demo".into()], args.box_timeout)
}

/// `cargo xtask bench`: returns `ditto-bench`'s exit status.
pub fn bench(args: &BenchArgs) -> Result<i32> {
    if args.methods {
        setup::ensure(setup::Report::Changes)?;
        let image = kernel::ensure(&kernel::KernelArgs::default())?;
        eprintln!("xtask bench --methods: guest kernel {}", image.display());
        let command = "DITTO_GUEST_KERNEL=ditto exec ditto-methods";
        return with_kvm(
            vec!["sh".into(), "-c".into(), command.into()],
            args.box_timeout,
        );
    }
    let mut command = vec!["ditto-bench".to_owned()];
    if args.quick {
        command.push("--quick".into());
    }
    // The box sees the target folder at its host path: the records land there.
    let records = paths::images_root()
        .join("bench")
        .join(format!("records-{}.json", std::process::id()));
    if args.json.is_some() {
        if let Some(dir) = records.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let _ = fs::remove_file(&records);
        command.extend(["--json".into(), records.display().to_string()]);
    }
    let code = with_kvm(command, args.box_timeout)?;
    if let Some(out) = &args.json {
        copy_records(&records, out, code)?;
    }
    Ok(code)
}

/// Moves the records `ditto-bench` wrote to `out`.
fn copy_records(records: &Path, out: &Path, code: i32) -> Result<()> {
    if !records.exists() {
        bail!(
            "ditto-bench (status {code}) wrote no records, so {} was not written",
            out.display()
        );
    }
    fs::copy(records, out).with_context(|| format!("copying the records to {}", out.display()))?;
    let _ = fs::remove_file(records);
    println!("xtask bench: records written to {}", out.display());
    Ok(())
}

/// Builds the images and binaries and runs `command` where there is a real KVM.
fn with_kvm(command: Vec<String>, timeout: u64) -> Result<i32> {
    setup::ensure(setup::Report::Changes)?;
    images::build(&images::ImagesArgs::default())?;
    let native = testbox::can_run_natively();
    if !native {
        eprintln!("xtask: no hardware virtualisation here: running in the KVM test box");
    }
    testbox::run(&BoxArgs {
        forwards: Vec::new(),
        shares: Vec::new(),
        mem_mib: BOX_MEM_MIB,
        native,
        timeout,
        command,
    })
}
