//! Measured checkpoint scenarios for `ditto-demo` and `ditto-bench`: boot a guest of the test
//! image under `ditto-vmm`, start `ditto-workload` (and any extra guest script) in it, take
//! checkpoints of the running VM by [`Mode`] with its root disk copied while it is paused,
//! restore each in a new `ditto-vmm restore` process on that copy, verify the workload there,
//! and turn the results into [`Measurement`]s, a printed table and JSON records.
//!
//! The driving parts need a real KVM (the KVM test box); the formatting parts
//! ([`floor_bytes`], [`Measurement::json`], [`table`], [`targets`]) are pure and unit-tested.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ditto_host::control::{
    AfterCheckpoint, CheckpointResult, CheckpointSpec, ClientError, VmmClient,
};
use ditto_host::omission::{Mode, OmissionReport};
use ditto_proto::agent::v1::agent_client::AgentClient;
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::vmm::{AGENT_PORT, VmmProcess, WaitError, sparse_copy};
use crate::workload::{CONTROL, WORKLOAD, try_sh};

/// Bytes of a guest page.
pub const PAGE_BYTES: u64 = 4096;

/// How long a guest may take to boot to a serving agent (software emulation is slow).
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a restored VMM may take to serve its control socket (it fills memory first).
const RESTORE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the agent's scan may take in a checkpoint.
const SCAN_TIMEOUT: Duration = Duration::from_secs(300);
/// How many times the first exec in a restored guest is tried.
const FIRST_EXEC_TRIES: u32 = 5;
/// How many times `status --wait` (one exec each) is retried while the workload sets up.
const SETUP_POLLS: u32 = 6;

/// What can go wrong while driving a scenario.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// File I/O on the host side (disk copies, folders).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The guest did not come up (or the VMM ended).
    #[error("boot: {0}")]
    Boot(#[from] WaitError),
    /// The VMM's control socket failed or refused.
    #[error("{what}: {source}\n{transcript}")]
    Control {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: ClientError,
        /// The VMM's console and standard error.
        transcript: String,
    },
    /// The guest agent's Exec failed.
    #[error("exec of {script:?}: {status}\n{transcript}")]
    Exec {
        /// The guest shell script.
        script: String,
        /// The agent's failure.
        status: Box<tonic::Status>,
        /// The VMM's console and standard error.
        transcript: String,
    },
    /// A guest script exited non-zero.
    #[error("guest script {script:?} exited with {code}: {stdout}")]
    Script {
        /// The guest shell script.
        script: String,
        /// Its exit code.
        code: i32,
        /// Its standard output.
        stdout: String,
    },
    /// The VM or the workload did something the scenario cannot go on from.
    #[error("{0}")]
    Unexpected(String),
}

type Result<T> = std::result::Result<T, ScenarioError>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ScenarioError {
    let what = what.into();
    move |source| ScenarioError::Io { what, source }
}

/// A VMM process with its folder and sockets.
pub struct Vm {
    /// The `ditto-vmm` process (killed when dropped).
    pub process: VmmProcess,
    /// The hybrid vsock socket.
    pub uds: PathBuf,
    /// The control socket.
    pub control: PathBuf,
    /// The root disk image the VM runs on.
    pub root: PathBuf,
}

/// The hybrid vsock and control sockets of a VM in `dir`, and the `ditto-vmm` arguments that
/// give them to it with vsock context id `cid`.
pub fn socket_args(dir: &Path, cid: u32) -> (PathBuf, PathBuf, Vec<String>) {
    let (uds, control) = (dir.join("vsock.sock"), dir.join("control.sock"));
    let args = vec![
        "--vsock-cid".to_owned(),
        cid.to_string(),
        "--vsock-uds".to_owned(),
        uds.display().to_string(),
        "--control".to_owned(),
        control.display().to_string(),
    ];
    (uds, control, args)
}

impl Vm {
    /// Boots the guest images of `images` with `mem_mib` MiB and `vcpus` on a writable copy of
    /// their root disk in `dir`, vsock context id `cid`; returns once the agent serves.
    pub fn boot(images: &Path, dir: &Path, mem_mib: u64, vcpus: u8, cid: u32) -> Result<Self> {
        let root = dir.join("rootfs.ext4");
        sparse_copy(&images.join("rootfs.ext4"), &root).map_err(io("copying the root disk"))?;
        let (uds, control, mut args) = socket_args(dir, cid);
        args.extend([
            "--vcpus".into(),
            vcpus.to_string(),
            "--mem-mib".into(),
            mem_mib.to_string(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut process = VmmProcess::spawn(
            images,
            &format!("id=root,path={}", root.display()),
            dir,
            "rw",
            &args,
        );
        process.try_wait_for("ditto-agent serving", BOOT_TIMEOUT)?;
        Ok(Self {
            process,
            uds,
            control,
            root,
        })
    }

    /// Starts `ditto-vmm restore` of `checkpoint` on the root disk `root`, sockets in `dir`,
    /// vsock context id `cid`.
    pub fn restore(checkpoint: &Path, root: &Path, dir: &Path, cid: u32) -> Self {
        let (uds, control, mut args) = socket_args(dir, cid);
        args.extend(["--drive".into(), format!("id=root,path={}", root.display())]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self {
            process: VmmProcess::restore(checkpoint, dir, &args),
            uds,
            control,
            root: root.to_owned(),
        }
    }

    /// A client of the control socket, waiting up to `timeout` for the VMM to serve it.
    pub async fn control(&self, timeout: Duration) -> Result<VmmClient> {
        let deadline = Instant::now() + timeout;
        loop {
            match VmmClient::connect(&self.control).await {
                Ok(client) => return Ok(client),
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(source) => return Err(self.control_error("control socket", source)),
            }
        }
    }

    fn control_error(&self, what: &str, source: ClientError) -> ScenarioError {
        ScenarioError::Control {
            what: what.to_owned(),
            source,
            transcript: self.process.transcript(),
        }
    }

    /// The guest agent through the hybrid vsock socket.
    pub async fn agent(&self) -> Result<AgentClient<Channel>> {
        ditto_host::agent::connect(&self.uds, AGENT_PORT, Duration::from_secs(30))
            .await
            .map_err(|e| ScenarioError::Unexpected(format!("the guest agent: {e}")))
    }

    /// Runs `script` with the guest's shell: its exit code and standard output.
    pub async fn exec(
        &self,
        agent: &mut AgentClient<Channel>,
        script: &str,
    ) -> Result<(i32, String)> {
        try_sh(agent, script)
            .await
            .map_err(|status| ScenarioError::Exec {
                script: script.to_owned(),
                status: Box::new(status),
                transcript: self.process.transcript(),
            })
    }

    /// Runs `script` with the guest's shell; its standard output, or an error when it fails.
    pub async fn sh(&self, agent: &mut AgentClient<Channel>, script: &str) -> Result<String> {
        let (code, stdout) = self.exec(agent, script).await?;
        if code != 0 {
            return Err(ScenarioError::Script {
                script: script.to_owned(),
                code,
                stdout,
            });
        }
        Ok(stdout)
    }
}

/// A guest workload: `ditto-workload run` with these sizes, then an optional shell script.
#[derive(Clone, Debug)]
pub struct WorkloadPlan {
    /// Its name in tables and records.
    pub name: String,
    /// Anonymous memory, MiB.
    pub anon_mib: u64,
    /// Files the workload writes (fsynced, so they stay as clean page cache).
    pub file_count: u64,
    /// Their total size, MiB.
    pub file_mib: u64,
    /// A guest shell script run once the workload is set up (churn), if any.
    pub extra: Option<String>,
}

impl WorkloadPlan {
    /// Starts the workload in the guest and waits until it is set up, then runs the extra
    /// script and flushes the guest's dirty pages (`sync`).
    pub async fn start(&self, vm: &Vm, agent: &mut AgentClient<Channel>) -> Result<()> {
        let dir = format!("/data/{}", self.name);
        vm.sh(
            agent,
            &format!(
                "mkdir -p {dir} && setsid {WORKLOAD} run --anon-mib {anon} --seed 7 \
                 --control {CONTROL} --files {dir} --file-count {count} --file-mib {mib} \
                 </dev/null >/run/workload.log 2>&1 &",
                anon = self.anon_mib,
                count = self.file_count,
                mib = self.file_mib,
            ),
        )
        .await?;
        let status = format!("{WORKLOAD} status --wait 500 --control {CONTROL}");
        let mut ready = vm.sh(agent, &status).await;
        for _ in 1..SETUP_POLLS {
            if ready.is_ok() {
                break;
            }
            ready = vm.sh(agent, &status).await;
        }
        ready?;
        if let Some(script) = &self.extra {
            vm.sh(agent, script).await?;
        }
        vm.sh(agent, "sync").await?;
        Ok(())
    }
}

/// `ditto-workload verify` in the guest: whether every page and file checked out.
pub async fn verify(vm: &Vm, agent: &mut AgentClient<Channel>) -> Result<bool> {
    let script = format!("{WORKLOAD} verify --json --control {CONTROL}");
    let (code, out) = vm.exec(agent, &script).await?;
    let report: Value = serde_json::from_str(&out)
        .map_err(|e| ScenarioError::Unexpected(format!("verify printed no report ({e}): {out}")))?;
    Ok(code == 0 && report["ok"] == true)
}

/// How a restore went.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RestoreOutcome {
    /// From opening the checkpoint to the vCPUs running, in the restoring VMM, ms.
    pub restore_ms: f64,
    /// The restored workload verified every page and file.
    pub verified: bool,
}

/// One checkpoint of one workload, and its restore.
#[derive(Clone, Debug, PartialEq)]
pub struct Measurement {
    /// The workload's name.
    pub workload: String,
    /// The checkpoint's mode.
    pub mode: Mode,
    /// Bytes the saved pages take in the file.
    pub stored_bytes: u64,
    /// How long the guest was paused for the checkpoint (including the disk copy), ms.
    pub checkpoint_ms: f64,
    /// Of that, the copy of the root disk, ms.
    pub drive_copy_ms: f64,
    /// The restore, if one was made.
    pub restore: Option<RestoreOutcome>,
    /// Bytes no checkpoint can avoid for this workload (see [`floor_bytes`]).
    pub floor_bytes: Option<u64>,
    /// What the checkpoint omitted and refused (free-only and ditto).
    pub omission: Option<OmissionReport>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The bytes no checkpoint method can avoid: every guest frame that is neither free nor clean
/// page cache, from the agent's census (`total`, `free`, `file_clean` in pages). `None` when
/// the census lacks a count or does not add up.
pub fn floor_bytes(guest_frames: &BTreeMap<String, u64>) -> Option<u64> {
    let get = |k: &str| guest_frames.get(k).copied();
    let omittable = get("free")?.checked_add(get("file_clean")?)?;
    get("total")?
        .checked_sub(omittable)?
        .checked_mul(PAGE_BYTES)
}

impl Measurement {
    /// The measurement of a checkpoint `result` of `workload` in `mode`, restored as
    /// `restore` said.
    pub fn new(
        workload: &str,
        mode: Mode,
        result: &CheckpointResult,
        restore: Option<RestoreOutcome>,
    ) -> Self {
        Self {
            workload: workload.to_owned(),
            mode,
            stored_bytes: result.stored_bytes,
            checkpoint_ms: ms(result.pause),
            drive_copy_ms: ms(result.drive_copy),
            restore,
            floor_bytes: result
                .omission
                .as_ref()
                .and_then(|o| floor_bytes(&o.guest_frames)),
            omission: result.omission.clone(),
        }
    }

    /// The record `ditto-bench --json` writes: exactly `workload`, `mode`, `stored_bytes`,
    /// `checkpoint_ms`, `restore_ms`, `floor_bytes`, `verified` (null for what was not
    /// measured; `verified` is false when no restore was made).
    pub fn json(&self) -> Value {
        json!({
            "workload": self.workload,
            "mode": self.mode.to_string(),
            "stored_bytes": self.stored_bytes,
            "checkpoint_ms": round1(self.checkpoint_ms),
            "restore_ms": self.restore.map(|r| round1(r.restore_ms)),
            "floor_bytes": self.floor_bytes,
            "verified": self.restore.is_some_and(|r| r.verified),
        })
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Sets each workload's floor, taken from its ditto checkpoint's census, on all its
/// measurements (the floor belongs to the workload, not to the mode).
pub fn share_floors(rows: &mut [Measurement]) {
    let floors: BTreeMap<String, u64> = rows
        .iter()
        .filter(|r| r.mode == Mode::Ditto)
        .filter_map(|r| Some((r.workload.clone(), r.floor_bytes?)))
        .collect();
    for row in rows {
        row.floor_bytes = floors.get(&row.workload).copied();
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / f64::from(1 << 20))
}

fn percent(part: f64, whole: f64) -> Option<f64> {
    (whole > 0.0).then(|| part / whole * 100.0)
}

fn full_of<'a>(rows: &'a [Measurement], workload: &str) -> Option<&'a Measurement> {
    rows.iter()
        .find(|r| r.workload == workload && r.mode == Mode::Full)
}

/// The table of `rows`: per measurement its stored MiB and share of the same workload's full
/// checkpoint, pause (and disk copy in it) and share of full's, restore time and whether the
/// restored workload verified, pages omitted as cache and as free, refused pages by reason, the
/// floor, and what degraded.
pub fn table(rows: &[Measurement]) -> String {
    let headers = [
        "workload",
        "mode",
        "stored MiB",
        "vs full",
        "pause ms",
        "copy ms",
        "vs full",
        "restore ms",
        "verified",
        "cache pg",
        "free pg",
        "rejected g/v/d/val/ver",
        "floor MiB",
    ];
    let mut cells: Vec<Vec<String>> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    for r in rows {
        let full = full_of(rows, &r.workload);
        let share = |part: f64, whole: Option<f64>| {
            whole
                .and_then(|w| percent(part, w))
                .map_or_else(|| "-".to_owned(), |p| format!("{p:.1} %"))
        };
        let o = r.omission.as_ref();
        let count =
            |f: fn(&OmissionReport) -> u64| o.map_or_else(|| "-".into(), |o| f(o).to_string());
        let rejected = o.map_or_else(
            || "-".to_owned(),
            |o| {
                format!(
                    "{}/{}/{}/{}/{}",
                    o.rejected_guest_write,
                    o.rejected_vmm_write,
                    o.rejected_disk_write,
                    o.rejected_validation,
                    o.rejected_verification
                )
            },
        );
        cells.push(vec![
            r.workload.clone(),
            r.mode.to_string(),
            mib(r.stored_bytes),
            share(r.stored_bytes as f64, full.map(|f| f.stored_bytes as f64)),
            format!("{:.0}", r.checkpoint_ms),
            format!("{:.0}", r.drive_copy_ms),
            share(r.checkpoint_ms, full.map(|f| f.checkpoint_ms)),
            r.restore
                .map_or_else(|| "-".into(), |x| format!("{:.0}", x.restore_ms)),
            r.restore.map_or_else(
                || "-".into(),
                |x| if x.verified { "yes" } else { "NO" }.into(),
            ),
            count(|o| o.pages_omitted_cache),
            count(|o| o.pages_omitted_free),
            rejected,
            r.floor_bytes.map_or_else(|| "-".into(), mib),
        ]);
        for why in o.map(|o| o.degraded.as_slice()).unwrap_or_default() {
            let note = format!("{}/{}: degraded: {why}", r.workload, r.mode);
            if !notes.contains(&note) {
                notes.push(note);
            }
        }
    }
    let mut out = render(&headers, &cells);
    out.push_str(
        "(pause includes the copy of the root disk; rejected: guest write / VMM write / disk \
         write / validation / verification)\n",
    );
    for note in notes {
        out.push_str(&note);
        out.push('\n');
    }
    out
}

/// Columns right-aligned under their headers.
fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let parts: Vec<String> = cells
            .zip(&widths)
            .map(|(c, w)| format!("{c:>w$}"))
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(&mut out, &mut headers.iter().copied());
    for row in rows {
        line(&mut out, &mut row.iter().map(String::as_str));
    }
    out
}

/// The benchmark's targets, one line each with the measured value and whether it was met:
/// the read-heavy workload's ditto checkpoint stores at most 10 % of full's bytes and pauses
/// at most 25 % of full's time; for every workload, ditto's restore takes at most 1.1 × full's
/// and ditto stores within 5 % of the floor.
pub fn targets(rows: &[Measurement], read_heavy: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let mut workloads: Vec<&str> = Vec::new();
    for r in rows {
        if !workloads.contains(&r.workload.as_str()) {
            workloads.push(&r.workload);
        }
    }
    for w in workloads {
        let (Some(full), Some(ditto)) = (
            full_of(rows, w),
            rows.iter()
                .find(|r| r.workload == w && r.mode == Mode::Ditto),
        ) else {
            continue;
        };
        if w == read_heavy {
            if let Some(p) = percent(ditto.stored_bytes as f64, full.stored_bytes as f64) {
                lines.push(format!(
                    "{w}: ditto stores {p:.1} % of full (target <= 10 %): {}",
                    verdict(p <= 10.0)
                ));
            }
            if let Some(p) = percent(ditto.checkpoint_ms, full.checkpoint_ms) {
                lines.push(format!(
                    "{w}: ditto checkpoints in {p:.1} % of full's time (target <= 25 %): {}",
                    verdict(p <= 25.0)
                ));
            }
        }
        if let (Some(d), Some(f)) = (ditto.restore, full.restore)
            && f.restore_ms > 0.0
        {
            let x = d.restore_ms / f.restore_ms;
            lines.push(format!(
                "{w}: ditto restore {x:.2} x full's (target <= 1.1 x): {}",
                verdict(x <= 1.1)
            ));
        }
        if let Some(floor) = ditto.floor_bytes.filter(|f| *f > 0) {
            let over = (ditto.stored_bytes as f64 / floor as f64 - 1.0) * 100.0;
            lines.push(format!(
                "{w}: ditto stores {} MiB, floor {} MiB ({over:+.1} %; target within 5 %): {}",
                mib(ditto.stored_bytes),
                mib(floor),
                verdict(over.abs() <= 5.0)
            ));
        }
    }
    lines
}

/// A running guest with a workload, checkpointed and restored mode by mode in `dir`.
pub struct Scenario {
    /// The running original VM.
    pub vm: Vm,
    /// Its control client.
    pub control: VmmClient,
    /// The folder for checkpoints, disk copies and restored VMs.
    pub dir: PathBuf,
    next_cid: u32,
}

impl Scenario {
    /// Boots a guest with `mem_mib` MiB in `dir` and starts `plan` in it.
    pub async fn start(
        images: &Path,
        dir: &Path,
        mem_mib: u64,
        plan: &WorkloadPlan,
    ) -> Result<Self> {
        let vm_dir = dir.join("original");
        std::fs::create_dir_all(&vm_dir).map_err(io("creating the VM's folder"))?;
        let booted = Instant::now();
        let vm = Vm::boot(images, &vm_dir, mem_mib, 1, 3)?;
        println!(
            "{}: booted a {mem_mib} MiB guest in {:.1} s; starting the workload",
            plan.name,
            booted.elapsed().as_secs_f64()
        );
        let mut agent = vm.agent().await?;
        let set_up = Instant::now();
        plan.start(&vm, &mut agent).await?;
        println!(
            "{}: workload ready in {:.1} s",
            plan.name,
            set_up.elapsed().as_secs_f64()
        );
        let control = vm.control(Duration::from_secs(60)).await?;
        Ok(Self {
            vm,
            control,
            dir: dir.to_owned(),
            next_cid: 4,
        })
    }

    /// Checkpoints the running VM in `mode` (its root disk copied while paused) and, when
    /// `restore` is set, restores it in a new VMM on that copy and verifies the workload there.
    /// The checkpoint and the copy are removed afterwards.
    pub async fn measure(
        &mut self,
        workload: &str,
        mode: Mode,
        restore: bool,
    ) -> Result<Measurement> {
        self.measure_through(workload, mode, restore, None).await
    }

    /// [`Self::measure`] with the agent on vsock port `agent_port` (`None`: the default
    /// agent), e.g. a second agent forced to one scan method.
    pub async fn measure_through(
        &mut self,
        workload: &str,
        mode: Mode,
        restore: bool,
        agent_port: Option<u32>,
    ) -> Result<Measurement> {
        let file = self.dir.join(format!("{mode}.ditto"));
        let disk = self.dir.join(format!("{mode}-root.ext4"));
        for stale in [&file, &disk] {
            let _ = std::fs::remove_file(stale);
        }
        let result = self
            .control
            .checkpoint(CheckpointSpec {
                path: file.clone(),
                after: AfterCheckpoint::Resume,
                mode,
                scan_timeout: Some(SCAN_TIMEOUT),
                agent_port,
                drive_copies: vec![("root".into(), disk.clone())],
                ..Default::default()
            })
            .await
            .map_err(|e| self.vm.control_error(&format!("{mode} checkpoint"), e))?;
        println!(
            "{workload}: {mode} checkpoint: {} MiB stored, paused {:.0} ms",
            mib(result.stored_bytes),
            ms(result.pause)
        );
        let outcome = if restore {
            Some(self.restore(&file, &disk, mode).await?)
        } else {
            None
        };
        for done in [&file, &disk] {
            std::fs::remove_file(done).map_err(io(format!("removing {}", done.display())))?;
        }
        Ok(Measurement::new(workload, mode, &result, outcome))
    }

    async fn restore(&mut self, file: &Path, disk: &Path, mode: Mode) -> Result<RestoreOutcome> {
        let dir = self.dir.join(format!("restored-{mode}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io("creating the restore's folder"))?;
        let cid = self.next_cid;
        self.next_cid += 1;
        let vm = Vm::restore(file, disk, &dir, cid);
        let control = vm.control(RESTORE_TIMEOUT).await?;
        let status = control
            .status()
            .await
            .map_err(|e| vm.control_error("status of the restored VM", e))?;
        let restored = status.restored.ok_or_else(|| {
            ScenarioError::Unexpected("the restored VMM does not say it was restored".into())
        })?;
        // The guest's agent reconnects after the transport reset: give it a few tries.
        let mut attempt = 1;
        let verified = loop {
            let checked = match vm.agent().await {
                Ok(mut agent) => verify(&vm, &mut agent).await,
                Err(e) => Err(e),
            };
            match checked {
                Ok(verified) => break verified,
                Err(e) if attempt >= FIRST_EXEC_TRIES => return Err(e),
                Err(e) => println!("{mode}: restored guest not answering yet ({e}); retrying"),
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_secs(2)).await;
        };
        if !verified {
            println!(
                "{mode}: the restored workload did NOT verify; console:\n{}",
                vm.process.transcript()
            );
        }
        drop(vm);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(RestoreOutcome {
            restore_ms: ms(restored.total),
            verified,
        })
    }
}

/// The exit status of a demo or benchmark program `name` whose run ended with `outcome`
/// (whether every restored workload verified), saying why when it is not success.
pub fn exit_status<E: std::fmt::Display>(
    name: &str,
    outcome: std::result::Result<bool, E>,
) -> std::process::ExitCode {
    match outcome {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("{name}: a restored workload did not verify");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{name}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Writes `rows` as a JSON array of [`Measurement::json`] records to `path`.
pub fn write_json(path: &Path, rows: &[Measurement]) -> Result<()> {
    let records: Vec<Value> = rows.iter().map(Measurement::json).collect();
    let mut text = serde_json::to_string_pretty(&Value::Array(records))
        .map_err(|e| ScenarioError::Unexpected(format!("JSON: {e}")))?;
    text.push('\n');
    std::fs::write(path, text).map_err(io(format!("writing {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    fn row(workload: &str, mode: Mode, stored: u64, pause: f64, restore: f64) -> Measurement {
        Measurement {
            workload: workload.into(),
            mode,
            stored_bytes: stored,
            checkpoint_ms: pause,
            drive_copy_ms: 1.0,
            restore: Some(RestoreOutcome {
                restore_ms: restore,
                verified: true,
            }),
            floor_bytes: None,
            omission: (mode != Mode::Full).then(|| OmissionReport {
                pages_omitted_cache: 100,
                degraded: vec!["no balloon device".into()],
                guest_frames: frames(&[("total", 1000), ("free", 200), ("file_clean", 700)]),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn the_floor_is_what_is_neither_free_nor_clean_cache() {
        let f = frames(&[
            ("total", 1000),
            ("free", 200),
            ("file_clean", 700),
            ("anon", 50),
        ]);
        assert_eq!(floor_bytes(&f), Some(100 * PAGE_BYTES));
        assert_eq!(floor_bytes(&frames(&[("total", 10), ("free", 2)])), None);
        let inconsistent = frames(&[("total", 10), ("free", 8), ("file_clean", 8)]);
        assert_eq!(floor_bytes(&inconsistent), None);
    }

    #[test]
    fn json_records_have_exactly_the_fields() {
        let r = row("read-heavy", Mode::Ditto, 4096, 12.34, 56.78);
        let v = r.json();
        let mut keys: Vec<&str> = v
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "checkpoint_ms",
                "floor_bytes",
                "mode",
                "restore_ms",
                "stored_bytes",
                "verified",
                "workload"
            ]
        );
        assert_eq!(v["mode"], "ditto");
        assert_eq!(v["checkpoint_ms"], 12.3);
        assert_eq!(v["restore_ms"], 56.8);
        assert_eq!(v["verified"], true);
        let unrestored = Measurement {
            restore: None,
            ..row("x", Mode::Full, 1, 1.0, 1.0)
        };
        assert_eq!(unrestored.json()["verified"], false);
        assert!(unrestored.json()["restore_ms"].is_null());
    }

    #[test]
    fn floors_are_shared_and_the_table_compares_with_full() {
        let mut rows = vec![
            row("read-heavy", Mode::Full, 1000 << 20, 1000.0, 500.0),
            row("read-heavy", Mode::Ditto, 50 << 20, 200.0, 520.0),
        ];
        rows[1].floor_bytes = Some(48 << 20);
        share_floors(&mut rows);
        assert_eq!(rows[0].floor_bytes, Some(48 << 20));
        let text = table(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("stored MiB"), "{text}");
        assert!(lines[1].contains("100.0 %"), "{text}");
        assert!(
            lines[2].contains("5.0 %") && lines[2].contains("20.0 %"),
            "{text}"
        );
        assert!(lines[2].contains("0/0/0/0/0"), "{text}");
        assert!(
            text.contains("read-heavy/ditto: degraded: no balloon device"),
            "{text}"
        );
        // Every row has the header's width.
        assert_eq!(lines[0].len(), lines[1].len(), "{text}");
        let t = targets(&rows, "read-heavy");
        assert_eq!(t.len(), 4, "{t:?}");
        assert!(t[0].contains("5.0 %") && t[0].ends_with(": met"), "{t:?}");
        assert!(t[1].contains("20.0 %") && t[1].ends_with(": met"), "{t:?}");
        assert!(t[2].contains("1.04 x") && t[2].ends_with(": met"), "{t:?}");
        assert!(t[3].contains("+4.2 %") && t[3].ends_with(": met"), "{t:?}");
    }
}
