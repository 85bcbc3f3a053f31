//! `fleetcmd`: the operator and admin command line, and `fleetcmd dev`.
//! Thin: parse flags, call the library code in the modules below, map
//! errors to exit codes (64 for bad usage or input, 1 for failures).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use fleetcmd_cli::{Failure, client, dev, policy_cmd};

#[derive(Parser)]
#[command(
    name = "fleetcmd",
    version,
    about = "Run allow-listed commands on your fleet, safely, and see who did what",
    long_about = "fleetcmd talks to a fleetcmd controller over mutually authenticated TLS.\n\n\
Start here:  fleetcmd dev            a whole local fleet in one process (controller, 3 agents, console chat)\n\
Then:        source DIR/env          (DIR is printed by `fleetcmd dev`)\n\
             fleetcmd agents         list agents\n\
             fleetcmd run uptime --on all"
)]
struct Cli {
    #[command(flatten)]
    conn: fleetcmd_cli::Conn,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a local fleet: controller, agents and a console chat on stdin/stdout.
    Dev(dev::DevArgs),
    /// List agents (optionally matching a selector), or revoke one.
    Agents {
        #[command(subcommand)]
        action: Option<AgentsCmd>,
        /// Label selector, e.g. `role=web,env!=staging` (default: all).
        selector: Option<String>,
    },
    /// Join tokens for new agents.
    Token {
        #[command(subcommand)]
        action: TokenCmd,
    },
    /// Run an allow-listed command on the agents matching a selector.
    Run(client::RunArgs),
    /// Show a job's state and each host's result.
    Job {
        /// Job id or a unique prefix of it (at least 4 characters).
        id: String,
    },
    /// Check, sign, push and show the policy bundle.
    Policy {
        #[command(subcommand)]
        action: policy_cmd::PolicyCmd,
    },
}

#[derive(Subcommand)]
enum AgentsCmd {
    /// Revoke an agent: its stream is closed and its certificate refused.
    Revoke { id: String },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a join token (printed once; stored hashed by the controller).
    Create {
        /// Labels the agent gets, e.g. `role=web,env=prod` (these win over the agent's own).
        #[arg(long)]
        labels: Option<String>,
        /// Lifetime, e.g. `1h`, `30m`.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Uses before the token is spent.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Bind the token to this agent name.
        #[arg(long)]
        name: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let is_dev = matches!(cli.cmd, Cmd::Dev(_));
    let filter = if is_dev { "warn" } else { "error" };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| filter.into()),
        )
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fleetcmd: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let conn = cli.conn;
    let result = rt.block_on(async move {
        match cli.cmd {
            Cmd::Dev(args) => dev::run(args).await,
            Cmd::Agents {
                action: Some(AgentsCmd::Revoke { id }),
                ..
            } => client::revoke(&conn, &id).await,
            Cmd::Agents {
                action: None,
                selector,
            } => client::agents(&conn, selector.as_deref()).await,
            Cmd::Token {
                action:
                    TokenCmd::Create {
                        labels,
                        ttl,
                        uses,
                        name,
                    },
            } => client::token_create(&conn, labels, &ttl, uses, name).await,
            Cmd::Run(args) => client::run(&conn, args).await,
            Cmd::Job { id } => client::job(&conn, &id).await,
            Cmd::Policy { action } => policy_cmd::run(&conn, action).await,
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(Failure { code, error }) => {
            eprintln!("fleetcmd: {error:#}");
            ExitCode::from(code)
        }
    }
}
