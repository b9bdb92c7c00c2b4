//! Checks of every request field before anything is recorded or started, each failure an
//! [`Error::InvalidArgument`] that names the field (`spec.drives[1].path: …`), or
//! [`Error::ResourceExhausted`] when the host cannot give what is asked.
//!
//! Paths must be absolute (the daemon's working directory means nothing to the caller) and
//! name regular files the daemon can open; drive paths cannot contain a comma (the
//! `id=…,path=…` form cannot carry one); sizes and counts are checked against what the VMM
//! accepts ([`Layout::plan`]) and what this host has.

use std::path::{Path, PathBuf};

use ditto_proto::host::v1 as pb;

use super::error::Error;
use crate::boot::layout::Layout;
use crate::devices::virtio::block::{BlockConfig, ID_BYTES};
use crate::vmm::config::{DEFAULT_CMDLINE, DEFAULT_MEM_MIB, MAX_VCPUS};

/// Longest VM name.
pub const NAME_MAX: usize = 63;
/// Longest kernel command line accepted.
pub const CMDLINE_MAX: usize = 4096;

/// Whether `s` has the form of a VM id: 32 lowercase hex digits.
pub fn looks_like_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Checks a new VM's name.
pub fn name(name: &str) -> Result<(), Error> {
    let bad = |reason: &str| Err(Error::invalid("name", reason));
    if name.is_empty() {
        return bad("a VM needs a name");
    }
    if name.len() > NAME_MAX {
        return bad(&format!("longer than {NAME_MAX} characters"));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return bad("must start with a letter or a digit");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return bad(&format!(
            "{c:?} is not allowed (letters, digits, '.', '_' and '-' are)"
        ));
    }
    if looks_like_id(name) {
        return bad("32 hex digits is what a VM id looks like; choose another name");
    }
    Ok(())
}

/// Checks that `path` is absolute and names a regular file the daemon can open.
fn file(field: &str, path: &str) -> Result<PathBuf, Error> {
    if path.is_empty() {
        return Err(Error::invalid(field, "no path given"));
    }
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(Error::invalid(
            field,
            format!("{path:?} is not an absolute path"),
        ));
    }
    let meta = std::fs::metadata(p).map_err(|e| Error::invalid(field, format!("{path}: {e}")))?;
    if !meta.is_file() {
        return Err(Error::invalid(
            field,
            format!("{path} is not a regular file"),
        ));
    }
    std::fs::File::open(p).map_err(|e| Error::invalid(field, format!("{path}: {e}")))?;
    Ok(p.to_owned())
}

/// What this host offers, for the resource checks.
#[derive(Clone, Copy, Debug)]
pub struct HostLimits {
    /// Host RAM in MiB.
    pub mem_mib: u64,
}

impl HostLimits {
    /// This host's limits (RAM from `/proc/meminfo`).
    pub fn probe() -> std::io::Result<Self> {
        let meminfo = std::fs::read_to_string("/proc/meminfo")?;
        let kib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, "no MemTotal in meminfo")
            })?;
        Ok(Self {
            mem_mib: kib / 1024,
        })
    }
}

/// A checked machine: the VM configuration without the parts the daemon fills in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Machine {
    /// The kernel.
    pub kernel: PathBuf,
    /// The initrd.
    pub initrd: Option<PathBuf>,
    /// The command line.
    pub cmdline: String,
    /// vCPUs.
    pub vcpus: u8,
    /// RAM in MiB.
    pub mem_mib: u64,
    /// Disks.
    pub drives: Vec<BlockConfig>,
    /// The vsock context id asked for (None: the daemon chooses).
    pub vsock_cid: Option<u64>,
}

/// Checks a VM specification, filling in the defaults.
pub fn spec(spec: Option<&pb::VmSpec>, host: HostLimits) -> Result<Machine, Error> {
    let spec = spec.ok_or_else(|| Error::invalid("spec", "missing"))?;
    let kernel = file("spec.kernel", &spec.kernel)?;
    let initrd = spec
        .initrd
        .as_deref()
        .map(|p| file("spec.initrd", p))
        .transpose()?;
    let cmdline = if spec.cmdline.is_empty() {
        DEFAULT_CMDLINE.to_owned()
    } else {
        spec.cmdline.clone()
    };
    if cmdline.len() > CMDLINE_MAX {
        return Err(Error::invalid(
            "spec.cmdline",
            format!("{} bytes, at most {CMDLINE_MAX}", cmdline.len()),
        ));
    }
    if cmdline.contains(['\0', '\n']) {
        return Err(Error::invalid(
            "spec.cmdline",
            "contains a NUL or newline character",
        ));
    }
    let vcpus = match spec.vcpus {
        0 => 1,
        n => u8::try_from(n)
            .ok()
            .filter(|n| *n <= MAX_VCPUS)
            .ok_or_else(|| Error::invalid("spec.vcpus", format!("{n}: need 1 to {MAX_VCPUS}")))?,
    };
    let mem_mib = match spec.memory_mib {
        0 => DEFAULT_MEM_MIB,
        n => n,
    };
    if mem_mib > host.mem_mib {
        return Err(Error::ResourceExhausted(format!(
            "spec.memory_mib: {mem_mib} MiB is more than this host's {} MiB of RAM",
            host.mem_mib
        )));
    }
    let mut drives: Vec<BlockConfig> = Vec::with_capacity(spec.drives.len());
    for (i, d) in spec.drives.iter().enumerate() {
        let field = |f: &str| format!("spec.drives[{i}].{f}");
        if d.id.is_empty() || d.id.len() > ID_BYTES {
            return Err(Error::invalid(
                field("id"),
                format!("{:?}: need 1 to {ID_BYTES} bytes", d.id),
            ));
        }
        if d.id.contains([',', '=']) || d.id.chars().any(char::is_control) {
            return Err(Error::invalid(
                field("id"),
                format!("{:?} contains ',', '=' or a control character", d.id),
            ));
        }
        if drives.iter().any(|o| o.id == d.id) {
            return Err(Error::invalid(
                field("id"),
                format!("{:?} is used by another drive of this VM", d.id),
            ));
        }
        if d.path.contains(',') {
            return Err(Error::invalid(
                field("path"),
                format!("{:?} contains a comma, which a drive path cannot", d.path),
            ));
        }
        drives.push(BlockConfig {
            id: d.id.clone(),
            path: file(&field("path"), &d.path)?,
            read_only: d.read_only,
        });
    }
    // One device slot per drive, one for vsock and one for the balloon; the memory range is
    // the VMM's.
    if let Err(e) = Layout::plan(mem_mib, drives.len() + 2) {
        let field = match e {
            crate::boot::layout::LayoutError::Memory(_) => "spec.memory_mib",
            crate::boot::layout::LayoutError::TooManyDevices(_) => "spec.drives",
        };
        return Err(Error::invalid(field, e.to_string()));
    }
    let vsock_cid = match spec.vsock_cid {
        0 => None,
        cid @ 3..=0xffff_fffe => Some(u64::from(cid)),
        cid => {
            return Err(Error::invalid(
                "spec.vsock_cid",
                format!(
                    "{cid} is reserved: need 3 to {}, or 0 to choose one",
                    u32::MAX - 1
                ),
            ));
        }
    };
    Ok(Machine {
        kernel,
        initrd,
        cmdline,
        vcpus,
        mem_mib,
        drives,
        vsock_cid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    const HOST: HostLimits = HostLimits { mem_mib: 4096 };

    fn field_of(e: Error) -> String {
        match e {
            Error::InvalidArgument { field, .. } => field,
            other => panic!("not an invalid argument: {other}"),
        }
    }

    #[test]
    fn names_are_checked() {
        for ok in ["web-1", "a", "A.b_c-9", &"x".repeat(NAME_MAX)] {
            assert!(name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            ".a",
            "a b",
            "a/b",
            "é",
            &"x".repeat(NAME_MAX + 1),
            "0123456789abcdef0123456789abcdef",
        ] {
            assert_eq!(field_of(name(bad).expect_err(bad)), "name", "{bad}");
        }
    }

    #[test]
    fn specs_are_checked_field_by_field() {
        let dir = tempfile::tempdir().expect("tmp");
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"k").expect("kernel");
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, b"d").expect("disk");
        let s = |p: &Path| p.to_str().expect("utf8").to_owned();
        let good = pb::VmSpec {
            kernel: s(&kernel),
            drives: vec![pb::Drive {
                id: "root".into(),
                path: s(&disk),
                read_only: true,
            }],
            ..Default::default()
        };
        let m = spec(Some(&good), HOST).expect("good");
        assert_eq!(
            (m.vcpus, m.mem_mib, m.vsock_cid),
            (1, DEFAULT_MEM_MIB, None)
        );
        assert_eq!(m.cmdline, DEFAULT_CMDLINE);

        let check = |edit: &dyn Fn(&mut pb::VmSpec), want: &str| {
            let mut bad = good.clone();
            edit(&mut bad);
            assert_eq!(field_of(spec(Some(&bad), HOST).expect_err(want)), want);
        };
        check(&|b| b.kernel = "vmlinuz".into(), "spec.kernel");
        check(&|b| b.kernel = s(&dir.path().join("nope")), "spec.kernel");
        check(&|b| b.kernel = s(dir.path()), "spec.kernel");
        check(&|b| b.initrd = Some(String::new()), "spec.initrd");
        check(&|b| b.vcpus = 255, "spec.vcpus");
        check(&|b| b.memory_mib = 16, "spec.memory_mib");
        check(&|b| b.cmdline = "a\nb".into(), "spec.cmdline");
        check(&|b| b.cmdline = "x".repeat(CMDLINE_MAX + 1), "spec.cmdline");
        check(&|b| b.vsock_cid = 2, "spec.vsock_cid");
        check(&|b| b.drives[0].id = String::new(), "spec.drives[0].id");
        check(&|b| b.drives[0].id = "x".repeat(21), "spec.drives[0].id");
        check(&|b| b.drives[0].id = "a,b".into(), "spec.drives[0].id");
        check(&|b| b.drives.push(b.drives[0].clone()), "spec.drives[1].id");
        check(
            &|b| b.drives[0].path = "/no/such/disk".into(),
            "spec.drives[0].path",
        );
        check(&|b| b.drives[0].path = "/a,b".into(), "spec.drives[0].path");
        check(
            &|b| {
                b.drives = (0..30)
                    .map(|i| pb::Drive {
                        id: format!("d{i}"),
                        path: s(&disk),
                        read_only: true,
                    })
                    .collect()
            },
            "spec.drives",
        );
        assert_eq!(field_of(spec(None, HOST).expect_err("none")), "spec");

        let mut big = good.clone();
        big.memory_mib = HOST.mem_mib + 1;
        assert_eq!(
            spec(Some(&big), HOST).expect_err("big").code(),
            Code::ResourceExhausted
        );
    }

    #[test]
    fn host_memory_is_read() {
        assert!(HostLimits::probe().expect("meminfo").mem_mib > 0);
    }
}
