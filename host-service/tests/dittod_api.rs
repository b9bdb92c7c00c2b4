//! The listening side of the real `dittod` and `dittoctl` binaries, with no VM and no KVM: each
//! test starts its own daemon on a temporary `--state-dir` (and fresh loopback ports), calls
//! only ListVms/GetVm-style RPCs, and kills the daemon when it ends.
//!
//! Covered: the Unix socket (owner-only mode 0600, `list --json` on an empty daemon); plain TCP
//! on loopback; the refusal of a non-loopback address without mutual TLS (and without a client
//! CA) unless `--insecure`; mutual TLS with certificates made at test time by `rcgen` (a good
//! client works; no client certificate, a certificate from another CA and plain HTTP fail);
//! gRPC server reflection and the standard health service; the Prometheus `/metrics` endpoint
//! after API calls, one of them NotFound; and `dittoctl completions bash`.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

const DITTOD: &str = env!("CARGO_BIN_EXE_dittod");
const DITTOCTL: &str = env!("CARGO_BIN_EXE_dittoctl");
/// How long a daemon may take to listen, and one `dittoctl` run to end.
const PATIENCE: Duration = Duration::from_secs(30);
/// How often a daemon that dies while starting is started again (a free port taken meanwhile).
const START_TRIES: usize = 4;

/// A TCP port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Runs `command` to its end (killed after [`PATIENCE`]), standard input closed.
fn run(command: &mut Command) -> Output {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(PATIENCE) {
        Ok(output) => output.expect("wait for the process"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("{command:?} still runs after {PATIENCE:?}");
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `dittoctl ARGS…` (without the caller's `DITTO_*` environment).
fn ctl(args: &[&str]) -> Output {
    run(Command::new(DITTOCTL)
        .args(args)
        .env_remove("DITTO_SOCKET")
        .env_remove("DITTO_ADDR"))
}

/// Runs `dittoctl ARGS…`, asserts it succeeded, returns its standard output.
fn ctl_ok(args: &[&str]) -> String {
    let out = ctl(args);
    assert!(
        out.status.success(),
        "dittoctl {args:?}: {}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Runs `dittoctl ARGS…`, asserts it failed, returns its standard error.
fn ctl_fails(args: &[&str]) -> String {
    let out = ctl(args);
    assert!(
        !out.status.success(),
        "dittoctl {args:?} should fail but printed: {}",
        text(&out.stdout)
    );
    assert!(
        out.stdout.is_empty(),
        "dittoctl {args:?} failed but printed: {}",
        text(&out.stdout)
    );
    text(&out.stderr)
}

/// A `dittod` on a state directory of its own; dropping it kills the daemon.
struct Daemon {
    child: Child,
    /// The ports its arguments were given, in order.
    ports: Vec<u16>,
    /// Holds the state directory, the log and any certificates.
    dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `dittod --state-dir … ARGS…`, where `args` gets fresh ports (`ports` of them)
    /// and returns the arguments and the TCP addresses that must accept before the daemon
    /// counts as started (the Unix socket always must). A daemon that dies while starting is
    /// retried on new ports (another process may have taken one); the last failure panics.
    fn start(
        dir: tempfile::TempDir,
        ports: usize,
        args: impl Fn(&[u16]) -> (Vec<String>, Vec<SocketAddr>),
    ) -> Self {
        let log = dir.path().join("dittod.log");
        let socket = dir.path().join("state").join("dittod.sock");
        let mut last = String::new();
        for _ in 0..START_TRIES {
            let ports: Vec<u16> = (0..ports).map(|_| free_port()).collect();
            let (args, ready) = args(&ports);
            let mut child = spawn_dittod(dir.path(), &args, &log);
            match wait_ready(&mut child, &socket, &ready) {
                Ok(()) => return Self { child, ports, dir },
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last = format!(
                        "{e}:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
            }
        }
        panic!("dittod did not start in {START_TRIES} tries; the last one: {last}");
    }

    /// A daemon with only its Unix socket.
    fn unix_only() -> Self {
        Self::start(temp_dir(), 0, |_| (Vec::new(), Vec::new()))
    }

    /// A daemon with its Unix socket and `flag 127.0.0.1:PORT EXTRA…`.
    fn with_loopback(dir: tempfile::TempDir, flag: &str, extra: &[&str]) -> Self {
        Self::start(dir, 1, |p| {
            let mut args = vec![flag.to_owned(), loopback(p[0]).to_string()];
            args.extend(extra.iter().map(|a| (*a).to_owned()));
            (args, vec![loopback(p[0])])
        })
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("state").join("dittod.sock")
    }

    fn socket_arg(&self) -> String {
        self.socket().display().to_string()
    }

    /// The first port it was given.
    fn port(&self) -> u16 {
        self.ports[0]
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls until `socket` and every address in `tcp` accept, `child` ends, or [`PATIENCE`]
/// runs out.
fn wait_ready(child: &mut Child, socket: &Path, tcp: &[SocketAddr]) -> Result<(), String> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait for dittod") {
            return Err(format!("dittod ended ({status}) before serving"));
        }
        if std::os::unix::net::UnixStream::connect(socket).is_ok()
            && tcp
                .iter()
                .all(|a| TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok())
        {
            return Ok(());
        }
        if start.elapsed() > PATIENCE {
            return Err(format!("dittod does not serve after {PATIENCE:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("dittod-api-")
        .tempdir()
        .expect("temporary directory")
}

fn spawn_dittod(dir: &Path, args: &[String], log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("dittod log");
    Command::new(DITTOD)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn dittod")
}

/// Runs a `dittod` that must refuse to start (before it binds its socket); returns its
/// standard error.
fn dittod_refuses(args: &[&str]) -> String {
    let dir = temp_dir();
    let out = run(Command::new(DITTOD)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(args));
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success(),
        "dittod {args:?} should refuse to start; it ended with {} and said: {stderr}",
        out.status
    );
    let socket = dir.path().join("state").join("dittod.sock");
    assert!(
        !socket.exists(),
        "dittod {args:?} refused but left {} behind",
        socket.display()
    );
    stderr
}

#[test]
fn unix_socket_lists_nothing_and_is_owner_only() {
    let daemon = Daemon::unix_only();
    let socket = daemon.socket_arg();
    let meta = std::fs::metadata(daemon.socket()).expect("socket file");
    assert!(meta.file_type().is_socket(), "{socket} is not a socket");
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "{socket} mode {:o}",
        meta.permissions().mode()
    );
    let list: serde_json::Value =
        serde_json::from_str(&ctl_ok(&["--socket", &socket, "list", "--json"])).expect("JSON");
    assert_eq!(list, serde_json::json!([]));
    let checkpoints: serde_json::Value =
        serde_json::from_str(&ctl_ok(&["--socket", &socket, "--json", "checkpoints"]))
            .expect("JSON");
    assert_eq!(checkpoints, serde_json::json!([]));
}

#[test]
fn plain_tcp_on_loopback_serves() {
    let daemon = Daemon::with_loopback(temp_dir(), "--tcp", &[]);
    let port = daemon.port();
    let addr = format!("http://127.0.0.1:{port}");
    let list: serde_json::Value =
        serde_json::from_str(&ctl_ok(&["--addr", &addr, "--json", "list"])).expect("JSON");
    assert_eq!(list, serde_json::json!([]));
    // The readable form works too, and a missing VM is NotFound over TCP as well.
    ctl_ok(&["--addr", &addr, "list"]);
    let err = ctl_fails(&["--addr", &addr, "get", "nope"]);
    assert!(err.contains("NotFound"), "{err}");
}

#[test]
fn non_loopback_tcp_needs_mutual_tls_or_insecure() {
    let port = free_port();
    let any = format!("0.0.0.0:{port}");
    let said = dittod_refuses(&["--tcp", &any]);
    assert!(
        said.contains("mutual TLS") && said.contains("--insecure") && said.contains(&any),
        "{said}"
    );

    // TLS without a client CA on a non-loopback address: no client authentication, refused.
    let pki_dir = temp_dir();
    let pki = Pki::new(pki_dir.path());
    let said = dittod_refuses(&[
        "--tcp",
        &any,
        "--tls-cert",
        &pki.server_cert,
        "--tls-key",
        &pki.server_key,
    ]);
    assert!(
        said.contains("--tls-client-ca is missing") && said.contains("--insecure"),
        "{said}"
    );

    // TLS options without --tcp are a usage error.
    let said = dittod_refuses(&["--tls-cert", "/c", "--tls-key", "/k"]);
    assert!(said.contains("--tcp"), "{said}");

    // With --insecure it starts, and answers on the wildcard address's loopback side.
    let daemon = Daemon::start(temp_dir(), 1, |p| {
        (
            vec![
                "--tcp".into(),
                format!("0.0.0.0:{}", p[0]),
                "--insecure".into(),
            ],
            vec![loopback(p[0])],
        )
    });
    let addr = format!("http://127.0.0.1:{}", daemon.port());
    ctl_ok(&["--addr", &addr, "list"]);
}

/// Certificates made for one test: a CA, a server certificate for 127.0.0.1 and localhost,
/// a client certificate from that CA, and a client certificate from another CA.
struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
    rogue_cert: String,
    rogue_key: String,
}

fn new_ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().expect("CA key");
    let cert = params.self_signed(&key).expect("CA certificate");
    (cert.pem(), Issuer::new(params, key))
}

fn leaf(
    issuer: &Issuer<'static, KeyPair>,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let mut params = CertificateParams::new(
        names
            .iter()
            .map(|n| (*n).to_owned())
            .collect::<Vec<String>>(),
    )
    .expect("leaf params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, names[0]);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().expect("leaf key");
    let cert = params.signed_by(&key, issuer).expect("leaf certificate");
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    fn new(dir: &Path) -> Self {
        let write = |name: &str, pem: &str| {
            let path = dir.join(name);
            std::fs::write(&path, pem).expect("write PEM");
            path.display().to_string()
        };
        let (ca_pem, ca) = new_ca("ditto test CA");
        let (server, server_key) = leaf(
            &ca,
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client, client_key) = leaf(&ca, &["client"], ExtendedKeyUsagePurpose::ClientAuth);
        let (_, rogue_ca) = new_ca("another CA");
        let (rogue, rogue_key) = leaf(&rogue_ca, &["client"], ExtendedKeyUsagePurpose::ClientAuth);
        Self {
            ca: write("ca.pem", &ca_pem),
            server_cert: write("server.pem", &server),
            server_key: write("server.key", &server_key),
            client_cert: write("client.pem", &client),
            client_key: write("client.key", &client_key),
            rogue_cert: write("rogue.pem", &rogue),
            rogue_key: write("rogue.key", &rogue_key),
        }
    }
}

#[test]
fn mutual_tls_admits_only_clients_of_its_ca() {
    let dir = temp_dir();
    let pki = Pki::new(dir.path());
    let daemon = Daemon::with_loopback(
        dir,
        "--tcp",
        &[
            "--tls-cert",
            &pki.server_cert,
            "--tls-key",
            &pki.server_key,
            "--tls-client-ca",
            &pki.ca,
        ],
    );
    let port = daemon.port();
    let client = Some((pki.client_cert.as_str(), pki.client_key.as_str()));
    for host in ["127.0.0.1", "localhost"] {
        let https = format!("https://{host}:{port}");
        let list = ctl_ok(&over_tls(&https, &pki.ca, client, &["--json", "list"]));
        assert_eq!(list.trim(), "[]", "over {https}");
    }
    let https = format!("https://127.0.0.1:{port}");

    // No client certificate.
    ctl_fails(&over_tls(&https, &pki.ca, None, &["list"]));
    // A client certificate from another CA.
    let rogue = Some((pki.rogue_cert.as_str(), pki.rogue_key.as_str()));
    ctl_fails(&over_tls(&https, &pki.ca, rogue, &["list"]));
    // The client does not trust a server whose CA it was not given (another CA instead).
    let other = temp_dir();
    let other_pki = Pki::new(other.path());
    ctl_fails(&over_tls(&https, &other_pki.ca, client, &["list"]));
    // Plain HTTP/2 to the TLS port.
    ctl_fails(&["--addr", &format!("http://127.0.0.1:{port}"), "list"]);
    // The good client still works after the failures (the daemon survived them).
    ctl_ok(&over_tls(&https, &pki.ca, client, &["list"]));
}

/// `dittoctl` arguments for `https` trusting `ca`, with a client certificate and key if given,
/// then `command`.
fn over_tls<'a>(
    https: &'a str,
    ca: &'a str,
    client: Option<(&'a str, &'a str)>,
    command: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec!["--addr", https, "--tls-ca", ca];
    if let Some((cert, key)) = client {
        args.extend(["--tls-cert", cert, "--tls-key", key]);
    }
    args.extend_from_slice(command);
    args
}

#[test]
fn reflection_and_health_answer_on_the_unix_socket() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, ServiceResponse};

    let daemon = Daemon::unix_only();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let channel =
            tokio::time::timeout(PATIENCE, ditto_host::unix_socket::channel(&daemon.socket()))
                .await
                .expect("connect in time")
                .expect("connect");

        let mut reflection = ServerReflectionClient::new(channel.clone());
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut replies = tokio::time::timeout(
            PATIENCE,
            reflection.server_reflection_info(tokio_stream::iter([request])),
        )
        .await
        .expect("reflection in time")
        .expect("reflection")
        .into_inner();
        let reply = tokio::time::timeout(PATIENCE, replies.message())
            .await
            .expect("reflection reply in time")
            .expect("reflection reply")
            .expect("one reply");
        let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
            panic!("not a service list: {reply:?}");
        };
        let names: Vec<&str> = list
            .service
            .iter()
            .map(|ServiceResponse { name }| name.as_str())
            .collect();
        assert!(names.contains(&"ditto.host.v1.Host"), "{names:?}");
        assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");

        let mut health = HealthClient::new(channel);
        for service in ["", "ditto.host.v1.Host"] {
            let status = tokio::time::timeout(
                PATIENCE,
                health.check(HealthCheckRequest {
                    service: service.into(),
                }),
            )
            .await
            .expect("health in time")
            .expect("health check")
            .into_inner()
            .status;
            assert_eq!(
                status,
                ServingStatus::Serving as i32,
                "health of {service:?}: {status}"
            );
        }
        let unknown = health
            .check(HealthCheckRequest {
                service: "no.such.Service".into(),
            })
            .await
            .expect_err("an unknown service has no health");
        assert_eq!(unknown.code(), tonic::Code::NotFound);
    });
}

/// `GET /metrics` on `addr`: the body.
fn scrape(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect_timeout(&addr, PATIENCE).expect("connect to /metrics");
    stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .expect("send the request");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("read the reply");
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

#[test]
fn metrics_count_vms_and_operations() {
    let daemon = Daemon::with_loopback(temp_dir(), "--metrics", &[]);
    let addr = loopback(daemon.port());
    let socket = daemon.socket_arg();
    ctl_ok(&["--socket", &socket, "list"]);
    ctl_ok(&["--socket", &socket, "list"]);
    ctl_ok(&["--socket", &socket, "checkpoints"]);
    let err = ctl_fails(&["--socket", &socket, "get", "nope"]);
    assert!(err.contains("NotFound"), "{err}");

    let body = scrape(addr);
    let lines: Vec<&str> = body.lines().collect();
    for state in ["running", "created", "stopped"] {
        let line = format!("ditto_vms{{state=\"{state}\"}} 0");
        assert!(lines.contains(&line.as_str()), "no {line:?} in:\n{body}");
    }
    for line in [
        "ditto_operations_total{op=\"list\",code=\"ok\"} 2",
        "ditto_operations_total{op=\"list_checkpoints\",code=\"ok\"} 1",
        "ditto_operations_total{op=\"get\",code=\"not_found\"} 1",
    ] {
        assert!(lines.contains(&line), "no {line:?} in:\n{body}");
    }
    assert!(
        body.contains("ditto_operation_duration_seconds_bucket{op=\"get\",code=\"not_found\""),
        "no latency histogram in:\n{body}"
    );
}

#[test]
fn bash_completions_name_the_checkpoint_commands() {
    let script = ctl_ok(&["completions", "bash"]);
    for word in [
        "dittoctl",
        "checkpoint",
        "restore",
        "delete-checkpoint",
        "--tls-ca",
    ] {
        assert!(script.contains(word), "no {word:?} in:\n{script}");
    }
}
