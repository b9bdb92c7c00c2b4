//! Rebuild only what changed: each artifact keeps a stamp file with the hash of its inputs.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// Collects the inputs of one artifact into a hash.
#[derive(Default)]
pub struct Inputs(Sha256);

impl Inputs {
    /// Adds a named value.
    pub fn text(mut self, name: &str, value: &str) -> Self {
        self.0.update((name.len() as u64).to_le_bytes());
        self.0.update(name.as_bytes());
        self.0.update((value.len() as u64).to_le_bytes());
        self.0.update(value.as_bytes());
        self
    }

    /// Adds a file's contents (absent files count as a distinct value).
    pub fn file(mut self, name: &str, path: &Path) -> Result<Self> {
        self.0.update(name.as_bytes());
        match fs::read(path) {
            Ok(bytes) => {
                self.0.update(b"present");
                self.0.update(Sha256::digest(&bytes));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => self.0.update(b"absent"),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
        Ok(self)
    }

    fn hex(self) -> String {
        self.0
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

fn stamp_path(artifact: &Path) -> PathBuf {
    let mut name = artifact.file_name().unwrap_or_default().to_os_string();
    name.push(".stamp");
    artifact.with_file_name(name)
}

/// Builds `artifact` with `build` unless it exists and its inputs are unchanged. `build` must
/// write the artifact completely; the stamp is written after it. Returns whether it was built.
pub fn build_if_changed(
    artifact: &Path,
    inputs: Inputs,
    build: impl FnOnce(&Path) -> Result<()>,
) -> Result<bool> {
    let hash = inputs.hex();
    let stamp = stamp_path(artifact);
    if artifact.exists() && fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == hash) {
        return Ok(false);
    }
    if let Some(dir) = artifact.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = fs::remove_file(&stamp);
    // Build under a temporary name and rename, so an interrupted build never looks finished.
    let mut tmp_name = artifact.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = artifact.with_file_name(tmp_name);
    let _ = fs::remove_file(&tmp);
    build(&tmp)?;
    fs::rename(&tmp, artifact).with_context(|| format!("renaming to {}", artifact.display()))?;
    fs::write(&stamp, hash).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebuilds_only_when_inputs_change() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let artifact = dir.join("out.img");
        let input = dir.join("input");
        fs::write(&input, "one").unwrap();
        let build = |out: &Path| Ok(fs::write(out, "built")?);
        let inputs = || {
            Inputs::default()
                .text("k", "v")
                .file("input", &input)
                .unwrap()
        };

        assert!(build_if_changed(&artifact, inputs(), build).unwrap());
        assert!(!build_if_changed(&artifact, inputs(), build).unwrap());
        fs::write(&input, "two").unwrap();
        assert!(build_if_changed(&artifact, inputs(), build).unwrap());
        fs::remove_file(&artifact).unwrap();
        assert!(build_if_changed(&artifact, inputs(), build).unwrap());

        // A failed build leaves no artifact and no stamp.
        fs::write(&input, "three").unwrap();
        let failed = build_if_changed(&artifact, inputs(), |_| anyhow::bail!("no"));
        assert!(failed.is_err());
        assert!(!artifact.exists() || !stamp_path(&artifact).exists());
        assert!(build_if_changed(&artifact, inputs(), build).unwrap());
    }
}
