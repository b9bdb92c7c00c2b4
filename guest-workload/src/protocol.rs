//! The control protocol of a running workload, spoken over its Unix socket.
//!
//! One request per connection. The client sends one line of text (at most
//! [`MAX_REQUEST_LEN`] bytes, ending in `\n`):
//!
//! | request | what the workload does |
//! | --- | --- |
//! | `status` | answers with [`Status`] at once (nothing is checked) |
//! | `verify` | checks every page of its anonymous memory against the pattern and reads every file it wrote back from disk, answers with [`VerifyReport`] |
//! | `stop` | answers `{"stopping":{"heartbeats":N}}`, removes the socket and exits with status 0 |
//! | `corrupt-page N` | debugging aid for tests: flips one bit in the middle of anonymous page `N` and answers `{"corrupted":{"page":N,"offset":2048}}`, so that a test can prove the next `verify` names that page |
//!
//! The workload answers with one line of JSON, the [`Reply`] enum in serde's externally tagged
//! form — `{"status":{…}}`, `{"verify":{…}}`, `{"stopping":{…}}`, `{"corrupted":{…}}` or
//! `{"error":{"message":"…"}}` — and closes the connection. Requests are served one at a time,
//! in the order they arrive; a client that sends nothing for 5 s is dropped.

use serde::{Deserialize, Serialize};

/// The longest request line accepted, in bytes.
pub const MAX_REQUEST_LEN: usize = 256;
/// The longest reply line a client accepts, in bytes.
pub const MAX_REPLY_LEN: usize = 1 << 20;

/// A request that could not be understood.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// An unknown or malformed request line.
    #[error("unknown request {0:?} (expected status, verify, stop or corrupt-page N)")]
    UnknownRequest(String),
}

/// A request to a running workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// What it is doing (cheap).
    Status,
    /// Check all memory and files.
    Verify,
    /// Exit.
    Stop,
    /// Flip one bit of this anonymous page (debugging aid for tests).
    CorruptPage(u64),
}

impl Request {
    /// Parses one request line (without or with its newline).
    pub fn parse(line: &str) -> Result<Self, ProtocolError> {
        let unknown = || ProtocolError::UnknownRequest(line.trim_end().to_string());
        let mut words = line.split_ascii_whitespace();
        let request = match words.next() {
            Some("status") => Self::Status,
            Some("verify") => Self::Verify,
            Some("stop") => Self::Stop,
            Some("corrupt-page") => {
                let page = words
                    .next()
                    .and_then(|w| w.parse().ok())
                    .ok_or_else(unknown)?;
                Self::CorruptPage(page)
            }
            _ => return Err(unknown()),
        };
        match words.next() {
            None => Ok(request),
            Some(_) => Err(unknown()),
        }
    }

    /// The request as a line, newline included.
    pub fn line(&self) -> String {
        match self {
            Self::Status => "status\n".into(),
            Self::Verify => "verify\n".into(),
            Self::Stop => "stop\n".into(),
            Self::CorruptPage(page) => format!("corrupt-page {page}\n"),
        }
    }
}

/// The workload's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// To `status`.
    Status(Status),
    /// To `verify`.
    Verify(VerifyReport),
    /// To `stop`: the workload exits after this reply.
    Stopping {
        /// The heartbeat count when it stopped.
        heartbeats: u64,
    },
    /// To `corrupt-page`.
    Corrupted {
        /// The page.
        page: u64,
        /// The byte whose lowest bit was flipped, from the start of the page.
        offset: usize,
    },
    /// The request failed.
    Error {
        /// Why.
        message: String,
    },
}

/// The files the workload wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilesInfo {
    /// The folder.
    pub dir: String,
    /// How many.
    pub count: u64,
    /// Their total size.
    pub bytes: u64,
}

/// What reading `--read` folders did at start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageCacheInfo {
    /// The folders.
    pub dirs: Vec<String>,
    /// Regular files read.
    pub files: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Files or folders that could not be read.
    pub errors: u64,
    /// The first of those errors.
    pub first_error: Option<String>,
}

/// A running workload's state; nothing is checked to produce it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Its process id.
    pub pid: u32,
    /// Milliseconds since it started (its own monotonic clock).
    pub uptime_ms: u64,
    /// Heartbeats so far: one every [`HEARTBEAT_MS`](crate::workload::HEARTBEAT_MS) while it
    /// runs.
    pub heartbeats: u64,
    /// The seed of its content.
    pub seed: u64,
    /// Anonymous memory in MiB.
    pub anon_mib: u64,
    /// Anonymous memory in 4 KiB pages.
    pub anon_pages: u64,
    /// The files it wrote, if any.
    pub files: Option<FilesInfo>,
    /// The folders it read at start, if any.
    pub page_cache: Option<PageCacheInfo>,
    /// Milliseconds from start until it served its socket (fill, write, read).
    pub setup_ms: u64,
    /// `verify` requests served.
    pub verifies: u64,
    /// Pages the heartbeat re-checked and re-wrote.
    pub touched_pages: u64,
    /// Pages the heartbeat found wrong (left as they were, for `verify` to report).
    pub touch_bad_pages: u64,
}

/// The anonymous memory part of a verification.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryReport {
    /// Pages compared with the pattern.
    pub pages_checked: u64,
    /// Bytes compared.
    pub bytes_checked: u64,
    /// Pages that differ.
    pub bad_pages: u64,
    /// The lowest indices of the pages that differ (at most 16).
    pub first_bad_pages: Vec<u64>,
    /// Microseconds the memory check took.
    pub elapsed_us: u64,
}

/// A file that failed its check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadFile {
    /// Its path.
    pub path: String,
    /// What is wrong.
    pub problem: String,
}

/// The files part of a verification.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilesReport {
    /// Files read back.
    pub checked: u64,
    /// Bytes read back.
    pub bytes_read: u64,
    /// Files that failed.
    pub bad: u64,
    /// The first files that failed (at most 16), with what is wrong.
    pub bad_files: Vec<BadFile>,
    /// Microseconds the file check took.
    pub elapsed_us: u64,
}

/// The result of `verify`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// True when every page and every file matched.
    pub ok: bool,
    /// The workload's process id.
    pub pid: u32,
    /// Milliseconds since it started.
    pub uptime_ms: u64,
    /// Its heartbeat count now.
    pub heartbeats: u64,
    /// Its heartbeat count at the previous `verify` (`None` for the first): a test compares
    /// the two to prove the process kept running in between, e.g. across a pause or a restore.
    pub previous_heartbeats: Option<u64>,
    /// The anonymous memory.
    pub memory: MemoryReport,
    /// The files.
    pub files: FilesReport,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_junk_is_refused() {
        for request in [
            Request::Status,
            Request::Verify,
            Request::Stop,
            Request::CorruptPage(0),
            Request::CorruptPage(u64::MAX),
        ] {
            assert_eq!(Request::parse(&request.line()), Ok(request));
        }
        assert_eq!(Request::parse("  verify \r\n"), Ok(Request::Verify));
        for junk in [
            "",
            "\n",
            "VERIFY",
            "verify now",
            "corrupt-page",
            "corrupt-page -1",
            "corrupt-page 1 2",
            "corrupt-page 99999999999999999999",
        ] {
            assert!(Request::parse(junk).is_err(), "{junk:?}");
        }
    }

    #[test]
    fn replies_are_one_json_line_in_the_documented_shape() {
        let reply = Reply::Corrupted {
            page: 5,
            offset: 2048,
        };
        let line = serde_json::to_string(&reply).unwrap();
        assert_eq!(line, r#"{"corrupted":{"page":5,"offset":2048}}"#);
        assert_eq!(serde_json::from_str::<Reply>(&line).unwrap(), reply);
        let error = serde_json::to_string(&Reply::Error {
            message: "no".into(),
        })
        .unwrap();
        assert_eq!(error, r#"{"error":{"message":"no"}}"#);
    }
}
