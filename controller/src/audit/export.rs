//! Continuous export of the audit trail: JSON lines — the
//! records and the signed chain heads, in the same format as `fleetcmd
//! audit export` — to a file (rotated), stdout, syslog/journald, an
//! Elasticsearch/OpenSearch `_bulk` endpoint or a Splunk HTTP Event
//! Collector, so a copy lives outside the controller's reach.
//!
//! Each exporter remembers the last sequence number a sink accepted in the
//! store (`LeaseStore::put_export_cursor_fenced`, written after the sink
//! acknowledged), so a restart resumes where it stopped: nothing is
//! skipped. It runs only while its controller holds the lease
//! `audit-export:NAME`: with several controllers configured alike exactly
//! one exports at a time, and when it dies the next holder resumes from
//! the stored cursor (a cursor file of an earlier version,
//! `DATA/audit/export/NAME.cursor`, is read once when the store has none). Duplicates are avoided per sink: the file sink reads
//! its own last line back, Elasticsearch documents use the sequence number
//! as `_id` with `create` (a repeat is a 409, counted as done); for stdout,
//! syslog and Splunk a crash between the sink's acknowledgement and the
//! cursor write can repeat that one batch, and so can a syslog reader that
//! stalls mid-batch (the send times out and the batch is retried); each
//! line carries its `seq`.
//! A failing sink is retried with exponential backoff (1 s … 60 s) forever;
//! records are never dropped.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fleetcmd_core::audit::{ExportLine, Record, SignedHead};
use fleetcmd_core::crypto::Secret;
use serde::Deserialize;
use tokio::sync::watch;

use super::Audit;
use crate::lease::Leadership;
use crate::store::Store;

/// Records per batch sent to a sink.
pub const DEFAULT_BATCH: usize = 500;
/// How often an idle exporter looks for new records.
pub const POLL: Duration = Duration::from_millis(500);
/// Backoff bounds for a failing sink.
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Timeout of one HTTP request to a sink.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// One `[[audit_export]]` entry of `controller.toml`, as written: `kind`
/// picks the sink and which of the other keys apply.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExport {
    pub name: String,
    /// `file`, `stdout`, `syslog`, `elasticsearch` or `splunk`.
    pub kind: String,
    pub path: Option<PathBuf>,
    pub max_bytes: Option<u64>,
    pub keep: Option<u32>,
    pub socket: Option<PathBuf>,
    pub url: Option<String>,
    pub index: Option<String>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub api_key_file: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub sourcetype: Option<String>,
    pub batch: Option<usize>,
    /// Timeout of one HTTP request (Elasticsearch, Splunk), e.g. `10s`.
    pub timeout: Option<String>,
    /// First and longest wait between two attempts of a failing batch.
    pub retry_initial: Option<String>,
    pub retry_max: Option<String>,
}

/// A validated export.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// Names the cursor file; unique per controller.
    pub name: String,
    pub sink: SinkConfig,
    pub batch: usize,
    pub timeout: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

/// Where the lines go.
#[derive(Debug, Clone)]
pub enum SinkConfig {
    /// JSON lines appended to `path`, rotated at `max_bytes` keeping `keep`
    /// old files (`path.1` newest).
    File {
        path: PathBuf,
        max_bytes: u64,
        keep: u32,
    },
    Stdout,
    /// RFC 5424 messages on a local datagram socket (journald reads
    /// `/dev/log` too), facility `authpriv`.
    Syslog {
        socket: PathBuf,
    },
    /// `POST {url}/_bulk`, one `create` per line with `_id` = sequence.
    Elasticsearch {
        url: String,
        index: String,
        username: Option<String>,
        password_file: Option<PathBuf>,
        api_key_file: Option<PathBuf>,
    },
    /// `POST {url}/services/collector/event` with `Authorization: Splunk T`.
    Splunk {
        url: String,
        token_file: PathBuf,
        sourcetype: String,
    },
}

impl RawExport {
    /// The export, or every problem as `AT.key: problem`.
    pub fn validate(&self, at: &str) -> Result<ExportConfig, Vec<String>> {
        let mut p = Vec::new();
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            p.push(format!("{at}.name: must be letters, digits, - or _"));
        }
        let batch = self.batch.unwrap_or(DEFAULT_BATCH);
        if batch == 0 || batch > 10_000 {
            p.push(format!("{at}.batch: must be between 1 and 10000"));
        }
        let mut dur = |key: &str, v: &Option<String>, default: Duration| -> Duration {
            let Some(v) = v else { return default };
            match fleetcmd_core::duration::parse_duration(v) {
                Ok(d) if d >= Duration::from_millis(10) && d <= Duration::from_secs(3600) => d,
                Ok(_) => {
                    p.push(format!("{at}.{key}: must be between 10ms and 1h"));
                    default
                }
                Err(e) => {
                    p.push(format!("{at}.{key}: {e}"));
                    default
                }
            }
        };
        let timeout = dur("timeout", &self.timeout, HTTP_TIMEOUT);
        let retry_initial = dur("retry_initial", &self.retry_initial, BACKOFF_MIN);
        let retry_max = dur("retry_max", &self.retry_max, BACKOFF_MAX);
        let mut used: Vec<&str> = Vec::new();
        let mut need = |key: &'static str, present: bool| {
            used.push(key);
            if !present {
                p.push(format!("{at}.{key}: required for kind = {:?}", self.kind));
            }
        };
        let url_ok = |u: &Option<String>| {
            u.as_deref()
                .is_some_and(|u| u.starts_with("http://") || u.starts_with("https://"))
        };
        let sink = match self.kind.as_str() {
            "file" => {
                need("path", self.path.is_some());
                used.extend(["max_bytes", "keep"]);
                let max_bytes = self.max_bytes.unwrap_or(100 * 1024 * 1024);
                if max_bytes < 4096 {
                    p.push(format!("{at}.max_bytes: must be at least 4096"));
                }
                let keep = self.keep.unwrap_or(5);
                if keep > 1000 {
                    p.push(format!("{at}.keep: at most 1000 old files"));
                }
                Some(SinkConfig::File {
                    path: self.path.clone().unwrap_or_default(),
                    max_bytes,
                    keep,
                })
            }
            "stdout" => Some(SinkConfig::Stdout),
            "syslog" => {
                used.push("socket");
                Some(SinkConfig::Syslog {
                    socket: self
                        .socket
                        .clone()
                        .unwrap_or_else(|| PathBuf::from("/dev/log")),
                })
            }
            "elasticsearch" => {
                need("url", self.url.is_some());
                need("index", self.index.is_some());
                used.extend(["username", "password_file", "api_key_file", "timeout"]);
                if self.url.is_some() && !url_ok(&self.url) {
                    p.push(format!("{at}.url: expected http(s)://host:port"));
                }
                let index = self.index.clone().unwrap_or_default();
                if self.index.is_some()
                    && (index.is_empty()
                        || index.chars().any(|c| c.is_ascii_uppercase() || c == ' '))
                {
                    p.push(format!(
                        "{at}.index: must be a lowercase index name without spaces"
                    ));
                }
                if self.username.is_some() != self.password_file.is_some() {
                    p.push(format!("{at}.username/password_file: give both or neither"));
                }
                Some(SinkConfig::Elasticsearch {
                    url: self.url.clone().unwrap_or_default(),
                    index,
                    username: self.username.clone(),
                    password_file: self.password_file.clone(),
                    api_key_file: self.api_key_file.clone(),
                })
            }
            "splunk" => {
                need("url", self.url.is_some());
                need("token_file", self.token_file.is_some());
                used.extend(["sourcetype", "timeout"]);
                if self.url.is_some() && !url_ok(&self.url) {
                    p.push(format!("{at}.url: expected http(s)://host:port"));
                }
                Some(SinkConfig::Splunk {
                    url: self.url.clone().unwrap_or_default(),
                    token_file: self.token_file.clone().unwrap_or_default(),
                    sourcetype: self
                        .sourcetype
                        .clone()
                        .unwrap_or_else(|| "fleetcmd:audit".to_string()),
                })
            }
            other => {
                p.push(format!(
                    "{at}.kind: {other:?} is not one of file, stdout, syslog, elasticsearch, splunk"
                ));
                None
            }
        };
        if sink.is_some() {
            let set = [
                ("path", self.path.is_some()),
                ("max_bytes", self.max_bytes.is_some()),
                ("keep", self.keep.is_some()),
                ("socket", self.socket.is_some()),
                ("url", self.url.is_some()),
                ("index", self.index.is_some()),
                ("username", self.username.is_some()),
                ("password_file", self.password_file.is_some()),
                ("api_key_file", self.api_key_file.is_some()),
                ("token_file", self.token_file.is_some()),
                ("sourcetype", self.sourcetype.is_some()),
                ("timeout", self.timeout.is_some()),
            ];
            for (key, present) in set {
                if present && !used.contains(&key) {
                    p.push(format!(
                        "{at}.{key}: does not apply to kind = {:?}",
                        self.kind
                    ));
                }
            }
        }
        match sink {
            Some(sink) if p.is_empty() => {
                let cfg = ExportConfig {
                    name: self.name.clone(),
                    sink,
                    batch,
                    timeout,
                    retry_initial,
                    retry_max,
                };
                // Secret files are read now, so a missing one is a config error.
                Sink::open(&cfg).map_err(|e| vec![format!("{at}: {e}")])?;
                Ok(cfg)
            }
            _ => Err(p),
        }
    }
}

/// One line to export: a record or a signed head.
#[derive(Debug, Clone)]
pub struct Line {
    pub seq: u64,
    pub head: bool,
    pub time_ms: u64,
    /// The `ExportLine` JSON, without a newline.
    pub json: String,
}

impl Line {
    fn record(r: &Record) -> Line {
        Line {
            seq: r.seq,
            head: false,
            time_ms: r.time_ms,
            json: serde_json::to_string(&ExportLine::Record(r.clone())).unwrap_or_default(),
        }
    }
    fn head(h: &SignedHead) -> Line {
        Line {
            seq: h.seq,
            head: true,
            time_ms: h.time_ms,
            json: serde_json::to_string(&ExportLine::Head {
                signed_head: h.clone(),
            })
            .unwrap_or_default(),
        }
    }
}

/// Why a batch was not accepted (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Http(String),
    #[error("the sink refused the batch: {0}")]
    Refused(String),
}

/// Progress of one exporter: the last record and head sequence numbers its
/// sink acknowledged.
pub use crate::store::ExportCursor as Cursor;

/// The cursor file of an earlier version (`DIR/NAME.cursor`, `records=N
/// heads=M`); a missing file is the start of the trail.
pub fn legacy_cursor(dir: &Path, name: &str) -> Result<Cursor, String> {
    let path = dir.join(format!("{name}.cursor"));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Cursor::default()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let mut c = Cursor::default();
    for part in text.split_whitespace() {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("{}: bad cursor {text:?}", path.display()))?;
        let n: u64 = v
            .parse()
            .map_err(|_| format!("{}: bad cursor {text:?}", path.display()))?;
        match k {
            "records" => c.records = n,
            "heads" => c.heads = n,
            _ => return Err(format!("{}: bad cursor {text:?}", path.display())),
        }
    }
    Ok(c)
}

/// Where exporter `name` stands: its stored cursor, or (none stored yet)
/// the cursor file an earlier version wrote in `dir`. Blocking.
pub fn cursor_of(store: &dyn Store, dir: &Path, name: &str) -> Result<Cursor, String> {
    match store.export_cursor(name) {
        Ok(Some(c)) => Ok(c),
        Ok(None) => legacy_cursor(dir, name),
        Err(e) => Err(format!("reading the export cursor: {e}")),
    }
}

/// The lease an exporter runs under.
pub fn lease_name(name: &str) -> String {
    format!("audit-export:{name}")
}

/// A destination for exported lines.
pub enum Sink {
    File(FileSink),
    Stdout,
    Syslog {
        socket: PathBuf,
        timeout: Duration,
    },
    Elasticsearch {
        client: reqwest::Client,
        url: String,
        index: String,
        auth: Option<(String, Secret<String>)>,
        api_key: Option<Secret<String>>,
    },
    Splunk {
        client: reqwest::Client,
        url: String,
        token: Secret<String>,
        sourcetype: String,
    },
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Sink::File(_) => "Sink::File",
            Sink::Stdout => "Sink::Stdout",
            Sink::Syslog { .. } => "Sink::Syslog",
            Sink::Elasticsearch { .. } => "Sink::Elasticsearch",
            Sink::Splunk { .. } => "Sink::Splunk",
        })
    }
}

fn read_secret(path: &Path, key: &str) -> Result<Secret<String>, String> {
    std::fs::read_to_string(path)
        .map(|s| Secret::new(s.trim().to_string()))
        .map_err(|e| format!("{key}: {}: {e}", path.display()))
}

fn http_client(timeout: Duration) -> Result<reqwest::Client, String> {
    let roots = rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(timeout)
        .build()
        .map_err(|e| format!("HTTP client: {e}"))
}

impl Sink {
    /// Builds the sink; secrets are read from their files here.
    pub fn open(export: &ExportConfig) -> Result<Sink, String> {
        let timeout = export.timeout;
        Ok(match &export.sink {
            SinkConfig::File {
                path,
                max_bytes,
                keep,
            } => Sink::File(FileSink {
                path: path.clone(),
                max_bytes: *max_bytes,
                keep: *keep,
            }),
            SinkConfig::Stdout => Sink::Stdout,
            SinkConfig::Syslog { socket } => Sink::Syslog {
                socket: socket.clone(),
                timeout,
            },
            SinkConfig::Elasticsearch {
                url,
                index,
                username,
                password_file,
                api_key_file,
            } => Sink::Elasticsearch {
                client: http_client(timeout)?,
                url: url.trim_end_matches('/').to_string(),
                index: index.clone(),
                auth: match (username, password_file) {
                    (Some(u), Some(p)) => Some((u.clone(), read_secret(p, "password_file")?)),
                    _ => None,
                },
                api_key: api_key_file
                    .as_ref()
                    .map(|p| read_secret(p, "api_key_file"))
                    .transpose()?,
            },
            SinkConfig::Splunk {
                url,
                token_file,
                sourcetype,
            } => Sink::Splunk {
                client: http_client(timeout)?,
                url: url.trim_end_matches('/').to_string(),
                token: read_secret(token_file, "token_file")?,
                sourcetype: sourcetype.clone(),
            },
        })
    }

    /// The last record sequence number already in the sink, where the sink
    /// can tell (the file sink reads its last line).
    fn already_has(&self) -> Option<u64> {
        match self {
            Sink::File(f) => f.last_record_seq(),
            _ => None,
        }
    }

    /// Sends `lines`; `Ok` means the sink has them durably (as far as it says).
    pub async fn send(&mut self, lines: &[Line]) -> Result<(), SinkError> {
        match self {
            Sink::File(f) => {
                let f = f.clone();
                let lines = lines.to_vec();
                tokio::task::spawn_blocking(move || f.append(&lines))
                    .await
                    .map_err(|e| SinkError::Io(std::io::Error::other(e)))?
            }
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                for l in lines {
                    writeln!(out, "{}", l.json)?;
                }
                out.flush()?;
                Ok(())
            }
            Sink::Syslog { socket, timeout } => {
                let sock = tokio::net::UnixDatagram::unbound()?;
                let host = hostname();
                for l in lines {
                    let msg = syslog_message(&host, l);
                    // A stalled reader (full socket queue) must not hang the
                    // exporter: give up on the batch and retry it later.
                    tokio::time::timeout(*timeout, sock.send_to(msg.as_bytes(), &*socket))
                        .await
                        .map_err(|_| {
                            SinkError::Io(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                format!("{}: the syslog socket is not reading", socket.display()),
                            ))
                        })??;
                }
                Ok(())
            }
            Sink::Elasticsearch {
                client,
                url,
                index,
                auth,
                api_key,
            } => {
                let body = bulk_body(index, lines);
                let mut req = client
                    .post(format!("{url}/_bulk"))
                    .header("content-type", "application/x-ndjson")
                    .body(body);
                if let Some((u, p)) = auth {
                    req = req.basic_auth(u, Some(p.expose()));
                }
                if let Some(k) = api_key {
                    req = req.header("authorization", format!("ApiKey {}", k.expose()));
                }
                let resp = req
                    .send()
                    .await
                    .map_err(|e| SinkError::Http(e.to_string()))?;
                let status = resp.status();
                let text = resp
                    .text()
                    .await
                    .map_err(|e| SinkError::Http(e.to_string()))?;
                if !status.is_success() {
                    return Err(SinkError::Refused(format!(
                        "HTTP {status}: {}",
                        clip(&text)
                    )));
                }
                check_bulk_response(&text)
            }
            Sink::Splunk {
                client,
                url,
                token,
                sourcetype,
            } => {
                let body = hec_body(sourcetype, lines);
                let resp = client
                    .post(format!("{url}/services/collector/event"))
                    .header("authorization", format!("Splunk {}", token.expose()))
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| SinkError::Http(e.to_string()))?;
                let status = resp.status();
                let text = resp
                    .text()
                    .await
                    .map_err(|e| SinkError::Http(e.to_string()))?;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(SinkError::Refused(format!(
                        "HTTP {status}: {}",
                        clip(&text)
                    )))
                }
            }
        }
    }
}

fn clip(s: &str) -> String {
    s.chars().take(300).collect()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "-".to_string())
}

/// `<86>1 TIME HOST fleetcmd-controller - audit - JSON` (authpriv.info).
pub fn syslog_message(host: &str, l: &Line) -> String {
    let time = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(l.time_ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "-".to_string());
    format!(
        "<86>1 {time} {host} fleetcmd-controller - {} - {}",
        if l.head { "audit-head" } else { "audit" },
        l.json
    )
}

/// The `_bulk` body: `create` with `_id` = `<seq>` (heads: `head-<seq>`).
pub fn bulk_body(index: &str, lines: &[Line]) -> String {
    let mut body = String::new();
    for l in lines {
        let id = if l.head {
            format!("head-{}", l.seq)
        } else {
            l.seq.to_string()
        };
        let action = serde_json::json!({"create": {"_index": index, "_id": id}});
        body.push_str(&action.to_string());
        body.push('\n');
        body.push_str(&l.json);
        body.push('\n');
    }
    body
}

/// Accepts a `_bulk` response whose items are all created (201/200) or
/// already there (409 from an earlier attempt).
pub fn check_bulk_response(text: &str) -> Result<(), SinkError> {
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| SinkError::Refused(format!("unreadable _bulk response: {e}")))?;
    if v["errors"].as_bool() != Some(true) {
        return Ok(());
    }
    let items = v["items"].as_array().cloned().unwrap_or_default();
    for item in &items {
        let op = item
            .as_object()
            .and_then(|o| o.values().next())
            .cloned()
            .unwrap_or_default();
        let status = op["status"].as_u64().unwrap_or(0);
        if !(status == 200 || status == 201 || status == 409) {
            let reason = op["error"]["reason"]
                .as_str()
                .or(op["error"]["type"].as_str())
                .unwrap_or("unknown error");
            return Err(SinkError::Refused(format!(
                "_bulk item `{}` failed with {status}: {reason}",
                op["_id"].as_str().unwrap_or("?")
            )));
        }
    }
    Ok(())
}

/// HEC events, concatenated: `{"time", "source", "sourcetype", "event"}`.
pub fn hec_body(sourcetype: &str, lines: &[Line]) -> String {
    let mut body = String::new();
    for l in lines {
        let event: serde_json::Value =
            serde_json::from_str(&l.json).unwrap_or(serde_json::Value::Null);
        let ev = serde_json::json!({
            "time": l.time_ms as f64 / 1000.0,
            "source": "fleetcmd-controller",
            "sourcetype": sourcetype,
            "event": event,
        });
        body.push_str(&ev.to_string());
        body.push('\n');
    }
    body
}

/// Appends JSON lines to a file, rotating it.
#[derive(Debug, Clone)]
pub struct FileSink {
    pub path: PathBuf,
    pub max_bytes: u64,
    pub keep: u32,
}

impl FileSink {
    fn rotated(&self, n: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    fn rotate(&self) -> std::io::Result<()> {
        if self.keep == 0 {
            return std::fs::remove_file(&self.path);
        }
        for n in (1..self.keep).rev() {
            let from = self.rotated(n);
            if from.exists() {
                std::fs::rename(&from, self.rotated(n + 1))?;
            }
        }
        std::fs::rename(&self.path, self.rotated(1))
    }

    fn append(&self, lines: &[Line]) -> Result<(), SinkError> {
        let size = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        let add: u64 = lines.iter().map(|l| l.json.len() as u64 + 1).sum();
        if size > 0 && size + add > self.max_bytes {
            self.rotate()?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        let mut buf = String::new();
        for l in lines {
            buf.push_str(&l.json);
            buf.push('\n');
        }
        f.write_all(buf.as_bytes())?;
        f.sync_data()?;
        Ok(())
    }

    /// The sequence number of the last record line in the file (or the
    /// newest rotated one when the current file is empty).
    fn last_record_seq(&self) -> Option<u64> {
        [self.path.clone(), self.rotated(1)]
            .iter()
            .find_map(|p| last_record_in(p))
    }
}

fn last_record_in(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .rev()
        .find_map(|l| match serde_json::from_str::<ExportLine>(l).ok()? {
            ExportLine::Record(r) => Some(r.seq),
            ExportLine::Head { .. } => None,
        })
}

/// One exporter: reads the trail after its cursor and feeds its sink,
/// while `lead` says this controller holds its lease.
pub struct Exporter {
    pub name: String,
    pub audit: Arc<Audit>,
    pub store: Arc<dyn Store>,
    pub lead: Leadership,
    pub sink: Sink,
    pub batch: usize,
    pub cursor_dir: PathBuf,
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter")
            .field("name", &self.name)
            .field("sink", &self.sink)
            .finish()
    }
}

impl Exporter {
    /// The cursor directory of a controller data dir's audit trail.
    pub fn cursor_dir(audit: &Audit) -> PathBuf {
        audit.dir().join("export")
    }

    /// An exporter for `cfg` over `audit`, running while `lead` holds its
    /// lease (`lease_name`); opens the sink.
    pub fn new(
        cfg: &ExportConfig,
        audit: Arc<Audit>,
        store: Arc<dyn Store>,
        lead: Leadership,
    ) -> Result<Exporter, String> {
        Ok(Exporter {
            name: cfg.name.clone(),
            cursor_dir: Exporter::cursor_dir(&audit),
            sink: Sink::open(cfg)?,
            audit,
            store,
            lead,
            batch: cfg.batch,
            retry_initial: cfg.retry_initial,
            retry_max: cfg.retry_max,
        })
    }

    /// Runs until `stop` turns true (finishing the batch in hand): waits
    /// for the lease, exports from the stored cursor while it holds it,
    /// and waits again when it is lost.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        loop {
            loop {
                if *stop.borrow() {
                    return;
                }
                if self.lead.is_leader() {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(POLL) => {}
                    _ = stop.changed() => {}
                }
            }
            let (store, dir, name) = (
                self.store.clone(),
                self.cursor_dir.clone(),
                self.name.clone(),
            );
            let start = tokio::task::spawn_blocking(move || cursor_of(store.as_ref(), &dir, &name))
                .await
                .map_err(|e| e.to_string())
                .and_then(|c| c);
            let cursor = match start {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(exporter = %self.name, error = %e, "audit export cursor unreadable; trying again");
                    tokio::select! {
                        _ = tokio::time::sleep(self.retry_max) => {}
                        _ = stop.changed() => {}
                    }
                    continue;
                }
            };
            tracing::info!(exporter = %self.name, records = cursor.records, "exporting the audit trail");
            if self.export(cursor, &mut stop).await {
                return;
            }
        }
    }

    /// Exports from `cursor` while this controller leads; `true` when
    /// asked to stop, `false` when the lease was lost.
    async fn export(&mut self, mut cursor: Cursor, stop: &mut watch::Receiver<bool>) -> bool {
        if let Some(seq) = self.sink.already_has()
            && seq > cursor.records
        {
            tracing::info!(exporter = %self.name, seq, "the sink already has records past the cursor; resuming after them");
            cursor.records = seq;
        }
        let mut backoff = self.retry_initial;
        loop {
            if *stop.borrow() {
                return true;
            }
            if !self.lead.is_leader() {
                tracing::warn!(exporter = %self.name, "audit export lease lost; another controller exports");
                return false;
            }
            let lines = match self.next_lines(cursor).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(exporter = %self.name, error = %e, "reading the audit trail failed");
                    Vec::new()
                }
            };
            if lines.is_empty() {
                tokio::select! {
                    _ = tokio::time::sleep(POLL) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            match self.sink.send(&lines).await {
                Ok(()) => {
                    backoff = self.retry_initial;
                    for l in &lines {
                        if l.head {
                            cursor.heads = cursor.heads.max(l.seq);
                        } else {
                            cursor.records = cursor.records.max(l.seq);
                        }
                    }
                    if !self.keep_cursor(cursor).await {
                        return false;
                    }
                }
                Err(e) => {
                    tracing::warn!(exporter = %self.name, error = %e, retry_in = ?backoff, "audit export failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => {}
                    }
                    backoff = (backoff * 2).min(self.retry_max);
                }
            }
        }
    }

    /// Stores the cursor under the lease; `false` when the lease is no
    /// longer this controller's (the write was refused).
    async fn keep_cursor(&self, cursor: Cursor) -> bool {
        let Some(fence) = self.lead.fence() else {
            return false;
        };
        let (store, name) = (self.store.clone(), self.name.clone());
        let put = tokio::task::spawn_blocking(move || {
            store.put_export_cursor_fenced(&fence, &name, cursor)
        })
        .await;
        match put {
            Ok(Ok(true)) => true,
            Ok(Ok(false)) => {
                tracing::warn!(exporter = %self.name, "the export cursor was refused: the lease moved; another controller exports");
                false
            }
            // Not stored: the next start sends this batch again.
            Ok(Err(e)) => {
                tracing::error!(exporter = %self.name, error = %e, "writing the export cursor failed");
                true
            }
            Err(e) => {
                tracing::error!(exporter = %self.name, error = %e, "export cursor task");
                true
            }
        }
    }

    /// The next batch: records after the cursor, then the signed heads the
    /// exported records cover.
    async fn next_lines(&self, cursor: Cursor) -> Result<Vec<Line>, String> {
        let audit = self.audit.clone();
        let batch = self.batch;
        tokio::task::spawn_blocking(move || {
            let records = audit
                .records_from(cursor.records + 1, batch)
                .map_err(|e| e.to_string())?;
            let upto = records.last().map_or(cursor.records, |r| r.seq);
            let mut lines: Vec<Line> = records.iter().map(Line::record).collect();
            let heads = audit
                .heads_from(cursor.heads + 1)
                .map_err(|e| e.to_string())?;
            lines.extend(heads.iter().filter(|h| h.seq <= upto).map(Line::head));
            Ok(lines)
        })
        .await
        .map_err(|e| e.to_string())?
    }
}
