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
    let fleet = Fleet::start(opts).await?;
    std::fs::write(dir.join("env"), fleet.env_file())?;
    eprintln!(
        "fleetcmd dev: controller {} with {} agents (state in {})\n\
         type chat commands here, e.g. `!run uptime on all`, `!help`, `!agents`; end with Ctrl-D\n\
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
    let result = fleetcmd_gateway::run(fleet.gateway_options(), adapter).await;
    fleet.shutdown().await?;
    result?;
    Ok(0)
}
