//! Simulated agents: minimal clients of `AgentStream.Connect`, one mTLS
//! connection each. They are load generators, not agents: they send Hello,
//! heartbeats with realistic metrics, and answer every `SignedJob` with
//! `JobStarted` + a `JobResult` OK, verifying nothing (no signature, policy
//! or selector check, no process is started).
//!
//! What they do as the real agent does (agent/src/conn.rs), because the
//! controller's delivery guarantees are measured against it:
//! - reconnect with the agent's backoff (`fleetcmd_agent::conn::backoff`),
//!   dialling the next controller of their list after every ended or
//!   failed connection (`fleetcmd_agent::controllers::Rotation`);
//! - remember every job id they admitted: a job delivered again while it
//!   runs is ignored, one whose result is not acknowledged yet is answered
//!   with that stored result, and any other is refused as `replayed`
//!   (counted in [`Stats::replays_refused`]); so a job is never run twice;
//! - keep each result until the controller's `ResultAck` and send every
//!   unacknowledged one again after each `Welcome` (on whichever controller).
//!
//! A simulated job answers at once, or after `Dial::job_time` scaled by the
//! agent's index (so results of one fan-out arrive over that window).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetcmd_agent::controllers::{Controllers, Rotation};
use fleetcmd_proto::v1 as pb;
use pb::agent_message::Msg as Out;
use pb::controller_message::Msg as In;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;

/// TLS identity of one simulated agent.
pub struct AgentIdentity {
    pub name: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Issues an agent identity per name from the fleet CA (valid a week), on
/// all cores: joining thousands through `Enrollment.Join` would dominate a
/// run. The names must also be registered in the store (`put_agent`).
pub fn issue_identities(
    ca: &fleetcmd_controller::pki::Ca,
    names: &[String],
) -> anyhow::Result<Vec<AgentIdentity>> {
    use fleetcmd_controller::pki::Role;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = names.len().div_ceil(threads).max(1);
    let ttl = Duration::from_secs(7 * 86400);
    std::thread::scope(|s| {
        let handles: Vec<_> = names
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || -> anyhow::Result<Vec<AgentIdentity>> {
                    part.iter()
                        .map(|name| {
                            let id = ca.issue_identity(Role::Agent, name, ttl)?;
                            Ok(AgentIdentity {
                                name: name.clone(),
                                cert_pem: id.cert_pem,
                                key_pem: id.key_pem.expose().clone(),
                            })
                        })
                        .collect()
                })
            })
            .collect();
        let mut out = Vec::with_capacity(names.len());
        for h in handles {
            out.extend(
                h.join()
                    .map_err(|_| anyhow::anyhow!("issuing thread panicked"))??,
            );
        }
        Ok(out)
    })
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
    /// (agent index, controller index in `Dial::urls`, when) for every
    /// `Welcome` received.
    pub welcomes: Mutex<Vec<(usize, usize, Instant)>>,
    /// (when, what) for every failed connection attempt or broken stream.
    pub failures: Mutex<Vec<(Instant, String)>>,
    /// Agent index → the controller (index in `Dial::urls`) it is
    /// connected to now (welcomed and the stream not ended).
    pub on: Mutex<HashMap<usize, usize>>,
    pub connected: AtomicU64,
    pub policies: AtomicU64,
    pub heartbeats: AtomicU64,
    pub results_sent: AtomicU64,
    pub result_bytes: AtomicU64,
    /// Jobs run (admitted: a job id not seen before by that agent).
    pub executions: AtomicU64,
    /// Jobs delivered again after their result was acknowledged: the real
    /// agent refuses these as `replayed`; a controller that sends one sent
    /// a finished target twice.
    pub replays_refused: AtomicU64,
    /// Jobs delivered again before their result was acknowledged, answered
    /// with the stored result (the real agent does the same).
    pub redelivered: AtomicU64,
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
        for (i, _, t) in lock(&self.welcomes).iter() {
            if *t >= t0 {
                let d = *t - t0;
                out.entry(*i).and_modify(|e| *e = (*e).min(d)).or_insert(d);
            }
        }
        out
    }

    /// Agent index → the controller index it is connected to now.
    pub fn connected_to(&self) -> HashMap<usize, usize> {
        lock(&self.on).clone()
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

/// What every simulated agent needs to dial, and how its jobs behave.
pub struct Dial {
    /// The controllers, in the order every agent tries them (an agent
    /// starts at `urls[index % len]`, so a fleet spreads over them).
    pub urls: Vec<String>,
    pub ca_pem: String,
    /// Zero: a job's result is sent at once. Otherwise agent `i` answers
    /// after `job_time × (i mod 100) / 100`.
    pub job_time: Duration,
}

impl Dial {
    /// One controller, jobs answered at once.
    pub fn one(url: String, ca_pem: String) -> Dial {
        Dial {
            urls: vec![url],
            ca_pem,
            job_time: Duration::ZERO,
        }
    }
}

/// One simulated agent's memory, kept across its connections (as the real
/// agent keeps its seen job ids and spooled results across reconnects).
#[derive(Default)]
struct Memory {
    /// Every job id admitted.
    seen: HashSet<String>,
    /// Admitted and not finished yet.
    running: HashSet<String>,
    /// Finished, result not acknowledged yet.
    pending: BTreeMap<String, pb::JobResult>,
    /// The current stream, when welcomed.
    out: Option<mpsc::Sender<pb::AgentMessage>>,
}

/// Runs one simulated agent until `stop` turns true.
pub async fn run_agent(
    idx: usize,
    id: Arc<AgentIdentity>,
    dial: Arc<Dial>,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
) {
    // Agent `idx` lists controller `idx % n` first, as `fleetcmd dev`
    // writes the lists of its agents.
    let mut urls = dial.urls.clone();
    let first = idx % urls.len().max(1);
    urls.rotate_left(first);
    let Ok(list) = Controllers::parse("urls", &urls) else {
        stats.fail(format!("bad controller list {:?}", dial.urls));
        return;
    };
    let mut rotation = Rotation::new(list, &id.name);
    let memory = Arc::new(Mutex::new(Memory::default()));
    // Simulated jobs still running; aborted when the agent stops.
    let mut jobs = JoinSet::new();
    let mut attempt = 0u32;
    // Bounded: the loop ends when `stop` turns true (the harness always sets
    // it), and every wait inside selects on it.
    loop {
        if *stop.borrow() {
            return;
        }
        let url = rotation.current().to_owned();
        let on = dial.urls.iter().position(|u| *u == url).unwrap_or(0);
        let ctx = Session {
            idx,
            on,
            id: &id,
            dial: &dial,
            stats: &stats,
            memory: &memory,
        };
        let (welcomed, reason) = session(&ctx, &url, &mut stop, &mut jobs).await;
        lock(&memory).out = None;
        lock(&stats.on).remove(&idx);
        if *stop.borrow() {
            return;
        }
        stats.fail(reason);
        if welcomed {
            attempt = 0;
        }
        let wait = fleetcmd_agent::conn::backoff(attempt);
        attempt = attempt.saturating_add(1);
        rotation.advance();
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

/// What one connection of one agent works with.
struct Session<'a> {
    idx: usize,
    /// Index of the controller dialled, in `Dial::urls`.
    on: usize,
    id: &'a AgentIdentity,
    dial: &'a Dial,
    stats: &'a Arc<Stats>,
    memory: &'a Arc<Mutex<Memory>>,
}

/// What an agent does with a delivered job (agent/src/conn.rs `handle_job`).
enum Admit {
    /// Not seen before: run it.
    Run,
    /// Seen and still running: its result will follow.
    Running,
    /// Seen, result not acknowledged: send that result again.
    Resend(pb::JobResult),
    /// Seen and acknowledged: refused as a replay.
    Replayed,
}

fn admit(memory: &Mutex<Memory>, job_id: &str) -> Admit {
    let mut m = lock(memory);
    if m.seen.insert(job_id.to_owned()) {
        m.running.insert(job_id.to_owned());
        return Admit::Run;
    }
    if m.running.contains(job_id) {
        Admit::Running
    } else if let Some(r) = m.pending.get(job_id) {
        Admit::Resend(r.clone())
    } else {
        Admit::Replayed
    }
}

/// A job ends: its result is kept until acknowledged and sent on the
/// current stream, if there is one (else after the next `Welcome`).
async fn finish(memory: &Mutex<Memory>, stats: &Stats, job_id: String) {
    let result = pb::JobResult {
        job_id: job_id.clone(),
        outcome: pb::Outcome::Ok as i32,
        exit_code: Some(0),
        stdout: b" 12:00:00 up 1 day,  3:04,  0 users,  load average: 0.12, 0.10, 0.05\n".to_vec(),
        duration_ms: 1,
        ..Default::default()
    };
    stats.result_bytes.fetch_add(
        prost::Message::encoded_len(&result) as u64,
        Ordering::Relaxed,
    );
    let out = {
        let mut m = lock(memory);
        m.running.remove(&job_id);
        m.pending.insert(job_id, result.clone());
        m.out.clone()
    };
    if let Some(tx) = out
        && tx.send(msg(Out::Result(result))).await.is_ok()
    {
        stats.results_sent.fetch_add(1, Ordering::Relaxed);
    }
}

/// One connection; returns (welcomed, why it ended). Returns on stop too.
async fn session(
    cx: &Session<'_>,
    url: &str,
    stop: &mut watch::Receiver<bool>,
    jobs: &mut JoinSet<()>,
) -> (bool, String) {
    let (idx, id, stats) = (cx.idx, cx.id, cx.stats);
    let ep = match fleetcmd_proto::channel::endpoint(
        url,
        &cx.dial.ca_pem,
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
            // Finished simulated jobs (their results went out in `finish`).
            Some(_) = jobs.join_next(), if !jobs.is_empty() => {}
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
                        lock(&stats.welcomes).push((idx, cx.on, Instant::now()));
                        lock(&stats.on).insert(idx, cx.on);
                        // Spread heartbeats over the interval, as agents that
                        // connected at different times would be.
                        let every = Duration::from_secs(u64::from(w.heartbeat_secs.max(1)));
                        let phase = every.mul_f64((idx % 997) as f64 / 997.0);
                        heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + phase, every);
                        // Every unacknowledged result again, to whichever
                        // controller this is.
                        let unacked: Vec<pb::JobResult> = {
                            let mut m = lock(cx.memory);
                            m.out = Some(tx.clone());
                            m.pending.values().cloned().collect()
                        };
                        for r in unacked {
                            let _ = tx.send(msg(Out::Result(r))).await;
                        }
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
                        match admit(cx.memory, &job_id) {
                            Admit::Run => {
                                stats.executions.fetch_add(1, Ordering::Relaxed);
                                lock(&stats.jobs).entry(job_id.clone()).or_default().received.push(now);
                                let _ = tx.send(msg(Out::Started(pb::JobStarted { job_id: job_id.clone() }))).await;
                                let delay = cx.dial.job_time.mul_f64((idx % 100) as f64 / 100.0);
                                if delay.is_zero() {
                                    finish(cx.memory, stats, job_id).await;
                                } else {
                                    let (memory, stats) = (cx.memory.clone(), stats.clone());
                                    jobs.spawn(async move {
                                        tokio::time::sleep(delay).await;
                                        finish(&memory, &stats, job_id).await;
                                    });
                                }
                            }
                            Admit::Running => {
                                stats.redelivered.fetch_add(1, Ordering::Relaxed);
                            }
                            Admit::Resend(r) => {
                                stats.redelivered.fetch_add(1, Ordering::Relaxed);
                                let _ = tx.send(msg(Out::Result(r))).await;
                            }
                            Admit::Replayed => {
                                stats.replays_refused.fetch_add(1, Ordering::Relaxed);
                                let refused = pb::JobResult {
                                    job_id,
                                    outcome: pb::Outcome::Refused as i32,
                                    reason_code: "replayed".into(),
                                    reason: "job id already seen".into(),
                                    ..Default::default()
                                };
                                let _ = tx.send(msg(Out::Result(refused))).await;
                            }
                        }
                    }
                    Some(In::Ack(a)) => {
                        let now = Instant::now();
                        // Counted once per job and agent: an acknowledgement
                        // of a result sent again is not a second result.
                        if lock(cx.memory).pending.remove(&a.job_id).is_some() {
                            lock(&stats.jobs).entry(a.job_id).or_default().acked.push(now);
                        }
                    }
                    // Simulated agents run a job at once: they never ask a start check.
                    Some(In::Renew(_)) | Some(In::Cancel(_)) | Some(In::StartAnswer(_)) | None => {}
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

/// Waits until `cond` (over what the agents observed) holds, polling
/// every 20 ms, at most `limit`; whether it held.
pub async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

/// Resolves once the watch turns true (or its sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
