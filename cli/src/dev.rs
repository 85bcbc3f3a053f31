//! `fleetcmd dev`: a whole fleet in one process with the console chat on
//! stdin/stdout. At end of input it waits for outstanding jobs, shuts down
//! cleanly and exits 0, so `printf '!run uptime on all\n' | fleetcmd dev` is
//! a complete demo.

use std::net::SocketAddr;
use std::path::PathBuf;

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
}

pub async fn run(args: DevArgs) -> Result<u8, Failure> {
    if args.agents == 0 || args.agents > 200 {
        return Err(crate::usage("--agents must be between 1 and 200"));
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
    let fleet = Fleet::start(opts).await?;
    std::fs::write(dir.join("env"), fleet.env_file())?;
    eprintln!(
        "fleetcmd dev: controller {} with {} agents (state in {})\n\
         type chat commands here, e.g. `!run uptime on all`, `!help`, `!agents`, `!health`; end with Ctrl-D\n\
         from another terminal: source {}/env; fleetcmd agents",
        fleet.url,
        fleet.agents.len(),
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
    let result = gw.run(None).await;
    fleet.shutdown().await?;
    result?;
    Ok(0)
}

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
    const SERVICES: &str = r#"
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
    #[derive(serde::Deserialize)]
    struct Checks {
        check: Vec<fleetcmd_agent::checks::config::RawCheck>,
    }
    let raw: Checks = toml::from_str(CHECKS)?;
    let mut problems = Vec::new();
    let checks = fleetcmd_agent::checks::config::validate_checks(&raw.check, &mut problems);
    let services: std::collections::BTreeMap<String, fleetcmd_controller::health::RawService> =
        toml::from_str(SERVICES)?;
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
