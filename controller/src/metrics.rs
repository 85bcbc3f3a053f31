//! Prometheus metrics (`/metrics`), in the OpenMetrics text
//! format with `prometheus-client`.
//!
//! Two kinds of figures:
//! - event counters and histograms (jobs, targets, gRPC calls), updated
//!   where the event happens, cheaply (atomics; no lock held across I/O);
//! - fleet gauges (agents, per-host health, checks, services), rendered at
//!   scrape time from a [`FleetSnapshot`] of plain data. Nothing is written
//!   per heartbeat: with 10 000 agents that would cost more than the scrapes.
//!
//! Label cardinality stays bounded: per-host series carry `host` (the agent
//! id) and, where needed, `mount` or `check`; gRPC series carry only the
//! service and method names of routes that exist (anything else is counted
//! as `unknown`, so a client cannot invent label values).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use fleetcmd_proto::v1 as pb;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tonic::codegen::http;

/// The content type of a scrape answer.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the fleet looks like at one scrape: plain data, copied out of the
/// controller's state so rendering holds no lock.
#[derive(Debug, Clone, Default)]
pub struct FleetSnapshot {
    /// Every enrolled agent, as `Agents.List` returns them.
    pub agents: Vec<pb::Agent>,
    /// Declared services and their current state.
    pub services: Vec<pb::Service>,
    /// Wall clock of the snapshot, Unix milliseconds (heartbeat ages).
    pub now_ms: u64,
    /// Which controller answers, its leases and its store.
    pub controller: crate::controller_metrics::ControllerSnapshot,
    /// The store could not be read for this scrape: no fleet gauges (an
    /// empty fleet would read as every agent gone).
    pub fleet_unread: bool,
}

type Labels1 = [(&'static str, String); 1];
type RpcLabels = [(&'static str, String); 3];
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Event counters and histograms; one per controller, shared by the state
/// and the gRPC layer.
pub struct Metrics {
    registry: Registry,
    jobs_submitted: Counter,
    jobs_finished: Family<Labels1, Counter>,
    targets_finished: Family<Labels1, Counter>,
    job_duration: Histogram,
    rpc_requests: Family<RpcLabels, Counter>,
    rpc_duration: HistogramFamily<RpcLabels>,
    store_probe_duration: Histogram,
    store_probe_errors: Counter,
    result_batches: Counter,
    results_batched: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn job_buckets() -> Histogram {
    // 50 ms … ~2.5 h
    Histogram::new(exponential_buckets(0.05, 3.0, 12))
}

fn rpc_buckets() -> Histogram {
    // 0.5 ms … ~30 s
    Histogram::new(exponential_buckets(0.0005, 2.5, 13))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let jobs_submitted = Counter::default();
        let jobs_finished = Family::<Labels1, Counter>::default();
        let targets_finished = Family::<Labels1, Counter>::default();
        let job_duration = job_buckets();
        let rpc_requests = Family::<RpcLabels, Counter>::default();
        let rpc_duration = HistogramFamily::<RpcLabels>::new_with_constructor(rpc_buckets);
        let store_probe_duration = rpc_buckets();
        let store_probe_errors = Counter::default();
        let result_batches = Counter::default();
        let results_batched = Counter::default();
        // OpenMetrics adds `_total` to counter names.
        registry.register(
            "fleetcmd_jobs_submitted",
            "Jobs accepted (durable) by this controller since it started",
            jobs_submitted.clone(),
        );
        registry.register(
            "fleetcmd_jobs_finished",
            "Jobs finished since start, by final state (succeeded, failed, canceled, aborted, ...)",
            jobs_finished.clone(),
        );
        registry.register(
            "fleetcmd_job_targets_finished",
            "Targets of finished jobs, by outcome (ok, failed, timed_out, refused, offline, canceled, skipped)",
            targets_finished.clone(),
        );
        registry.register(
            "fleetcmd_job_duration_seconds",
            "Time from submission to the end of the last target, per finished job",
            job_duration.clone(),
        );
        registry.register(
            "fleetcmd_grpc_requests",
            "gRPC calls answered, by service, method and status code (code as sent in the response headers)",
            rpc_requests.clone(),
        );
        registry.register(
            "fleetcmd_grpc_request_duration_seconds",
            "Time to the response headers of gRPC calls (streams: until they open)",
            rpc_duration.clone(),
        );
        registry.register(
            "fleetcmd_store_probe_duration_seconds",
            "Round trip of the store probe made at each scrape (one lease read): the store's latency as this controller sees it",
            store_probe_duration.clone(),
        );
        registry.register(
            "fleetcmd_store_probe_errors",
            "Store probes that failed (the store did not answer or refused)",
            store_probe_errors.clone(),
        );
        registry.register(
            "fleetcmd_result_batches",
            "Transactions that stored agents' results with several controllers (each stores the results queued meanwhile)",
            result_batches.clone(),
        );
        registry.register(
            "fleetcmd_results_batched",
            "Agents' results stored in those transactions (divided by fleetcmd_result_batches_total: the mean batch)",
            results_batched.clone(),
        );
        Metrics {
            registry,
            jobs_submitted,
            jobs_finished,
            targets_finished,
            job_duration,
            rpc_requests,
            rpc_duration,
            store_probe_duration,
            store_probe_errors,
            result_batches,
            results_batched,
        }
    }

    /// One transaction stored `results` agents' results.
    pub fn result_batch(&self, results: usize) {
        self.result_batches.inc();
        self.results_batched.inc_by(results as u64);
    }

    /// One store probe: its round trip, or that it failed.
    pub fn store_probe(&self, result: Result<Duration, ()>) {
        match result {
            Ok(took) => self.store_probe_duration.observe(took.as_secs_f64()),
            Err(()) => {
                self.store_probe_errors.inc();
            }
        }
    }

    pub fn job_submitted(&self) {
        self.jobs_submitted.inc();
    }

    /// A job reached its final `state` after `took`; `targets` are its
    /// targets' final states.
    pub fn job_finished<'a>(
        &self,
        state: &str,
        took: Duration,
        targets: impl IntoIterator<Item = &'a str>,
    ) {
        self.jobs_finished
            .get_or_create(&[("state", state.to_owned())])
            .inc();
        self.job_duration.observe(took.as_secs_f64());
        let mut counts: std::collections::BTreeMap<&str, u64> = Default::default();
        for t in targets {
            *counts.entry(t).or_default() += 1;
        }
        for (outcome, n) in counts {
            self.targets_finished
                .get_or_create(&[("outcome", outcome.to_owned())])
                .inc_by(n);
        }
    }

    /// One gRPC call answered.
    pub fn rpc(&self, service: &str, method: &str, code: &str, took: Duration) {
        let labels = [
            ("service", service.to_owned()),
            ("method", method.to_owned()),
            ("code", code.to_owned()),
        ];
        self.rpc_requests.get_or_create(&labels).inc();
        self.rpc_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// The whole scrape answer: the event metrics, then the fleet gauges of
    /// `snapshot`. CPU-bound for big fleets: call it off the async workers.
    pub fn render(&self, snapshot: FleetSnapshot) -> String {
        let mut out = String::new();
        let mut fleet = Registry::default();
        fleet.register_collector(Box::new(crate::controller_metrics::ControllerCollector(
            snapshot.controller.clone(),
        )));
        if !snapshot.fleet_unread {
            fleet.register_collector(Box::new(FleetCollector(snapshot)));
        }
        // Writing to a String cannot fail; an encoding error would be a bug
        // in a label or metric name of ours.
        if let Err(e) = prometheus_client::encoding::text::encode_registry(&mut out, &self.registry)
            .and_then(|()| prometheus_client::encoding::text::encode_registry(&mut out, &fleet))
        {
            tracing::error!(error = %e, "encoding metrics");
        }
        let _ = prometheus_client::encoding::text::encode_eof(&mut out);
        out
    }
}

/// Renders a [`FleetSnapshot`] at scrape time.
#[derive(Debug)]
struct FleetCollector(FleetSnapshot);

/// One gauge family: its descriptor, then one sample per row.
pub(crate) fn gauge<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, f64)>,
) -> std::fmt::Result {
    let mut m: MetricEncoder = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        m.encode_family(&labels)?.encode_gauge(&v)?;
    }
    Ok(())
}

/// Nagios code of a check state: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
pub fn nagios_code(state: i32) -> f64 {
    match pb::CheckState::try_from(state) {
        Ok(pb::CheckState::Ok) => 0.0,
        Ok(pb::CheckState::Warning) => 1.0,
        Ok(pb::CheckState::Critical) => 2.0,
        _ => 3.0,
    }
}

/// The states a service can be in; `fleetcmd_service_state` has one series
/// per service and state, 1 for the current one.
pub const SERVICE_STATES: [&str; 4] = ["ok", "degraded", "down", "unknown"];

impl Collector for FleetCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let snap = &self.0;
        let known = snap.agents.len();
        let revoked = snap.agents.iter().filter(|a| a.revoked).count();
        let online = snap.agents.iter().filter(|a| a.online).count();
        let none: [(&str, &str); 0] = [];
        gauge(
            &mut enc,
            "fleetcmd_agents_known",
            "Enrolled agents, revoked ones included",
            [(none, known as f64)],
        )?;
        gauge(
            &mut enc,
            "fleetcmd_agents_online",
            "Agents connected with a heartbeat within 3 intervals",
            [(none, online as f64)],
        )?;
        gauge(
            &mut enc,
            "fleetcmd_agents_offline",
            "Enrolled, not revoked agents that are not online",
            [(none, known.saturating_sub(online + revoked) as f64)],
        )?;
        gauge(
            &mut enc,
            "fleetcmd_agents_revoked",
            "Revoked agents",
            [(none, revoked as f64)],
        )?;
        let live: Vec<&pb::Agent> = snap.agents.iter().filter(|a| !a.revoked).collect();
        gauge(
            &mut enc,
            "fleetcmd_host_up",
            "1 when the agent is online, 0 when not (revoked agents have no series)",
            live.iter().map(|a| {
                (
                    [("host", a.agent_id.as_str())],
                    f64::from(u8::from(a.online)),
                )
            }),
        )?;
        gauge(
            &mut enc,
            "fleetcmd_host_last_heartbeat_age_seconds",
            "Seconds since the agent's last heartbeat (connected agents only)",
            live.iter().filter(|a| a.last_seen_ms > 0).map(|a| {
                (
                    [("host", a.agent_id.as_str())],
                    snap.now_ms.saturating_sub(a.last_seen_ms) as f64 / 1000.0,
                )
            }),
        )?;
        gauge(
            &mut enc,
            "fleetcmd_host_clock_skew_seconds",
            "Agent clock minus controller clock at the last heartbeat",
            live.iter()
                .filter(|a| a.last_seen_ms > 0)
                .map(|a| ([("host", a.agent_id.as_str())], a.clock_skew_secs as f64)),
        )?;
        // Host figures of agents that reported them.
        let with: Vec<(&str, &pb::HostMetrics)> = live
            .iter()
            .filter_map(|a| a.metrics.as_ref().map(|m| (a.agent_id.as_str(), m)))
            .collect();
        for (suffix, help, value) in fleetcmd_proto::HOST_FIGURES {
            gauge(
                &mut enc,
                &format!("fleetcmd_host_{suffix}"),
                help,
                with.iter().map(|(h, m)| ([("host", *h)], value(m))),
            )?;
        }
        gauge(
            &mut enc,
            "fleetcmd_host_disks",
            "Real file systems reported by the agent",
            with.iter()
                .map(|(h, m)| ([("host", *h)], m.disks.len() as f64)),
        )?;
        let disks = || {
            with.iter()
                .flat_map(|(h, m)| m.disks.iter().map(move |d| (*h, d)))
        };
        gauge(
            &mut enc,
            "fleetcmd_host_disk_total_bytes",
            "Size of a mounted file system",
            disks().map(|(h, d)| {
                (
                    [("host", h), ("mount", d.mount.as_str())],
                    d.total_bytes as f64,
                )
            }),
        )?;
        gauge(
            &mut enc,
            "fleetcmd_host_disk_available_bytes",
            "Space available to unprivileged users on a mounted file system",
            disks().map(|(h, d)| {
                (
                    [("host", h), ("mount", d.mount.as_str())],
                    d.available_bytes as f64,
                )
            }),
        )?;
        gauge(
            &mut enc,
            "fleetcmd_host_disk_used_bytes",
            "Size minus available space of a mounted file system (includes root-reserved blocks)",
            disks().map(|(h, d)| {
                (
                    [("host", h), ("mount", d.mount.as_str())],
                    d.total_bytes.saturating_sub(d.available_bytes) as f64,
                )
            }),
        )?;
        let checks = || {
            live.iter()
                .flat_map(|a| a.checks.iter().map(move |c| (a.agent_id.as_str(), c)))
        };
        gauge(
            &mut enc,
            "fleetcmd_check_state",
            "Latest result of a check, as a Nagios code: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN",
            checks().map(|(h, c)| {
                (
                    [
                        ("host", h),
                        ("check", c.name.as_str()),
                        ("kind", c.kind.as_str()),
                    ],
                    nagios_code(c.state),
                )
            }),
        )?;
        gauge(
            &mut enc,
            "fleetcmd_check_duration_seconds",
            "How long the latest run of a check took",
            checks().map(|(h, c)| {
                (
                    [
                        ("host", h),
                        ("check", c.name.as_str()),
                        ("kind", c.kind.as_str()),
                    ],
                    c.duration_ms as f64 / 1000.0,
                )
            }),
        )?;
        gauge(
            &mut enc,
            "fleetcmd_service_state",
            "1 for the service's current state (ok, degraded, down, unknown), 0 for the others",
            snap.services.iter().flat_map(|s| {
                let current = if SERVICE_STATES.contains(&s.state.as_str()) {
                    s.state.as_str()
                } else {
                    "unknown"
                };
                SERVICE_STATES.iter().map(move |st| {
                    (
                        [("service", s.name.as_str()), ("state", *st)],
                        f64::from(u8::from(*st == current)),
                    )
                })
            }),
        )?;
        gauge(
            &mut enc,
            "fleetcmd_service_instances_passing",
            "Instances of the service whose check passes",
            snap.services
                .iter()
                .map(|s| ([("service", s.name.as_str())], f64::from(s.passing))),
        )?;
        gauge(
            &mut enc,
            "fleetcmd_service_instances_total",
            "Instances the service's selector matches",
            snap.services
                .iter()
                .map(|s| ([("service", s.name.as_str())], f64::from(s.total))),
        )?;
        Ok(())
    }
}

// ---------------------------------------------------------------- gRPC layer

/// A tower layer for the tonic server that counts every call and times it
/// to its response headers. The status code is the `grpc-status` response
/// header: tonic sends errors from handlers and interceptors as
/// trailers-only responses (code in the headers); a response without one is
/// a call that answered (its status, normally OK, follows in the trailers).
#[derive(Clone)]
pub struct RpcMetricsLayer(Arc<Metrics>);

impl RpcMetricsLayer {
    pub fn new(metrics: Arc<Metrics>) -> RpcMetricsLayer {
        RpcMetricsLayer(metrics)
    }
}

impl<S> tower_layer::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;
    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// `/pkg.Service/Method` → (`pkg.Service`, `Method`) when both look like
/// protobuf names; `None` for anything else.
fn split_path(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    let ok = |s: &str, dots: bool| {
        !s.is_empty()
            && s.len() <= 64
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || (dots && c == '.'))
    };
    (ok(service, true) && ok(method, false)).then_some((service, method))
}

/// The status name from the response headers (see [`RpcMetricsLayer`]).
fn code_of<B>(res: &http::Response<B>) -> String {
    match res.headers().get("grpc-status") {
        Some(v) => {
            let n = v
                .to_str()
                .ok()
                .and_then(|s| s.parse::<i32>().ok())
                .unwrap_or(2);
            format!("{:?}", tonic::Code::from_i32(n))
        }
        None if res.status() == http::StatusCode::OK => "Ok".to_owned(),
        None => "Unknown".to_owned(),
    }
}

impl<S, B, R> tower_service::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let route = split_path(req.uri().path()).map(|(s, m)| (s.to_owned(), m.to_owned()));
        let started = Instant::now();
        let metrics = self.metrics.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            let code = match &res {
                Ok(r) => code_of(r),
                Err(_) => "Internal".to_owned(),
            };
            // Routes that do not exist answer Unimplemented: counted as
            // `unknown` so that callers cannot create label values.
            let (service, method) = match route {
                Some((s, m)) if code != "Unimplemented" => (s, m),
                _ => ("unknown".to_owned(), "unknown".to_owned()),
            };
            metrics.rpc(&service, &method, &code, started.elapsed());
            res
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sample lines of `text` whose metric name is `name`.
    fn samples<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            })
            .collect()
    }

    fn agent(id: &str, online: bool) -> pb::Agent {
        pb::Agent {
            agent_id: id.into(),
            online,
            last_seen_ms: 9_000,
            clock_skew_secs: -2,
            metrics: Some(pb::HostMetrics {
                cpu_percent: 12.5,
                load1: 0.5,
                load5: 0.25,
                load15: 0.125,
                mem_total_bytes: 1000,
                mem_used_bytes: 400,
                disks: vec![pb::DiskUsage {
                    mount: "/".into(),
                    total_bytes: 100,
                    available_bytes: 30,
                }],
                ..Default::default()
            }),
            checks: vec![pb::CheckResult {
                name: "nginx".into(),
                kind: "systemd".into(),
                state: pb::CheckState::Critical as i32,
                duration_ms: 1500,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn service(name: &str, state: &str, passing: u32, total: u32) -> pb::Service {
        pb::Service {
            name: name.into(),
            state: state.into(),
            passing,
            total,
            ..Default::default()
        }
    }

    #[test]
    fn fleet_gauges_render_per_host_with_host_labels() {
        let mut revoked = agent("old", false);
        revoked.revoked = true;
        let text = Metrics::new().render(FleetSnapshot {
            agents: vec![agent("web-1", true), agent("db-1", false), revoked],
            services: Vec::new(),
            now_ms: 10_000,
            ..Default::default()
        });
        for line in [
            "fleetcmd_agents_known 3.0",
            "fleetcmd_agents_online 1.0",
            "fleetcmd_agents_offline 1.0",
            "fleetcmd_agents_revoked 1.0",
            "fleetcmd_host_up{host=\"web-1\"} 1.0",
            "fleetcmd_host_up{host=\"db-1\"} 0.0",
            "fleetcmd_host_load1{host=\"web-1\"} 0.5",
            "fleetcmd_host_cpu_percent{host=\"db-1\"} 12.5",
            "fleetcmd_host_memory_used_bytes{host=\"web-1\"} 400.0",
            "fleetcmd_host_disk_used_bytes{host=\"web-1\",mount=\"/\"} 70.0",
            "fleetcmd_host_last_heartbeat_age_seconds{host=\"web-1\"} 1.0",
            "fleetcmd_host_clock_skew_seconds{host=\"web-1\"} -2.0",
            "fleetcmd_check_state{host=\"web-1\",check=\"nginx\",kind=\"systemd\"} 2.0",
            "fleetcmd_check_duration_seconds{host=\"web-1\",check=\"nginx\",kind=\"systemd\"} 1.5",
            "fleetcmd_jobs_submitted_total 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
        assert!(
            !text.contains("host=\"old\""),
            "revoked hosts have no series:\n{text}"
        );
        assert!(text.contains("# HELP fleetcmd_host_load1 "), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn service_state_has_one_series_per_state_with_the_current_one_set() {
        let text = Metrics::new().render(FleetSnapshot {
            services: vec![
                service("api", "degraded", 1, 2),
                service("db", "ok", 3, 3),
                service("odd", "exploded", 0, 0),
            ],
            ..Default::default()
        });
        let got = samples(&text, "fleetcmd_service_state");
        let expected = [
            "fleetcmd_service_state{service=\"api\",state=\"ok\"} 0.0",
            "fleetcmd_service_state{service=\"api\",state=\"degraded\"} 1.0",
            "fleetcmd_service_state{service=\"api\",state=\"down\"} 0.0",
            "fleetcmd_service_state{service=\"api\",state=\"unknown\"} 0.0",
            "fleetcmd_service_state{service=\"db\",state=\"ok\"} 1.0",
            "fleetcmd_service_state{service=\"db\",state=\"degraded\"} 0.0",
            "fleetcmd_service_state{service=\"db\",state=\"down\"} 0.0",
            "fleetcmd_service_state{service=\"db\",state=\"unknown\"} 0.0",
            // A state this version does not know reads as unknown.
            "fleetcmd_service_state{service=\"odd\",state=\"ok\"} 0.0",
            "fleetcmd_service_state{service=\"odd\",state=\"degraded\"} 0.0",
            "fleetcmd_service_state{service=\"odd\",state=\"down\"} 0.0",
            "fleetcmd_service_state{service=\"odd\",state=\"unknown\"} 1.0",
        ];
        assert_eq!(got, expected, "{text}");
        assert!(
            text.lines()
                .any(|l| l == "fleetcmd_service_instances_passing{service=\"api\"} 1.0"),
            "{text}"
        );
    }

    #[test]
    fn job_and_rpc_events_are_counted() {
        let m = Metrics::new();
        m.job_submitted();
        m.job_finished("failed", Duration::from_millis(300), ["ok", "failed", "ok"]);
        m.rpc("fleetcmd.v1.Jobs", "Submit", "Ok", Duration::from_millis(2));
        let text = m.render(FleetSnapshot::default());
        for line in [
            "fleetcmd_jobs_submitted_total 1",
            "fleetcmd_jobs_finished_total{state=\"failed\"} 1",
            "fleetcmd_job_targets_finished_total{outcome=\"ok\"} 2",
            "fleetcmd_job_targets_finished_total{outcome=\"failed\"} 1",
            "fleetcmd_job_duration_seconds_count 1",
            "fleetcmd_grpc_requests_total{service=\"fleetcmd.v1.Jobs\",method=\"Submit\",code=\"Ok\"} 1",
            "fleetcmd_grpc_request_duration_seconds_count{service=\"fleetcmd.v1.Jobs\",method=\"Submit\",code=\"Ok\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let mut a = agent("web-1", true);
        a.checks[0].name = "say \"hi\"\nnow".into();
        let text = Metrics::new().render(FleetSnapshot {
            agents: vec![a],
            ..Default::default()
        });
        assert!(
            text.contains(r#"check="say \"hi\"\nnow""#),
            "label value not escaped:\n{text}"
        );
    }

    #[test]
    fn only_protobuf_shaped_paths_become_labels() {
        assert_eq!(
            split_path("/fleetcmd.v1.Jobs/Submit"),
            Some(("fleetcmd.v1.Jobs", "Submit"))
        );
        for bad in ["/", "/x", "//m", "/s/", "/s/m/x", "/s p/m", "no-slash/m"] {
            assert_eq!(split_path(bad), None, "{bad}");
        }
        assert_eq!(split_path(&format!("/{}/m", "a".repeat(65))), None);
    }
}
