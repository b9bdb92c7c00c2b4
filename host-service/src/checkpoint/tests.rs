//! Tests of the checkpoint file with real guest memory (several regions, random, zero,
//! text-like, free and disk-referenced pages) and real files: round trips, truncation, bit
//! flips, foreign and future files, the crash-safe naming, and drive images that changed.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use vm_memory::{Bytes as _, GuestAddress};

use super::durable::PendingFile;
use super::format::{
    CHUNK_RECORD_LEN, HEADER_LEN, Header, INCOMPAT_ZSTD, SectionEntry, TRAILER_LEN, Trailer,
    checksum,
};
use super::page_map::{PageMapBuilder, RunKind};
use super::writer::is_zero;
use super::*;
use crate::kvm::memory::{GuestMemory, MemoryLayout, RegionLayout};

const PAGE: u64 = 4096;

/// Guest memory filled with a known mix, the drive image its disk extents point into, and the
/// memory a correct restore must produce.
struct Fixture {
    dir: tempfile::TempDir,
    memory: GuestMemory,
    drives: Vec<DriveInfo>,
    drive_path: PathBuf,
    extents: Vec<PageExtent>,
    /// Per region: the bytes a restore must produce (free pages zero).
    expected: Vec<Vec<u8>>,
    counts: Counts,
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Counts {
    saved: u64,
    zero: u64,
    free: u64,
    disk: u64,
}

fn layout() -> MemoryLayout {
    MemoryLayout {
        regions: vec![
            RegionLayout {
                guest_addr: 0,
                size: 48 * PAGE,
            },
            RegionLayout {
                guest_addr: 0x10_0000,
                size: 40 * PAGE,
            },
            // Adjacent to the one before: runs must still be split at the boundary.
            RegionLayout {
                guest_addr: 0x10_0000 + 40 * PAGE,
                size: 24 * PAGE,
            },
            RegionLayout {
                guest_addr: 0x1_0000_0000,
                size: 16 * PAGE,
            },
        ],
    }
}

fn text_page(rng: &mut fastrand::Rng) -> Vec<u8> {
    const WORDS: [&str; 12] = [
        "the", "page", "cache", "holds", "clean", "blocks", "of", "ext4", "files", "read", "by",
        "init",
    ];
    let mut page = Vec::with_capacity(PAGE as usize);
    while page.len() < PAGE as usize {
        page.extend_from_slice(WORDS[rng.usize(..WORDS.len())].as_bytes());
        page.push(b' ');
    }
    page.truncate(PAGE as usize);
    page
}

fn random_page(rng: &mut fastrand::Rng) -> Vec<u8> {
    let mut page = vec![0u8; PAGE as usize];
    rng.fill(&mut page);
    page
}

fn fixture(seed: u64) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = layout();
    let memory = layout.create().expect("memory");
    let mut rng = fastrand::Rng::with_seed(seed);
    let drive_path = dir.path().join("drive.img");
    let drive = File::create(&drive_path).expect("drive image");
    let drive_size = 4 << 20;
    drive.set_len(drive_size).expect("drive size");
    let mut extents = Vec::new();
    let mut counts = Counts::default();
    let mut expected = Vec::new();
    let mut drive_offset = 0x1_0000u64;

    for region in &layout.regions {
        let pages = region.size / PAGE;
        let mut region_bytes = Vec::with_capacity(region.size as usize);
        let mut page = 0;
        while page < pages {
            let n = rng.u64(1..=5).min(pages - page);
            let kind = rng.u8(..10);
            let first_frame = region.guest_addr / PAGE + page;
            if kind == 8 {
                extents.push(PageExtent {
                    first_frame,
                    pages: n,
                    class: PageClass::Disk {
                        drive: 0,
                        offset: drive_offset,
                    },
                });
            } else if kind == 9 {
                extents.push(PageExtent {
                    first_frame,
                    pages: n,
                    class: PageClass::Free,
                });
            }
            for i in 0..n {
                let addr = region.guest_addr + (page + i) * PAGE;
                let bytes = match kind {
                    0..=3 => random_page(&mut rng),
                    4..=5 => vec![0u8; PAGE as usize],
                    _ => text_page(&mut rng),
                };
                memory
                    .write_slice(&bytes, GuestAddress(addr))
                    .expect("fill");
                match kind {
                    8 => {
                        drive
                            .write_all_at(&bytes, drive_offset + i * PAGE)
                            .expect("drive write");
                        counts.disk += 1;
                        region_bytes.extend_from_slice(&bytes);
                    }
                    9 => {
                        counts.free += 1;
                        region_bytes.extend_from_slice(&[0u8; PAGE as usize]);
                    }
                    4..=5 => {
                        counts.zero += 1;
                        region_bytes.extend_from_slice(&bytes);
                    }
                    _ => {
                        counts.saved += 1;
                        region_bytes.extend_from_slice(&bytes);
                    }
                }
            }
            if kind == 8 {
                // Sometimes contiguous on the drive (runs merge), sometimes not.
                drive_offset += n * PAGE + if rng.bool() { 0 } else { 3 * PAGE };
            }
            page += n;
        }
        expected.push(region_bytes);
    }
    drive.sync_all().expect("sync drive");
    Fixture {
        dir,
        memory,
        drives: vec![DriveInfo {
            id: "root".into(),
            size: drive_size,
        }],
        drive_path,
        extents,
        expected,
        counts,
    }
}

fn options(compression: Option<i32>, threads: usize) -> WriteOptions {
    WriteOptions {
        compression,
        threads,
        chunk_pages: 8,
    }
}

fn write(f: &Fixture, path: &Path, opts: WriteOptions, state: &[u8]) -> WriteStats {
    let mut w = CheckpointWriter::create(path, opts).expect("create");
    w.write_memory(&f.memory, &f.drives, &f.extents)
        .expect("write memory");
    w.finish(state).expect("finish")
}

/// The sorted names in a directory.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn memory_bytes(memory: &GuestMemory) -> Vec<Vec<u8>> {
    MemoryLayout::of(memory)
        .regions
        .iter()
        .map(|r| {
            let mut b = vec![0u8; r.size as usize];
            memory
                .read_slice(&mut b, GuestAddress(r.guest_addr))
                .expect("read");
            b
        })
        .collect()
}

fn restore(path: &Path, drive_path: &Path, threads: usize) -> Result<GuestMemory, ReadError> {
    let reader = CheckpointReader::open(path)?;
    let memory = reader.layout().create().expect("memory");
    let runs = reader.restore_memory(&memory, threads)?;
    let image = File::open(drive_path).expect("drive");
    fill_disk_refs(
        &memory,
        &runs,
        &mut DriveFiles(std::slice::from_ref(&image)),
    )?;
    Ok(memory)
}

#[test]
fn round_trip_uncompressed_and_compressed() {
    for (seed, compression, threads) in [(1, None, 1), (2, Some(1), 2), (3, Some(3), 3)] {
        let f = fixture(seed);
        let path = f.dir.path().join("vm.ckpt");
        let state = br#"{"vcpus":2,"note":"opaque state"}"#;
        let stats = write(&f, &path, options(compression, threads), state);

        assert_eq!(
            (
                stats.pages_saved,
                stats.pages_zero,
                stats.pages_free,
                stats.pages_disk
            ),
            (f.counts.saved, f.counts.zero, f.counts.free, f.counts.disk),
            "seed {seed}"
        );
        assert_eq!(stats.raw_bytes, f.counts.saved * PAGE);
        assert_eq!(stats.chunks, f.counts.saved.div_ceil(8));
        let file_len = std::fs::metadata(&path).expect("stat").len();
        assert_eq!(stats.file_bytes, file_len);
        if compression.is_some() {
            assert!(stats.stored_bytes < stats.raw_bytes, "{stats:?}");
        } else {
            assert_eq!(stats.stored_bytes, stats.raw_bytes);
        }

        let reader = CheckpointReader::open(&path).expect("open");
        assert_eq!(reader.state(), state);
        assert_eq!(reader.layout(), &layout());
        assert_eq!(reader.drives(), &f.drives[..]);
        let map = reader.page_map();
        assert_eq!(map.saved_pages(), f.counts.saved);
        assert_eq!(map.zero_pages(), f.counts.zero + f.counts.free);
        assert_eq!(map.disk_pages(), f.counts.disk);
        reader.verify_chunks(2).expect("verify");

        let restored = restore(&path, &f.drive_path, threads).expect("restore");
        assert!(
            memory_bytes(&restored) == f.expected,
            "seed {seed}: restored memory differs"
        );
        // Nothing but the checkpoint (and the drive image) is left in the directory.
        assert_eq!(names_in(f.dir.path()), ["drive.img", "vm.ckpt"]);
    }
}

#[test]
fn page_map_runs_tile_regions_and_carry_page_hashes() {
    let f = fixture(7);
    let path = f.dir.path().join("vm.ckpt");
    write(&f, &path, options(Some(1), 2), b"{}");
    let reader = CheckpointReader::open(&path).expect("open");
    let layout = layout();
    let mut next_page = 0;
    for run in reader.page_map().runs() {
        assert_eq!(run.first_page, next_page);
        next_page += run.pages;
        let region = layout
            .regions
            .iter()
            .find(|r| r.guest_addr <= run.guest_addr && run.guest_addr < r.guest_addr + r.size)
            .expect("run in a region");
        assert!(run.guest_addr + run.pages * PAGE <= region.guest_addr + region.size);
        if let RunKind::Disk { offset, .. } = run.kind {
            let hashes = reader.page_map().hashes(run);
            assert_eq!(hashes.len() as u64, run.pages);
            for (i, h) in hashes.iter().enumerate() {
                let mut page = vec![0u8; PAGE as usize];
                f.memory
                    .read_slice(&mut page, GuestAddress(run.guest_addr + i as u64 * PAGE))
                    .expect("read");
                assert_eq!(h, &<[u8; 32]>::from(Sha256::digest(&page)));
                let mut on_disk = vec![0u8; PAGE as usize];
                File::open(&f.drive_path)
                    .expect("drive")
                    .read_exact_at(&mut on_disk, offset + i as u64 * PAGE)
                    .expect("read drive");
                assert_eq!(page, on_disk);
            }
        }
    }
    assert_eq!(next_page, layout.total_bytes() / PAGE);
    // Runs are encoded compactly: far fewer than pages.
    assert!(reader.page_map().runs().len() < (layout.total_bytes() / PAGE) as usize);
}

#[test]
fn builder_merges_neighbours_but_not_across_regions() {
    let mut b = PageMapBuilder::default();
    b.begin_region(0);
    b.push(2, RunKind::Saved);
    b.push(3, RunKind::Saved);
    b.push(
        1,
        RunKind::Disk {
            drive: 0,
            offset: 0,
        },
    );
    b.push(
        1,
        RunKind::Disk {
            drive: 0,
            offset: PAGE,
        },
    );
    b.push(
        1,
        RunKind::Disk {
            drive: 0,
            offset: 5 * PAGE,
        },
    );
    b.begin_region(7 * PAGE);
    b.push(1, RunKind::Zero);
    b.push(4, RunKind::Zero);
    b.begin_region(12 * PAGE);
    b.push(1, RunKind::Zero);
    let map = b.finish();
    let shape: Vec<_> = map
        .runs()
        .iter()
        .map(|r| (r.first_page, r.guest_addr / PAGE, r.pages))
        .collect();
    assert_eq!(
        shape,
        [(0, 0, 5), (5, 5, 2), (7, 7, 1), (8, 7, 5), (13, 12, 1)]
    );
    assert_eq!(map.saved_pages(), 5);
    assert_eq!(map.zero_pages(), 6);
}

#[test]
fn zero_detection() {
    let mut page = vec![0u8; PAGE as usize];
    assert!(is_zero(&page));
    for at in [0, 1, 63, 64, 2047, 4095] {
        page[at] = 1;
        assert!(!is_zero(&page), "byte {at}");
        page[at] = 0;
    }
    assert!(is_zero(&[0u8; 5]));
    assert!(!is_zero(&[0, 0, 0, 0, 9]));
}

#[test]
fn state_round_trips_as_json() {
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct State {
        vcpus: Vec<u64>,
        name: String,
    }
    let f = fixture(11);
    let path = f.dir.path().join("vm.ckpt");
    let state = State {
        vcpus: vec![1, 2, 3],
        name: "vm1".into(),
    };
    let mut w = CheckpointWriter::create(&path, options(None, 1)).expect("create");
    w.write_memory(&f.memory, &f.drives, &f.extents)
        .expect("write");
    w.finish_json(&state).expect("finish");
    let reader = CheckpointReader::open(&path).expect("open");
    assert_eq!(reader.state_json::<State>().expect("json"), state);
    assert!(matches!(
        reader.state_json::<Vec<u8>>(),
        Err(ReadError::State(_))
    ));
}

/// A written checkpoint and where its parts are.
struct Written {
    f: Fixture,
    path: PathBuf,
    bytes: Vec<u8>,
    trailer: Trailer,
    chunks: Vec<SectionEntry>,
}

fn written(seed: u64, compression: Option<i32>) -> Written {
    let f = fixture(seed);
    let path = f.dir.path().join("vm.ckpt");
    write(&f, &path, options(compression, 2), b"{\"state\":true}");
    let bytes = std::fs::read(&path).expect("read");
    let len = bytes.len() as u64;
    let mut tb = [0u8; TRAILER_LEN as usize];
    tb.copy_from_slice(&bytes[(len - TRAILER_LEN) as usize..]);
    let trailer = Trailer::decode(&tb, len).expect("trailer");
    let reader = CheckpointReader::open(&path).expect("open");
    let chunks = reader
        .chunks()
        .iter()
        .map(|c| SectionEntry {
            offset: c.offset,
            len: u64::from(c.stored_len),
            crc: c.crc,
        })
        .collect();
    Written {
        f,
        path,
        bytes,
        trailer,
        chunks,
    }
}

impl Written {
    /// Writes `bytes` as a file beside the original and opens and restores it.
    fn try_bytes(&self, bytes: &[u8]) -> Result<GuestMemory, ReadError> {
        let path = self.f.dir.path().join("mutated.ckpt");
        std::fs::write(&path, bytes).expect("write mutated");
        restore(&path, &self.f.drive_path, 2)
    }

    /// Every boundary between parts of the file.
    fn boundaries(&self) -> Vec<u64> {
        let len = self.bytes.len() as u64;
        let mut b = vec![0, 8, 12, HEADER_LEN, len - TRAILER_LEN, len];
        for s in self.trailer.sections.iter().chain(&self.chunks) {
            b.push(s.offset);
            b.push(s.offset + s.len);
        }
        b.sort_unstable();
        b.dedup();
        b
    }
}

#[test]
fn truncation_anywhere_is_refused() {
    let w = written(21, Some(1));
    let mut rng = fastrand::Rng::with_seed(21);
    let len = w.bytes.len() as u64;
    let mut cuts: Vec<u64> = w
        .boundaries()
        .into_iter()
        .flat_map(|b| [b.saturating_sub(1), b, b + 1])
        .filter(|&c| c < len)
        .collect();
    cuts.extend((0..200).map(|_| rng.u64(..len)));
    for cut in cuts {
        let err = w
            .try_bytes(&w.bytes[..cut as usize])
            .expect_err(&format!("truncated at {cut} accepted"));
        let expected = match cut {
            0..8 => matches!(err, ReadError::NotACheckpoint),
            8..64 => matches!(err, ReadError::Truncated { .. }),
            _ => matches!(err, ReadError::Incomplete { .. }),
        };
        assert!(expected, "cut at {cut}: {err}");
    }
}

#[test]
fn a_bit_flip_in_any_section_is_detected() {
    for compression in [None, Some(1)] {
        let w = written(31, compression);
        let len = w.bytes.len() as u64;
        // Every byte of the header, the metadata sections and the trailer.
        let mut positions: Vec<u64> = (0..HEADER_LEN).collect();
        for s in &w.trailer.sections {
            positions.extend(s.offset..s.offset + s.len);
        }
        positions.extend(len - TRAILER_LEN..len);
        // The first, middle and last byte of every chunk.
        for c in &w.chunks {
            positions.extend([c.offset, c.offset + c.len / 2, c.offset + c.len - 1]);
        }
        for (n, at) in positions.into_iter().enumerate() {
            let mut bytes = w.bytes.clone();
            bytes[at as usize] ^= 1 << (n % 8);
            let result = w.try_bytes(&bytes);
            assert!(result.is_err(), "flip at {at} not detected");
        }
        // Which error: the section's checksum names the section.
        let flip = |at: u64| {
            let mut bytes = w.bytes.clone();
            bytes[at as usize] ^= 0x10;
            w.try_bytes(&bytes).expect_err("flip accepted")
        };
        for (section, s) in format::Section::DIRECTORY.iter().zip(&w.trailer.sections) {
            if s.len == 0 {
                continue;
            }
            let err = flip(s.offset + s.len / 2);
            assert!(
                matches!(&err, ReadError::Checksum { section: got, .. } if got == section),
                "{section}: {err}"
            );
        }
        for (i, c) in w.chunks.iter().enumerate() {
            let err = flip(c.offset + c.len / 2);
            assert!(
                matches!(&err, ReadError::Checksum { section: format::Section::Chunk(j), .. } if *j == i as u64),
                "chunk {i}: {err}"
            );
        }
        assert!(matches!(flip(1), ReadError::NotACheckpoint));
        assert!(matches!(
            flip(8),
            ReadError::UnsupportedVersion { version: 17 }
        ));
        assert!(matches!(
            flip(30),
            ReadError::Checksum {
                section: format::Section::Header,
                ..
            }
        ));
        assert!(matches!(flip(len - 64), ReadError::Checksum { .. }));
        assert!(matches!(flip(len - 128), ReadError::Incomplete { .. }));
    }
}

/// Rewrites the header's flags with valid checksums in header and trailer.
fn with_flags(w: &Written, incompat: u64, compat: u64) -> Vec<u8> {
    let mut bytes = w.bytes.clone();
    let header = Header {
        incompat_flags: incompat,
        compat_flags: compat,
    };
    bytes[..HEADER_LEN as usize].copy_from_slice(&header.encode());
    put_trailer(
        &mut bytes,
        &Trailer {
            header_crc: header.crc(),
            ..w.trailer
        },
    );
    bytes
}

/// Replaces the trailer at the end of `bytes`.
fn put_trailer(bytes: &mut [u8], trailer: &Trailer) {
    let len = bytes.len();
    bytes[len - TRAILER_LEN as usize..].copy_from_slice(&trailer.encode());
}

#[test]
fn foreign_future_and_flagged_files() {
    let w = written(41, Some(1));
    // Not checkpoints at all.
    for foreign in [
        &b""[..],
        b"DITTO",
        b"#!/bin/sh\necho hello\n",
        &[0u8; 4096][..],
    ] {
        assert!(matches!(
            w.try_bytes(foreign),
            Err(ReadError::NotACheckpoint)
        ));
    }
    // A later version is refused by its number, whatever follows.
    let mut future = w.bytes.clone();
    future[8..12].copy_from_slice(&2u32.to_le_bytes());
    assert!(matches!(
        w.try_bytes(&future),
        Err(ReadError::UnsupportedVersion { version: 2 })
    ));
    future.truncate(20);
    assert!(matches!(
        w.try_bytes(&future),
        Err(ReadError::UnsupportedVersion { version: 2 })
    ));
    // An unknown incompatible flag is refused; an unknown compatible flag is ignored.
    let flagged = with_flags(&w, INCOMPAT_ZSTD | 1 << 40, 0);
    assert!(matches!(
        w.try_bytes(&flagged),
        Err(ReadError::UnknownIncompatFlags { flags }) if flags == 1 << 40
    ));
    let compat = with_flags(&w, INCOMPAT_ZSTD, 1 << 7);
    let restored = w.try_bytes(&compat).expect("compat flag ignored");
    assert!(memory_bytes(&restored) == w.f.expected);
    // zstd chunks in a file that does not announce zstd.
    let undeclared = with_flags(&w, 0, 0);
    assert!(matches!(
        w.try_bytes(&undeclared),
        Err(ReadError::Malformed {
            section: format::Section::ChunkTable,
            ..
        })
    ));
    // A header from another file (different flags) does not match the trailer.
    let mut spliced = w.bytes.clone();
    spliced[..HEADER_LEN as usize].copy_from_slice(
        &Header {
            incompat_flags: 0,
            compat_flags: 0,
        }
        .encode(),
    );
    assert!(matches!(
        w.try_bytes(&spliced),
        Err(ReadError::Malformed {
            section: format::Section::Trailer,
            ..
        })
    ));
}

/// Replaces a directory section's bytes (fixing its checksum and the trailer's) so that the
/// structural checks, not the checksums, must catch the damage.
fn with_section(w: &Written, index: usize, edit: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let mut bytes = w.bytes.clone();
    let s = w.trailer.sections[index];
    let body = &mut bytes[s.offset as usize..(s.offset + s.len) as usize];
    edit(body);
    let crc = checksum(body);
    let mut trailer = w.trailer;
    trailer.sections[index].crc = crc;
    put_trailer(&mut bytes, &trailer);
    bytes
}

#[test]
fn structural_damage_with_valid_checksums_is_refused() {
    let w = written(51, Some(1));
    let expect_malformed = |bytes: Vec<u8>, what: &str| match w.try_bytes(&bytes) {
        Err(ReadError::Malformed { .. }) => {}
        other => panic!("{what}: {:?}", other.map(|_| ())),
    };
    // Page map: one run longer (breaks the tiling), unknown kind, drive out of range.
    expect_malformed(
        with_section(&w, 2, |b| b[16 + 8] = b[16 + 8].wrapping_add(1)),
        "run longer",
    );
    expect_malformed(with_section(&w, 2, |b| b[16] = 9), "unknown kind");
    expect_malformed(
        with_section(&w, 2, |b| b[0..8].copy_from_slice(&u64::MAX.to_le_bytes())),
        "huge run count",
    );
    // Layout: a region that is not page aligned, an absurd region count.
    expect_malformed(with_section(&w, 1, |b| b[8] = 1), "unaligned region");
    expect_malformed(
        with_section(&w, 1, |b| b[0..4].copy_from_slice(&u32::MAX.to_le_bytes())),
        "region count",
    );
    // Chunk table: a chunk pointing into the header, a chunk of too many pages.
    expect_malformed(
        with_section(&w, 3, |b| b[8..16].copy_from_slice(&0u64.to_le_bytes())),
        "chunk in header",
    );
    expect_malformed(
        with_section(&w, 3, |b| {
            b[8 + 12..8 + 16].copy_from_slice(&u32::MAX.to_le_bytes())
        }),
        "chunk pages",
    );
    expect_malformed(
        with_section(&w, 3, |b| {
            let last = b.len() - CHUNK_RECORD_LEN as usize;
            b[last..last + 8].copy_from_slice(&u64::MAX.to_le_bytes())
        }),
        "chunk past the end",
    );
    // Trailer: a section placed over the header.
    let mut t = w.trailer;
    t.sections[0].offset = 0;
    let mut bytes = w.bytes.clone();
    put_trailer(&mut bytes, &t);
    expect_malformed(bytes, "section over header");
    // Two sections overlapping.
    let mut t = w.trailer;
    t.sections[1].offset = t.sections[0].offset;
    let mut bytes = w.bytes.clone();
    put_trailer(&mut bytes, &t);
    expect_malformed(bytes, "overlapping sections");
}

#[test]
fn restore_refuses_other_layouts() {
    let w = written(61, None);
    let reader = CheckpointReader::open(&w.path).expect("open");
    let other = MemoryLayout::single(128 * PAGE).create().expect("memory");
    let err = reader.restore_memory(&other, 1).expect_err("other layout");
    assert!(matches!(err, ReadError::LayoutMismatch { .. }), "{err}");
    assert!(err.to_string().contains("0x0+0x80000"), "{err}");
}

#[test]
fn a_changed_drive_image_is_refused() {
    let w = written(71, Some(1));
    let reader = CheckpointReader::open(&w.path).expect("open");
    let runs = reader.disk_refs();
    let run = runs.iter().max_by_key(|r| r.pages).expect("a disk run");
    let victim = run.pages - 1;
    let image = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&w.f.drive_path)
        .expect("drive");
    image
        .write_all_at(b"changed", run.drive_offset + victim * PAGE + 100)
        .expect("change drive");

    let memory = reader.layout().create().expect("memory");
    let runs = reader.restore_memory(&memory, 2).expect("restore");
    let err = fill_disk_refs(
        &memory,
        &runs,
        &mut DriveFiles(std::slice::from_ref(&image)),
    )
    .expect_err("changed page accepted");
    match err {
        ReadError::HashMismatch {
            guest_addr,
            drive,
            drive_offset,
        } => {
            assert_eq!(guest_addr, run.guest_addr + victim * PAGE);
            assert_eq!(drive, 0);
            assert_eq!(drive_offset, run.drive_offset + victim * PAGE);
        }
        other => panic!("{other}"),
    }
    // No image for the drive at all.
    let err = fill_disk_refs(&memory, &runs, &mut DriveFiles(&[])).expect_err("no drive");
    assert!(
        matches!(err, ReadError::DriveRead { drive: 0, .. }),
        "{err}"
    );
    // A closure works as a drive reader too.
    let mut reads = 0;
    let mut zeros = |_: u32, _: u64, buf: &mut [u8]| {
        reads += 1;
        buf.fill(0);
        Ok(())
    };
    assert!(matches!(
        fill_disk_refs(&memory, &runs, &mut zeros),
        Err(ReadError::HashMismatch { .. })
    ));
    assert_eq!(reads, 1);
}

#[test]
fn bad_extents_are_refused_and_leave_no_file() {
    let f = fixture(81);
    let path = f.dir.path().join("vm.ckpt");
    let disk = |first_frame, pages, drive, offset| PageExtent {
        first_frame,
        pages,
        class: PageClass::Disk { drive, offset },
    };
    let cases = [
        vec![disk(0, 4, 0, 0), disk(3, 2, 0, 0x10000)],
        vec![disk(48, 1, 0, 0)], // the hole after region 0
        vec![disk(0, 1, 1, 0)],  // no drive 1
        vec![disk(0, 2, 0, (4 << 20) - PAGE)],
        vec![disk(0, 0, 0, 0)],
        vec![disk(u64::MAX - 1, 4, 0, 0)],
    ];
    for extents in cases {
        let mut w = CheckpointWriter::create(&path, options(Some(1), 2)).expect("create");
        let err = w
            .write_memory(&f.memory, &f.drives, &extents)
            .expect_err(&format!("{extents:?} accepted"));
        assert!(matches!(err, WriteError::Extent { .. }), "{err}");
        drop(w);
        assert!(!path.exists());
    }
    // A disk extent over two adjacent regions is fine and split at the boundary.
    let across = [disk(0x100 + 38, 4, 0, 0)];
    let mut w = CheckpointWriter::create(&path, options(None, 1)).expect("create");
    w.write_memory(&f.memory, &f.drives, &across)
        .expect("across adjacent regions");
    w.finish(b"").expect("finish");
    let reader = CheckpointReader::open(&path).expect("open");
    let runs = reader.disk_refs();
    assert_eq!(
        runs.iter()
            .map(|r| (r.guest_addr / PAGE, r.pages, r.drive_offset))
            .collect::<Vec<_>>(),
        [(0x100 + 38, 2, 0), (0x100 + 40, 2, 2 * PAGE)]
    );
}

#[test]
fn hashes_taken_ahead_are_recorded_instead_of_hashing_again() {
    let f = fixture(83);
    let path = f.dir.path().join("vm.ckpt");
    let extent = PageExtent {
        first_frame: 0,
        pages: 3,
        class: PageClass::Disk {
            drive: 0,
            offset: 0,
        },
    };
    let ahead: PageHash = [7; 32];
    let hashes: PageHashes = [(1, ahead)].into_iter().collect();
    let mut w = CheckpointWriter::create(&path, options(None, 1)).expect("create");
    w.write_memory_hashed(&f.memory, &f.drives, &[extent], &hashes)
        .expect("write");
    w.finish(b"").expect("finish");
    let runs = CheckpointReader::open(&path).expect("open").disk_refs();
    let mut page = vec![0u8; PAGE as usize];
    let mut want = Vec::new();
    for gfn in 0..3 {
        f.memory
            .read_slice(&mut page, GuestAddress(gfn * PAGE))
            .expect("read");
        want.push(if gfn == 1 {
            ahead
        } else {
            Sha256::digest(&page).into()
        });
    }
    assert_eq!(runs.len(), 1);
    assert_eq!(
        runs[0].hashes, want,
        "frame 1 carries the hash given, the others their own"
    );
}

#[test]
fn writer_steps_out_of_order_and_bad_options() {
    let f = fixture(91);
    let path = f.dir.path().join("vm.ckpt");
    let w = CheckpointWriter::create(&path, options(None, 1)).expect("create");
    assert!(matches!(w.finish(b""), Err(WriteError::Sequence(_))));
    assert!(!path.exists());
    let mut w = CheckpointWriter::create(&path, options(None, 1)).expect("create");
    w.write_memory(&f.memory, &f.drives, &[]).expect("write");
    assert!(matches!(
        w.write_memory(&f.memory, &f.drives, &[]),
        Err(WriteError::Sequence(_))
    ));
    drop(w);
    for bad in [
        WriteOptions {
            chunk_pages: 0,
            ..options(None, 1)
        },
        WriteOptions {
            chunk_pages: 4097,
            ..options(None, 1)
        },
        options(Some(1000), 1),
    ] {
        assert!(matches!(
            CheckpointWriter::create(&path, bad),
            Err(WriteError::Options(_))
        ));
    }
    assert!(matches!(
        CheckpointWriter::create(f.dir.path().join("no-such-dir/vm.ckpt"), options(None, 1)),
        Err(WriteError::Io { .. })
    ));
    assert!(matches!(
        CheckpointWriter::create("/", options(None, 1)),
        Err(WriteError::Path { .. })
    ));
    assert_eq!(names_in(f.dir.path()), ["drive.img"]);
}

#[test]
fn an_unfinished_writer_leaves_the_old_file_and_no_litter() {
    let f = fixture(101);
    let path = f.dir.path().join("vm.ckpt");
    write(&f, &path, options(Some(1), 2), b"old");
    let old = std::fs::read(&path).expect("old");

    // Dropped after writing memory: the old checkpoint is untouched, nothing else appears.
    let mut w = CheckpointWriter::create(&path, options(Some(1), 2)).expect("create");
    w.write_memory(&f.memory, &f.drives, &f.extents)
        .expect("write");
    drop(w);
    assert_eq!(std::fs::read(&path).expect("still old"), old);
    assert_eq!(names_in(f.dir.path()), ["drive.img", "vm.ckpt"]);

    // Finished: replaced atomically by the new one.
    write(&f, &path, options(None, 1), b"new");
    assert_eq!(CheckpointReader::open(&path).expect("open").state(), b"new");
}

#[test]
fn named_temporary_files_are_removed_or_renamed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vm.ckpt");

    let pending = PendingFile::create_named(&path).expect("named");
    let temp = pending.temp_path().expect("a temporary name");
    assert!(temp.exists());
    assert!(
        temp.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(".vm.ckpt.") && n.ends_with(".tmp")),
        "{temp:?}"
    );
    pending.file().write_all_at(b"partial", 0).expect("write");
    drop(pending);
    assert!(!temp.exists() && !path.exists());

    let pending = PendingFile::create_named(&path).expect("named");
    let temp = pending.temp_path().expect("a temporary name");
    pending.file().write_all_at(b"complete", 0).expect("write");
    pending.persist().expect("persist");
    assert!(!temp.exists());
    assert_eq!(std::fs::read(&path).expect("final"), b"complete");

    // Unnamed (O_TMPFILE, which ext4 and tmpfs support): no name until persisted.
    let pending = PendingFile::create_unnamed(&path).expect("unnamed");
    assert!(pending.temp_path().is_none());
    pending.file().write_all_at(b"newer", 0).expect("write");
    assert_eq!(names_in(dir.path()), ["vm.ckpt"]);
    pending.persist().expect("persist");
    assert_eq!(std::fs::read(&path).expect("final"), b"newer");
    assert_eq!(names_in(dir.path()), ["vm.ckpt"]);

    // An unnamed file for a new name is linked there directly.
    let fresh = dir.path().join("new.ckpt");
    let pending = PendingFile::create_unnamed(&fresh).expect("unnamed");
    pending.file().write_all_at(b"first", 0).expect("write");
    pending.persist().expect("persist");
    assert_eq!(std::fs::read(&fresh).expect("final"), b"first");
    assert_eq!(names_in(dir.path()), ["new.ckpt", "vm.ckpt"]);
}

#[test]
fn a_partial_file_under_a_temporary_name_is_not_a_checkpoint() {
    // What a crash leaves under a temporary name: header and chunks, maybe some sections, no
    // trailer. Simulated by leaking a named pending file holding a checkpoint's first part.
    let w = written(111, Some(1));
    let pending = PendingFile::create_named(&w.path).expect("named");
    let temp = pending.temp_path().expect("temporary name");
    let body_end = (w.bytes.len() as u64 - TRAILER_LEN) as usize;
    pending
        .file()
        .write_all_at(&w.bytes[..body_end], 0)
        .expect("write");
    std::mem::forget(pending);
    assert!(matches!(
        CheckpointReader::open(&temp),
        Err(ReadError::Incomplete { .. })
    ));
    std::fs::remove_file(temp).expect("clean up");
}

/// A drive image of `pages` seeded pages and disk runs over all of it (in shuffled order, of
/// 1 to 600 pages, so batches of several sizes), each page's hash taken from the image.
fn many_runs(dir: &Path, pages: u64) -> (File, Vec<DiskRefRun>, MemoryLayout) {
    let mut rng = fastrand::Rng::with_seed(5);
    let path = dir.join("big.img");
    let mut bytes = vec![0u8; (pages * PAGE) as usize];
    rng.fill(&mut bytes);
    std::fs::write(&path, &bytes).expect("image");
    let mut runs = Vec::new();
    let mut first = 0;
    while first < pages {
        let n = rng.u64(1..=600).min(pages - first);
        let hashes = bytes[(first * PAGE) as usize..((first + n) * PAGE) as usize]
            .chunks_exact(PAGE as usize)
            .map(|p| Sha256::digest(p).into())
            .collect();
        runs.push(DiskRefRun {
            // Guest pages in reverse order of the drive's, to tell the two orders apart.
            guest_addr: (pages - first - n) * PAGE,
            pages: n,
            drive: 0,
            drive_offset: first * PAGE,
            hashes,
        });
        first += n;
    }
    rng.shuffle(&mut runs);
    (
        File::open(&path).expect("image"),
        runs,
        MemoryLayout::single(pages * PAGE),
    )
}

#[test]
fn parallel_fill_equals_the_sequential_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (image, runs, layout) = many_runs(dir.path(), 3000);
    let files = std::slice::from_ref(&image);
    let one = layout.create().expect("memory");
    assert_eq!(
        fill_disk_refs(&one, &runs, &mut DriveFiles(files)).expect("fill"),
        3000
    );
    for threads in [0, 1, 2, 3, 8] {
        let many = layout.create().expect("memory");
        let n = fill_disk_refs_parallel(&many, &runs, &DriveFiles(files), threads).expect("fill");
        assert_eq!(n, 3000, "{threads} threads");
        assert!(
            memory_bytes(&many) == memory_bytes(&one),
            "{threads} threads"
        );
    }
    // No runs: nothing to do on any number of threads.
    let empty = layout.create().expect("memory");
    assert_eq!(
        fill_disk_refs_parallel(&empty, &[], &DriveFiles(files), 4).expect("fill"),
        0
    );
}

#[test]
fn parallel_fill_reports_the_first_bad_page_in_drive_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (image, runs, layout) = many_runs(dir.path(), 3000);
    // Bad pages early and late on the drive (in different threads' slices).
    let bad = [2900u64, 2000, 150];
    let image = {
        drop(image);
        let path = dir.path().join("big.img");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("image");
        for page in bad {
            f.write_all_at(b"changed", page * PAGE + 9).expect("change");
        }
        f
    };
    let files = std::slice::from_ref(&image);
    for threads in [1, 2, 3, 4] {
        for _ in 0..5 {
            let memory = layout.create().expect("memory");
            let err = fill_disk_refs_parallel(&memory, &runs, &DriveFiles(files), threads)
                .expect_err("changed pages accepted");
            match err {
                ReadError::HashMismatch { drive_offset, .. } => {
                    assert_eq!(drive_offset, 150 * PAGE, "{threads} threads");
                }
                other => panic!("{other}"),
            }
        }
    }
}
