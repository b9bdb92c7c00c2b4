//! Boots the guest images under QEMU's `microvm` machine with software emulation, on the
//! development machine itself. microvm describes its virtio-mmio devices in ACPI, as ditto's VMM
//! does, so the stock cloud kernel, the initramfs, the root disk and the agent are tested in a
//! real guest before any VMM of ours is involved. The root disk is opened with `snapshot=on`:
//! the guest's writes go to a throw-away overlay and the images never change.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What can go wrong while booting a guest.
#[derive(Debug, thiserror::Error)]
pub enum MicrovmError {
    /// `$DITTO_IMAGES` is not set or the folder lacks an image.
    #[error(
        "guest images: {0} (run `cargo xtask images`, which sets nothing: export DITTO_IMAGES)"
    )]
    Images(String),
    /// QEMU could not be started.
    #[error("cannot start qemu-system-x86_64: {0}")]
    Spawn(std::io::Error),
    /// The expected console line did not come in time.
    #[error("the guest did not print {expect:?} within {secs} s; console:\n{console}")]
    Timeout {
        /// The awaited text.
        expect: String,
        /// The time limit.
        secs: u64,
        /// The last console lines.
        console: String,
    },
    /// QEMU ended before the expected line.
    #[error("QEMU stopped before the guest printed {expect:?}; console:\n{console}")]
    Stopped {
        /// The awaited text.
        expect: String,
        /// The last console lines.
        console: String,
    },
}

/// The folder with `rootfs.ext4` and the kernel files [`guest_kernel`] chooses (`vmlinuz` and
/// `initramfs.img`, or `vmlinuz-ditto`), from `$DITTO_IMAGES`.
pub fn images_dir() -> Result<PathBuf, MicrovmError> {
    let dir = std::env::var_os("DITTO_IMAGES")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| MicrovmError::Images("DITTO_IMAGES is not set".into()))?;
    if !dir.join("rootfs.ext4").is_file() {
        return Err(MicrovmError::Images(format!(
            "{} has no rootfs.ext4",
            dir.display()
        )));
    }
    KernelChoice::from_env()?.in_images(&dir)?;
    Ok(dir)
}

/// The environment variable that chooses the guest kernel of the end-to-end tests: `stock`
/// (the default) or `ditto`.
pub const GUEST_KERNEL_ENV: &str = "DITTO_GUEST_KERNEL";

/// Which guest kernel a test boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelChoice {
    /// Debian's cloud kernel `vmlinuz` with the modules in `initramfs.img`.
    Stock,
    /// The patched kernel `vmlinuz-ditto` of `cargo xtask kernel` (`/proc/kpageblock`),
    /// everything built in, no initramfs.
    Ditto,
}

impl KernelChoice {
    /// The choice of `$DITTO_GUEST_KERNEL`: unset or empty is [`KernelChoice::Stock`]; a value
    /// other than `stock` or `ditto` is an error.
    pub fn from_env() -> Result<Self, MicrovmError> {
        let value = std::env::var(GUEST_KERNEL_ENV).unwrap_or_default();
        match value.as_str() {
            "" | "stock" => Ok(Self::Stock),
            "ditto" => Ok(Self::Ditto),
            other => Err(MicrovmError::Images(format!(
                "{GUEST_KERNEL_ENV}={other:?}: the guest kernel is `stock` or `ditto`"
            ))),
        }
    }

    /// The kernel files of this choice in the images folder `images`; an error names the
    /// missing file and the command that builds it.
    pub fn in_images(self, images: &Path) -> Result<GuestKernel, MicrovmError> {
        let (kernel, initrd, build) = match self {
            Self::Stock => (
                images.join("vmlinuz"),
                Some(images.join("initramfs.img")),
                "cargo xtask images",
            ),
            Self::Ditto => (images.join("vmlinuz-ditto"), None, "cargo xtask kernel"),
        };
        for file in std::iter::once(&kernel).chain(initrd.as_ref()) {
            if !file.is_file() {
                return Err(MicrovmError::Images(format!(
                    "the {self:?} guest kernel needs {} (built by `{build}`)",
                    file.display()
                )));
            }
        }
        Ok(GuestKernel {
            choice: self,
            kernel,
            initrd,
        })
    }
}

/// The kernel, and the initramfs if it needs one, that a test guest boots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestKernel {
    /// Which kernel it is.
    pub choice: KernelChoice,
    /// The bzImage.
    pub kernel: PathBuf,
    /// The initramfs (`None` for the patched kernel, which has everything built in).
    pub initrd: Option<PathBuf>,
}

impl GuestKernel {
    /// `--kernel PATH` and, with an initramfs, `--initrd PATH`: the arguments of `ditto-vmm
    /// run` and of `dittoctl create` that boot this kernel.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec!["--kernel".to_owned(), self.kernel.display().to_string()];
        if let Some(initrd) = &self.initrd {
            args.extend(["--initrd".to_owned(), initrd.display().to_string()]);
        }
        args
    }
}

/// The guest kernel every test that boots a guest uses: the one `$DITTO_GUEST_KERNEL` chooses
/// ([`KernelChoice::from_env`]) in the images folder `images`. Panics with the reason when the
/// choice is invalid or its files are missing (a test must fail then, not skip).
pub fn guest_kernel(images: &Path) -> GuestKernel {
    KernelChoice::from_env()
        .and_then(|choice| choice.in_images(images))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// An extra virtio disk for the guest.
pub struct Disk<'a> {
    /// The raw image file.
    pub path: &'a Path,
    /// The virtio-blk serial (the agent's disk id).
    pub serial: &'a str,
}

/// Kills and reaps QEMU when dropped.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boots the images in `images` with the root disk (serial `root`) and `disks` (as /dev/vdb,
/// /dev/vdc, …) and the kernel [`guest_kernel`] chooses, appends `cmdline` to the kernel command
/// line, and returns every console line up to and including the first that contains `expect`.
/// QEMU is killed then.
pub fn boot_until(
    images: &Path,
    disks: &[Disk<'_>],
    cmdline: &str,
    expect: &str,
    timeout: Duration,
) -> Result<Vec<String>, MicrovmError> {
    let kernel = KernelChoice::from_env()?.in_images(images)?;
    boot_kernel_until(&kernel, images, disks, cmdline, expect, timeout)
}

/// [`boot_until`] with the kernel `kernel` (for tests about one kernel in particular).
pub fn boot_kernel_until(
    kernel: &GuestKernel,
    images: &Path,
    disks: &[Disk<'_>],
    cmdline: &str,
    expect: &str,
    timeout: Duration,
) -> Result<Vec<String>, MicrovmError> {
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ])
    .args([
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
    .arg(&kernel.kernel);
    if let Some(initrd) = &kernel.initrd {
        qemu.arg("-initrd").arg(initrd);
    }
    qemu.arg("-append")
        // Under emulation the kernel's TSC calibration against the PIT can fail, and microvm
        // has no other reference clock: give it the TSC frequency instead of hanging the boot.
        .arg(format!(
            "console=ttyS0 root=/dev/vda panic=-1 tsc_early_khz=2000000 {cmdline}"
        ))
        .arg("-drive")
        .arg(format!(
            "id=root,file={},format=raw,if=none,snapshot=on",
            images.join("rootfs.ext4").display()
        ))
        .args(["-device", "virtio-blk-device,drive=root,serial=root"]);
    for (i, disk) in disks.iter().enumerate() {
        qemu.arg("-drive")
            .arg(format!(
                "id=d{i},file={},format=raw,if=none",
                disk.path.display()
            ))
            .arg("-device")
            .arg(format!(
                "virtio-blk-device,drive=d{i},serial={}",
                disk.serial
            ));
    }
    qemu.args(["-serial", "stdio"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = Qemu(qemu.spawn().map_err(MicrovmError::Spawn)?);
    let stdout = child
        .0
        .stdout
        .take()
        .ok_or_else(|| MicrovmError::Spawn(std::io::Error::other("no stdout pipe")))?;
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        while let Ok(n) = reader.read_until(b'\n', &mut buf) {
            if n == 0 {
                break;
            }
            let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
            buf.clear();
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + timeout;
    let mut console = Vec::new();
    let tail = |console: &[String]| console[console.len().saturating_sub(40)..].join("\n");
    loop {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                let found = line.contains(expect);
                console.push(line);
                if found {
                    return Ok(console);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(MicrovmError::Timeout {
                    expect: expect.to_owned(),
                    secs: timeout.as_secs(),
                    console: tail(&console),
                });
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(MicrovmError::Stopped {
                    expect: expect.to_owned(),
                    console: tail(&console),
                });
            }
        }
    }
}
