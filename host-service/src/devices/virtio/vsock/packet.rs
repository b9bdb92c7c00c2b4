//! The virtio-vsock packet header (virtio 1.2, section 5.10.6) and its validation.
//!
//! Everything here comes from the guest: a header that is short, of a type other than stream, of
//! an unknown operation or announcing more payload than [`MAX_PAYLOAD`] is refused with a
//! [`PacketError`], never trusted.

use serde::{Deserialize, Serialize};

/// Size of the header on the wire.
pub const HEADER_BYTES: usize = 44;
/// Most payload bytes one packet may carry (Linux uses at most 64 KiB buffers).
pub const MAX_PAYLOAD: u32 = 64 << 10;
/// The only socket type supported: `VIRTIO_VSOCK_TYPE_STREAM`.
pub const TYPE_STREAM: u16 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_RCV`: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_SEND`: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both shutdown flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// A vsock operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Connection request.
    Request,
    /// Connection accepted.
    Response,
    /// Connection reset.
    Rst,
    /// Shutdown of one or both directions.
    Shutdown,
    /// Data.
    Rw,
    /// The sender's credit, unsolicited.
    CreditUpdate,
    /// A request for the receiver's credit.
    CreditRequest,
}

impl Op {
    /// The wire value.
    pub fn to_raw(self) -> u16 {
        match self {
            Self::Request => 1,
            Self::Response => 2,
            Self::Rst => 3,
            Self::Shutdown => 4,
            Self::Rw => 5,
            Self::CreditUpdate => 6,
            Self::CreditRequest => 7,
        }
    }

    /// The operation of a wire value, if it is one.
    pub fn from_raw(raw: u16) -> Option<Self> {
        Some(match raw {
            1 => Self::Request,
            2 => Self::Response,
            3 => Self::Rst,
            4 => Self::Shutdown,
            5 => Self::Rw,
            6 => Self::CreditUpdate,
            7 => Self::CreditRequest,
            _ => return None,
        })
    }
}

/// Why a header was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Fewer than [`HEADER_BYTES`] bytes.
    #[error("vsock header of {0} bytes is too short")]
    Short(usize),
    /// A socket type other than stream.
    #[error("unsupported vsock socket type {0}")]
    Type(u16),
    /// An unknown operation.
    #[error("unknown vsock operation {0}")]
    UnknownOp(u16),
    /// A payload length above [`MAX_PAYLOAD`], or data on a packet that carries none.
    #[error("bad vsock payload length {len} for {op:?}")]
    BadLength {
        /// The operation.
        op: Op,
        /// The announced length.
        len: u32,
    },
}

/// A validated packet header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Operation.
    pub op: Op,
    /// Operation flags (shutdown flags for [`Op::Shutdown`]).
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, in total (wrapping).
    pub fwd_cnt: u32,
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

impl Header {
    /// Parses and validates a header from its wire bytes (extra bytes are ignored).
    pub fn parse(bytes: &[u8]) -> Result<Self, PacketError> {
        if bytes.len() < HEADER_BYTES {
            return Err(PacketError::Short(bytes.len()));
        }
        let kind = le_u16(bytes, 28);
        if kind != TYPE_STREAM {
            return Err(PacketError::Type(kind));
        }
        let raw_op = le_u16(bytes, 30);
        let op = Op::from_raw(raw_op).ok_or(PacketError::UnknownOp(raw_op))?;
        let len = le_u32(bytes, 24);
        if len > MAX_PAYLOAD || (op != Op::Rw && len != 0) {
            return Err(PacketError::BadLength { op, len });
        }
        Ok(Self {
            src_cid: le_u64(bytes, 0),
            dst_cid: le_u64(bytes, 8),
            src_port: le_u32(bytes, 16),
            dst_port: le_u32(bytes, 20),
            len,
            op,
            flags: le_u32(bytes, 32),
            buf_alloc: le_u32(bytes, 36),
            fwd_cnt: le_u32(bytes, 40),
        })
    }

    /// The wire bytes of this header.
    pub fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&TYPE_STREAM.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_raw().to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(op: Op, len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1025,
            dst_port: 52,
            len,
            op,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn header_round_trips() {
        for raw in 1..=7 {
            let op = Op::from_raw(raw).expect("known op");
            let len = if op == Op::Rw { 100 } else { 0 };
            let h = header(op, len);
            assert_eq!(Header::parse(&h.to_bytes()), Ok(h));
        }
    }

    #[test]
    fn bad_headers_are_refused() {
        let mut b = header(Op::Rw, 10).to_bytes();
        assert_eq!(Header::parse(&b[..43]), Err(PacketError::Short(43)));
        b[28] = 2;
        assert_eq!(Header::parse(&b), Err(PacketError::Type(2)));
        let mut b = header(Op::Rw, 10).to_bytes();
        b[30] = 9;
        assert_eq!(Header::parse(&b), Err(PacketError::UnknownOp(9)));
        let b = header(Op::Rw, MAX_PAYLOAD + 1).to_bytes();
        assert!(matches!(
            Header::parse(&b),
            Err(PacketError::BadLength { .. })
        ));
        let b = header(Op::Request, 1).to_bytes();
        assert!(matches!(
            Header::parse(&b),
            Err(PacketError::BadLength { .. })
        ));
    }

    proptest::proptest! {
        /// Arbitrary bytes never panic the parser, and whatever it accepts re-encodes to the
        /// same header bytes.
        #[test]
        fn parse_never_panics_and_round_trips(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            if let Ok(h) = Header::parse(&bytes) {
                proptest::prop_assert_eq!(&h.to_bytes()[..], &bytes[..HEADER_BYTES]);
            }
        }
    }
}
