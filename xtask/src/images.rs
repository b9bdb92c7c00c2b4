//! `cargo xtask images`: the guest artifacts — Debian's stock cloud kernel (`vmlinuz`), an
//! initramfs that loads the virtio modules and switches to the root disk (`initramfs.img`), and
//! an ext4 root disk built the Alpine way from busybox and the project's static musl binaries, or
//! from a user-supplied Alpine minirootfs (`rootfs.ext4`). Rebuilds only what changed.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::initramfs::{self, BUSYBOX};
use crate::paths::{self, MUSL_TARGET};
use crate::stamp::{self, Inputs};
use crate::{cmd, setup};

/// The Debian meta package of the guest kernel.
const GUEST_KERNEL: &str = "linux-image-cloud-amd64";

/// Modules the guest loads from its initramfs (their dependencies come along).
const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "vsock",
    "vmw_vsock_virtio_transport",
    "virtio_balloon",
];

/// The project's static binaries installed into the root disk: (cargo package, binary, path in
/// the guest).
const GUEST_BINARIES: &[(&str, &str, &str)] = &[
    ("ditto-agent", "ditto-agent", "usr/sbin/ditto-agent"),
    ("ditto-workload", "ditto-workload", "usr/bin/ditto-workload"),
    // Checks /proc/kpageblock against the disk in guests of the patched kernel
    // (tests/tests/kpageblock_linux.rs); on the stock kernel it has nothing to read.
    (
        "ditto-tests",
        "kpageblock-check",
        "usr/bin/kpageblock-check",
    ),
];

/// The agent's OpenRC service script, for Alpine root disks.
const OPENRC_SCRIPT: &str = "guest-agent/packaging/openrc/ditto-agent";

const GUEST_INIT: &str = include_str!("../assets/guest-initramfs-init.sh");
const ROOTFS_FILES: &[(&str, &str, u32)] = &[
    (
        "etc/inittab",
        include_str!("../assets/rootfs/inittab"),
        0o644,
    ),
    (
        "etc/init.d/rcS",
        include_str!("../assets/rootfs/rcS"),
        0o755,
    ),
    ("etc/passwd", include_str!("../assets/rootfs/passwd"), 0o644),
    ("etc/group", include_str!("../assets/rootfs/group"), 0o644),
    ("etc/hostname", HOSTNAME, 0o644),
];

/// The guest's host name (both root disk kinds).
const HOSTNAME: &str = include_str!("../assets/rootfs/hostname");

/// Size of rootfs.ext4 unless asked otherwise, in MiB.
const DEFAULT_ROOTFS_MIB: u64 = 2048;

/// Options of `cargo xtask images`.
#[derive(clap::Args)]
pub struct ImagesArgs {
    /// Build the root disk from this Alpine minirootfs tarball (the agent becomes an OpenRC
    /// service) instead of from busybox.
    #[arg(long, value_name = "TARBALL")]
    pub alpine_rootfs: Option<PathBuf>,
    /// Size of rootfs.ext4 in MiB (a sparse file: unused space costs nothing).
    #[arg(long, default_value_t = DEFAULT_ROOTFS_MIB, value_parser = clap::value_parser!(u64).range(64..=1 << 20))]
    pub rootfs_mib: u64,
}

impl Default for ImagesArgs {
    fn default() -> Self {
        Self {
            alpine_rootfs: None,
            rootfs_mib: DEFAULT_ROOTFS_MIB,
        }
    }
}

/// The built guest artifacts.
pub struct GuestImages {
    /// The folder holding the three files (what `$DITTO_IMAGES` names).
    pub dir: PathBuf,
}

/// The command: set up, build, print the paths.
pub fn run(args: &ImagesArgs) -> Result<()> {
    setup::ensure(setup::Report::Changes)?;
    let images = build(args)?;
    for name in ["vmlinuz", "initramfs.img", "rootfs.ext4"] {
        println!("{}", images.dir.join(name).display());
    }
    Ok(())
}

/// Builds whatever changed and returns where the images are.
pub fn build(args: &ImagesArgs) -> Result<GuestImages> {
    build_musl_binaries(&GUEST_BINARIES.iter().map(|b| b.0).collect::<Vec<_>>())?;
    let dir = paths::guest_dir();
    let boot = initramfs::kernel_and_initramfs(GUEST_KERNEL, GUEST_MODULES, GUEST_INIT, &dir)?;
    say(boot.built.0, &boot.vmlinuz, &boot.release);
    say(boot.built.1, &boot.initramfs, "busybox, virtio modules");

    let rootfs = dir.join("rootfs.ext4");
    let mut inputs = Inputs::default()
        .text("size", &args.rootfs_mib.to_string())
        .file("busybox", Path::new(BUSYBOX))?
        .file("openrc", &paths::workspace().join(OPENRC_SCRIPT))?;
    for (_, bin, _) in GUEST_BINARIES {
        inputs = inputs.file(bin, &paths::musl_release_dir().join(bin))?;
    }
    for (path, text, _) in ROOTFS_FILES {
        inputs = inputs.text(path, text);
    }
    if let Some(tarball) = &args.alpine_rootfs {
        inputs = inputs.file("alpine", tarball)?;
    }
    let built = stamp::build_if_changed(&rootfs, inputs, |out| {
        let staging = out.with_extension("staging");
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(&staging)?;
        match &args.alpine_rootfs {
            Some(tarball) => stage_alpine(tarball, &Sources::workspace(), &staging)?,
            None => stage_busybox(&Sources::workspace(), &staging)?,
        }
        make_ext4(&staging, args.rootfs_mib, out)?;
        fs::remove_dir_all(&staging)?;
        Ok(())
    })?;
    let what = if args.alpine_rootfs.is_some() {
        "Alpine"
    } else {
        "busybox"
    };
    say(built, &rootfs, what);
    Ok(GuestImages { dir })
}

fn say(built: bool, path: &Path, what: &str) {
    let verb = if built { "built" } else { "up to date" };
    eprintln!("images: {verb}: {} ({what})", path.display());
}

/// Builds the given packages' binaries as static release musl executables.
/// With no packages named, builds every binary of the workspace but xtask's own.
pub fn build_musl_binaries(packages: &[&str]) -> Result<()> {
    let mut build = cmd::cargo();
    build.args([
        "build",
        "--quiet",
        "--release",
        "--target",
        MUSL_TARGET,
        "--bins",
    ]);
    if packages.is_empty() {
        build.args(["--workspace", "--exclude", "xtask"]);
    }
    for package in packages {
        build.args(["--package", package]);
    }
    // C code in dependencies needs musl's headers and startup files.
    if cmd::on_path("musl-gcc") {
        build.env("CC_x86_64_unknown_linux_musl", "musl-gcc");
    }
    cmd::run(&mut build)
}

fn write_file(root: &Path, rel: &str, text: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let path = root.join(rel);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Where the files that go into a root disk come from.
struct Sources {
    /// The folder with the static musl binaries of [`GUEST_BINARIES`].
    binaries: PathBuf,
    /// The agent's OpenRC service script.
    openrc_script: PathBuf,
}

impl Sources {
    /// This workspace's release musl binaries and packaging files.
    fn workspace() -> Self {
        Self {
            binaries: paths::musl_release_dir(),
            openrc_script: paths::workspace().join(OPENRC_SCRIPT),
        }
    }
}

fn install_binaries(sources: &Sources, root: &Path) -> Result<()> {
    for (_, bin, dest) in GUEST_BINARIES {
        let to = root.join(dest);
        if let Some(dir) = to.parent() {
            fs::create_dir_all(dir)?;
        }
        initramfs::copy_executable(&sources.binaries.join(bin), &to)?;
    }
    Ok(())
}

/// A root disk of busybox (with a link per applet), the project's binaries and an init that
/// mounts /proc, /sys, /dev and keeps the agent running.
fn stage_busybox(sources: &Sources, root: &Path) -> Result<()> {
    for dir in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc/init.d",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "root",
        "mnt",
        "var/log",
        "var/tmp",
    ] {
        fs::create_dir_all(root.join(dir))?;
    }
    initramfs::copy_executable(Path::new(BUSYBOX), &root.join("bin/busybox"))?;
    let applets = cmd::output(Command::new(BUSYBOX).arg("--list-full"))?;
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        let link = root.join(applet);
        if applet == "bin/busybox" || link.exists() {
            continue;
        }
        if let Some(dir) = link.parent() {
            fs::create_dir_all(dir)?;
        }
        symlink("/bin/busybox", &link)?;
    }
    for (path, text, mode) in ROOTFS_FILES {
        write_file(root, path, text, *mode)?;
    }
    install_binaries(sources, root)
}

/// A root disk from an Alpine minirootfs tarball, with the agent as an OpenRC service.
fn stage_alpine(tarball: &Path, sources: &Sources, root: &Path) -> Result<()> {
    if !tarball.is_file() {
        bail!("--alpine-rootfs {}: no such file", tarball.display());
    }
    cmd::run(
        Command::new("tar")
            .args(["-xpf"])
            .arg(tarball)
            .args(["--numeric-owner", "-C"])
            .arg(root),
    )
    .with_context(|| format!("unpacking {}", tarball.display()))?;
    if !root.join("etc/alpine-release").exists() {
        bail!(
            "{} is not an Alpine minirootfs (it has no etc/alpine-release)",
            tarball.display()
        );
    }
    install_binaries(sources, root)?;
    write_file(root, "etc/hostname", HOSTNAME, 0o644)?;
    let init = root.join("sbin/init");
    if init.symlink_metadata().is_err() {
        symlink("/bin/busybox", &init)?;
    }
    if root.join("sbin/openrc").exists() {
        let script = fs::read_to_string(&sources.openrc_script).with_context(|| {
            format!(
                "reading the agent's OpenRC script {}",
                sources.openrc_script.display()
            )
        })?;
        write_file(root, "etc/init.d/ditto-agent", &script, 0o755)?;
        for (level, service) in [
            ("sysinit", "devfs"),
            ("sysinit", "dmesg"),
            ("sysinit", "mdev"),
            ("boot", "hostname"),
            ("boot", "bootmisc"),
            ("boot", "sysctl"),
            ("default", "ditto-agent"),
        ] {
            if !root.join("etc/init.d").join(service).exists() {
                continue;
            }
            let dir = root.join("etc/runlevels").join(level);
            fs::create_dir_all(&dir)?;
            let link = dir.join(service);
            if link.symlink_metadata().is_err() {
                symlink(format!("/etc/init.d/{service}"), link)?;
            }
        }
        write_file(
            root,
            "etc/inittab",
            "::sysinit:/sbin/openrc sysinit\n::sysinit:/sbin/openrc boot\n\
             ::wait:/sbin/openrc default\nttyS0::respawn:/sbin/getty -L 115200 ttyS0 vt100\n\
             ::ctrlaltdel:/sbin/reboot\n::shutdown:/sbin/openrc shutdown\n",
            0o644,
        )?;
    } else {
        // Alpine's minirootfs ships without OpenRC (it is made for containers). Without it the
        // agent is kept running by busybox init, exactly as in the busybox image.
        eprintln!(
            "images: {} has no OpenRC (sbin/openrc): the agent runs under busybox init's \
             respawn; add the openrc package to the tarball for an OpenRC service",
            tarball.display()
        );
        for (path, text, mode) in ROOTFS_FILES.iter().filter(|f| f.0.starts_with("etc/init")) {
            write_file(root, path, text, *mode)?;
        }
    }
    Ok(())
}

/// Makes a sparse ext4 image of `size_mib` MiB holding `root`.
fn make_ext4(root: &Path, size_mib: u64, out: &Path) -> Result<()> {
    let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    file.set_len(size_mib << 20)?;
    drop(file);
    cmd::output(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "ditto-root", "-E", "root_owner=0:0", "-d"])
            .arg(root)
            .arg(out),
    )
    .context("mkfs.ext4 (Debian package e2fsprogs) could not build the root disk")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal Alpine-like tarball: the release file, busybox, and OpenRC if asked for.
    fn alpine_tarball(dir: &Path, with_openrc: bool) -> PathBuf {
        let tree = dir.join("tree");
        for d in ["etc/init.d", "bin", "sbin"] {
            fs::create_dir_all(tree.join(d)).unwrap();
        }
        fs::write(tree.join("etc/alpine-release"), "3.20.0\n").unwrap();
        fs::write(tree.join("bin/busybox"), "not really busybox").unwrap();
        if with_openrc {
            fs::write(tree.join("sbin/openrc"), "").unwrap();
            fs::write(tree.join("etc/init.d/devfs"), "").unwrap();
        }
        let tarball = dir.join("alpine.tar.gz");
        cmd::run(
            Command::new("tar")
                .arg("-czf")
                .arg(&tarball)
                .arg("-C")
                .arg(&tree)
                .arg("."),
        )
        .unwrap();
        tarball
    }

    fn sources(dir: &Path) -> Sources {
        let binaries = dir.join("bin");
        fs::create_dir_all(&binaries).unwrap();
        for (_, bin, _) in GUEST_BINARIES {
            fs::write(binaries.join(bin), format!("{bin} binary")).unwrap();
        }
        let openrc_script = dir.join("ditto-agent.openrc");
        fs::write(&openrc_script, "#!/sbin/openrc-run\n").unwrap();
        Sources {
            binaries,
            openrc_script,
        }
    }

    #[test]
    fn alpine_with_openrc_gets_the_agent_as_a_service() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let tarball = alpine_tarball(dir, true);
        let root = dir.join("root");
        fs::create_dir_all(&root).unwrap();
        stage_alpine(&tarball, &sources(dir), &root).unwrap();
        assert_eq!(
            fs::read_to_string(root.join("usr/sbin/ditto-agent")).unwrap(),
            "ditto-agent binary"
        );
        assert!(root.join("etc/init.d/ditto-agent").is_file());
        assert_eq!(
            fs::read_link(root.join("etc/runlevels/default/ditto-agent")).unwrap(),
            Path::new("/etc/init.d/ditto-agent")
        );
        assert!(
            root.join("etc/runlevels/sysinit/devfs")
                .symlink_metadata()
                .is_ok()
        );
        // Services the tarball does not have are not enabled.
        assert!(
            root.join("etc/runlevels/boot/hostname")
                .symlink_metadata()
                .is_err()
        );
        let inittab = fs::read_to_string(root.join("etc/inittab")).unwrap();
        assert!(inittab.contains("/sbin/openrc default"), "{inittab}");
    }

    #[test]
    fn alpine_without_openrc_runs_the_agent_under_busybox_init() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let tarball = alpine_tarball(dir, false);
        let root = dir.join("root");
        fs::create_dir_all(&root).unwrap();
        stage_alpine(&tarball, &sources(dir), &root).unwrap();
        let inittab = fs::read_to_string(root.join("etc/inittab")).unwrap();
        assert!(inittab.contains("/usr/sbin/ditto-agent serve"), "{inittab}");
        assert!(root.join("etc/init.d/rcS").is_file());
        assert!(root.join("usr/sbin/ditto-agent").is_file());
        assert_eq!(
            fs::read_to_string(root.join("usr/bin/ditto-workload")).unwrap(),
            "ditto-workload binary"
        );
    }

    #[test]
    fn a_tarball_that_is_not_alpine_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let tree = dir.join("tree");
        fs::create_dir_all(tree.join("etc")).unwrap();
        let tarball = dir.join("other.tar");
        cmd::run(
            Command::new("tar")
                .arg("-cf")
                .arg(&tarball)
                .arg("-C")
                .arg(&tree)
                .arg("."),
        )
        .unwrap();
        let root = dir.join("root");
        fs::create_dir_all(&root).unwrap();
        let err = stage_alpine(&tarball, &sources(dir), &root).unwrap_err();
        assert!(
            err.to_string().contains("not an Alpine minirootfs"),
            "{err}"
        );
    }
}
