//! Running one program in the guest for the host: arguments, environment and stdin in;
//! stdout, stderr and exit status out; killed at a time limit. Output is capped so that a
//! chatty program cannot exhaust the agent's memory.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

/// Time limit when the request names none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest time limit accepted.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// Bytes of stdout and of stderr kept; the rest is read and dropped.
pub const OUTPUT_CAP: usize = 16 << 20;

/// What can go wrong while running a program.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// No program was named.
    #[error("no program given")]
    NoProgram,
    /// The program could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// Waiting for the program failed.
    #[error("waiting for {program}: {source}")]
    Wait {
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
}

/// A program to run.
#[derive(Clone, Debug, Default)]
pub struct ExecRequest {
    /// Path or name (looked up on PATH).
    pub program: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Extra environment variables.
    pub env: HashMap<String, String>,
    /// Bytes written to its stdin, which is then closed.
    pub stdin: Vec<u8>,
    /// Time limit (`None`: [`DEFAULT_TIMEOUT`]; capped at [`MAX_TIMEOUT`]).
    pub timeout: Option<Duration>,
}

/// How it ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecOutcome {
    /// Exit status, or -1 when a signal ended it.
    pub exit_code: i32,
    /// The signal that ended it, 0 if none.
    pub signal: i32,
    /// Its stdout (at most [`OUTPUT_CAP`] bytes).
    pub stdout: Vec<u8>,
    /// Its stderr (at most [`OUTPUT_CAP`] bytes).
    pub stderr: Vec<u8>,
    /// It was killed at the time limit.
    pub timed_out: bool,
}

async fn read_capped(mut from: impl AsyncRead + Unpin) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let room = OUTPUT_CAP.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
    kept
}

/// Runs the program to its end or its time limit.
pub async fn run(request: ExecRequest) -> Result<ExecOutcome, ExecError> {
    if request.program.is_empty() {
        return Err(ExecError::NoProgram);
    }
    let timeout = request.timeout.unwrap_or(DEFAULT_TIMEOUT).min(MAX_TIMEOUT);
    let mut child = Command::new(&request.program)
        .args(&request.args)
        .envs(&request.env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own process group, so that the time limit kills what it started too.
        .process_group(0)
        .spawn()
        .map_err(|source| ExecError::Spawn {
            program: request.program.clone(),
            source,
        })?;
    let stdin = child.stdin.take();
    let input = request.stdin;
    let feed = tokio::spawn(async move {
        if let Some(mut stdin) = stdin {
            // A program that does not read its stdin is not an error.
            let _ = stdin.write_all(&input).await;
        }
    });
    let stdout = child.stdout.take().map(|s| tokio::spawn(read_capped(s)));
    let stderr = child.stderr.take().map(|s| tokio::spawn(read_capped(s)));

    let (status, timed_out) = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => (status, false),
        Err(_) => {
            if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
                // SAFETY: kill has no memory-safety preconditions; the group is the child's own
                // (process_group(0) above), and the child is not yet reaped, so its id is ours.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
            let _ = child.start_kill();
            (child.wait().await, true)
        }
    };
    let status = status.map_err(|source| ExecError::Wait {
        program: request.program.clone(),
        source,
    })?;
    feed.abort();
    let collect = |task: Option<tokio::task::JoinHandle<Vec<u8>>>| async move {
        match task {
            // Output pipes may be held open by the program's own children: don't wait forever.
            Some(task) => tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default(),
            None => Vec::new(),
        }
    };
    Ok(ExecOutcome {
        exit_code: status.code().unwrap_or(-1),
        signal: status.signal().unwrap_or(0),
        stdout: collect(stdout).await,
        stderr: collect(stderr).await,
        timed_out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_status_env_and_stdin_come_back() {
        let out = run(ExecRequest {
            program: "sh".into(),
            args: vec!["-c".into(), "cat; echo \"$GREETING\" >&2; exit 3".into()],
            env: [("GREETING".to_owned(), "hi".to_owned())].into(),
            stdin: b"input".to_vec(),
            timeout: None,
        })
        .await
        .unwrap();
        assert_eq!(out.stdout, b"input");
        assert_eq!(out.stderr, b"hi\n");
        assert_eq!((out.exit_code, out.signal, out.timed_out), (3, 0, false));
    }

    #[tokio::test]
    async fn the_time_limit_kills() {
        let started = std::time::Instant::now();
        let out = run(ExecRequest {
            program: "sleep".into(),
            args: vec!["30".into()],
            timeout: Some(Duration::from_millis(200)),
            ..ExecRequest::default()
        })
        .await
        .unwrap();
        assert!(out.timed_out);
        assert_eq!(out.signal, libc::SIGKILL);
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn the_time_limit_kills_what_the_program_started_too() {
        let started = std::time::Instant::now();
        let out = run(ExecRequest {
            program: "sh".into(),
            args: vec!["-c".into(), "sleep 30 & echo started; wait".into()],
            timeout: Some(Duration::from_millis(300)),
            ..ExecRequest::default()
        })
        .await
        .unwrap();
        assert!(out.timed_out);
        assert_eq!(out.stdout, b"started\n");
        // The background sleep held stdout open; killed with the group, it lets go at once.
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_missing_program_is_an_error() {
        let err = run(ExecRequest {
            program: "/nonexistent/program".into(),
            ..ExecRequest::default()
        })
        .await
        .unwrap_err();
        assert!(matches!(err, ExecError::Spawn { .. }));
    }
}
