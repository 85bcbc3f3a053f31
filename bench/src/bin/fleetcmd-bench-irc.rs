//! `fleetcmd-bench-irc`: fleetcmd and another IRC bot (Errbot) side by side
//! on the same IRC server, measured by the same IRC users.
//!
//! fleetcmd runs in this process: a controller and one local agent over
//! mTLS on loopback, and the gateway's IRC adapter with its default flood
//! control (`burst` 4, `interval_ms` 500) in `#fleetcmd`, answering
//! `!run uptime on all`. The other bot is started beforehand (see
//! `scripts/bench-irc-errbot`) and answers `!uptime` in `#errbot`, with its
//! channel replies prefixed by the asker's nick so they can be told apart.
//!
//! Two figures per bot, from the users' side of the server:
//! - latency: one user sends the command, waits for the line with its
//!   output (`load average`) addressed to them, again and again;
//! - load: `--users` users each send `--per-user` commands, each after the
//!   previous answer arrived; the time until the last answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use fleetcmd_cli::fleet::{Fleet, FleetOptions, example_policy};
use fleetcmd_gateway::adapters::irc::{IrcAdapter, IrcConfig};
use fleetcmd_gateway::controller::GrpcController;
use fleetcmd_gateway::router::Router;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::timeout;

#[derive(Parser, Debug)]
#[command(about = "fleetcmd and Errbot on the same IRC server: latency and 5 users x 10 commands")]
struct Args {
    /// Port of the IRC server on 127.0.0.1 (plain TCP).
    #[arg(long)]
    port: u16,
    /// Nick of the other bot, already in `--other-channel`; empty: fleetcmd only.
    #[arg(long, default_value = "errbot")]
    other_nick: String,
    #[arg(long, default_value = "#errbot")]
    other_channel: String,
    /// What the other bot answers with the output of `uptime`.
    #[arg(long, default_value = "!uptime")]
    other_command: String,
    /// Sequential commands for the latency figure.
    #[arg(long, default_value_t = 30)]
    iterations: usize,
    /// Pause between the latency figure's commands, so each bot's flood
    /// control has recovered from the previous answer (Errbot waits a full
    /// second between channel messages) and only the command is measured.
    #[arg(long, default_value_t = 1100)]
    gap_ms: u64,
    #[arg(long, default_value_t = 5)]
    users: usize,
    #[arg(long, default_value_t = 10)]
    per_user: usize,
}

/// How long one answer may take before the run fails.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);
const NETWORK: &str = "bench";
const CHANNEL: &str = "#fleetcmd";

/// A minimal IRC user: registers, joins, answers PINGs, reads PRIVMSGs.
struct User {
    nick: String,
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
}

impl User {
    async fn connect(port: u16, nick: &str) -> anyhow::Result<User> {
        let s = TcpStream::connect(("127.0.0.1", port))
            .await
            .with_context(|| format!("connecting to the IRC server on port {port}"))?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        let mut u = User {
            nick: nick.to_string(),
            r: BufReader::new(r),
            w,
        };
        u.send(&format!("NICK {nick}")).await?;
        u.send(&format!("USER {nick} 0 * :bench user")).await?;
        u.wait_for(Duration::from_secs(10), |cmd, _, _| cmd == "001")
            .await
            .context("registration")?;
        Ok(u)
    }

    async fn send(&mut self, line: &str) -> anyhow::Result<()> {
        self.w.write_all(format!("{line}\r\n").as_bytes()).await?;
        Ok(())
    }

    /// The next line's (command, source nick, last parameter), PINGs answered.
    async fn next(&mut self) -> anyhow::Result<(String, String, String)> {
        loop {
            let mut raw = String::new();
            if self.r.read_line(&mut raw).await? == 0 {
                bail!("{}: the server closed the connection", self.nick);
            }
            let line = raw.trim_end();
            let (src, rest) = match line.strip_prefix(':') {
                Some(l) => l.split_once(' ').unwrap_or((l, "")),
                None => ("", line),
            };
            let (head, trailing) = rest.split_once(" :").unwrap_or((rest, ""));
            let cmd = head.split(' ').next().unwrap_or("").to_string();
            if cmd == "PING" {
                self.send(&format!("PONG :{trailing}")).await?;
                continue;
            }
            let nick = src.split('!').next().unwrap_or("").to_string();
            return Ok((cmd, nick, trailing.to_string()));
        }
    }

    /// Reads until `done(command, nick, text)`.
    async fn wait_for(
        &mut self,
        within: Duration,
        mut done: impl FnMut(&str, &str, &str) -> bool,
    ) -> anyhow::Result<()> {
        timeout(within, async {
            loop {
                let (cmd, nick, text) = self.next().await?;
                if done(&cmd, &nick, &text) {
                    return anyhow::Ok(());
                }
            }
        })
        .await
        .with_context(|| format!("{}: nothing within {within:?}", self.nick))?
    }

    async fn join(&mut self, channel: &str, bot: &str) -> anyhow::Result<()> {
        self.send(&format!("JOIN {channel}")).await?;
        // Wait until the bot is in the channel too (NAMES, asked again
        // until it shows up).
        let start = Instant::now();
        loop {
            self.send(&format!("NAMES {channel}")).await?;
            let mut seen = false;
            self.wait_for(Duration::from_secs(10), |cmd, _, text| {
                if cmd == "353"
                    && text
                        .split(' ')
                        .any(|n| n.trim_start_matches(['@', '+']).eq_ignore_ascii_case(bot))
                {
                    seen = true;
                }
                cmd == "366"
            })
            .await?;
            if seen {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("{bot} did not join {channel} within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Sends `command` and waits for its answer: `load average` in a line
    /// (or a merged part of one) from `bot` that names this user. Returns
    /// the time to it and the job's own time when the answer states it.
    async fn ask(
        &mut self,
        channel: &str,
        bot: &str,
        command: &str,
    ) -> anyhow::Result<(Duration, Option<Duration>)> {
        let started = Instant::now();
        self.send(&format!("PRIVMSG {channel} :{command}")).await?;
        let me = self.nick.clone();
        let fleetcmd_tag = format!("asked by irc:{NETWORK}:{me}!");
        let other_tag = format!("{me}: ");
        let mut answer = None;
        let mut last = String::new();
        self.wait_for(ANSWER_TIMEOUT, |cmd, nick, text| {
            if cmd == "PRIVMSG" && nick.eq_ignore_ascii_case(bot) {
                last.clone_from(&text.to_string());
                answer = text
                    .split(" ‖ ")
                    .find(|p| {
                        p.contains("load average")
                            && (p.contains(&fleetcmd_tag) || p.starts_with(&other_tag))
                    })
                    .map(String::from);
            }
            answer.is_some()
        })
        .await
        .with_context(|| {
            format!("{me}: no answer to {command:?} from {bot}; its last line: {last:?}")
        })?;
        Ok((started.elapsed(), answer.as_deref().and_then(job_time)))
    }
}

/// The job's own time in fleetcmd's answer (`» web-1 — ok, exit 0, 21 ms |`).
fn job_time(answer: &str) -> Option<Duration> {
    let title = answer.split(" » ").nth(1)?.split(" | ").next()?;
    let last = title.rsplit(", ").next()?;
    if let Some(ms) = last.strip_suffix(" ms") {
        return ms.parse().ok().map(Duration::from_millis);
    }
    last.strip_suffix(" s")?
        .parse()
        .ok()
        .map(Duration::from_secs_f64)
}

/// Two characters of a nick, to make the users' nicks differ per bot.
fn short(nick: &str) -> String {
    nick.chars().take(2).collect()
}

fn pct(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len().max(1) as f64 - 1.0) * q).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

/// The figures of one bot.
struct Figures {
    p50: Duration,
    p99: Duration,
    load: Duration,
}

async fn measure(args: &Args, bot: &str, channel: &str, command: &str) -> anyhow::Result<Figures> {
    let mut lat_user = User::connect(args.port, &format!("lat{}", short(bot))).await?;
    lat_user.join(channel, bot).await?;
    // Warm up (policy fetch, connections), not counted.
    for _ in 0..3 {
        lat_user.ask(channel, bot, command).await?;
    }
    let mut lat = Vec::with_capacity(args.iterations);
    let mut over = Vec::new();
    for _ in 0..args.iterations {
        tokio::time::sleep(Duration::from_millis(args.gap_ms)).await;
        let (t, job) = lat_user.ask(channel, bot, command).await?;
        lat.push(t);
        if let Some(job) = job {
            over.push(t.saturating_sub(job));
        }
    }
    lat.sort();
    over.sort();
    let mut users = Vec::new();
    for u in 0..args.users {
        let mut user = User::connect(args.port, &format!("u{u}{}", short(bot))).await?;
        user.join(channel, bot).await?;
        users.push(user);
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for mut user in users {
        let (channel, bot, command) = (channel.to_string(), bot.to_string(), command.to_string());
        let n = args.per_user;
        tasks.spawn(async move {
            for _ in 0..n {
                user.ask(&channel, &bot, &command).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let load = started.elapsed();
    if !over.is_empty() {
        println!(
            "{bot}: beyond the job's own time (as the answer states it): p50={:.1} ms p99={:.1} ms (target: p50 at most 50 ms)",
            pct(&over, 0.5).as_secs_f64() * 1000.0,
            pct(&over, 0.99).as_secs_f64() * 1000.0
        );
    }
    let f = Figures {
        p50: pct(&lat, 0.5),
        p99: pct(&lat, 0.99),
        load,
    };
    println!(
        "{bot}: `{command}` to its output line: n={} p50={:.1} ms p99={:.1} ms; {} users x {} commands: {:.2} s",
        lat.len(),
        f.p50.as_secs_f64() * 1000.0,
        f.p99.as_secs_f64() * 1000.0,
        args.users,
        args.per_user,
        load.as_secs_f64()
    );
    Ok(f)
}

/// A fleet with one local agent, and the gateway on IRC in `#fleetcmd`
/// where every user may run `uptime`.
async fn start_fleetcmd(args: &Args, dir: &std::path::Path) -> anyhow::Result<(Fleet, IrcAdapter)> {
    let mut opts = FleetOptions::new(dir);
    opts.agents = 1;
    opts.agent_max_concurrent_jobs = args.users.max(4) + 1;
    let mut fleet = Fleet::start(opts).await?;
    // The gateway signs for the IRC users too.
    let policy = example_policy(
        fleet.policy_version + 1,
        &fleet.gateway_key.public_key(),
        &fleet.operator_key.public_key(),
    )
    .replace(
        "vouches_for = [\"console:*\"]",
        &format!("vouches_for = [\"console:*\", \"irc:{NETWORK}:*\"]"),
    ) + &format!(
        "\n[roles.bench]\ncommands = [\"uptime\"]\nchannels = [\"irc:{NETWORK}:{CHANNEL}\"]\n\n\
         [[bindings]]\nsubjects = [\"irc:{NETWORK}:*\"]\nroles = [\"bench\"]\n"
    );
    fleet.push_policy(&policy).await?;
    fleet.wait_online(Duration::from_secs(30)).await?;
    let cfg: IrcConfig = toml::from_str(&format!(
        "server = \"127.0.0.1\"\nport = {}\ntls = false\nnick = \"fleetcmd\"\n\
         network = \"{NETWORK}\"\nchannels = [\"{CHANNEL}\"]\n",
        args.port
    ))?;
    let adapter = IrcAdapter::connect(&cfg).await?;
    Ok((fleet, adapter))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let tmp = tempfile::tempdir()?;
        let (fleet, adapter) = start_fleetcmd(&args, tmp.path()).await?;
        let channel = fleetcmd_proto::channel::connect(&fleet.url, &fleet.gateway_tls).await?;
        let router = Arc::new(Router::new(
            fleet.gateway_options().router_config(),
            GrpcController::from_channel(channel),
        ));
        let gateway = tokio::spawn(fleetcmd_gateway::serve(router, adapter));
        let ours = measure(&args, "fleetcmd", CHANNEL, "!run uptime on all").await?;
        gateway.abort();
        if !args.other_nick.is_empty() {
            let other = measure(
                &args,
                &args.other_nick,
                &args.other_channel,
                &args.other_command,
            )
            .await?;
            let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
            println!(
                "fleetcmd / {}: latency p50 {:.2}x, p99 {:.2}x; {} users x {} commands {:.2}x (target: at most 1.5x)",
                args.other_nick,
                ratio(ours.p50, other.p50),
                ratio(ours.p99, other.p99),
                args.users,
                args.per_user,
                ratio(ours.load, other.load),
            );
        }
        fleet.shutdown().await?;
        anyhow::Ok(())
    })
}
