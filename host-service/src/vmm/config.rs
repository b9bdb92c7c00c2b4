//! What one VM is made of, as given on the `ditto-vmm run` command line: kernel, initrd, command
//! line, vCPUs, memory, drives, vsock, the free-page balloon, console and control socket. Parsing and the checks that
//! need no resources live here; everything else (files, memory, KVM) is checked when the VM is
//! built, before the guest starts.
//!
//! [`MachineArgs`] are the machine flags `ditto-vmm run` and `dittoctl create` share;
//! [`RunArgs`] is the whole `ditto-vmm run` command line, and [`VmConfig::run_args`] writes a
//! configuration back as one (what `dittod` starts its VMMs with).

use std::ffi::OsString;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::devices::virtio::block::{BlockConfig, ID_BYTES};

/// The command line used when none is given: serial console, no PCI probing, reboot and panic
/// end the VM, and no zeroing of allocated pages (`init_on_alloc=0`: a kernel that zeroes the
/// blocks its balloon driver takes for free-page hints writes every hinted page, and a page
/// written after tracking was armed is never omitted as free).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=acpi panic=-1 pci=off init_on_alloc=0";

/// Guest RAM when none is given, in MiB.
pub const DEFAULT_MEM_MIB: u64 = 256;

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = 254;

/// Why a configuration is invalid.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A `--drive` value cannot be parsed.
    #[error("bad drive {spec:?}: {reason} (expected id=ID,path=PATH[,ro])")]
    Drive {
        /// The value given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Two drives have the same id.
    #[error("drive id {0:?} is used twice")]
    DuplicateDrive(String),
    /// The vCPU count is out of range.
    #[error("{0} vCPUs: need 1..={MAX_VCPUS}")]
    Vcpus(u8),
    /// The vsock context id is reserved.
    #[error("vsock cid {0} is reserved (need 3 or more, below 2^32 - 1)")]
    Cid(u64),
}

/// The machine: what `ditto-vmm run` and `dittoctl create` both take.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct MachineArgs {
    /// The guest kernel (bzImage).
    #[arg(long)]
    pub kernel: PathBuf,
    /// The initrd.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = DEFAULT_MEM_MIB)]
    pub mem_mib: u64,
    /// A disk: `id=ID,path=PATH[,ro]`; the id is the serial the guest sees. Repeatable.
    #[arg(long = "drive", value_parser = parse_drive)]
    pub drives: Vec<BlockConfig>,
}

/// The whole `ditto-vmm run` command line.
#[derive(clap::Args, Clone, Debug)]
pub struct RunArgs {
    /// The machine.
    #[command(flatten)]
    pub machine: MachineArgs,
    /// Also describe the virtio-mmio devices with `virtio_mmio.device=` (for kernels built with
    /// that option; ACPI always describes them).
    #[arg(long)]
    pub virtio_mmio_cmdline: bool,
    /// The guest's vsock context id (needs --vsock-uds).
    #[arg(long, requires = "vsock_uds")]
    pub vsock_cid: Option<u64>,
    /// The Unix socket host programs connect to (`CONNECT <port>\n`); guest connections to
    /// host port P go to `<PATH>_P`.
    #[arg(long, requires = "vsock_cid")]
    pub vsock_uds: Option<PathBuf>,
    /// A host port the guest may connect to over vsock, served by `<--vsock-uds>_PORT`.
    /// Repeatable.
    #[arg(long = "vsock-host-port", requires = "vsock_uds")]
    pub vsock_host_ports: Vec<u32>,
    /// Leave out the virtio-balloon device (by default the VM has one, for free-page hints).
    #[arg(long)]
    pub no_balloon: bool,
    /// The console, control socket and exit file.
    #[command(flatten)]
    pub process: ProcessArgs,
}

/// What `ditto-vmm run` and `ditto-vmm restore` both take: where the process puts its console,
/// control socket and exit record.
#[derive(clap::Args, Clone, Debug)]
pub struct ProcessArgs {
    /// Where the serial console goes: `stdout`, `off` or a file.
    #[arg(long, default_value = "stdout")]
    pub console: Console,
    /// The control socket (status, pause, resume, shutdown, checkpoint, vsock connections).
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// When the VMM ends, write why to this file (JSON: `clean`, `reason`), replacing it
    /// atomically; a supervisor that is not the VMM's parent reads it there.
    #[arg(long)]
    pub exit_file: Option<PathBuf>,
}

impl RunArgs {
    /// The VM these arguments describe.
    pub fn config(&self) -> VmConfig {
        let m = &self.machine;
        VmConfig {
            kernel: m.kernel.clone(),
            initrd: m.initrd.clone(),
            cmdline: m.cmdline.clone(),
            virtio_mmio_cmdline: self.virtio_mmio_cmdline,
            vcpus: m.vcpus,
            mem_mib: m.mem_mib,
            drives: m.drives.clone(),
            vsock: self
                .vsock_cid
                .zip(self.vsock_uds.clone())
                .map(|(cid, uds)| VsockConfig {
                    cid,
                    uds,
                    host_ports: self.vsock_host_ports.clone(),
                }),
            balloon: !self.no_balloon,
            console: self.process.console.clone(),
        }
    }
}

/// The whole `ditto-vmm restore` command line.
#[derive(clap::Args, Clone, Debug)]
pub struct RestoreArgs {
    /// The checkpoint file.
    #[arg(long)]
    pub from: PathBuf,
    /// A new image for a drive of the checkpoint: `id=ID,path=PATH` (a copy of the disk it
    /// had, of the same size). Repeatable.
    #[arg(long = "drive", value_parser = parse_drive_path)]
    pub drives: Vec<(String, PathBuf)>,
    /// A new guest vsock context id (a clone next to the original needs its own).
    #[arg(long)]
    pub vsock_cid: Option<u64>,
    /// A new host socket for the hybrid vsock.
    #[arg(long)]
    pub vsock_uds: Option<PathBuf>,
    /// Host ports the guest may connect to over vsock (default: the checkpoint's). Repeatable.
    #[arg(long = "vsock-host-port")]
    pub vsock_host_ports: Vec<u32>,
    /// The console, control socket and exit file.
    #[command(flatten)]
    pub process: ProcessArgs,
}

impl RestoreArgs {
    /// The changes these arguments make to the checkpointed VM.
    pub fn options(&self) -> super::snapshot::RestoreOptions {
        super::snapshot::RestoreOptions {
            drives: self.drives.clone(),
            vsock_cid: self.vsock_cid,
            vsock_uds: self.vsock_uds.clone(),
            vsock_host_ports: self.vsock_host_ports.clone(),
            console: self.process.console.clone(),
        }
    }
}

/// Parses a restore's new drive image, `id=ID,path=PATH`.
pub fn parse_drive_path(spec: &str) -> Result<(String, PathBuf), ConfigError> {
    let drive = parse_drive(spec)?;
    if drive.read_only {
        return Err(ConfigError::Drive {
            spec: spec.to_owned(),
            reason: "a restored drive keeps the mode it had; give only id and path".into(),
        });
    }
    Ok((drive.id, drive.path))
}

/// Writes a drive as `parse_drive` reads it: `id=ID,path=PATH[,ro]`. A path containing a
/// comma cannot be written this way (and cannot be given on the command line either).
pub fn drive_spec(drive: &BlockConfig) -> String {
    format!(
        "id={},path={}{}",
        drive.id,
        drive.path.display(),
        if drive.read_only { ",ro" } else { "" }
    )
}

/// Where the serial console writes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Console {
    /// The VMM's standard output.
    Stdout,
    /// Appended to a file.
    File(PathBuf),
    /// Discarded.
    Off,
}

impl FromStr for Console {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "stdout" | "-" => Self::Stdout,
            "off" | "none" => Self::Off,
            path => Self::File(PathBuf::from(path)),
        })
    }
}

/// The vsock device: the guest's context id and the host Unix socket for hybrid connections.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    /// The guest's context id.
    pub cid: u64,
    /// The Unix socket host programs connect to (`CONNECT <port>`); guest connections to host
    /// port P go to `<uds>_P`.
    pub uds: PathBuf,
    /// Host ports the guest may connect to (each served by `<uds>_P`).
    #[serde(default)]
    pub host_ports: Vec<u32>,
}

/// One VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// The bzImage.
    pub kernel: PathBuf,
    /// The initrd, if any.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// Also describe the virtio-mmio devices with `virtio_mmio.device=` on the command line
    /// (for kernels built with it; the ACPI DSDT always describes them).
    pub virtio_mmio_cmdline: bool,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Disks, in the order the guest sees them (vda, vdb, …).
    pub drives: Vec<BlockConfig>,
    /// The vsock device, if any.
    pub vsock: Option<VsockConfig>,
    /// Whether the VM has a virtio-balloon device (free-page hints for checkpoints). On the
    /// command line it is on unless `--no-balloon`; configurations written before it existed
    /// read as without one.
    #[serde(default)]
    pub balloon: bool,
    /// Where the serial console goes.
    pub console: Console,
}

impl VmConfig {
    /// This configuration as `ditto-vmm run` arguments (after `run`), without the control
    /// socket and exit file, which belong to the process rather than the VM.
    pub fn run_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["--kernel".into(), self.kernel.clone().into()];
        if let Some(initrd) = &self.initrd {
            args.extend(["--initrd".into(), initrd.clone().into()]);
        }
        args.extend([
            "--cmdline".into(),
            self.cmdline.clone().into(),
            "--vcpus".into(),
            self.vcpus.to_string().into(),
            "--mem-mib".into(),
            self.mem_mib.to_string().into(),
        ]);
        if self.virtio_mmio_cmdline {
            args.push("--virtio-mmio-cmdline".into());
        }
        for drive in &self.drives {
            args.extend(["--drive".into(), drive_spec(drive).into()]);
        }
        if !self.balloon {
            args.push("--no-balloon".into());
        }
        self.push_vsock_and_console_args(&mut args);
        args
    }

    /// The number of virtio-mmio devices: one per drive, then vsock and the balloon.
    pub fn virtio_devices(&self) -> usize {
        self.drives.len() + usize::from(self.vsock.is_some()) + usize::from(self.balloon)
    }

    /// The `ditto-vmm restore` arguments (after `--from FILE`) that give a restored VM this
    /// configuration's drive images, vsock and console; the rest comes from the checkpoint.
    pub fn restore_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        for drive in &self.drives {
            let plain = BlockConfig {
                read_only: false,
                ..drive.clone()
            };
            args.extend(["--drive".into(), drive_spec(&plain).into()]);
        }
        self.push_vsock_and_console_args(&mut args);
        args
    }

    /// Appends the vsock and console arguments, which `run` and `restore` share.
    fn push_vsock_and_console_args(&self, args: &mut Vec<OsString>) {
        if let Some(v) = &self.vsock {
            args.extend([
                "--vsock-cid".into(),
                v.cid.to_string().into(),
                "--vsock-uds".into(),
                v.uds.clone().into(),
            ]);
            for port in &v.host_ports {
                args.extend(["--vsock-host-port".into(), port.to_string().into()]);
            }
        }
        args.push("--console".into());
        args.push(match &self.console {
            Console::Stdout => "stdout".into(),
            Console::Off => "off".into(),
            Console::File(path) => path.clone().into(),
        });
    }

    /// Checks what can be checked without touching files or KVM.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        for (i, d) in self.drives.iter().enumerate() {
            if self.drives[..i].iter().any(|o| o.id == d.id) {
                return Err(ConfigError::DuplicateDrive(d.id.clone()));
            }
        }
        if let Some(v) = &self.vsock
            && (v.cid < 3 || v.cid >= u64::from(u32::MAX))
        {
            return Err(ConfigError::Cid(v.cid));
        }
        Ok(())
    }
}

/// Parses a drive given as `id=ID,path=PATH[,ro]` (also `ro=on|off|true|false`).
pub fn parse_drive(spec: &str) -> Result<BlockConfig, ConfigError> {
    let bad = |reason: &str| ConfigError::Drive {
        spec: spec.to_owned(),
        reason: reason.to_owned(),
    };
    let (mut id, mut path, mut read_only) = (None, None, false);
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("id", v)) => id = Some(v.to_owned()),
            Some(("path", v)) => path = Some(PathBuf::from(v)),
            Some(("ro", "on" | "true" | "1")) => read_only = true,
            Some(("ro", "off" | "false" | "0")) => read_only = false,
            None if part == "ro" => read_only = true,
            _ => return Err(bad(&format!("unknown part {part:?}"))),
        }
    }
    let id = id.filter(|i| !i.is_empty()).ok_or_else(|| bad("no id"))?;
    if id.len() > ID_BYTES {
        return Err(bad(&format!("id longer than {ID_BYTES} bytes")));
    }
    let path = path
        .filter(|p| !p.as_os_str().is_empty())
        .ok_or_else(|| bad("no path"))?;
    Ok(BlockConfig {
        id,
        path,
        read_only,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drives_parse_and_bad_ones_are_explained() {
        let d = parse_drive("id=root,path=/img/rootfs.ext4,ro").expect("drive");
        assert_eq!(
            d,
            BlockConfig {
                id: "root".into(),
                path: "/img/rootfs.ext4".into(),
                read_only: true
            }
        );
        assert!(!parse_drive("path=/a,id=x").expect("drive").read_only);
        assert!(parse_drive("id=x,path=/a,ro=on").expect("drive").read_only);
        for bad in ["", "id=x", "path=/a", "id=x,path=/a,rw", "id=,path=/a"] {
            assert!(parse_drive(bad).is_err(), "{bad:?}");
        }
        assert!(parse_drive(&format!("id={},path=/a", "x".repeat(21))).is_err());
    }

    #[derive(clap::Parser)]
    struct Run {
        #[command(flatten)]
        args: RunArgs,
    }

    #[test]
    fn run_args_read_back_as_the_same_config() {
        use clap::Parser;
        let config = VmConfig {
            kernel: "/k/vmlinuz".into(),
            initrd: Some("/k/initrd".into()),
            cmdline: "console=ttyS0 init=/bin/sh -- -c \"echo hi; sleep 1\"".into(),
            virtio_mmio_cmdline: true,
            vcpus: 3,
            mem_mib: 768,
            drives: vec![
                parse_drive("id=root,path=/img/root fs.ext4,ro").expect("root"),
                parse_drive("id=data,path=/img/d=1.img").expect("data"),
            ],
            vsock: Some(VsockConfig {
                cid: 7,
                uds: "/run/v.sock".into(),
                host_ports: vec![5000, 6000],
            }),
            balloon: true,
            console: Console::File("/run/console.log".into()),
        };
        let argv = std::iter::once(OsString::from("run")).chain(config.run_args());
        let parsed = Run::try_parse_from(argv).expect("parse");
        assert_eq!(parsed.args.config(), config);
        let bare = VmConfig {
            initrd: None,
            virtio_mmio_cmdline: false,
            drives: vec![],
            vsock: None,
            balloon: false,
            console: Console::Off,
            ..config
        };
        let argv = std::iter::once(OsString::from("run")).chain(bare.run_args());
        assert_eq!(
            Run::try_parse_from(argv).expect("parse").args.config(),
            bare
        );
    }

    #[test]
    fn configs_are_validated() {
        let mut c = VmConfig {
            kernel: "/k".into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.into(),
            virtio_mmio_cmdline: false,
            vcpus: 2,
            mem_mib: 512,
            drives: vec![parse_drive("id=a,path=/a").expect("a")],
            vsock: Some(VsockConfig {
                cid: 3,
                uds: "/tmp/v.sock".into(),
                host_ports: vec![],
            }),
            balloon: true,
            console: "stdout".parse().expect("console"),
        };
        assert_eq!(c.validate(), Ok(()));
        c.drives.push(parse_drive("id=a,path=/b").expect("b"));
        assert_eq!(c.validate(), Err(ConfigError::DuplicateDrive("a".into())));
        c.drives.pop();
        c.vcpus = 0;
        assert_eq!(c.validate(), Err(ConfigError::Vcpus(0)));
        c.vcpus = 1;
        c.vsock = Some(VsockConfig {
            cid: 2,
            uds: "/x".into(),
            host_ports: vec![],
        });
        assert_eq!(c.validate(), Err(ConfigError::Cid(2)));
        assert_eq!(
            "/tmp/c.log".parse::<Console>(),
            Ok(Console::File("/tmp/c.log".into()))
        );
    }

    #[test]
    fn the_balloon_is_on_unless_no_balloon_and_old_configs_have_none() {
        use clap::Parser;
        let parse = |extra: &[&str]| {
            let argv = ["run", "--kernel", "/k", "--drive", "id=a,path=/a"];
            let argv = argv.iter().chain(extra).copied();
            Run::try_parse_from(argv).expect("parse").args.config()
        };
        let c = parse(&[]);
        assert!(c.balloon);
        assert_eq!(c.virtio_devices(), 2);
        let without = parse(&["--no-balloon"]);
        assert!(!without.balloon);
        assert_eq!(without.virtio_devices(), 1);
        assert!(without.run_args().contains(&OsString::from("--no-balloon")));
        let mut json = serde_json::to_value(&c).expect("json");
        json.as_object_mut().expect("object").remove("balloon");
        let old: VmConfig = serde_json::from_value(json).expect("old config");
        assert_eq!(old, without);
    }
}
