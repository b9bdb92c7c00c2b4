//! `cargo xtask soak`: many checkpoints in a row of a busy guest in the KVM test box (the
//! end-to-end test `soak_linux` with its long settings), to show that a guest lives through
//! them and that every checkpoint restores. Prints the QEMU that ran the box, since the box's
//! emulator is one of the suspects when a guest dies.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::testbox::{self, BoxArgs, SOAK_ENV_PREFIX};
use crate::{images, kernel, qemu, setup, test};

/// The end-to-end test target the soak runs.
const SOAK_TEST: &str = "soak_linux";

/// Options of `cargo xtask soak`.
#[derive(clap::Args)]
pub struct SoakArgs {
    /// Checkpoints to take in each mode.
    #[arg(long, default_value_t = 200)]
    pub checkpoints: u32,
    /// The modes, in order (comma-separated: ditto, free-only, full).
    #[arg(long, default_value = "ditto")]
    pub modes: String,
    /// Restore and verify every N-th checkpoint (and the last of each mode).
    #[arg(long, default_value_t = 10)]
    pub restore_every: u32,
    /// Boot the guest without its balloon driver (no free-page hints).
    #[arg(long)]
    pub no_balloon: bool,
    /// The guest kernel: stock (Debian's) or ditto (the patched one of `cargo xtask kernel`).
    #[arg(long, default_value = "stock", value_parser = ["stock", "ditto"])]
    pub guest_kernel: String,
    /// Kill the box (and fail) after this many seconds.
    #[arg(long, default_value_t = 14_400)]
    pub timeout: u64,
}

/// Builds what the soak needs and runs it in a box; returns the test's exit status.
pub fn run(args: &SoakArgs) -> Result<i32> {
    setup::ensure(setup::Report::Changes)?;
    images::build(&images::ImagesArgs::default())?;
    if args.guest_kernel == "ditto" {
        kernel::ensure(&kernel::KernelArgs::default())?;
    }
    let exe = test::e2e_executables()?
        .into_iter()
        .find(|t| t.name == SOAK_TEST)
        .with_context(|| format!("no end-to-end test {SOAK_TEST} was built"))?;
    testbox::prepare()?;
    let version = Command::new(qemu::binary())
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run {} --version", qemu::binary()))?;
    let version = String::from_utf8_lossy(&version.stdout);
    println!(
        "soak: {} {} checkpoint(s) in each of: {}; restore every {}; balloon driver {}; \
         {} guest kernel; box emulator: {}",
        SOAK_TEST,
        args.checkpoints,
        args.modes,
        args.restore_every,
        if args.no_balloon { "off" } else { "on" },
        args.guest_kernel,
        version.lines().next().unwrap_or("unknown")
    );
    if args.checkpoints == 0 {
        bail!("--checkpoints must be at least 1");
    }
    let settings = [
        ("CHECKPOINTS", args.checkpoints.to_string()),
        ("MODES", args.modes.clone()),
        ("RESTORE_EVERY", args.restore_every.to_string()),
        (
            "BALLOON",
            if args.no_balloon { "0" } else { "1" }.to_owned(),
        ),
    ];
    let mut script = String::new();
    for (name, value) in settings {
        script.push_str(&format!(
            "export {SOAK_ENV_PREFIX}{name}={}; ",
            testbox::shell_quote(&value)
        ));
    }
    script.push_str(&format!(
        "export {}={}; exec {} --include-ignored --test-threads=1 --nocapture",
        test::GUEST_KERNEL_ENV,
        args.guest_kernel,
        testbox::shell_quote(&exe.executable)
    ));
    testbox::run_prepared(&BoxArgs {
        forwards: Vec::new(),
        shares: Vec::new(),
        mem_mib: test::E2E_BOX_MEM_MIB,
        native: testbox::can_run_natively(),
        timeout: args.timeout,
        command: vec!["sh".into(), "-c".into(), script],
    })
}
