//! Command-line arguments of `fleetcmd-controller`, in the library so that
//! `xtask` can generate the man page and shell completions from them.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "fleetcmd-controller",
    version,
    about = "The fleetcmd controller: CA, agent registry, job dispatch"
)]
pub struct Cli {
    /// Configuration file.
    #[arg(
        long,
        short,
        global = true,
        default_value = "/etc/fleetcmd/controller.toml",
        env = "FLEETCMD_CONTROLLER_CONFIG"
    )]
    pub config: PathBuf,
    #[command(subcommand)]
    pub cmd: Option<Cmd>,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run the controller (the default).
    Run,
    /// Check the configuration file and exit (0 = valid, 64 = invalid).
    Validate,
    /// Issue a certificate and key for an operator or a gateway from the
    /// controller's CA (run on the controller host).
    IssueCert {
        /// `operator` or `gateway`.
        #[arg(long)]
        role: String,
        /// Name in the certificate (an operator's login, a gateway's name).
        #[arg(long)]
        name: String,
        /// Directory to write NAME.crt, NAME.key and ca.crt into.
        #[arg(long)]
        out: PathBuf,
        /// Certificate lifetime in days (default: `operator_cert_ttl` or
        /// `gateway_cert_ttl` of controller.toml, 7 and 30 days); at most 365.
        #[arg(long)]
        days: Option<u64>,
        /// Replace existing regular files (symlinks and other non-regular
        /// files are never replaced).
        #[arg(long)]
        force: bool,
    },
}
