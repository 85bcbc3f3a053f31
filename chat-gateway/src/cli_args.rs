//! Command-line arguments of `fleetcmd-gateway`, in the library so that
//! `xtask` can generate the man page and shell completions from them.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::DEFAULT_PATH;

#[derive(Parser, Debug)]
#[command(name = "fleetcmd-gateway", version, about = "fleetcmd chat gateway")]
pub struct Cli {
    /// Path of gateway.toml.
    #[arg(long, short, global = true, default_value = DEFAULT_PATH, env = "FLEETCMD_GATEWAY_CONFIG")]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway.
    Run,
    /// Check the configuration (and the files it names) and exit.
    Validate,
}
