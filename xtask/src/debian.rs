//! Debian kernels for the guest and the box: resolved through apt, fetched with
//! `apt-get download`, unpacked with `dpkg-deb -x` into the cache (never installed into this
//! machine's /boot), and given a `modules.dep` by `depmod`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd;
use crate::paths;

/// An unpacked Debian kernel package.
pub struct Kernel {
    /// The kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// The unpacked package: `boot/`, `lib/modules/<release>/`.
    pub root: PathBuf,
}

impl Kernel {
    /// The bzImage.
    pub fn vmlinuz(&self) -> PathBuf {
        self.root
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }

    /// The folder with `modules.dep` and the `.ko` files.
    pub fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }
}

/// Fetches (once) and unpacks the kernel the meta package `meta` (e.g.
/// `linux-image-cloud-amd64`) currently depends on.
pub fn kernel(meta: &str) -> Result<Kernel> {
    let package = match resolve(meta) {
        Ok(package) => package,
        Err(e) => match newest_cached(meta)? {
            Some(cached) => {
                eprintln!("images: {e:#}; using the cached {cached}");
                cached
            }
            None => return Err(e),
        },
    };
    let release = package
        .strip_prefix("linux-image-")
        .with_context(|| {
            format!("{meta} depends on {package}, which is not a linux-image package")
        })?
        .to_owned();
    let root = paths::cache_dir().join("kernels").join(&package);
    let done = root.join(".unpacked");
    if !done.exists() {
        let deb = download(&package)?;
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root)?;
        cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        cmd::run(Command::new("depmod").arg("-b").arg(&root).arg(&release))
            .context("depmod (Debian package kmod) could not index the kernel's modules")?;
        fs::write(&done, &package)?;
    }
    let kernel = Kernel { release, root };
    if !kernel.vmlinuz().is_file() {
        bail!("{package} has no {}", kernel.vmlinuz().display());
    }
    Ok(kernel)
}

/// The `linux-image-<release>` package that `meta` depends on.
fn resolve(meta: &str) -> Result<String> {
    let find = || -> Result<Option<String>> {
        let out = cmd::output(Command::new("apt-cache").args(["depends", "--important", meta]))?;
        Ok(out.lines().find_map(|line| {
            let dep = line.trim().strip_prefix("Depends:")?.trim();
            (dep.starts_with("linux-image-") && !dep.starts_with('<')).then(|| dep.to_owned())
        }))
    };
    if let Ok(Some(package)) = find() {
        return Ok(package);
    }
    // A fresh machine may have no package lists yet.
    cmd::run(Command::new("apt-get").args(["update", "-q"]))
        .context("apt-get update (needed to find the kernel package)")?;
    find()?.with_context(|| {
        format!(
            "apt knows no {meta}: is this a Debian machine with the main archive in its sources?"
        )
    })
}

/// The newest already unpacked kernel whose package name fits `meta`'s flavour.
fn newest_cached(meta: &str) -> Result<Option<String>> {
    let flavour = meta.trim_start_matches("linux-image-");
    let dir = paths::cache_dir().join("kernels");
    let Ok(entries) = fs::read_dir(&dir) else {
        return Ok(None);
    };
    let mut found: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join(".unpacked").exists())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| {
            // linux-image-<version>-<flavour>, where <version> is digits, dots and dashes only.
            name.strip_prefix("linux-image-")
                .and_then(|rest| rest.strip_suffix(flavour))
                .is_some_and(|version| {
                    version.ends_with('-')
                        && version
                            .chars()
                            .all(|c| c.is_ascii_digit() || c == '.' || c == '-')
                })
        })
        .collect();
    found.sort();
    Ok(found.pop())
}

/// Downloads `package`'s .deb into the cache (once) and returns its path.
pub fn download(package: &str) -> Result<PathBuf> {
    let dir = paths::cache_dir().join("debs");
    fs::create_dir_all(&dir)?;
    if let Some(deb) = find_deb(&dir, package)? {
        return Ok(deb);
    }
    println!("debian: downloading {package}");
    let out = Command::new("apt-get")
        .current_dir(&dir)
        .args(["download", "-q", package])
        .output()
        .context("cannot run apt-get")?;
    if !out.status.success() {
        bail!(
            "apt-get download {package} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    find_deb(&dir, package)?.with_context(|| {
        format!(
            "apt-get download {package} left no .deb in {}",
            dir.display()
        )
    })
}

fn find_deb(dir: &Path, package: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(Some(entry.path()));
        }
    }
    Ok(None)
}
