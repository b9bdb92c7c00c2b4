//! `cargo xtask kernel`: the patched guest kernel. Fetches Debian's `linux-source-6.1` with
//! `apt-get download` into the cache, unpacks it under the target folder, applies the series of
//! `kernel-patch/` with `patch -p1`, merges `kernel-patch/ditto-guest.config` onto `make
//! tinyconfig` and builds a bzImage, which becomes `vmlinuz-ditto` beside the other guest
//! images. Rebuilt only when the series, the configuration or the source package changed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::paths;
use crate::stamp::{self, Inputs};
use crate::{cmd, debian, setup};

/// The Debian source package the series applies to.
const SOURCE_PACKAGE: &str = "linux-source-6.1";

/// The tarball inside [`SOURCE_PACKAGE`], and the folder it unpacks to.
const SOURCE_TARBALL: &str = "usr/src/linux-source-6.1.tar.xz";
const SOURCE_FOLDER: &str = "linux-source-6.1";

/// The configuration the fragment is merged onto.
const BASE_CONFIG: &str = "tinyconfig";

/// The fragment, in `kernel-patch/`.
const CONFIG_FRAGMENT: &str = "ditto-guest.config";

/// The built kernel's name in the guest images folder.
pub const IMAGE_NAME: &str = "vmlinuz-ditto";

/// Options of `cargo xtask kernel`.
#[derive(clap::Args, Default)]
pub struct KernelArgs {
    /// Parallel make jobs (default: the number of CPUs).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub jobs: Option<u32>,
}

/// The command: set up, build if anything changed, print the image's path.
pub fn run(args: &KernelArgs) -> Result<()> {
    setup::ensure(setup::Report::Changes)?;
    let image = ensure(args)?;
    println!("{}", image.display());
    Ok(())
}

/// Builds `vmlinuz-ditto` if the series, the fragment or the source package changed (the
/// machine set up already) and returns its path.
pub fn ensure(args: &KernelArgs) -> Result<PathBuf> {
    let patches = paths::workspace().join("kernel-patch");
    let series = read_series(&patches)?;
    let fragment = patches.join(CONFIG_FRAGMENT);
    let deb = debian::download(SOURCE_PACKAGE)?;
    let deb_name = deb
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();

    let mut inputs = Inputs::default()
        .text("source", &deb_name)
        .text("base", BASE_CONFIG)
        .file("series", &patches.join("series"))?
        .file("config", &fragment)?;
    // Keyed by file name, not path: a checkout elsewhere has the same kernel.
    for patch in &series {
        let name = patch.file_name().map(|n| n.to_string_lossy());
        inputs = inputs.file(name.as_deref().unwrap_or_default(), patch)?;
    }

    let image = paths::guest_dir().join(IMAGE_NAME);
    let work = paths::images_root().join("kernel");
    let jobs = args.jobs.map_or_else(cpu_count, |j| j as usize);
    let started = Instant::now();
    let built = stamp::build_if_changed(&image, inputs, |out| {
        build(&deb, &series, &fragment, &work, jobs, out)
    })?;
    if built {
        let secs = started.elapsed().as_secs();
        eprintln!(
            "kernel: built {} from {deb_name} with {} patches in {}m{:02}s (make -j{jobs})",
            image.display(),
            series.len(),
            secs / 60,
            secs % 60
        );
    } else {
        eprintln!(
            "kernel: up to date: {} (series, {CONFIG_FRAGMENT} and {deb_name} unchanged; nothing to do)",
            image.display()
        );
    }
    Ok(image)
}

/// The patches named by `dir/series`, in order (blank lines and `#` comments skipped).
fn read_series(dir: &Path) -> Result<Vec<PathBuf>> {
    let path = dir.join("series");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut patches = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.contains('/') || line.starts_with('.') {
            bail!(
                "{}: {line:?} is not a file name in kernel-patch/",
                path.display()
            );
        }
        let patch = dir.join(line);
        if !patch.is_file() {
            bail!("{} names {line}, which does not exist", path.display());
        }
        patches.push(patch);
    }
    if patches.is_empty() {
        bail!("{} names no patch", path.display());
    }
    Ok(patches)
}

/// Unpacks, patches, configures and builds the kernel in `work`, writes the bzImage to `out`
/// and the configuration beside it, and removes `work` again.
fn build(
    deb: &Path,
    series: &[PathBuf],
    fragment: &Path,
    work: &Path,
    jobs: usize,
    out: &Path,
) -> Result<()> {
    let _ = fs::remove_dir_all(work);
    fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    let source = work.join(SOURCE_FOLDER);
    let objects = work.join("build");

    eprintln!("kernel: unpacking {}", deb.display());
    cmd::run(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb)
            .arg(work.join("deb")),
    )?;
    cmd::run(
        Command::new("tar")
            .arg("-xJf")
            .arg(work.join("deb").join(SOURCE_TARBALL))
            .arg("-C")
            .arg(work),
    )?;
    fs::remove_dir_all(work.join("deb"))?;
    if !source.join("Makefile").is_file() {
        bail!("{SOURCE_TARBALL} did not unpack to {SOURCE_FOLDER}/");
    }

    for patch in series {
        eprintln!("kernel: applying {}", patch.display());
        cmd::run(
            Command::new("patch")
                .args(["-p1", "--forward", "--batch", "--quiet", "-d"])
                .arg(&source)
                .arg("-i")
                .arg(patch),
        )
        .with_context(|| format!("{} does not apply", patch.display()))?;
    }

    let make = |args: &[&str]| -> Command {
        let mut make = Command::new("make");
        make.arg("-C")
            .arg(&source)
            .arg(format!("O={}", objects.display()))
            .args(args);
        make
    };
    // tinyconfig merges fragments itself and lists every override: keep that quiet.
    cmd::output(&mut make(&["-s", BASE_CONFIG]))?;
    let config = objects.join(".config");
    cmd::output(
        Command::new(source.join("scripts/kconfig/merge_config.sh"))
            .current_dir(&source)
            .arg("-m")
            .arg("-O")
            .arg(&objects)
            .arg(&config)
            .arg(fragment),
    )?;
    cmd::run(&mut make(&["-s", "olddefconfig"]))?;
    let wanted =
        fs::read_to_string(fragment).with_context(|| format!("reading {}", fragment.display()))?;
    let got = fs::read_to_string(&config)?;
    let missing = missing_options(&wanted, &got);
    if !missing.is_empty() {
        bail!(
            "the configuration lost options of {CONFIG_FRAGMENT} (unmet dependencies?): {}",
            missing.join(", ")
        );
    }

    eprintln!("kernel: make -j{jobs} bzImage");
    cmd::run(&mut make(&[&format!("-j{jobs}"), "bzImage"]))?;
    let bzimage = objects.join("arch/x86/boot/bzImage");
    fs::copy(&bzimage, out).with_context(|| format!("copying {}", bzimage.display()))?;
    fs::copy(&config, out.with_file_name(format!("{IMAGE_NAME}.config")))?;
    fs::remove_dir_all(work).with_context(|| format!("removing {}", work.display()))?;
    Ok(())
}

/// The `CONFIG_X=value` lines of `fragment` that `config` does not have as they are, and the
/// `# CONFIG_X is not set` lines that `config` sets.
fn missing_options(fragment: &str, config: &str) -> Vec<String> {
    let lines: Vec<&str> = config.lines().map(str::trim).collect();
    let mut missing = Vec::new();
    for line in fragment.lines().map(str::trim) {
        if line.starts_with("CONFIG_") {
            if !lines.contains(&line) {
                missing.push(line.to_owned());
            }
        } else if let Some(name) = line
            .strip_prefix("# ")
            .and_then(|rest| rest.strip_suffix(" is not set"))
        {
            let set = format!("{name}=");
            if lines.iter().any(|l| l.starts_with(&set)) {
                missing.push(line.to_owned());
            }
        }
    }
    missing
}

fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_options_are_named() {
        let fragment = "# comment\nCONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\nCONFIG_D=\"x\"\n";
        let config = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\nCONFIG_D=\"x\"\n";
        assert_eq!(
            missing_options(fragment, config),
            ["CONFIG_B=y", "# CONFIG_C is not set"]
        );
        assert!(missing_options(fragment, "CONFIG_A=y\nCONFIG_B=y\nCONFIG_D=\"x\"\n").is_empty());
    }

    #[test]
    fn series_is_read_in_order_and_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        fs::write(dir.join("0001-a.patch"), "").unwrap();
        fs::write(dir.join("0002-b.patch"), "").unwrap();
        fs::write(
            dir.join("series"),
            "# order\n0002-b.patch\n\n0001-a.patch\n",
        )
        .unwrap();
        let series = read_series(dir).unwrap();
        assert_eq!(series, [dir.join("0002-b.patch"), dir.join("0001-a.patch")]);

        fs::write(dir.join("series"), "0003-c.patch\n").unwrap();
        assert!(read_series(dir).is_err());
        fs::write(dir.join("series"), "../0001-a.patch\n").unwrap();
        assert!(read_series(dir).is_err());
        fs::write(dir.join("series"), "# nothing\n").unwrap();
        assert!(read_series(dir).is_err());
    }

    #[test]
    fn the_repository_series_exists() {
        let series = read_series(&paths::workspace().join("kernel-patch")).unwrap();
        assert!(!series.is_empty());
    }
}
