//! Command-line arguments of `fleetcmd-agent`, in the library so that
//! `xtask` can generate the man page and shell completions from them.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "fleetcmd-agent",
    version,
    about = "The fleetcmd agent: runs allow-listed, signed jobs and reports health"
)]
pub struct Cli {
    /// Configuration file.
    #[arg(
        long,
        short,
        global = true,
        default_value = "/etc/fleetcmd/agent.toml",
        env = "FLEETCMD_AGENT_CONFIG"
    )]
    pub config: PathBuf,
    #[command(subcommand)]
    pub cmd: Option<Cmd>,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run the agent (the default).
    Run,
    /// Check the configuration file and exit (0 = valid, 64 = invalid).
    Validate,
    /// Join the fleet with a token from `fleetcmd token create`.
    Join {
        /// Controller address, e.g. https://ctl.example.com:7443; once per
        /// controller of the fleet (joins through the first reachable, and
        /// the agent fails over between them). Default: the config's
        /// `controller` / `controllers`.
        #[arg(long)]
        controller: Vec<String>,
        /// The join token.
        #[arg(long, env = "FLEETCMD_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        /// Name to ask for (default: this host's name; the token's name wins).
        #[arg(long)]
        name: Option<String>,
        /// Do not (re)start fleetcmd-agent.service after joining (by default
        /// it is restarted when systemd runs and the unit is enabled).
        #[arg(long)]
        no_start: bool,
    },
}
