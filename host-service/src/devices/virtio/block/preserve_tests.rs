//! Tests of copy before write through the device's request path: what is preserved, once,
//! for partial overlaps, several checkpoints and drives; deletion, release and failure; and a
//! checkpoint with disk references that restores after its drive was overwritten.

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use sha2::Digest as _;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_OUT};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes as _, GuestAddress};

use super::tests::{DATA, header, memory, run, status_desc};
use super::*;
use crate::checkpoint::side_file::{SideFile, SideFileError, SideFileWriter, side_path};
use crate::checkpoint::{self as ckpt, ReadError};
use crate::kvm::memory::GuestMemory;

const BS: u64 = 4096;
const BLOCKS: u64 = 32;

/// The byte at `at` of the drive before any guest write.
fn original(at: u64) -> u8 {
    (at / BS * 37 + at % 251) as u8
}

/// A folder with a writable drive image of [`BLOCKS`] blocks and a stand-in checkpoint file.
struct Disk {
    dir: tempfile::TempDir,
    image: PathBuf,
    checkpoint: PathBuf,
    block: Block,
}

impl Disk {
    /// Protects `ranges` of drive 0 for the checkpoint.
    fn protect(&mut self, ranges: &[(u64, u64)]) {
        let refs = ReferencedBlocks::open(&self.checkpoint, 0, ranges).expect("refs");
        self.block.preserve(refs);
    }
}

fn disk() -> Disk {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("drive.img");
    let bytes: Vec<u8> = (0..BLOCKS * BS).map(original).collect();
    std::fs::write(&image, bytes).expect("image");
    let checkpoint = dir.path().join("vm.ditto");
    std::fs::write(&checkpoint, [7u8; 256]).expect("checkpoint");
    let block = Block::open(BlockConfig {
        id: "root".into(),
        path: image.clone(),
        read_only: false,
    })
    .expect("open");
    Disk {
        dir,
        image,
        checkpoint,
        block,
    }
}

/// Writes `len` bytes of `fill` at byte `offset` (sector aligned) through the request path.
fn guest_write(block: &mut Block, mem: &GuestMemory, offset: u64, len: u32, fill: u8) {
    mem.write_slice(&vec![fill; len as usize], GuestAddress(DATA))
        .expect("data");
    let d = vec![
        header(mem, VIRTIO_BLK_T_OUT, offset / 512),
        Descriptor::new(DATA, len, 0, 0),
        status_desc(),
    ];
    assert_eq!(run(block, mem, d), (VIRTIO_BLK_S_OK, 1));
}

/// The side file's blocks of `drive`, each checked to hold the drive's original bytes.
fn preserved_blocks(checkpoint: &Path, drive: u32) -> Vec<u64> {
    let side = SideFile::open(&side_path(checkpoint), None).expect("side file");
    let held: Vec<u64> = (0..BLOCKS)
        .map(|b| b * BS)
        .filter(|&at| side.lookup(drive, at).is_some())
        .collect();
    let file = File::open(side.path()).expect("open");
    for &at in &held {
        let mut buf = vec![0u8; BS as usize];
        let pos = side.lookup(drive, at).expect("held");
        file.read_exact_at(&mut buf, pos).expect("read");
        let want: Vec<u8> = (at..at + BS).map(original).collect();
        assert!(buf == want, "block at {at:#x} holds other bytes");
    }
    held
}

fn image_byte(image: &Path, at: u64) -> u8 {
    let mut b = [0u8];
    File::open(image)
        .and_then(|f| f.read_exact_at(&mut b, at))
        .expect("image");
    b[0]
}

#[test]
fn a_protected_block_is_preserved_once_before_its_first_overwrite() {
    let mut d = disk();
    let mem = memory();
    d.protect(&[(2 * BS, 2 * BS)]);
    // Unprotected block: nothing preserved.
    guest_write(&mut d.block, &mem, 0, 512, 0xaa);
    assert!(preserved_blocks(&d.checkpoint, 0).is_empty());
    // One sector of block 2: the whole old block is preserved, then overwritten.
    guest_write(&mut d.block, &mem, 2 * BS + 1024, 512, 0xbb);
    assert_eq!(preserved_blocks(&d.checkpoint, 0), [2 * BS]);
    assert_eq!(image_byte(&d.image, 2 * BS + 1024), 0xbb);
    assert_eq!(d.block.preserved()[0].protected(), [(3 * BS, BS)]);
    // Again: not preserved a second time (it would preserve the guest's bytes).
    guest_write(&mut d.block, &mem, 2 * BS, 4096, 0xcc);
    let side = SideFile::open(&side_path(&d.checkpoint), None).expect("side");
    assert_eq!((side.records(), side.blocks()), (1, 1));
    // Block 3: preserved; nothing is left to protect and the protection ends.
    guest_write(&mut d.block, &mem, 3 * BS + 3584, 512, 0xdd);
    assert_eq!(preserved_blocks(&d.checkpoint, 0), [2 * BS, 3 * BS]);
    assert!(d.block.preserved().is_empty());
}

#[test]
fn a_partly_overlapping_write_preserves_only_the_protected_blocks() {
    let mut d = disk();
    let mem = memory();
    let refs =
        ReferencedBlocks::open(&d.checkpoint, 0, &[(BS, 2 * BS), (8 * BS, BS)]).expect("refs");
    d.block.preserve(refs);
    // Bytes 3072..5120: the end of block 0 (unprotected) and the start of block 1.
    guest_write(&mut d.block, &mem, 3072, 2048, 0x11);
    assert_eq!(preserved_blocks(&d.checkpoint, 0), [BS]);
    assert_eq!(
        d.block.preserved()[0].protected(),
        [(2 * BS, BS), (8 * BS, BS)]
    );
    // Blocks 2..=9 in one request: 2 and 8 are preserved, in one append.
    guest_write(&mut d.block, &mem, 2 * BS, 8 * 4096, 0x22);
    assert_eq!(preserved_blocks(&d.checkpoint, 0), [BS, 2 * BS, 8 * BS]);
    assert!(d.block.preserved().is_empty());
    assert_eq!(image_byte(&d.image, 8 * BS), 0x22);
}

#[test]
fn several_checkpoints_and_drives_each_get_their_blocks() {
    let mut d = disk();
    let mem = memory();
    let second = d.dir.path().join("later.ditto");
    std::fs::write(&second, [9u8; 256]).expect("checkpoint");
    let first = PreservedCheckpoint::open(&d.checkpoint).expect("first");
    d.block
        .preserve(ReferencedBlocks::new(first.clone(), 1, &[(0, 4 * BS)]).expect("refs"));
    d.block
        .preserve(ReferencedBlocks::open(&second, 1, &[(2 * BS, BS)]).expect("refs"));
    guest_write(&mut d.block, &mem, 2 * BS, 4096, 0x33);
    assert_eq!(preserved_blocks(&d.checkpoint, 1), [2 * BS]);
    assert_eq!(preserved_blocks(&second, 1), [2 * BS]);
    assert!(preserved_blocks(&d.checkpoint, 0).is_empty());
    assert_eq!(d.block.preserved().len(), 1);
    assert_eq!(d.block.preserved()[0].checkpoint(), d.checkpoint);
    assert!(first.is_active());
    assert!(d.block.preserved()[0].protects(&d.checkpoint));
    assert!(!d.block.preserved()[0].protects(&second));
}

#[test]
fn deleting_the_checkpoint_ends_protection_and_removes_the_side_file() {
    let mut d = disk();
    let mem = memory();
    d.protect(&[(0, 4 * BS)]);
    guest_write(&mut d.block, &mem, 0, 512, 0x44);
    let side = side_path(&d.checkpoint);
    assert!(side.exists());
    // A write outside the protected blocks does not look at the checkpoint.
    std::fs::remove_file(&d.checkpoint).expect("delete");
    guest_write(&mut d.block, &mem, 10 * BS, 512, 0x45);
    assert!(side.exists() && d.block.preserved().len() == 1);
    // One that hits them finds it deleted: no preservation, side file gone, write done.
    guest_write(&mut d.block, &mem, BS, 512, 0x46);
    assert!(!side.exists());
    assert!(d.block.preserved().is_empty());
    assert_eq!(image_byte(&d.image, BS), 0x46);
}

#[test]
fn a_replaced_checkpoint_keeps_the_new_side_file() {
    let mut d = disk();
    let mem = memory();
    d.protect(&[(0, BS)]);
    // A newer checkpoint at the same path, protecting other blocks with its own side file.
    let newer = d.dir.path().join("newer.tmp");
    std::fs::write(&newer, [8u8; 300]).expect("newer");
    std::fs::rename(&newer, &d.checkpoint).expect("replace");
    d.protect(&[(5 * BS, BS)]);
    let protecting: Vec<bool> = d
        .block
        .preserved()
        .iter()
        .map(|r| r.protects(&d.checkpoint))
        .collect();
    assert_eq!(protecting, [false, true]);
    guest_write(&mut d.block, &mem, 0, 512, 0x55);
    // The old protection ended without touching the newer side file.
    assert!(preserved_blocks(&d.checkpoint, 0).is_empty());
    assert_eq!(d.block.preserved().len(), 1);
    guest_write(&mut d.block, &mem, 5 * BS, 512, 0x56);
    assert_eq!(preserved_blocks(&d.checkpoint, 0), [5 * BS]);
}

#[test]
fn release_stops_protection_and_keeps_the_side_file() {
    let mut d = disk();
    let mem = memory();
    d.protect(&[(0, 4 * BS)]);
    guest_write(&mut d.block, &mem, 0, 512, 0x66);
    assert!(d.block.release_preserved(&d.checkpoint));
    assert!(!d.block.release_preserved(&d.checkpoint));
    guest_write(&mut d.block, &mem, BS, 512, 0x67);
    assert_eq!(preserved_blocks(&d.checkpoint, 0), [0]);
}

#[test]
fn a_failed_preservation_marks_the_checkpoint_lost_and_the_write_goes_ahead() {
    let mut d = disk();
    let mem = memory();
    // A side file whose descriptor cannot write: appending fails as on a full disk.
    let side = side_path(&d.checkpoint);
    let identity = ckpt::side_file::CheckpointIdentity::of_path(&d.checkpoint).expect("id");
    drop(SideFileWriter::create(&side, identity).expect("create"));
    let shared = PreservedCheckpoint::with_writer_for_test(
        &d.checkpoint,
        SideFileWriter::on_file_for_test(&side, File::open(&side).expect("open"), identity),
    );
    let other_drive = ReferencedBlocks::new(shared.clone(), 1, &[(0, BS)]).expect("refs");
    d.block
        .preserve(ReferencedBlocks::new(shared.clone(), 0, &[(0, BS)]).expect("refs"));
    guest_write(&mut d.block, &mem, 0, 512, 0x77);
    assert_eq!(image_byte(&d.image, 0), 0x77, "the guest's write happened");
    assert!(!shared.is_active());
    assert!(d.block.preserved().is_empty());
    // The other drive's protection of the lost checkpoint ends at its next write.
    let mut second = disk();
    second.block.preserve(other_drive);
    guest_write(&mut second.block, &mem, 0, 512, 0x78);
    assert!(second.block.preserved().is_empty());

    // With a writable side file the lost mark lands and restore refuses clearly.
    let d = disk();
    let mut writer = SideFileWriter::create(&side_path(&d.checkpoint), identity_of(&d.checkpoint))
        .expect("create");
    writer.mark_lost().expect("mark");
    let err = SideFile::open(&side_path(&d.checkpoint), None).expect_err("lost");
    assert!(matches!(err, SideFileError::Lost { .. }));
    assert!(
        err.to_string().contains("preserved blocks were lost"),
        "{err}"
    );
}

fn identity_of(checkpoint: &Path) -> ckpt::side_file::CheckpointIdentity {
    ckpt::side_file::CheckpointIdentity::of_path(checkpoint).expect("identity")
}

/// A real checkpoint whose pages reference the drive, the drive overwritten through the
/// device after it: restore through the side file passes every page hash; without it, the
/// restore is refused.
#[test]
fn a_checkpoint_restores_after_its_referenced_blocks_were_overwritten() {
    let mut d = disk();
    let guest = crate::kvm::memory::MemoryLayout::single(64 * BS)
        .create()
        .expect("guest");
    // Guest pages 10..18 hold drive blocks 4..12; pages 30..32 hold the drive's bytes from
    // 20 blocks + 512 on (not block aligned).
    let referenced = [(10u64, 4 * BS, 8u64), (30, 20 * BS + 512, 2)];
    let image = File::open(&d.image).expect("image");
    let mut extents = Vec::new();
    for &(frame, offset, pages) in &referenced {
        let mut bytes = vec![0u8; (pages * BS) as usize];
        image.read_exact_at(&mut bytes, offset).expect("read");
        guest
            .write_slice(&bytes, GuestAddress(frame * BS))
            .expect("guest");
        extents.push(ckpt::PageExtent {
            first_frame: frame,
            pages,
            class: ckpt::PageClass::Disk { drive: 0, offset },
        });
    }
    guest
        .write_slice(b"a saved page", GuestAddress(3 * BS))
        .expect("guest");
    let drives = [ckpt::DriveInfo {
        id: "root".into(),
        size: BLOCKS * BS,
    }];
    let mut w = ckpt::CheckpointWriter::create(&d.checkpoint, ckpt::WriteOptions::default())
        .expect("create");
    w.write_memory(&guest, &drives, &extents).expect("memory");
    w.finish(b"{}").expect("finish");

    // The VM runs on: protection starts, the guest overwrites everything referenced.
    let ranges = crate::vmm::preserve::plan(
        &crate::vmm::preserve::disk_ranges(&extents),
        &[crate::vmm::preserve::DriveView {
            read_only: false,
            size: BLOCKS * BS,
        }],
    )
    .expect("plan");
    let shared = PreservedCheckpoint::open(&d.checkpoint).expect("open");
    for (drive, ranges) in &ranges {
        d.block
            .preserve(ReferencedBlocks::new(shared.clone(), *drive, ranges).expect("refs"));
    }
    let mem = memory();
    guest_write(&mut d.block, &mem, 3 * BS, 10 * 4096, 0xe1);
    guest_write(&mut d.block, &mem, 20 * BS, 3 * 4096, 0xe2);
    guest_write(&mut d.block, &mem, 4 * BS, 4096, 0xe3);
    assert!(
        d.block.preserved().is_empty(),
        "every referenced block was hit"
    );

    // Restore as Vmm::restore does: through the side file when there is one.
    let restore = || -> Result<GuestMemory, crate::vmm::snapshot::SnapshotError> {
        let reader = ckpt::CheckpointReader::open(&d.checkpoint)?;
        let memory = reader.layout().create().expect("memory");
        let runs = reader.restore_memory(&memory, 2)?;
        let files = [File::open(&d.image).expect("image")];
        crate::vmm::preserve::fill_disk_pages(&d.checkpoint, &memory, &runs, &files, 2)?;
        Ok(memory)
    };
    let restored = restore().expect("restore through the side file");
    let page = |m: &GuestMemory, frame: u64| {
        let mut b = vec![0u8; BS as usize];
        m.read_slice(&mut b, GuestAddress(frame * BS))
            .expect("read");
        sha2::Sha256::digest(&b)
    };
    for frame in 0..64 {
        assert_eq!(page(&restored, frame), page(&guest, frame), "page {frame}");
    }
    // Without the side file, or with one of another checkpoint, the changed drive is refused.
    let side = side_path(&d.checkpoint);
    let kept = d.dir.path().join("kept.blocks");
    std::fs::rename(&side, &kept).expect("move away");
    let refused = |r: Result<GuestMemory, crate::vmm::snapshot::SnapshotError>| match r {
        Err(crate::vmm::snapshot::SnapshotError::Read(ReadError::HashMismatch {
            drive: 0,
            ..
        })) => {}
        other => panic!("the overwritten drive must be refused: {:?}", other.err()),
    };
    refused(restore());
    let stranger = d.dir.path().join("stranger.ditto");
    std::fs::write(&stranger, [3u8; 200]).expect("stranger");
    SideFileWriter::create(&side, identity_of(&stranger)).expect("stale side file");
    refused(restore());
    // A lost side file refuses the restore and says why.
    let mut lost = SideFileWriter::create(&side, identity_of(&d.checkpoint)).expect("create");
    lost.mark_lost().expect("mark");
    let err = restore().expect_err("lost");
    assert!(
        err.to_string().contains("preserved blocks were lost"),
        "{err}"
    );
    std::fs::rename(&kept, &side).expect("move back");
    restore().expect("restore again");
}
