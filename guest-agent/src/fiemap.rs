//! File offsets to disk offsets with the FIEMAP ioctl, asked without FIEMAP_FLAG_SYNC (nothing
//! is written back, changed or read). Only extents whose on-disk bytes are the file's bytes are
//! usable: unknown, delayed-allocation, encoded, encrypted, not-aligned, inline, tail-packed and
//! unwritten extents are refused, and so are holes.

use std::os::fd::{AsRawFd, BorrowedFd};

/// What can go wrong while asking for extents.
#[derive(Debug, thiserror::Error)]
pub enum FiemapError {
    /// The filesystem does not support FIEMAP, or the ioctl failed.
    #[error("FIEMAP failed: {0}")]
    Ioctl(std::io::Error),
}

// The request type differs between libcs (unsigned long for glibc, int for musl).
const FS_IOC_FIEMAP: libc::Ioctl = 0xC020_660B_u32 as libc::Ioctl;
const BATCH: usize = 64;

const FLAG_LAST: u32 = 0x1;
/// Extent flags that make an extent's disk bytes differ from the file's, with their names.
const REFUSED: [(u32, &str); 8] = [
    (0x2, "extent location unknown"),
    (0x4, "delayed allocation"),
    (0x8, "encoded extent"),
    (0x80, "encrypted extent"),
    (0x100, "extent not block-aligned"),
    (0x200, "inline data"),
    (0x400, "tail-packed data"),
    (0x800, "unwritten extent"),
];

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RawExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

#[repr(C)]
struct RawFiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [RawExtent; BATCH],
}

/// One extent as FIEMAP reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// File offset of its first byte.
    pub logical: u64,
    /// Byte offset on the filesystem's block device.
    pub physical: u64,
    /// Length in bytes.
    pub length: u64,
    /// FIEMAP_EXTENT_* flags.
    pub flags: u32,
}

/// Where a file range lies on the block device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Wholly inside one usable extent, starting at this byte of the block device.
    Device(u64),
    /// Not usable, and why.
    Refused(&'static str),
}

/// Walks a file's extents in increasing file offsets, fetching them in batches.
pub struct ExtentMap<'fd> {
    fd: BorrowedFd<'fd>,
    batch: Vec<Extent>,
    done: bool,
}

impl<'fd> ExtentMap<'fd> {
    /// Starts at the beginning of the file.
    pub fn new(fd: BorrowedFd<'fd>) -> Self {
        Self {
            fd,
            batch: Vec::new(),
            done: false,
        }
    }

    fn fetch(&mut self, from: u64) -> Result<(), FiemapError> {
        // SAFETY: RawFiemap is plain old data; all-zero is a valid value.
        let mut request: Box<RawFiemap> = Box::new(unsafe { std::mem::zeroed() });
        request.start = from;
        request.length = u64::MAX - from;
        request.flags = 0; // never FIEMAP_FLAG_SYNC: that would write dirty data back
        request.extent_count = BATCH as u32;
        // SAFETY: the fd is open for the lifetime 'fd, and `request` is a properly sized,
        // writable fiemap buffer with room for `extent_count` extents, as the ioctl expects.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                FS_IOC_FIEMAP,
                &mut *request as *mut RawFiemap,
            )
        };
        if rc != 0 {
            return Err(FiemapError::Ioctl(std::io::Error::last_os_error()));
        }
        let mapped = (request.mapped_extents as usize).min(BATCH);
        self.batch = request.extents[..mapped]
            .iter()
            .map(|e| Extent {
                logical: e.logical,
                physical: e.physical,
                length: e.length,
                flags: e.flags,
            })
            .collect();
        self.done = mapped < BATCH || self.batch.last().is_some_and(|e| e.flags & FLAG_LAST != 0);
        Ok(())
    }

    /// Where the `len` bytes at file offset `offset` lie. Calls must come in increasing
    /// offsets.
    pub fn place(&mut self, offset: u64, len: u64) -> Result<Placement, FiemapError> {
        loop {
            if let Some(extent) = self
                .batch
                .iter()
                .find(|e| e.logical <= offset && offset < e.logical.saturating_add(e.length))
            {
                return Ok(judge(extent, offset, len));
            }
            let batch_end = self
                .batch
                .last()
                .map(|e| e.logical.saturating_add(e.length));
            if batch_end.is_some_and(|end| offset < end) || self.done {
                return Ok(Placement::Refused("hole"));
            }
            self.fetch(offset)?;
            if self.batch.is_empty() {
                self.done = true;
            }
        }
    }
}

/// Whether `len` bytes at `offset` lie usably inside `extent`.
fn judge(extent: &Extent, offset: u64, len: u64) -> Placement {
    if let Some((_, why)) = REFUSED.iter().find(|(bit, _)| extent.flags & bit != 0) {
        return Placement::Refused(why);
    }
    if offset.saturating_add(len) > extent.logical.saturating_add(extent.length) {
        return Placement::Refused("spans extents");
    }
    match extent.physical.checked_add(offset - extent.logical) {
        Some(device) if device % 512 == 0 => Placement::Device(device),
        _ => Placement::Refused("extent not block-aligned"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extent(logical: u64, physical: u64, length: u64, flags: u32) -> Extent {
        Extent {
            logical,
            physical,
            length,
            flags,
        }
    }

    #[test]
    fn pages_inside_a_plain_extent_map_linearly() {
        let e = extent(8192, 1 << 20, 16384, 0);
        assert_eq!(judge(&e, 8192, 4096), Placement::Device(1 << 20));
        assert_eq!(judge(&e, 12288, 4096), Placement::Device((1 << 20) + 4096));
        assert_eq!(judge(&e, 20480, 8192), Placement::Refused("spans extents"));
    }

    #[test]
    fn unusable_extents_are_refused_by_name() {
        for (bit, why) in REFUSED {
            assert_eq!(
                judge(&extent(0, 4096, 4096, bit), 0, 4096),
                Placement::Refused(why)
            );
        }
        // LAST, MERGED and SHARED say nothing about the bytes.
        assert_eq!(
            judge(&extent(0, 4096, 4096, 0x1 | 0x1000 | 0x2000), 0, 4096),
            Placement::Device(4096)
        );
    }
}
