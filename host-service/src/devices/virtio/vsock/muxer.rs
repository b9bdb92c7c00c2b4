//! The connection table of one vsock device, as pure logic: it routes the guest's packets to
//! their [`Connection`], opens connections to the ports the host listens on, answers packets for
//! unknown connections with a reset, allocates host ports for host-initiated connections, and
//! hands out the packets for the guest fairly across connections.
//!
//! Guest input is bounded: at most [`MuxerConfig::max_connections`] connections, and the resets
//! for unknown connections wait in a queue of at most [`MAX_PENDING_RESETS`] (older ones are
//! dropped; a reset is advisory).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Bound::{Excluded, Unbounded};

use serde::{Deserialize, Serialize};

use super::connection::{Connection, ConnectionState, HOST_CID, OutPacket, Phase};
use super::packet::{Header, Op};

/// Most resets for unknown connections waiting to go to the guest.
pub const MAX_PENDING_RESETS: usize = 64;
/// First host port handed to host-initiated connections (as Firecracker does).
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// A connection's key: the host-side port and the guest-side port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ConnKey {
    /// Host-side port.
    pub local_port: u32,
    /// Guest-side port.
    pub peer_port: u32,
}

/// Limits and identity of the device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MuxerConfig {
    /// The guest's context id.
    pub guest_cid: u64,
    /// Receive and send buffer size of each connection.
    pub buf_alloc: u32,
    /// Most simultaneous connections.
    pub max_connections: usize,
}

/// The muxer's serialisable state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MuxerState {
    /// Limits and identity.
    pub config: MuxerConfig,
    /// Host ports the host listens on.
    pub listeners: BTreeSet<u32>,
    /// The connections.
    pub connections: Vec<(ConnKey, ConnectionState)>,
    /// The next host port to try for a host-initiated connection.
    pub next_local_port: u32,
}

/// What a guest packet did, for the device to act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MuxEvent {
    /// Nothing the device needs to do.
    None,
    /// The guest connected to a listening port: open the host side of `key`.
    Accepted(ConnKey),
    /// The guest accepted a host-initiated connection ([`Muxer::connect`]).
    Connected(ConnKey),
    /// A connection was reset or finished: close its host side.
    Closed(ConnKey),
}

/// Why a guest packet was dropped.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MuxError {
    /// The packet is not from this guest to the host.
    #[error("vsock packet from cid {src} to cid {dst} on the device of guest {guest}")]
    Addressing {
        /// Source cid.
        src: u64,
        /// Destination cid.
        dst: u64,
        /// This device's guest cid.
        guest: u64,
    },
    /// The announced payload length does not match the buffer.
    #[error("vsock packet announces {announced} payload bytes but carries {actual}")]
    Length {
        /// Length from the header.
        announced: u32,
        /// Bytes present.
        actual: usize,
    },
    /// No free host port for a host-initiated connection, or too many connections.
    #[error("no room for another vsock connection")]
    Full,
}

/// The connection table of one vsock device.
#[derive(Debug)]
pub struct Muxer {
    config: MuxerConfig,
    listeners: BTreeSet<u32>,
    conns: BTreeMap<ConnKey, Connection>,
    resets: VecDeque<Header>,
    next_local_port: u32,
    /// Where the fair scan of connections resumes.
    cursor: Option<ConnKey>,
}

impl Muxer {
    /// An empty table.
    pub fn new(config: MuxerConfig) -> Self {
        Self {
            config,
            listeners: BTreeSet::new(),
            conns: BTreeMap::new(),
            resets: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            cursor: None,
        }
    }

    /// Rebuilds a table from captured state.
    pub fn restore(state: MuxerState) -> Self {
        let mut muxer = Self::new(state.config);
        muxer.listeners = state.listeners;
        muxer.next_local_port = state.next_local_port;
        muxer.conns = state
            .connections
            .into_iter()
            .map(|(key, st)| (key, Connection::from_state(st)))
            .collect();
        muxer
    }

    /// Captures the table's state (pending resets for unknown connections are not kept).
    pub fn state(&self) -> MuxerState {
        MuxerState {
            config: self.config.clone(),
            listeners: self.listeners.clone(),
            connections: self
                .conns
                .iter()
                .map(|(k, c)| (*k, c.state().clone()))
                .collect(),
            next_local_port: self.next_local_port,
        }
    }

    /// The guest's context id.
    pub fn guest_cid(&self) -> u64 {
        self.config.guest_cid
    }

    /// Gives the guest another context id (a restored clone); packets addressed with the old
    /// one are refused from now on.
    pub fn set_guest_cid(&mut self, guest_cid: u64) {
        self.config.guest_cid = guest_cid;
    }

    /// Accepts guest connections to host port `port` from now on.
    pub fn listen(&mut self, port: u32) {
        self.listeners.insert(port);
    }

    /// The connection of `key`, if any.
    pub fn connection(&mut self, key: ConnKey) -> Option<&mut Connection> {
        self.conns.get_mut(&key)
    }

    /// Number of connections.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether there are no connections.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Opens a host-initiated connection to guest port `peer_port` on a free host port.
    pub fn connect(&mut self, peer_port: u32) -> Result<ConnKey, MuxError> {
        if self.conns.len() >= self.config.max_connections {
            return Err(MuxError::Full);
        }
        for _ in 0..=self.conns.len() {
            let local_port = self.next_local_port;
            self.next_local_port = local_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            let key = ConnKey {
                local_port,
                peer_port,
            };
            if self.listeners.contains(&local_port) || self.conns.contains_key(&key) {
                continue;
            }
            let conn = Connection::connect(
                self.config.guest_cid,
                local_port,
                peer_port,
                self.config.buf_alloc,
            );
            self.conns.insert(key, conn);
            return Ok(key);
        }
        Err(MuxError::Full)
    }

    fn queue_reset(&mut self, to: &Header) {
        if self.resets.len() >= MAX_PENDING_RESETS {
            self.resets.pop_front();
        }
        self.resets.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.config.guest_cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            len: 0,
            op: Op::Rst,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    /// Handles one packet from the guest's transmit queue: `h` is its validated header,
    /// `payload` its data.
    pub fn on_guest_packet(&mut self, h: &Header, payload: &[u8]) -> Result<MuxEvent, MuxError> {
        if h.src_cid != self.config.guest_cid || h.dst_cid != HOST_CID {
            return Err(MuxError::Addressing {
                src: h.src_cid,
                dst: h.dst_cid,
                guest: self.config.guest_cid,
            });
        }
        if usize::try_from(h.len).ok() != Some(payload.len()) {
            return Err(MuxError::Length {
                announced: h.len,
                actual: payload.len(),
            });
        }
        let key = ConnKey {
            local_port: h.dst_port,
            peer_port: h.src_port,
        };
        if let Some(conn) = self.conns.get_mut(&key) {
            let was = conn.phase();
            conn.on_guest_packet(h, payload);
            if conn.is_closed() {
                self.conns.remove(&key);
                return Ok(MuxEvent::Closed(key));
            }
            if was == Phase::LocalInit && conn.phase() == Phase::Established {
                return Ok(MuxEvent::Connected(key));
            }
            return Ok(MuxEvent::None);
        }
        match h.op {
            Op::Rst => Ok(MuxEvent::None),
            Op::Request
                if self.listeners.contains(&h.dst_port)
                    && self.conns.len() < self.config.max_connections =>
            {
                self.conns
                    .insert(key, Connection::accept(h, self.config.buf_alloc));
                Ok(MuxEvent::Accepted(key))
            }
            _ => {
                self.queue_reset(h);
                Ok(MuxEvent::None)
            }
        }
    }

    /// Drops every connection and pending reset (the device was reset); returns the keys of
    /// the dropped connections so the host side can close them. Listening ports stay.
    pub fn drop_connections(&mut self) -> Vec<ConnKey> {
        self.resets.clear();
        self.cursor = None;
        std::mem::take(&mut self.conns).into_keys().collect()
    }

    /// Whether [`next_packet`](Muxer::next_packet) has something to send.
    pub fn has_packet(&self) -> bool {
        !self.resets.is_empty() || self.conns.values().any(Connection::has_packet)
    }

    /// The next packet for the guest's receive queue, with at most `max_payload` data bytes:
    /// resets for unknown connections first, then the connections in turn, starting after the
    /// one served last. Connections that finished are dropped and reported in `closed`.
    pub fn next_packet(
        &mut self,
        max_payload: u32,
        closed: &mut Vec<ConnKey>,
    ) -> Option<OutPacket> {
        if let Some(header) = self.resets.pop_front() {
            return Some(OutPacket {
                header,
                payload: Vec::new(),
            });
        }
        let after: Vec<ConnKey> = match self.cursor {
            // Strictly after the cursor, then from the start: the cursor's connection may be
            // gone by now.
            Some(c) => self
                .conns
                .range((Excluded(c), Unbounded))
                .chain(self.conns.range(..=c))
                .map(|(k, _)| *k)
                .collect(),
            None => self.conns.keys().copied().collect(),
        };
        for key in after {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let packet = if conn.has_packet() {
                conn.next_packet(max_payload)
            } else {
                None
            };
            if conn.is_closed() {
                self.conns.remove(&key);
                closed.push(key);
            }
            if packet.is_some() {
                self.cursor = Some(key);
                return packet;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::super::packet::SHUTDOWN_BOTH;
    use super::*;

    const GUEST: u64 = 3;

    fn muxer() -> Muxer {
        let mut m = Muxer::new(MuxerConfig {
            guest_cid: GUEST,
            buf_alloc: 4096,
            max_connections: 2,
        });
        m.listen(52);
        m
    }

    fn from_guest(op: Op, src_port: u32, dst_port: u32, len: u32) -> Header {
        Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            op,
            flags: if op == Op::Shutdown { SHUTDOWN_BOTH } else { 0 },
            buf_alloc: 4096,
            fwd_cnt: 0,
        }
    }

    fn drain(m: &mut Muxer) -> Vec<(Op, u32, u32)> {
        let mut closed = Vec::new();
        std::iter::from_fn(|| m.next_packet(4096, &mut closed))
            .map(|p| (p.header.op, p.header.src_port, p.header.dst_port))
            .collect()
    }

    #[test]
    fn listening_ports_accept_and_others_reset() {
        let mut m = muxer();
        let key = ConnKey {
            local_port: 52,
            peer_port: 1025,
        };
        assert_eq!(
            m.on_guest_packet(&from_guest(Op::Request, 1025, 52, 0), &[]),
            Ok(MuxEvent::Accepted(key))
        );
        assert_eq!(
            m.on_guest_packet(&from_guest(Op::Request, 1026, 53, 0), &[]),
            Ok(MuxEvent::None)
        );
        // Data for a connection that does not exist.
        assert_eq!(
            m.on_guest_packet(&from_guest(Op::Rw, 1027, 52, 2), b"hi"),
            Ok(MuxEvent::None)
        );
        assert_eq!(
            drain(&mut m),
            [
                (Op::Rst, 53, 1026),
                (Op::Rst, 52, 1027),
                (Op::Response, 52, 1025)
            ]
        );
        assert_eq!(
            m.on_guest_packet(&from_guest(Op::Rw, 1025, 52, 3), b"abc"),
            Ok(MuxEvent::None)
        );
        assert_eq!(m.connection(key).expect("conn").recv(10), b"abc");
        assert_eq!(
            m.on_guest_packet(&from_guest(Op::Rst, 1025, 52, 0), &[]),
            Ok(MuxEvent::Closed(key))
        );
        assert!(m.is_empty());
    }

    #[test]
    fn bad_packets_are_dropped_with_an_error() {
        let mut m = muxer();
        assert_eq!(
            m.on_guest_packet(&from_guest(Op::Rw, 1, 52, 5), b"ab"),
            Err(MuxError::Length {
                announced: 5,
                actual: 2
            })
        );
        let mut spoofed = from_guest(Op::Request, 1, 52, 0);
        spoofed.src_cid = 7;
        assert!(matches!(
            m.on_guest_packet(&spoofed, &[]),
            Err(MuxError::Addressing { .. })
        ));
        assert!(m.is_empty());
        assert!(drain(&mut m).is_empty());
    }

    #[test]
    fn connection_limit_and_host_connections() {
        let mut m = muxer();
        let a = m.connect(52).expect("first");
        assert_eq!(a.local_port, FIRST_LOCAL_PORT);
        // The guest answers before the request was even fetched: the request is dropped.
        assert_eq!(
            m.on_guest_packet(&from_guest(Op::Response, 52, a.local_port, 0), &[]),
            Ok(MuxEvent::Connected(a))
        );
        let b = m.connect(52).expect("second");
        assert_eq!(b.local_port, FIRST_LOCAL_PORT + 1);
        assert_eq!(m.connect(52), Err(MuxError::Full));
        // A guest request beyond the limit is refused with a reset.
        m.on_guest_packet(&from_guest(Op::Request, 1025, 52, 0), &[])
            .expect("handled");
        let out = drain(&mut m);
        assert_eq!(out[0], (Op::Rst, 52, 1025));
        assert_eq!(out[1..], [(Op::Request, b.local_port, 52)]);
    }

    #[test]
    fn resets_for_unknown_connections_are_bounded() {
        let mut m = muxer();
        for port in 0..(MAX_PENDING_RESETS as u32 * 3) {
            m.on_guest_packet(&from_guest(Op::CreditRequest, port, 9, 0), &[])
                .expect("handled");
        }
        assert_eq!(drain(&mut m).len(), MAX_PENDING_RESETS);
    }

    #[test]
    fn connections_take_turns_and_state_round_trips() {
        let mut m = muxer();
        for port in [1025, 1026] {
            m.on_guest_packet(&from_guest(Op::Request, port, 52, 0), &[])
                .expect("accepted");
        }
        drain(&mut m);
        for port in [1025, 1026] {
            let key = ConnKey {
                local_port: 52,
                peer_port: port,
            };
            m.connection(key).expect("conn").send(&[1; 8192]);
        }
        let mut closed = Vec::new();
        let order: Vec<u32> = std::iter::from_fn(|| m.next_packet(1024, &mut closed))
            .map(|p| p.header.dst_port)
            .take(4)
            .collect();
        assert_eq!(order, [1025, 1026, 1025, 1026]);
        // The connection served last goes away: the next one is still served.
        let last = ConnKey {
            local_port: 52,
            peer_port: 1026,
        };
        assert_eq!(
            m.on_guest_packet(&from_guest(Op::Rst, 1026, 52, 0), &[]),
            Ok(MuxEvent::Closed(last))
        );
        let next = m.connect(1027).expect("connect");
        m.connection(ConnKey {
            local_port: 52,
            peer_port: 1025,
        })
        .expect("conn")
        .reset();
        let out = drain(&mut m);
        assert!(
            out.contains(&(Op::Request, next.local_port, 1027)),
            "{out:?}"
        );
        let state = m.state();
        assert_eq!(Muxer::restore(state.clone()).state(), state);
    }
}
