//! `cargo xtask setup`: installs what a fresh Debian machine lacks for building and testing
//! ditto. Idempotent; when nothing is missing it only asks dpkg and rustup, well under a second.

use std::collections::BTreeSet;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd;
use crate::paths::MUSL_TARGET;

/// Debian packages the build, the images and the box need, with what each is for.
pub const PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "the KVM test box"),
    ("busybox-static", "guest and box userland"),
    ("e2fsprogs", "mkfs.ext4 for root disks"),
    ("cpio", "initramfs archives"),
    ("kmod", "depmod for the guest kernel's modules.dep"),
    ("musl-tools", "C code in static musl builds"),
    ("util-linux", "losetup and mount for tests on ext4 images"),
    ("gcc", "building the patched guest kernel"),
    ("libc6-dev", "the kernel build's host programs"),
    ("make", "building the patched guest kernel"),
    ("flex", "the kernel's configuration parser"),
    ("bison", "the kernel's configuration parser"),
    ("bc", "the kernel build's constants"),
    ("libelf-dev", "the kernel build's objtool"),
    ("libssl-dev", "the kernel build's signing tools"),
    ("xz-utils", "unpacking linux-source-6.1"),
    ("patch", "applying kernel-patch/"),
];

/// rustup components the checks need.
const COMPONENTS: &[&str] = &["rustfmt", "clippy"];

/// Whether to print a line when nothing had to be done.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// Always say what was checked (the `setup` command).
    Always,
    /// Only speak when something is installed (the step run by `test`, `images`, `box`).
    Changes,
}

/// Installs whatever is missing.
pub fn ensure(report: Report) -> Result<()> {
    let missing = missing_packages()?;
    if !missing.is_empty() {
        install_packages(&missing)?;
        println!("setup: installed Debian packages: {}", missing.join(" "));
    }
    let rust_changes = ensure_rust()?;
    for change in &rust_changes {
        println!("setup: {change}");
    }
    if report == Report::Always && missing.is_empty() && rust_changes.is_empty() {
        println!(
            "setup: nothing to do ({} Debian packages, the {MUSL_TARGET} target and {} are present)",
            PACKAGES.len(),
            COMPONENTS.join(", ")
        );
    }
    Ok(())
}

fn missing_packages() -> Result<Vec<&'static str>> {
    let mut query = Command::new("dpkg-query");
    query.args(["-W", "-f", "${Package} ${db:Status-Status}\n"]);
    query.args(PACKAGES.iter().map(|(name, _)| *name));
    // dpkg-query exits 1 when a package is unknown to it, yet prints the others: read stdout.
    let out = query
        .output()
        .context("cannot run dpkg-query: this automation needs a Debian-based machine")?;
    let installed: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.strip_suffix(" installed").map(str::to_owned))
        .collect();
    Ok(PACKAGES
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| !installed.contains(*name))
        .collect())
}

fn install_packages(missing: &[&str]) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        let why: Vec<String> = PACKAGES
            .iter()
            .filter(|(name, _)| missing.contains(name))
            .map(|(name, what)| format!("{name} ({what})"))
            .collect();
        bail!(
            "missing Debian packages: {}; install them with `sudo apt-get install {}` or run as root",
            why.join(", "),
            missing.join(" ")
        );
    }
    println!("setup: installing {}", missing.join(" "));
    cmd::run(Command::new("apt-get").args(["update", "-q"]))?;
    cmd::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(missing),
    )
}

fn ensure_rust() -> Result<Vec<String>> {
    let mut changes = Vec::new();
    if !cmd::on_path("rustup") {
        bail!(
            "rustup is not on PATH: install Rust with rustup (https://rustup.rs), then run again"
        );
    }
    let targets = cmd::output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !targets.lines().any(|t| t.trim() == MUSL_TARGET) {
        cmd::run(Command::new("rustup").args(["target", "add", MUSL_TARGET]))?;
        changes.push(format!("added the Rust target {MUSL_TARGET}"));
    }
    let components =
        cmd::output(Command::new("rustup").args(["component", "list", "--installed"]))?;
    for component in COMPONENTS {
        if !components.lines().any(|c| c.starts_with(component)) {
            cmd::run(Command::new("rustup").args(["component", "add", component]))?;
            changes.push(format!("added the Rust component {component}"));
        }
    }
    Ok(changes)
}
