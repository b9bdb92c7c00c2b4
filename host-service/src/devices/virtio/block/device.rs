//! The virtio-blk device on a raw image file: its configuration, its serialisable state and the
//! request processing loop.
//!
//! Reads into guest memory go through [`vm_memory::Bytes`], so they are marked in the VMM's own
//! dirty bitmap (see [`crate::kvm::memory`]). Every sector the guest writes is recorded in a set of
//! sector ranges that checkpoints fetch and clear.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::preserve::{self, ReferencedBlocks};
use super::request::{self, MAX_DESCRIPTORS, ParseError, Request, RequestType};
use super::{ID_BYTES, QUEUE_SIZE, SECTOR_SIZE};
use crate::devices::virtio::ranges::RangeSet;
use crate::devices::virtio::{VIRTIO_F_VERSION_1, VirtioDevice, read_config_space};
use crate::kvm::memory::GuestMemory;

/// The virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;

/// What can go wrong while opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image cannot be opened.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The image size cannot be read.
    #[error("cannot read the size of disk image {path}: {source}")]
    Size {
        /// The image path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The drive id is longer than virtio-blk's 20-byte serial.
    #[error("drive id {0:?} is longer than {ID_BYTES} bytes")]
    IdTooLong(String),
    /// A restored disk is not the size the guest knew.
    #[error("disk image {path} has {now} sectors but the guest knew {was}: not the disk it had")]
    SizeChanged {
        /// The image path.
        path: PathBuf,
        /// Sectors when the state was captured.
        was: u64,
        /// Sectors now.
        now: u64,
    },
}

/// How a disk is attached: its id (the serial the guest sees), its image and its mode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockConfig {
    /// The drive id, returned to the guest by `VIRTIO_BLK_T_GET_ID` (at most 20 bytes).
    pub id: String,
    /// The raw image file.
    pub path: PathBuf,
    /// Whether the guest may only read.
    pub read_only: bool,
}

/// A half-open range of sectors `[start, start + count)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SectorRange {
    /// First sector.
    pub start: u64,
    /// Number of sectors.
    pub count: u64,
}

/// The device's serialisable state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// How the disk is attached.
    pub config: BlockConfig,
    /// Disk size in sectors when the device was opened.
    pub nsectors: u64,
    /// Features the driver acknowledged (0 before activation).
    pub acked_features: u64,
    /// Sectors written by the guest since the record was last fetched.
    pub written: Vec<SectorRange>,
}

/// A virtio-blk device on a raw image file.
#[derive(Debug)]
pub struct Block {
    config: BlockConfig,
    file: File,
    nsectors: u64,
    acked_features: u64,
    written: RangeSet,
    queue_sizes: [u16; 1],
    /// Blocks checkpoints reference, preserved before the guest overwrites them.
    preserved: Vec<ReferencedBlocks>,
}

impl Block {
    /// Opens the image of `config` (read-only when asked) and sizes the disk from it; a partial
    /// last sector is not visible to the guest.
    pub fn open(config: BlockConfig) -> Result<Self, BlockError> {
        if config.id.len() > ID_BYTES {
            return Err(BlockError::IdTooLong(config.id));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .open(&config.path)
            .map_err(|source| BlockError::Open {
                path: config.path.clone(),
                source,
            })?;
        let size = file
            .metadata()
            .map_err(|source| BlockError::Size {
                path: config.path.clone(),
                source,
            })?
            .len();
        Ok(Self {
            config,
            file,
            nsectors: size / SECTOR_SIZE,
            acked_features: 0,
            written: RangeSet::default(),
            queue_sizes: [QUEUE_SIZE],
            preserved: Vec::new(),
        })
    }

    /// Reopens a device from captured state; the written-sector record carries over. The image
    /// must have the size it had ([`BlockError::SizeChanged`]).
    pub fn restore(state: &BlockState) -> Result<Self, BlockError> {
        let mut block = Self::open(state.config.clone())?;
        if block.nsectors != state.nsectors {
            return Err(BlockError::SizeChanged {
                path: state.config.path.clone(),
                was: state.nsectors,
                now: block.nsectors,
            });
        }
        block.acked_features = state.acked_features;
        for r in &state.written {
            block
                .written
                .insert(r.start, r.start.saturating_add(r.count));
        }
        Ok(block)
    }

    /// Captures the device state.
    pub fn state(&self) -> BlockState {
        BlockState {
            config: self.config.clone(),
            nsectors: self.nsectors,
            acked_features: self.acked_features,
            written: sector_ranges(&self.written),
        }
    }

    /// How the disk is attached.
    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// Disk size in sectors.
    pub fn nsectors(&self) -> u64 {
        self.nsectors
    }

    /// Returns the sectors the guest wrote since the last call, coalesced and in order, and
    /// clears the record.
    pub fn take_written_sectors(&mut self) -> Vec<SectorRange> {
        sector_ranges(&std::mem::take(&mut self.written))
    }

    /// Protects the blocks `refs` lists: before the guest's first write to each, its old bytes
    /// go to the checkpoint's side file ([`super::preserve`]). A VM may protect several
    /// checkpoints at once. Call it while the guest is paused, before it runs on after the
    /// checkpoint.
    pub fn preserve(&mut self, refs: ReferencedBlocks) {
        self.preserved.push(refs);
    }

    /// Stops protecting blocks for the checkpoint at `checkpoint` on this drive; returns
    /// whether it was protected. Its side file stays (it holds blocks the guest already
    /// overwrote) unless the checkpoint itself is gone. After this, guest writes can change
    /// blocks the checkpoint references: release a checkpoint that will be deleted, or when
    /// the guest no longer writes.
    pub fn release_preserved(&mut self, checkpoint: &Path) -> bool {
        preserve::release(&mut self.preserved, checkpoint)
    }

    /// The protections in force, in the order they were given.
    pub fn preserved(&self) -> &[ReferencedBlocks] {
        &self.preserved
    }

    /// Executes one parsed request; returns the virtio-blk status and the number of bytes
    /// written into guest data buffers.
    fn execute(&mut self, mem: &GuestMemory, req: &Request) -> (u8, u32) {
        match req.kind {
            RequestType::In => self.read(mem, req),
            RequestType::Out => (self.write(mem, req), 0),
            RequestType::Flush => {
                let ok = self.config.read_only || self.file.sync_data().is_ok();
                (status(ok), 0)
            }
            RequestType::GetId => {
                let mut id = [0u8; ID_BYTES];
                id[..self.config.id.len()].copy_from_slice(self.config.id.as_bytes());
                let mut done = 0usize;
                for &(addr, len) in &req.data {
                    let n = (len as usize).min(ID_BYTES - done);
                    if n == 0 {
                        break;
                    }
                    if mem.write_slice(&id[done..done + n], addr).is_err() {
                        return (VIRTIO_BLK_S_IOERR as u8, 0);
                    }
                    done += n;
                }
                (VIRTIO_BLK_S_OK as u8, done as u32)
            }
            // Parsing answers unsupported requests itself.
            RequestType::Unsupported(_) => {
                (virtio_bindings::virtio_blk::VIRTIO_BLK_S_UNSUPP as u8, 0)
            }
        }
    }

    fn read(&mut self, mem: &GuestMemory, req: &Request) -> (u8, u32) {
        let mut offset = req.sector * SECTOR_SIZE;
        let mut done = 0u32;
        let mut buf = Vec::new();
        for &(addr, len) in &req.data {
            buf.resize(len as usize, 0);
            if self.file.read_exact_at(&mut buf, offset).is_err()
                || mem.write_slice(&buf, addr).is_err()
            {
                return (VIRTIO_BLK_S_IOERR as u8, done);
            }
            offset += u64::from(len);
            done += len;
        }
        (VIRTIO_BLK_S_OK as u8, done)
    }

    fn write(&mut self, mem: &GuestMemory, req: &Request) -> u8 {
        if self.config.read_only {
            return VIRTIO_BLK_S_IOERR as u8;
        }
        let start = req.sector * SECTOR_SIZE;
        if !self.preserved.is_empty() {
            // Parsing checked that the request lies inside the disk.
            preserve::before_write(
                &mut self.preserved,
                &self.file,
                start,
                start + req.data_len(),
            );
        }
        let mut offset = start;
        let mut buf = Vec::new();
        let mut ok = true;
        for &(addr, len) in &req.data {
            buf.resize(len as usize, 0);
            if mem.read_slice(&mut buf, addr).is_err() {
                ok = false;
                break;
            }
            // Record before writing: a partly failed write may still have changed the disk.
            self.written.insert(
                offset / SECTOR_SIZE,
                (offset + u64::from(len)).div_ceil(SECTOR_SIZE),
            );
            if self.file.write_all_at(&buf, offset).is_err() {
                ok = false;
                break;
            }
            offset += u64::from(len);
        }
        status(ok)
    }

    /// Processes one descriptor chain given as its descriptors; returns the used length to
    /// report, or `None` when the request could not be answered at all (no status byte).
    pub fn process_descriptors(
        &mut self,
        mem: &GuestMemory,
        descs: impl IntoIterator<Item = virtio_queue::desc::split::Descriptor>,
    ) -> u32 {
        match request::parse(mem, descs, self.nsectors) {
            Ok(req) => {
                let (st, len) = self.execute(mem, &req);
                if mem.write_obj(st, req.status).is_err() {
                    return len;
                }
                len + 1
            }
            Err(ParseError::Bad {
                status_addr,
                status,
                ..
            }) => {
                if mem.write_obj(status, status_addr).is_err() {
                    return 0;
                }
                1
            }
            Err(ParseError::NoStatus) => 0,
        }
    }
}

fn sector_ranges(set: &RangeSet) -> Vec<SectorRange> {
    set.iter()
        .map(|(start, end)| SectorRange {
            start,
            count: end - start,
        })
        .collect()
}

fn status(ok: bool) -> u8 {
    if ok {
        VIRTIO_BLK_S_OK as u8
    } else {
        VIRTIO_BLK_S_IOERR as u8
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn avail_features(&self) -> u64 {
        let mut features =
            VIRTIO_F_VERSION_1 | (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_SEG_MAX);
        if self.config.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // capacity (le64) at 0, size_max (le32) at 8, seg_max (le32) at 12.
        let mut space = [0u8; 16];
        space[..8].copy_from_slice(&self.nsectors.to_le_bytes());
        // The header and the status byte take two descriptors.
        let seg_max = (MAX_DESCRIPTORS.min(usize::from(QUEUE_SIZE)) - 2) as u32;
        space[12..16].copy_from_slice(&seg_max.to_le_bytes());
        read_config_space(&space, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, acked_features: u64) {
        self.acked_features = acked_features;
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemory) -> bool {
        if index != 0 || !queue.is_valid(mem) {
            return false;
        }
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = self.process_descriptors(mem, chain);
            if queue.add_used(mem, head, len).is_err() {
                break;
            }
            used = true;
        }
        used && queue.needs_notification(mem).unwrap_or(true)
    }

    fn reset(&mut self) {
        self.acked_features = 0;
    }
}

// Keep the import used for the unit tests' address arithmetic.
#[allow(dead_code)]
const _: Option<GuestAddress> = None;
