//! Tests of the side file: round trips, a torn or damaged tail, the lost marker, the binding to
//! one checkpoint, and the overlay's choice between side file and drive.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt as _;
use std::sync::Arc;

use super::*;

const B: usize = BLOCK_SIZE as usize;

/// A stand-in checkpoint file (only its length and last 4 bytes matter here).
fn fake_checkpoint(dir: &Path, name: &str, tag: u8) -> (PathBuf, CheckpointIdentity) {
    let path = dir.join(name);
    std::fs::write(&path, vec![tag; 300]).expect("checkpoint");
    let id = CheckpointIdentity::of_path(&path).expect("identity");
    (path, id)
}

/// A temporary folder with a stand-in checkpoint `vm.ditto` and a fresh side file for it.
struct Setup {
    dir: tempfile::TempDir,
    id: CheckpointIdentity,
    path: PathBuf,
    writer: SideFileWriter,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ckpt, id) = fake_checkpoint(dir.path(), "vm.ditto", 1);
    let path = side_path(&ckpt);
    let writer = SideFileWriter::create(&path, id).expect("create");
    Setup {
        dir,
        id,
        path,
        writer,
    }
}

fn block(tag: u8, blocks: usize) -> Vec<u8> {
    (0..blocks * B).map(|i| tag ^ (i / 7) as u8).collect()
}

#[test]
fn side_path_appends_the_suffix() {
    assert_eq!(
        side_path(Path::new("/a/b/vm.ditto")),
        Path::new("/a/b/vm.ditto.blocks")
    );
    assert_eq!(side_path(Path::new("x")), Path::new("x.blocks"));
}

#[test]
fn records_round_trip_and_the_first_copy_of_a_block_wins() {
    let mut s = setup();
    let (id, path, w) = (s.id, s.path.clone(), &mut s.writer);
    let a = block(0x11, 2);
    let b = block(0x22, 1);
    w.append(0, &[(0x4000, &a), (0x10_0000, &b)])
        .expect("append");
    let again = block(0x33, 1);
    w.append(0, &[(0x5000, &again)]).expect("append");
    let c = block(0x44, 1);
    w.append(3, &[(0x4000, &c)]).expect("append");

    let side = SideFile::open(&path, Some(id)).expect("open");
    assert_eq!(side.tail(), &Tail::Clean);
    assert_eq!(side.records(), 4);
    assert_eq!(side.blocks(), 4);
    let read = |drive, offset| {
        let pos = side.lookup(drive, offset).expect("held");
        let mut buf = vec![0u8; B];
        side.file.read_exact_at(&mut buf, pos).expect("read");
        buf
    };
    assert_eq!(read(0, 0x4000), a[..B]);
    // 0x5000 was preserved twice: the first (older) bytes are the checkpoint's.
    assert_eq!(read(0, 0x5000), a[B..]);
    assert_eq!(read(0, 0x10_0000), b);
    assert_eq!(read(3, 0x4000), c);
    assert_eq!(side.lookup(1, 0x4000), None);
    assert_eq!(side.lookup(0, 0x6000), None);
}

#[test]
fn a_large_preservation_is_split_into_bounded_records() {
    let mut s = setup();
    let (id, path, w) = (s.id, s.path.clone(), &mut s.writer);
    let big = block(0x5a, (MAX_RECORD_LEN as usize / B) + 2);
    w.append(1, &[(0, &big)]).expect("append");
    let side = SideFile::open(&path, Some(id)).expect("open");
    assert_eq!(side.records(), 2);
    assert_eq!(side.blocks(), big.len() / B);
}

#[test]
fn unaligned_records_are_refused() {
    let s = setup();
    let mut w = s.writer;
    let data = block(1, 1);
    for (offset, bytes) in [(512, &data[..]), (0, &data[..100]), (0, &data[..0])] {
        assert!(matches!(
            w.append(0, &[(offset, bytes)]),
            Err(SideFileError::Unaligned { .. })
        ));
    }
    // A refused append changes nothing: the writer goes on.
    w.append(0, &[(0, &data)]).expect("append");
}

#[test]
fn a_torn_last_record_is_ignored() {
    let mut s = setup();
    let (id, path, w) = (s.id, s.path.clone(), &mut s.writer);
    w.append(0, &[(0, &block(1, 1))]).expect("append");
    w.append(0, &[(0x2000, &block(2, 2))]).expect("append");
    let whole = std::fs::metadata(&path).expect("stat").len();
    let second = SIDE_HEADER_LEN + RECORD_HEADER_LEN + BLOCK_SIZE;
    // Cut anywhere inside the second record (shortest last: set_len would extend the file):
    // only the first is read.
    for cut in [
        whole - 1,
        second + RECORD_HEADER_LEN,
        second + 20,
        second + 1,
    ] {
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.set_len(cut).expect("cut");
        let side = SideFile::open(&path, Some(id)).expect("open");
        assert_eq!(side.tail(), &Tail::Torn { offset: second }, "cut at {cut}");
        assert_eq!((side.records(), side.blocks()), (1, 1));
        assert!(side.lookup(0, 0x2000).is_none());
    }
    // Cut right after the first record: clean.
    let f = OpenOptions::new().write(true).open(&path).expect("open");
    f.set_len(second).expect("cut");
    assert_eq!(
        SideFile::open(&path, Some(id)).expect("open").tail(),
        &Tail::Clean
    );
}

#[test]
fn a_damaged_record_stops_reading() {
    let mut s = setup();
    let (id, path, w) = (s.id, s.path.clone(), &mut s.writer);
    for i in 0..3u64 {
        w.append(0, &[(i * BLOCK_SIZE, &block(i as u8, 1))])
            .expect("append");
    }
    let record = RECORD_HEADER_LEN + BLOCK_SIZE;
    let second = SIDE_HEADER_LEN + record;
    let pristine = std::fs::read(&path).expect("read");
    // The tail after an edit of the file; the second record and the intact third after it
    // are ignored.
    let tail_after = |edit: &dyn Fn(&mut Vec<u8>)| {
        let mut bytes = pristine.clone();
        edit(&mut bytes);
        std::fs::write(&path, &bytes).expect("write");
        let side = SideFile::open(&path, Some(id)).expect("open");
        assert_eq!(side.blocks(), 1);
        assert!(side.lookup(0, 2 * BLOCK_SIZE).is_none());
        side.tail().clone()
    };
    let damaged = |reason| Tail::Damaged {
        offset: second,
        reason,
    };
    let flip = |at: u64| move |b: &mut Vec<u8>| b[at as usize] ^= 0x40;
    // A flipped data byte, a flipped header field, a flipped magic.
    let data_flip = flip(second + RECORD_HEADER_LEN + 100);
    assert_eq!(tail_after(&data_flip), damaged("record checksum mismatch"));
    assert_eq!(
        tail_after(&flip(second + 5)),
        damaged("record checksum mismatch")
    );
    assert_eq!(tail_after(&flip(second)), damaged("bad record magic"));
    // A zeroed record (space allocated, bytes never written).
    let zeroed = |b: &mut Vec<u8>| b[second as usize..(second + record) as usize].fill(0);
    assert_eq!(tail_after(&zeroed), damaged("bad record magic"));
    // A length that is not whole blocks.
    let odd_len = |b: &mut Vec<u8>| b[(second + 16) as usize] = 1;
    assert_eq!(tail_after(&odd_len), damaged("bad record offset or length"));
}

#[test]
fn header_checks_lost_marker_and_checkpoint_binding() {
    let mut s = setup();
    let (id, path, w) = (s.id, s.path.clone(), &mut s.writer);
    let (_, other) = fake_checkpoint(s.dir.path(), "other.ditto", 2);
    w.append(0, &[(0, &block(1, 1))]).expect("append");
    assert!(SideFile::open(&path, None).is_ok());
    assert!(matches!(
        SideFile::open(&path, Some(other)),
        Err(SideFileError::WrongCheckpoint { .. })
    ));

    let pristine = std::fs::read(&path).expect("read");
    let edit = |at: usize, value: u8| {
        let mut b = pristine.clone();
        b[at] = value;
        std::fs::write(&path, b).expect("write");
        SideFile::open(&path, Some(id))
    };
    assert!(matches!(
        edit(0, b'X'),
        Err(SideFileError::NotASideFile { .. })
    ));
    assert!(matches!(
        edit(8, 2),
        Err(SideFileError::UnsupportedVersion { version: 2, .. })
    ));
    assert!(matches!(
        edit(40, 1),
        Err(SideFileError::HeaderChecksum { .. })
    ));
    std::fs::write(&path, &pristine).expect("restore");

    // Marked lost: refused as lost, whatever records it holds; for another checkpoint it is
    // still just the wrong file.
    w.mark_lost().expect("mark lost");
    assert!(matches!(
        SideFile::open(&path, Some(id)),
        Err(SideFileError::Lost { .. })
    ));
    assert!(matches!(
        SideFile::open(&path, Some(other)),
        Err(SideFileError::WrongCheckpoint { .. })
    ));
    assert!(matches!(
        w.append(0, &[(0x1000, &block(2, 1))]),
        Err(SideFileError::Poisoned { .. })
    ));
    // Cut below its header (the fallback marker): lost too.
    File::options()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_len(0))
        .expect("truncate");
    assert!(matches!(
        SideFile::open(&path, Some(id)),
        Err(SideFileError::Lost { .. })
    ));
}

#[test]
fn the_overlay_prefers_the_side_file_block_by_block() {
    let mut s = setup();
    let (id, path, w) = (s.id, s.path.clone(), &mut s.writer);
    let drive_now = block(0xd0, 8);
    let image = s.dir.path().join("drive.img");
    std::fs::write(&image, &drive_now).expect("image");
    let old1 = block(0x01, 1);
    let old4 = block(0x04, 2);
    w.append(0, &[(BLOCK_SIZE, &old1), (4 * BLOCK_SIZE, &old4)])
        .expect("append");
    // A block of another drive at the same offset must not leak into drive 0.
    w.append(1, &[(2 * BLOCK_SIZE, &block(0xee, 1))])
        .expect("append");

    let side = Arc::new(SideFile::open(&path, Some(id)).expect("open"));
    let files = [File::open(&image).expect("image")];
    let mut overlay = PreservedOverlay::new(side, crate::checkpoint::DriveFiles(&files));
    let mut expected = drive_now.clone();
    expected[B..2 * B].copy_from_slice(&old1);
    expected[4 * B..6 * B].copy_from_slice(&old4);
    // Whole drive, and unaligned windows that start and end inside preserved blocks.
    for (from, to) in [
        (0, 8 * B),
        (100, 3 * B + 5),
        (B + 17, 5 * B - 3),
        (6 * B, 8 * B),
    ] {
        let mut buf = vec![0u8; to - from];
        overlay
            .read_exact_at(0, from as u64, &mut buf)
            .expect("read");
        assert!(buf == expected[from..to], "window {from}..{to}");
    }
    let mut buf = vec![0u8; B];
    assert!(overlay.read_exact_at(0, 8 * BLOCK_SIZE, &mut buf).is_err());
}
