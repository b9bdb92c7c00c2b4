//! Initramfs archives: a busybox userland, a set of kernel modules with everything they depend
//! on (and the kernel's `modules.dep`, so busybox `modprobe` works), and an `/init` script.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::debian::{self, Kernel};
use crate::stamp::{self, Inputs};

/// The static busybox that Debian's busybox-static installs.
pub const BUSYBOX: &str = "/bin/busybox";

/// A kernel and its initramfs, as files in one folder.
pub struct BootFiles {
    /// The bzImage.
    pub vmlinuz: PathBuf,
    /// The initramfs archive.
    pub initramfs: PathBuf,
    /// The kernel release.
    pub release: String,
    /// Whether each of the two was (re)built now.
    pub built: (bool, bool),
}

/// Fetches the kernel Debian's meta package `meta` depends on and puts it into `dir` as
/// `vmlinuz`, with an `initramfs.img` holding `modules` and `init`; rebuilds only what changed.
pub fn kernel_and_initramfs(
    meta: &str,
    modules: &[&str],
    init: &str,
    dir: &Path,
) -> Result<BootFiles> {
    let kernel = debian::kernel(meta)?;
    let vmlinuz = dir.join("vmlinuz");
    let built_kernel = stamp::build_if_changed(
        &vmlinuz,
        Inputs::default().file("kernel", &kernel.vmlinuz())?,
        |out| {
            fs::copy(kernel.vmlinuz(), out)?;
            Ok(())
        },
    )?;
    let initramfs = dir.join("initramfs.img");
    let inputs = Inputs::default()
        .text("release", &kernel.release)
        .text("init", init)
        .text("modules", &modules.join(" "))
        .file("busybox", Path::new(BUSYBOX))?;
    let spec = Spec {
        kernel: &kernel,
        modules,
        init,
    };
    let built_initramfs = stamp::build_if_changed(&initramfs, inputs, |out| build(&spec, out))?;
    Ok(BootFiles {
        vmlinuz,
        initramfs,
        release: kernel.release,
        built: (built_kernel, built_initramfs),
    })
}

/// What goes into one initramfs.
struct Spec<'a> {
    /// The kernel whose modules are included.
    kernel: &'a Kernel,
    /// Modules to include and load at boot, in load order (dependencies are added).
    modules: &'a [&'a str],
    /// The `/init` script.
    init: &'a str,
}

/// Builds the archive at `out`. `/init` gets a line `MODULES="…"` naming the modules to
/// modprobe (those built into the kernel are left out).
fn build(spec: &Spec<'_>, out: &Path) -> Result<()> {
    let staging = out.with_extension("staging");
    let _ = fs::remove_dir_all(&staging);
    for dir in [
        "bin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "newroot",
        "lib/modules",
    ] {
        fs::create_dir_all(staging.join(dir))?;
    }
    copy_executable(Path::new(BUSYBOX), &staging.join("bin/busybox"))?;
    let loadable = stage_modules(spec.kernel, spec.modules, &staging)?;
    let init = spec
        .init
        .replacen("\n", &format!("\nMODULES=\"{}\"\n", loadable.join(" ")), 1);
    let init_path = staging.join("init");
    fs::write(&init_path, init)?;
    fs::set_permissions(&init_path, fs::Permissions::from_mode(0o755))?;
    write_cpio(&staging, out)?;
    fs::remove_dir_all(&staging)?;
    Ok(())
}

/// Copies an executable, keeping it executable.
pub fn copy_executable(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// A module's name as modprobe knows it: `kvm-amd.ko` → `kvm_amd`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.trim_end_matches(".ko").replace('-', "_")
}

/// Copies `wanted` and their dependencies into `staging`; returns the wanted modules that are
/// loadable (not built in), in the order given.
fn stage_modules(kernel: &Kernel, wanted: &[&str], staging: &Path) -> Result<Vec<String>> {
    let src = kernel.modules_dir();
    let dep_text = fs::read_to_string(src.join("modules.dep"))
        .with_context(|| format!("reading {}/modules.dep", src.display()))?;
    let builtin = fs::read_to_string(src.join("modules.builtin")).unwrap_or_default();
    let builtin: BTreeSet<String> = builtin.lines().map(module_name).collect();
    let deps: Vec<(String, &str, Vec<&str>)> = dep_text
        .lines()
        .filter_map(|line| {
            let (module, deps) = line.split_once(':')?;
            Some((
                module_name(module),
                module,
                deps.split_whitespace().collect(),
            ))
        })
        .collect();

    let mut files = BTreeSet::new();
    let mut loadable = Vec::new();
    for name in wanted {
        let name = name.replace('-', "_");
        if let Some((_, file, module_deps)) = deps.iter().find(|(n, _, _)| *n == name) {
            files.insert(*file);
            files.extend(module_deps.iter().copied());
            loadable.push(name);
        } else if !builtin.contains(&name) {
            bail!(
                "kernel {} has no module {name} (neither loadable nor built in)",
                kernel.release
            );
        }
    }
    let dest = staging.join("lib/modules").join(&kernel.release);
    for file in &files {
        let to = dest.join(file);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::copy(src.join(file), &to).with_context(|| format!("copying module {file}"))?;
    }
    for index in ["modules.dep", "modules.builtin", "modules.order"] {
        if src.join(index).exists() {
            fs::copy(src.join(index), dest.join(index))?;
        }
    }
    Ok(loadable)
}

/// Writes `dir` as a newc cpio archive owned by root.
fn write_cpio(dir: &Path, out: &Path) -> Result<()> {
    let mut entries = Vec::new();
    list(dir, dir, &mut entries)?;
    entries.sort();
    let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut child = Command::new("cpio")
        .current_dir(dir)
        .args(["--quiet", "-o", "-H", "newc", "-R", "0:0", "--reproducible"])
        .stdin(Stdio::piped())
        .stdout(file)
        .spawn()
        .context("cannot run cpio (Debian package cpio; run `cargo xtask setup`)")?;
    {
        let mut stdin = child.stdin.take().context("cpio has no stdin")?;
        for entry in &entries {
            writeln!(stdin, "{}", entry.display())?;
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("cpio failed ({status}) archiving {}", dir.display());
    }
    Ok(())
}

fn list(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let rel = path.strip_prefix(root)?.to_path_buf();
        let is_dir = path.symlink_metadata()?.is_dir();
        out.push(Path::new(".").join(&rel));
        if is_dir {
            list(root, &path, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_come_with_their_dependencies_and_builtins_are_not_loaded() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let kernel = Kernel {
            release: "6.1.0-test".into(),
            root: dir.join("kernel"),
        };
        let modules = kernel.modules_dir();
        fs::create_dir_all(modules.join("kernel/drivers")).unwrap();
        for m in [
            "virtio.ko",
            "virtio_ring.ko",
            "virtio-blk.ko",
            "unrelated.ko",
        ] {
            fs::write(modules.join("kernel/drivers").join(m), m).unwrap();
        }
        fs::write(
            modules.join("modules.dep"),
            "kernel/drivers/virtio-blk.ko: kernel/drivers/virtio.ko kernel/drivers/virtio_ring.ko\n\
             kernel/drivers/virtio.ko: kernel/drivers/virtio_ring.ko\n\
             kernel/drivers/virtio_ring.ko:\n\
             kernel/drivers/unrelated.ko:\n",
        )
        .unwrap();
        fs::write(modules.join("modules.builtin"), "kernel/fs/ext4/ext4.ko\n").unwrap();

        let staging = dir.join("staging");
        let loadable = stage_modules(&kernel, &["virtio_blk", "ext4"], &staging).unwrap();
        assert_eq!(loadable, ["virtio_blk"]);
        let staged = staging.join("lib/modules/6.1.0-test/kernel/drivers");
        for m in ["virtio.ko", "virtio_ring.ko", "virtio-blk.ko"] {
            assert!(staged.join(m).is_file(), "{m} missing");
        }
        assert!(!staged.join("unrelated.ko").exists());
        assert!(staging.join("lib/modules/6.1.0-test/modules.dep").is_file());

        let err = stage_modules(&kernel, &["nonexistent"], &staging).unwrap_err();
        assert!(err.to_string().contains("no module nonexistent"), "{err}");
    }
}
