//! A running workload: its anonymous memory, the files it wrote, what it read into the page
//! cache, and the heartbeat thread that keeps it busy (a counter every [`HEARTBEAT_MS`], and a
//! few pages re-checked and re-written each time, so the process really runs and dirties its
//! memory the way a live program does).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::files::{self, FileRecord, FilesError};
use crate::memory::{AnonRegion, FIRST_BAD_KEPT, MemoryError};
use crate::pagecache::{self, ReadError, ReadSummary};
use crate::pattern::{PAGE_SIZE, Pattern, Stream};
use crate::protocol::{
    BadFile, FilesInfo, FilesReport, MemoryReport, PageCacheInfo, Status, VerifyReport,
};

/// Milliseconds between heartbeats.
pub const HEARTBEAT_MS: u64 = 100;
/// Pages re-checked and re-written per heartbeat.
pub const PAGES_PER_HEARTBEAT: u64 = 4;

/// What can go wrong while setting a workload up.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// The anonymous memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The files.
    #[error(transparent)]
    Files(#[from] FilesError),
    /// The page-cache folders.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The heartbeat thread could not start.
    #[error("starting the heartbeat thread: {0}")]
    Thread(std::io::Error),
}

/// Files to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilesSpec {
    /// The folder.
    pub dir: PathBuf,
    /// How many files.
    pub count: u64,
    /// Their total size in MiB.
    pub mib: u64,
}

/// What to set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadSpec {
    /// Anonymous memory in MiB.
    pub anon_mib: u64,
    /// The seed of all content.
    pub seed: u64,
    /// Files to write, if any.
    pub files: Option<FilesSpec>,
    /// Folders whose files are read once into the page cache.
    pub read: Vec<PathBuf>,
}

/// Counters the heartbeat thread shares with the workload.
#[derive(Default)]
struct Beat {
    heartbeats: AtomicU64,
    touched_pages: AtomicU64,
    touch_bad_pages: AtomicU64,
    stop: AtomicBool,
}

/// A set-up workload with its heartbeat running.
pub struct Workload {
    spec: WorkloadSpec,
    started: Instant,
    setup: Duration,
    memory: Arc<Mutex<AnonRegion>>,
    records: Vec<FileRecord>,
    read: Option<ReadSummary>,
    beat: Arc<Beat>,
    heartbeat: Option<JoinHandle<()>>,
    verifies: u64,
    previous_heartbeats: Option<u64>,
}

fn lock(memory: &Mutex<AnonRegion>) -> MutexGuard<'_, AnonRegion> {
    // The region stays consistent whatever a panicking holder did: every page is either right
    // or reported wrong.
    memory.lock().unwrap_or_else(PoisonError::into_inner)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Workload {
    /// Fills the anonymous memory, writes and syncs the files, reads the folders, then starts
    /// the heartbeat. `started` is when the process started (for uptime).
    pub fn start(spec: WorkloadSpec, started: Instant) -> Result<Self, WorkloadError> {
        // Refuse bad folders before spending time on memory and files.
        pagecache::check_folders(&spec.read)?;
        let region = AnonRegion::filled(spec.anon_mib, Pattern::new(spec.seed, Stream::Memory))?;
        let records = match &spec.files {
            Some(f) => files::write_files(&f.dir, f.count, f.mib << 20, spec.seed)?,
            None => Vec::new(),
        };
        let read = if spec.read.is_empty() {
            None
        } else {
            Some(pagecache::read_folders(&spec.read)?)
        };
        let memory = Arc::new(Mutex::new(region));
        let beat = Arc::new(Beat::default());
        let heartbeat = std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn({
                let memory = Arc::clone(&memory);
                let beat = Arc::clone(&beat);
                move || heartbeat(&memory, &beat)
            })
            .map_err(WorkloadError::Thread)?;
        Ok(Self {
            spec,
            started,
            setup: started.elapsed(),
            memory,
            records,
            read,
            beat,
            heartbeat: Some(heartbeat),
            verifies: 0,
            previous_heartbeats: None,
        })
    }

    /// Heartbeats so far.
    pub fn heartbeats(&self) -> u64 {
        self.beat.heartbeats.load(Ordering::Relaxed)
    }

    /// The state, without checking anything.
    pub fn status(&self) -> Status {
        let pages = (self.spec.anon_mib << 20) / PAGE_SIZE as u64;
        Status {
            pid: std::process::id(),
            uptime_ms: millis(self.started.elapsed()),
            heartbeats: self.heartbeats(),
            seed: self.spec.seed,
            anon_mib: self.spec.anon_mib,
            anon_pages: pages,
            files: self.spec.files.as_ref().map(|f| FilesInfo {
                dir: f.dir.display().to_string(),
                count: self.records.len() as u64,
                bytes: self.records.iter().map(|r| r.size).sum(),
            }),
            page_cache: self.read.as_ref().map(|r| PageCacheInfo {
                dirs: self
                    .spec
                    .read
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect(),
                files: r.files,
                bytes: r.bytes,
                errors: r.errors,
                first_error: r.first_error.clone(),
            }),
            setup_ms: millis(self.setup),
            verifies: self.verifies,
            touched_pages: self.beat.touched_pages.load(Ordering::Relaxed),
            touch_bad_pages: self.beat.touch_bad_pages.load(Ordering::Relaxed),
        }
    }

    /// Checks every anonymous page and reads every file back. The heartbeat keeps counting
    /// meanwhile (it skips its page touches while the memory is being checked).
    pub fn verify(&mut self) -> VerifyReport {
        let began = Instant::now();
        let pages = lock(&self.memory).verify();
        let memory_took = began.elapsed();
        let began = Instant::now();
        let files = files::verify_files(&self.records);
        let files_took = began.elapsed();
        let heartbeats = self.heartbeats();
        let previous_heartbeats = self.previous_heartbeats.replace(heartbeats);
        self.verifies += 1;
        VerifyReport {
            ok: pages.bad == 0 && files.bad.is_empty(),
            pid: std::process::id(),
            uptime_ms: millis(self.started.elapsed()),
            heartbeats,
            previous_heartbeats,
            memory: MemoryReport {
                pages_checked: pages.checked,
                bytes_checked: pages.checked * PAGE_SIZE as u64,
                bad_pages: pages.bad,
                first_bad_pages: pages.first_bad,
                elapsed_us: micros(memory_took),
            },
            files: FilesReport {
                checked: files.checked,
                bytes_read: files.bytes_read,
                bad: files.bad.len() as u64,
                bad_files: files
                    .bad
                    .iter()
                    .take(FIRST_BAD_KEPT)
                    .map(|(path, problem)| BadFile {
                        path: path.display().to_string(),
                        problem: problem.to_string(),
                    })
                    .collect(),
                elapsed_us: micros(files_took),
            },
        }
    }

    /// Flips one bit of anonymous page `page` (debugging aid); returns the byte's offset.
    pub fn corrupt_page(&self, page: u64) -> Result<usize, MemoryError> {
        lock(&self.memory).corrupt_page(page)
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.beat.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.heartbeat.take() {
            let _ = thread.join();
        }
    }
}

/// The heartbeat: count, then re-check and re-write the next few pages in turn unless a
/// verification holds the memory.
fn heartbeat(memory: &Mutex<AnonRegion>, beat: &Beat) {
    let mut cursor = 0u64;
    while !beat.stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(HEARTBEAT_MS));
        beat.heartbeats.fetch_add(1, Ordering::Relaxed);
        let mut region = match memory.try_lock() {
            Ok(region) => region,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => continue,
        };
        let pages = region.pages();
        if pages == 0 {
            continue;
        }
        for _ in 0..PAGES_PER_HEARTBEAT.min(pages) {
            cursor %= pages;
            if let Ok(good) = region.recheck_and_touch(cursor) {
                beat.touched_pages.fetch_add(1, Ordering::Relaxed);
                if !good {
                    beat.touch_bad_pages.fetch_add(1, Ordering::Relaxed);
                }
            }
            cursor += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &std::path::Path) -> WorkloadSpec {
        WorkloadSpec {
            anon_mib: 2,
            seed: 77,
            files: Some(FilesSpec {
                dir: dir.join("files"),
                count: 2,
                mib: 1,
            }),
            read: vec![dir.join("files")],
        }
    }

    #[test]
    fn a_workload_verifies_keeps_beating_and_reports_corruption() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("files")).unwrap();
        let mut workload = Workload::start(spec(tmp.path()), Instant::now()).unwrap();
        let status = workload.status();
        assert_eq!(status.anon_pages, 512);
        assert_eq!(status.files.as_ref().unwrap().bytes, 1 << 20);
        // The folder is read after the files were written into it.
        assert_eq!(status.page_cache.as_ref().unwrap().bytes, 1 << 20);

        let first = workload.verify();
        assert!(first.ok, "{first:?}");
        assert_eq!(first.memory.pages_checked, 512);
        assert_eq!(first.files.checked, 2);
        assert_eq!(first.previous_heartbeats, None);

        // A page a few heartbeats ahead of the heartbeat's cursor: it will re-check it, must
        // find it wrong and must leave it wrong.
        let ahead = workload.status().touched_pages + 4 * PAGES_PER_HEARTBEAT;
        workload.corrupt_page(ahead).unwrap();
        workload.corrupt_page(500).unwrap();
        let began = Instant::now();
        while workload.status().touched_pages <= ahead + PAGES_PER_HEARTBEAT {
            assert!(began.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(20));
        }
        let second = workload.verify();
        assert!(!second.ok);
        assert_eq!(second.memory.first_bad_pages, vec![ahead, 500]);
        assert_eq!(second.previous_heartbeats, Some(first.heartbeats));
        assert!(second.heartbeats >= first.heartbeats + 5, "{second:?}");
        let status = workload.status();
        assert_eq!(status.verifies, 2);
        assert_eq!(status.touch_bad_pages, 1, "{status:?}");
        assert!(workload.corrupt_page(512).is_err());
    }

    #[test]
    fn a_missing_read_folder_is_refused_before_anything_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        let mut spec = spec(tmp.path());
        spec.read = vec![tmp.path().join("nope")];
        let err = Workload::start(spec, Instant::now()).err().unwrap();
        assert!(err.to_string().contains("nope"), "{err}");
        assert!(!tmp.path().join("files").exists());
    }
}
