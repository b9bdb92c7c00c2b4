//! `cargo xtask box -- CMD…`: runs CMD inside the KVM test box — QEMU software emulation with an
//! emulated AMD-V CPU, so that the box's kernel has a real (nested) `/dev/kvm` on a host without
//! hardware virtualisation. The box kernel is Debian's generic kernel (the cloud flavour lacks
//! 9p, which shares folders with the box). CMD's output reaches this process on the box's second
//! serial port; its exit status comes back through a shared control folder.

use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::initramfs;
use crate::paths;
use crate::qemu;
use crate::{images, setup};

/// The Debian meta package of the box kernel.
const BOX_KERNEL: &str = "linux-image-amd64";

/// Modules the box loads: virtio transport, 9p shares, network, KVM, loop devices and ext4.
const BOX_MODULES: &[&str] = &[
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "virtio_net",
    "kvm_amd",
    "loop",
    "ext4",
];

const BOX_INIT: &str = include_str!("../assets/box-init.sh");

/// CPU model of the box: AMD EPYC with SVM, less the features QEMU's emulator lacks (which it
/// would otherwise warn about at every start).
const BOX_CPU: &str = "EPYC,-nrip-save,-xsavec,-rdseed,-sha-ni,-fxsr-opt,-misalignsse,\
                       -3dnowprefetch,-osvw,-topoext";

/// Variables with this prefix are passed into the box (the settings of `cargo xtask soak`).
pub const SOAK_ENV_PREFIX: &str = "DITTO_SOAK_";

/// Memory of the box unless asked otherwise, in MiB.
pub const DEFAULT_MEM_MIB: u64 = 4096;

/// Exit status reported when the box ran out of time.
pub const TIMED_OUT: i32 = 124;

/// What the box's kernel prints when it dies.
const KERNEL_PANIC: &str = "Kernel panic - not syncing";

/// The box's own kernel died before the command reported its status. Not the command's
/// failure: QEMU's emulation of nested SVM has a defect that now and then lets the box kernel
/// take a timer interrupt between VMRUN and the reload of its own GS base, which ends in a
/// stack overflow on a vCPU thread (see "The box's own kernel sometimes dies" in the README). Callers may run the
/// command again in a fresh box.
#[derive(Debug)]
pub struct KernelPanicked {
    /// The console up to and including the panic line.
    pub console: String,
}

impl std::fmt::Display for KernelPanicked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the box's kernel panicked before the command reported its status; its console:\n{}",
            self.console
        )
    }
}

impl std::error::Error for KernelPanicked {}

/// A TCP port forwarded from this host's loopback into the box.
#[derive(Clone, Copy, Debug)]
pub struct Forward {
    host: u16,
    guest: u16,
}

impl FromStr for Forward {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (host, guest) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?} is not HOSTPORT:PORT"))?;
        let port = |p: &str| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{p:?} is not a port number (1-65535)"))
        };
        Ok(Self {
            host: port(host)?,
            guest: port(guest)?,
        })
    }
}

/// Options of `cargo xtask box`.
#[derive(clap::Args, Clone)]
pub struct BoxArgs {
    /// Forward TCP from 127.0.0.1:HOSTPORT on this host to PORT in the box.
    #[arg(long = "forward", value_name = "HOSTPORT:PORT")]
    pub forwards: Vec<Forward>,
    /// Make a host folder visible inside the box at the same path (repeatable).
    #[arg(long = "share", value_name = "DIR")]
    pub shares: Vec<PathBuf>,
    /// Memory of the box in MiB.
    #[arg(long, default_value_t = DEFAULT_MEM_MIB, value_parser = clap::value_parser!(u64).range(256..=65536))]
    pub mem_mib: u64,
    /// Run CMD directly on this host (needs vmx/svm in the CPU flags and a working /dev/kvm).
    #[arg(long)]
    pub native: bool,
    /// Kill the box (and fail) after this many seconds.
    #[arg(long, default_value_t = 1800, value_name = "SECONDS")]
    pub timeout: u64,
    /// The command to run, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// The command: readies the host and the project's binaries, runs CMD in the box and returns
/// its exit status.
pub fn run(args: &BoxArgs) -> Result<i32> {
    prepare()?;
    run_prepared(args)
}

/// What every box run needs first: the host's packages and the release musl binaries the box
/// finds on its PATH. Callers that start many boxes do this once.
pub fn prepare() -> Result<()> {
    setup::ensure(setup::Report::Changes)?;
    images::build_musl_binaries(&[])
}

/// Runs CMD in the box (or natively), after `prepare`, and returns its exit status.
pub fn run_prepared(args: &BoxArgs) -> Result<i32> {
    if args.native {
        run_native(args)
    } else {
        run_in_box(args)
    }
}

/// The folder with the guest images: `$DITTO_IMAGES`, else the one `cargo xtask images` fills.
fn images_dir() -> PathBuf {
    std::env::var_os("DITTO_IMAGES")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(paths::guest_dir)
}

/// PATH inside the box or for the native run: the project's release musl binaries first.
fn search_path() -> String {
    format!(
        "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        paths::musl_release_dir().display()
    )
}

/// Whether this host can run guests itself: vmx or svm in its CPU flags and a `/dev/kvm` (else
/// guests need the box).
pub fn can_run_natively() -> bool {
    host_has_hardware_virtualisation() && Path::new("/dev/kvm").exists()
}

fn host_has_hardware_virtualisation() -> bool {
    fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| {
        info.lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
    })
}

fn run_native(args: &BoxArgs) -> Result<i32> {
    if !host_has_hardware_virtualisation() {
        bail!(
            "--native needs a CPU with vmx or svm; this host has neither: drop --native to use the box"
        );
    }
    if !Path::new("/dev/kvm").exists() {
        bail!("--native needs /dev/kvm: load kvm_intel or kvm_amd (modprobe), or drop --native");
    }
    let (program, rest) = args.command.split_first().context("no command given")?;
    let status = Command::new(program)
        .args(rest)
        .env("PATH", search_path())
        .env("DITTO_IMAGES", images_dir())
        .status()
        .with_context(|| format!("cannot run {program}"))?;
    Ok(exit_code(status))
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// Quotes `s` for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Removes the control folder when dropped.
struct ControlDir(PathBuf);

impl Drop for ControlDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn run_in_box(args: &BoxArgs) -> Result<i32> {
    let started = Instant::now();
    let mut qemu = qemu::command()?;
    let boot =
        initramfs::kernel_and_initramfs(BOX_KERNEL, BOX_MODULES, BOX_INIT, &paths::box_dir())?;

    let ctl = ControlDir(paths::box_dir().join(format!("run-{}", std::process::id())));
    let _ = fs::remove_dir_all(&ctl.0);
    fs::create_dir_all(&ctl.0)?;
    let console_log = ctl.0.join("console.log");

    // Folders the box sees at their host paths: the workspace (and so the binaries and images
    // below target/), a target folder elsewhere, the images, and whatever the caller asked for.
    let mut shares: Vec<PathBuf> = vec![paths::workspace(), paths::target_dir()];
    let images = images_dir();
    if images.exists() || std::env::var_os("DITTO_IMAGES").is_some() {
        shares.push(images);
    }
    shares.extend(args.shares.iter().cloned());
    let mut mounts: Vec<PathBuf> = Vec::new();
    for dir in shares {
        let dir = dir
            .canonicalize()
            .with_context(|| format!("shared folder {}", dir.display()))?;
        if !dir.is_dir() {
            bail!("shared folder {}: not a folder", dir.display());
        }
        if dir.to_string_lossy().contains([',', ' ', ':']) {
            bail!(
                "shared folder {}: the path may not contain ',', ':' or spaces",
                dir.display()
            );
        }
        mounts.push(dir);
    }
    // A folder inside another shared one is visible already.
    mounts.sort_by_key(|d| d.components().count());
    let mut outer: Vec<PathBuf> = Vec::new();
    for dir in mounts {
        if !outer.iter().any(|o| dir.starts_with(o)) {
            outer.push(dir);
        }
    }
    let mounts = outer;

    let mut script = String::from("set -e\n");
    let mut env = vec![
        ("PATH".to_owned(), search_path()),
        ("HOME".to_owned(), "/root".to_owned()),
        (
            "DITTO_IMAGES".to_owned(),
            images_dir().display().to_string(),
        ),
        ("DITTO_IN_BOX".to_owned(), "1".to_owned()),
    ];
    for name in [
        "RUST_BACKTRACE",
        "RUST_LOG",
        "RUST_TEST_THREADS",
        "NO_COLOR",
        // stock or ditto: the guest kernel of the end-to-end tests (ditto_tests::microvm).
        "DITTO_GUEST_KERNEL",
    ] {
        if let Ok(value) = std::env::var(name) {
            env.push((name.to_owned(), value));
        }
    }
    // The settings of `cargo xtask soak` (soak_linux).
    env.extend(std::env::vars().filter(|(name, _)| name.starts_with(SOAK_ENV_PREFIX)));
    for (name, value) in &env {
        writeln!(script, "export {name}={}", shell_quote(value))?;
    }
    writeln!(script, "mkdir -p /root")?;
    writeln!(
        script,
        "cd {}",
        shell_quote(&paths::workspace().display().to_string())
    )?;
    script.push_str("set +e\nexec");
    for arg in &args.command {
        script.push(' ');
        script.push_str(&shell_quote(arg));
    }
    script.push('\n');
    fs::write(ctl.0.join("cmd"), script)?;

    let mut append = String::from("console=ttyS0 panic=-1");
    let shares_arg: Vec<String> = mounts
        .iter()
        .enumerate()
        .map(|(i, dir)| format!("s{i}:{}", dir.display()))
        .collect();
    if !shares_arg.is_empty() {
        write!(append, " ditto.shares={}", shares_arg.join(","))?;
    }
    if !args.forwards.is_empty() {
        append.push_str(" ditto.net=1");
    }

    qemu.args(["-accel", "tcg,thread=multi", "-cpu", BOX_CPU, "-M", "q35"])
        .args(["-smp", "2", "-m", &args.mem_mib.to_string()])
        .arg("-kernel")
        .arg(&boot.vmlinuz)
        .arg("-initrd")
        .arg(&boot.initramfs)
        .args(["-append", &append])
        .arg("-serial")
        .arg(format!("file:{}", console_log.display()))
        .args(["-serial", "stdio"]);
    let virtfs = |tag: &str, dir: &Path| {
        format!(
            "local,path={},mount_tag={tag},security_model=none,multidevs=remap",
            dir.display()
        )
    };
    qemu.arg("-virtfs").arg(virtfs("ctl", &ctl.0));
    for (i, dir) in mounts.iter().enumerate() {
        qemu.arg("-virtfs").arg(virtfs(&format!("s{i}"), dir));
    }
    if args.forwards.is_empty() {
        qemu.args(["-nic", "none"]);
    } else {
        let mut netdev = String::from("user,id=n0");
        for f in &args.forwards {
            write!(netdev, ",hostfwd=tcp:127.0.0.1:{}-:{}", f.host, f.guest)?;
        }
        qemu.args(["-netdev", &netdev, "-device", "virtio-net-pci,netdev=n0"]);
    }
    let mut child = qemu::spawn(qemu)?;

    let mut stdout = child.0.stdout.take().context("QEMU has no stdout")?;
    let forward = std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        let mut out = std::io::stdout();
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                break;
            }
        }
    });
    let mut stderr = child.0.stderr.take().context("QEMU has no stderr")?;
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });

    let deadline = Duration::from_secs(args.timeout);
    let qemu_status = loop {
        if let Some(status) = child.0.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(child);
    let _ = forward.join();
    let qemu_errors = errors.join().unwrap_or_default();
    let console = fs::read_to_string(&console_log).unwrap_or_default();
    let _ = fs::copy(&console_log, paths::box_dir().join("last-console.log"));

    let Some(qemu_status) = qemu_status else {
        eprintln!(
            "box: `{}` timed out after {} s; the box's console:\n{}",
            short(&args.command.join(" ")),
            args.timeout,
            tail(&console, 60)
        );
        return Ok(TIMED_OUT);
    };
    if let Ok(error) = fs::read_to_string(ctl.0.join("error")) {
        bail!("{}", error.trim());
    }
    let Ok(status) = fs::read_to_string(ctl.0.join("status")) else {
        if let Some(at) = console.find(KERNEL_PANIC) {
            return Err(KernelPanicked {
                console: tail(&console[..at + KERNEL_PANIC.len()], 40),
            }
            .into());
        }
        bail!(
            "the box stopped ({qemu_status}) without reporting the command's status\n\
             QEMU said: {}\nthe box's console:\n{}",
            qemu_errors.trim(),
            tail(&console, 60)
        );
    };
    let status: i32 = status
        .trim()
        .parse()
        .with_context(|| format!("the box reported a malformed status {status:?}"))?;
    eprintln!(
        "box: `{}` exited with {status} after {:.1} s",
        short(&args.command.join(" ")),
        started.elapsed().as_secs_f64()
    );
    Ok(status)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The first line of a command, cut to a readable length, for messages.
fn short(command: &str) -> String {
    let line = command.lines().next().unwrap_or_default();
    let cut: String = line.chars().take(72).collect();
    if cut.len() < command.len() {
        format!("{cut}…")
    } else {
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_parses_and_refuses_bad_ports() {
        let f: Forward = "8080:80".parse().unwrap();
        assert_eq!((f.host, f.guest), (8080, 80));
        for bad in ["8080", "0:80", "8080:70000", "a:80", ":80"] {
            assert!(bad.parse::<Forward>().is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn shell_quote_survives_quotes() {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", shell_quote("it's $HOME \"x\"")))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "it's $HOME \"x\"");
    }
}
