//! Runs the real `dittod` and `dittoctl` (from `$PATH`) inside the KVM test box: a daemon on a
//! state directory of its own, killed with the VMMs it started when the test ends; `dittoctl`
//! invocations over the daemon's Unix socket; a tonic client of `ditto.host.v1`; a background
//! `dittoctl events` whose lines the test can wait for; and the kernel release a bzImage
//! announces, to compare with `uname -r` in its guest.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ditto_host::cli::connect::{Target, connect};
use ditto_proto::host::v1::host_client::HostClient;
use serde_json::Value;
use tonic::transport::Channel;

/// A `dittod` process on `state_dir`. Dropping it kills the daemon and every `ditto-vmm` whose
/// command line names the state directory (the VMMs outlive the daemon by design).
pub struct Daemon {
    child: Option<Child>,
    /// The state directory.
    pub state_dir: PathBuf,
    /// The API's Unix socket (the default one in the state directory).
    pub socket: PathBuf,
    /// The daemon's standard error (its log), appended across restarts.
    pub log: PathBuf,
    extra: Vec<String>,
}

impl Daemon {
    /// Starts `dittod --state-dir STATE_DIR EXTRA…` and waits until its socket accepts.
    pub fn start(state_dir: &Path, extra: &[&str]) -> Self {
        let mut daemon = Self {
            child: None,
            state_dir: state_dir.to_owned(),
            socket: state_dir.join("dittod.sock"),
            log: state_dir.with_extension("dittod.log"),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        daemon.restart();
        daemon
    }

    /// Starts the daemon again on the same state directory (after [`Daemon::kill9`] or
    /// [`Daemon::terminate`]) and waits until its socket accepts.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "dittod runs already");
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("dittod log file");
        let child = Command::new("dittod")
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(&self.extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start dittod (is it on PATH?)");
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "dittod ended ({status}) before serving:\n{}",
                    self.log_text()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "dittod does not serve {} after 30 s:\n{}",
                self.socket.display(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("dittod runs").id()
    }

    /// What the daemon logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the daemon with SIGKILL (a crash) and reaps it.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("dittod runs");
        signal(child.id(), "KILL");
        let status = child.wait().expect("wait for dittod");
        assert!(!status.success(), "dittod survived SIGKILL: {status}");
    }

    /// Ends the daemon with SIGTERM (an orderly stop) and checks that it exits with status 0.
    pub fn terminate(&mut self) {
        let mut child = self.child.take().expect("dittod runs");
        signal(child.id(), "TERM");
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for dittod") {
                break status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "dittod still runs 30 s after SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "dittod after SIGTERM: {status}");
    }

    /// Runs `dittoctl --socket SOCKET ARGS…` and returns what it did.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new("dittoctl")
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run dittoctl (is it on PATH?)")
    }

    /// Runs `dittoctl ARGS…`, asserts that it succeeded, and returns its standard output.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "dittoctl {args:?}: {}\nstdout: {}\nstderr: {}\ndittod log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `dittoctl --json ARGS…`, asserts that it succeeded and parses its standard output.
    pub fn ctl_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.ctl_ok(&all);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("dittoctl {args:?} printed no JSON ({e}): {out}"))
    }

    /// Runs `dittoctl ARGS…`, asserts that it failed with exit status 1 and a message naming
    /// the gRPC `code` (`NotFound`), and returns that message.
    pub fn ctl_fails(&self, args: &[&str], code: &str) -> String {
        let out = self.ctl(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(1),
            "dittoctl {args:?} should fail with status 1; stderr: {stderr}"
        );
        assert!(
            stderr.starts_with(&format!("dittoctl: {code}: ")),
            "dittoctl {args:?} should say {code}: {stderr}"
        );
        stderr
    }

    /// A tonic client of the daemon's API over its Unix socket.
    pub async fn client(&self) -> HostClient<Channel> {
        connect(&Target::Socket(self.socket.clone()))
            .await
            .expect("connect to dittod")
    }

    /// Starts `dittoctl --json events [VM]` in the background.
    pub fn events(&self, vm: Option<&str>) -> EventWatch {
        let mut command = Command::new("dittoctl");
        command
            .arg("--socket")
            .arg(&self.socket)
            .args(["--json", "events"])
            .args(vm)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = command.spawn().expect("run dittoctl events");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| Value::String(format!("not JSON ({e}): {line}")));
                sink.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(value);
            }
        });
        EventWatch { child, lines }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for pid in vmm_pids(&self.state_dir) {
            signal(pid, "KILL");
        }
    }
}

/// Sends `SIGNAL` (`KILL`, `TERM`) to `pid` with `kill(1)`.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid}: {status}");
}

/// The `ditto-vmm` processes whose command line mentions `state_dir`.
pub fn vmm_pids(state_dir: &Path) -> Vec<u32> {
    let needle = state_dir.as_os_str().as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let mut args = cmdline.split(|b| *b == 0);
            let is_vmm = args.next().is_some_and(|a| a.ends_with(b"ditto-vmm"));
            is_vmm && cmdline.windows(needle.len()).any(|w| w == needle)
        })
        .collect()
}

/// True while process `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// A background `dittoctl --json events`: the events it printed so far, one JSON value each.
pub struct EventWatch {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl EventWatch {
    /// Every event so far.
    pub fn seen(&self) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until an event satisfies `matches`, at most `timeout`; returns it, or panics with
    /// the events seen.
    pub fn wait_for(&self, timeout: Duration, matches: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            if let Some(e) = self.seen().into_iter().find(&matches) {
                return e;
            }
            assert!(
                start.elapsed() < timeout,
                "no such event within {timeout:?}; seen: {:#?}",
                self.seen()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for EventWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The kernel release a bzImage names in its setup header (the first word of the version
/// string that `kernel_version` points to), which is what `uname -r` prints in its guest.
pub fn bzimage_release(kernel: &Path) -> String {
    let image = std::fs::read(kernel).expect("read the kernel");
    assert_eq!(&image[0x202..0x206], b"HdrS", "not a bzImage");
    let at = usize::from(u16::from_le_bytes([image[0x20e], image[0x20f]])) + 0x200;
    let version = &image[at..at + 256];
    let end = version
        .iter()
        .position(|b| *b == 0)
        .expect("NUL-terminated");
    String::from_utf8_lossy(&version[..end])
        .split_whitespace()
        .next()
        .expect("a version string")
        .to_owned()
}
