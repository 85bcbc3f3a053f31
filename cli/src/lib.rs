//! Library side of the `fleetcmd` command line: operator commands, policy
//! tooling and the local fleet behind `fleetcmd dev` (which the end-to-end
//! tests reuse, so what the README demonstrates is what is tested).

use std::path::PathBuf;

use clap::Args;

pub mod assets;
pub mod audit_cmd;
pub mod certs_cmd;
pub mod cli_args;
pub mod client;
pub mod dev;
pub mod dev_cluster;
pub mod fleet;
pub mod health_cmd;
pub mod init;
pub mod notify_cmd;
pub mod policy_cmd;
pub mod term;

/// Connection to the controller as an operator. `fleetcmd dev` writes a file
/// of these variables: `source DIR/env`. Global, so every subcommand's help
/// lists them: under their own heading, apart from the subcommand's own
/// options (an outside test read `init --help`'s `--controller` as the
/// address to give the new fleet, which is `--url`).
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = CONN_HEADING)]
pub struct Conn {
    /// Controller address.
    #[arg(
        long,
        env = "FLEETCMD_CONTROLLER",
        default_value = "https://127.0.0.1:7443",
        global = true
    )]
    pub controller: String,
    /// Fleet CA certificate (PEM).
    #[arg(long, env = "FLEETCMD_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Your operator certificate (PEM).
    #[arg(long, env = "FLEETCMD_CERT", global = true)]
    pub cert: Option<PathBuf>,
    /// Your operator certificate's key (PEM).
    #[arg(long, env = "FLEETCMD_KEY", global = true)]
    pub key: Option<PathBuf>,
    /// Your Ed25519 key that signs your jobs (PEM) [default: NAME.sign.key
    /// beside --key; an Ed25519 --key itself, as issued before P-256].
    #[arg(long, env = "FLEETCMD_SIGNING_KEY", global = true)]
    pub signing_key: Option<PathBuf>,
    /// Print command output and fleet-supplied text as received, without
    /// escaping control characters; refused when stdout is a terminal.
    #[arg(long, global = true)]
    pub raw: bool,
}

/// The help heading of [`Conn`]'s options.
pub const CONN_HEADING: &str = "Connection to a running controller (not used by init or dev)";

/// An error with the exit code it maps to.
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            code: 1,
            error: e.into(),
        }
    }
}

pub fn usage(msg: impl std::fmt::Display) -> Failure {
    Failure {
        code: 64,
        error: anyhow::anyhow!("{msg}"),
    }
}
