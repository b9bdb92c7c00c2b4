//! The host side of the vsock device over Unix sockets, compatible with Firecracker's "hybrid
//! vsock", and the thread that runs it.
//!
//! - Host to guest: a host program connects to the device's Unix socket (say
//!   `/run/vm1/vsock.sock`), writes `CONNECT <guest port>\n`, and once the guest accepted the
//!   connection reads `OK <host port>\n`; then the stream carries the connection's bytes. If the
//!   guest refuses or does not answer in time, the stream is closed. [`connect`] is that client.
//! - Guest to host: a guest connection to host port `P` (one of
//!   [`VsockUnixConfig::host_ports`]) is bridged to a Unix stream connected to `<uds path>_P`;
//!   when nothing listens there, the guest's connection is reset.
//!
//! Bytes move only as the vsock credit allows: a host stream is read no further than the guest
//! can take, and guest data is written to the host stream from the connection's own receive
//! buffer (which the credit bounds), so nothing else buffers data. End of file on a host stream
//! becomes a vsock shutdown of the send direction, a hang-up a full shutdown, a socket error a
//! reset; a guest shutdown becomes a `shutdown(2)` of the stream, a reset closes it.
//!
//! [`VsockUnixBackend::poll`] is one step of the event loop (epoll over the listening socket,
//! the streams and the device's waker), callable from a test as well as from the thread that
//! [`spawn`] starts. The device wakes the loop through an eventfd ([`Vsock::set_waker`]) when a
//! vCPU thread processed the guest's transmit queue.
//!
//! Host clients are not trusted more than the guest: handshakes are bounded in length, number
//! ([`VsockUnixConfig::max_handshakes`]) and time, connections by the muxer's limit.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::net::{AddressFamily, SendFlags, SocketAddrUnix, SocketFlags, SocketType};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::connection::Connection;
use super::device::{RX_QUEUE, Vsock, VsockEvent};
use super::hybrid::{Handshake, MAX_LINE, ok_reply};
use super::muxer::{ConnKey, Muxer};
use super::packet::{SHUTDOWN_RCV, SHUTDOWN_SEND};
use crate::devices::virtio::mmio::MmioTransport;

/// The vsock device behind its transport, shared between the vCPU threads and the event loop.
pub type SharedVsock = Arc<Mutex<MmioTransport<Vsock>>>;

/// Default for [`VsockUnixConfig::max_handshakes`].
pub const DEFAULT_MAX_HANDSHAKES: usize = 32;
/// Default for [`VsockUnixConfig::handshake_timeout`].
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default for [`VsockUnixConfig::connect_timeout`] (Firecracker waits as long).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default for [`VsockUnixConfig::shutdown_timeout`].
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// Most bytes read from a host stream at once.
const READ_CHUNK: usize = 64 << 10;
/// Most epoll events handled per step.
const MAX_EVENTS: usize = 64;
/// Longest `OK <port>` reply [`connect`] accepts, newline excluded.
const MAX_REPLY: usize = 32;

/// What can go wrong on the host side of the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockUnixError {
    /// The socket path exists and is not a socket.
    #[error("{}: exists and is not a socket", .path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// The socket path is a socket another process listens on.
    #[error("{}: another process listens on this socket", .path.display())]
    InUse {
        /// The path.
        path: PathBuf,
    },
    /// Inspecting, removing or binding the socket path failed.
    #[error("{}: {source}", .path.display())]
    Socket {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Setting up or waiting on the event loop's epoll or eventfd failed.
    #[error("vsock event loop: {0}")]
    Poll(io::Error),
    /// The event thread could not be started or panicked.
    #[error("vsock event thread: {0}")]
    Thread(String),
    /// [`connect`] could not reach the device's socket, or the stream failed.
    #[error("vsock connection through {}: {source}", .path.display())]
    Connect {
        /// The device's socket path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The guest did not accept the connection in time.
    #[error("guest port {port} did not answer within {timeout:?}")]
    Timeout {
        /// The guest port.
        port: u32,
        /// How long [`connect`] waited.
        timeout: Duration,
    },
    /// The device closed the stream: the guest refused the connection or nothing listens on
    /// the port.
    #[error("guest port {port} refused the connection")]
    Refused {
        /// The guest port.
        port: u32,
    },
    /// The device answered something other than `OK <port>`.
    #[error("unexpected vsock handshake reply {0:?}")]
    BadReply(String),
}

/// How the backend serves one vsock device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockUnixConfig {
    /// The Unix socket host programs connect to (`CONNECT <port>`).
    pub uds_path: PathBuf,
    /// Host ports the guest may connect to; port `P` is served by the socket
    /// [`host_port_path(P)`](VsockUnixConfig::host_port_path).
    pub host_ports: Vec<u32>,
    /// Most host clients whose handshake line is still incomplete; more are closed at once.
    pub max_handshakes: usize,
    /// How long a host client may take to send its handshake line.
    pub handshake_timeout: Duration,
    /// How long the guest may take to accept a host connection.
    pub connect_timeout: Duration,
    /// How long the guest may take to answer a full shutdown before the connection is reset
    /// (renewed while the guest still takes the host's last data).
    pub shutdown_timeout: Duration,
}

impl VsockUnixConfig {
    /// A configuration with the default limits and no host ports.
    pub fn new(uds_path: impl Into<PathBuf>) -> Self {
        Self {
            uds_path: uds_path.into(),
            host_ports: Vec::new(),
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
        }
    }

    /// The socket that serves guest connections to host port `port`: `<uds path>_<port>`
    /// (Firecracker's convention).
    pub fn host_port_path(&self, port: u32) -> PathBuf {
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{port}"));
        PathBuf::from(path)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicked holder leaves consistent data for our purposes: the device and the control
    // flags are updated field by field.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A Unix stream connected without blocking: a listener whose backlog is full makes this fail
/// with `EAGAIN` instead of waiting.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    let addr = SocketAddrUnix::new(path)?;
    rustix::net::connect(&fd, &addr)?;
    Ok(UnixStream::from(fd))
}

/// Writes without blocking and without `SIGPIPE` (a closed peer is an `EPIPE` error).
fn send_nosignal(stream: &UnixStream, data: &[u8]) -> io::Result<usize> {
    Ok(rustix::net::send(
        stream,
        data,
        SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
    )?)
}

/// The listening socket; its file is removed when this is dropped, if it is still ours.
#[derive(Debug)]
struct BoundSocket {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file we created.
    id: (u64, u64),
}

impl BoundSocket {
    /// Binds at `path`, first removing a stale socket file there (one nobody listens on).
    fn bind(path: &Path) -> Result<Self, VsockUnixError> {
        let err = |source| VsockUnixError::Socket {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => match connect_nonblocking(path) {
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    std::fs::remove_file(path).map_err(err)?;
                }
                Ok(_) => {
                    return Err(VsockUnixError::InUse {
                        path: path.to_path_buf(),
                    });
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    return Err(VsockUnixError::InUse {
                        path: path.to_path_buf(),
                    });
                }
                Err(e) => return Err(err(e)),
            },
            Ok(_) => {
                return Err(VsockUnixError::NotASocket {
                    path: path.to_path_buf(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let listener = UnixListener::bind(path).map_err(err)?;
        let meta = std::fs::symlink_metadata(path).map_err(err)?;
        let bound = Self {
            listener,
            path: path.to_path_buf(),
            id: (meta.dev(), meta.ino()),
        };
        bound.listener.set_nonblocking(true).map_err(err)?;
        Ok(bound)
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.id
        {
            // Nothing to do about a failure while tearing down.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A host client whose handshake line is not complete yet.
#[derive(Debug)]
struct Client {
    stream: UnixStream,
    handshake: Handshake,
    deadline: Instant,
}

/// The host stream of one vsock connection.
#[derive(Debug)]
struct HostConn {
    stream: UnixStream,
    /// A host-initiated connection the guest has not accepted yet.
    awaiting_guest: bool,
    /// The rest of the `OK <port>` reply, written before any guest data.
    reply: Vec<u8>,
    /// The events the stream is registered for in epoll, or `None` when it is not registered.
    interest: Option<EventSet>,
    /// The last write would have blocked: wait for `EPOLLOUT`.
    write_blocked: bool,
    /// The host stream reached end of file (the host sends no more).
    host_eof: bool,
    /// The host closed its socket entirely (`EPOLLHUP`).
    hung_up: bool,
    /// The connection was fully shut down from the host side; the guest should reset it.
    closing: bool,
    /// While closing: host data still waiting for the guest when the deadline was last set (the
    /// deadline moves on while the guest keeps taking data).
    closing_backlog: usize,
    /// `shutdown(2)` directions applied to the stream, as vsock flags: `SHUTDOWN_SEND` when the
    /// guest stopped sending (the stream's write side), `SHUTDOWN_RCV` when it stopped receiving.
    shut: u32,
    /// When the guest must have answered (a connection request or a full shutdown).
    deadline: Option<Instant>,
}

impl HostConn {
    fn new(stream: UnixStream, awaiting_guest: bool, deadline: Option<Instant>) -> Self {
        Self {
            stream,
            awaiting_guest,
            reply: Vec::new(),
            interest: None,
            write_blocked: false,
            host_eof: false,
            hung_up: false,
            closing: false,
            closing_backlog: 0,
            shut: 0,
            deadline,
        }
    }

    /// Reads host data for the guest, as far as the guest's credit reaches.
    fn read_from_host(&mut self, conn: &mut Connection, buf: &mut [u8]) -> io::Result<()> {
        if self.awaiting_guest {
            return Ok(());
        }
        while !self.host_eof {
            let window = conn.send_window().min(buf.len());
            if window == 0 {
                break;
            }
            match self.stream.read(&mut buf[..window]) {
                Ok(0) => {
                    self.host_eof = true;
                    conn.shutdown_send();
                }
                Ok(n) => {
                    // Within the window: the connection takes all of it.
                    conn.send(&buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes the pending reply and the guest's data to the host stream, without blocking, and
    /// passes the guest's shutdowns on once its data is out.
    fn write_to_host(&mut self, conn: &mut Connection) -> io::Result<()> {
        if self.write_blocked {
            return Ok(());
        }
        while !self.reply.is_empty() {
            match send_nosignal(&self.stream, &self.reply) {
                Ok(0) => {
                    self.write_blocked = true;
                    return Ok(());
                }
                Ok(n) => {
                    self.reply.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.write_blocked = true;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.awaiting_guest {
            return Ok(());
        }
        while !conn.rx_data().is_empty() {
            match send_nosignal(&self.stream, conn.rx_data()) {
                Ok(0) => {
                    self.write_blocked = true;
                    return Ok(());
                }
                Ok(n) => {
                    conn.consume(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.write_blocked = true;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let peer = conn.state().peer_shutdown;
        if peer & SHUTDOWN_SEND != 0 && self.shut & SHUTDOWN_SEND == 0 {
            self.shut |= SHUTDOWN_SEND;
            self.stream.shutdown(std::net::Shutdown::Write)?;
        }
        if peer & SHUTDOWN_RCV != 0 && self.shut & SHUTDOWN_RCV == 0 {
            // The host's further writes fail with EPIPE.
            self.shut |= SHUTDOWN_RCV;
            self.stream.shutdown(std::net::Shutdown::Read)?;
        }
        Ok(())
    }

    /// The epoll registration this stream needs: readable while the guest can take data,
    /// writable while a write is blocked. A hung-up stream with nothing to do is taken out of
    /// epoll (hang-ups are always reported and would spin the loop).
    fn wanted_interest(&self, conn: &Connection) -> Option<EventSet> {
        let mut set = EventSet::empty();
        if !self.awaiting_guest && !self.host_eof && conn.send_window() > 0 {
            set |= EventSet::IN;
        }
        if self.write_blocked {
            set |= EventSet::OUT;
        }
        if set.is_empty() && self.hung_up {
            None
        } else {
            Some(set)
        }
    }
}

/// What to do with a connection after a step.
enum Verdict {
    Keep,
    /// Reset the vsock connection and close the host stream.
    Fail,
}

/// The host side of one vsock device: the listening socket, the host streams of the device's
/// connections, and the epoll that watches them and the device's waker.
#[derive(Debug)]
pub struct VsockUnixBackend {
    config: VsockUnixConfig,
    transport: SharedVsock,
    socket: BoundSocket,
    epoll: Epoll,
    waker: EventFd,
    clients: BTreeMap<RawFd, Client>,
    conns: BTreeMap<ConnKey, HostConn>,
    by_fd: BTreeMap<RawFd, ConnKey>,
    buf: Vec<u8>,
}

impl VsockUnixBackend {
    /// Binds `config.uds_path` (replacing a stale socket file; any other existing file is an
    /// error), makes the device listen on `config.host_ports`, and installs the waker in the
    /// device. Connections the device already has are reset: no host stream belongs to them.
    pub fn new(config: VsockUnixConfig, transport: SharedVsock) -> Result<Self, VsockUnixError> {
        let socket = BoundSocket::bind(&config.uds_path)?;
        let epoll = Epoll::new().map_err(VsockUnixError::Poll)?;
        let waker =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(VsockUnixError::Poll)?;
        for fd in [socket.listener.as_raw_fd(), waker.as_raw_fd()] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token(fd)),
                )
                .map_err(VsockUnixError::Poll)?;
        }
        let device_waker = waker.try_clone().map_err(VsockUnixError::Poll)?;
        {
            let mut t = lock(&transport);
            let dev = t.device_mut();
            dev.set_waker(device_waker);
            dev.take_events();
            let muxer = dev.muxer();
            for &port in &config.host_ports {
                muxer.listen(port);
            }
            for (key, _) in muxer.state().connections {
                if let Some(conn) = muxer.connection(key) {
                    conn.reset();
                }
            }
            if t.device().rx_pending() {
                t.notify(RX_QUEUE as u32);
            }
        }
        Ok(Self {
            config,
            transport,
            socket,
            epoll,
            waker,
            clients: BTreeMap::new(),
            conns: BTreeMap::new(),
            by_fd: BTreeMap::new(),
            buf: vec![0; READ_CHUNK],
        })
    }

    /// The configuration.
    pub fn config(&self) -> &VsockUnixConfig {
        &self.config
    }

    /// Host clients still sending their handshake line.
    pub fn pending_handshakes(&self) -> usize {
        self.clients.len()
    }

    /// Connections that have a host stream.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Another handle on the waker: writing it makes a waiting [`poll`](Self::poll) return.
    pub fn kicker(&self) -> Result<EventFd, VsockUnixError> {
        self.waker.try_clone().map_err(VsockUnixError::Poll)
    }

    /// One step of the event loop: waits until a socket or the waker is ready, `timeout`
    /// passes (`None`: no limit) or the next handshake or guest deadline is due, then accepts
    /// clients, reads handshakes, takes the device's events, moves data both ways as the credit
    /// allows and fills the guest's receive queue. Returns the number of ready events.
    pub fn poll(&mut self, timeout: Option<Duration>) -> Result<usize, VsockUnixError> {
        let now = Instant::now();
        let due = self
            .next_deadline()
            .map(|d| d.saturating_duration_since(now));
        let wait = match (timeout, due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut events = [EpollEvent::default(); MAX_EVENTS];
        let n = match self.epoll.wait(wait.map_or(-1, millis), &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(VsockUnixError::Poll(e)),
        };
        self.handle_events(&events[..n]);
        Ok(n)
    }

    fn next_deadline(&self) -> Option<Instant> {
        let clients = self.clients.values().map(|c| c.deadline);
        let conns = self.conns.values().filter_map(|c| c.deadline);
        clients.chain(conns).min()
    }

    fn handle_events(&mut self, events: &[EpollEvent]) {
        let now = Instant::now();
        let mut handshakes = Vec::new();
        let mut ready = Vec::new();
        for event in events {
            let Ok(fd) = RawFd::try_from(event.data()) else {
                continue;
            };
            if fd == self.waker.as_raw_fd() {
                // Reset the counter; an empty counter (EAGAIN) is fine.
                let _ = self.waker.read();
            } else if fd == self.socket.listener.as_raw_fd() {
                self.accept_clients(now);
            } else if self.clients.contains_key(&fd) {
                handshakes.extend(self.read_handshake(fd));
            } else if let Some(&key) = self.by_fd.get(&fd) {
                ready.push((key, event.event_set()));
            }
        }
        let expired: Vec<RawFd> = self
            .clients
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(&fd, _)| fd)
            .collect();
        for fd in expired {
            self.drop_client(fd);
        }

        let transport = Arc::clone(&self.transport);
        let mut t = lock(&transport);
        for (stream, port, early) in handshakes {
            self.open_to_guest(t.device_mut().muxer(), stream, port, &early, now);
        }
        for event in t.device_mut().take_events() {
            self.on_device_event(t.device_mut().muxer(), event);
        }
        for (key, set) in ready {
            self.on_stream_ready(t.device_mut().muxer(), key, set);
        }
        self.service(t.device_mut().muxer(), now);
        if t.device().rx_pending() {
            t.notify(RX_QUEUE as u32);
        }
    }

    fn accept_clients(&mut self, now: Instant) {
        loop {
            let stream = match self.socket.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // WouldBlock, or out of descriptors: the next wake-up tries again.
                Err(_) => break,
            };
            if self.clients.len() >= self.config.max_handshakes
                || stream.set_nonblocking(true).is_err()
            {
                continue;
            }
            let fd = stream.as_raw_fd();
            let interest = EpollEvent::new(EventSet::IN, token(fd));
            if self.epoll.ctl(ControlOperation::Add, fd, interest).is_ok() {
                let deadline = now + self.config.handshake_timeout;
                self.clients.insert(
                    fd,
                    Client {
                        stream,
                        handshake: Handshake::default(),
                        deadline,
                    },
                );
            }
        }
    }

    fn drop_client(&mut self, fd: RawFd) {
        if self.clients.remove(&fd).is_some() {
            // Closing the descriptor would unregister it as well.
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }

    /// Reads a client's handshake; returns the client's stream (still registered in epoll), the
    /// guest port and the bytes after the line once the line is complete. A bad line, end of
    /// file or an error closes the client.
    fn read_handshake(&mut self, fd: RawFd) -> Option<(UnixStream, u32, Vec<u8>)> {
        let client = self.clients.get_mut(&fd)?;
        // One line at most: whatever follows it is at most `MAX_LINE - 1` bytes of data.
        let mut buf = [0u8; MAX_LINE];
        let done = loop {
            match client.stream.read(&mut buf) {
                Ok(0) => break None,
                Ok(n) => match client.handshake.push(&buf[..n]) {
                    Ok(None) => {}
                    Ok(Some((port, used))) => break Some((port, buf[used..n].to_vec())),
                    Err(_) => break None,
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break None,
            }
        };
        match done {
            Some((port, early)) => {
                let client = self.clients.remove(&fd)?;
                Some((client.stream, port, early))
            }
            None => {
                self.drop_client(fd);
                None
            }
        }
    }

    /// Opens the vsock connection of a client whose handshake named guest port `port`; the
    /// bytes that followed the line go to the guest once it accepted.
    fn open_to_guest(
        &mut self,
        muxer: &mut Muxer,
        stream: UnixStream,
        port: u32,
        early: &[u8],
        now: Instant,
    ) {
        let fd = stream.as_raw_fd();
        let mut host = HostConn::new(stream, true, Some(now + self.config.connect_timeout));
        host.interest = Some(EventSet::IN);
        let Ok(key) = muxer.connect(port) else {
            // Too many connections: the client is closed.
            self.unregister(fd, &host);
            return;
        };
        let taken = muxer.connection(key).map_or(0, |conn| conn.send(early));
        self.by_fd.insert(fd, key);
        self.conns.insert(key, host);
        if taken < early.len() {
            self.fail(muxer, key);
        }
    }

    fn on_device_event(&mut self, muxer: &mut Muxer, event: VsockEvent) {
        match event {
            VsockEvent::Accepted(key) => self.connect_host_port(muxer, key),
            VsockEvent::Connected(key) => match self.conns.get_mut(&key) {
                Some(host) if host.awaiting_guest => {
                    host.awaiting_guest = false;
                    host.reply = ok_reply(key.local_port).into_bytes();
                    host.deadline = None;
                }
                Some(_) => {}
                None => {
                    if let Some(conn) = muxer.connection(key) {
                        conn.reset();
                    }
                }
            },
            VsockEvent::Closed(key) => self.remove_conn(key),
        }
    }

    /// The guest connected to host port `key.local_port`: connect to its socket, or reset the
    /// guest's connection when nothing listens there.
    fn connect_host_port(&mut self, muxer: &mut Muxer, key: ConnKey) {
        let Some(conn) = muxer.connection(key) else {
            return;
        };
        if self.conns.contains_key(&key) {
            return;
        }
        let path = self.config.host_port_path(key.local_port);
        let Ok(stream) = connect_nonblocking(&path) else {
            conn.reset();
            return;
        };
        let fd = stream.as_raw_fd();
        let mut host = HostConn::new(stream, false, None);
        let interest = EpollEvent::new(EventSet::IN, token(fd));
        if self.epoll.ctl(ControlOperation::Add, fd, interest).is_err() {
            conn.reset();
            return;
        }
        host.interest = Some(EventSet::IN);
        self.by_fd.insert(fd, key);
        self.conns.insert(key, host);
    }

    fn on_stream_ready(&mut self, muxer: &mut Muxer, key: ConnKey, set: EventSet) {
        let Some(host) = self.conns.get_mut(&key) else {
            return;
        };
        let Some(conn) = muxer.connection(key) else {
            self.remove_conn(key);
            return;
        };
        if set.contains(EventSet::ERROR) {
            return self.fail(muxer, key);
        }
        if set.contains(EventSet::HANG_UP) {
            host.hung_up = true;
        }
        if set.contains(EventSet::OUT) {
            host.write_blocked = false;
        }
        if set.intersects(EventSet::IN | EventSet::HANG_UP)
            && host.read_from_host(conn, &mut self.buf).is_err()
        {
            self.fail(muxer, key);
        }
    }

    /// Writes guest data to every stream that can take it, applies shutdowns and deadlines,
    /// and updates the epoll registrations.
    fn service(&mut self, muxer: &mut Muxer, now: Instant) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            let Some(host) = self.conns.get_mut(&key) else {
                continue;
            };
            let Some(conn) = muxer.connection(key) else {
                // Finished; its Closed event may still be on its way.
                self.remove_conn(key);
                continue;
            };
            let verdict = service_one(host, conn, now, self.config.shutdown_timeout);
            match verdict {
                Verdict::Fail => self.fail(muxer, key),
                Verdict::Keep => {
                    let want = host.wanted_interest(conn);
                    if want != host.interest {
                        let fd = host.stream.as_raw_fd();
                        let result = match (host.interest, want) {
                            (None, Some(set)) => self.epoll.ctl(
                                ControlOperation::Add,
                                fd,
                                EpollEvent::new(set, token(fd)),
                            ),
                            (Some(_), Some(set)) => self.epoll.ctl(
                                ControlOperation::Modify,
                                fd,
                                EpollEvent::new(set, token(fd)),
                            ),
                            (Some(_), None) => {
                                self.epoll
                                    .ctl(ControlOperation::Delete, fd, EpollEvent::default())
                            }
                            (None, None) => Ok(()),
                        };
                        match result {
                            Ok(()) => host.interest = want,
                            Err(_) => self.fail(muxer, key),
                        }
                    }
                }
            }
        }
    }

    fn unregister(&self, fd: RawFd, host: &HostConn) {
        if host.interest.is_some() {
            // Closing the descriptor would unregister it as well.
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }

    /// Forgets a connection's host stream (closing it).
    fn remove_conn(&mut self, key: ConnKey) {
        if let Some(host) = self.conns.remove(&key) {
            let fd = host.stream.as_raw_fd();
            self.by_fd.remove(&fd);
            self.unregister(fd, &host);
        }
    }

    /// Resets a connection towards the guest and closes its host stream.
    fn fail(&mut self, muxer: &mut Muxer, key: ConnKey) {
        if let Some(conn) = muxer.connection(key) {
            conn.reset();
        }
        self.remove_conn(key);
    }
}

/// One connection's share of [`VsockUnixBackend::service`]: data to the host, the host's
/// hang-up, deadlines.
fn service_one(
    host: &mut HostConn,
    conn: &mut Connection,
    now: Instant,
    shutdown_timeout: Duration,
) -> Verdict {
    if host.awaiting_guest && host.hung_up {
        // The client left before the guest answered.
        return Verdict::Fail;
    }
    if host.write_to_host(conn).is_err() {
        return Verdict::Fail;
    }
    if host.host_eof && host.hung_up && !host.closing {
        host.closing = true;
        conn.close();
        host.closing_backlog = conn.state().tx_buf.len();
        host.deadline = Some(now + shutdown_timeout);
    }
    if host.deadline.is_some_and(|d| d <= now) {
        // A closing connection whose host data still drains into the guest gets more time as
        // long as the guest keeps taking it.
        let backlog = conn.state().tx_buf.len();
        if !(host.closing && backlog < host.closing_backlog) {
            return Verdict::Fail;
        }
        host.closing_backlog = backlog;
        host.deadline = Some(now + shutdown_timeout);
    }
    Verdict::Keep
}

/// The epoll token of a descriptor: the descriptor itself.
fn token(fd: RawFd) -> u64 {
    u64::try_from(fd).unwrap_or(u64::MAX)
}

/// A timeout in whole milliseconds for epoll, rounded up so a deadline is not missed.
fn millis(d: Duration) -> i32 {
    let ms = d.as_nanos().div_ceil(1_000_000);
    i32::try_from(ms).unwrap_or(i32::MAX)
}

/// What the event thread was asked to do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Want {
    #[default]
    Run,
    Pause,
    Stop,
}

#[derive(Debug, Default)]
struct RunState {
    want: Want,
    /// The thread acknowledged a pause and touches neither the device nor guest memory.
    paused: bool,
    /// The thread ended.
    exited: bool,
}

#[derive(Debug, Default)]
struct Control {
    state: Mutex<RunState>,
    changed: Condvar,
}

/// The thread running a [`VsockUnixBackend`]; stopping it (or dropping this) joins the thread,
/// and the backend removes its socket file.
#[derive(Debug)]
pub struct VsockUnixThread {
    control: Arc<Control>,
    kick: EventFd,
    handle: Option<JoinHandle<Result<(), VsockUnixError>>>,
}

/// Runs `backend` on its own thread until [`VsockUnixThread::stop`].
pub fn spawn(mut backend: VsockUnixBackend) -> Result<VsockUnixThread, VsockUnixError> {
    let kick = backend.kicker()?;
    let control = Arc::new(Control::default());
    let thread_control = Arc::clone(&control);
    let handle = std::thread::Builder::new()
        .name("vsock-unix".into())
        .spawn(move || {
            let result = run(&mut backend, &thread_control);
            // The socket file goes before `stop` returns.
            drop(backend);
            lock(&thread_control.state).exited = true;
            thread_control.changed.notify_all();
            result
        })
        .map_err(|e| VsockUnixError::Thread(e.to_string()))?;
    Ok(VsockUnixThread {
        control,
        kick,
        handle: Some(handle),
    })
}

fn run(backend: &mut VsockUnixBackend, control: &Control) -> Result<(), VsockUnixError> {
    loop {
        {
            let mut st = lock(&control.state);
            loop {
                match st.want {
                    Want::Run => {
                        st.paused = false;
                        break;
                    }
                    Want::Stop => return Ok(()),
                    Want::Pause => {
                        if !st.paused {
                            st.paused = true;
                            control.changed.notify_all();
                        }
                        st = control
                            .changed
                            .wait(st)
                            .unwrap_or_else(PoisonError::into_inner);
                    }
                }
            }
        }
        backend.poll(None)?;
    }
}

impl VsockUnixThread {
    /// Stops the thread from touching the device and guest memory; returns once it
    /// acknowledged (or ended). Host streams are left alone meanwhile (their kernel buffers
    /// fill up). This is how the VMM quiesces the device for a checkpoint.
    pub fn pause(&self) {
        let mut st = lock(&self.control.state);
        if st.want != Want::Stop {
            st.want = Want::Pause;
        }
        // A failed write means the counter is saturated: the thread is woken anyway.
        let _ = self.kick.write(1);
        while !st.paused && !st.exited {
            st = self
                .control
                .changed
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Lets a paused thread run again.
    pub fn resume(&self) {
        let mut st = lock(&self.control.state);
        if st.want == Want::Pause {
            st.want = Want::Run;
        }
        self.control.changed.notify_all();
    }

    /// Stops and joins the thread; the socket file is removed. Returns the error that ended
    /// the thread early, if one did.
    pub fn stop(mut self) -> Result<(), VsockUnixError> {
        self.shut_down()
    }

    fn shut_down(&mut self) -> Result<(), VsockUnixError> {
        let Some(handle) = self.handle.take() else {
            return Ok(());
        };
        lock(&self.control.state).want = Want::Stop;
        self.control.changed.notify_all();
        // A failed write means the counter is saturated: the thread is woken anyway.
        let _ = self.kick.write(1);
        handle
            .join()
            .map_err(|_| VsockUnixError::Thread("the vsock event thread panicked".into()))?
    }
}

impl Drop for VsockUnixThread {
    fn drop(&mut self) {
        // Nothing to report to while dropping.
        let _ = self.shut_down();
    }
}

/// Opens a connection to guest port `port` through the device's socket `uds`: writes
/// `CONNECT <port>\n` and reads the `OK <host port>\n` reply byte by byte, so the returned
/// stream (blocking, no timeouts) starts exactly at the connection's data. Fails with
/// [`VsockUnixError::Refused`] when the device closes the stream (the guest refused, nothing
/// listens, or the device is at its limit) and [`VsockUnixError::Timeout`] after `timeout`.
pub fn connect(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream, VsockUnixError> {
    let start = Instant::now();
    let io_err = |source| VsockUnixError::Connect {
        path: uds.to_path_buf(),
        source,
    };
    let remaining = || {
        timeout
            .checked_sub(start.elapsed())
            .filter(|d| !d.is_zero())
    };
    let stream = loop {
        match connect_nonblocking(uds) {
            Ok(stream) => break stream,
            // The backlog is full: the device is busy accepting.
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && remaining().is_some() => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(io_err(e)),
        }
    };
    stream.set_nonblocking(false).map_err(io_err)?;
    let is_timeout = |e: &io::Error| {
        matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        )
    };
    stream
        .set_write_timeout(Some(
            remaining().ok_or_else(|| timed_out_err(port, timeout))?,
        ))
        .map_err(io_err)?;
    match (&stream).write_all(format!("CONNECT {port}\n").as_bytes()) {
        Ok(()) => {}
        Err(e) if is_timeout(&e) => return Err(timed_out_err(port, timeout)),
        Err(e) => return Err(io_err(e)),
    }
    let mut line = Vec::with_capacity(MAX_REPLY);
    loop {
        let left = remaining().ok_or_else(|| timed_out_err(port, timeout))?;
        stream.set_read_timeout(Some(left)).map_err(io_err)?;
        let mut byte = [0u8; 1];
        match (&stream).read(&mut byte) {
            Ok(0) => return Err(VsockUnixError::Refused { port }),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() >= MAX_REPLY => {
                return Err(VsockUnixError::BadReply(
                    String::from_utf8_lossy(&line).into_owned(),
                ));
            }
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Err(timed_out_err(port, timeout)),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(VsockUnixError::Refused { port });
            }
            Err(e) => return Err(io_err(e)),
        }
    }
    let valid = line
        .strip_prefix(b"OK ")
        .filter(|p| !p.is_empty() && p.iter().all(u8::is_ascii_digit))
        .and_then(|p| std::str::from_utf8(p).ok()?.parse::<u32>().ok())
        .is_some();
    if !valid {
        return Err(VsockUnixError::BadReply(
            String::from_utf8_lossy(&line).into_owned(),
        ));
    }
    stream.set_read_timeout(None).map_err(io_err)?;
    stream.set_write_timeout(None).map_err(io_err)?;
    Ok(stream)
}

fn timed_out_err(port: u32, timeout: Duration) -> VsockUnixError {
    VsockUnixError::Timeout { port, timeout }
}

#[cfg(test)]
#[path = "unix_tests.rs"]
mod tests;
