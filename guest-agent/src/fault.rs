//! Fault injection for testing hosts (`ditto-agent serve --fault KIND`, hidden from `--help`):
//! the ways this agent can turn into the hostile guest a host must survive. The end-to-end
//! tests start a second agent with one of these on a port of its own and ask the host to
//! checkpoint with it. Never use them in a real guest.

use std::str::FromStr;

use ditto_proto::agent::v1 as pb;
use tokio::io::{AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt as _};
use tonic::Status;

/// Extents per batch of a flood (the real scan's batch size).
const FLOOD_BATCH: u64 = 4096;

/// Extents a flood sends at most before it gives up and ends the stream (a host that takes
/// them all has no bound worth the name): 2^22 single-page extents, 16 GiB of frames.
const FLOOD_LIMIT: u64 = 1 << 22;

/// Bytes of padding in an oversized message: more than the 4 MiB a host takes.
const OVERSIZED_BYTES: usize = 6 << 20;

/// Bytes of junk a garbage agent writes to each connection.
const GARBAGE_BYTES: usize = 64 << 10;

/// A way to misbehave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// A real scan, but every disk offset is this many bytes too far: a report that lies.
    MisreportOffsets(u64),
    /// An extent batch before the disk table: a stream out of order.
    ExtentsFirst,
    /// A disk table larger than any message the host takes.
    Oversized,
    /// Single-page extents without end, far more than the guest has frames.
    Flood,
    /// The disk table, then nothing more until the host hangs up.
    Stall,
    /// No gRPC at all: whoever connects gets random bytes.
    Garbage,
}

impl FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(bytes) = s.strip_prefix("misreport-offsets=") {
            return bytes
                .parse()
                .map(Self::MisreportOffsets)
                .map_err(|_| format!("{bytes:?} is not a byte count"));
        }
        match s {
            "extents-first" => Ok(Self::ExtentsFirst),
            "oversized" => Ok(Self::Oversized),
            "flood" => Ok(Self::Flood),
            "stall" => Ok(Self::Stall),
            "garbage" => Ok(Self::Garbage),
            _ => Err(format!(
                "{s:?}: expected misreport-offsets=BYTES, extents-first, oversized, flood, \
                 stall or garbage"
            )),
        }
    }
}

impl Fault {
    /// How many bytes this fault adds to every reported offset of a real scan.
    pub fn offset_skew(self) -> u64 {
        match self {
            Self::MisreportOffsets(bytes) => bytes,
            _ => 0,
        }
    }

    /// Whether this fault answers `Scan` with a stream of its own instead of a scan.
    pub fn replaces_scan(self) -> bool {
        matches!(
            self,
            Self::ExtentsFirst | Self::Oversized | Self::Flood | Self::Stall
        )
    }

    /// Sends this fault's stream in place of a scan's, until it is done or the client went
    /// away. Does nothing for faults that do not replace the scan.
    pub async fn send_stream(self, tx: mpsc::Sender<Result<pb::ScanChunk, Status>>) {
        let send = |chunk| tx.send(Ok(chunk));
        match self {
            Self::ExtentsFirst => {
                for chunk in [extents(0, 1), root_table(String::new()), summary()] {
                    if send(chunk).await.is_err() {
                        return;
                    }
                }
            }
            Self::Oversized => {
                let padding = "x".repeat(OVERSIZED_BYTES);
                for chunk in [root_table(padding), summary()] {
                    if send(chunk).await.is_err() {
                        return;
                    }
                }
            }
            Self::Flood => {
                if send(root_table(String::new())).await.is_err() {
                    return;
                }
                let mut first = 0;
                while first < FLOOD_LIMIT {
                    if send(extents(first, FLOOD_BATCH)).await.is_err() {
                        return;
                    }
                    first += FLOOD_BATCH;
                }
                let _ = send(summary()).await;
            }
            Self::Stall => {
                if send(root_table(String::new())).await.is_ok() {
                    tx.closed().await;
                }
            }
            Self::MisreportOffsets(_) | Self::Garbage => {}
        }
    }
}

/// A disk table naming the guest's root disk (the VMM's drive id `root`), its path padded by
/// `padding`.
fn root_table(padding: String) -> pb::ScanChunk {
    pb::ScanChunk {
        body: Some(pb::scan_chunk::Body::Disks(pb::DiskTable {
            disks: vec![pb::Disk {
                id: "root".to_owned(),
                dev: "254:0".to_owned(),
                path: format!("/dev/vda{padding}"),
                size_bytes: 1 << 30,
            }],
        })),
    }
}

/// `count` single-page extents of disk 0, frames and blocks from `first` on.
fn extents(first: u64, count: u64) -> pb::ScanChunk {
    pb::ScanChunk {
        body: Some(pb::scan_chunk::Body::Extents(pb::ExtentBatch {
            extents: (first..first + count)
                .map(|i| pb::CacheExtent {
                    pfn: i,
                    pages: 1,
                    disk: 0,
                    offset: i * 4096,
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

/// Answers every connection `incoming` yields with random bytes, then closes it, until
/// `shutdown` completes.
pub async fn answer_with_garbage<S, IO, E>(incoming: S, shutdown: impl Future<Output = ()>)
where
    S: Stream<Item = Result<IO, E>>,
    IO: AsyncWrite + Unpin + Send + 'static,
{
    let mut incoming = std::pin::pin!(incoming);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let conn = tokio::select! {
            () = &mut shutdown => return,
            conn = incoming.next() => conn,
        };
        match conn {
            None => return,
            Some(Err(_)) => continue,
            Some(Ok(mut io)) => {
                tokio::spawn(async move {
                    let junk = junk(GARBAGE_BYTES);
                    let _ = io.write_all(&junk).await;
                    let _ = io.shutdown().await;
                });
            }
        }
    }
}

/// `len` bytes from /dev/urandom (or a fixed pattern without it: junk either way).
fn junk(len: usize) -> Vec<u8> {
    use std::io::Read as _;
    let mut bytes = vec![0x5au8; len];
    if let Ok(mut random) = std::fs::File::open("/dev/urandom") {
        let _ = random.read_exact(&mut bytes);
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_and_bad_ones_are_refused() {
        assert_eq!(
            "misreport-offsets=4096".parse(),
            Ok(Fault::MisreportOffsets(4096))
        );
        assert_eq!("flood".parse(), Ok(Fault::Flood));
        assert_eq!("garbage".parse(), Ok(Fault::Garbage));
        for bad in ["", "misreport-offsets=", "misreport-offsets=x", "lie"] {
            assert!(bad.parse::<Fault>().is_err(), "{bad}");
        }
    }

    async fn stream_of(fault: Fault, take: usize) -> Vec<pb::ScanChunk> {
        let (tx, mut rx) = mpsc::channel(4);
        let sender = tokio::spawn(fault.send_stream(tx));
        let mut got = Vec::new();
        while got.len() < take {
            match rx.recv().await {
                Some(chunk) => got.push(chunk.expect("a chunk")),
                None => break,
            }
        }
        drop(rx);
        sender
            .await
            .expect("the sender ends once the receiver is gone");
        got
    }

    fn kind(chunk: &pb::ScanChunk) -> &'static str {
        match chunk.body {
            Some(pb::scan_chunk::Body::Disks(_)) => "disks",
            Some(pb::scan_chunk::Body::Extents(_)) => "extents",
            Some(pb::scan_chunk::Body::Summary(_)) => "summary",
            None => "none",
        }
    }

    #[tokio::test]
    async fn each_fault_breaks_the_stream_its_own_way() {
        let order: Vec<_> = stream_of(Fault::ExtentsFirst, 10).await;
        assert_eq!(
            order.iter().map(kind).collect::<Vec<_>>(),
            ["extents", "disks", "summary"]
        );

        let big = stream_of(Fault::Oversized, 10).await;
        assert!(prost::Message::encoded_len(&big[0]) > 4 << 20);

        // A flood goes on past any guest's frames while someone listens, and stops when they
        // hang up.
        let flood = stream_of(Fault::Flood, 40).await;
        assert_eq!(flood.len(), 40);
        assert!(flood[1..].iter().all(|c| kind(c) == "extents"));

        // A stall sends the table and then waits for the hang-up (the helper drops the
        // receiver after it has what it asked for).
        let stall = stream_of(Fault::Stall, 1).await;
        assert_eq!(stall.iter().map(kind).collect::<Vec<_>>(), ["disks"]);

        assert!(stream_of(Fault::Garbage, 1).await.is_empty());
    }

    #[tokio::test]
    async fn garbage_answers_each_connection_with_junk_and_closes() {
        let (client, server) = tokio::io::duplex(1 << 20);
        let incoming = tokio_stream::iter([Ok::<_, std::io::Error>(server)]);
        answer_with_garbage(incoming, std::future::pending()).await;
        let mut client = client;
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut client, &mut got)
            .await
            .expect("read");
        assert_eq!(got.len(), GARBAGE_BYTES);
    }
}
