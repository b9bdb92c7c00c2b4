//! The Unix-socket host side end to end, without a VM: virtio-drivers' socket driver plays the
//! guest in this process (over our transport and guest memory in a host buffer, the glue of
//! `driver_tests`), host programs are real Unix sockets in a temporary directory, and the
//! backend runs on its own thread or is stepped by the test.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

use virtio_drivers::Error as DriverError;
use virtio_drivers::device::socket::{
    DisconnectReason, SocketError, VMADDR_CID_HOST, VirtIOSocket, VsockAddr,
    VsockConnectionManager, VsockEvent as DriverEvent, VsockEventType,
};

use super::*;
use crate::devices::virtio::driver_tests::{Counter, GuestHal, Regs, memory};
use crate::devices::virtio::vsock::muxer::{FIRST_LOCAL_PORT, MuxerConfig};

const GUEST_CID: u64 = 3;
/// Size of each of the guest driver's receive buffers.
const RX_BUFFER: usize = 4096;
/// The guest driver's receive buffer per connection (its credit to the host).
const GUEST_BUF: u32 = 32 << 10;
/// Chunk the guest sends at once.
const CHUNK: usize = 4096;
/// How long any wait in these tests may take before it counts as hung.
const PATIENCE: Duration = Duration::from_secs(20);

type Guest = VsockConnectionManager<GuestHal, Regs<Vsock>, RX_BUFFER>;

/// A device with its driver, and a socket path in a fresh directory.
struct Vm {
    transport: SharedVsock,
    guest: Guest,
    interrupts: Counter,
    config: VsockUnixConfig,
    _dir: tempfile::TempDir,
}

impl Vm {
    fn new(host_ports: &[u32]) -> Self {
        Self::with_guest_buffer(host_ports, GUEST_BUF)
    }

    /// A VM whose guest driver gives each connection `guest_buf` bytes of credit.
    fn with_guest_buffer(host_ports: &[u32], guest_buf: u32) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let muxer = Muxer::new(MuxerConfig {
            guest_cid: GUEST_CID,
            buf_alloc: 64 << 10,
            max_connections: 8,
        });
        let interrupts = Counter::default();
        let transport = Arc::new(Mutex::new(
            MmioTransport::new(
                Vsock::new(muxer),
                memory().clone(),
                Box::new(interrupts.clone()),
            )
            .expect("transport"),
        ));
        let driver =
            VirtIOSocket::<GuestHal, _, RX_BUFFER>::new(Regs(transport.clone())).expect("driver");
        let mut config = VsockUnixConfig::new(dir.path().join("vsock.sock"));
        config.host_ports = host_ports.to_vec();
        Self {
            transport,
            guest: VsockConnectionManager::new_with_capacity(driver, guest_buf),
            interrupts,
            config,
            _dir: dir,
        }
    }

    fn backend(&self) -> VsockUnixBackend {
        VsockUnixBackend::new(self.config.clone(), self.transport.clone()).expect("backend")
    }

    fn uds(&self) -> PathBuf {
        self.config.uds_path.clone()
    }

    /// Used entries the device has put into the receive queue so far.
    fn rx_used(&self) -> u16 {
        lock(&self.transport).state().queues[RX_QUEUE].next_used
    }
}

fn pattern(len: usize, seed: usize) -> Vec<u8> {
    (0..len).map(|i| (i * seed + i / 251) as u8).collect()
}

/// Polls the guest driver, handing each result to `f`, until `f` returns something; `step`
/// runs between polls (a deterministic backend step, or nothing when the thread runs).
fn guest_until<T>(
    guest: &mut Guest,
    what: &str,
    mut step: impl FnMut(),
    mut f: impl FnMut(&mut Guest, Option<DriverEvent>) -> Option<T>,
) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let event = guest.poll().expect("guest poll");
        let idle = event.is_none();
        if let Some(t) = f(guest, event) {
            return t;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        step();
        if idle {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

fn is_disconnect(event: &DriverEvent, guest_port: u32) -> Option<DisconnectReason> {
    match event.event_type {
        VsockEventType::Disconnected { reason } if event.destination.port == guest_port => {
            Some(reason)
        }
        _ => None,
    }
}

/// Polls the guest until a host connection request arrives (the driver accepts it when the
/// port listens); returns the host's address.
fn guest_accepts(guest: &mut Guest, step: impl FnMut()) -> VsockAddr {
    guest_until(guest, "a connection request", step, |_, e| {
        e.filter(|e| e.event_type == VsockEventType::ConnectionRequest)
            .map(|e| e.source)
    })
}

/// Polls the guest until its connection from `guest_port` ends; returns why.
fn guest_disconnected(guest: &mut Guest, guest_port: u32) -> DisconnectReason {
    guest_until(
        guest,
        "the disconnection",
        || {},
        |_, e| e.and_then(|e| is_disconnect(&e, guest_port)),
    )
}

/// The guest sends `outgoing` on its connection to `peer` from `port` while receiving
/// `incoming` bytes, returning credit as it reads; returns what it received. `step` runs
/// between polls, as in [`guest_until`].
fn guest_exchange(
    guest: &mut Guest,
    peer: VsockAddr,
    port: u32,
    (outgoing, incoming): (&[u8], usize),
    mut step: impl FnMut(),
) -> Vec<u8> {
    let mut sent = 0;
    let mut got = Vec::new();
    let mut buf = vec![0u8; GUEST_BUF as usize];
    let deadline = Instant::now() + PATIENCE;
    while sent < outgoing.len() || got.len() < incoming {
        assert!(
            Instant::now() < deadline,
            "exchange hung: sent {sent}/{}, got {}/{incoming}",
            outgoing.len(),
            got.len()
        );
        let mut progress = false;
        if sent < outgoing.len() {
            let n = (outgoing.len() - sent).min(CHUNK);
            match guest.send(peer, port, &outgoing[sent..sent + n]) {
                Ok(()) => {
                    sent += n;
                    progress = true;
                }
                Err(DriverError::SocketDeviceError(SocketError::InsufficientBufferSpaceInPeer)) => {
                }
                Err(e) => panic!("guest send: {e:?}"),
            }
        }
        match guest.poll().expect("guest poll") {
            Some(e) if matches!(e.event_type, VsockEventType::Received { .. }) => {
                loop {
                    let n = guest.recv(peer, port, &mut buf).expect("recv");
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                guest.update_credit(peer, port).expect("credit");
                progress = true;
            }
            Some(e) => assert!(
                is_disconnect(&e, port).is_none(),
                "disconnected during the exchange: {e:?}"
            ),
            None => {}
        }
        step();
        if !progress {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    got
}

/// Runs a host client on its own thread (it blocks while the guest is polled here).
fn host<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    std::thread::spawn(f)
}

/// Polls the guest until the host client thread finished, then returns its result.
fn guest_serves_until_done<T>(guest: &mut Guest, client: JoinHandle<T>, step: impl FnMut()) -> T {
    guest_until(guest, "the host client", step, |_, _| {
        client.is_finished().then_some(())
    });
    client.join().expect("host client")
}

/// Whether the other end closed `stream` (end of file or reset), without blocking.
fn closed(stream: &UnixStream) -> bool {
    stream.set_nonblocking(true).expect("nonblocking");
    let mut byte = [0u8; 1];
    let result = (&*stream).read(&mut byte);
    stream.set_nonblocking(false).expect("blocking");
    match result {
        Ok(0) => true,
        Ok(_) => panic!("unexpected data"),
        Err(e) if e.kind() == ErrorKind::WouldBlock => false,
        Err(e) if e.kind() == ErrorKind::ConnectionReset => true,
        Err(e) => panic!("read: {e}"),
    }
}

#[test]
fn host_client_connects_to_a_guest_port_and_data_flows_both_ways() {
    let mut vm = Vm::new(&[]);
    let thread = spawn(vm.backend()).expect("spawn");
    vm.guest.listen(1234);
    let to_guest = pattern(100_000, 7);
    let to_host = pattern(90_000, 13);

    let (uds, sending, want) = (vm.uds(), to_guest.clone(), to_host.len());
    let client = host(move || {
        let stream = connect(&uds, 1234, PATIENCE).expect("connect");
        let mut writer = stream.try_clone().expect("clone");
        let writing = std::thread::spawn(move || writer.write_all(&sending).expect("write"));
        let mut got = vec![0u8; want];
        (&stream).read_exact(&mut got).expect("read");
        writing.join().expect("writer");
        // The host sends no more; virtio-drivers answers the shutdown with a reset, which
        // closes the stream.
        stream.shutdown(Shutdown::Write).expect("shutdown");
        let mut rest = Vec::new();
        (&stream).read_to_end(&mut rest).expect("end of file");
        assert!(rest.is_empty());
        got
    });

    let peer = guest_accepts(&mut vm.guest, || {});
    assert_eq!(peer.cid, VMADDR_CID_HOST);
    assert!(
        peer.port >= FIRST_LOCAL_PORT,
        "a host port from the hybrid range"
    );
    let got = guest_exchange(&mut vm.guest, peer, 1234, (&to_host, to_guest.len()), || {});
    assert!(got == to_guest, "the guest got the host's bytes in order");
    let reason = guest_disconnected(&mut vm.guest, 1234);
    assert_eq!(reason, DisconnectReason::Shutdown);
    let from_guest = guest_serves_until_done(&mut vm.guest, client, || {});
    assert!(
        from_guest == to_host,
        "the host got the guest's bytes in order"
    );

    // A second connection, closed from the guest side: the host reads end of file.
    let uds = vm.uds();
    let client = host(move || {
        let stream = connect(&uds, 1234, PATIENCE).expect("connect");
        let mut rest = Vec::new();
        (&stream).read_to_end(&mut rest).expect("end of file");
        rest
    });
    let peer = guest_accepts(&mut vm.guest, || {});
    guest_exchange(&mut vm.guest, peer, 1234, (b"bye", 0), || {});
    vm.guest.shutdown(peer, 1234).expect("guest shutdown");
    let reason = guest_disconnected(&mut vm.guest, 1234);
    assert_eq!(reason, DisconnectReason::Reset);
    assert_eq!(
        guest_serves_until_done(&mut vm.guest, client, || {}),
        b"bye"
    );

    assert!(vm.uds().exists());
    thread.stop().expect("stop");
    assert!(!vm.uds().exists(), "stopping removes the socket file");
    let t = lock(&vm.transport);
    assert!(t.device().state().muxer.connections.is_empty(), "all freed");
    assert!(vm.interrupts.0.load(Ordering::SeqCst) > 0);
}

#[test]
fn host_close_right_after_writing_still_delivers_everything() {
    // The guest's credit (64 KiB) is twice its receive ring (8 buffers of 4 KiB): host data
    // waits in the device after the host is gone, and the guest drains it slowly.
    let guest_buf = 64 << 10;
    let mut vm = Vm::with_guest_buffer(&[], guest_buf);
    vm.config.shutdown_timeout = Duration::from_millis(150);
    let thread = spawn(vm.backend()).expect("spawn");
    vm.guest.listen(1234);
    let data = pattern(60_000, 5);
    let (uds, sending) = (vm.uds(), data.clone());
    let client = host(move || {
        let mut stream = connect(&uds, 1234, PATIENCE).expect("connect");
        stream.write_all(&sending).expect("write");
        // Dropped: the host side closes at once.
    });
    let peer = guest_accepts(&mut vm.guest, || {});
    let mut got = Vec::new();
    let mut buf = vec![0u8; guest_buf as usize];
    let mut reason = None;
    let deadline = Instant::now() + PATIENCE;
    while reason.is_none() {
        assert!(
            Instant::now() < deadline,
            "got {} bytes, no close",
            got.len()
        );
        // A slow guest: one receive buffer every 50 ms, far slower than the deadline.
        std::thread::sleep(Duration::from_millis(50));
        let Some(e) = vm.guest.poll().expect("poll") else {
            continue;
        };
        if matches!(e.event_type, VsockEventType::Received { .. }) {
            let n = vm.guest.recv(peer, 1234, &mut buf).expect("recv");
            got.extend_from_slice(&buf[..n]);
        }
        reason = is_disconnect(&e, 1234);
    }
    // What is still in the driver's buffer is read after the shutdown.
    let rest = vm.guest.recv(peer, 1234, &mut buf).unwrap_or(0);
    got.extend_from_slice(&buf[..rest]);
    assert_eq!(reason, Some(DisconnectReason::Shutdown), "not a reset");
    assert!(got == data, "got {} of {} bytes", got.len(), data.len());
    client.join().expect("client");
    thread.stop().expect("stop");
}

#[test]
fn guest_connects_to_a_host_port_served_by_uds_underscore_port() {
    let mut vm = Vm::new(&[5000]);
    let listener = UnixListener::bind(vm.config.host_port_path(5000)).expect("bind _5000");
    assert!(
        vm.config
            .host_port_path(5000)
            .to_string_lossy()
            .ends_with("vsock.sock_5000")
    );
    let echo = host(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut buf = [0u8; 8192];
        let mut total = 0;
        loop {
            let n = stream.read(&mut buf).expect("read");
            if n == 0 {
                return total;
            }
            stream.write_all(&buf[..n]).expect("echo");
            total += n;
        }
    });
    let thread = spawn(vm.backend()).expect("spawn");

    let peer = VsockAddr {
        cid: VMADDR_CID_HOST,
        port: 5000,
    };
    vm.guest.connect(peer, 2000).expect("connect");
    guest_until(
        &mut vm.guest,
        "connected",
        || {},
        |_, e| e.filter(|e| e.event_type == VsockEventType::Connected),
    );
    let data = pattern(70_000, 3);
    let echoed = guest_exchange(&mut vm.guest, peer, 2000, (&data, data.len()), || {});
    assert!(echoed == data, "echoed in order");
    // The guest closes: the host reads end of file and its echo loop ends.
    vm.guest.shutdown(peer, 2000).expect("shutdown");
    assert_eq!(
        guest_disconnected(&mut vm.guest, 2000),
        DisconnectReason::Reset
    );
    assert_eq!(guest_serves_until_done(&mut vm.guest, echo, || {}), 70_000);
    thread.stop().expect("stop");
}

#[test]
fn guest_connections_nobody_serves_are_reset() {
    let mut vm = Vm::new(&[5001]);
    let thread = spawn(vm.backend()).expect("spawn");
    // 6000 is not a host port at all; 5001 is, but nothing listens on its socket.
    for (port, guest_port) in [(6000, 2001), (5001, 2002)] {
        let peer = VsockAddr {
            cid: VMADDR_CID_HOST,
            port,
        };
        vm.guest.connect(peer, guest_port).expect("connect");
        let reason = guest_disconnected(&mut vm.guest, guest_port);
        assert_eq!(reason, DisconnectReason::Reset, "port {port}");
    }
    thread.stop().expect("stop");
    let t = lock(&vm.transport);
    assert!(t.device().state().muxer.connections.is_empty());
}

#[test]
fn bad_handshakes_close_the_client_and_the_backend_keeps_serving() {
    let mut vm = Vm::new(&[]);
    vm.config.max_handshakes = 2;
    vm.config.handshake_timeout = Duration::from_millis(300);
    // Stepped by the test: deterministic, no thread.
    let mut backend = vm.backend();
    let mut step = || {
        backend.poll(Some(Duration::ZERO)).expect("poll");
    };
    let uds = vm.uds();
    let step_until = |step: &mut dyn FnMut(), done: &dyn Fn() -> bool, what: &str| {
        let deadline = Instant::now() + PATIENCE;
        while !done() {
            assert!(Instant::now() < deadline, "timed out: {what}");
            step();
            std::thread::sleep(Duration::from_millis(1));
        }
    };

    let long = [b'C'; 100];
    for line in [
        &b"FOO\n"[..],
        &long[..],
        b"CONNECT abc\n",
        b"CONNECT 99999999999\n",
    ] {
        let mut client = UnixStream::connect(&uds).expect("connect");
        client.write_all(line).expect("write");
        step_until(&mut step, &|| closed(&client), "bad line closes the client");
    }

    // At most two handshakes wait; a third client is closed at once, the waiting ones after
    // the timeout.
    let idle: Vec<UnixStream> = (0..3)
        .map(|_| UnixStream::connect(&uds).expect("connect"))
        .collect();
    step_until(&mut step, &|| closed(&idle[2]), "over the limit");
    assert!(!closed(&idle[0]) && !closed(&idle[1]));
    step_until(
        &mut step,
        &|| closed(&idle[0]) && closed(&idle[1]),
        "handshake timeout",
    );
    assert_eq!(backend.pending_handshakes(), 0);

    // A good client still gets through, and its first bytes ride along with the line.
    vm.guest.listen(1234);
    let client = host(move || {
        let stream = UnixStream::connect(&uds).expect("connect");
        (&stream).write_all(b"CONNECT 1234\nearly").expect("write");
        let mut reply = Vec::new();
        let mut byte = [0u8; 1];
        while byte[0] != b'\n' {
            (&stream).read_exact(&mut byte).expect("reply");
            reply.push(byte[0]);
        }
        let reply = String::from_utf8_lossy(&reply).into_owned();
        // A guest port nobody listens on: refused.
        let refused = connect(&uds, 4321, PATIENCE);
        (reply, refused.map(|_| ()))
    });
    let mut step = || {
        backend.poll(Some(Duration::ZERO)).expect("poll");
    };
    let peer = guest_accepts(&mut vm.guest, &mut step);
    assert_eq!(
        guest_exchange(&mut vm.guest, peer, 1234, (&[], 5), &mut step),
        b"early"
    );
    let (reply, refused) = guest_serves_until_done(&mut vm.guest, client, &mut step);
    assert_eq!(reply, format!("OK {}\n", peer.port));
    assert!(
        matches!(refused, Err(VsockUnixError::Refused { port: 4321 })),
        "{refused:?}"
    );
}

#[test]
fn paused_backend_leaves_guest_memory_alone_until_resumed() {
    let mut vm = Vm::new(&[]);
    let thread = spawn(vm.backend()).expect("spawn");
    vm.guest.listen(1234);
    let uds = vm.uds();
    let client = host(move || connect(&uds, 1234, PATIENCE).expect("connect"));
    let peer = guest_accepts(&mut vm.guest, || {});
    let mut stream = guest_serves_until_done(&mut vm.guest, client, || {});

    thread.pause();
    // The VMM stops the vCPUs too: the guest is not polled while paused.
    let used = vm.rx_used();
    let interrupts = vm.interrupts.0.load(Ordering::SeqCst);
    stream.write_all(b"while paused").expect("write");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(vm.rx_used(), used, "no receive buffer used while paused");
    assert_eq!(vm.interrupts.0.load(Ordering::SeqCst), interrupts);
    {
        let t = lock(&vm.transport);
        let state = t.device().state().muxer;
        assert!(
            state.connections.iter().all(|(_, c)| c.tx_buf.is_empty()),
            "the host stream was not read"
        );
    }
    // Pausing twice is harmless.
    thread.pause();

    thread.resume();
    let got = guest_exchange(&mut vm.guest, peer, 1234, (&[], 12), || {});
    assert_eq!(got, b"while paused");
    assert!(vm.rx_used() != used);
    // Stopping a paused thread works too.
    thread.pause();
    thread.stop().expect("stop");
}

#[test]
fn the_socket_path_must_be_free_or_a_stale_socket() {
    let vm = Vm::new(&[]);
    let uds = vm.uds();
    std::fs::write(&uds, b"not a socket").expect("file");
    assert!(matches!(
        VsockUnixBackend::new(vm.config.clone(), vm.transport.clone()),
        Err(VsockUnixError::NotASocket { .. })
    ));
    std::fs::remove_file(&uds).expect("remove");

    let live = UnixListener::bind(&uds).expect("bind");
    assert!(matches!(
        VsockUnixBackend::new(vm.config.clone(), vm.transport.clone()),
        Err(VsockUnixError::InUse { .. })
    ));
    // The listener goes away; its socket file stays behind, stale.
    drop(live);
    assert!(uds.exists());
    let backend = vm.backend();
    let probe = UnixStream::connect(&uds).expect("the backend listens");
    drop(probe);
    drop(backend);
    assert!(!uds.exists(), "dropping the backend removes the socket");

    // A path too long for a Unix socket is a clear error, not a panic.
    let mut config = vm.config.clone();
    config.uds_path = std::env::temp_dir().join("x".repeat(200));
    assert!(matches!(
        VsockUnixBackend::new(config, vm.transport.clone()),
        Err(VsockUnixError::Socket { .. })
    ));
}

#[test]
fn client_connect_times_out_when_the_guest_never_answers() {
    let vm = Vm::new(&[]);
    let mut backend = vm.backend();
    let uds = vm.uds();
    // The guest's driver is never polled: nobody answers the request.
    let client = host(move || connect(&uds, 1234, Duration::from_millis(200)));
    let deadline = Instant::now() + PATIENCE;
    while !client.is_finished() {
        assert!(Instant::now() < deadline);
        backend.poll(Some(Duration::from_millis(5))).expect("poll");
    }
    let result = client.join().expect("client");
    assert!(
        matches!(result, Err(VsockUnixError::Timeout { port: 1234, .. })),
        "{result:?}"
    );
}
