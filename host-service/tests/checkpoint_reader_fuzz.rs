//! Fuzzing the checkpoint reader with mutated valid files: bit flips, truncations, splices and
//! hostile values in length and count fields, each either left for the checksums to catch or
//! "resealed" (every checksum recomputed) so that the structural checks must catch it.
//!
//! For every mutant the reader must return an error or a result consistent with the file —
//! never panic — and opening it must stay within a memory bound proportional to the file. This
//! is its own test binary because the bound is measured with a counting global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ditto_host::checkpoint::format::{
    CHUNK_RECORD_LEN, Codec, HEADER_LEN, TRAILER_LEN, Trailer, checksum,
};
use ditto_host::checkpoint::{
    CheckpointReader, CheckpointWriter, DriveFiles, DriveInfo, PageClass, PageExtent, ReadError,
    RunKind, WriteOptions, fill_disk_refs,
};
use ditto_host::kvm::memory::{GuestMemory, MemoryLayout, RegionLayout};
use proptest::prelude::*;
use vm_memory::{Bytes as _, GuestAddress};

const PAGE: u64 = 4096;

/// Counts the bytes live on threads that asked to be tracked, and their peak.
struct CountingAlloc;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn account(delta: isize) {
    let _ = TRACKING.try_with(|t| {
        if t.get() {
            let _ = LIVE.try_with(|live| {
                let now = live.get() + delta;
                live.set(now);
                let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
            });
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator; the bookkeeping only
// touches const-initialised thread-local cells, which never allocate.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        account(layout.size() as isize);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        account(layout.size() as isize);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        account(-(layout.size() as isize));
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        account(new_size as isize - layout.size() as isize);
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Runs `f` and returns its result with the peak of bytes it had allocated on this thread.
fn peak_allocation<T>(f: impl FnOnce() -> T) -> (T, isize) {
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
    TRACKING.with(|t| t.set(true));
    let out = f();
    TRACKING.with(|t| t.set(false));
    (out, PEAK.with(Cell::get))
}

/// A valid checkpoint to mutate, the drive image it references and the memory it restores to.
struct Base {
    _dir: tempfile::TempDir,
    bytes: Vec<u8>,
    drive: PathBuf,
    expected: Vec<u8>,
    /// Offsets of length, count and offset fields, with their width in bytes.
    fields: Vec<(usize, usize)>,
    /// Where the property test writes its mutants.
    scratch: PathBuf,
}

fn layout() -> MemoryLayout {
    MemoryLayout {
        regions: vec![
            RegionLayout {
                guest_addr: 0,
                size: 24 * PAGE,
            },
            RegionLayout {
                guest_addr: 0x40_0000,
                size: 16 * PAGE,
            },
        ],
    }
}

fn base(compression: Option<i32>) -> Base {
    let dir = tempfile::tempdir().expect("tempdir");
    let memory = layout().create().expect("memory");
    let mut rng = fastrand::Rng::with_seed(7);
    let drive = dir.path().join("drive.img");
    let image = File::create(&drive).expect("drive");
    image.set_len(1 << 20).expect("drive size");
    let mut extents = Vec::new();
    let pages = layout()
        .regions
        .into_iter()
        .flat_map(|r| (0..r.size / PAGE).map(move |p| r.guest_addr + p * PAGE));
    for (i, addr) in pages.enumerate() {
        let mut bytes = vec![0u8; PAGE as usize];
        match i % 5 {
            0 => rng.fill(&mut bytes),
            1 => {}
            2 => bytes
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = (j % 7) as u8),
            3 => {
                rng.fill(&mut bytes);
                let offset = 0x1000 * i as u64;
                image.write_all_at(&bytes, offset).expect("drive write");
                extents.push(PageExtent {
                    first_frame: addr / PAGE,
                    pages: 1,
                    class: PageClass::Disk { drive: 0, offset },
                });
            }
            _ => bytes.fill(b'x'),
        }
        memory
            .write_slice(&bytes, GuestAddress(addr))
            .expect("fill");
    }
    let path = dir.path().join("base.ckpt");
    let mut w = CheckpointWriter::create(
        &path,
        WriteOptions {
            compression,
            threads: 1,
            chunk_pages: 4,
        },
    )
    .expect("create");
    let drives = [DriveInfo {
        id: "vda".into(),
        size: 1 << 20,
    }];
    w.write_memory(&memory, &drives, &extents).expect("write");
    w.finish(br#"{"vm":"state"}"#).expect("finish");
    let bytes = std::fs::read(&path).expect("read");
    let fields = length_fields(&bytes);
    Base {
        expected: region_bytes(&memory),
        scratch: dir.path().join("mutant.ckpt"),
        _dir: dir,
        bytes,
        drive,
        fields,
    }
}

fn region_bytes(memory: &GuestMemory) -> Vec<u8> {
    let mut out = Vec::new();
    for r in &MemoryLayout::of(memory).regions {
        let mut b = vec![0u8; r.size as usize];
        memory
            .read_slice(&mut b, GuestAddress(r.guest_addr))
            .expect("read");
        out.extend_from_slice(&b);
    }
    out
}

fn trailer_of(bytes: &[u8]) -> Option<Trailer> {
    let len = bytes.len() as u64;
    let start = len.checked_sub(TRAILER_LEN)? as usize;
    let tb: &[u8; TRAILER_LEN as usize] = bytes[start..].try_into().ok()?;
    Trailer::decode(tb, len).ok()
}

/// Where the length, count and offset fields of a valid file are.
fn length_fields(bytes: &[u8]) -> Vec<(usize, usize)> {
    let t = trailer_of(bytes).expect("valid base");
    let end = bytes.len() - TRAILER_LEN as usize;
    let mut fields = vec![(end + 8, 8), (end + 20, 4), (12, 4), (16, 4)];
    for i in 0..4 {
        fields.push((end + 24 + 24 * i, 8));
        fields.push((end + 32 + 24 * i, 8));
    }
    let [_, layout, map, chunks] = t.sections.map(|s| s.offset as usize);
    // Layout: counts, first region's size, first drive's size and id length.
    fields.extend([(layout, 4), (layout + 4, 4), (layout + 16, 8)]);
    fields.extend([(layout + 8 + 2 * 16, 8), (layout + 8 + 2 * 16 + 8, 2)]);
    // Page map: counts and the first runs' drive, page count and drive offset.
    fields.extend([(map, 8), (map + 8, 8)]);
    for r in 0..4 {
        let rec = map + 16 + 24 * r;
        fields.extend([(rec + 4, 4), (rec + 8, 8), (rec + 16, 8)]);
    }
    // Chunk table: count and the first chunks' offset, stored length and page count.
    fields.push((chunks, 8));
    for c in 0..3 {
        let rec = chunks + 8 + CHUNK_RECORD_LEN as usize * c;
        fields.extend([(rec, 8), (rec + 8, 4), (rec + 12, 4)]);
    }
    fields
}

/// Recomputes every checksum the (possibly damaged) directory still lets one find: chunks,
/// sections, header, the trailer's header binding and the trailer itself.
fn reseal(bytes: &mut [u8]) {
    let len = bytes.len();
    if len < (HEADER_LEN + TRAILER_LEN) as usize {
        return;
    }
    let hcrc = checksum(&bytes[..60]);
    bytes[60..64].copy_from_slice(&hcrc.to_le_bytes());
    let end = len - TRAILER_LEN as usize;
    if bytes[end..end + 8] != *b"DITTOEND" {
        return;
    }
    bytes[end + 16..end + 20].copy_from_slice(&hcrc.to_le_bytes());
    let field = |b: &[u8], at: usize| -> u64 {
        b.get(at..at + 8)
            .and_then(|s| s.try_into().ok())
            .map_or(u64::MAX, u64::from_le_bytes)
    };
    let in_file = |off: u64, n: u64| off.checked_add(n).is_some_and(|e| e <= end as u64);
    // Chunks first: their checksums live in the chunk table.
    let (ct_off, ct_len) = (field(bytes, end + 24 + 72), field(bytes, end + 32 + 72));
    if in_file(ct_off, ct_len) && ct_len >= 8 {
        let count = field(bytes, ct_off as usize).min((ct_len - 8) / CHUNK_RECORD_LEN);
        for c in 0..count as usize {
            let rec = ct_off as usize + 8 + CHUNK_RECORD_LEN as usize * c;
            let off = field(bytes, rec);
            let n = u64::from(u32::from_le_bytes(
                bytes[rec + 8..rec + 12].try_into().expect("4 bytes"),
            ));
            if in_file(off, n) {
                let crc = checksum(&bytes[off as usize..(off + n) as usize]);
                bytes[rec + 16..rec + 20].copy_from_slice(&crc.to_le_bytes());
            }
        }
    }
    for i in 0..4 {
        let (off, n) = (
            field(bytes, end + 24 + 24 * i),
            field(bytes, end + 32 + 24 * i),
        );
        if in_file(off, n) {
            let crc = checksum(&bytes[off as usize..(off + n) as usize]);
            bytes[end + 40 + 24 * i..end + 44 + 24 * i].copy_from_slice(&crc.to_le_bytes());
        }
    }
    let tcrc = checksum(&bytes[end..end + 124]);
    bytes[end + 124..].copy_from_slice(&tcrc.to_le_bytes());
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip { at: usize, bit: u8 },
    Truncate { len: usize },
    Splice { from: usize, to: usize, len: usize },
    Field { which: usize, value: u64 },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let value = prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(u64::from(u32::MAX)),
        Just(1 << 40),
        0u64..1 << 20,
        any::<u64>(),
    ];
    // Weighted so that truncation, which every later check then reports the same way, does
    // not crowd out the mutations that reach the structural checks and the restore.
    prop_oneof![
        3 => (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        1 => any::<usize>().prop_map(|len| Mutation::Truncate { len }),
        2 => (any::<usize>(), any::<usize>(), 1usize..512)
            .prop_map(|(from, to, len)| Mutation::Splice { from, to, len }),
        4 => (any::<usize>(), value).prop_map(|(which, value)| Mutation::Field { which, value }),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation, fields: &[(usize, usize)]) {
    let len = bytes.len();
    if len == 0 {
        return;
    }
    match *m {
        Mutation::Flip { at, bit } => bytes[at % len] ^= 1 << bit,
        Mutation::Truncate { len: n } => bytes.truncate(n % len),
        Mutation::Splice { from, to, len: n } => {
            let (from, to) = (from % len, to % len);
            let n = n.min(len - from).min(len - to);
            bytes.copy_within(from..from + n, to);
        }
        Mutation::Field { which, value } => {
            let (at, width) = fields[which % fields.len()];
            if at + width <= len {
                bytes[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
            }
        }
    }
}

/// Opens and restores `path`, checking the memory bound of `open` and that whatever is
/// restored is what the file says.
fn check(base: &Base, path: &Path, bytes: &[u8]) -> Result<(), ReadError> {
    let (opened, peak) = peak_allocation(|| CheckpointReader::open(path));
    let bound = 4 * bytes.len() as isize + (1 << 20);
    assert!(
        peak <= bound,
        "open allocated {peak} bytes for a {}-byte file",
        bytes.len()
    );
    let reader = opened?;
    if reader.layout().total_bytes() > 64 << 20 {
        return Ok(());
    }
    let memory = reader.layout().create().expect("memory");
    let runs = reader.restore_memory(&memory, 2)?;
    let image = File::open(&base.drive).expect("drive");
    fill_disk_refs(
        &memory,
        &runs,
        &mut DriveFiles(std::slice::from_ref(&image)),
    )?;
    assert!(
        region_bytes(&memory) == independent_decode(&reader, bytes, &image),
        "restored memory differs from what the file says"
    );
    Ok(())
}

/// The memory a file describes, decoded without the reader's restore code.
fn independent_decode(reader: &CheckpointReader, bytes: &[u8], image: &File) -> Vec<u8> {
    let mut saved = Vec::new();
    for c in reader.chunks() {
        let stored = &bytes[c.offset as usize..c.offset as usize + c.stored_len as usize];
        match c.codec {
            Codec::None => saved.extend_from_slice(stored),
            Codec::Zstd => saved.extend(zstd::bulk::decompress(stored, c.raw_len()).expect("zstd")),
        }
    }
    let mut out = Vec::new();
    for run in reader.page_map().runs() {
        let n = (run.pages * PAGE) as usize;
        match run.kind {
            RunKind::Saved => {
                let at = (run.data_index * PAGE) as usize;
                out.extend_from_slice(&saved[at..at + n]);
            }
            RunKind::Zero => out.resize(out.len() + n, 0),
            RunKind::Disk { offset, .. } => {
                let mut b = vec![0u8; n];
                image.read_exact_at(&mut b, offset).expect("drive read");
                out.extend_from_slice(&b);
            }
        }
    }
    out
}

fn bases() -> &'static [Base; 2] {
    static BASES: OnceLock<[Base; 2]> = OnceLock::new();
    BASES.get_or_init(|| [base(None), base(Some(3))])
}

#[test]
fn unmutated_bases_restore_exactly() {
    // Not the bases' scratch file: the property test rewrites that one concurrently.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("copy.ckpt");
    for b in bases() {
        std::fs::write(&path, &b.bytes).expect("write");
        check(b, &path, &b.bytes).expect("valid base");
        let reader = CheckpointReader::open(&path).expect("open");
        let memory = reader.layout().create().expect("memory");
        let runs = reader.restore_memory(&memory, 1).expect("restore");
        let image = File::open(&b.drive).expect("drive");
        fill_disk_refs(
            &memory,
            &runs,
            &mut DriveFiles(std::slice::from_ref(&image)),
        )
        .expect("fill");
        assert!(region_bytes(&memory) == b.expected);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(768))]

    #[test]
    fn mutated_files_are_refused_or_read_consistently(
        which in 0usize..2,
        mutations in prop::collection::vec(mutation(), 1..4),
        resealed in any::<bool>(),
    ) {
        let base = &bases()[which];
        let mut bytes = base.bytes.clone();
        for m in &mutations {
            apply(&mut bytes, m, &base.fields);
        }
        if resealed {
            reseal(&mut bytes);
        }
        std::fs::write(&base.scratch, &bytes).expect("write mutant");
        let result = check(base, &base.scratch, &bytes);
        if bytes == base.bytes {
            prop_assert!(result.is_ok(), "unchanged file refused: {:?}", result);
        } else if !resealed {
            // Every byte is under some checksum (or is the magic, version or trailer magic).
            prop_assert!(result.is_err(), "damage went undetected: {:?}", mutations);
        }
    }
}
