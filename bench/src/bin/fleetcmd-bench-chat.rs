//! `fleetcmd-bench-chat`: chat message → first output line, through the
//! gateway's router (what every adapter calls) with a real controller and a
//! real local agent in this process over mTLS on loopback (BENCHMARKS.md targets:
//! p50 < 5 ms, p99 < 25 ms), then gateway throughput with many chat users at
//! once. The command is `echo` (a real fork/exec on the agent).
//!
//! The clock starts when the message is handed to the router and stops when
//! a reply that contains the command's output line is posted or edited in —
//! as a chat user would see it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use fleetcmd_cli::fleet::{Fleet, FleetOptions};
use fleetcmd_core::ids::Identity;
use fleetcmd_gateway::adapters::{
    AdapterError, BoxFuture, ChatSender, Incoming, MessageRef, Reply,
};
use fleetcmd_gateway::controller::GrpcController;
use fleetcmd_gateway::router::Router;

#[derive(Parser, Debug)]
#[command(about = "chat message to first output line, and gateway throughput")]
struct Args {
    /// Sequential commands for the latency figure.
    #[arg(long, default_value_t = 300)]
    iterations: usize,
    /// Concurrent chat users for the throughput figure.
    #[arg(long, default_value_t = 100)]
    users: usize,
    /// Commands each user sends, one after the other.
    #[arg(long, default_value_t = 5)]
    per_user: usize,
}

/// Records when a reply containing `marker` first appears.
struct FirstLine {
    start: Instant,
    marker: String,
    seen: Mutex<Option<Duration>>,
    /// The first reply of any kind (the "job … N targets" header, posted
    /// once the controller accepted the job).
    first: Mutex<Option<Duration>>,
    last: Mutex<String>,
}

impl FirstLine {
    fn new(marker: String) -> FirstLine {
        FirstLine {
            start: Instant::now(),
            marker,
            seen: Mutex::new(None),
            first: Mutex::new(None),
            last: Mutex::new(String::new()),
        }
    }
    fn note(&self, reply: &Reply) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = reply.plain();
        self.first
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(|| self.start.elapsed());
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.is_none() && reply.plain().contains(&self.marker) {
            *seen = Some(self.start.elapsed());
        }
    }
    fn elapsed(&self) -> Option<Duration> {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ChatSender for FirstLine {
    fn send<'a>(
        &'a self,
        channel: &'a str,
        reply: Reply,
    ) -> BoxFuture<'a, Result<MessageRef, AdapterError>> {
        self.note(&reply);
        Box::pin(async move {
            Ok(MessageRef {
                channel: channel.to_string(),
                id: "1".into(),
            })
        })
    }
    fn edit<'a>(
        &'a self,
        _msg: &'a MessageRef,
        reply: Reply,
    ) -> BoxFuture<'a, Result<(), AdapterError>> {
        self.note(&reply);
        Box::pin(async { Ok(()) })
    }
}

fn message(user: &str, text: String) -> anyhow::Result<Incoming> {
    Ok(Incoming {
        identity: Identity::parse(&format!("console:{user}"))?,
        channel: "console".into(),
        text,
        thread: None,
        direct: true,
        from_bot: false,
    })
}

/// Runs `echo MARKER` for `user` and returns the time to the first reply
/// (job accepted) and to the output line.
async fn one(
    router: &Router<GrpcController>,
    user: &str,
    n: usize,
) -> anyhow::Result<(Duration, Duration)> {
    let marker = format!("bench-{user}-{n}");
    let out = FirstLine::new(marker.clone());
    router
        .handle(
            message(user, format!("run echo {marker} on name=dev-1"))?,
            &out,
        )
        .await;
    let line = out.elapsed().ok_or_else(|| {
        let last = out.last.lock().map(|l| l.clone()).unwrap_or_default();
        anyhow::anyhow!("no output line for {marker}; last reply: {last}")
    })?;
    let first = out.first.lock().map(|f| f.unwrap_or(line)).unwrap_or(line);
    Ok((first, line))
}

fn pct(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    println!(
        "{name}: n={} p50={} p90={} p99={} max={}",
        v.len(),
        ms(pct(&v, 0.50)),
        ms(pct(&v, 0.90)),
        ms(pct(&v, 0.99)),
        ms(pct(&v, 1.0)),
    );
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let tmp = tempfile::tempdir()?;
        let mut opts = FleetOptions::new(tmp.path());
        opts.agents = 1;
        // Enough slots that concurrent users queue at the gateway, not the agent.
        opts.agent_max_concurrent_jobs = args.users.max(1);
        let fleet = Fleet::start(opts).await?;
        let channel = fleetcmd_proto::channel::connect(&fleet.url, &fleet.gateway_tls).await?;
        let router = Arc::new(Router::new(
            fleet.gateway_options().router_config(),
            GrpcController::from_channel(channel),
        ));
        // Warm up: policy fetch and verification, connections, page cache.
        for i in 0..10 {
            one(&router, "warmup", i).await?;
        }

        let mut lat = Vec::with_capacity(args.iterations);
        let mut accepted = Vec::with_capacity(args.iterations);
        for i in 0..args.iterations {
            let (first, line) = one(&router, "alice", i).await?;
            accepted.push(first);
            lat.push(line);
        }
        println!(
            "chat message to first output line (router + controller + agent, 1 user, sequential):"
        );
        summary("  to the output line", lat);
        summary("  to the first reply (job accepted)", accepted);

        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for u in 0..args.users {
            let router = router.clone();
            let per_user = args.per_user;
            tasks.spawn(async move {
                let mut v = Vec::with_capacity(per_user);
                for n in 0..per_user {
                    v.push(one(&router, &format!("user{u}"), n).await?.1);
                }
                anyhow::Ok(v)
            });
        }
        let mut all = Vec::new();
        while let Some(r) = tasks.join_next().await {
            all.extend(r??);
        }
        let took = started.elapsed();
        println!(
            "{} users x {} commands at once: {} commands in {:.2} s = {:.0} commands/s",
            args.users,
            args.per_user,
            all.len(),
            took.as_secs_f64(),
            all.len() as f64 / took.as_secs_f64()
        );
        summary("  latency under load", all);
        fleet.shutdown().await?;
        anyhow::Ok(())
    })
}
