//! Driving `ditto-workload` in a guest through the agent's Exec: shell commands, and the
//! workload's `verify --json` report.

use ditto_proto::agent::v1::ExecRequest;
use ditto_proto::agent::v1::agent_client::AgentClient;
use serde_json::Value;
use tonic::transport::Channel;

/// The workload binary in the guest image.
pub const WORKLOAD: &str = "/usr/bin/ditto-workload";
/// The control socket the tests give the workload.
pub const CONTROL: &str = "/run/workload.sock";

/// Runs `script` with the guest's `sh -c` (time limit 10 minutes); returns its exit code and
/// stdout, printing both streams when the code is not 0. Panics when the agent fails or the
/// script times out.
pub async fn sh(agent: &mut AgentClient<Channel>, script: &str) -> (i32, String) {
    match try_sh(agent, script).await {
        Ok(r) => r,
        Err(status) => panic!("exec of {script:?}: {status:?}"),
    }
}

/// [`sh`], with the agent's failure returned instead of a panic (so the caller can add what it
/// knows, such as the guest's console).
pub async fn try_sh(
    agent: &mut AgentClient<Channel>,
    script: &str,
) -> Result<(i32, String), tonic::Status> {
    let reply = agent
        .exec(ExecRequest {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            timeout_ms: 600_000,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(!reply.timed_out, "{script}: timed out: {reply:?}");
    let stdout = String::from_utf8_lossy(&reply.stdout).into_owned();
    if reply.exit_code != 0 {
        println!(
            "{script}: exit {}\nstdout:\n{stdout}\nstderr:\n{}",
            reply.exit_code,
            String::from_utf8_lossy(&reply.stderr)
        );
    }
    Ok((reply.exit_code, stdout))
}

/// The shell command of [`verify`].
pub fn verify_command() -> String {
    format!("{WORKLOAD} verify --json --control {CONTROL}")
}

/// `ditto-workload verify --json` in the guest: the exit code and the report.
pub async fn verify(agent: &mut AgentClient<Channel>) -> (i32, Value) {
    let (code, out) = sh(agent, &verify_command()).await;
    let report = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    (code, report)
}

/// A count in a report; panics when it is not one.
pub fn count(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}
