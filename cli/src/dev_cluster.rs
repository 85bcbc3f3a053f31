//! `fleetcmd dev --postgres [--controllers N]`: the parts of a dev fleet
//! that run beside the in-process one — a throwaway PostgreSQL (initdb in
//! a temporary directory, a free loopback port, no system service; the
//! tests' `fleetcmd-pg-harness`), and controllers 2…N as child processes
//! of this binary (`fleetcmd dev-controller CONFIG`, hidden), each on the
//! same database with the first controller's CA and audit key, so one of
//! them can be `kill -9`ed without taking the fleet down.
//!
//! Children get `SIGTERM` when `fleetcmd dev` ends (and, through
//! `PR_SET_PDEATHSIG`, when it is killed); the database's own watchdog
//! stops the server and removes its directory when this process exits,
//! however it exits.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use fleetcmd_pg_harness::PgCluster;
use fleetcmd_proto::channel::ClientTls;
use fleetcmd_proto::v1 as pb;

use crate::fleet::Fleet;

/// The dev database: one `fleetcmd` database on a throwaway cluster.
pub struct DevDatabase {
    cluster: PgCluster,
    /// What each controller's `postgres_*` keys say.
    pub config: fleetcmd_controller::config::PostgresConfig,
}

impl std::fmt::Debug for DevDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevDatabase")
            .field("url", &self.config.url)
            .finish_non_exhaustive()
    }
}

impl DevDatabase {
    /// `initdb`, start, `CREATE DATABASE fleetcmd`. Fails with the apt line
    /// when Debian's PostgreSQL server is not installed.
    pub async fn start() -> anyhow::Result<DevDatabase> {
        tokio::task::spawn_blocking(|| {
            let cluster = PgCluster::start()
                .map_err(|e| anyhow::anyhow!("--postgres: starting a local PostgreSQL: {e}"))?;
            cluster
                .psql("postgres", "CREATE DATABASE fleetcmd")
                .map_err(|e| {
                    anyhow::anyhow!("--postgres: creating the database: {e}\n{}", cluster.log())
                })?;
            let config = fleetcmd_controller::config::PostgresConfig {
                url: cluster.url("fleetcmd"),
                password_file: Some(cluster.password_file()),
                ca_file: None,
            };
            Ok(DevDatabase { cluster, config })
        })
        .await
        .context("the PostgreSQL start task")?
    }

    pub fn port(&self) -> u16 {
        self.cluster.port()
    }
}

/// One controller process beyond the first.
#[derive(Debug)]
pub struct Child {
    pub url: String,
    pub pid: u32,
    /// `http://ADDR/metrics`.
    pub metrics: String,
    pub log: PathBuf,
    process: tokio::process::Child,
}

/// A free port on `near`'s address.
fn free_port(near: SocketAddr) -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind(SocketAddr::new(near.ip(), 0))
        .with_context(|| format!("finding a free port on {}", near.ip()))?;
    Ok(l.local_addr()?)
}

/// The address of controller number `k` (2…N): the first's port + k - 1
/// when it has a fixed one, else a free port.
fn listen_for(first: SocketAddr, k: usize) -> anyhow::Result<SocketAddr> {
    if first.port() == 0 {
        return free_port(first);
    }
    let port = u16::try_from(usize::from(first.port()) + k - 1).map_err(|_| {
        anyhow::anyhow!(
            "--listen port {} leaves no room for controller {k}",
            first.port()
        )
    })?;
    Ok(SocketAddr::new(first.ip(), port))
}

/// Copies what every controller of one fleet shares — the CA (agents pin
/// it; each controller issues its own server certificate from it) and the
/// audit signing key — from `from` into the new data directory `to`.
pub fn share_keys(from: &Path, to: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    for sub in ["pki", "audit"] {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(to.join(sub))
            .with_context(|| format!("creating {}", to.join(sub).display()))?;
    }
    for file in ["pki/ca.crt", "pki/ca.key", "audit/audit.key"] {
        let dst = to.join(file);
        std::fs::copy(from.join(file), &dst).with_context(|| {
            format!("copying {} to {}", from.join(file).display(), dst.display())
        })?;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod 600 {}", dst.display()))?;
    }
    Ok(())
}

/// controller.toml of controller number `k`.
fn child_config(
    fleet: &Fleet,
    listen: SocketAddr,
    metrics: SocketAddr,
    data_dir: &Path,
) -> anyhow::Result<String> {
    let cfg = &fleet.controller_config;
    let pg = cfg
        .postgres
        .as_ref()
        .context("several controllers need the PostgreSQL store")?;
    let mut t = BTreeMap::<&str, toml::Value>::new();
    t.insert("listen", listen.to_string().into());
    t.insert("data_dir", data_dir.display().to_string().into());
    t.insert(
        "policy_roots",
        toml::Value::Array(
            cfg.policy_roots
                .iter()
                .map(|k| k.to_string().into())
                .collect(),
        ),
    );
    t.insert(
        "policy_threshold",
        toml::Value::Integer(i64::try_from(cfg.policy_threshold)?),
    );
    t.insert(
        "heartbeat_interval",
        format!("{}ms", cfg.heartbeat_interval.as_millis()).into(),
    );
    t.insert("metrics_listen", metrics.to_string().into());
    // The same services on every controller: whichever holds the health
    // lease judges them (the dev fleet's are the demo's).
    if !cfg.services.is_empty() {
        t.insert(
            "services",
            toml::from_str::<toml::Value>(crate::dev::DEMO_SERVICES)?,
        );
    }
    t.insert("store", "postgres".into());
    t.insert("postgres_url", pg.url.clone().into());
    if let Some(p) = &pg.password_file {
        t.insert("postgres_password_file", p.display().to_string().into());
    }
    Ok(toml::to_string(&t)?)
}

/// Starts controllers 2…`n` on the fleet's database and waits until each
/// answers an operator. A port picked free may be taken by another program
/// before the child binds it: a child that exits on "Address already in
/// use" is started again on other free ports (a fixed `--listen` port is
/// not changed: that error is reported).
pub async fn start_controllers(fleet: &Fleet, n: usize) -> anyhow::Result<Vec<Child>> {
    const TRIES: usize = 3;
    let exe = std::env::current_exe().context("finding the fleetcmd binary")?;
    let mut children = Vec::new();
    for k in 2..=n {
        let listen = listen_for(fleet.controller_config.listen, k)?;
        children.push(spawn_child(fleet, &exe, k, listen)?);
    }
    for (k, c) in (2..).zip(children.iter_mut()) {
        let mut tries = 1;
        loop {
            match wait_answering(c, &fleet.operator_tls, Duration::from_secs(30)).await {
                Err(e)
                    if tries < TRIES
                        && fleet.controller_config.listen.port() == 0
                        && e.to_string().contains("Address already in use") =>
                {
                    tracing::warn!(controller = k, error = %e, "a picked port was taken; trying others");
                    tries += 1;
                    let listen = listen_for(fleet.controller_config.listen, k)?;
                    *c = spawn_child(fleet, &exe, k, listen)?;
                }
                other => break other?,
            }
        }
    }
    Ok(children)
}

/// Writes controller `k`'s configuration (listening on `listen`, metrics
/// on a free port) and starts it.
fn spawn_child(fleet: &Fleet, exe: &Path, k: usize, listen: SocketAddr) -> anyhow::Result<Child> {
    let data_dir = fleet.dir.join(format!("controller-{k}"));
    if !data_dir.join("pki/ca.crt").exists() {
        share_keys(&fleet.controller_config.data_dir, &data_dir)?;
    }
    let config = fleet.dir.join(format!("controller-{k}.toml"));
    let metrics = free_port(listen)?;
    std::fs::write(&config, child_config(fleet, listen, metrics, &data_dir)?)
        .with_context(|| format!("writing {}", config.display()))?;
    let log = fleet.dir.join(format!("controller-{k}.log"));
    let stderr =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("dev-controller")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true);
    die_with_parent(&mut cmd);
    let process = cmd
        .spawn()
        .with_context(|| format!("starting controller {k} ({})", exe.display()))?;
    let pid = process.id().context("a just started child has a pid")?;
    Ok(Child {
        url: format!("https://{listen}"),
        pid,
        metrics: format!("http://{metrics}/metrics"),
        log,
        process,
    })
}

/// The child gets SIGTERM when its parent dies, even by `kill -9`.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut tokio::process::Command) {
    // SAFETY: prctl is async-signal-safe and touches only this process.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

async fn wait_answering(c: &mut Child, tls: &ClientTls, limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if let Some(status) = c.process.try_wait()? {
            anyhow::bail!(
                "controller {} exited ({status}) while starting; its log ({}):\n{}",
                c.url,
                c.log.display(),
                log_tail(&c.log)
            );
        }
        if online_agents(&c.url, tls).await.is_some() {
            return Ok(());
        }
        if start.elapsed() > limit {
            anyhow::bail!(
                "controller {} does not answer after {limit:?}; its log ({}):\n{}",
                c.url,
                c.log.display(),
                log_tail(&c.log)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The agents online on the controller at `url` (`None`: it did not answer).
pub async fn online_agents(url: &str, tls: &ClientTls) -> Option<Vec<pb::Agent>> {
    let ch = fleetcmd_proto::channel::connect(url, tls).await.ok()?;
    let agents = pb::agents_client::AgentsClient::new(ch)
        .list(pb::ListAgentsRequest::default())
        .await
        .ok()?
        .into_inner()
        .agents;
    Some(agents.into_iter().filter(|a| a.online).collect())
}

/// Waits until every agent in `names` is online, with `policy_version`, on
/// one of the controllers at `urls`.
pub async fn wait_online(
    urls: &[String],
    tls: &ClientTls,
    names: &[String],
    policy_version: u64,
    limit: Duration,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let mut online = Vec::new();
        for url in urls {
            online.extend(online_agents(url, tls).await.unwrap_or_default());
        }
        let missing: Vec<&String> = names
            .iter()
            .filter(|n| {
                !online
                    .iter()
                    .any(|a| &a.agent_id == *n && a.policy_version == policy_version)
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if start.elapsed() > limit {
            anyhow::bail!(
                "agents not online with policy {policy_version} on any controller after {limit:?}: {missing:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `DIR/controllers`: one `URL PID METRICS_URL` line per controller, the
/// first one (in-process) first — what a person or a test needs to watch
/// or stop one.
pub fn controllers_file(first_url: &str, first_metrics: &str, children: &[Child]) -> String {
    let mut out = format!("{first_url} {} {first_metrics}\n", std::process::id());
    for c in children {
        out.push_str(&format!("{} {} {}\n", c.url, c.pid, c.metrics));
    }
    out
}

/// Reaps and reports a child that ends while the dev fleet runs (killed
/// by a person or a test to watch a failover), every 2 s until the task
/// is dropped: without it the child stayed a zombie until `fleetcmd dev`
/// ended (found by an outside test). Said on stderr, beside the console.
pub async fn report_exits(children: std::sync::Arc<tokio::sync::Mutex<Vec<Child>>>) {
    let mut told = std::collections::HashSet::new();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        for c in children.lock().await.iter_mut() {
            if let Ok(Some(status)) = c.process.try_wait()
                && told.insert(c.pid)
            {
                eprintln!(
                    "fleetcmd dev: controller {} (pid {}) exited ({status}); its agents move to the others",
                    c.url, c.pid
                );
            }
        }
    }
}

/// Stops the children: SIGTERM, then SIGKILL after 10 s. One already dead
/// (killed by a person or a test) is only reaped.
pub async fn stop(children: Vec<Child>) {
    for mut c in children {
        if c.process.try_wait().ok().flatten().is_none() {
            if let Ok(pid) = libc::pid_t::try_from(c.pid) {
                terminate(pid);
            }
            if tokio::time::timeout(Duration::from_secs(10), c.process.wait())
                .await
                .is_err()
            {
                let _ = c.process.kill().await;
            }
        }
    }
}

#[allow(unsafe_code)]
fn terminate(pid: libc::pid_t) {
    // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
}

/// `fleetcmd dev-controller CONFIG`: one controller of a dev fleet, until
/// SIGTERM or Ctrl-C.
pub async fn serve(config: &Path) -> Result<u8, crate::Failure> {
    let config = fleetcmd_controller::config::load(config).map_err(crate::usage)?;
    let ctl = fleetcmd_controller::start(config)
        .await
        .context("starting the controller")?;
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    ctl.shutdown().await?;
    Ok(0)
}

/// Where the dev fleet's pieces are, for the banner.
pub fn describe(db: &DevDatabase, first_url: &str, children: &[Child]) -> String {
    let mut urls = vec![first_url.to_owned()];
    urls.extend(children.iter().map(|c| c.url.clone()));
    format!(
        "PostgreSQL on 127.0.0.1:{} (database fleetcmd, removed on exit); controllers {}",
        db.port(),
        urls.join(", ")
    )
}
