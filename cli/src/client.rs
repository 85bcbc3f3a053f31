//! Operator commands that talk to the controller: agents, tokens, run, job.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use fleetcmd_core::crypto::SigningKey;
use fleetcmd_core::ids::{Identity, JobId, SHORT_ID_ATTEMPTS, short_form};
use fleetcmd_core::job::{DEFAULT_EXPIRY_SECS, JobSpec, SignedJob};
use fleetcmd_core::policy::Policy;
use fleetcmd_core::state::{JobState, TargetState};
use fleetcmd_proto::channel::ClientTls;
use fleetcmd_proto::v1 as pb;
use tonic::transport::Channel;

use crate::{Conn, Failure, usage};

fn read(path: &std::path::Path, what: &str) -> Result<String, Failure> {
    std::fs::read_to_string(path).map_err(|e| usage(format!("{what} {}: {e}", path.display())))
}

/// The operator's identity: TLS material and name.
pub struct Operator {
    pub tls: ClientTls,
    pub name: String,
}

pub fn operator(conn: &Conn) -> Result<Operator, Failure> {
    let missing = |v: &str, f: &str| {
        usage(format!(
            "{f} is required (set {v} or pass {f}; `fleetcmd dev` writes DIR/env)"
        ))
    };
    let ca = conn
        .ca
        .as_ref()
        .ok_or_else(|| missing("FLEETCMD_CA", "--ca"))?;
    let cert = conn
        .cert
        .as_ref()
        .ok_or_else(|| missing("FLEETCMD_CERT", "--cert"))?;
    let key = conn
        .key
        .as_ref()
        .ok_or_else(|| missing("FLEETCMD_KEY", "--key"))?;
    let tls = ClientTls {
        ca_pem: read(ca, "CA")?,
        cert_pem: read(cert, "certificate")?,
        key_pem: read(key, "key")?,
    };
    let der = fleetcmd_controller::pki::pem_to_der(&tls.cert_pem)
        .ok_or_else(|| usage(format!("certificate {}: not PEM", cert.display())))?;
    let peer = fleetcmd_controller::pki::peer_from_cert(&der).ok_or_else(|| {
        usage(format!(
            "certificate {}: not a fleetcmd certificate",
            cert.display()
        ))
    })?;
    Ok(Operator {
        tls,
        name: peer.name,
    })
}

/// The operator's Ed25519 job signing key: `--signing-key`, else
/// `NAME.sign.key` beside `--key` (as `issue-cert` writes them), else
/// `--key` itself when it is Ed25519 (operator certificates issued before
/// TLS keys became ECDSA P-256 sign with their TLS key).
pub fn signing_key(conn: &Conn) -> Result<SigningKey, Failure> {
    let load = |path: &std::path::Path| {
        SigningKey::from_pkcs8_pem(&read(path, "signing key")?)
            .map_err(|e| usage(format!("signing key {}: {e}", path.display())))
    };
    if let Some(path) = &conn.signing_key {
        return load(path);
    }
    let key = conn.key.as_ref().ok_or_else(|| {
        usage("--signing-key is required (set FLEETCMD_SIGNING_KEY or pass --signing-key)")
    })?;
    let beside = key.with_extension("sign.key");
    if beside.exists() {
        return load(&beside);
    }
    SigningKey::from_pkcs8_pem(&read(key, "key")?).map_err(|_| {
        usage(format!(
            "no job signing key: {} is not Ed25519 (a TLS key) and {} does not exist; pass --signing-key or set FLEETCMD_SIGNING_KEY",
            key.display(),
            beside.display()
        ))
    })
}

pub async fn channel(conn: &Conn, op: &Operator) -> Result<Channel, Failure> {
    Ok(fleetcmd_proto::channel::connect(&conn.controller, &op.tls).await?)
}

pub(crate) fn status(s: tonic::Status) -> Failure {
    Failure {
        code: 1,
        error: anyhow::anyhow!("controller: {}", s.message()),
    }
}

pub async fn agents(conn: &Conn, selector: Option<&str>) -> Result<u8, Failure> {
    let mode = crate::term::Mode::from_conn(conn)?;
    let op = operator(conn)?;
    let mut c = pb::agents_client::AgentsClient::new(channel(conn, &op).await?);
    let list = c
        .list(pb::ListAgentsRequest {
            selector: selector.unwrap_or("").to_owned(),
        })
        .await
        .map_err(status)?
        .into_inner()
        .agents;
    let mut out = mode.stdout();
    writeln!(
        out,
        "{:<20} {:<8} {:>6} {:>6} {:<8} {:<12} LABELS  FACTS",
        "AGENT", "STATE", "LOAD1", "MEM%", "VERSION", "SEEN"
    )?;
    let now = now_ms();
    for a in list {
        let state = if a.revoked {
            "revoked"
        } else if a.online {
            "online"
        } else {
            "offline"
        };
        let (load, mem) = a
            .metrics
            .as_ref()
            .map(|m| {
                (
                    format!("{:.2}", m.load1),
                    format!(
                        "{:.0}",
                        100.0 * m.mem_used_bytes as f64 / m.mem_total_bytes.max(1) as f64
                    ),
                )
            })
            .unwrap_or(("-".into(), "-".into()));
        let pairs = |m: std::collections::HashMap<String, String>| {
            let sorted: BTreeMap<_, _> = m.into_iter().collect();
            let text = sorted
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            if text.is_empty() {
                "-".to_owned()
            } else {
                text
            }
        };
        // Granted labels (enrolment) and self-reported facts in separate
        // columns: facts grant nothing and no selector matches them.
        let (labels, facts) = (pairs(a.labels), pairs(a.facts));
        writeln!(
            out,
            "{:<20} {:<8} {:>6} {:>6} {:<8} {:<12} {labels}  {facts}",
            a.agent_id,
            state,
            load,
            mem,
            a.version,
            fleetcmd_core::when::relative(now, a.last_seen_ms)
        )?;
    }
    Ok(0)
}

pub async fn revoke(conn: &Conn, id: &str) -> Result<u8, Failure> {
    let op = operator(conn)?;
    let mut c = pb::agents_client::AgentsClient::new(channel(conn, &op).await?);
    c.revoke(pb::RevokeRequest {
        agent_id: id.to_owned(),
    })
    .await
    .map_err(status)?;
    println!("agent {id} revoked");
    Ok(0)
}

pub async fn token_create(
    conn: &Conn,
    labels: Option<String>,
    ttl: &str,
    uses: u32,
    name: Option<String>,
) -> Result<u8, Failure> {
    let labels = match labels.as_deref() {
        Some(l) => {
            fleetcmd_core::selector::parse_labels(l).map_err(|e| usage(format!("--labels: {e}")))?
        }
        None => BTreeMap::new(),
    };
    let ttl =
        fleetcmd_core::duration::parse_duration(ttl).map_err(|e| usage(format!("--ttl: {e}")))?;
    let op = operator(conn)?;
    let mut c = pb::tokens_client::TokensClient::new(channel(conn, &op).await?);
    let t = c
        .create(pb::CreateTokenRequest {
            labels: labels.into_iter().collect(),
            ttl_secs: ttl.as_secs(),
            uses,
            name: name.clone().unwrap_or_default(),
        })
        .await
        .map_err(status)?
        .into_inner();
    println!("{}", t.token);
    // The token in the environment, never in argv, as init's join files.
    eprintln!(
        "expires {}; on the host: {}",
        fleetcmd_core::when::stamp(now_ms(), t.expires_at.saturating_mul(1000)),
        crate::init::files::join_command(&conn.controller, name.as_deref(), &t.token)
    );
    Ok(0)
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Command name from the policy's allow-list.
    pub command: String,
    /// Arguments, in the order the command's `help` lists them.
    pub args: Vec<String>,
    /// Which agents: a label selector such as `role=web`, `name=web-*` or `all`.
    #[arg(long)]
    pub on: String,
    /// Timeout, e.g. `30s` (capped by the command's own timeout).
    #[arg(long)]
    pub timeout: Option<String>,
    /// At most N (or N%) targets running at once [default: 50].
    #[arg(long, value_name = "N|N%")]
    pub batch: Option<String>,
    /// Stop starting targets once more than N (or N%) failed
    /// [default: 0 for commands that need approval, unlimited otherwise].
    #[arg(long, value_name = "N|N%")]
    pub max_errors: Option<String>,
    /// Run on N targets first and go on only if they all succeed.
    #[arg(long, value_name = "N")]
    pub canary: Option<u32>,
    /// Show the targets, the argv each would run and any refusal; run nothing.
    #[arg(long)]
    pub dry_run: bool,
}

impl RunArgs {
    /// The signed rollout options, checked.
    pub fn rollout(&self) -> Result<fleetcmd_core::job::Rollout, Failure> {
        let limit = |flag: &str, v: &Option<String>| {
            v.as_deref()
                .map(fleetcmd_core::grammar::parse_limit)
                .transpose()
                .map_err(|e| usage(format!("{flag}: {e}")))
        };
        let batch = limit("--batch", &self.batch)?;
        if batch == Some(fleetcmd_core::grammar::Limit::Count(0)) {
            return Err(usage("--batch: must be at least 1"));
        }
        if self.canary == Some(0) {
            return Err(usage("--canary: must be at least 1"));
        }
        Ok(fleetcmd_core::job::Rollout {
            batch,
            max_errors: limit("--max-errors", &self.max_errors)?,
            canary: self.canary,
        })
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Unix milliseconds now, for rendering times (`fleetcmd_core::when`).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Fetches the policy to map positional arguments and find our signer id.
/// It is not trusted for anything else: the agents verify the bundle.
async fn fetch_policy(ch: Channel) -> Result<Policy, Failure> {
    let info = pb::policy_client::PolicyClient::new(ch)
        .get(pb::GetPolicyRequest {})
        .await
        .map_err(status)?
        .into_inner();
    let bundle = info.policy.map(|p| p.bundle).unwrap_or_default();
    let text = String::from_utf8(bundle)
        .map_err(|_| anyhow::anyhow!("controller's policy is not UTF-8"))?;
    Policy::parse(&text)
        .map_err(|e| anyhow::anyhow!("controller's policy does not parse: {e}").into())
}

/// What to run, as the operator typed it.
#[derive(Debug, Clone)]
pub struct JobRequest<'a> {
    pub command: &'a str,
    pub args: &'a [String],
    pub selector: &'a str,
    pub timeout: Option<Duration>,
    pub rollout: fleetcmd_core::job::Rollout,
}

/// Checks the request against the policy and signs it as job `id`.
pub fn build_job(
    policy: &Policy,
    key: &SigningKey,
    requester: Identity,
    req: &JobRequest<'_>,
    id: JobId,
) -> Result<SignedJob, Failure> {
    let &JobRequest {
        command,
        args,
        selector,
        timeout,
        rollout,
    } = req;
    let def = policy
        .command(command)
        .ok_or_else(|| usage(format!("`{command}` is not in the policy's allow-list")))?;
    let values =
        fleetcmd_core::argv::bind_positional(def, args).map_err(|e| usage(e.to_string()))?;
    fleetcmd_core::argv::build_argv(def, &values).map_err(|e| usage(e.to_string()))?;
    fleetcmd_core::selector::Selector::parse(selector).map_err(|e| usage(format!("--on: {e}")))?;
    let me = key.public_key();
    let signer = policy
        .signers
        .iter()
        .find(|s| s.public_key == me)
        .ok_or_else(|| {
            usage(format!(
                "your key ({me}) is not a [[signers]] entry of policy version {}",
                policy.version
            ))
        })?;
    let now = now();
    let spec = JobSpec {
        id,
        command: command.to_owned(),
        args: values,
        selector: selector.to_owned(),
        requester,
        channel: "cli".into(),
        approvals: Vec::new(),
        unattested_approvers: Vec::new(),
        timeout_secs: timeout.map(|t| t.as_secs()).unwrap_or(0),
        not_before: now,
        expires_at: now + DEFAULT_EXPIRY_SECS,
        rollout,
    };
    Ok(SignedJob::sign(&spec, &signer.id, key))
}

/// A fresh job id: a version 7 UUID (time-ordered, 74 random bits).
pub fn new_job_id() -> Result<JobId, Failure> {
    JobId::from_uuid_v7_bytes(*uuid::Uuid::now_v7().as_bytes())
        .map_err(|e| anyhow::anyhow!("job id: {e}").into())
}

/// Submits the job `sign` makes for the first id of `ids`, and signs it
/// again for the next one while the controller answers ABORTED: that job's
/// short id names a stored job already (48 random bits: it hardly ever
/// happens, but a short id must name one job). Any other refusal, and
/// ALREADY_EXISTS (a replay) above all, is returned as it is.
pub async fn submit_fresh(
    jobs: &mut pb::jobs_client::JobsClient<Channel>,
    ids: impl IntoIterator<Item = JobId>,
    sign: impl Fn(JobId) -> Result<SignedJob, Failure>,
) -> Result<pb::SubmitResponse, Failure> {
    let mut last = None;
    for id in ids.into_iter().take(SHORT_ID_ATTEMPTS) {
        let job = sign(id)?;
        match jobs
            .submit(pb::SignedJob {
                spec: job.spec,
                signature: job.signature,
                key_id: job.key_id,
            })
            .await
        {
            Ok(sub) => return Ok(sub.into_inner()),
            Err(s) if s.code() == tonic::Code::Aborted => last = Some(s),
            Err(s) => return Err(status(s)),
        }
    }
    Err(last.map_or_else(
        || anyhow::anyhow!("no job id to submit with").into(),
        status,
    ))
}

/// Whether the job has ended (a state this CLI does not know is not an end).
pub fn is_finished(job: &pb::Job) -> bool {
    job.current_state().is_some_and(JobState::is_terminal)
}

/// Whether the target has ended.
fn target_ended(t: &pb::Target) -> bool {
    t.current_state().is_some_and(TargetState::is_terminal)
}

fn target_ok(t: &pb::Target) -> bool {
    t.current_state() == Some(TargetState::Ok)
}

pub async fn run(conn: &Conn, args: RunArgs) -> Result<u8, Failure> {
    // A bad flag is a usage error before anything is loaded or dialled.
    let timeout = args
        .timeout
        .as_deref()
        .map(fleetcmd_core::duration::parse_job_timeout)
        .transpose()
        .map_err(|e| usage(format!("--timeout: {e}")))?;
    let mode = crate::term::Mode::from_conn(conn)?;
    let op = operator(conn)?;
    let ch = channel(conn, &op).await?;
    let policy = fetch_policy(ch.clone()).await?;
    let requester = Identity::parse(&format!("cli:{}", op.name))
        .map_err(|e| usage(format!("certificate name: {e}")))?;
    let rollout = args.rollout()?;
    if args.dry_run {
        return dry_run(ch, &policy, &args, mode).await;
    }
    let key = signing_key(conn)?;
    let req = JobRequest {
        command: &args.command,
        args: &args.args,
        selector: &args.on,
        timeout,
        rollout,
    };
    // Checked once, so a refusal is not repeated for each id.
    build_job(&policy, &key, requester.clone(), &req, new_job_id()?)?;
    let mut jobs = pb::jobs_client::JobsClient::new(ch);
    let sub = submit_fresh(&mut jobs, std::iter::from_fn(|| new_job_id().ok()), |id| {
        build_job(&policy, &key, requester.clone(), &req, id)
    })
    .await?;
    eprintln!(
        "job {} on {} agent(s)",
        short_form(&sub.job_id),
        sub.targets.len()
    );
    let (job, complete) = follow(&mut jobs, &sub.job_id, mode).await?;
    // Live output already printed what arrived; print the stored output
    // only if some of it was missed.
    print_job(&mut mode.stdout(), &job, !complete)?;
    Ok(if job.current_state() == Some(JobState::Succeeded) {
        0
    } else {
        1
    })
}

/// Jobs that finish sooner show no progress line.
pub const PROGRESS_AFTER: Duration = Duration::from_secs(2);
/// How often the progress line is redrawn while nothing happens.
const PROGRESS_TICK: Duration = Duration::from_secs(1);

/// The terminal progress line of a job followed for `elapsed`:
/// `3/10 done, 1 failed, 12 s` (the words of chat's edited message), or
/// nothing before [`PROGRESS_AFTER`] or while the targets are not known.
pub fn progress_line(
    done: usize,
    total: usize,
    failed: usize,
    elapsed: Duration,
) -> Option<String> {
    (elapsed >= PROGRESS_AFTER && total > 0).then(|| {
        fleetcmd_gateway::render::progress_text(
            done,
            total,
            failed,
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
        )
    })
}

/// Follows a job with `Watch`, printing each host's output lines as they
/// arrive (`host: line`), with a progress line on a terminal. Returns the
/// finished job and whether every chunk arrived.
pub async fn follow(
    jobs: &mut pb::jobs_client::JobsClient<Channel>,
    id: &str,
    mode: crate::term::Mode,
) -> Result<(pb::Job, bool), Failure> {
    use pb::job_event::Event;
    use std::collections::HashMap;
    use std::io::IsTerminal;
    let mut stream = match jobs
        .watch(pb::WatchJobRequest {
            job_id: id.to_owned(),
        })
        .await
    {
        Ok(s) => s.into_inner(),
        // An older controller without Watch: poll.
        Err(_) => return Ok((wait(jobs, id, Duration::from_secs(24 * 3600)).await?, false)),
    };
    let tty = std::io::stderr().is_terminal();
    let mut partial: HashMap<(String, u32), Vec<u8>> = HashMap::new();
    let mut seqs: HashMap<String, u64> = HashMap::new();
    let (mut total, mut done, mut failed) = (0usize, 0usize, 0usize);
    let mut complete = true;
    let mut out = mode.stdout();
    let line_prefix = |host: &str, stream: u32| {
        if stream == 2 {
            format!("{host} (stderr): ")
        } else {
            format!("{host}: ")
        }
    };
    let start = Instant::now();
    loop {
        let ev = match tokio::time::timeout(PROGRESS_TICK, stream.message()).await {
            // Nothing new: the progress line's clock still moves.
            Err(_) => None,
            Ok(Ok(Some(ev))) => Some(ev),
            Ok(Ok(None)) => break,
            Ok(Err(_)) => {
                complete = false;
                break;
            }
        };
        match ev.and_then(|ev| ev.event) {
            Some(Event::Job(j)) => {
                total = j.targets.len();
                let ended: Vec<_> = j.targets.iter().filter(|t| target_ended(t)).collect();
                done = ended.len();
                failed = ended.iter().filter(|t| !target_ok(t)).count();
                if is_finished(&j) {
                    break;
                }
            }
            Some(Event::Chunk(c)) => {
                let last = seqs.entry(c.agent_id.clone()).or_insert(0);
                if c.seq != *last + 1 {
                    complete = false;
                }
                *last = c.seq;
                let buf = partial.entry((c.agent_id.clone(), c.stream)).or_default();
                buf.extend_from_slice(&c.data);
                while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=nl).collect();
                    if tty {
                        eprint!("\r\x1b[K");
                    }
                    write!(out, "{}", line_prefix(&c.agent_id, c.stream))?;
                    out.write_all(&line)?;
                    out.flush()?;
                }
            }
            Some(Event::Target(t)) if target_ended(&t) => {
                done += 1;
                if !target_ok(&t) {
                    failed += 1;
                }
            }
            Some(Event::Target(_)) => {}
            Some(Event::Missed(n)) => {
                complete = false;
                eprintln!("[{n} live event(s) missed; the stored output follows]");
                out.flush()?;
            }
            None => {}
        }
        if tty && let Some(line) = progress_line(done, total, failed, start.elapsed()) {
            eprint!("\r\x1b[K{line}");
        }
    }
    if tty {
        eprint!("\r\x1b[K");
    }
    for ((host, stream), rest) in partial {
        if !rest.is_empty() {
            write!(out, "{}", line_prefix(&host, stream))?;
            out.write_all(&rest)?;
            writeln!(out)?;
        }
    }
    let job = wait(jobs, id, Duration::from_secs(30)).await?;
    Ok((job, complete))
}

/// `--dry-run`: resolves the targets and shows, per host, the argv it would
/// run or why it would refuse — and submits nothing.
async fn dry_run(
    ch: Channel,
    policy: &Policy,
    args: &RunArgs,
    mode: crate::term::Mode,
) -> Result<u8, Failure> {
    let def = policy.command(&args.command).ok_or_else(|| {
        usage(format!(
            "`{}` is not in the policy's allow-list",
            args.command
        ))
    })?;
    let values =
        fleetcmd_core::argv::bind_positional(def, &args.args).map_err(|e| usage(e.to_string()))?;
    let argv = fleetcmd_core::argv::build_argv(def, &values).map_err(|e| usage(e.to_string()))?;
    let agents = pb::agents_client::AgentsClient::new(ch)
        .list(pb::ListAgentsRequest {
            selector: args.on.clone(),
        })
        .await
        .map_err(status)?
        .into_inner()
        .agents;
    let mut out = mode.stdout();
    let shown: Vec<String> = argv.iter().map(|a| format!("{a:?}")).collect();
    let mut would_run = 0;
    for a in &agents {
        let labels: std::collections::BTreeMap<String, String> =
            a.labels.clone().into_iter().collect();
        let refusal = if a.revoked {
            Some("revoked".to_string())
        } else if !def
            .targets
            .as_ref()
            .is_none_or(|t| t.matches(&a.agent_id, &labels))
        {
            Some(format!(
                "`{}` may only run on `{}`",
                def.name,
                def.targets
                    .as_ref()
                    .map(|t| t.to_string())
                    .unwrap_or_default()
            ))
        } else if !a.online {
            Some("offline".to_string())
        } else {
            None
        };
        match refusal {
            None => {
                would_run += 1;
                writeln!(out, "{}: would run [{}]", a.agent_id, shown.join(", "))?;
            }
            Some(r) => writeln!(out, "{}: would not run: {r}", a.agent_id)?,
        }
    }
    writeln!(
        out,
        "dry run: `{}` on {}: {would_run} of {} matching agent(s) would run it; nothing was submitted",
        args.command,
        args.on,
        agents.len()
    )?;
    Ok(0)
}

/// `fleetcmd cancel ID`.
pub async fn cancel(conn: &Conn, id: &str) -> Result<u8, Failure> {
    let mode = crate::term::Mode::from_conn(conn)?;
    let op = operator(conn)?;
    let mut jobs = pb::jobs_client::JobsClient::new(channel(conn, &op).await?);
    let job = jobs
        .cancel(pb::CancelJobRequest {
            job_id: id.to_owned(),
            requested_by: String::new(),
        })
        .await
        .map_err(status)?
        .into_inner();
    let job = wait(&mut jobs, &job.job_id, Duration::from_secs(30)).await?;
    print_job(&mut mode.stdout(), &job, false)?;
    Ok(0)
}

/// `fleetcmd jobs [--mine] [--state S]`.
pub async fn jobs(
    conn: &Conn,
    mine: bool,
    state: Option<String>,
    limit: u32,
) -> Result<u8, Failure> {
    let mode = crate::term::Mode::from_conn(conn)?;
    let op = operator(conn)?;
    let mut jobs = pb::jobs_client::JobsClient::new(channel(conn, &op).await?);
    let list = jobs
        .list(pb::ListJobsRequest {
            limit,
            requester: if mine {
                format!("cli:{}", op.name)
            } else {
                String::new()
            },
            state: state.unwrap_or_default(),
        })
        .await
        .map_err(status)?
        .into_inner()
        .jobs;
    let mut out = mode.stdout();
    writeln!(
        out,
        "{:<12}  {:<10} {:>7}  {:<12} {:<10}  {:<12} {:<20} REQUESTER",
        "JOB", "STATE", "OK", "AGE", "DURATION", "COMMAND", "SELECTOR"
    )?;
    let now = now_ms();
    for j in list {
        let ok = j.targets.iter().filter(|t| target_ok(t)).count();
        let ratio = format!("{ok}/{}", j.targets.len());
        let (age, duration) = fleetcmd_gateway::render::age_and_duration(&j, now);
        writeln!(
            out,
            "{:<12}  {:<10} {:>7}  {:<12} {:<10}  {:<12} {:<20} {}",
            short_form(&j.job_id),
            j.state,
            ratio,
            age,
            duration,
            j.command,
            j.selector,
            j.requester
        )?;
    }
    Ok(0)
}

/// `fleetcmd job output ID [HOST]`: the full stored output, unprefixed.
pub async fn job_output(conn: &Conn, id: &str, host: Option<&str>) -> Result<u8, Failure> {
    let mode = crate::term::Mode::from_conn(conn)?;
    let op = operator(conn)?;
    let mut jobs = pb::jobs_client::JobsClient::new(channel(conn, &op).await?);
    let job = jobs
        .get(pb::GetJobRequest {
            job_id: id.to_owned(),
        })
        .await
        .map_err(status)?
        .into_inner();
    let targets: Vec<_> = job
        .targets
        .iter()
        .filter(|t| host.is_none_or(|h| t.agent_id == h))
        .collect();
    if targets.is_empty() {
        return Err(usage(format!(
            "job {} has no host {}",
            short_form(&job.job_id),
            host.unwrap_or("")
        )));
    }
    let mut out = mode.stdout();
    for t in targets {
        let r = t.result.clone().unwrap_or_default();
        if host.is_none() {
            writeln!(out, "==> {} ({}) <==", t.agent_id, t.state)?;
        }
        out.write_all(&r.stdout)?;
        out.flush()?;
        if !r.stderr.is_empty() {
            mode.stderr().write_all(&r.stderr)?;
        }
        if r.stdout_dropped + r.stderr_dropped > 0 {
            eprintln!(
                "{}: {} bytes were dropped over the agent's output cap",
                fleetcmd_core::terminal::escape(&t.agent_id),
                r.stdout_dropped + r.stderr_dropped
            );
        }
    }
    Ok(0)
}

pub async fn wait(
    jobs: &mut pb::jobs_client::JobsClient<Channel>,
    id: &str,
    limit: Duration,
) -> Result<pb::Job, Failure> {
    let start = Instant::now();
    loop {
        let job = jobs
            .get(pb::GetJobRequest {
                job_id: id.to_owned(),
            })
            .await
            .map_err(status)?
            .into_inner();
        if is_finished(&job) || start.elapsed() > limit {
            return Ok(job);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn job(conn: &Conn, id: &str) -> Result<u8, Failure> {
    let mode = crate::term::Mode::from_conn(conn)?;
    let op = operator(conn)?;
    let mut jobs = pb::jobs_client::JobsClient::new(channel(conn, &op).await?);
    let job = jobs
        .get(pb::GetJobRequest {
            job_id: id.to_owned(),
        })
        .await
        .map_err(status)?
        .into_inner();
    print_summary(&mut mode.stdout(), &job, now_ms())?;
    Ok(0)
}

/// `fleetcmd job ID`: counts by state and times, then each host failures
/// first with the first lines of its output (not all of it: `fleetcmd job
/// output ID [HOST]` has that), then the summary line `run` ends with.
pub fn print_summary(out: &mut impl Write, job: &pb::Job, now_ms: u64) -> std::io::Result<()> {
    use fleetcmd_gateway::render;
    let short = short_form(&job.job_id);
    writeln!(out, "{}", render::job_times(job, now_ms))?;
    writeln!(out, "{}", render::state_counts(job))?;
    if !is_finished(job) {
        writeln!(out, "progress: {}", render::progress(job, now_ms))?;
    }
    let mut cut = false;
    for t in render::failures_first(job) {
        let Some(r) = &t.result else {
            writeln!(out, "==> {} ({})", t.agent_id, t.state)?;
            continue;
        };
        writeln!(
            out,
            "==> {} ({}, {})",
            t.agent_id,
            t.state,
            render::outcome_detail(r)
        )?;
        let mut more = 0;
        for (prefix, bytes) in [("", &r.stdout), ("(stderr) ", &r.stderr)] {
            let (text, left) = render::first_lines(bytes, render::SUMMARY_LINES);
            more += left;
            for line in text.lines() {
                writeln!(out, "{}: {prefix}{line}", t.agent_id)?;
            }
        }
        if more > 0 {
            cut = true;
            writeln!(
                out,
                "{}: … {more} more line{}",
                t.agent_id,
                if more == 1 { "" } else { "s" }
            )?;
        }
    }
    if !job.reason.is_empty() {
        writeln!(out, "{}", job.reason)?;
    }
    let ok = job.targets.iter().filter(|t| target_ok(t)).count();
    writeln!(
        out,
        "job {short} `{}` on {}: {} ({ok}/{} ok), asked by {}",
        job.command,
        job.selector,
        job.state,
        job.targets.len(),
        job.requester
    )?;
    if cut {
        writeln!(out, "full output: fleetcmd job output {short} [HOST]")?;
    }
    Ok(())
}

/// Prints each host's output prefixed by the host, then a summary line,
/// to `out` (an escaping writer from `term::Mode`).
pub fn print_job(out: &mut impl Write, job: &pb::Job, with_output: bool) -> std::io::Result<()> {
    let ok = job.targets.iter().filter(|t| target_ok(t)).count();
    for t in &job.targets {
        let r = t.result.clone().unwrap_or_default();
        if with_output {
            for line in String::from_utf8_lossy(&r.stdout).lines() {
                writeln!(out, "{}: {line}", t.agent_id)?;
            }
            for line in String::from_utf8_lossy(&r.stderr).lines() {
                writeln!(out, "{} (stderr): {line}", t.agent_id)?;
            }
            if r.stdout_dropped + r.stderr_dropped > 0 {
                writeln!(
                    out,
                    "{}: [output truncated: {} bytes dropped]",
                    t.agent_id,
                    r.stdout_dropped + r.stderr_dropped
                )?;
            }
        }
        if !target_ok(t) {
            let why = if r.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", r.reason)
            };
            writeln!(out, "{}: [{}{why}]", t.agent_id, t.state)?;
        }
    }
    if !job.reason.is_empty() {
        writeln!(out, "{}", job.reason)?;
    }
    writeln!(
        out,
        "job {} `{}` on {}: {} ({ok}/{} ok), asked by {}",
        short_form(&job.job_id),
        job.command,
        job.selector,
        job.state,
        job.targets.len(),
        job.requester
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(key: Option<&std::path::Path>, signing_key: Option<&std::path::Path>) -> Conn {
        Conn {
            controller: String::new(),
            ca: None,
            cert: None,
            key: key.map(Into::into),
            signing_key: signing_key.map(Into::into),
            raw: false,
        }
    }

    #[test]
    fn job_summary_shows_failures_first_and_the_first_lines_with_the_way_to_the_rest() {
        let target = |host: &str, state: TargetState, lines: usize| {
            let result = pb::JobResult {
                exit_code: Some(i32::from(state != TargetState::Ok)),
                stdout: (1..=lines)
                    .map(|i| format!("{host} line {i}\n"))
                    .collect::<String>()
                    .into_bytes(),
                duration_ms: 1_500,
                ..Default::default()
            };
            pb::Target::new(host.into(), state, Some(result))
        };
        let mut job = pb::Job {
            job_id: "01890a5d-ac96-774b-bcce-b302099a8057".into(),
            command: "df".into(),
            selector: "all".into(),
            requester: "cli:admin".into(),
            // 2026-12-06T05:52:33Z
            created_at_ms: 1_796_536_353_000,
            targets: vec![
                target("web-1", TargetState::Ok, 9),
                target("web-2", TargetState::Failed, 2),
            ],
            ..Default::default()
        };
        job.set_state(JobState::Failed);
        let mut out = Vec::new();
        print_summary(&mut out, &job, 1_796_536_353_000 + 65_000).expect("write");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "created 2026-12-06T05:52:33Z (1 min ago), slowest host 1.5 s\n\
             1 failed, 1 ok\n\
             ==> web-2 (failed, exit 1, 1.5 s)\n\
             web-2: web-2 line 1\n\
             web-2: web-2 line 2\n\
             ==> web-1 (ok, exit 0, 1.5 s)\n\
             web-1: web-1 line 1\n\
             web-1: web-1 line 2\n\
             web-1: web-1 line 3\n\
             web-1: web-1 line 4\n\
             web-1: web-1 line 5\n\
             web-1: … 4 more lines\n\
             job b302099a8057 `df` on all: failed (1/2 ok), asked by cli:admin\n\
             full output: fleetcmd job output b302099a8057 [HOST]\n"
        );
    }

    #[test]
    fn the_progress_line_waits_a_few_seconds_then_counts_and_times() {
        let at = |secs| Duration::from_secs(secs);
        assert_eq!(
            progress_line(1, 3, 0, at(1)),
            None,
            "a short job shows none"
        );
        assert_eq!(progress_line(0, 0, 0, at(5)), None, "targets not known yet");
        assert_eq!(
            progress_line(2, 3, 1, at(12)).as_deref(),
            Some("2/3 done, 1 failed, 12 s")
        );
        assert_eq!(
            progress_line(9, 10, 0, at(185)).as_deref(),
            Some("9/10 done, 0 failed, 3 min")
        );
    }

    #[test]
    fn the_signing_key_is_the_flag_else_beside_the_key_else_an_ed25519_key_itself() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, pem: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, pem).expect("write");
            p
        };
        let ed = |name: &str| {
            let pem = fleetcmd_controller::pki::new_signing_key_pem().expect("key");
            let key = SigningKey::from_pkcs8_pem(pem.expose()).expect("ed25519");
            (write(name, pem.expose()), key.public_key())
        };
        let p256 = |name: &str| {
            let key = fleetcmd_controller::pki::new_key().expect("key");
            write(name, &key.serialize_pem())
        };
        let public = |c: &Conn| {
            signing_key(c)
                .map(|k| k.public_key())
                .map_err(|f| f.error.to_string())
        };

        // issue-cert's files: NAME.key (P-256) and NAME.sign.key beside it.
        let tls = p256("alice.key");
        let (_, beside) = ed("alice.sign.key");
        assert_eq!(public(&conn(Some(&tls), None)), Ok(beside));
        // --signing-key wins.
        let (flag_path, flag) = ed("other.pem");
        assert_eq!(public(&conn(Some(&tls), Some(&flag_path))), Ok(flag));
        // An operator key from before P-256 signs with itself.
        let (old_path, old) = ed("old.key");
        assert_eq!(public(&conn(Some(&old_path), None)), Ok(old));
        // A P-256 key alone signs nothing, and the error says what to do.
        let lone = p256("bob.key");
        let err = public(&conn(Some(&lone), None)).expect_err("no signing key");
        assert!(
            err.contains("bob.key is not Ed25519")
                && err.contains("bob.sign.key does not exist")
                && err.contains("--signing-key"),
            "{err}"
        );
        // A signing key that is not Ed25519 is named.
        let err = public(&conn(Some(&tls), Some(&lone))).expect_err("not Ed25519");
        assert!(
            err.starts_with(&format!("signing key {}: ", lone.display())),
            "{err}"
        );
    }
}
