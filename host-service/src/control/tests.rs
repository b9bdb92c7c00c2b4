//! The control endpoint end to end over a real Unix socket in a temporary directory: the real
//! server and client against an in-memory VMM whose vsock ports are real Unix socket pairs.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ditto_proto::vmm::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;
use tonic::Code;

use super::*;
use crate::omission::{Mode, OmissionReport};

/// A guest port that echoes everything until end of file, then closes.
const ECHO_PORT: u32 = 1024;
/// A guest port that sends a greeting, closes its sending side, then collects what it reads.
const GREETER_PORT: u32 = 1025;
/// A guest port that accepts and then says nothing until the client leaves.
const SILENT_PORT: u32 = 1026;
const GREETING: &[u8] = b"hello from the guest";

/// An in-memory VMM: a state machine and vsock ports served by threads.
struct FakeVmm {
    state: Mutex<VmState>,
    has_vsock: bool,
    shutdown_requested: Notify,
    /// What the greeter port read, sent when its connection ends.
    greeter_heard: Mutex<Option<std::sync::mpsc::Sender<Vec<u8>>>>,
}

impl FakeVmm {
    fn new(has_vsock: bool) -> Self {
        Self {
            state: Mutex::new(VmState::Running),
            has_vsock,
            shutdown_requested: Notify::new(),
            greeter_heard: Mutex::new(None),
        }
    }

    fn transition(
        &self,
        op: &'static str,
        from: VmState,
        to: VmState,
    ) -> Result<VmState, VmmError> {
        let mut state = self.state.lock().unwrap();
        if *state != from {
            return Err(VmmError::WrongState { op, state: *state });
        }
        *state = to;
        Ok(to)
    }
}

impl VmmHandle for FakeVmm {
    fn status(&self) -> VmStatus {
        VmStatus {
            state: *self.state.lock().unwrap(),
            vcpus: 2,
            mem_mib: 512,
            uptime: Duration::from_millis(90_061),
            vsock: self.has_vsock.then(|| VsockInfo {
                guest_cid: 3,
                uds_path: Some("/run/ditto/vm1/vsock.sock".into()),
            }),
            drives: vec![
                DriveInfo {
                    id: "root".into(),
                    path: "/var/lib/ditto/vm1/root.ext4".into(),
                    read_only: false,
                },
                DriveInfo {
                    id: "seed".into(),
                    path: "/var/lib/ditto/seed.img".into(),
                    read_only: true,
                },
            ],
            pid: 4242,
            restored: Some(RestoreInfo {
                checkpoint: "/var/lib/ditto/checkpoints/c1/checkpoint.ditto".into(),
                memory: Duration::from_micros(1_500),
                disk: Duration::from_micros(20),
                total: Duration::from_micros(9_000),
                pages_saved: 10,
                pages_zero: 20,
                pages_disk: 30,
            }),
        }
    }

    /// Accepts a destination in an existing folder; a stop ends the VM.
    fn checkpoint(&self, spec: CheckpointSpec) -> Result<CheckpointResult, VmmError> {
        if !spec.path.parent().is_some_and(std::path::Path::is_dir) {
            return Err(VmmError::InvalidArgument(format!(
                "{}: no such folder",
                spec.path.display()
            )));
        }
        let mut state = self.state.lock().unwrap();
        if spec.after == AfterCheckpoint::Stop {
            *state = VmState::Stopped;
        }
        Ok(CheckpointResult {
            path: spec.path,
            file_bytes: 4096 * 3,
            stored_bytes: if spec.uncompressed { 8192 } else { 100 },
            pages_saved: 2,
            pages_zero: 5,
            pages_free: 0,
            pages_disk: 0,
            pause: Duration::from_micros(1234),
            total: Duration::from_micros(5678),
            state: *state,
            omission: (spec.mode != Mode::Full).then(|| OmissionReport {
                pages_omitted_cache: 9,
                ..Default::default()
            }),
            drive_copy_bytes: 0,
            drive_copy: Duration::ZERO,
        })
    }

    fn pause(&self) -> Result<VmState, VmmError> {
        self.transition("pause", VmState::Running, VmState::Paused)
    }

    fn resume(&self) -> Result<VmState, VmmError> {
        self.transition("resume", VmState::Paused, VmState::Running)
    }

    fn shutdown(&self) {
        *self.state.lock().unwrap() = VmState::ShuttingDown;
        self.shutdown_requested.notify_one();
    }

    fn connect_vsock(&self, port: u32) -> Result<UnixStream, VmmError> {
        if !self.has_vsock {
            return Err(VmmError::NoVsock);
        }
        let (host, mut guest) = UnixStream::pair().map_err(|e| VmmError::Failed(e.to_string()))?;
        match port {
            ECHO_PORT => {
                std::thread::spawn(move || {
                    let mut reader = guest.try_clone().unwrap();
                    std::io::copy(&mut reader, &mut guest).unwrap();
                    guest.shutdown(std::net::Shutdown::Write).unwrap();
                });
            }
            GREETER_PORT => {
                let heard = self.greeter_heard.lock().unwrap().take();
                std::thread::spawn(move || {
                    guest.write_all(GREETING).unwrap();
                    guest.shutdown(std::net::Shutdown::Write).unwrap();
                    let mut got = Vec::new();
                    guest.read_to_end(&mut got).unwrap();
                    if let Some(heard) = heard {
                        heard.send(got).unwrap();
                    }
                });
            }
            SILENT_PORT => {
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    let _ = guest.read_to_end(&mut got);
                });
            }
            _ => {
                return Err(VmmError::PortUnreachable {
                    port,
                    source: std::io::ErrorKind::ConnectionRefused.into(),
                });
            }
        }
        Ok(host)
    }
}

/// A VMM served on a socket in a temporary directory; `stop` fires the shutdown future.
struct Served {
    dir: tempfile::TempDir,
    path: PathBuf,
    vmm: Arc<FakeVmm>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<(), ServeError>>,
}

impl Served {
    async fn client(&self) -> VmmClient {
        VmmClient::connect(&self.path).await.unwrap()
    }

    /// A tunnel to `port` of the guest, over a connection of its own.
    async fn tunnel(&self, port: u32) -> Result<VsockStream, ClientError> {
        self.client().await.connect_vsock(port).await
    }

    /// Fires the shutdown future and waits for the server to end.
    async fn stop(mut self) {
        drop(self.stop.take());
        tokio::time::timeout(Duration::from_secs(10), self.server)
            .await
            .expect("the server ends")
            .unwrap()
            .unwrap();
        assert!(!self.path.exists(), "the socket file is removed");
        drop(self.dir);
    }
}

fn serve_fake(dir: tempfile::TempDir, vmm: FakeVmm) -> Served {
    let path = dir.path().join("vmm.sock");
    let vmm = Arc::new(vmm);
    let (stop, stopped) = oneshot::channel::<()>();
    let socket = ControlSocket::bind(&path).unwrap();
    let server = tokio::spawn(socket.serve(vmm.clone(), async {
        let _ = stopped.await;
    }));
    Served {
        dir,
        path,
        vmm,
        stop: Some(stop),
        server,
    }
}

fn start(has_vsock: bool) -> Served {
    serve_fake(tempfile::tempdir().unwrap(), FakeVmm::new(has_vsock))
}

#[tokio::test]
async fn status_fields_round_trip() {
    for has_vsock in [true, false] {
        let served = start(has_vsock);
        let status = served.client().await.status().await.unwrap();
        assert_eq!(status, served.vmm.status());
        assert_eq!(status.vsock.is_some(), has_vsock);
        served.stop().await;
    }
}

#[tokio::test]
async fn pause_and_resume_follow_the_state_machine() {
    let served = start(true);
    let client = served.client().await;

    let paused = client.pause().await.unwrap();
    assert_eq!(paused.state, VmState::Paused);
    assert!(paused.elapsed < Duration::from_secs(1));
    assert_eq!(client.status().await.unwrap().state, VmState::Paused);

    let again = client.pause().await.unwrap_err();
    assert_eq!(again.code(), Some(Code::FailedPrecondition), "{again}");
    assert!(again.to_string().contains("paused"), "{again}");

    assert_eq!(client.resume().await.unwrap().state, VmState::Running);
    let again = client.resume().await.unwrap_err();
    assert_eq!(again.code(), Some(Code::FailedPrecondition), "{again}");
    assert_eq!(client.status().await.unwrap().state, VmState::Running);
    served.stop().await;
}

#[tokio::test]
async fn shutdown_reaches_the_handle_and_the_server_ends_with_its_future() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vmm.sock");
    let vmm = Arc::new(FakeVmm::new(true));
    let requested = vmm.clone();
    let server = tokio::spawn({
        let (path, vmm) = (path.clone(), vmm.clone());
        async move {
            let shutdown = requested.shutdown_requested.notified();
            serve(&path, vmm, shutdown).await
        }
    });
    // `serve` binds when first polled.
    let client = loop {
        match VmmClient::connect(&path).await {
            Ok(client) => break client,
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    client.shutdown().await.unwrap();
    assert_eq!(*vmm.state.lock().unwrap(), VmState::ShuttingDown);
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server ends")
        .unwrap()
        .unwrap();
    assert!(!path.exists(), "the socket file is removed");
    assert!(VmmClient::connect(&path).await.is_err());
}

/// A pattern that does not repeat on any power-of-two period up to its length.
fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_u32;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x.to_le_bytes()[0]
        })
        .collect()
}

#[tokio::test]
async fn checkpoint_requests_and_results_cross_the_socket() {
    let served = start(true);
    let client = served.client().await;
    let path = served.dir.path().join("c1.ckpt");
    let result = client
        .checkpoint(CheckpointSpec {
            path: path.clone(),
            after: AfterCheckpoint::Resume,
            uncompressed: true,
            mode: Mode::Ditto,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(result.path, path);
    assert_eq!(
        result.omission.as_ref().map(|o| o.pages_omitted_cache),
        Some(9),
        "the omission report crosses the socket"
    );
    assert_eq!(
        (result.stored_bytes, result.pages_saved, result.pages_zero),
        (8192, 2, 5)
    );
    assert_eq!(result.pause, Duration::from_micros(1234));
    assert_eq!(result.state, VmState::Running);

    let missing = served.dir.path().join("nowhere").join("c.ckpt");
    let err = client
        .checkpoint(CheckpointSpec {
            path: missing,
            after: AfterCheckpoint::Resume,
            uncompressed: false,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");

    // The server refuses a relative path and an unset mode before the VMM sees them.
    let mut raw = pb::vmm_control_client::VmmControlClient::new(
        crate::unix_socket::channel(&served.path).await.unwrap(),
    );
    for bad in [
        pb::CheckpointRequest {
            path: "rel.ckpt".into(),
            mode: pb::CheckpointMode::Full.into(),
            ..Default::default()
        },
        pb::CheckpointRequest {
            path: "/tmp/x.ckpt".into(),
            ..Default::default()
        },
    ] {
        let status = raw.checkpoint(bad).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }

    let stopped = client
        .checkpoint(CheckpointSpec {
            path,
            after: AfterCheckpoint::Stop,
            uncompressed: false,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(stopped.state, VmState::Stopped);
    served.stop().await;
}

#[tokio::test]
async fn a_tunnel_echoes_megabytes_both_ways_and_passes_end_of_file() {
    let served = start(true);
    let tunnel = served.tunnel(ECHO_PORT).await.unwrap();
    let (mut read, mut write) = tokio::io::split(tunnel);
    let sent = pattern(3 * 1024 * 1024 + 17);
    let expected = sent.clone();
    let writer = tokio::spawn(async move {
        // Uneven writes, some larger than a tunnel message.
        for piece in sent.chunks(100_003) {
            write.write_all(piece).await.unwrap();
        }
        write.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), read.read_to_end(&mut got))
        .await
        .expect("the echo ends")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "the echo differs");
    served.stop().await;
}

#[tokio::test]
async fn the_guest_may_end_its_side_first_and_still_read() {
    let served = start(true);
    let (heard_tx, heard) = std::sync::mpsc::channel();
    *served.vmm.greeter_heard.lock().unwrap() = Some(heard_tx);
    let mut tunnel = served.tunnel(GREETER_PORT).await.unwrap();
    let mut greeting = Vec::new();
    tunnel.read_to_end(&mut greeting).await.unwrap();
    assert_eq!(greeting, GREETING);

    let sent = pattern(1024 * 1024 + 5);
    tunnel.write_all(&sent).await.unwrap();
    tunnel.shutdown().await.unwrap();
    let got = tokio::task::spawn_blocking(move || heard.recv_timeout(Duration::from_secs(30)))
        .await
        .unwrap()
        .expect("the guest reads to end of file");
    assert!(got == sent, "the guest read other bytes");
    served.stop().await;
}

#[tokio::test]
async fn a_refused_port_is_unavailable_and_no_vsock_a_failed_precondition() {
    let served = start(true);
    let err = served.tunnel(9).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    assert!(err.to_string().contains("port 9"), "{err}");
    served.stop().await;

    let served = start(false);
    let err = served.tunnel(ECHO_PORT).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    served.stop().await;
}

#[tokio::test]
async fn a_tunnel_must_name_the_port_first_and_then_send_only_data() {
    let served = start(true);
    let mut raw =
        pb::vmm_control_client::VmmControlClient::new(client::channel(&served.path).await.unwrap());
    let data = |d: &[u8]| pb::ConnectVsockRequest {
        body: Some(pb::connect_vsock_request::Body::Data(d.to_vec())),
    };
    let err = raw
        .connect_vsock(tokio_stream::iter([data(b"x")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");

    let port = |p| pb::ConnectVsockRequest {
        body: Some(pb::connect_vsock_request::Body::Port(p)),
    };
    // Port, data, a second port: the tunnel opens, then ends with INVALID_ARGUMENT.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(port(SILENT_PORT)).await.unwrap();
    let mut inbound = raw
        .connect_vsock(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(data(b"fine")).await.unwrap();
    tx.send(port(ECHO_PORT)).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), inbound.message())
        .await
        .expect("the tunnel ends")
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    served.stop().await;
}

#[tokio::test]
async fn stopping_the_server_ends_open_tunnels() {
    let served = start(true);
    let client = served.client().await;
    let mut tunnel = client.connect_vsock(SILENT_PORT).await.unwrap();
    let reading = tokio::spawn(async move {
        let mut buf = Vec::new();
        tunnel.read_to_end(&mut buf).await
    });
    served.stop().await;
    let err = reading.await.unwrap().unwrap_err();
    let status = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<tonic::Status>())
        .expect("the tunnel ends with a status");
    assert_eq!(status.code(), Code::Unavailable, "{status}");
}

#[tokio::test]
async fn a_stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vmm.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let served = serve_fake(dir, FakeVmm::new(true));
    assert_eq!(
        served.client().await.status().await.unwrap().pid,
        served.vmm.status().pid
    );
    served.stop().await;
}

#[tokio::test]
async fn a_live_socket_is_not_taken_over() {
    let served = start(true);
    let err = ControlSocket::bind(&served.path).unwrap_err();
    assert!(matches!(err, ServeError::InUse(_)), "{err}");
    // The first server still answers.
    served.client().await.status().await.unwrap();
    served.stop().await;
}

#[tokio::test]
async fn a_regular_file_at_the_path_is_an_error_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vmm.sock");
    std::fs::write(&path, b"not a socket").unwrap();
    let vmm: Arc<dyn VmmHandle> = Arc::new(FakeVmm::new(true));
    let err = serve(&path, vmm, std::future::ready(())).await.unwrap_err();
    assert!(
        matches!(err, ServeError::NotASocket(ref p) if *p == path),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
}

#[tokio::test]
async fn the_socket_is_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let served = start(true);
    let mode = std::fs::metadata(&served.path)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    served.stop().await;
}
