//! Runs Linux guests under ditto's own VMM (`ditto-vmm` from `$PATH`, or the library) inside
//! the KVM test box: writable copies of the root image, the VMM process with its console in a
//! file, waiting for console text, and a gRPC channel to the guest agent through the hybrid
//! vsock socket or through a `ConnectVsock` tunnel of the VMM's control socket.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use ditto_host::control::VmmClient;
use ditto_host::vmm::config::{Console, DEFAULT_CMDLINE, VmConfig, parse_drive};
use ditto_proto::agent::v1::agent_client::AgentClient;
use tonic::transport::Channel;

use crate::microvm::{GuestKernel, guest_kernel, images_dir};
use crate::workload::{sh, try_sh};

pub use ditto_host::agent::AGENT_PORT;
/// The command line every test guest gets before its own part (`init_on_alloc=0` so that free
/// pages the balloon hints are not written by the guest's allocator; see
/// `ditto_host::vmm::config::DEFAULT_CMDLINE`).
pub const BASE_CMDLINE: &str = "console=ttyS0 quiet panic=-1 pci=off init_on_alloc=0 root=/dev/vda";

/// Copies the image at `src` to `dst`, leaving all-zero MiBs as holes (the test images are
/// mostly empty, and the box keeps `/tmp` in RAM).
pub fn sparse_copy(src: &Path, dst: &Path) -> std::io::Result<()> {
    let mut from = File::open(src)?;
    let len = from.metadata()?.len();
    let mut to = File::create(dst)?;
    to.set_len(len)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < len {
        let n = from.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|b| *b != 0) {
            to.seek(SeekFrom::Start(at))?;
            to.write_all(&buf[..n])?;
        }
        at += n as u64;
    }
    to.sync_all()
}

/// Why [`VmmProcess::try_wait_for`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    /// The VMM ended before the console showed the text.
    #[error("ditto-vmm ended ({status}) before {needle:?}; console:\n{transcript}")]
    Ended {
        /// The awaited text.
        needle: String,
        /// How the VMM ended.
        status: ExitStatus,
        /// The console and the VMM's standard error.
        transcript: String,
    },
    /// The text did not come in time.
    #[error("no {needle:?} within {timeout:?}; console:\n{transcript}")]
    TimedOut {
        /// The awaited text.
        needle: String,
        /// How long it waited.
        timeout: Duration,
        /// The console and the VMM's standard error.
        transcript: String,
    },
}

/// A VM for [`ditto_host::vmm::Vmm::build`] in this process: the guest images of `images` with
/// the kernel [`guest_kernel`] chooses, the read-only root image, `/bin/sh -c SCRIPT` as init (the script must not contain a double
/// quote), the console in the file `console`, and the default devices (a balloon, no vsock).
pub fn shell_guest_config(
    images: &Path,
    console: &Path,
    vcpus: u8,
    mem_mib: u64,
    script: &str,
) -> VmConfig {
    let root = format!("id=root,path={},ro", images.join("rootfs.ext4").display());
    let GuestKernel { kernel, initrd, .. } = guest_kernel(images);
    VmConfig {
        kernel,
        initrd,
        cmdline: format!(
            "{DEFAULT_CMDLINE} quiet root=/dev/vda ro init=/bin/sh -- -c \"{script}\""
        ),
        virtio_mmio_cmdline: false,
        vcpus,
        mem_mib,
        drives: vec![parse_drive(&root).expect("the root drive parses")],
        vsock: None,
        balloon: true,
        console: Console::File(console.to_owned()),
    }
}

/// A `ditto-vmm run` process, killed when dropped.
pub struct VmmProcess {
    child: Child,
    /// The serial console file.
    pub console: PathBuf,
    /// The VMM's standard error.
    pub stderr: PathBuf,
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl VmmProcess {
    /// Starts `ditto-vmm run` with the guest images of `images` and the kernel [`guest_kernel`]
    /// chooses, the root disk given as a `--drive` value, console in `dir/console.log`, standard error in `dir/vmm.stderr` and
    /// `extra` arguments.
    pub fn spawn(images: &Path, root: &str, dir: &Path, cmdline: &str, extra: &[&str]) -> Self {
        Self::spawn_kernel(&guest_kernel(images), root, dir, cmdline, extra)
    }

    /// [`Self::spawn`] with the kernel `kernel` (for tests about one kernel in particular).
    pub fn spawn_kernel(
        kernel: &GuestKernel,
        root: &str,
        dir: &Path,
        cmdline: &str,
        extra: &[&str],
    ) -> Self {
        let mut command = Command::new("ditto-vmm");
        command.arg("run").args(kernel.args());
        command
            .arg("--cmdline")
            .arg(format!("{BASE_CMDLINE} {cmdline}"))
            .arg("--drive")
            .arg(root);
        Self::start(command, dir, extra)
    }

    /// Starts `ditto-vmm restore --from checkpoint` with console and standard error in `dir`
    /// as [`Self::spawn`] does, and `extra` arguments.
    pub fn restore(checkpoint: &Path, dir: &Path, extra: &[&str]) -> Self {
        let mut command = Command::new("ditto-vmm");
        command.arg("restore").arg("--from").arg(checkpoint);
        Self::start(command, dir, extra)
    }

    fn start(mut command: Command, dir: &Path, extra: &[&str]) -> Self {
        let console = dir.join("console.log");
        let stderr = dir.join("vmm.stderr");
        let stderr_file = File::create(&stderr).expect("create the VMM's stderr file");
        let child = command
            .arg("--console")
            .arg(&console)
            .args(extra)
            .stdin(Stdio::null())
            .stderr(stderr_file)
            .spawn()
            .expect("start ditto-vmm (is it on PATH?)");
        Self {
            child,
            console,
            stderr,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The console so far.
    pub fn console_text(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// The console so far, followed by what the VMM wrote to standard error (for failure
    /// messages).
    pub fn transcript(&self) -> String {
        let console = self.console_text();
        let stderr = self.stderr_text();
        if stderr.is_empty() {
            console
        } else {
            format!("{console}\n--- ditto-vmm stderr ---\n{stderr}")
        }
    }

    /// What the VMM wrote to standard error so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until the console contains `needle`; panics with the console after `timeout` or
    /// when the VMM ends first.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Duration {
        self.try_wait_for(needle, timeout)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Self::wait_for`], with the failure (and the console) returned instead of a panic.
    pub fn try_wait_for(&mut self, needle: &str, timeout: Duration) -> Result<Duration, WaitError> {
        let start = Instant::now();
        loop {
            if self.console_text().contains(needle) {
                return Ok(start.elapsed());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(WaitError::Ended {
                    needle: needle.to_owned(),
                    status,
                    transcript: self.transcript(),
                });
            }
            if start.elapsed() >= timeout {
                return Err(WaitError::TimedOut {
                    needle: needle.to_owned(),
                    timeout,
                    transcript: self.transcript(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// How the VMM ended, or `None` while it runs.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the VMM to end.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                start.elapsed() < timeout,
                "ditto-vmm still running after {timeout:?}; console:\n{}",
                self.transcript()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A guest of the test image booted to a serving agent by [`spawn_agent_guest`].
pub struct AgentGuest {
    /// The VMM process.
    pub vmm: VmmProcess,
    /// The guest's own writable copy of the root image.
    pub root: PathBuf,
    /// The hybrid vsock socket.
    pub uds: PathBuf,
    /// The VMM's control socket.
    pub control: PathBuf,
    /// From the VMM's start until the console said the agent serves.
    pub boot: Duration,
}

/// Boots the image in `images` with `vcpus` and `mem_mib` on a writable copy of its root disk
/// (mounted `rw`), vsock context id 3, and the hybrid vsock socket, the control socket and the
/// console in `dir`; waits at most `timeout` for the agent to serve.
pub fn spawn_agent_guest(
    images: &Path,
    dir: &Path,
    vcpus: u8,
    mem_mib: u64,
    timeout: Duration,
) -> AgentGuest {
    let root = dir.join("rootfs.ext4");
    sparse_copy(&images.join("rootfs.ext4"), &root).expect("root copy");
    let uds = dir.join("vsock.sock");
    let control = dir.join("control.sock");
    let path = |p: &Path| p.to_str().expect("UTF-8 path").to_owned();
    let mut vmm = VmmProcess::spawn(
        images,
        &format!("id=root,path={}", root.display()),
        dir,
        "rw",
        &[
            "--vcpus",
            &vcpus.to_string(),
            "--mem-mib",
            &mem_mib.to_string(),
            "--vsock-cid",
            "3",
            "--vsock-uds",
            &path(&uds),
            "--control",
            &path(&control),
        ],
    );
    let boot = vmm.wait_for("ditto-agent serving", timeout);
    AgentGuest {
        vmm,
        root,
        uds,
        control,
        boot,
    }
}

/// A gRPC client of the guest agent, connected through the hybrid vsock socket `uds`
/// (`CONNECT <port>` then `OK`); panics when the agent cannot be reached.
pub async fn agent_over_hybrid_vsock(uds: PathBuf, port: u32) -> AgentClient<Channel> {
    ditto_host::agent::connect(&uds, port, Duration::from_secs(10))
        .await
        .expect("agent channel over the hybrid vsock socket")
}

/// A gRPC client of the guest agent whose one connection is a `ConnectVsock` tunnel through
/// the VMM's control socket `control` (not the hybrid vsock socket); panics when the tunnel
/// cannot be opened.
pub async fn agent_over_control_tunnel(control: PathBuf, port: u32) -> AgentClient<Channel> {
    let channel = tonic::transport::Endpoint::from_static("http://guest-agent")
        .connect_timeout(Duration::from_secs(10))
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let control = control.clone();
            async move {
                let client = ditto_host::control::VmmClient::connect(&control)
                    .await
                    .map_err(std::io::Error::other)?;
                let stream = client
                    .connect_vsock(port)
                    .await
                    .map_err(std::io::Error::other)?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .expect("agent channel through the control socket's ConnectVsock tunnel");
    AgentClient::new(channel).max_decoding_message_size(ditto_host::agent::MAX_REPLY_BYTES)
}
/// The guest's uptime in seconds.
pub async fn uptime(agent: &mut AgentClient<Channel>) -> f64 {
    let (code, out) = sh(agent, "cat /proc/uptime").await;
    assert_eq!(code, 0);
    out.split_whitespace()
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("not an uptime: {out:?}"))
}

/// A VMM process with its vsock socket and control socket, for tests that checkpoint and
/// restore.
pub struct TestVm {
    /// The process.
    pub process: VmmProcess,
    /// The hybrid vsock socket.
    pub uds: PathBuf,
    /// The control socket.
    pub control: PathBuf,
}

impl TestVm {
    /// The sockets of a VM in `dir` and the arguments that give them to ditto-vmm with `cid`.
    fn sockets(dir: &Path, cid: u32) -> (PathBuf, PathBuf, Vec<String>) {
        crate::scenario::socket_args(dir, cid)
    }

    /// Boots the image on `root` with a vsock `cid` and `mem_mib` of RAM, one vCPU.
    pub fn boot(dir: &Path, root: &Path, cid: u32, mem_mib: u64) -> Self {
        Self::boot_with_cmdline(dir, root, cid, mem_mib, "rw")
    }

    /// [`TestVm::boot`] with `cmdline` after [`BASE_CMDLINE`] (which `boot` gives `rw`).
    pub fn boot_with_cmdline(
        dir: &Path,
        root: &Path,
        cid: u32,
        mem_mib: u64,
        cmdline: &str,
    ) -> Self {
        Self::boot_smp(dir, root, cid, mem_mib, 1, cmdline)
    }

    /// [`TestVm::boot_with_cmdline`] with `vcpus` vCPUs.
    pub fn boot_smp(
        dir: &Path,
        root: &Path,
        cid: u32,
        mem_mib: u64,
        vcpus: u8,
        cmdline: &str,
    ) -> Self {
        let kernel = guest_kernel(&images_dir().unwrap_or_else(|e| panic!("{e}")));
        Self::boot_kernel_smp(&kernel, dir, root, cid, mem_mib, vcpus, cmdline)
    }

    /// [`TestVm::boot_with_cmdline`] with the kernel `kernel` (for tests about one kernel in
    /// particular).
    pub fn boot_kernel(
        kernel: &GuestKernel,
        dir: &Path,
        root: &Path,
        cid: u32,
        mem_mib: u64,
        cmdline: &str,
    ) -> Self {
        Self::boot_kernel_smp(kernel, dir, root, cid, mem_mib, 1, cmdline)
    }

    /// [`TestVm::boot_kernel`] with `vcpus` vCPUs.
    fn boot_kernel_smp(
        kernel: &GuestKernel,
        dir: &Path,
        root: &Path,
        cid: u32,
        mem_mib: u64,
        vcpus: u8,
        cmdline: &str,
    ) -> Self {
        let (uds, control, mut args) = Self::sockets(dir, cid);
        args.extend([
            "--vcpus".into(),
            vcpus.to_string(),
            "--mem-mib".into(),
            mem_mib.to_string(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let process = VmmProcess::spawn_kernel(
            kernel,
            &format!("id=root,path={}", root.display()),
            dir,
            cmdline,
            &args,
        );
        Self {
            process,
            uds,
            control,
        }
    }

    /// Restores `checkpoint` with a new vsock `cid`, and its root disk at `root` (`None`: the
    /// image the checkpointed VM had).
    pub fn restore(checkpoint: &Path, dir: &Path, root: Option<&Path>, cid: u32) -> Self {
        let (uds, control, mut args) = Self::sockets(dir, cid);
        if let Some(root) = root {
            args.extend(["--drive".into(), format!("id=root,path={}", root.display())]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let process = VmmProcess::restore(checkpoint, dir, &args);
        Self {
            process,
            uds,
            control,
        }
    }

    /// The control client, once the VMM serves its socket.
    pub async fn control(&self) -> VmmClient {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match VmmClient::connect(&self.control).await {
                Ok(c) => return c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("control socket: {e}\n{}", self.process.transcript()),
            }
        }
    }

    /// Ends the VM through its control socket and waits for the VMM to exit cleanly; a VMM that
    /// is already gone (its guest crashed) or ends uncleanly fails the test with its exit
    /// status, console and log.
    pub async fn shutdown(&mut self, control: &VmmClient) {
        if let Err(e) = control.shutdown().await {
            let state = match self.process.try_exit_status() {
                Some(status) => format!("it had ended: {status}"),
                None => "it still runs".to_owned(),
            };
            panic!(
                "the VMM's shutdown failed: {e}; {state}\n{}",
                self.process.transcript()
            );
        }
        let status = self.process.wait_exit(Duration::from_secs(60));
        assert!(
            status.success(),
            "the VMM ended with {status} after its shutdown\n{}",
            self.process.transcript()
        );
    }

    /// The guest agent, once the VMM serves its control socket (a restore fills memory
    /// first).
    pub async fn agent(&self) -> AgentClient<Channel> {
        self.control().await;
        agent_over_hybrid_vsock(self.uds.clone(), AGENT_PORT).await
    }

    /// [`TestVm::sh`] for a script that may run twice: when the connection to the agent breaks
    /// (a transport error, not an error status from the agent), this says so with the console
    /// and the VMM's log (the evidence of why), connects to the agent again and runs the script
    /// once more. For callers that check the agent itself
    /// separately (its process id), since a new connection would also reach a restarted agent.
    pub async fn sh_reconnecting(
        &self,
        agent: &mut AgentClient<Channel>,
        script: &str,
    ) -> (i32, String) {
        match try_sh(agent, script).await {
            Ok(r) => r,
            // A transport failure carries its cause; an answer of the agent's does not, and is
            // the test's failure as in [`TestVm::sh`].
            Err(status) if std::error::Error::source(&status).is_none() => {
                self.agent_failed(script, &status)
            }
            Err(status) => {
                println!(
                    "the connection to the agent broke ({status:?}); connecting again. \
                     Console and VMM log:\n{}\n--- end of the console and VMM log ---",
                    self.process.transcript()
                );
                *agent = self.agent().await;
                self.sh(agent, script).await
            }
        }
    }

    /// [`sh`] through `agent`, this VM's agent: when the agent fails (a broken connection, an
    /// agent that died), the panic shows this VM's console and the VMM's log, which say why.
    pub async fn sh(&self, agent: &mut AgentClient<Channel>, script: &str) -> (i32, String) {
        try_sh(agent, script)
            .await
            .unwrap_or_else(|status| self.agent_failed(script, &status))
    }

    /// Panics for an exec of `script` that failed with `status`, with this VM's console and
    /// the VMM's log.
    fn agent_failed(&self, script: &str, status: &tonic::Status) -> ! {
        panic!(
            "exec of {script:?}: {status:?}\n{}",
            self.process.transcript()
        )
    }
}
