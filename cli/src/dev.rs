//! `fleetcmd dev`: a whole fleet in one process with the console chat on
//! stdin/stdout. At end of input it waits for outstanding jobs, shuts down
//! cleanly and exits 0, so `printf '!run uptime on all\n' | fleetcmd dev` is
//! a complete demo.
//!
//! `--postgres` puts the controller's state in a throwaway local PostgreSQL
//! and `--controllers N` (with `--postgres`) runs N controllers on it, the
//! agents knowing all of them (`dev_cluster`). Without them nothing here
//! needs a database: the embedded store in the dev directory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::Failure;
use crate::fleet::{Fleet, FleetOptions};

#[derive(Args, Debug)]
pub struct DevArgs {
    /// State directory (default: a fresh temporary directory, removed on exit).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Number of agents (dev-1 … dev-N; odd ones role=web, even ones role=db).
    #[arg(long, default_value_t = 3)]
    pub agents: usize,
    /// Controller gRPC address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub listen: SocketAddr,
    /// Keep the controllers' state in a local PostgreSQL started for this
    /// run (Debian's `postgresql` package; initdb in a temporary directory,
    /// a free loopback port, removed on exit) instead of the embedded store.
    #[arg(long)]
    pub postgres: bool,
    /// Number of controllers (needs --postgres): the first in this process,
    /// the others as child processes on ports after --listen's; agent dev-i
    /// prefers controller i (modulo N) and knows all of them. DIR/controllers
    /// lists each one's URL, process id and /metrics URL.
    #[arg(long, default_value_t = 1)]
    pub controllers: usize,
}

/// Most controllers `fleetcmd dev` starts.
const MAX_CONTROLLERS: usize = 9;

pub async fn run(args: DevArgs) -> Result<u8, Failure> {
    if args.agents == 0 || args.agents > 200 {
        return Err(crate::usage("--agents must be between 1 and 200"));
    }
    if args.controllers == 0 || args.controllers > MAX_CONTROLLERS {
        return Err(crate::usage(format!(
            "--controllers must be between 1 and {MAX_CONTROLLERS}, got {}",
            args.controllers
        )));
    }
    if args.controllers > 1 && !args.postgres {
        return Err(crate::usage(format!(
            "--controllers {} needs --postgres: controllers share their state through PostgreSQL only",
            args.controllers
        )));
    }
    let (_tmp, dir) = match args.data {
        Some(d) => (None, d),
        None => {
            let t = tempfile::Builder::new().prefix("fleetcmd-dev-").tempdir()?;
            let p = t.path().to_owned();
            (Some(t), p)
        }
    };
    let mut opts = FleetOptions::new(&dir);
    opts.listen = args.listen;
    opts.agents = args.agents;
    demo_health(&mut opts)?;
    let db = if args.postgres {
        let db = crate::dev_cluster::DevDatabase::start().await?;
        opts.postgres = Some(db.config.clone());
        // Every controller of a PostgreSQL dev fleet serves /metrics on
        // loopback (listed in DIR/controllers).
        opts.controller_metrics = Some(SocketAddr::new(args.listen.ip(), 0));
        Some(db)
    } else {
        None
    };
    // With several controllers the agents are added once all of them run.
    if args.controllers > 1 {
        opts.agents = 0;
    }
    let mut fleet = Fleet::start(opts).await?;
    let children = if args.controllers > 1 {
        match start_more_controllers(&mut fleet, args.controllers, args.agents).await {
            Ok(c) => c,
            Err(e) => {
                let _ = fleet.shutdown().await;
                return Err(e.into());
            }
        }
    } else {
        Vec::new()
    };
    std::fs::write(
        dir.join("controllers"),
        crate::dev_cluster::controllers_file(
            &fleet.url,
            &fleet
                .controller
                .metrics_addr()
                .map(|a| format!("http://{a}/metrics"))
                .unwrap_or_else(|| "-".into()),
            &children,
        ),
    )?;
    std::fs::write(dir.join("env"), fleet.env_file())?;
    if let Some(db) = &db {
        eprintln!(
            "fleetcmd dev: {}",
            crate::dev_cluster::describe(db, &fleet.url, &children)
        );
    }
    eprintln!(
        "fleetcmd dev: controller {} with {} agents (state in {})\n\
         type chat commands here, e.g. `!run uptime on all`, `!help`, `!agents`, `!health`; end with Ctrl-D\n\
         from another terminal: source {}/env; fleetcmd agents",
        fleet.url,
        args.agents,
        dir.display(),
        dir.display()
    );
    let user = std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "operator".into());
    let stdin = tokio::io::BufReader::new(tokio::io::stdin());
    let adapter = fleetcmd_gateway::adapters::console::ConsoleAdapter::new(
        stdin,
        tokio::io::stdout(),
        &user,
    )?;
    // The console gets the chat and the services' alerts.
    let opts = fleet.gateway_options();
    let ctl = fleetcmd_gateway::controller::GrpcController::connect_lazy(
        &opts.controller_url,
        &opts.tls,
    )?;
    let router = std::sync::Arc::new(fleetcmd_gateway::router::Router::new(
        opts.router_config(),
        ctl,
    ));
    let mut gw = fleetcmd_gateway::Gateway::new(router.clone());
    use fleetcmd_gateway::adapters::ChatAdapter as _;
    gw.spawn_background(fleetcmd_gateway::alerts::run(
        router,
        vec![("console".to_string(), adapter.sender())],
        None,
    ));
    gw.add(adapter);
    let children = std::sync::Arc::new(tokio::sync::Mutex::new(children));
    let reaper = tokio::spawn(crate::dev_cluster::report_exits(children.clone()));
    let result = gw.run(None).await;
    reaper.abort();
    fleet.shutdown().await?;
    crate::dev_cluster::stop(std::mem::take(&mut *children.lock().await)).await;
    drop(db);
    result?;
    Ok(0)
}

/// Controllers 2…`n` on the fleet's database, then `agents` agents: dev-i
/// tries controller i first (modulo `n`), then the others in order.
async fn start_more_controllers(
    fleet: &mut Fleet,
    n: usize,
    agents: usize,
) -> anyhow::Result<Vec<crate::dev_cluster::Child>> {
    // Joined before the other controllers start: a controller reads the
    // enrolled agents from the store when it starts.
    let names: Vec<String> = (1..=agents).map(|i| format!("dev-{i}")).collect();
    for (i, name) in (1..).zip(&names) {
        fleet.join_agent(name, crate::fleet::dev_labels(i)).await?;
    }
    let children = crate::dev_cluster::start_controllers(fleet, n).await?;
    let mut urls = vec![fleet.url.clone()];
    urls.extend(children.iter().map(|c| c.url.clone()));
    for (i, name) in names.iter().enumerate() {
        let mut order = urls.clone();
        order.rotate_left(i % n);
        fleet.agent_controllers = order;
        fleet.start_agent(name, None)?;
    }
    crate::dev_cluster::wait_online(
        &urls,
        &fleet.operator_tls,
        &names,
        fleet.policy_version,
        Duration::from_secs(30),
    )
    .await?;
    Ok(children)
}

/// The dev fleet's services: `[services.NAME]` of every controller it
/// starts (with several, whichever holds the health lease judges them).
pub(crate) const DEMO_SERVICES: &str = r#"
[fleet-disk]
selector = "all"
check = "disk"
channels = ["console:dev"]
confirm = "5s"

[web]
selector = "role=web"
check = "load"
channels = ["console:dev"]
confirm = "5s"
"#;

/// Checks on every dev agent (`disk`, `load`) and two services over them,
/// alerting into the console, so `!health` and `!status` show something
/// real. Quicker damping than the defaults: it is a demo.
fn demo_health(opts: &mut FleetOptions) -> Result<(), Failure> {
    const CHECKS: &str = r#"
[[check]]
name = "disk"
kind = "disk"
warn = "90%"
crit = "97%"
interval = "10s"

[[check]]
name = "load"
kind = "load"
warn = "4,3,2"
crit = "8,6,4"
per_cpu = true
interval = "10s"
"#;
    #[derive(serde::Deserialize)]
    struct Checks {
        check: Vec<fleetcmd_agent::checks::config::RawCheck>,
    }
    let raw: Checks = toml::from_str(CHECKS)?;
    let mut problems = Vec::new();
    let checks = fleetcmd_agent::checks::config::validate_checks(&raw.check, &mut problems);
    let services: std::collections::BTreeMap<String, fleetcmd_controller::health::RawService> =
        toml::from_str(DEMO_SERVICES)?;
    match fleetcmd_controller::health::config::validate(&services) {
        Ok(s) if problems.is_empty() => opts.services = s,
        Ok(_) => Err(anyhow::anyhow!("dev checks: {}", problems.join("; ")))?,
        Err(p) => Err(anyhow::anyhow!("dev services: {}", p.join("; ")))?,
    }
    for i in 1..=opts.agents {
        opts.agent_checks.insert(format!("dev-{i}"), checks.clone());
    }
    Ok(())
}
