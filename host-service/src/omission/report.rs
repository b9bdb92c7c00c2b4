//! The guest agent's page-cache report, fetched with bounds: the agent's `Scan` stream must be
//! one disk table, extent batches, and one summary, in that order; it must end within the time
//! given and name no more extents or pages than the guest has frames. Anything else is an
//! error, and the caller saves those pages.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ditto_proto::agent::v1 as pb;
use tokio_stream::StreamExt as _;

use crate::agent::{self, AgentError};

/// Largest stream message accepted from the agent (an extent batch of 4096 extents is about
/// 100 KiB).
const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// One clean page-cache extent as the agent claims it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClaimedExtent {
    /// First guest frame.
    pub pfn: u64,
    /// Number of pages.
    pub pages: u64,
    /// Index into [`AgentReport::disks`].
    pub disk: u32,
    /// Byte offset on that disk.
    pub offset: u64,
}

/// What the agent said, in the shape it said it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentReport {
    /// The ids of the disks extents refer to (virtio-blk serials: the VMM's drive ids).
    pub disks: Vec<String>,
    /// The extents, in the order sent.
    pub extents: Vec<ClaimedExtent>,
    /// The agent's summary.
    pub summary: pb::ScanSummary,
}

/// Why no usable report came.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The VM has no vsock socket for the host to reach the agent through.
    #[error("the VM has no vsock device, so no agent can be asked")]
    NoVsock,
    /// The agent could not be reached.
    #[error(transparent)]
    Connect(#[from] AgentError),
    /// The agent answered with an error.
    #[error("the agent's scan failed: {0}")]
    Rpc(tonic::Status),
    /// The scan did not end in time.
    #[error("the agent's scan did not finish within {0:?}")]
    TimedOut(Duration),
    /// The stream broke the contract.
    #[error("the agent's report is malformed: {0}")]
    Malformed(String),
    /// The report names more than the guest has.
    #[error("the agent's report is too large: {0}")]
    TooLarge(String),
    /// The runtime for the call could not be made.
    #[error("cannot run the agent client: {0}")]
    Runtime(std::io::Error),
}

/// Asks the agent on `port` behind the hybrid vsock socket `uds` for a scan, and collects it.
/// `guest_pages` bounds the report (no more extents, and no more pages, than frames); the whole
/// exchange must end within `timeout`. Blocks the calling thread (it runs its own runtime on a
/// thread of its own, so it may be called from anywhere).
pub fn fetch(
    uds: &Path,
    port: u32,
    guest_pages: u64,
    timeout: Duration,
) -> Result<AgentReport, ReportError> {
    let uds: PathBuf = uds.to_owned();
    std::thread::scope(|s| {
        s.spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(ReportError::Runtime)?;
            runtime.block_on(async {
                tokio::time::timeout(timeout, collect(&uds, port, guest_pages, timeout))
                    .await
                    .unwrap_or(Err(ReportError::TimedOut(timeout)))
            })
        })
        .join()
        .unwrap_or_else(|_| Err(ReportError::Malformed("the client thread panicked".into())))
    })
}

async fn collect(
    uds: &Path,
    port: u32,
    guest_pages: u64,
    timeout: Duration,
) -> Result<AgentReport, ReportError> {
    let started = Instant::now();
    let client = agent::connect(uds, port, timeout).await?;
    let mut client = client.max_decoding_message_size(MAX_MESSAGE_BYTES);
    let budget_ms = u32::try_from(timeout.as_millis() * 3 / 4).unwrap_or(u32::MAX);
    let mut stream = client
        .scan(pb::ScanRequest {
            paths: Vec::new(),
            time_budget_ms: budget_ms.max(1),
            method: String::new(),
        })
        .await
        .map_err(ReportError::Rpc)?
        .into_inner();
    let mut collector = Collector::new(guest_pages);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(ReportError::Rpc)?;
        collector.take(chunk)?;
    }
    let report = collector.finish()?;
    tracing::debug!(extents = report.extents.len(), elapsed = ?started.elapsed(), "agent report");
    Ok(report)
}

/// Checks and gathers the stream's messages in order.
#[derive(Debug)]
pub struct Collector {
    guest_pages: u64,
    report: AgentReport,
    seen_disks: bool,
    seen_summary: bool,
    pages: u64,
}

impl Collector {
    /// A collector for a guest of `guest_pages` frames.
    pub fn new(guest_pages: u64) -> Self {
        Self {
            guest_pages,
            report: AgentReport::default(),
            seen_disks: false,
            seen_summary: false,
            pages: 0,
        }
    }

    /// Takes the next message.
    pub fn take(&mut self, chunk: pb::ScanChunk) -> Result<(), ReportError> {
        let bad = |what: &str| Err(ReportError::Malformed(what.to_owned()));
        if self.seen_summary {
            return bad("a message after the summary");
        }
        match chunk.body {
            None => return bad("an empty message"),
            Some(pb::scan_chunk::Body::Disks(table)) => {
                if self.seen_disks {
                    return bad("a second disk table");
                }
                self.seen_disks = true;
                if table.disks.len() > 4096 {
                    return Err(ReportError::TooLarge(format!(
                        "{} disks",
                        table.disks.len()
                    )));
                }
                self.report.disks = table.disks.into_iter().map(|d| d.id).collect();
            }
            Some(pb::scan_chunk::Body::Extents(batch)) => {
                if !self.seen_disks {
                    return bad("extents before the disk table");
                }
                for e in batch.extents {
                    if self.report.extents.len() as u64 >= self.guest_pages {
                        return Err(ReportError::TooLarge(format!(
                            "more extents than the guest's {} frames",
                            self.guest_pages
                        )));
                    }
                    self.pages = self.pages.saturating_add(e.pages);
                    if self.pages > self.guest_pages {
                        return Err(ReportError::TooLarge(format!(
                            "more pages than the guest's {} frames",
                            self.guest_pages
                        )));
                    }
                    self.report.extents.push(ClaimedExtent {
                        pfn: e.pfn,
                        pages: e.pages,
                        disk: e.disk,
                        offset: e.offset,
                    });
                }
            }
            Some(pb::scan_chunk::Body::Summary(summary)) => {
                if !self.seen_disks {
                    return bad("a summary before the disk table");
                }
                if summary.guest_frames.len() > 64 {
                    return bad("a frame census of more than 64 kinds");
                }
                self.seen_summary = true;
                self.report.summary = summary;
            }
        }
        Ok(())
    }

    /// The report, once the stream has ended.
    pub fn finish(self) -> Result<AgentReport, ReportError> {
        if !self.seen_summary {
            return Err(ReportError::Malformed(
                "the stream ended without a summary".into(),
            ));
        }
        Ok(self.report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disks(ids: &[&str]) -> pb::ScanChunk {
        pb::ScanChunk {
            body: Some(pb::scan_chunk::Body::Disks(pb::DiskTable {
                disks: ids
                    .iter()
                    .map(|id| pb::Disk {
                        id: (*id).into(),
                        ..Default::default()
                    })
                    .collect(),
            })),
        }
    }

    fn extents(list: &[(u64, u64)]) -> pb::ScanChunk {
        pb::ScanChunk {
            body: Some(pb::scan_chunk::Body::Extents(pb::ExtentBatch {
                extents: list
                    .iter()
                    .map(|&(pfn, pages)| pb::CacheExtent {
                        pfn,
                        pages,
                        disk: 0,
                        offset: pfn * 4096,
                    })
                    .collect(),
            })),
        }
    }

    fn summary() -> pb::ScanChunk {
        pb::ScanChunk {
            body: Some(pb::scan_chunk::Body::Summary(pb::ScanSummary::default())),
        }
    }

    #[test]
    fn a_well_formed_stream_is_collected_in_order() {
        let mut c = Collector::new(100);
        c.take(disks(&["root"])).unwrap();
        c.take(extents(&[(1, 2), (10, 3)])).unwrap();
        c.take(extents(&[(20, 1)])).unwrap();
        c.take(summary()).unwrap();
        assert_eq!(c.pages, 6);
        let r = c.finish().unwrap();
        assert_eq!(r.disks, ["root"]);
        assert_eq!(r.extents.len(), 3);
        assert_eq!(r.extents[1].pfn, 10);
    }

    #[test]
    fn out_of_order_or_incomplete_streams_are_malformed() {
        let mut c = Collector::new(100);
        assert!(matches!(
            c.take(extents(&[(1, 1)])),
            Err(ReportError::Malformed(_))
        ));
        let mut c = Collector::new(100);
        assert!(matches!(c.take(summary()), Err(ReportError::Malformed(_))));
        let mut c = Collector::new(100);
        c.take(disks(&[])).unwrap();
        assert!(matches!(c.take(disks(&[])), Err(ReportError::Malformed(_))));
        let mut c = Collector::new(100);
        c.take(disks(&[])).unwrap();
        c.take(summary()).unwrap();
        assert!(matches!(
            c.take(extents(&[])),
            Err(ReportError::Malformed(_))
        ));
        let mut c = Collector::new(100);
        c.take(disks(&[])).unwrap();
        assert!(matches!(
            c.take(pb::ScanChunk { body: None }),
            Err(ReportError::Malformed(_))
        ));
        let mut c = Collector::new(100);
        c.take(disks(&[])).unwrap();
        c.take(extents(&[(1, 1)])).unwrap();
        assert!(matches!(c.finish(), Err(ReportError::Malformed(_))));
    }

    #[test]
    fn reports_larger_than_the_guest_are_refused() {
        let mut c = Collector::new(10);
        c.take(disks(&["root"])).unwrap();
        c.take(extents(&[(0, 5)])).unwrap();
        assert!(matches!(
            c.take(extents(&[(5, 6)])),
            Err(ReportError::TooLarge(_))
        ));
        let mut c = Collector::new(3);
        c.take(disks(&["root"])).unwrap();
        let many: Vec<_> = (0..4).map(|i| (i, 0)).collect();
        assert!(matches!(
            c.take(extents(&many)),
            Err(ReportError::TooLarge(_))
        ));
        let mut c = Collector::new(3);
        c.take(disks(&["root"])).unwrap();
        assert!(matches!(
            c.take(extents(&[(0, u64::MAX), (1, 2)])),
            Err(ReportError::TooLarge(_))
        ));
    }
}
