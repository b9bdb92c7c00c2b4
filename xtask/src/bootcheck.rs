//! Checks that the guest images boot: QEMU's `microvm` machine (software emulation) describes
//! its virtio-mmio disk in ACPI, as ditto's VMM does, so the stock cloud kernel, the initramfs
//! and the root disk are tested together before any VMM of ours is involved. Writes go to a
//! throw-away overlay (`snapshot=on`); the images are never changed.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::qemu;

/// How long one boot may take under software emulation.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// Boots the images in `dir` twice: with the root disk's own init (it must reach the line the
/// image's rcS prints once /proc, /sys and /dev are mounted), and with `init=/bin/sh` plus
/// arguments (the initramfs must hand `init=` and the arguments over like distribution
/// initramfs tools do).
pub fn check(dir: &Path) -> Result<()> {
    let started = Instant::now();
    boot(dir, "", "ditto guest: up")?;
    println!(
        "bootcheck: the root disk's init ran ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    boot(
        dir,
        concat!(
            " init=/bin/sh -- -c \"mount -t sysfs sysfs /sys; ",
            "echo ditto-init-ok:$(cat /sys/block/vda/serial):$(cat /etc/hostname); poweroff -f\""
        ),
        "ditto-init-ok:root:ditto-guest",
    )?;
    println!(
        "bootcheck: init=/bin/sh ran from the root disk named by its serial ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Boots once and waits for a console line containing `expect`.
fn boot(dir: &Path, extra_cmdline: &str, expect: &str) -> Result<()> {
    let mut qemu = qemu::command()?;
    qemu.args([
        "-M",
        "microvm,acpi=on",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-m",
        "512",
    ])
    .arg("-kernel")
    .arg(dir.join("vmlinuz"))
    .arg("-initrd")
    .arg(dir.join("initramfs.img"))
    .arg("-append")
    // Under emulation the kernel's TSC calibration against the PIT can fail, and microvm has no
    // other reference clock: give it the TSC frequency instead of letting the boot hang.
    .arg(format!(
        "console=ttyS0 root=/dev/vda panic=-1 tsc_early_khz=2000000{extra_cmdline}"
    ))
    .arg("-drive")
    .arg(format!(
        "id=root,file={},format=raw,if=none,snapshot=on",
        dir.join("rootfs.ext4").display()
    ))
    .args(["-device", "virtio-blk-device,drive=root,serial=root"])
    .args(["-serial", "stdio"]);
    let mut child = qemu::spawn(qemu)?;
    let stdout = child.0.stdout.take().context("QEMU has no stdout")?;
    let mut stderr = child.0.stderr.take().context("QEMU has no stderr")?;
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut console = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                let found = line.contains(expect);
                console.push(line);
                if found {
                    return Ok(());
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!(
                    "the guest images did not print {expect:?} within {} s; console:\n{}",
                    BOOT_TIMEOUT.as_secs(),
                    last_lines(&console)
                )
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                drop(child);
                let mut errors = String::new();
                let _ = stderr.read_to_string(&mut errors);
                bail!(
                    "QEMU stopped before the guest printed {expect:?}\nQEMU said: {}\nconsole:\n{}",
                    errors.trim(),
                    last_lines(&console)
                )
            }
        }
    }
}

fn last_lines(console: &[String]) -> String {
    console[console.len().saturating_sub(40)..].join("\n")
}
