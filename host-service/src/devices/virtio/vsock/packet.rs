//! The virtio-vsock packet header (virtio 1.2, section 5.10.6) as the connections see it, and
//! its validation.
//!
//! Finding the header and payload in a descriptor chain and reading or writing the header's wire
//! fields is done by virtio-vsock's [`VsockPacket`]; this module turns those raw fields into a
//! [`Header`]. Everything here comes from the guest: a header of a type other than stream, of an
//! unknown operation or announcing more payload than [`MAX_PAYLOAD`] (or any on a packet that
//! carries none) is refused with a [`PacketError`], never trusted.

use serde::{Deserialize, Serialize};
use virtio_vsock::packet::{PKT_HEADER_SIZE, VsockPacket};
use vm_memory::bitmap::BitmapSlice;

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
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// Gathered header bytes that are not exactly one header.
    #[error("vsock header of {0} bytes, not {PKT_HEADER_SIZE}")]
    Size(usize),
    /// virtio-vsock could not decode the header bytes.
    #[error("vsock header not decoded: {0}")]
    Decode(#[source] virtio_vsock::packet::Error),
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

impl Header {
    /// Validates the header virtio-vsock read from a packet (`pkt`'s fields are the copy it took
    /// when it parsed the chain, so the guest cannot change them afterwards).
    pub fn from_packet<B: BitmapSlice>(pkt: &VsockPacket<'_, B>) -> Result<Self, PacketError> {
        let kind = pkt.type_();
        if kind != TYPE_STREAM {
            return Err(PacketError::Type(kind));
        }
        let op = Op::from_raw(pkt.op()).ok_or(PacketError::UnknownOp(pkt.op()))?;
        let len = pkt.len();
        if len > MAX_PAYLOAD || (op != Op::Rw && len != 0) {
            return Err(PacketError::BadLength { op, len });
        }
        Ok(Self {
            src_cid: pkt.src_cid(),
            dst_cid: pkt.dst_cid(),
            src_port: pkt.src_port(),
            dst_port: pkt.dst_port(),
            len,
            op,
            flags: pkt.flags(),
            buf_alloc: pkt.buf_alloc(),
            fwd_cnt: pkt.fwd_cnt(),
        })
    }

    /// Validates a header's wire bytes that were gathered from more than one descriptor (see
    /// [`device`](super::device)); they are decoded by virtio-vsock like any other header.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, PacketError> {
        if bytes.len() != PKT_HEADER_SIZE {
            return Err(PacketError::Size(bytes.len()));
        }
        let mut slot = [0u8; PKT_HEADER_SIZE];
        let mut pkt = local_packet(&mut slot)?;
        pkt.set_header_from_raw(bytes)
            .map_err(PacketError::Decode)?;
        Self::from_packet(&pkt)
    }

    /// Writes this header into `pkt`'s header buffer (all fields, type stream).
    pub fn write_to<B: BitmapSlice>(&self, pkt: &mut VsockPacket<'_, B>) {
        pkt.set_src_cid(self.src_cid)
            .set_dst_cid(self.dst_cid)
            .set_src_port(self.src_port)
            .set_dst_port(self.dst_port)
            .set_len(self.len)
            .set_type(TYPE_STREAM)
            .set_op(self.op.to_raw())
            .set_flags(self.flags)
            .set_buf_alloc(self.buf_alloc)
            .set_fwd_cnt(self.fwd_cnt);
    }

    /// The wire bytes of this header (tests put them into guest memory).
    #[cfg(test)]
    pub fn to_bytes(&self) -> [u8; PKT_HEADER_SIZE] {
        let mut slot = [0u8; PKT_HEADER_SIZE];
        let mut pkt = local_packet(&mut slot).expect("a header-sized slot");
        self.write_to(&mut pkt);
        slot
    }
}

/// A [`VsockPacket`] whose header lives in `slot`, host memory of exactly one header, for
/// header bytes that are not in a single guest buffer.
fn local_packet(slot: &mut [u8; PKT_HEADER_SIZE]) -> Result<VsockPacket<'_, ()>, PacketError> {
    // SAFETY: the packet's header slice covers exactly `slot`, which the returned packet borrows
    // for its whole lifetime, so the memory stays valid; nothing else reads or writes `slot`
    // while the packet lives (the borrow is exclusive).
    unsafe { VsockPacket::new(slot, None) }.map_err(PacketError::Decode)
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
            assert_eq!(Header::from_bytes(&h.to_bytes()).expect("valid"), h);
        }
    }

    #[test]
    fn wire_layout_is_the_specs() {
        let b = header(Op::Rw, 0x0102).to_bytes();
        assert_eq!(b[0..8], 3u64.to_le_bytes());
        assert_eq!(b[8..16], 2u64.to_le_bytes());
        assert_eq!(b[16..20], 1025u32.to_le_bytes());
        assert_eq!(b[20..24], 52u32.to_le_bytes());
        assert_eq!(b[24..28], 0x0102u32.to_le_bytes());
        assert_eq!(b[28..30], TYPE_STREAM.to_le_bytes());
        assert_eq!(b[30..32], 5u16.to_le_bytes());
        assert_eq!(b[32..36], 0u32.to_le_bytes());
        assert_eq!(b[36..40], 4096u32.to_le_bytes());
        assert_eq!(b[40..44], 7u32.to_le_bytes());
    }

    #[test]
    fn bad_headers_are_refused() {
        let mut b = header(Op::Rw, 10).to_bytes();
        assert!(matches!(
            Header::from_bytes(&b[..43]),
            Err(PacketError::Size(43))
        ));
        b[28] = 2;
        assert!(matches!(Header::from_bytes(&b), Err(PacketError::Type(2))));
        let mut b = header(Op::Rw, 10).to_bytes();
        b[30] = 9;
        assert!(matches!(
            Header::from_bytes(&b),
            Err(PacketError::UnknownOp(9))
        ));
        let b = header(Op::Rw, MAX_PAYLOAD + 1).to_bytes();
        assert!(matches!(
            Header::from_bytes(&b),
            Err(PacketError::BadLength { .. })
        ));
        let b = header(Op::Request, 1).to_bytes();
        assert!(matches!(
            Header::from_bytes(&b),
            Err(PacketError::BadLength { .. })
        ));
    }

    proptest::proptest! {
        /// Arbitrary bytes never panic the decoder, and whatever it accepts re-encodes to the
        /// same header bytes.
        #[test]
        fn decoding_never_panics_and_round_trips(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 40..48)) {
            if let Ok(h) = Header::from_bytes(&bytes) {
                proptest::prop_assert_eq!(&h.to_bytes()[..], &bytes[..]);
            }
        }
    }
}
