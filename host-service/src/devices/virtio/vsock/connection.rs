//! One vsock stream connection between a host port and a guest port, as a pure state machine:
//! no sockets, no queues. The device feeds it the guest's packets and the host socket's bytes,
//! and takes from it the packets for the guest and the bytes for the host socket.
//!
//! Flow control is virtio-vsock's credit scheme: each side announces its receive buffer size
//! (`buf_alloc`) and how many bytes it has consumed in total (`fwd_cnt`); a sender may have at
//! most `buf_alloc - (sent - fwd_cnt)` bytes in flight. Both of this connection's buffers are
//! bounded: the guest-to-host buffer by the credit the connection announces (a guest that sends
//! beyond it is reset), the host-to-guest buffer by [`ConnectionState::tx_capacity`] (the host
//! side is told how many bytes were taken). A protocol violation resets the connection.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::packet::{Header, Op, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// The host's context id.
pub const HOST_CID: u64 = 2;

/// How many of the guest's protocol violations one process logs (each resets a connection;
/// a hostile guest could otherwise fill the log).
pub const LOGGED_VIOLATIONS: u64 = 64;

/// The guest's protocol violations so far in this process.
static VIOLATIONS_SEEN: AtomicU64 = AtomicU64::new(0);

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// The host asked the guest to connect and waits for its response.
    LocalInit,
    /// Both sides may exchange data (subject to shutdown flags).
    Established,
    /// The host side closed: a full shutdown goes (or went) to the guest, which should answer
    /// with a reset.
    Closing,
    /// Finished; the connection can be dropped.
    Closed,
}

/// The control packets waiting to go to the guest. A set of flags, not a queue, so a chatty
/// guest cannot make it grow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingControl {
    /// A connection request (host-initiated connections).
    pub request: bool,
    /// A connection response (guest-initiated connections).
    pub response: bool,
    /// A credit update.
    pub credit_update: bool,
    /// A shutdown with both flags, sent once the host-to-guest buffer is drained.
    pub shutdown: bool,
    /// A shutdown with `SHUTDOWN_SEND` only (the host will send no more but still receives),
    /// sent once the host-to-guest buffer is drained.
    #[serde(default)]
    pub shutdown_send: bool,
    /// A reset; once sent the connection is closed.
    pub rst: bool,
}

/// The whole, serialisable state of one connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionState {
    /// The guest's context id.
    pub guest_cid: u64,
    /// The host-side port.
    pub local_port: u32,
    /// The guest-side port.
    pub peer_port: u32,
    /// Life phase.
    pub phase: Phase,
    /// Control packets to send.
    pub pending: PendingControl,
    /// Our receive buffer size, announced to the guest (bounds `rx_buf`).
    pub buf_alloc: u32,
    /// Bytes of guest data handed to the host socket, in total (wrapping).
    pub fwd_cnt: u32,
    /// `fwd_cnt` as last announced to the guest.
    pub announced_fwd_cnt: u32,
    /// The guest's receive buffer size.
    pub peer_buf_alloc: u32,
    /// Bytes the guest has consumed, in total (wrapping).
    pub peer_fwd_cnt: u32,
    /// Bytes sent to the guest, in total (wrapping).
    pub tx_cnt: u32,
    /// Guest data waiting for the host socket.
    pub rx_buf: Vec<u8>,
    /// Host data waiting for guest credit.
    pub tx_buf: Vec<u8>,
    /// Most bytes `tx_buf` may hold.
    pub tx_capacity: u32,
    /// Shutdown flags the guest sent (`SHUTDOWN_RCV`, `SHUTDOWN_SEND`).
    pub peer_shutdown: u32,
    /// `SHUTDOWN_SEND` once the host side said it will send no more (its socket reached end of
    /// file).
    #[serde(default)]
    pub local_shutdown: u32,
}

/// A packet for the guest: its header and payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutPacket {
    /// The header.
    pub header: Header,
    /// The payload (empty except for data packets).
    pub payload: Vec<u8>,
}

/// One vsock stream connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    state: ConnectionState,
}

impl Connection {
    fn new(guest_cid: u64, local_port: u32, peer_port: u32, buf_alloc: u32, phase: Phase) -> Self {
        Self {
            state: ConnectionState {
                guest_cid,
                local_port,
                peer_port,
                phase,
                pending: PendingControl::default(),
                buf_alloc,
                fwd_cnt: 0,
                announced_fwd_cnt: 0,
                peer_buf_alloc: 0,
                peer_fwd_cnt: 0,
                tx_cnt: 0,
                rx_buf: Vec::new(),
                tx_buf: Vec::new(),
                tx_capacity: buf_alloc,
                peer_shutdown: 0,
                local_shutdown: 0,
            },
        }
    }

    /// A connection the host opens to `peer_port` of the guest (the hybrid `CONNECT` path); a
    /// request is queued for the guest. Both buffers hold at most `buf_alloc` bytes.
    pub fn connect(guest_cid: u64, local_port: u32, peer_port: u32, buf_alloc: u32) -> Self {
        let mut conn = Self::new(
            guest_cid,
            local_port,
            peer_port,
            buf_alloc,
            Phase::LocalInit,
        );
        conn.state.pending.request = true;
        conn
    }

    /// A connection the guest asked for with `request` (an [`Op::Request`] to a port the host
    /// listens on); it is established and a response is queued.
    pub fn accept(request: &Header, buf_alloc: u32) -> Self {
        let mut conn = Self::new(
            request.src_cid,
            request.dst_port,
            request.src_port,
            buf_alloc,
            Phase::Established,
        );
        conn.take_credit(request);
        conn.state.pending.response = true;
        conn
    }

    /// Rebuilds a connection from captured state.
    pub fn from_state(state: ConnectionState) -> Self {
        Self { state }
    }

    /// The connection's state.
    pub fn state(&self) -> &ConnectionState {
        &self.state
    }

    /// The life phase.
    pub fn phase(&self) -> Phase {
        self.state.phase
    }

    /// Whether the connection is finished and can be dropped.
    pub fn is_closed(&self) -> bool {
        self.state.phase == Phase::Closed
    }

    /// Resets the connection: a reset goes to the guest, buffers are dropped.
    pub fn reset(&mut self) {
        if self.state.phase != Phase::Closed {
            self.state.pending = PendingControl {
                rst: true,
                ..PendingControl::default()
            };
            self.state.rx_buf.clear();
            self.state.tx_buf.clear();
            self.state.phase = Phase::Closing;
        }
    }

    fn take_credit(&mut self, header: &Header) {
        self.state.peer_buf_alloc = header.buf_alloc;
        self.state.peer_fwd_cnt = header.fwd_cnt;
    }

    /// Bytes the guest can still take.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.state.tx_cnt.wrapping_sub(self.state.peer_fwd_cnt);
        // A guest that claims to have consumed more than was sent gets no credit.
        self.state.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Bytes of our receive buffer the guest may still fill, as the guest last learned it.
    fn rx_free(&self) -> u32 {
        let unacked = u32::try_from(self.state.rx_buf.len()).unwrap_or(u32::MAX);
        self.state.buf_alloc.saturating_sub(unacked)
    }

    /// Handles a packet from the guest addressed to this connection. `payload` is the packet's
    /// data (exactly `header.len` bytes for [`Op::Rw`], else empty); any violation resets.
    pub fn on_guest_packet(&mut self, header: &Header, payload: &[u8]) {
        let st = &mut self.state;
        if st.phase == Phase::Closed {
            return;
        }
        if header.op == Op::Rst {
            st.phase = Phase::Closed;
            st.pending = PendingControl::default();
            return;
        }
        if st.pending.rst {
            return;
        }
        self.take_credit(header);
        let st = &mut self.state;
        match (st.phase, header.op) {
            (Phase::LocalInit, Op::Response) => {
                st.phase = Phase::Established;
                st.pending.request = false;
            }
            (Phase::Established | Phase::Closing, Op::Rw) => {
                let fits = usize::try_from(header.len).is_ok_and(|len| len == payload.len())
                    && header.len <= self.rx_free();
                let st = &mut self.state;
                if !fits {
                    return self.violation(header, "data beyond its credit");
                }
                if st.peer_shutdown & SHUTDOWN_SEND != 0 {
                    return self.violation(header, "data after its shutdown");
                }
                if st.phase == Phase::Established {
                    st.rx_buf.extend_from_slice(payload);
                }
            }
            (Phase::Established | Phase::Closing, Op::CreditUpdate) => {}
            (Phase::Established | Phase::Closing, Op::CreditRequest) => {
                st.pending.credit_update = true;
            }
            (Phase::Established, Op::Shutdown) => {
                st.peer_shutdown |= header.flags & SHUTDOWN_BOTH;
                self.end_if_done();
            }
            (Phase::Closing, Op::Shutdown) => {
                st.phase = Phase::Closed;
                st.pending = PendingControl::default();
            }
            _ => self.violation(header, "a packet its phase does not allow"),
        }
    }

    /// Resets the connection after the guest broke the protocol, and says so in the log (a
    /// connection the guest sees reset for no reason of its own is otherwise hard to explain).
    /// The guest chooses how often this happens, so only the first [`LOGGED_VIOLATIONS`] of
    /// the process are logged.
    fn violation(&mut self, header: &Header, what: &str) {
        let seen = VIOLATIONS_SEEN.fetch_add(1, Ordering::Relaxed);
        if seen < LOGGED_VIOLATIONS {
            tracing::warn!(
                guest_port = self.state.peer_port,
                host_port = self.state.local_port,
                op = ?header.op,
                len = header.len,
                phase = ?self.state.phase,
                "vsock: the guest sent {what}; connection reset"
            );
            if seen + 1 == LOGGED_VIOLATIONS {
                tracing::warn!("vsock: further protocol violations of the guest are not logged");
            }
        }
        self.reset();
    }

    /// Whether host data may still be taken for the guest.
    fn send_open(&self) -> bool {
        let st = &self.state;
        matches!(st.phase, Phase::LocalInit | Phase::Established)
            && st.peer_shutdown & SHUTDOWN_RCV == 0
            && st.local_shutdown & SHUTDOWN_SEND == 0
            && !st.pending.shutdown
            && !st.pending.rst
    }

    /// How many bytes of host data are worth reading for the guest now: what the guest's credit
    /// covers beyond the data already buffered, within the buffer's room. Zero until the
    /// connection is established and once the direction is shut down.
    pub fn send_window(&self) -> usize {
        let st = &self.state;
        if st.phase != Phase::Established || !self.send_open() {
            return 0;
        }
        let buffered = st.tx_buf.len();
        let room = (st.tx_capacity as usize).saturating_sub(buffered);
        (self.peer_credit() as usize)
            .saturating_sub(buffered)
            .min(room)
    }

    /// Accepts host data for the guest; returns how many bytes of `data` were taken (the rest
    /// must be offered again later). Nothing is taken once either side shut the direction down.
    pub fn send(&mut self, data: &[u8]) -> usize {
        if !self.send_open() {
            return 0;
        }
        let st = &mut self.state;
        let room = (st.tx_capacity as usize).saturating_sub(st.tx_buf.len());
        let n = room.min(data.len());
        st.tx_buf.extend_from_slice(&data[..n]);
        n
    }

    /// Takes up to `max` bytes of guest data for the host socket. Consuming data returns credit
    /// to the guest; a credit update is queued once half the buffer was freed unannounced.
    pub fn recv(&mut self, max: usize) -> Vec<u8> {
        let n = max.min(self.state.rx_buf.len());
        let data = self.state.rx_buf[..n].to_vec();
        self.consume(n);
        data
    }

    /// Guest data waiting for the host socket, for writing it in place; [`consume`] what was
    /// written.
    ///
    /// [`consume`]: Connection::consume
    pub fn rx_data(&self) -> &[u8] {
        &self.state.rx_buf
    }

    /// Drops the first `n` bytes of [`rx_data`] (at most all of it) once the host socket took
    /// them; returns how many were dropped. Like [`recv`], this returns credit to the guest.
    ///
    /// [`rx_data`]: Connection::rx_data
    /// [`recv`]: Connection::recv
    pub fn consume(&mut self, n: usize) -> usize {
        let st = &mut self.state;
        let n = n.min(st.rx_buf.len());
        st.rx_buf.drain(..n);
        // `n` is at most the buffer, which is at most `buf_alloc`: it fits a u32.
        st.fwd_cnt = st.fwd_cnt.wrapping_add(n as u32);
        if st.fwd_cnt.wrapping_sub(st.announced_fwd_cnt) >= st.buf_alloc / 2 && n > 0 {
            st.pending.credit_update = true;
        }
        self.end_if_done();
        n
    }

    /// Whether the host told the guest it sends no more (the shutdown went out).
    fn local_send_done(&self) -> bool {
        self.state.local_shutdown & SHUTDOWN_SEND != 0 && !self.state.pending.shutdown_send
    }

    /// Ends an established connection when nothing can flow any more: the guest shut both
    /// directions, or both sides said they send no more, and the host took all guest data.
    fn end_if_done(&mut self) {
        let st = &self.state;
        let guest_done = st.peer_shutdown == SHUTDOWN_BOTH
            || (st.peer_shutdown & SHUTDOWN_SEND != 0 && self.local_send_done());
        if st.phase == Phase::Established && guest_done && st.rx_buf.is_empty() {
            self.reset();
        }
    }

    /// The host side will send no more (its socket reached end of file) but still receives:
    /// once the buffered host data has gone to the guest, a shutdown with `SHUTDOWN_SEND` tells
    /// the guest. When the guest has also stopped sending, the connection ends with a reset.
    pub fn shutdown_send(&mut self) {
        let st = &mut self.state;
        if matches!(st.phase, Phase::LocalInit | Phase::Established)
            && st.local_shutdown & SHUTDOWN_SEND == 0
        {
            st.local_shutdown |= SHUTDOWN_SEND;
            st.pending.shutdown_send = true;
        }
    }

    /// The host side closed: once the buffered host data has gone to the guest, a full shutdown
    /// follows, and the connection closes when the guest answers (the device should [`reset`]
    /// it after a timeout if the guest never does).
    ///
    /// [`reset`]: Connection::reset
    pub fn close(&mut self) {
        let st = &mut self.state;
        match st.phase {
            Phase::LocalInit => self.reset(),
            Phase::Established => {
                st.pending.shutdown = true;
                st.pending.shutdown_send = false;
                st.pending.credit_update = false;
                st.rx_buf.clear();
            }
            Phase::Closing | Phase::Closed => {}
        }
    }

    /// Whether [`next_packet`](Connection::next_packet) has something to send.
    pub fn has_packet(&self) -> bool {
        let st = &self.state;
        let p = st.pending;
        p.rst
            || p.request
            || p.response
            || p.credit_update
            || (st.phase == Phase::Established && !st.tx_buf.is_empty() && self.peer_credit() > 0)
            || (p.shutdown && st.tx_buf.is_empty())
            || (p.shutdown_send && st.phase == Phase::Established && st.tx_buf.is_empty())
    }

    fn header(&mut self, op: Op, len: u32, flags: u32) -> Header {
        let st = &mut self.state;
        st.announced_fwd_cnt = st.fwd_cnt;
        Header {
            src_cid: HOST_CID,
            dst_cid: st.guest_cid,
            src_port: st.local_port,
            dst_port: st.peer_port,
            len,
            op,
            flags,
            buf_alloc: st.buf_alloc,
            fwd_cnt: st.fwd_cnt,
        }
    }

    /// The next packet for the guest, with at most `max_payload` data bytes, or `None`.
    /// Control packets go first; data only as far as the guest's credit reaches.
    pub fn next_packet(&mut self, max_payload: u32) -> Option<OutPacket> {
        let control = |header| OutPacket {
            header,
            payload: Vec::new(),
        };
        let p = self.state.pending;
        if p.rst {
            self.state.pending.rst = false;
            self.state.phase = Phase::Closed;
            return Some(control(self.header(Op::Rst, 0, 0)));
        }
        if p.request {
            self.state.pending.request = false;
            return Some(control(self.header(Op::Request, 0, 0)));
        }
        if p.response {
            self.state.pending.response = false;
            return Some(control(self.header(Op::Response, 0, 0)));
        }
        if self.state.phase == Phase::Established && !self.state.tx_buf.is_empty() {
            let credit = self.peer_credit().min(max_payload);
            let n = (credit as usize).min(self.state.tx_buf.len());
            if n > 0 {
                let payload: Vec<u8> = self.state.tx_buf.drain(..n).collect();
                self.state.tx_cnt = self.state.tx_cnt.wrapping_add(n as u32);
                self.state.pending.credit_update = false;
                let header = self.header(Op::Rw, n as u32, 0);
                return Some(OutPacket { header, payload });
            }
        }
        if p.shutdown_send && self.state.phase == Phase::Established && self.state.tx_buf.is_empty()
        {
            self.state.pending.shutdown_send = false;
            let header = self.header(Op::Shutdown, 0, SHUTDOWN_SEND);
            self.end_if_done();
            return Some(control(header));
        }
        if p.shutdown && self.state.tx_buf.is_empty() {
            self.state.pending.shutdown = false;
            self.state.phase = Phase::Closing;
            return Some(control(self.header(Op::Shutdown, 0, SHUTDOWN_BOTH)));
        }
        if p.credit_update {
            self.state.pending.credit_update = false;
            return Some(control(self.header(Op::CreditUpdate, 0, 0)));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: u64 = 3;

    fn guest(op: Op, len: u32, flags: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port: 1025,
            dst_port: 52,
            len,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        }
    }

    fn drain(conn: &mut Connection) -> Vec<OutPacket> {
        std::iter::from_fn(|| conn.next_packet(4096)).collect()
    }

    fn ops(packets: &[OutPacket]) -> Vec<Op> {
        packets.iter().map(|p| p.header.op).collect()
    }

    #[test]
    fn guest_connects_and_data_flows_both_ways() {
        let mut conn = Connection::accept(&guest(Op::Request, 0, 0, 1000, 0), 8192);
        let out = drain(&mut conn);
        assert_eq!(ops(&out), [Op::Response]);
        let h = out[0].header;
        assert_eq!(
            (h.src_cid, h.dst_cid, h.src_port, h.dst_port),
            (2, 3, 52, 1025)
        );
        assert_eq!(h.buf_alloc, 8192);

        conn.on_guest_packet(&guest(Op::Rw, 5, 0, 1000, 0), b"hello");
        assert_eq!(conn.recv(100), b"hello");

        // Host to guest: limited by the guest's credit of 1000 bytes.
        assert_eq!(conn.send_window(), 1000);
        assert_eq!(conn.send(&[7u8; 3000]), 3000);
        assert_eq!(
            conn.send_window(),
            0,
            "more buffered than the guest can take"
        );
        let out = drain(&mut conn);
        assert_eq!(ops(&out), [Op::Rw]);
        assert_eq!(out[0].payload.len(), 1000);
        assert_eq!(out[0].header.fwd_cnt, 5);
        assert_eq!(conn.peer_credit(), 0);
        // The guest consumed 600 bytes: 600 more may go.
        conn.on_guest_packet(&guest(Op::CreditUpdate, 0, 0, 1000, 600), &[]);
        let out = drain(&mut conn);
        assert_eq!(ops(&out), [Op::Rw]);
        assert_eq!(out[0].payload.len(), 600);
        assert_eq!(conn.state().tx_buf.len(), 1400);
    }

    #[test]
    fn host_connects_and_waits_for_the_response() {
        let mut conn = Connection::connect(GUEST, 2000, 52, 4096);
        assert_eq!(ops(&drain(&mut conn)), [Op::Request]);
        assert_eq!(conn.send(b"early"), 5);
        assert!(drain(&mut conn).is_empty(), "no data before the response");
        let mut response = guest(Op::Response, 0, 0, 4096, 0);
        response.dst_port = 2000;
        response.src_port = 52;
        conn.on_guest_packet(&response, &[]);
        assert_eq!(conn.phase(), Phase::Established);
        let out = drain(&mut conn);
        assert_eq!(ops(&out), [Op::Rw]);
        assert_eq!(out[0].payload, b"early");
    }

    #[test]
    fn a_guest_overrunning_its_credit_is_reset() {
        let mut conn = Connection::accept(&guest(Op::Request, 0, 0, 1000, 0), 16);
        drain(&mut conn);
        conn.on_guest_packet(&guest(Op::Rw, 10, 0, 1000, 0), &[1; 10]);
        conn.on_guest_packet(&guest(Op::Rw, 10, 0, 1000, 0), &[1; 10]);
        assert_eq!(ops(&drain(&mut conn)), [Op::Rst]);
        assert!(conn.is_closed());
        assert!(conn.state().rx_buf.is_empty());
    }

    #[test]
    fn violations_reset() {
        let request = guest(Op::Request, 0, 0, 1000, 0);
        // Payload shorter than announced.
        let mut conn = Connection::accept(&request, 4096);
        conn.on_guest_packet(&guest(Op::Rw, 10, 0, 1000, 0), &[1; 4]);
        assert_eq!(ops(&drain(&mut conn)), [Op::Rst]);
        // A second request on an established connection.
        let mut conn = Connection::accept(&request, 4096);
        drain(&mut conn);
        conn.on_guest_packet(&request, &[]);
        assert_eq!(ops(&drain(&mut conn)), [Op::Rst]);
        // Data after the guest said it would send no more.
        let mut conn = Connection::accept(&request, 4096);
        drain(&mut conn);
        conn.on_guest_packet(&guest(Op::Shutdown, 0, SHUTDOWN_SEND, 1000, 0), &[]);
        conn.on_guest_packet(&guest(Op::Rw, 1, 0, 1000, 0), &[1]);
        assert_eq!(ops(&drain(&mut conn)), [Op::Rst]);
        // A guest claiming to have consumed more than was sent gets no credit.
        let mut conn = Connection::accept(&guest(Op::Request, 0, 0, 100, 0), 4096);
        conn.send(&[0; 80]);
        drain(&mut conn);
        assert_eq!(conn.peer_credit(), 20);
        conn.on_guest_packet(&guest(Op::CreditUpdate, 0, 0, 100, 50), &[]);
        assert_eq!(conn.peer_credit(), 70);
        conn.on_guest_packet(&guest(Op::CreditUpdate, 0, 0, 100, 500), &[]);
        assert_eq!(conn.peer_credit(), 0);
    }

    #[test]
    fn credit_requests_and_updates() {
        let mut conn = Connection::accept(&guest(Op::Request, 0, 0, 1000, 0), 100);
        drain(&mut conn);
        conn.on_guest_packet(&guest(Op::CreditRequest, 0, 0, 1000, 0), &[]);
        let out = drain(&mut conn);
        assert_eq!(ops(&out), [Op::CreditUpdate]);
        assert_eq!((out[0].header.buf_alloc, out[0].header.fwd_cnt), (100, 0));
        conn.on_guest_packet(&guest(Op::Rw, 60, 0, 1000, 0), &[0; 60]);
        assert_eq!(conn.recv(30).len(), 30);
        assert!(
            drain(&mut conn).is_empty(),
            "30 of 100 freed: no update yet"
        );
        assert_eq!(conn.recv(30).len(), 30);
        let out = drain(&mut conn);
        assert_eq!(ops(&out), [Op::CreditUpdate]);
        assert_eq!(out[0].header.fwd_cnt, 60);
    }

    #[test]
    fn host_close_drains_then_shuts_down_and_guest_rst_closes() {
        let mut conn = Connection::accept(&guest(Op::Request, 0, 0, 10, 0), 4096);
        drain(&mut conn);
        conn.send(&[1; 15]);
        conn.close();
        assert_eq!(conn.send(b"late"), 0);
        assert_eq!(ops(&drain(&mut conn)), [Op::Rw]);
        conn.on_guest_packet(&guest(Op::CreditUpdate, 0, 0, 10, 10), &[]);
        let out = drain(&mut conn);
        assert_eq!(ops(&out), [Op::Rw, Op::Shutdown]);
        assert_eq!(out[1].header.flags, SHUTDOWN_BOTH);
        assert_eq!(conn.phase(), Phase::Closing);
        conn.on_guest_packet(&guest(Op::Rst, 0, 0, 10, 15), &[]);
        assert!(conn.is_closed());
        assert!(drain(&mut conn).is_empty());
    }

    #[test]
    fn guest_full_shutdown_ends_after_the_host_took_the_data() {
        let mut conn = Connection::accept(&guest(Op::Request, 0, 0, 10, 0), 4096);
        drain(&mut conn);
        conn.on_guest_packet(&guest(Op::Rw, 3, 0, 10, 0), b"bye");
        conn.on_guest_packet(&guest(Op::Shutdown, 0, SHUTDOWN_BOTH, 10, 0), &[]);
        assert_eq!(conn.phase(), Phase::Established);
        assert_eq!(conn.recv(10), b"bye");
        assert_eq!(ops(&drain(&mut conn)), [Op::Rst]);
        assert!(conn.is_closed());
    }

    #[test]
    fn host_half_close_keeps_receiving_and_ends_when_the_guest_stops_too() {
        let mut conn = Connection::accept(&guest(Op::Request, 0, 0, 100, 0), 4096);
        drain(&mut conn);
        conn.send(b"last words");
        conn.shutdown_send();
        assert_eq!(conn.send(b"more"), 0, "nothing is taken after end of file");
        let out = drain(&mut conn);
        assert_eq!(ops(&out), [Op::Rw, Op::Shutdown]);
        assert_eq!(out[1].header.flags, SHUTDOWN_SEND);
        assert_eq!(conn.phase(), Phase::Established);
        // The guest still sends; the host takes it in place.
        conn.on_guest_packet(&guest(Op::Rw, 5, 0, 100, 10), b"reply");
        assert_eq!(conn.rx_data(), b"reply");
        assert_eq!(conn.consume(3), 3);
        assert_eq!(conn.rx_data(), b"ly");
        // The guest stops sending: once the host took the rest, the connection ends.
        conn.on_guest_packet(&guest(Op::Shutdown, 0, SHUTDOWN_SEND, 100, 10), &[]);
        assert_eq!(conn.phase(), Phase::Established);
        assert_eq!(conn.consume(10), 2);
        assert_eq!(ops(&drain(&mut conn)), [Op::Rst]);
        assert!(conn.is_closed());

        // The other order: the guest stopped first, the host's end of file finishes it.
        let mut conn = Connection::accept(&guest(Op::Request, 0, 0, 100, 0), 4096);
        drain(&mut conn);
        conn.on_guest_packet(&guest(Op::Shutdown, 0, SHUTDOWN_SEND, 100, 0), &[]);
        assert_eq!(conn.send(b"x"), 1, "the guest still receives");
        conn.shutdown_send();
        assert_eq!(ops(&drain(&mut conn)), [Op::Rw, Op::Shutdown, Op::Rst]);
        assert!(conn.is_closed());
    }

    #[derive(Clone, Debug)]
    enum Step {
        Guest(u16, u32, u32, u32, u32, Vec<u8>),
        Send(usize),
        Recv(usize),
        Close,
        HalfClose,
        Reset,
        Pull(u32),
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            (
                1u16..=7,
                0u32..300,
                0u32..4,
                any::<u32>(),
                any::<u32>(),
                proptest::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(op, len, flags, buf, fwd, data)| Step::Guest(
                    op, len, flags, buf, fwd, data
                )),
            (0usize..500).prop_map(Step::Send),
            (0usize..500).prop_map(Step::Recv),
            Just(Step::Close),
            Just(Step::HalfClose),
            Just(Step::Reset),
            (0u32..300).prop_map(Step::Pull),
        ]
    }

    proptest::proptest! {
        /// Whatever the guest sends and whatever the host does, nothing panics, both buffers
        /// stay bounded, data never exceeds the guest's credit, and every packet is addressed
        /// to the connection's guest port.
        #[test]
        fn any_sequence_keeps_the_invariants(
            host_first in proptest::bool::ANY,
            steps in proptest::collection::vec(step(), 0..60),
        ) {
            let mut conn = if host_first {
                Connection::connect(GUEST, 52, 1025, 256)
            } else {
                Connection::accept(&guest(Op::Request, 0, 0, 300, 0), 256)
            };
            for s in steps {
                match s {
                    Step::Guest(op, len, flags, buf, fwd, data) => {
                        let op = Op::from_raw(op).expect("1..=7");
                        let len = if op == Op::Rw { len } else { 0 };
                        let payload = if op == Op::Rw { &data[..] } else { &[] };
                        conn.on_guest_packet(&guest(op, len, flags, buf, fwd), payload);
                    }
                    Step::Send(n) => {
                        conn.send(&vec![1u8; n]);
                    }
                    Step::Recv(n) => {
                        conn.recv(n);
                    }
                    Step::Close => conn.close(),
                    Step::HalfClose => conn.shutdown_send(),
                    Step::Reset => conn.reset(),
                    Step::Pull(max) => {
                        let credit = conn.peer_credit();
                        if let Some(p) = conn.next_packet(max) {
                            proptest::prop_assert_eq!(p.header.dst_port, 1025);
                            proptest::prop_assert_eq!(p.header.dst_cid, GUEST);
                            proptest::prop_assert_eq!(p.header.len as usize, p.payload.len());
                            proptest::prop_assert!(p.header.len <= credit.min(max));
                        }
                    }
                }
                let st = conn.state();
                proptest::prop_assert!(st.rx_buf.len() <= st.buf_alloc as usize);
                proptest::prop_assert!(st.tx_buf.len() <= st.tx_capacity as usize);
            }
        }
    }

    #[test]
    fn state_round_trips() {
        let mut conn = Connection::accept(&guest(Op::Request, 0, 0, 10, 0), 4096);
        conn.send(b"pending");
        let copy = Connection::from_state(conn.state().clone());
        assert_eq!(copy, conn);
    }
}
