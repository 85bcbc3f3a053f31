//! A controller partitioned from PostgreSQL, for real: controller B (a
//! `fleetcmd-controller` process) runs in a network namespace made by the
//! test and reaches the database only through a veth pair and a TCP relay
//! in the test; its `/metrics` is reached through a second veth pair.
//! B leads every singleton; controller A (on loopback) waits. The test
//! brings B's database link down:
//! - B stops acting as leader (every `fleetcmd_lease_held` 0) before its
//!   lease's TTL has run out, while its `/metrics` still answers (with
//!   `fleetcmd_store_up 0`);
//! - A takes every lease over with a higher term, within TTL + one renewal;
//! - at no sample do both hold one lease, and after the link comes back B
//!   does not lead again: its renewals under the old terms are refused, and
//!   the database's lease rows name A at A's terms (no split brain).
//!
//! The fenced writes themselves (an old term's audit head refused) are
//! proved at the store level in `leases.rs`.
//!
//! Needs root (the tests run as root) for `ip netns`; where namespaces
//! cannot be made the test says so and returns.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fleetcmd_controller::lease::LeaseTiming;
use fleetcmd_tests::workspace_bin as bin;
use fleetcmd_tests::*;

use crate::dev_ha::{LEASES, sample, scrape};
use crate::failover::{controller, free_port, share_ca_and_audit_key, spawn};

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace of this test, deleted (with its veth pairs) on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}

/// A veth pair: `host` in this namespace with `.1`, `peer` in `ns` with
/// `.2` of the /30 at `net` (e.g. `10.231.7.0`, given as its first three
/// octets and the last one).
fn veth(
    ns: &Netns,
    host: &str,
    peer: &str,
    net: &str,
    base: u8,
) -> Result<(String, String), String> {
    let (h, p) = (format!("{net}.{}", base + 1), format!("{net}.{}", base + 2));
    ip(&[
        "link", "add", host, "type", "veth", "peer", "name", peer, "netns", &ns.0,
    ])?;
    ip(&["addr", "add", &format!("{h}/30"), "dev", host])?;
    ip(&["link", "set", host, "up"])?;
    ip(&["-n", &ns.0, "addr", "add", &format!("{p}/30"), "dev", peer])?;
    ip(&["-n", &ns.0, "link", "set", peer, "up"])?;
    Ok((h, p))
}

/// Relays TCP connections from `listener` to `to` (the database on
/// loopback) until aborted.
async fn relay(listener: tokio::net::TcpListener, to: String) {
    while let Ok((mut inbound, _)) = listener.accept().await {
        let to = to.clone();
        tokio::spawn(async move {
            if let Ok(mut out) = tokio::net::TcpStream::connect(&to).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
            }
        });
    }
}

/// Per lease: its term while this controller holds it (`None`: not held);
/// `None` overall when `/metrics` did not answer.
async fn leases_of(metrics: &str) -> Option<(Vec<Option<u64>>, bool)> {
    let text = scrape(metrics).await?;
    let held = LEASES
        .iter()
        .map(|l| {
            let held = sample(&text, &format!("fleetcmd_lease_held{{lease=\"{l}\"}}"))?;
            let term = sample(&text, &format!("fleetcmd_lease_term{{lease=\"{l}\"}}"))?;
            Some((held == 1.0).then_some(term as u64))
        })
        .collect::<Option<Vec<_>>>()?;
    Some((held, sample(&text, "fleetcmd_store_up") == Some(1.0)))
}

async fn controller_id(metrics: &str) -> String {
    let text = scrape(metrics).await.expect("metrics");
    let info = text
        .lines()
        .find(|l| l.starts_with("fleetcmd_controller_info{"))
        .expect("controller info");
    info.split('"').nth(1).expect("controller id").to_owned()
}

fn log_tails(d: &Path) -> String {
    crate::failover::log_tails(d, &["ctl-a.log", "ctl-b.log"], 25)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_cut_off_from_postgresql_steps_down_and_the_other_takes_over_without_split_brain()
{
    init();
    let tag = std::process::id() % 100_000;
    let ns = Netns(format!("fcmd-part-{tag}"));
    if let Err(e) = ip(&["netns", "add", &ns.0]) {
        eprintln!(
            "SKIPPED: network namespaces cannot be created here ({e}); this test needs root and `ip netns`"
        );
        return;
    }
    let net = format!("10.231.{}", tag % 250);
    let (pg_host, _) = veth(&ns, &format!("fcpH{tag}"), &format!("fcpN{tag}"), &net, 0)
        .expect("database veth pair");
    let (_, mgmt_peer) = veth(&ns, &format!("fcmH{tag}"), &format!("fcmN{tag}"), &net, 4)
        .expect("metrics veth pair");
    ip(&["-n", &ns.0, "link", "set", "lo", "up"]).expect("loopback in the namespace");

    let (cluster, db) = crate::postgres::fresh_database().await;
    let listener = tokio::net::TcpListener::bind((pg_host.as_str(), 0))
        .await
        .expect("relay listens on the host end of the veth");
    let relay_port = listener.local_addr().expect("relay address").port();
    let relay = tokio::spawn(relay(listener, format!("127.0.0.1:{}", cluster.port())));

    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let admin = fleetcmd_cli::policy_cmd::keygen(&d.join("admin.key"))
        .map_err(|f| f.error)
        .expect("admin key");
    let config = |name: &str, listen: &str, metrics: &str, host: &str, port: u16| {
        let path = d.join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "listen = \"{listen}\"\nmetrics_listen = \"{metrics}\"\ndata_dir = \"{}\"\npolicy_roots = [\"{}\"]\n\
                 heartbeat_interval = \"1s\"\nstore = \"postgres\"\npostgres_url = \"postgres://{}@{host}:{port}/{}\"\n\
                 postgres_password_file = \"{}\"\n",
                d.join(name).display(),
                admin.public_key(),
                pg::USER,
                db.name,
                cluster.password_file().display(),
            ),
        )
        .expect("controller config");
        path
    };
    let metrics_b = format!("{mgmt_peer}:9464");
    let cfg_b = config("ctl-b", "127.0.0.1:7443", &metrics_b, &pg_host, relay_port);
    let metrics_b = format!("http://{metrics_b}/metrics");
    let metrics_a = format!("127.0.0.1:{}", free_port());
    let cfg_a = config(
        "ctl-a",
        &format!("127.0.0.1:{}", free_port()),
        &metrics_a,
        "127.0.0.1",
        cluster.port(),
    );
    let metrics_a = format!("http://{metrics_a}/metrics");

    // B first, inside the namespace: it takes every lease.
    let _b = spawn(
        Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .arg(bin("fleetcmd-controller"))
            .arg("-c")
            .arg(&cfg_b)
            .arg("run"),
        &d.join("ctl-b.log"),
    );
    let start = Instant::now();
    let b_terms: Vec<u64> = loop {
        if let Some((held, true)) = leases_of(&metrics_b).await
            && held.iter().all(Option::is_some)
        {
            break held.into_iter().flatten().collect();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "controller b leads every singleton within 30 s\n{}",
            log_tails(d)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let id_b = controller_id(&metrics_b).await;
    share_ca_and_audit_key(&d.join("ctl-b"), &d.join("ctl-a"));
    let _a = controller(&cfg_a, &d.join("ctl-a.log"));
    let id_a = controller_id_eventually(&metrics_a, d).await;
    assert_ne!(id_a, id_b);

    let ttl = LeaseTiming::DEFAULT_TTL;
    let timing = LeaseTiming { ttl };
    // A few renewal rounds: B keeps every lease, A none.
    let watch = Instant::now() + timing.renew_every() + Duration::from_secs(1);
    while Instant::now() < watch {
        let (a, _) = leases_of(&metrics_a).await.expect("a's metrics");
        let (b, _) = leases_of(&metrics_b).await.expect("b's metrics");
        assert!(a.iter().all(Option::is_none), "a leads nothing yet: {a:?}");
        assert!(b.iter().all(Option::is_some), "b keeps leading: {b:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Cut B's path to the database.
    ip(&["link", "set", &format!("fcpH{tag}"), "down"]).expect("link down");
    let cut = Instant::now();
    let mut b_down = None;
    let mut b_store_down = false;
    let a_terms: Vec<u64> = loop {
        let b = leases_of(&metrics_b).await;
        let (a, _) = leases_of(&metrics_a).await.expect("a's metrics answer");
        let (b, b_store) = b.unwrap_or_else(|| {
            panic!(
                "b's metrics answer while its database is away\n{}",
                log_tails(d)
            )
        });
        b_store_down |= !b_store;
        for (i, l) in LEASES.iter().enumerate() {
            assert!(
                !(a[i].is_some() && b[i].is_some()),
                "two leaders of {l} at {:?} after the cut: a {a:?}, b {b:?}",
                cut.elapsed()
            );
        }
        if b_down.is_none() && b.iter().all(Option::is_none) {
            b_down = Some(cut.elapsed());
        }
        if a.iter().all(Option::is_some) {
            break a.into_iter().flatten().collect();
        }
        assert!(
            cut.elapsed() < ttl + timing.renew_every() + Duration::from_secs(5),
            "a takes over in time (a {a:?}, b {b:?})\n{}",
            log_tails(d)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let took = cut.elapsed();
    let b_down = b_down.expect("b stepped down before a led everything");
    eprintln!("after the cut: b stepped down at {b_down:?}, a leads everything at {took:?}");
    assert!(
        b_down < ttl,
        "b stepped down before its lease's TTL ran out ({b_down:?})"
    );
    assert!(
        b_store_down,
        "b's metrics showed its store down during the cut"
    );
    for (old, new) in b_terms.iter().zip(&a_terms) {
        assert!(new > old, "a's terms {a_terms:?} are above b's {b_terms:?}");
    }

    // The link comes back: b's stuck calls and renewals under its old
    // terms reach the database, and are refused.
    ip(&["link", "set", &format!("fcpH{tag}"), "up"]).expect("link up");
    let watch = Instant::now() + timing.renew_every() * 2 + Duration::from_secs(2);
    while Instant::now() < watch {
        let (a, _) = leases_of(&metrics_a).await.expect("a's metrics");
        let (b, _) = leases_of(&metrics_b).await.expect("b's metrics");
        assert!(
            b.iter().all(Option::is_none),
            "b leads nothing again: {b:?}"
        );
        assert_eq!(
            a,
            a_terms.iter().copied().map(Some).collect::<Vec<_>>(),
            "a keeps its terms"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rows = cluster
        .psql(
            &db.name,
            "SELECT name, holder, term FROM leases ORDER BY name",
        )
        .expect("lease rows");
    for (l, term) in LEASES.iter().zip(&a_terms) {
        let want = format!("{l}|{id_a}|{term}");
        assert!(rows.lines().any(|r| r == want), "{want} in:\n{rows}");
    }
    relay.abort();
}

async fn controller_id_eventually(metrics: &str, d: &Path) -> String {
    let start = Instant::now();
    while scrape(metrics).await.is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "controller a answers within 30 s\n{}",
            log_tails(d)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    controller_id(metrics).await
}
