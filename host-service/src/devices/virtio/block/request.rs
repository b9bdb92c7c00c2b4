//! Parsing one virtio-blk request from a descriptor chain, with every check a hostile driver
//! makes necessary: the header must be device-readable and inside guest memory, the status byte
//! device-writable, data buffers must have the direction the request type needs, lie inside guest
//! memory, and together stay within [`MAX_REQUEST_BYTES`] and the disk.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::SECTOR_SIZE;
use crate::kvm::memory::GuestMemory;

/// Most data bytes one request may move (larger requests fail with IOERR).
pub const MAX_REQUEST_BYTES: u64 = 16 << 20;
/// Most descriptors one request may have.
pub const MAX_DESCRIPTORS: usize = 1024;
/// Size of the request header (type, reserved, sector).
const HEADER_BYTES: u32 = 16;

/// The operation a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors into guest memory.
    In,
    /// Write sectors from guest memory.
    Out,
    /// Flush the disk.
    Flush,
    /// Return the device id string.
    GetId,
    /// Anything else (answered with `VIRTIO_BLK_S_UNSUPP`).
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(value: u32) -> Self {
        match value {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            other => Self::Unsupported(other),
        }
    }
}

/// A request that passed every structural check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub kind: RequestType,
    /// First sector (for `In` and `Out`).
    pub sector: u64,
    /// Data buffers in guest memory, in order, each checked to lie inside guest memory.
    pub data: Vec<(GuestAddress, u32)>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

impl Request {
    /// Total data bytes.
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|&(_, len)| u64::from(len)).sum()
    }
}

/// Why a chain could not become a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// No usable status descriptor: the request cannot even be answered, it is returned unused.
    #[error("the chain has no device-writable status byte inside guest memory")]
    NoStatus,
    /// The request is malformed; answer it with `status` at `status_addr`.
    #[error("malformed request ({reason}), answered with status {status}")]
    Bad {
        /// Where the status byte goes.
        status_addr: GuestAddress,
        /// The virtio-blk status to answer with.
        status: u8,
        /// What was wrong.
        reason: &'static str,
    },
}

fn in_memory(mem: &GuestMemory, desc: &Descriptor) -> bool {
    desc.len() == 0 || GuestMemoryBackend::check_range(mem, desc.addr(), desc.len() as usize)
}

/// Parses the descriptors of one chain (as yielded by the chain iterator, which already stops
/// loops after queue-size steps) into a request for a disk of `nsectors` sectors.
pub fn parse(
    mem: &GuestMemory,
    descs: impl IntoIterator<Item = Descriptor>,
    nsectors: u64,
) -> Result<Request, ParseError> {
    let mut descs: Vec<Descriptor> = descs.into_iter().take(MAX_DESCRIPTORS + 1).collect();
    // The status byte: the last byte of the last descriptor, which must be device-writable.
    let last = descs.pop().ok_or(ParseError::NoStatus)?;
    // A last descriptor that still points onward means the chain iterator stopped early: a loop,
    // a next index beyond the table, or an unreadable descriptor.
    if last.has_next() || !last.is_write_only() || last.len() == 0 || !in_memory(mem, &last) {
        return Err(ParseError::NoStatus);
    }
    let status_addr = last
        .addr()
        .checked_add(u64::from(last.len()) - 1)
        .ok_or(ParseError::NoStatus)?;
    let bad = |status: u32, reason| ParseError::Bad {
        status_addr,
        status: status as u8,
        reason,
    };
    if descs.len() > MAX_DESCRIPTORS {
        return Err(bad(VIRTIO_BLK_S_IOERR, "too many descriptors"));
    }
    // A status descriptor longer than one byte carries data in front of the status (allowed by
    // the spec's byte-stream view of a chain).
    let mut data_descs: Vec<Descriptor> = descs.split_off(descs.len().min(1));
    if last.len() > 1 {
        data_descs.push(Descriptor::new(
            last.addr().0,
            last.len() - 1,
            last.flags(),
            0,
        ));
    }
    let header = descs.first().ok_or(bad(VIRTIO_BLK_S_IOERR, "no header"))?;
    if header.is_write_only() || header.len() < HEADER_BYTES || !in_memory(mem, header) {
        return Err(bad(VIRTIO_BLK_S_IOERR, "header not readable"));
    }
    let kind_raw: u32 = mem
        .read_obj(header.addr())
        .map_err(|_| bad(VIRTIO_BLK_S_IOERR, "header not readable"))?;
    let sector: u64 = header
        .addr()
        .checked_add(8)
        .and_then(|a| mem.read_obj(a).ok())
        .ok_or(bad(VIRTIO_BLK_S_IOERR, "header not readable"))?;
    let kind = RequestType::from(u32::from_le(kind_raw));
    let sector = u64::from_le(sector);

    let device_writes = match kind {
        RequestType::In | RequestType::GetId => true,
        RequestType::Out => false,
        RequestType::Flush => {
            return Ok(Request {
                kind,
                sector,
                data: Vec::new(),
                status: status_addr,
            });
        }
        RequestType::Unsupported(_) => return Err(bad(VIRTIO_BLK_S_UNSUPP, "unsupported type")),
    };
    let mut data = Vec::with_capacity(data_descs.len());
    let mut total = 0u64;
    for d in &data_descs {
        if d.is_write_only() != device_writes {
            return Err(bad(
                VIRTIO_BLK_S_IOERR,
                "data buffer has the wrong direction",
            ));
        }
        if !in_memory(mem, d) {
            return Err(bad(VIRTIO_BLK_S_IOERR, "data buffer outside guest memory"));
        }
        total += u64::from(d.len());
        if total > MAX_REQUEST_BYTES {
            return Err(bad(VIRTIO_BLK_S_IOERR, "request too large"));
        }
        if d.len() > 0 {
            data.push((d.addr(), d.len()));
        }
    }
    let request = Request {
        kind,
        sector,
        data,
        status: status_addr,
    };
    if kind == RequestType::GetId {
        return Ok(request);
    }
    if !total.is_multiple_of(SECTOR_SIZE) {
        return Err(bad(
            VIRTIO_BLK_S_IOERR,
            "data length is not a multiple of 512",
        ));
    }
    let end = sector.checked_add(total / SECTOR_SIZE);
    if end.is_none_or(|end| end > nsectors) {
        return Err(bad(
            VIRTIO_BLK_S_IOERR,
            "request beyond the end of the disk",
        ));
    }
    Ok(request)
}
