//! Real ext4 filesystems on loop devices for the agent's tests, and an independent check of a
//! report: the test's own mapping of each file tells which frame holds which file page, and the
//! loop device's bytes at the reported offset must equal that page.

#![allow(dead_code)] // each test file uses a different part
#![allow(clippy::unwrap_used)] // test helpers: a failure is a test failure

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use ditto_agent::disks::Disk;
use ditto_agent::extents::CacheExtent;
use ditto_agent::frames::{FrameReader, PAGE_SIZE};
use ditto_agent::scan::{self, Method, ScanEvent, ScanOptions, Summary};

/// Fails loudly when not root: these tests need loop devices, mounts and kpageflags.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "the agent's tests need root (loop devices, mount, /proc/kpageflags)"
    );
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// An ext4 filesystem on a loop device, mounted; unmounted and detached when dropped.
pub struct LoopFs {
    _dir: tempfile::TempDir,
    /// The loop device, e.g. /dev/loop3.
    pub device: PathBuf,
    /// Where it is mounted.
    pub mnt: PathBuf,
}

impl LoopFs {
    /// A fresh filesystem of `size_mib` MiB with `block_size`-byte blocks.
    pub fn new(size_mib: u64, block_size: u32) -> Self {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        File::create(&image)
            .unwrap()
            .set_len(size_mib << 20)
            .unwrap();
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", &block_size.to_string()])
            .arg(&image));
        let device = PathBuf::from(run(Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&image)));
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let fs = Self {
            _dir: dir,
            device,
            mnt,
        };
        run(Command::new("mount").arg(&fs.device).arg(&fs.mnt));
        fs
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// The content of page `page` of a file tagged `tag`: unique per (tag, page).
pub fn page_bytes(tag: u32, page: u64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(PAGE_SIZE as usize);
    let mut state = (u64::from(tag) << 32 | page) ^ 0x9e37_79b9_7f4a_7c15;
    while bytes.len() < PAGE_SIZE as usize {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes
}

/// Writes `len` bytes of tagged pages to `path`.
pub fn write_tagged(path: &Path, tag: u32, len: u64, sync: bool) -> File {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut left = len;
    let mut page = 0;
    while left > 0 {
        let n = left.min(PAGE_SIZE);
        file.write_all(&page_bytes(tag, page)[..n as usize])
            .unwrap();
        left -= n;
        page += 1;
    }
    if sync {
        file.sync_all().unwrap();
    }
    file
}

/// Drops the file's clean pages from the cache and reads it back, so that its page cache is
/// clean and freshly read.
pub fn recache(path: &Path) {
    let file = File::open(path).unwrap();
    // SAFETY: a valid open fd; fadvise only changes caching.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let mut buf = vec![0u8; 1 << 16];
    let mut offset = 0;
    loop {
        let n = file.read_at(&mut buf, offset).unwrap();
        if n == 0 {
            break;
        }
        offset += n as u64;
    }
    drain_lru_batches();
}

/// Moves pages that sit in the per-CPU batches of newly added pages onto the LRU lists. A page
/// is flagged LRU only then, and the scanner rightly reports only LRU pages; a batch holds a few
/// dozen pages and is moved when it fills up. So on each CPU in turn, this thread adds 64 fresh
/// anonymous pages, which fills and moves that CPU's batch.
pub fn drain_lru_batches() {
    const FILLER_PAGES: usize = 64;
    // SAFETY: an all-zero cpu_set_t is a valid, empty set.
    let mut original: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: `original` is a valid cpu_set_t of `size` bytes.
    let rc = unsafe { libc::sched_getaffinity(0, size, &mut original) };
    assert_eq!(rc, 0);
    for cpu in 0..libc::CPU_SETSIZE as usize {
        // SAFETY: `original` is initialised; CPU_ISSET only reads it.
        if !unsafe { libc::CPU_ISSET(cpu, &original) } {
            continue;
        }
        // SAFETY: an all-zero cpu_set_t is a valid, empty set; CPU_SET writes within it.
        let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `cpu` is below CPU_SETSIZE.
        unsafe { libc::CPU_SET(cpu, &mut one) };
        // SAFETY: `one` is a valid cpu_set_t of `size` bytes.
        if unsafe { libc::sched_setaffinity(0, size, &one) } != 0 {
            continue;
        }
        let len = FILLER_PAGES * PAGE_SIZE as usize;
        // SAFETY: a fresh private anonymous mapping, checked before use.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        // SAFETY: the range is our mapping; small pages make one batch entry per page.
        unsafe { libc::madvise(addr, len, libc::MADV_NOHUGEPAGE) };
        for page in 0..FILLER_PAGES {
            // SAFETY: inside our writable mapping.
            unsafe {
                std::ptr::write_volatile((addr as *mut u8).add(page * PAGE_SIZE as usize), 1)
            };
        }
        // SAFETY: unmapping the mapping made above.
        unsafe { libc::munmap(addr, len) };
    }
    // SAFETY: `original` is the valid set read above.
    unsafe { libc::sched_setaffinity(0, size, &original) };
}

/// A whole scan's output.
pub struct Report {
    /// The disk table.
    pub disks: Vec<Disk>,
    /// Every extent.
    pub extents: Vec<CacheExtent>,
    /// The summary.
    pub summary: Summary,
}

impl Report {
    /// Every reported page as (frame, disk index, offset).
    pub fn pages(&self) -> Vec<(u64, u32, u64)> {
        self.extents
            .iter()
            .flat_map(|e| (0..e.pages).map(move |k| (e.pfn + k, e.disk, e.offset + k * PAGE_SIZE)))
            .collect()
    }

    /// The index of the disk whose device node is `device`.
    pub fn disk_index(&self, device: &Path) -> Option<u32> {
        self.disks
            .iter()
            .position(|d| d.path == device)
            .map(|i| i as u32)
    }
}

/// Scans `paths` with loop devices counted as disks.
pub fn scan_paths(paths: &[&Path]) -> Report {
    scan_paths_with_hook(paths, None)
}

/// Scans `paths` with loop devices counted as disks, calling `after_mincore` with each file
/// between `mincore` and the touch of its resident pages.
pub fn scan_paths_with_hook(paths: &[&Path], after_mincore: Option<fn(&Path)>) -> Report {
    let mut disks = Vec::new();
    let mut extents = Vec::new();
    let summary = scan::scan(
        &ScanOptions {
            paths: paths.iter().map(|p| p.to_path_buf()).collect(),
            method: Some(Method::Walk),
            time_budget: None,
            include_loop_devices: true,
            after_mincore,
            kpageblock_path: None,
        },
        |event| {
            match event {
                ScanEvent::Disks(d) => disks = d,
                ScanEvent::Extents(batch) => extents.extend(batch),
            }
            Ok::<(), ()>(())
        },
    )
    .unwrap();
    Report {
        disks,
        extents,
        summary,
    }
}

/// Which frame holds each resident page of `path` (from the test's own mapping of the file).
pub fn frames_of(path: &Path) -> HashMap<u64, u64> {
    let file = File::open(path).unwrap();
    let len = file.metadata().unwrap().len() as usize;
    let mut out = HashMap::new();
    if len == 0 {
        return out;
    }
    // SAFETY: a fresh read-only shared mapping of an open file, checked before use.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED);
    let pages = len.div_ceil(PAGE_SIZE as usize);
    let mut resident = vec![0u8; pages];
    // SAFETY: the range is our mapping; `resident` has a byte per page.
    unsafe { libc::mincore(addr, len, resident.as_mut_ptr()) };
    for (i, r) in resident.iter().enumerate() {
        if r & 1 != 0 {
            // SAFETY: the page is inside the mapping and resident; reading it maps it.
            unsafe { std::ptr::read_volatile((addr as *const u8).add(i * PAGE_SIZE as usize)) };
        }
    }
    let frames = FrameReader::open()
        .unwrap()
        .frames(addr as usize, pages)
        .unwrap();
    for (page, frame) in frames.into_iter().enumerate() {
        if let Some(pfn) = frame {
            out.insert(pfn, page as u64);
        }
    }
    // SAFETY: unmapping the mapping made above.
    unsafe { libc::munmap(addr, len) };
    out
}

/// Checks every reported page on `fs`'s device whose frame belongs to `path`: the device's
/// bytes at the reported offset equal the file's page. Returns the file pages so verified.
pub fn verify_file(report: &Report, fs: &LoopFs, path: &Path) -> Vec<u64> {
    let disk = report
        .disk_index(&fs.device)
        .unwrap_or_else(|| panic!("{} is not in the disk table", fs.device.display()));
    let frames = frames_of(path);
    let device = File::open(&fs.device).unwrap();
    // Drop the device's own cache: the filesystem wrote around it.
    // SAFETY: BLKFLSBUF takes no argument and only drops clean cached pages of the device.
    unsafe { libc::ioctl(device.as_raw_fd(), 0x1261, 0) };
    let file = File::open(path).unwrap();
    let mut verified = Vec::new();
    for (pfn, d, offset) in report.pages() {
        let Some(&page) = frames.get(&pfn) else {
            continue;
        };
        assert_eq!(
            d,
            disk,
            "page {page} of {} reported on another disk",
            path.display()
        );
        let mut on_disk = vec![0u8; PAGE_SIZE as usize];
        device.read_exact_at(&mut on_disk, offset).unwrap();
        let mut in_file = vec![0u8; PAGE_SIZE as usize];
        file.read_exact_at(&mut in_file, page * PAGE_SIZE).unwrap();
        assert_eq!(
            on_disk,
            in_file,
            "page {page} of {} (frame {pfn}) is not at offset {offset} of {}",
            path.display(),
            fs.device.display()
        );
        verified.push(page);
    }
    verified.sort_unstable();
    verified
}

/// A tonic client of an agent serving on the Unix socket `socket`.
pub async fn client(
    socket: &Path,
) -> ditto_proto::agent::v1::agent_client::AgentClient<tonic::transport::Channel> {
    let socket = socket.to_owned();
    let channel = tonic::transport::Endpoint::try_from("http://agent.invalid")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .unwrap();
    ditto_proto::agent::v1::agent_client::AgentClient::new(channel)
}
