//! Why a VMM ended, written by `ditto-vmm run --exit-file PATH` as it exits, so that a
//! supervisor that is not its parent (and cannot `wait` for it) learns the reason. A VMM that
//! is killed writes nothing: a missing file after the process is gone means it did not end by
//! itself.

use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// How many of the guest's last console lines an exit record keeps.
pub const CONSOLE_LINES: usize = 40;

/// The contents of the exit file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// True for a normal end (exit status 0): the guest powered off or rebooted, or the VMM
    /// was asked to end. A guest crash (triple fault, kernel panic) or a failed vCPU is not.
    pub clean: bool,
    /// What happened, for a person.
    pub reason: String,
    /// The kind of end ([`crate::vmm::ExitReason::kind`]; `vmm_error` when the VMM itself
    /// failed); empty in records of older VMMs.
    #[serde(default)]
    pub kind: String,
    /// The guest's last console lines (at most [`CONSOLE_LINES`]).
    #[serde(default)]
    pub console_tail: Vec<String>,
}

impl ExitRecord {
    /// Writes the record to `path`, replacing it atomically.
    pub fn write(&self, path: &Path) -> io::Result<()> {
        let json = serde_json::to_vec(self).map_err(io::Error::other)?;
        crate::atomic_file::write(path, &json)
    }

    /// Reads the record at `path`; `Ok(None)` when there is none.
    pub fn read(path: &Path) -> io::Result<Option<Self>> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ExitRecord;

    #[test]
    fn round_trips_and_a_missing_file_is_none() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("exit.json");
        assert_eq!(ExitRecord::read(&path).expect("read"), None);
        let record = ExitRecord {
            clean: false,
            reason: "a vCPU failed: boom".into(),
            kind: "vcpu_failed".into(),
            console_tail: vec!["[ 1.0] last words".into()],
        };
        record.write(&path).expect("write");
        assert_eq!(ExitRecord::read(&path).expect("read"), Some(record));
        // A record of an older VMM has neither kind nor console.
        std::fs::write(&path, br#"{"clean":true,"reason":"the guest powered off"}"#)
            .expect("old record");
        let old = ExitRecord::read(&path).expect("read").expect("a record");
        assert!(old.clean && old.kind.is_empty() && old.console_tail.is_empty());
        std::fs::write(&path, b"{not json").expect("garble");
        assert!(ExitRecord::read(&path).is_err());
    }
}
