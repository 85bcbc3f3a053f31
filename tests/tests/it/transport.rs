//! The controller's listener faces the network before anyone has
//! authenticated (ARCHITECTURE.md invariant 2: Join needs no certificate), so HTTP/2 and TLS
//! abuse must neither take its memory nor delay real agents' heartbeats.
//! Each test attacks one limit set in `controller/src/server.rs` while two
//! agents heartbeat every second, then checks that (a) the test process's RSS
//! (the controller runs in-process) stayed within `RSS_SLACK` of where it
//! started, (b) every agent stayed online the whole time and (c) a job still
//! runs right after. Figures are printed (`--no-capture` shows them).
//!
//! Every attack is bounded in count and time and only talks to 127.0.0.1.

use fleetcmd_proto::v1::JobState;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fleetcmd_proto::channel::ClientTls;
use fleetcmd_proto::v1 as pb;
use fleetcmd_tests::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_rustls::client::TlsStream;
use tonic::Code;

const HEARTBEAT: Duration = Duration::from_secs(1);
/// Generous but finite: what an attack may add to the process's RSS.
const RSS_SLACK: u64 = 64 << 20;
const MIB: f64 = 1024.0 * 1024.0;

async fn fleet() -> TestFleet {
    start_fleet_with(2, |o| o.heartbeat = HEARTBEAT).await
}

fn addr(fleet: &TestFleet) -> SocketAddr {
    fleet.controller.addr()
}

/// VmRSS of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS in /proc/self/status");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmRSS in kB");
    kib * 1024
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

// ------------------------------------------------------------ the watchdog

/// What the watchdog saw while an attack ran.
#[derive(Debug, Default)]
struct Observed {
    samples: usize,
    /// Longest time since an agent's last heartbeat, over all samples.
    max_heartbeat_age_ms: u64,
    /// "agent at t ms" for each sample where an agent was not online.
    offline: Vec<String>,
    peak_rss: u64,
}

/// Samples every agent's state (and the RSS) every 50 ms until finished.
struct Watchdog {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Observed>,
    rss_before: u64,
    started: Instant,
}

fn watchdog(fleet: &TestFleet) -> Watchdog {
    let shared = fleet.controller.shared().clone();
    let expected = fleet.agents.len();
    let stop = Arc::new(AtomicBool::new(false));
    let rss_before = rss();
    let started = Instant::now();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut seen = Observed {
                peak_rss: rss_before,
                ..Observed::default()
            };
            while !stop.load(Ordering::Relaxed) {
                let agents = shared.registry.list_agents("").expect("listing agents");
                assert_eq!(agents.len(), expected, "{agents:?}");
                let now = now_ms();
                for a in &agents {
                    if !a.online {
                        seen.offline.push(format!(
                            "{} at {} ms",
                            a.agent_id,
                            started.elapsed().as_millis()
                        ));
                    }
                    let age = now.saturating_sub(a.last_seen_ms);
                    seen.max_heartbeat_age_ms = seen.max_heartbeat_age_ms.max(age);
                }
                seen.samples += 1;
                seen.peak_rss = seen.peak_rss.max(rss());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            seen
        }
    });
    Watchdog {
        stop,
        task,
        rss_before,
        started,
    }
}

impl Watchdog {
    /// Runs a job (the fleet still works right after the attack), stops the
    /// watchdog and checks heartbeats and memory.
    async fn finish(self, fleet: &TestFleet, attack: &str) -> Observed {
        // Watch at least three heartbeats, so "online" means something.
        while self.started.elapsed() < 3 * HEARTBEAT {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let t = Instant::now();
        let job = fleet
            .run("echo", &[("text", "ok")], "all")
            .await
            .unwrap_or_else(|e| panic!("{attack}: job refused after the attack: {e:?}"));
        let job_ms = t.elapsed().as_millis();
        self.stop.store(true, Ordering::Relaxed);
        let seen = self.task.await.expect("watchdog task");
        let after = rss();
        eprintln!(
            "[{attack}] rss before {:.1} MiB, peak {:.1} MiB (+{:.1}), after {:.1} MiB; \
             max heartbeat age {} ms over {} samples in {:.1} s; job after attack {} ms ({})",
            self.rss_before as f64 / MIB,
            seen.peak_rss as f64 / MIB,
            seen.peak_rss.saturating_sub(self.rss_before) as f64 / MIB,
            after as f64 / MIB,
            seen.max_heartbeat_age_ms,
            seen.samples,
            self.started.elapsed().as_secs_f64(),
            job_ms,
            job.state,
        );
        assert_eq!(job.job_state(), JobState::Succeeded, "{attack}: {job:?}");
        assert!(
            seen.offline.is_empty(),
            "{attack}: agents went offline: {:?}",
            seen.offline
        );
        assert!(
            seen.peak_rss < self.rss_before + RSS_SLACK,
            "{attack}: rss grew from {:.1} MiB to {:.1} MiB",
            self.rss_before as f64 / MIB,
            seen.peak_rss as f64 / MIB
        );
        seen
    }
}

// ------------------------------------------------------------ TLS and raw HTTP/2

fn client_config(tls: &ClientTls, with_cert: bool) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(tls.ca_pem.as_bytes()) {
        roots.add(cert.expect("CA pem")).expect("CA cert");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots);
    let mut config = if with_cert {
        let chain = CertificateDer::pem_slice_iter(tls.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("client cert pem");
        let key = PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes()).expect("client key pem");
        builder
            .with_client_auth_cert(chain, key)
            .expect("client identity")
    } else {
        builder.with_no_client_auth()
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

async fn tls_connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("tcp connect");
    tcp.set_nodelay(true).expect("nodelay");
    let name = ServerName::try_from("127.0.0.1").expect("server name");
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .expect("tls handshake in time")
    .expect("tls handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "ALPN h2");
    tls
}

/// Hand-written HTTP/2 (RFC 9113) and HPACK (RFC 7541): what an attacker
/// sends, without a client library's manners.
mod raw {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const CONTINUATION: u8 = 0x9;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const CANCEL: u32 = 0x8;

    pub fn frame(buf: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = payload.len() as u32;
        buf.extend_from_slice(&len.to_be_bytes()[1..]);
        buf.push(kind);
        buf.push(flags);
        buf.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
        buf.extend_from_slice(payload);
    }

    /// An HPACK string literal (no Huffman), length with a 7-bit prefix.
    fn string(out: &mut Vec<u8>, s: &[u8]) {
        integer(out, 0x00, 7, s.len());
        out.extend_from_slice(s);
    }

    fn integer(out: &mut Vec<u8>, first: u8, prefix: u32, mut n: usize) {
        let max = (1usize << prefix) - 1;
        if n < max {
            out.push(first | n as u8);
            return;
        }
        out.push(first | max as u8);
        n -= max;
        while n >= 128 {
            out.push((n % 128) as u8 | 0x80);
            n /= 128;
        }
        out.push(n as u8);
    }

    /// "Literal header field without indexing — new name".
    pub fn literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
        out.push(0x00);
        string(out, name);
        string(out, value);
    }

    /// "Literal header field without indexing — indexed name" (static table).
    fn literal_indexed(out: &mut Vec<u8>, index: usize, value: &[u8]) {
        integer(out, 0x00, 4, index);
        string(out, value);
    }

    /// The header block of a gRPC call to `path`.
    pub fn request_block(path: &str) -> Vec<u8> {
        let mut b = Vec::new();
        b.push(0x83); // :method POST
        b.push(0x87); // :scheme https
        literal_indexed(&mut b, 4, path.as_bytes()); // :path
        literal_indexed(&mut b, 1, b"127.0.0.1"); // :authority
        literal_indexed(&mut b, 31, b"application/grpc"); // content-type
        literal(&mut b, b"te", b"trailers");
        b
    }

    #[derive(Debug)]
    pub struct Frame {
        pub kind: u8,
        pub flags: u8,
        pub stream: u32,
        pub payload: Vec<u8>,
    }

    pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Frame> {
        let mut head = [0u8; 9];
        r.read_exact(&mut head).await?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).await?;
        Ok(Frame {
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
            payload,
        })
    }

    /// Client preface and SETTINGS, then waits for the server's SETTINGS and
    /// acknowledges them: from here on the connection is established.
    pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
        let mut out = PREFACE.to_vec();
        frame(&mut out, SETTINGS, 0, 0, &[]);
        s.write_all(&out).await.expect("client preface");
        let settings = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let f = read_frame(s).await.expect("server frame");
                if f.kind == SETTINGS && f.flags & ACK == 0 {
                    return f;
                }
            }
        })
        .await
        .expect("server SETTINGS in time");
        assert_eq!(settings.stream, 0);
        let mut ack = Vec::new();
        frame(&mut ack, SETTINGS, ACK, 0, &[]);
        s.write_all(&ack).await.expect("SETTINGS ack");
    }

    /// What the server sent on a connection under attack.
    #[derive(Debug, Default)]
    pub struct ServerSaid {
        pub frames: usize,
        pub headers: usize,
        pub resets: usize,
        pub pings: usize,
        /// (error code, debug data, when) of the first GOAWAY.
        pub goaway: Option<(u32, String, Duration)>,
        /// When the server closed the connection (EOF or error).
        pub closed: Option<(Duration, String)>,
    }

    /// Reads frames until the connection ends (the caller aborts the task
    /// when it no longer cares).
    pub fn spy<R: AsyncRead + Unpin + Send + 'static>(
        mut r: R,
        started: Instant,
    ) -> (Arc<Mutex<ServerSaid>>, tokio::task::JoinHandle<()>) {
        let said = Arc::new(Mutex::new(ServerSaid::default()));
        let log = said.clone();
        let task = tokio::spawn(async move {
            loop {
                let f = read_frame(&mut r).await;
                let mut log = log.lock().expect("spy log");
                match f {
                    Ok(f) => {
                        log.frames += 1;
                        match f.kind {
                            HEADERS => log.headers += 1,
                            RST_STREAM => log.resets += 1,
                            PING => log.pings += 1,
                            GOAWAY if log.goaway.is_none() && f.payload.len() >= 8 => {
                                let code = u32::from_be_bytes([
                                    f.payload[4],
                                    f.payload[5],
                                    f.payload[6],
                                    f.payload[7],
                                ]);
                                let debug = String::from_utf8_lossy(&f.payload[8..]).into_owned();
                                log.goaway = Some((code, debug, started.elapsed()));
                            }
                            _ => {}
                        }
                    }
                    Err(e) => {
                        log.closed = Some((started.elapsed(), e.to_string()));
                        return;
                    }
                }
            }
        });
        (said, task)
    }

    pub fn error_name(code: u32) -> &'static str {
        match code {
            0x0 => "NO_ERROR",
            0x1 => "PROTOCOL_ERROR",
            0x2 => "INTERNAL_ERROR",
            0x3 => "FLOW_CONTROL_ERROR",
            0x6 => "FRAME_SIZE_ERROR",
            0x7 => "REFUSED_STREAM",
            0x8 => "CANCEL",
            0x9 => "COMPRESSION_ERROR",
            0xb => "ENHANCE_YOUR_CALM",
            _ => "other",
        }
    }
}

/// Waits (bounded) for the spy to see the connection end, then stops it.
async fn settle(
    said: &Arc<std::sync::Mutex<raw::ServerSaid>>,
    spy: tokio::task::JoinHandle<()>,
    limit: Duration,
) -> String {
    let _ = tokio::time::timeout(limit, async {
        while said.lock().expect("spy log").closed.is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    spy.abort();
    let said = said.lock().expect("spy log");
    format!(
        "frames {} (headers {}, rst {}), goaway {}, closed {}",
        said.frames,
        said.headers,
        said.resets,
        said.goaway
            .as_ref()
            .map(|(c, d, t)| format!("{} {d:?} at {} ms", raw::error_name(*c), t.as_millis()))
            .unwrap_or_else(|| "none".into()),
        said.closed
            .as_ref()
            .map(|(t, e)| format!("at {} ms ({e})", t.as_millis()))
            .unwrap_or_else(|| "no (still open)".into()),
    )
}

// ------------------------------------------------------------ 1. rapid reset

const RESET_STREAMS: usize = 20_000;
const RESET_WINDOW: Duration = Duration::from_secs(10);

/// CVE-2023-44487: HEADERS immediately followed by RST_STREAM(CANCEL), as
/// fast as the socket takes them; when the server hangs up, reconnect and go
/// on, up to `RESET_STREAMS` streams or `RESET_WINDOW`.
async fn rapid_reset(with_cert: bool, attack: &str) {
    let fleet = fleet().await;
    let dog = watchdog(&fleet);
    let config = client_config(&fleet.operator_tls, with_cert);
    let block = raw::request_block("/fleetcmd.v1.Jobs/List");
    let started = Instant::now();
    let (mut sent, mut connections, mut goaways) = (0usize, 0usize, 0usize);
    let mut first = None;
    while sent < RESET_STREAMS && started.elapsed() < RESET_WINDOW {
        let mut tls = tls_connect(addr(&fleet), config.clone()).await;
        raw::handshake(&mut tls).await;
        connections += 1;
        let (r, mut w) = tokio::io::split(tls);
        let (said, spy) = raw::spy(r, Instant::now());
        let mut on_this = 0u32;
        let mut write_error = None;
        while sent < RESET_STREAMS && started.elapsed() < RESET_WINDOW {
            let mut buf = Vec::with_capacity(100 * (block.len() + 40));
            for _ in 0..100 {
                let id = 1 + 2 * on_this;
                raw::frame(&mut buf, raw::HEADERS, raw::END_HEADERS, id, &block);
                raw::frame(&mut buf, raw::RST_STREAM, 0, id, &raw::CANCEL.to_be_bytes());
                on_this += 1;
                sent += 1;
            }
            match tokio::time::timeout(Duration::from_secs(2), w.write_all(&buf)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    write_error = Some(e.to_string());
                    break;
                }
                Err(_) => {
                    write_error = Some("server stopped reading (write blocked 2 s)".into());
                    break;
                }
            }
        }
        let outcome = settle(&said, spy, Duration::from_secs(2)).await;
        if said.lock().expect("spy log").goaway.is_some() {
            goaways += 1;
        }
        first.get_or_insert_with(|| {
            format!("first connection: wrote {on_this} pairs (write error {write_error:?}); server: {outcome}")
        });
        drop(w);
    }
    let attack_ms = started.elapsed().as_millis();
    eprintln!(
        "[{attack}] {sent} HEADERS+RST_STREAM pairs over {connections} connections in {attack_ms} ms, \
         {goaways} GOAWAYs; {}",
        first.as_deref().unwrap_or("")
    );
    dog.finish(&fleet, attack).await;
    // h2 counts streams reset before they were accepted; past
    // `http2_max_pending_accept_reset_streams` it sends GOAWAY
    // ENHANCE_YOUR_CALM ("too_many_resets") and closes.
    assert_eq!(
        goaways, connections,
        "{attack}: a connection survived the rapid resets: {first:?}"
    );
    assert!(
        first
            .as_deref()
            .is_some_and(|f| f.contains("ENHANCE_YOUR_CALM")),
        "{first:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_with_operator_cert_gets_goaway() {
    rapid_reset(true, "rapid reset, operator cert").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_without_cert_gets_goaway() {
    rapid_reset(false, "rapid reset, no cert").await;
}

// ------------------------------------------------------------ 2. headers

fn grpc_request(path: &str) -> http::request::Builder {
    http::Request::builder()
        .method("POST")
        .uri(format!("https://127.0.0.1{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
}

/// An empty protobuf message as one gRPC frame.
fn empty_message() -> Bytes {
    Bytes::from_static(&[0, 0, 0, 0, 0])
}

async fn h2_client(
    fleet: &TestFleet,
    with_cert: bool,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tls = tls_connect(addr(fleet), client_config(&fleet.operator_tls, with_cert)).await;
    let (client, conn) = h2::client::Builder::new()
        .handshake::<_, Bytes>(tls)
        .await
        .expect("h2 handshake");
    (client, tokio::spawn(conn))
}

/// Sends one unary call (headers, `body`, end of stream) and returns the
/// HTTP status and the gRPC status (from trailers, or trailers-only headers).
async fn h2_call(
    client: &mut h2::client::SendRequest<Bytes>,
    req: http::Request<()>,
    body: Bytes,
) -> Result<(http::StatusCode, Option<tonic::Status>), h2::Error> {
    let mut client = client.clone().ready().await?;
    let (resp, mut send) = client.send_request(req, false)?;
    send.send_data(body, true)?;
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("response in time")?;
    let status = resp.status();
    if let Some(s) = tonic::Status::from_header_map(resp.headers()) {
        return Ok((status, Some(s)));
    }
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await?;
    Ok((
        status,
        trailers.and_then(|t| tonic::Status::from_header_map(&t)),
    ))
}

/// A header list over `http2_max_header_list_size` (16 KiB) in a single
/// HEADERS frame is refused with 431 and the connection keeps serving; one of
/// 1 MiB (HEADERS + CONTINUATION, as the h2 client splits it) ends the
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_header_lists_are_refused() {
    let fleet = fleet().await;
    let dog = watchdog(&fleet);
    let health = "/grpc.health.v1.Health/Check";

    let (mut client, conn) = h2_client(&fleet, true).await;
    let t = Instant::now();
    let big = "a".repeat(32 * 1024);
    let req = grpc_request(health)
        .header("x-big", big.as_str())
        .body(())
        .expect("request");
    let refused = h2_call(&mut client, req, empty_message()).await;
    let refused_ms = t.elapsed().as_millis();
    let ok = h2_call(
        &mut client,
        grpc_request(health).body(()).expect("request"),
        empty_message(),
    )
    .await
    .expect("the connection still serves after a refused header list");
    eprintln!(
        "[32 KiB header] {refused_ms} ms: {refused:?}; next call on the same connection: {ok:?}"
    );
    let (status, _) = refused.expect("a 431 response, not a connection error");
    assert_eq!(status, http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(ok.0, http::StatusCode::OK);
    assert_eq!(ok.1.map(|s| s.code()), Some(Code::Ok));
    conn.abort();

    let (mut client, conn) = h2_client(&fleet, true).await;
    let t = Instant::now();
    let huge = "a".repeat(1024 * 1024);
    let req = grpc_request(health)
        .header("x-huge", huge.as_str())
        .body(())
        .expect("request");
    let call = h2_call(&mut client, req, empty_message()).await;
    let conn_end = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the server ends the connection in time")
        .expect("connection task");
    eprintln!(
        "[1 MiB header] {} ms: call {call:?}; connection {conn_end:?}",
        t.elapsed().as_millis()
    );
    let err = call.expect_err("a 1 MiB header list is refused");
    assert!(
        err.is_go_away() || err.is_reset() || err.is_io(),
        "unexpected error: {err:?}"
    );
    drop(client);
    dog.finish(&fleet, "oversized header lists").await;
}

/// CONTINUATION flood (CVE-2024-27316 family): HEADERS without END_HEADERS,
/// then CONTINUATION frames that never end. The server must hang up long
/// before the attacker runs out of patience (64 MiB or 10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_flood_is_cut_off() {
    const LIMIT_BYTES: usize = 64 << 20;
    let fleet = fleet().await;
    let dog = watchdog(&fleet);
    let mut tls = tls_connect(addr(&fleet), client_config(&fleet.operator_tls, true)).await;
    raw::handshake(&mut tls).await;
    let (r, mut w) = tokio::io::split(tls);
    let started = Instant::now();
    let (said, spy) = raw::spy(r, started);

    let mut first = Vec::new();
    raw::frame(
        &mut first,
        raw::HEADERS,
        0,
        1,
        &raw::request_block("/fleetcmd.v1.Jobs/List"),
    );
    // 16 KiB CONTINUATION frames (the size every peer must accept), each
    // full of 1 KiB literal headers.
    let mut fragment = Vec::new();
    for i in 0..16 {
        raw::literal(
            &mut fragment,
            format!("x-flood-{i:02}").as_bytes(),
            &[b'f'; 1000],
        );
    }
    let mut chunk = Vec::new();
    for _ in 0..16 {
        raw::frame(&mut chunk, raw::CONTINUATION, 0, 1, &fragment);
    }
    let mut written = 0usize;
    let mut write_error = None;
    if let Err(e) = w.write_all(&first).await {
        write_error = Some(e.to_string());
    }
    while write_error.is_none()
        && written < LIMIT_BYTES
        && started.elapsed() < Duration::from_secs(10)
    {
        match tokio::time::timeout(Duration::from_secs(2), w.write_all(&chunk)).await {
            Ok(Ok(())) => written += chunk.len(),
            Ok(Err(e)) => write_error = Some(e.to_string()),
            Err(_) => write_error = Some("server stopped reading (write blocked 2 s)".into()),
        }
        // Let the socket report a close the server has already sent.
        tokio::task::yield_now().await;
    }
    let attack_ms = started.elapsed().as_millis();
    let outcome = settle(&said, spy, Duration::from_secs(5)).await;
    eprintln!(
        "[continuation flood] wrote {:.2} MiB of CONTINUATION in {attack_ms} ms, write error {write_error:?}; server: {outcome}",
        written as f64 / MIB
    );
    let goaway = said.lock().expect("spy log").goaway.clone();
    let closed = said.lock().expect("spy log").closed.is_some();
    dog.finish(&fleet, "continuation flood").await;
    assert!(
        write_error.is_some(),
        "the server kept reading CONTINUATION frames: {:.2} MiB written",
        written as f64 / MIB
    );
    assert!(closed, "connection still open: {outcome}");
    let (code, _, _) = goaway.unwrap_or_else(|| panic!("no GOAWAY: {outcome}"));
    assert!(
        matches!(
            raw::error_name(code),
            "ENHANCE_YOUR_CALM" | "COMPRESSION_ERROR" | "PROTOCOL_ERROR"
        ),
        "{outcome}"
    );
}

// ------------------------------------------------------------ 3. stalled handshakes

/// A TLS record header announcing a 512-byte ClientHello, and its first bytes.
const PARTIAL_CLIENT_HELLO: &[u8] = &[
    0x16, 0x03, 0x01, 0x02, 0x00, // handshake record, 512 bytes
    0x01, 0x00, 0x01, 0xfc, // ClientHello, 508 bytes
    0x03, 0x03, // TLS 1.2 legacy version
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, // part of the random
];

/// Half of the connections send nothing, half a partial ClientHello. While
/// they are held, new peers still handshake (a job runs); the server drops
/// each after its 10 s handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes_are_dropped() {
    const CONNS: usize = 500;
    let fleet = fleet().await;
    let dog = watchdog(&fleet);
    let started = Instant::now();
    let mut conns = JoinSet::new();
    for i in 0..CONNS {
        let mut s = TcpStream::connect(addr(&fleet)).await.expect("tcp connect");
        if i % 2 == 1 {
            s.write_all(PARTIAL_CLIENT_HELLO)
                .await
                .expect("partial hello");
        }
        let connected = Instant::now();
        conns.spawn(async move {
            let mut buf = [0u8; 64];
            let r = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await;
            (connected.elapsed(), r.map(|r| r.map_err(|e| e.kind())))
        });
    }
    let opened_ms = started.elapsed().as_millis();

    // While every stalled handshake is pending, a real client gets through.
    let t = Instant::now();
    let job = fleet
        .run("echo", &[("text", "during")], "all")
        .await
        .expect("job during stalled handshakes");
    assert_eq!(job.job_state(), JobState::Succeeded, "{job:?}");
    let during_ms = t.elapsed().as_millis();

    let mut closed_after = Vec::new();
    let mut open = 0;
    while let Some(r) = conns.join_next().await {
        match r.expect("reader task") {
            (elapsed, Ok(Ok(0) | Err(_))) => closed_after.push(elapsed),
            (_, Ok(Ok(_))) => panic!("the server answered a stalled handshake"),
            (_, Err(_)) => open += 1,
        }
    }
    closed_after.sort();
    let (min, max) = (
        closed_after.first().copied().unwrap_or_default(),
        closed_after.last().copied().unwrap_or_default(),
    );
    eprintln!(
        "[stalled handshakes] {CONNS} opened in {opened_ms} ms; job during the stall {during_ms} ms; \
         {} dropped by the server after {:.1}..{:.1} s, {open} still open after 20 s",
        closed_after.len(),
        min.as_secs_f64(),
        max.as_secs_f64()
    );
    dog.finish(&fleet, "stalled handshakes").await;
    assert_eq!(open, 0, "stalled handshakes not dropped within 20 s");
    assert!(max <= Duration::from_secs(15), "slowest drop after {max:?}");
}

// ------------------------------------------------------------ 4. oversized and malformed messages

fn signed_job(spec: Vec<u8>) -> pb::SignedJob {
    pb::SignedJob {
        spec,
        signature: vec![0; 64],
        key_id: "operator-dev".into(),
    }
}

/// Messages over a service's decoding limit are refused from their 5-byte
/// length prefix (`OutOfRange`), quickly and without buffering them; a
/// caller without a certificate is refused before its body is read at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_refused_early() {
    let fleet = fleet().await;
    let dog = watchdog(&fleet);
    let huge = vec![0x2a_u8; 8 << 20];
    let mut report = Vec::new();

    let mut jobs = pb::jobs_client::JobsClient::new(fleet.operator().await);
    let t = Instant::now();
    let err = jobs
        .submit(signed_job(huge.clone()))
        .await
        .expect_err("an 8 MiB job is refused");
    report.push(format!(
        "Jobs.Submit 8 MiB (operator): {:?} {:?} in {} ms",
        err.code(),
        err.message(),
        t.elapsed().as_millis()
    ));
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");

    // Under the transport limit but over the domain limit (MAX_SPEC_BYTES):
    // decoded, then refused by the handler.
    let t = Instant::now();
    let err = jobs
        .submit(signed_job(vec![0x2a; 200 * 1024]))
        .await
        .expect_err("a 200 KiB spec is refused");
    report.push(format!(
        "Jobs.Submit 200 KiB (operator): {:?} {:?} in {} ms",
        err.code(),
        err.message(),
        t.elapsed().as_millis()
    ));
    assert!(
        matches!(err.code(), Code::InvalidArgument | Code::PermissionDenied),
        "{err:?}"
    );
    assert!(err.message().contains("exceeds the limit"), "{err:?}");

    let mut policy = pb::policy_client::PolicyClient::new(fleet.operator().await);
    let t = Instant::now();
    let err = policy
        .push(pb::SignedPolicy {
            bundle: huge.clone(),
            signatures: Vec::new(),
        })
        .await
        .expect_err("an 8 MiB policy is refused");
    report.push(format!(
        "Policy.Push 8 MiB (operator): {:?} {:?} in {} ms",
        err.code(),
        err.message(),
        t.elapsed().as_millis()
    ));
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");

    let mut anon_jobs = pb::jobs_client::JobsClient::new(fleet.anonymous().await);
    let t = Instant::now();
    let err = anon_jobs
        .submit(signed_job(huge.clone()))
        .await
        .expect_err("an anonymous 8 MiB job is refused");
    report.push(format!(
        "Jobs.Submit 8 MiB (no cert): {:?} {:?} in {} ms",
        err.code(),
        err.message(),
        t.elapsed().as_millis()
    ));
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    let mut enroll = pb::enrollment_client::EnrollmentClient::new(fleet.anonymous().await);
    let t = Instant::now();
    let err = enroll
        .join(pb::JoinRequest {
            csr_der: huge.clone(),
            ..Default::default()
        })
        .await
        .expect_err("an 8 MiB join is refused");
    report.push(format!(
        "Enrollment.Join 8 MiB (no cert): {:?} {:?} in {} ms",
        err.code(),
        err.message(),
        t.elapsed().as_millis()
    ));
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");

    // Twenty more, back to back, on one connection: nothing accumulates.
    let t = Instant::now();
    for _ in 0..20 {
        let err = enroll
            .join(pb::JoinRequest {
                csr_der: huge.clone(),
                ..Default::default()
            })
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    }
    report.push(format!(
        "20 × Enrollment.Join 8 MiB: {} ms",
        t.elapsed().as_millis()
    ));
    for line in &report {
        eprintln!("[oversized] {line}");
    }
    for line in &report[..report.len() - 1] {
        let ms: u128 = line
            .rsplit(" in ")
            .next()
            .and_then(|s| s.trim_end_matches(" ms").parse().ok())
            .expect("elapsed");
        assert!(ms < 5_000, "slow refusal: {line}");
    }
    dog.finish(&fleet, "oversized messages").await;
}

/// Bytes that are not the protobuf they claim to be get a clear error
/// status, and the connection and the server keep serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_get_a_clear_error() {
    let fleet = fleet().await;
    let dog = watchdog(&fleet);
    let (mut client, conn) = h2_client(&fleet, true).await;
    let submit = "/fleetcmd.v1.Jobs/Submit";
    let frame = |flag: u8, len: u32, body: &[u8]| {
        let mut b = vec![flag];
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(body);
        Bytes::from(b)
    };
    let cases: [(&str, Bytes, &[Code]); 4] = [
        // Field 15, wire type 7 (does not exist).
        (
            "garbage protobuf",
            frame(0, 16, &[0xff; 16]),
            &[Code::Internal, Code::InvalidArgument],
        ),
        (
            "length prefix past the end",
            frame(0, 100, &[0x0a; 10]),
            &[Code::Internal, Code::InvalidArgument],
        ),
        (
            "compressed flag without grpc-encoding",
            frame(1, 4, &[0x0a, 0x02, 0x01, 0x02]),
            &[Code::Internal, Code::Unimplemented, Code::InvalidArgument],
        ),
        (
            "bad compression flag",
            frame(7, 0, &[]),
            &[Code::Internal, Code::InvalidArgument],
        ),
    ];
    for (name, body, codes) in cases {
        let t = Instant::now();
        let (http, status) = h2_call(
            &mut client,
            grpc_request(submit).body(()).expect("request"),
            body,
        )
        .await
        .unwrap_or_else(|e| panic!("{name}: connection error {e:?}"));
        let status = status.unwrap_or_else(|| panic!("{name}: no grpc-status ({http})"));
        eprintln!(
            "[malformed] {name}: http {http}, {:?} {:?} in {} ms",
            status.code(),
            status.message(),
            t.elapsed().as_millis()
        );
        assert!(codes.contains(&status.code()), "{name}: {status:?}");
        assert!(!status.message().is_empty(), "{name}: no message");
    }
    // The same connection still serves a well-formed call.
    let (http, status) = h2_call(
        &mut client,
        grpc_request("/fleetcmd.v1.Agents/List")
            .body(())
            .expect("request"),
        empty_message(),
    )
    .await
    .expect("a good call after malformed ones");
    assert_eq!(
        (http, status.map(|s| s.code())),
        (http::StatusCode::OK, Some(Code::Ok))
    );
    drop(client);
    conn.abort();
    dog.finish(&fleet, "malformed messages").await;
}

// ------------------------------------------------------------ 5. idle connections

/// 1 000 mTLS connections that finish the TLS and HTTP/2 handshakes, then
/// say nothing. Reports the cost of one (client and server side together:
/// both live in this process, so it is an upper bound for the server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_cheap() {
    const CONNS: usize = 1_000;
    const HOLD: Duration = Duration::from_secs(5);
    let fleet = fleet().await;
    let dog = watchdog(&fleet);
    let config = client_config(&fleet.operator_tls, true);
    let before = rss();
    let started = Instant::now();
    let mut held = Vec::with_capacity(CONNS);
    while held.len() < CONNS {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "connecting took over 60 s"
        );
        let mut batch = JoinSet::new();
        for _ in 0..(CONNS - held.len()).min(50) {
            let config = config.clone();
            let addr = addr(&fleet);
            batch.spawn(async move {
                let mut tls = tls_connect(addr, config).await;
                raw::handshake(&mut tls).await;
                tls
            });
        }
        while let Some(tls) = batch.join_next().await {
            held.push(tls.expect("connect task"));
        }
    }
    let connect_ms = started.elapsed().as_millis();
    let with_conns = rss();
    let t = Instant::now();
    let job = fleet
        .run("echo", &[("text", "busy")], "all")
        .await
        .expect("job while 1 000 connections are held");
    assert_eq!(job.job_state(), JobState::Succeeded, "{job:?}");
    let job_ms = t.elapsed().as_millis();
    let hold_until = Instant::now() + HOLD;
    while Instant::now() < hold_until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every connection is still up (none was dropped as idle this soon).
    let mut alive = 0;
    for tls in &mut held {
        let mut ping = Vec::new();
        raw::frame(&mut ping, raw::PING, 0, 0, &[1; 8]);
        if tls.write_all(&ping).await.is_ok() {
            alive += 1;
        }
    }
    let per_conn = with_conns.saturating_sub(before) / CONNS as u64;
    eprintln!(
        "[idle connections] {CONNS} mTLS+h2 connections in {connect_ms} ms; rss {:.1} → {:.1} MiB, \
         {:.1} KiB per connection (client + server); job while held {job_ms} ms; {alive} alive after {HOLD:?}",
        before as f64 / MIB,
        with_conns as f64 / MIB,
        per_conn as f64 / 1024.0
    );
    dog.finish(&fleet, "idle connections").await;
    assert_eq!(alive, CONNS);
    drop(held);
}
