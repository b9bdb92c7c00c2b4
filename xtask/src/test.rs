//! `cargo xtask test`: the whole test pipeline, the README's test command and what CI runs.
//! Format and lint checks, unit and integration tests on this machine (as root: loop devices,
//! ext4, the local /dev/kvm), then the end-to-end tests inside the KVM test box.

use anyhow::{Context, Result, bail};

use crate::paths::MUSL_TARGET;
use crate::testbox::{self, BoxArgs};
use crate::{bootcheck, cmd, images, setup};

/// The package holding the end-to-end tests.
const E2E_PACKAGE: &str = "ditto-tests";

/// Options of `cargo xtask test`.
#[derive(clap::Args)]
pub struct TestArgs {
    /// Time limit of the end-to-end run in the box, in seconds.
    #[arg(long, default_value_t = 2400, value_name = "SECONDS")]
    pub box_timeout: u64,
}

/// Runs every step; stops at the first that fails.
pub fn run(args: &TestArgs) -> Result<()> {
    setup::ensure(setup::Report::Changes)?;
    step("cargo fmt --check", || {
        cmd::run(cmd::cargo().args(["fmt", "--all", "--", "--check"]))
    })?;
    step("cargo clippy", || {
        cmd::run(cmd::cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    step("unit and integration tests", || {
        cmd::run(cmd::cargo().args(["test", "--workspace"]))
    })?;
    let guest = step("guest images", || {
        images::build(&images::ImagesArgs::default())
    })?;
    step("guest images boot (QEMU microvm, ACPI virtio-mmio)", || {
        bootcheck::check(&guest.dir)
    })?;
    let executables = step("end-to-end test build", e2e_executables)?;
    step("end-to-end tests in the KVM test box", || {
        let mut script = String::from("status=0\n");
        for exe in &executables {
            let exe = testbox::shell_quote(exe);
            script.push_str(&format!(
                "echo \"box: running \"{exe}\n{exe} --include-ignored --test-threads=1 || status=1\n"
            ));
        }
        script.push_str("exit $status\n");
        let code = testbox::run(&BoxArgs {
            forwards: Vec::new(),
            shares: Vec::new(),
            mem_mib: 4096,
            native: false,
            timeout: args.box_timeout,
            command: vec!["sh".into(), "-c".into(), script],
        })?;
        if code != 0 {
            bail!("the end-to-end tests failed in the box (status {code})");
        }
        Ok(())
    })?;
    println!("xtask test: all steps passed");
    Ok(())
}

fn step<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    println!("==> {name}");
    let started = std::time::Instant::now();
    let result = f().with_context(|| format!("step '{name}' failed"));
    println!("<== {name}: {:.1} s", started.elapsed().as_secs_f64());
    result
}

/// Builds the end-to-end test executables as static musl binaries and returns their paths.
fn e2e_executables() -> Result<Vec<String>> {
    let mut build = cmd::cargo();
    build.args([
        "test",
        "--release",
        "--no-run",
        "--message-format=json-render-diagnostics",
        "--target",
        MUSL_TARGET,
        "--package",
        E2E_PACKAGE,
    ]);
    if cmd::on_path("musl-gcc") {
        build.env("CC_x86_64_unknown_linux_musl", "musl-gcc");
    }
    let out = cmd::output(&mut build)?;
    let mut executables = Vec::new();
    for line in out.lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = message["profile"]["test"].as_bool() == Some(true);
        if let (true, Some(exe)) = (is_test, message["executable"].as_str()) {
            executables.push(exe.to_owned());
        }
    }
    if executables.is_empty() {
        bail!("building {E2E_PACKAGE} produced no test executables");
    }
    executables.sort();
    Ok(executables)
}
