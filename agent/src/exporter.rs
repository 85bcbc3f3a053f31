//! The agent's optional `/metrics` (`metrics_listen` in agent.toml, loopback
//! only): this host's figures and check states as of the last heartbeat,
//! plus the agent process's own figures, for a node-local Prometheus or
//! agent (OpenMetrics text). Off unless configured: by default the agent
//! opens no port (invariant 1 in ARCHITECTURE.md).
//!
//! Everything here is named `fleetcmd_agent_*` and carries no `host` label
//! (the scrape target is the host), so these series never mix with the
//! controller's `fleetcmd_host_*` ones in sums.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fleetcmd_proto::v1 as pb;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

/// The content type of a scrape answer.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The agent process, read at scrape time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessFigures {
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub cpu_seconds: f64,
    pub open_fds: u64,
    pub uptime_secs: u64,
}

/// What one scrape shows (plain data, copied out of the agent's state).
#[derive(Debug, Clone, Default)]
pub struct AgentFigures {
    /// The last heartbeat sent (host metrics and checks), if any yet.
    pub heartbeat: Option<pb::Heartbeat>,
    /// How long ago it was built.
    pub heartbeat_age: Option<Duration>,
    /// The stream to the controller is up.
    pub connected: bool,
    pub jobs_running: usize,
    /// Results kept until the controller acknowledges them.
    pub results_unacknowledged: usize,
    pub process: ProcessFigures,
}

/// Where the figures come from (the connection loop's state).
pub type Source = Arc<dyn Fn() -> AgentFigures + Send + Sync>;

/// Reads the agent process's figures (blocking: small `/proc` reads).
pub fn process_figures() -> ProcessFigures {
    use sysinfo::{ProcessRefreshKind, ProcessesToUpdate, System};
    let mut out = ProcessFigures::default();
    if let Ok(pid) = sysinfo::get_current_pid() {
        let mut sys = System::new();
        sys.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[pid]),
            false,
            ProcessRefreshKind::nothing().with_memory().with_cpu(),
        );
        if let Some(p) = sys.process(pid) {
            out.resident_bytes = p.memory();
            out.virtual_bytes = p.virtual_memory();
            out.cpu_seconds = p.accumulated_cpu_time() as f64 / 1000.0;
            out.uptime_secs = p.run_time();
        }
    }
    out.open_fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    out
}

#[derive(Debug)]
struct AgentCollector(AgentFigures);

fn gauge<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, f64)>,
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        m.encode_family(&labels)?.encode_gauge(&v)?;
    }
    Ok(())
}

type NoLabels = [(&'static str, &'static str); 0];

fn one(v: f64) -> [(NoLabels, f64); 1] {
    [([], v)]
}

/// Nagios code of a check state: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
fn nagios_code(state: i32) -> f64 {
    match pb::CheckState::try_from(state) {
        Ok(pb::CheckState::Ok) => 0.0,
        Ok(pb::CheckState::Warning) => 1.0,
        Ok(pb::CheckState::Critical) => 2.0,
        _ => 3.0,
    }
}

impl Collector for AgentCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let f = &self.0;
        gauge(
            &mut enc,
            "fleetcmd_agent_connected",
            "1 while the stream to the controller is up",
            one(f64::from(u8::from(f.connected))),
        )?;
        gauge(
            &mut enc,
            "fleetcmd_agent_jobs_running",
            "Jobs running (or waiting for a slot) on this agent",
            one(f.jobs_running as f64),
        )?;
        gauge(
            &mut enc,
            "fleetcmd_agent_results_unacknowledged",
            "Results kept until the controller acknowledges them",
            one(f.results_unacknowledged as f64),
        )?;
        let p = &f.process;
        gauge(
            &mut enc,
            "fleetcmd_agent_process_resident_bytes",
            "Resident memory of the agent process",
            one(p.resident_bytes as f64),
        )?;
        gauge(
            &mut enc,
            "fleetcmd_agent_process_virtual_bytes",
            "Virtual memory of the agent process",
            one(p.virtual_bytes as f64),
        )?;
        gauge(
            &mut enc,
            "fleetcmd_agent_process_cpu_seconds",
            "CPU time (user + system) the agent process has used",
            one(p.cpu_seconds),
        )?;
        gauge(
            &mut enc,
            "fleetcmd_agent_process_open_fds",
            "Open file descriptors of the agent process",
            one(p.open_fds as f64),
        )?;
        gauge(
            &mut enc,
            "fleetcmd_agent_process_uptime_seconds",
            "Seconds since the agent process started",
            one(p.uptime_secs as f64),
        )?;
        gauge(
            &mut enc,
            "fleetcmd_agent_heartbeat_age_seconds",
            "Seconds since the figures below were sampled (the last heartbeat)",
            f.heartbeat_age
                .map(|a| (NoLabels::default(), a.as_secs_f64())),
        )?;
        let m = f.heartbeat.as_ref().and_then(|h| h.metrics.as_ref());
        for (suffix, help, value) in fleetcmd_proto::HOST_FIGURES {
            gauge(
                &mut enc,
                &format!("fleetcmd_agent_{suffix}"),
                help,
                m.map(|m| (NoLabels::default(), value(m))),
            )?;
        }
        let disks = || m.into_iter().flat_map(|m| m.disks.iter());
        gauge(
            &mut enc,
            "fleetcmd_agent_disk_total_bytes",
            "Size of a mounted file system",
            disks().map(|d| ([("mount", d.mount.as_str())], d.total_bytes as f64)),
        )?;
        gauge(
            &mut enc,
            "fleetcmd_agent_disk_available_bytes",
            "Space available to unprivileged users on a mounted file system",
            disks().map(|d| ([("mount", d.mount.as_str())], d.available_bytes as f64)),
        )?;
        let checks = || f.heartbeat.iter().flat_map(|h| h.checks.iter());
        gauge(
            &mut enc,
            "fleetcmd_agent_check_state",
            "Latest result of a check, as a Nagios code: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN",
            checks().map(|c| {
                (
                    [("check", c.name.as_str()), ("kind", c.kind.as_str())],
                    nagios_code(c.state),
                )
            }),
        )?;
        gauge(
            &mut enc,
            "fleetcmd_agent_check_duration_seconds",
            "How long the latest run of a check took",
            checks().map(|c| {
                (
                    [("check", c.name.as_str()), ("kind", c.kind.as_str())],
                    c.duration_ms as f64 / 1000.0,
                )
            }),
        )?;
        Ok(())
    }
}

/// The scrape answer for `figures`.
pub fn render(figures: AgentFigures) -> String {
    let mut reg = Registry::default();
    reg.register_collector(Box::new(AgentCollector(figures)));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &reg) {
        tracing::error!(error = %e, "encoding metrics");
    }
    out
}

/// Binds `addr` (already checked to be loopback by the config). Call from
/// within the runtime.
pub fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(l)
}

/// Serves `GET /metrics` until `stop` turns true: hyper's HTTP/1 server
/// connection directly (no router framework: one path, and the agent's
/// binary size is a target in BENCHMARKS.md). Other paths get 404, other
/// methods 405.
pub async fn serve(
    listener: tokio::net::TcpListener,
    source: Source,
    mut stop: watch::Receiver<bool>,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener: accept");
                    continue;
                }
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        while conns.try_join_next().is_some() {}
        let source = source.clone();
        let service = hyper::service::service_fn(move |req| answer(req, source.clone()));
        conns.spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection");
            }
        });
    }
    conns.abort_all();
}

type Body = http_body_util::Full<hyper::body::Bytes>;

async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    source: Source,
) -> Result<hyper::Response<Body>, std::convert::Infallible> {
    let reply = |status: hyper::StatusCode, text: String| {
        let mut r = hyper::Response::new(Body::from(text));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != "/metrics" {
        return Ok(reply(hyper::StatusCode::NOT_FOUND, "not found\n".into()));
    }
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return Ok(reply(
            hyper::StatusCode::METHOD_NOT_ALLOWED,
            "GET /metrics\n".into(),
        ));
    }
    let figures = tokio::task::spawn_blocking(move || {
        let mut f = source();
        f.process = process_figures();
        render(f)
    })
    .await;
    Ok(match figures {
        Ok(text) => {
            let mut r = reply(hyper::StatusCode::OK, text);
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(CONTENT_TYPE),
            );
            r
        }
        Err(e) => {
            tracing::error!(error = %e, "metrics scrape task");
            reply(hyper::StatusCode::INTERNAL_SERVER_ERROR, String::new())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_host_figures_checks_and_process_without_a_host_label() {
        let text = render(AgentFigures {
            heartbeat: Some(pb::Heartbeat {
                metrics: Some(pb::HostMetrics {
                    load1: 1.5,
                    disks: vec![pb::DiskUsage {
                        mount: "/".into(),
                        total_bytes: 10,
                        available_bytes: 4,
                    }],
                    ..Default::default()
                }),
                checks: vec![pb::CheckResult {
                    name: "ssh".into(),
                    kind: "tcp".into(),
                    state: pb::CheckState::Warning as i32,
                    duration_ms: 20,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            heartbeat_age: Some(Duration::from_secs(3)),
            connected: true,
            jobs_running: 2,
            results_unacknowledged: 0,
            process: ProcessFigures {
                resident_bytes: 4096,
                ..Default::default()
            },
        });
        for line in [
            "fleetcmd_agent_connected 1.0",
            "fleetcmd_agent_jobs_running 2.0",
            "fleetcmd_agent_load1 1.5",
            "fleetcmd_agent_heartbeat_age_seconds 3.0",
            "fleetcmd_agent_disk_available_bytes{mount=\"/\"} 4.0",
            "fleetcmd_agent_check_state{check=\"ssh\",kind=\"tcp\"} 1.0",
            "fleetcmd_agent_check_duration_seconds{check=\"ssh\",kind=\"tcp\"} 0.02",
            "fleetcmd_agent_process_resident_bytes 4096.0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        assert!(!text.contains("host="), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn before_the_first_heartbeat_only_process_figures_have_samples() {
        let text = render(AgentFigures::default());
        assert!(
            !text.lines().any(|l| l.starts_with("fleetcmd_agent_load1 ")),
            "{text}"
        );
        assert!(text.contains("fleetcmd_agent_connected 0.0"), "{text}");
    }

    #[test]
    fn process_figures_are_read() {
        let p = process_figures();
        assert!(p.resident_bytes > 0 && p.open_fds > 0, "{p:?}");
    }
}
