//! Simulated agents: minimal clients of `AgentStream.Connect`, one mTLS
//! connection each. They are load generators, not agents: they send Hello,
//! heartbeats with realistic metrics, and answer every `SignedJob` with
//! `JobStarted` + a `JobResult` OK at once, verifying nothing (no signature,
//! policy, replay or selector check, no process is started). They reconnect
//! with the real agent's backoff (`fleetcmd_agent::conn::backoff`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetcmd_proto::v1 as pb;
use pb::agent_message::Msg as Out;
use pb::controller_message::Msg as In;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

/// TLS identity of one simulated agent.
pub struct AgentIdentity {
    pub name: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// When each target of a job reached this side.
#[derive(Default)]
pub struct JobTimes {
    /// The `SignedJob` arrived at the simulated agent.
    pub received: Vec<Instant>,
    /// The controller's `ResultAck` arrived (sent only after the result was
    /// flushed to disk).
    pub acked: Vec<Instant>,
}

/// What the simulated agents observed, shared by all of them.
#[derive(Default)]
pub struct Stats {
    /// (agent index, when) for every `Welcome` received.
    pub welcomes: Mutex<Vec<(usize, Instant)>>,
    /// (when, what) for every failed connection attempt or broken stream.
    pub failures: Mutex<Vec<(Instant, String)>>,
    pub connected: AtomicU64,
    pub policies: AtomicU64,
    pub heartbeats: AtomicU64,
    pub results_sent: AtomicU64,
    pub result_bytes: AtomicU64,
    pub jobs: Mutex<HashMap<String, JobTimes>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Stats {
    pub fn fail(&self, what: String) {
        lock(&self.failures).push((Instant::now(), what));
    }

    /// Agents (by index) whose first welcome at or after `t0` came, with
    /// the time it took from `t0`.
    pub fn first_welcomes_since(&self, t0: Instant) -> HashMap<usize, Duration> {
        let mut out: HashMap<usize, Duration> = HashMap::new();
        for (i, t) in lock(&self.welcomes).iter() {
            if *t >= t0 {
                let d = *t - t0;
                out.entry(*i).and_modify(|e| *e = (*e).min(d)).or_insert(d);
            }
        }
        out
    }

    pub fn failures_between(&self, from: Instant, to: Instant) -> Vec<String> {
        lock(&self.failures)
            .iter()
            .filter(|(t, _)| *t >= from && *t <= to)
            .map(|(_, w)| w.clone())
            .collect()
    }

    pub fn job(&self, id: &str) -> (Vec<Instant>, Vec<Instant>) {
        lock(&self.jobs)
            .get(id)
            .map(|j| (j.received.clone(), j.acked.clone()))
            .unwrap_or_default()
    }

    pub fn acked_total(&self, ids: &[String]) -> usize {
        let jobs = lock(&self.jobs);
        ids.iter()
            .map(|id| jobs.get(id).map_or(0, |j| j.acked.len()))
            .sum()
    }
}

/// What every simulated agent needs to dial.
pub struct Dial {
    pub url: String,
    pub ca_pem: String,
}

/// Runs one simulated agent until `stop` turns true.
pub async fn run_agent(
    idx: usize,
    id: Arc<AgentIdentity>,
    dial: Arc<Dial>,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
) {
    let mut attempt = 0u32;
    // Bounded: the loop ends when `stop` turns true (the harness always sets
    // it), and every wait inside selects on it.
    loop {
        if *stop.borrow() {
            return;
        }
        let (welcomed, reason) = session(idx, &id, &dial, &stats, &mut stop).await;
        if *stop.borrow() {
            return;
        }
        stats.fail(reason);
        if welcomed {
            attempt = 0;
        }
        let wait = fleetcmd_agent::conn::backoff(attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stopped(&mut stop) => return,
        }
    }
}

fn metrics() -> pb::HostMetrics {
    // Shaped like a real agent's heartbeat (the controller keeps the last
    // one per agent in memory, so its size matters for RSS).
    pb::HostMetrics {
        cpu_percent: 3.5,
        load1: 0.12,
        load5: 0.10,
        load15: 0.05,
        mem_total_bytes: 8 << 30,
        mem_used_bytes: 2 << 30,
        swap_total_bytes: 0,
        swap_used_bytes: 0,
        uptime_secs: 86_400,
        process_count: 142,
        disks: ["/", "/boot", "/var"]
            .iter()
            .map(|m| pb::DiskUsage {
                mount: (*m).to_owned(),
                total_bytes: 100 << 30,
                available_bytes: 60 << 30,
            })
            .collect(),
    }
}

fn msg(m: Out) -> pb::AgentMessage {
    pb::AgentMessage { msg: Some(m) }
}

/// One connection; returns (welcomed, why it ended). Returns on stop too.
async fn session(
    idx: usize,
    id: &AgentIdentity,
    dial: &Dial,
    stats: &Stats,
    stop: &mut watch::Receiver<bool>,
) -> (bool, String) {
    let ep = match fleetcmd_proto::channel::endpoint(
        &dial.url,
        &dial.ca_pem,
        Some((&id.cert_pem, &id.key_pem)),
    ) {
        Ok(ep) => ep,
        Err(e) => return (false, format!("endpoint: {e}")),
    };
    let channel = tokio::select! {
        c = fleetcmd_proto::channel::open(&ep) => match c {
            Ok(c) => c,
            Err(e) => return (false, format!("connect: {e}")),
        },
        _ = stopped(stop) => return (false, "stopped".into()),
    };
    let mut client = pb::agent_stream_client::AgentStreamClient::new(channel)
        .max_decoding_message_size(4 * 1024 * 1024);
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(1024);
    let hello = pb::Hello {
        version: "bench".into(),
        hostname: id.name.clone(),
        // Labels come from the enrolment record; a default agent.toml
        // reports no facts.
        facts: Default::default(),
        policy_version: 0,
        allow: Vec::new(),
    };
    if tx.try_send(msg(Out::Hello(hello))).is_err() {
        return (false, "hello: queue".into());
    }
    let mut inbound = tokio::select! {
        r = client.connect(ReceiverStream::new(rx)) => match r {
            Ok(r) => r.into_inner(),
            Err(s) => return (false, format!("rpc: {:?}: {}", s.code(), s.message())),
        },
        _ = stopped(stop) => return (false, "stopped".into()),
    };
    let mut welcomed = false;
    let mut heartbeat = tokio::time::interval(Duration::from_secs(3600));
    let mut connected_guard = Connected::new(&stats.connected);
    loop {
        tokio::select! {
            _ = stopped(stop) => return (welcomed, "stopped".into()),
            _ = heartbeat.tick(), if welcomed => {
                let hb = pb::Heartbeat {
                    metrics: Some(metrics()),
                    policy_version: 1,
                    agent_time: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0),
                    policy_expired: false,
                    checks: Vec::new(),
                };
                if tx.try_send(msg(Out::Heartbeat(hb))).is_ok() {
                    stats.heartbeats.fetch_add(1, Ordering::Relaxed);
                }
            }
            m = inbound.message() => {
                let m = match m {
                    Ok(Some(m)) => m,
                    Ok(None) => return (welcomed, "stream closed by the controller".into()),
                    Err(s) => return (welcomed, format!("stream: {:?}: {}", s.code(), s.message())),
                };
                match m.msg {
                    Some(In::Welcome(w)) => {
                        welcomed = true;
                        connected_guard.set();
                        lock(&stats.welcomes).push((idx, Instant::now()));
                        // Spread heartbeats over the interval, as agents that
                        // connected at different times would be.
                        let every = Duration::from_secs(u64::from(w.heartbeat_secs.max(1)));
                        let phase = every.mul_f64((idx % 997) as f64 / 997.0);
                        heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + phase, every);
                    }
                    Some(In::Policy(_)) => {
                        stats.policies.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(In::Job(j)) => {
                        let now = Instant::now();
                        // Only to label the result; nothing is verified.
                        let job_id = fleetcmd_core::job::JobSpec::from_bytes(&j.spec)
                            .map(|s| s.id.to_string())
                            .unwrap_or_default();
                        lock(&stats.jobs).entry(job_id.clone()).or_default().received.push(now);
                        let result = pb::JobResult {
                            job_id: job_id.clone(),
                            outcome: pb::Outcome::Ok as i32,
                            exit_code: Some(0),
                            stdout: b" 12:00:00 up 1 day,  3:04,  0 users,  load average: 0.12, 0.10, 0.05\n".to_vec(),
                            duration_ms: 1,
                            ..Default::default()
                        };
                        stats.result_bytes.fetch_add(prost::Message::encoded_len(&result) as u64, Ordering::Relaxed);
                        let _ = tx.send(msg(Out::Started(pb::JobStarted { job_id }))).await;
                        if tx.send(msg(Out::Result(result))).await.is_ok() {
                            stats.results_sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Some(In::Ack(a)) => {
                        let now = Instant::now();
                        lock(&stats.jobs).entry(a.job_id).or_default().acked.push(now);
                    }
                    Some(In::Renew(_)) | Some(In::Cancel(_)) | None => {}
                }
            }
        }
    }
}

/// Counts connected (welcomed) streams; decrements when the session ends.
struct Connected<'a> {
    counter: &'a AtomicU64,
    set: bool,
}

impl<'a> Connected<'a> {
    fn new(counter: &'a AtomicU64) -> Self {
        Connected {
            counter,
            set: false,
        }
    }
    fn set(&mut self) {
        if !std::mem::replace(&mut self.set, true) {
            self.counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        if self.set {
            self.counter.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Resolves once the watch turns true (or its sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
