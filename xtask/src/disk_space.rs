//! The free-space check before `cargo xtask test`: a run that fills the disk dies deep inside
//! a compiler or linker (`No space left on device`, a linker's bus error) after minutes of work,
//! so the pipeline says up front when the target folder's file system cannot hold a run.

use std::path::Path;

use anyhow::{Context, Result, bail};

/// What a whole `cargo xtask test` run from a fresh clone leaves in the target folder: the
/// debug and musl builds, the guest images, the patched kernel and its build tree (a fresh
/// clone's CI run left 8.0 GiB), with some room to spare.
pub const RUN_NEEDS: u64 = 10 << 30;

/// Fails, saying how much is missing, when `target`'s file system has less free space than
/// `needed` bytes beyond what `target` already holds (a warm target folder needs less, since
/// the run rewrites what is there). Prints the free space either way.
pub fn ensure(target: &Path, needed: u64) -> Result<()> {
    std::fs::create_dir_all(target).with_context(|| format!("creating {}", target.display()))?;
    let fs =
        rustix::fs::statvfs(target).with_context(|| format!("statvfs of {}", target.display()))?;
    let free = fs.f_bavail.saturating_mul(fs.f_frsize);
    let gib = |bytes: u64| bytes as f64 / f64::from(1u32 << 30);
    println!(
        "disk: {:.1} GiB free for {}; a run needs about {:.1} GiB",
        gib(free),
        target.display(),
        gib(needed)
    );
    if free >= needed {
        return Ok(());
    }
    // Short of space: what the target folder holds is rewritten by the run, so it counts too
    // (walked only now, since a large target folder takes a second or more).
    let held = size_on_disk(target);
    if free.saturating_add(held) < needed {
        bail!(
            "only {:.1} GiB free on the file system of {} (and {:.1} GiB already in it), but a \
             test run needs about {:.1} GiB: free {:.1} GiB first",
            gib(free),
            target.display(),
            gib(held),
            gib(needed),
            gib(needed - free - held)
        );
    }
    Ok(())
}

/// The bytes allocated to the files under `dir` (not following symbolic links); what cannot be
/// read counts as nothing.
fn size_on_disk(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0u64;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if meta.is_dir() {
                pending.push(entry.path());
            } else {
                total = total.saturating_add(meta.blocks().saturating_mul(512));
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_system_without_the_room_is_refused_with_what_is_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        // No file system has an exabyte free.
        let err = ensure(dir.path(), 1 << 60).expect_err("refused");
        let msg = err.to_string();
        assert!(msg.contains("a test run needs about"), "{msg}");
        assert!(msg.contains("free"), "{msg}");
        ensure(dir.path(), 1).expect("one byte fits");
    }

    #[test]
    fn the_size_on_disk_counts_the_files_in_subfolders() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        std::fs::write(dir.path().join("sub/a"), vec![1u8; 1 << 20]).expect("write");
        std::fs::write(dir.path().join("b"), vec![1u8; 1 << 20]).expect("write");
        let size = size_on_disk(dir.path());
        assert!((2 << 20..3 << 20).contains(&size), "{size}");
    }
}
