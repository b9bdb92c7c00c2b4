//! The agent's gRPC service over a real Unix socket, with a real tonic client.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{LoopFs, client, recache, write_tagged};
use ditto_agent::frames::PAGE_SIZE;
use ditto_agent::listen::{self, ListenAddr};
use ditto_agent::service::AgentService;
use ditto_proto::agent::v1::{ExecRequest, InfoRequest, ScanRequest, scan_chunk::Body};
use tokio::sync::oneshot;

/// A served agent; stops when dropped.
struct Served {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    _stop: oneshot::Sender<()>,
}

async fn serve(exec_enabled: bool) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let (stop, stopped) = oneshot::channel::<()>();
    let addr = ListenAddr::Unix(socket.clone());
    tokio::spawn(async move {
        let service = AgentService::new(exec_enabled, true);
        listen::serve(&addr, service, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    for _ in 0..100 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Served {
        _dir: dir,
        socket,
        _stop: stop,
    }
}

#[tokio::test]
async fn info_names_version_page_size_and_capabilities() {
    common::require_root();
    let served = serve(true).await;
    let info = client(&served.socket)
        .await
        .info(InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(info.page_size, 4096);
    assert!(!info.kernel_release.is_empty());
    for cap in ["kpageflags", "pagemap-pfn", "exec"] {
        assert!(
            info.capabilities.iter().any(|c| c == cap),
            "{cap} missing: {info:?}"
        );
    }
    assert_eq!(
        info.capabilities.iter().any(|c| c == "kpageblock"),
        Path::new("/proc/kpageblock").exists(),
        "kpageblock is a capability exactly when the kernel has it: {info:?}"
    );
}

#[tokio::test]
async fn scan_streams_disks_then_extents_then_the_summary() {
    let fs = LoopFs::new(32, 4096);
    let path = fs.mnt.join("data");
    write_tagged(&path, 11, 50 * PAGE_SIZE, true);
    recache(&path);
    let served = serve(true).await;
    let mut stream = client(&served.socket)
        .await
        .scan(ScanRequest {
            paths: vec![fs.mnt.display().to_string()],
            time_budget_ms: 0,
            method: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        chunks.push(chunk.body.expect("every chunk has a body"));
    }
    let Some(Body::Disks(table)) = chunks.first() else {
        panic!(
            "the first chunk is not the disk table: {:?}",
            chunks.first()
        );
    };
    let disk = table
        .disks
        .iter()
        .position(|d| Path::new(&d.path) == fs.device)
        .expect("the loop device is in the disk table") as u32;
    let Some(Body::Summary(summary)) = chunks.last() else {
        panic!("the last chunk is not the summary");
    };
    let mut pages = 0;
    for chunk in &chunks[1..chunks.len() - 1] {
        let Body::Extents(batch) = chunk else {
            panic!("only extent batches between the table and the summary: {chunk:?}");
        };
        for extent in &batch.extents {
            assert_eq!(extent.disk, disk);
            pages += extent.pages;
        }
    }
    assert_eq!(pages, summary.pages_reported);
    assert!(pages >= 50, "the file's 50 pages are reported ({pages})");
    assert_eq!(summary.method, "walk", "paths are scanned by the walk");
}

/// The error that ends a scan of `method` over `paths`.
async fn scan_error(method: &str, paths: Vec<String>) -> tonic::Status {
    let served = serve(true).await;
    let stream = client(&served.socket)
        .await
        .scan(ScanRequest {
            paths,
            time_budget_ms: 0,
            method: method.into(),
        })
        .await;
    let mut stream = match stream {
        Ok(stream) => stream.into_inner(),
        Err(status) => return status,
    };
    loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the scan ended without an error"),
            Err(status) => break status,
        }
    }
}

#[tokio::test]
async fn scan_methods_are_checked() {
    common::require_root();
    let err = scan_error("bogus", Vec::new()).await;
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    let err = scan_error("kpageblock", vec!["/".into()]).await;
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    if Path::new("/proc/kpageblock").exists() {
        return; // a patched kernel: the box tests cover the fast path
    }
    let err = scan_error("kpageblock", Vec::new()).await;
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("/proc/kpageblock"), "{err}");
}

#[tokio::test]
async fn scan_of_a_missing_path_is_an_invalid_argument() {
    common::require_root();
    let err = scan_error("", vec!["/nonexistent/ditto".into()]).await;
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
}

#[tokio::test]
async fn exec_runs_programs_with_stdin_env_and_a_time_limit() {
    let served = serve(true).await;
    let mut agent = client(&served.socket).await;
    let out = agent
        .exec(ExecRequest {
            program: "sh".into(),
            args: vec!["-c".into(), "tr a-z A-Z; echo $WHO >&2; exit 7".into()],
            env: [("WHO".to_owned(), "guest".to_owned())].into(),
            stdin: b"hello".to_vec(),
            timeout_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.stdout, b"HELLO");
    assert_eq!(out.stderr, b"guest\n");
    assert_eq!(out.exit_code, 7);
    assert!(!out.timed_out);

    let out = agent
        .exec(ExecRequest {
            program: "sleep".into(),
            args: vec!["30".into()],
            timeout_ms: 300,
            ..ExecRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(out.timed_out);
    assert_eq!(out.signal, libc::SIGKILL);

    let err = agent
        .exec(ExecRequest {
            program: "/nonexistent/program".into(),
            ..ExecRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test]
async fn exec_is_refused_with_no_exec() {
    let served = serve(false).await;
    let err = client(&served.socket)
        .await
        .exec(ExecRequest {
            program: "true".into(),
            ..ExecRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("--no-exec"), "{err}");
}
