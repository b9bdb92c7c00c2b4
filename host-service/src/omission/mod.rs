//! Which pages a checkpoint may leave out, and why the others are saved.
//!
//! A `ditto` checkpoint arms the VM's write tracking, asks the guest agent which frames hold
//! clean page cache ([`report`]), asks the balloon driver which frames are free, pauses, and then
//! [`decide`]s page by page: a reported page is stored as a reference to its drive block only
//! if it passes every check of ARCHITECTURE.md (inside guest RAM, its range inside a known drive,
//! aligned, claimed once, not written by the guest, the VMM or the disk since the tracking was
//! armed, and, by [`Verification`] policy, equal to the disk's bytes ([`verify`])). A hinted free
//! page nothing wrote since is stored as free. Everything else is saved. Each refusal is counted
//! by its reason in the [`OmissionReport`], and any failure of the ditto path is said there
//! too: it yields a checkpoint that saved those pages, never a wrong one.

pub mod decide;
pub mod report;
pub mod verify;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Which pages a checkpoint stores.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Every page: saved, or marked zero when it is all zero.
    #[default]
    Full,
    /// Zero pages and hinted free pages omitted; page cache saved.
    FreeOnly,
    /// Free pages and verified clean page cache omitted.
    Ditto,
}

impl Mode {
    /// Whether the mode uses the balloon's free-page hints.
    pub fn omits_free(self) -> bool {
        matches!(self, Self::FreeOnly | Self::Ditto)
    }

    /// Whether the mode asks the agent for page cache.
    pub fn omits_cache(self) -> bool {
        self == Self::Ditto
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Full => "full",
            Self::FreeOnly => "free-only",
            Self::Ditto => "ditto",
        })
    }
}

/// How much of the agent's report is compared with the disk before pages are omitted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Verification {
    /// The dirty log alone (the restore still checks every page's hash).
    #[default]
    DirtyLog,
    /// Also compare a random share of the reported pages, in percent (1 to 100).
    Sample(u8),
    /// Compare every reported page.
    Full,
}

impl std::fmt::Display for Verification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::DirtyLog => f.write_str("dirty-log"),
            Self::Sample(p) => write!(f, "sample={p}%"),
            Self::Full => f.write_str("full"),
        }
    }
}

impl std::str::FromStr for Verification {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "dirty-log" => Ok(Self::DirtyLog),
            "full" => Ok(Self::Full),
            _ => {
                let percent = s
                    .strip_prefix("sample=")
                    .map(|p| p.strip_suffix('%').unwrap_or(p))
                    .ok_or_else(|| {
                        format!("{s:?} is not a verification policy (dirty-log, sample=N%, full)")
                    })?;
                match percent.parse::<u8>() {
                    Ok(p @ 1..=100) => Ok(Self::Sample(p)),
                    _ => Err(format!("sample={percent}: the share must be 1 to 100 %")),
                }
            }
        }
    }
}

/// What a `ditto` or `free-only` checkpoint found, omitted and refused.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct OmissionReport {
    /// Clean page-cache pages the agent reported.
    pub pages_reported_cache: u64,
    /// Free pages the balloon driver hinted.
    pub pages_hinted_free: u64,
    /// Pages stored as drive references.
    pub pages_omitted_cache: u64,
    /// Pages stored as free.
    pub pages_omitted_free: u64,
    /// Reported or hinted pages the guest wrote since tracking was armed.
    pub rejected_guest_write: u64,
    /// Reported or hinted pages the VMM's devices wrote since then.
    pub rejected_vmm_write: u64,
    /// Reported pages whose disk blocks were written since then.
    pub rejected_disk_write: u64,
    /// Reported pages of extents that failed validation.
    pub rejected_validation: u64,
    /// Reported pages saved because content verification distrusted the report.
    pub rejected_verification: u64,
    /// Pages whose bytes were compared with the disk.
    pub pages_verified: u64,
    /// Compared pages that differed.
    pub pages_mismatched: u64,
    /// The agent's scan, in microseconds.
    pub scan_us: u64,
    /// The balloon's free-page round, in microseconds.
    pub hint_us: u64,
    /// Why part of the ditto path was not used; empty when all of it was.
    pub degraded: Vec<String>,
    /// The guest's frames by kind, from the agent's census of /proc/kpageflags.
    pub guest_frames: BTreeMap<String, u64>,
    /// How the agent found the pages, from its scan summary: `walk` or `kpageblock` (`other`
    /// for anything else the guest said); empty without a scan.
    pub scan_method: String,
}

impl OmissionReport {
    /// Notes that part of the ditto path was not used, and logs it.
    pub fn degrade(&mut self, why: impl Into<String>) {
        let why = why.into();
        tracing::warn!(reason = %why, "checkpoint: saving pages instead of omitting them");
        self.degraded.push(why);
    }
}

/// A duration in whole microseconds, saturated.
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verification_policies_parse_and_print() {
        for (text, policy) in [
            ("dirty-log", Verification::DirtyLog),
            ("full", Verification::Full),
            ("sample=5%", Verification::Sample(5)),
            ("sample=100%", Verification::Sample(100)),
        ] {
            assert_eq!(text.parse::<Verification>(), Ok(policy));
            assert_eq!(policy.to_string(), text);
        }
        assert_eq!("sample=7".parse(), Ok(Verification::Sample(7)));
        for bad in ["", "sample=0%", "sample=101%", "sample=x", "some"] {
            assert!(bad.parse::<Verification>().is_err(), "{bad}");
        }
    }
}
