//! Starting QEMU so that it never outlives the xtask that started it.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::cmd;

/// The QEMU binary used for the box and for booting guest images, unless [`QEMU_ENV`] names
/// another.
pub const QEMU: &str = "qemu-system-x86_64";

/// Names another QEMU binary to use instead of [`QEMU`] (to compare emulator versions).
pub const QEMU_ENV: &str = "DITTO_QEMU";

/// The QEMU binary to run: `$DITTO_QEMU`, else [`QEMU`] from PATH.
pub fn binary() -> String {
    std::env::var(QEMU_ENV)
        .ok()
        .filter(|q| !q.is_empty())
        .unwrap_or_else(|| QEMU.to_owned())
}

/// A running QEMU, killed and reaped when dropped.
pub struct Qemu(pub Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A QEMU command with the options every run here uses: no default devices, no user config, no
/// display, no reboot.
pub fn command() -> Result<Command> {
    let binary = binary();
    if binary == QEMU && !cmd::on_path(QEMU) {
        bail!("{QEMU} is not installed: run `cargo xtask setup` (Debian package qemu-system-x86)");
    }
    let mut qemu = Command::new(&binary);
    qemu.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    Ok(qemu)
}

/// Starts `qemu` with stdin closed and stdout and stderr piped. The kernel kills it if this
/// process dies first.
pub fn spawn(mut qemu: Command) -> Result<Qemu> {
    qemu.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs in the child between fork and exec and calls only prctl, which is
    // async-signal-safe; it makes the kernel kill QEMU if this process dies first.
    unsafe {
        qemu.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(Qemu(
        qemu.spawn()
            .with_context(|| format!("cannot start {}", binary()))?,
    ))
}
