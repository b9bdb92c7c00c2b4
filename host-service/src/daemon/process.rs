//! One `ditto-vmm` process, started detached so that it outlives the daemon: its own session
//! (no terminal signals, not in the daemon's process group), stdin from /dev/null, stdout and
//! stderr appended to `vmm.log` in the VM's folder.
//!
//! The daemon holds a pidfd on it ([`VmmProcess`]), which works for its own children and for
//! processes it re-attached to after a restart alike: the pidfd becomes readable when the
//! process ends, and signals sent through it cannot reach a process that reused the pid. A
//! child is reaped with `waitid(P_PIDFD)`, which also yields its exit status or signal; a
//! re-attached process is not the daemon's child, so how it ended comes from its exit file.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use rustix::process::{Pid, PidfdFlags, Signal, WaitId, WaitIdOptions};
use tokio::io::unix::AsyncFd;

use super::record::VmPaths;
use crate::vmm::config::VmConfig;

/// How a VMM process ended, as far as the daemon can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawExit {
    /// It exited with this status.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
    /// Not the daemon's child: only its exit file can tell.
    Unknown,
}

/// A running (or just ended) `ditto-vmm` process.
#[derive(Debug)]
pub struct VmmProcess {
    pid: u32,
    start_ticks: u64,
    pidfd: AsyncFd<OwnedFd>,
    child: bool,
}

/// The start time of process `pid` (`/proc/PID/stat` field 22, clock ticks since boot).
pub fn start_ticks(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may contain anything; count fields from
    // the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no ')' in stat"))?;
    // After ')' come fields 3, 4, ...: field 22 is the 20th.
    rest.split_whitespace()
        .nth(19)
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no start time in stat"))
}

/// Registers a pidfd with the tokio reactor (read interest: it turns readable when the process
/// ends).
fn watch(pidfd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is a valid open descriptor that stays open, and always the same
    // descriptor, for as long as the AsyncFd owns it.
    unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)
}

fn pid_of(pid: u32) -> io::Result<Pid> {
    i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("bad pid {pid}")))
}

impl VmmProcess {
    /// Starts `ditto-vmm run` (the binary at `bin`) for `config`, with its control socket and
    /// exit file in the VM's folder, detached from the daemon.
    ///
    /// With `restore_from`, it runs `ditto-vmm restore --from` that checkpoint instead, with
    /// the drives, vsock and console of `config`.
    pub fn spawn(
        bin: &Path,
        config: &VmConfig,
        restore_from: Option<&Path>,
        paths: &VmPaths,
    ) -> io::Result<Self> {
        let log = File::options().create(true).append(true).open(&paths.log)?;
        let mut command = Command::new(bin);
        match restore_from {
            None => {
                command.arg("run").args(config.run_args());
            }
            Some(checkpoint) => {
                command.arg("restore").arg("--from").arg(checkpoint);
                command.args(config.restore_args());
            }
        }
        command
            .arg("--control")
            .arg(&paths.control)
            .arg("--exit-file")
            .arg(&paths.exit)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: the closure runs in the forked child before exec and only makes the setsid
        // system call, which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            command.pre_exec(|| rustix::process::setsid().map(drop).map_err(io::Error::from));
        }
        let child = command.spawn()?;
        let pid = child.id();
        // The std handle neither kills nor waits on drop; the pidfd takes over from here.
        drop(child);
        let pidfd = rustix::process::pidfd_open(pid_of(pid)?, PidfdFlags::NONBLOCK)?;
        Ok(Self {
            pid,
            start_ticks: start_ticks(pid)?,
            pidfd: watch(pidfd)?,
            child: true,
        })
    }

    /// Re-attaches to the VMM `pid` that started at `ticks`. `Ok(None)` when that process is
    /// gone (the pid is free or belongs to another process now).
    pub fn attach(pid: u32, ticks: u64) -> io::Result<Option<Self>> {
        if start_ticks(pid).ok() != Some(ticks) {
            return Ok(None);
        }
        let pidfd = match rustix::process::pidfd_open(pid_of(pid)?, PidfdFlags::NONBLOCK) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::SRCH) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        // The pid could have been reused between the check and the open: check again, now
        // that the pidfd pins the process.
        if start_ticks(pid).ok() != Some(ticks) {
            return Ok(None);
        }
        Ok(Some(Self {
            pid,
            start_ticks: ticks,
            pidfd: watch(pidfd)?,
            child: false,
        }))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The process's start time in clock ticks since boot.
    pub fn start_ticks(&self) -> u64 {
        self.start_ticks
    }

    /// Waits for the process to end (and reaps it when it is the daemon's child).
    pub async fn wait(&self) -> io::Result<RawExit> {
        let _ready = self.pidfd.readable().await?;
        if !self.child {
            return Ok(RawExit::Unknown);
        }
        let status = rustix::process::waitid(
            WaitId::PidFd(self.pidfd.get_ref().as_fd()),
            WaitIdOptions::EXITED,
        )?;
        Ok(match status {
            Some(s) => match (s.exit_status(), s.terminating_signal()) {
                (_, Some(signal)) => RawExit::Signal(signal),
                (Some(code), None) => RawExit::Code(code),
                (None, None) => RawExit::Unknown,
            },
            None => RawExit::Unknown,
        })
    }

    /// Sends SIGKILL. A process that already ended is not an error.
    pub fn kill(&self) -> io::Result<()> {
        match rustix::process::pidfd_send_signal(self.pidfd.get_ref(), Signal::KILL) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_read_and_pid_reuse_is_detected() {
        let me = std::process::id();
        let ticks = start_ticks(me).expect("own start time");
        assert!(start_ticks(u32::MAX / 2).is_err());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            assert!(VmmProcess::attach(me, ticks).expect("attach").is_some());
            assert!(VmmProcess::attach(me, ticks + 1).expect("attach").is_none());
        });
    }

    #[test]
    fn a_killed_child_reports_its_signal_and_a_stranger_is_unknown() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            // A real child through the same detaching path: `sleep` stands in for ditto-vmm's
            // binary; the arguments after it are ignored by a shell script wrapper.
            let dir = tempfile::tempdir().expect("tmp");
            let script = dir.path().join("fake-vmm");
            std::fs::write(&script, "#!/bin/sh\nexec sleep 600\n").expect("script");
            std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .expect("chmod");
            let paths = VmPaths {
                dir: dir.path().into(),
                record: dir.path().join("vm.json"),
                control: dir.path().join("c.sock"),
                vsock: dir.path().join("v.sock"),
                console: dir.path().join("console.log"),
                log: dir.path().join("vmm.log"),
                exit: dir.path().join("exit.json"),
                failure: dir.path().join("last-failure.log"),
            };
            let config = crate::vmm::config::VmConfig {
                kernel: "/k".into(),
                initrd: None,
                cmdline: String::new(),
                virtio_mmio_cmdline: false,
                vcpus: 1,
                mem_mib: 64,
                drives: vec![],
                vsock: None,
                balloon: false,
                console: crate::vmm::config::Console::Off,
            };
            let child = VmmProcess::spawn(&script, &config, None, &paths).expect("spawn");
            assert_eq!(
                rustix::process::getsid(Some(pid_of(child.pid()).expect("pid")))
                    .expect("sid")
                    .as_raw_nonzero()
                    .get(),
                i32::try_from(child.pid()).expect("pid"),
                "the VMM leads its own session"
            );
            let stranger = VmmProcess::attach(child.pid(), child.start_ticks())
                .expect("attach")
                .expect("alive");
            child.kill().expect("kill");
            assert_eq!(child.wait().await.expect("wait"), RawExit::Signal(9));
            assert_eq!(stranger.wait().await.expect("wait"), RawExit::Unknown);
            child.kill().expect("killing an ended process is fine");
        });
    }
}
