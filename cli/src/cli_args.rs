//! Command-line arguments of `fleetcmd`, in the library so that `xtask` can
//! generate the man page and shell completions from them.

use clap::{Parser, Subcommand};

use crate::{client, dev, policy_cmd};

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
pub struct Cli {
    #[command(flatten)]
    pub conn: crate::Conn,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Start a local fleet: controller, agents and a console chat on stdin/stdout.
    Dev(dev::DevArgs),
    /// One extra controller of `fleetcmd dev --controllers N` (started by it).
    #[command(hide = true)]
    DevController {
        /// The controller.toml `fleetcmd dev` wrote.
        config: std::path::PathBuf,
    },
    /// Write everything a team's fleet needs into one directory: policy
    /// root key, controller config and CA, operator identity, a first
    /// signed policy, gateway config and keys, one join line per host.
    ///
    /// `--url` is the address the new controller will have; init runs its
    /// own controller for a moment and uses none of the connection options.
    Init(crate::init::InitArgs),
    /// List agents (optionally matching a selector on their granted labels),
    /// or revoke one. FACTS are what each host reports about itself.
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
    /// Show a job's state and each host's result (`job output ID [HOST]`
    /// prints the full output).
    Job {
        /// Job id: its 12-digit short id, the full id, or 8+ characters of
        /// the full id; or `output`.
        id: String,
        /// With `output`: the job id, then optionally a host.
        rest: Vec<String>,
    },
    /// Recent jobs, newest first.
    Jobs {
        /// Only jobs you asked for.
        #[arg(long)]
        mine: bool,
        /// Only jobs in this state (running, succeeded, failed, aborted, canceled, expired).
        #[arg(long)]
        state: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Cancel a job: queued targets are dropped, running ones killed.
    Cancel {
        /// Job id: its 12-digit short id, the full id, or 8+ characters of
        /// the full id.
        id: String,
    },
    /// Check, sign, push and show the policy bundle.
    Policy {
        #[command(subcommand)]
        action: policy_cmd::PolicyCmd,
    },
    /// Revoke operator and gateway certificates, list revocations.
    Certs {
        #[command(subcommand)]
        action: crate::certs_cmd::CertsCmd,
    },
    /// Verify, export and search the audit trail.
    Audit {
        #[command(subcommand)]
        action: crate::audit_cmd::AuditCmd,
    },
    /// Services (ok / degraded / down) with their instances, worst first;
    /// exit status 2 when one is not ok. `health silence` mutes alerts.
    Health {
        #[command(subcommand)]
        action: Option<crate::health_cmd::HealthCmd>,
        /// One service, with its instances and recent changes.
        service: Option<String>,
        /// Recent changes to show for one service.
        #[arg(long, default_value_t = 10)]
        history: u32,
    },
    /// Post a monitoring notification into chat through the gateway
    /// (for Nagios, Zabbix, Sensu and other script hooks).
    Notify(crate::notify_cmd::NotifyArgs),
    /// Print a shell completion script, e.g.
    /// `fleetcmd completions bash > ~/.local/share/bash-completion/completions/fleetcmd`.
    Completions {
        #[arg(value_enum)]
        shell: crate::assets::CompletionShell,
    },
    /// Print the man page (roff), or a subcommand's: `fleetcmd man | man -l -`.
    Man {
        /// A subcommand, e.g. `run` for fleetcmd-run(1).
        subcommand: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum AgentsCmd {
    /// Revoke an agent: its stream is closed and its certificate refused.
    Revoke { id: String },
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Create a join token (printed once; stored hashed by the controller).
    Create {
        /// Labels the agent gets, e.g. `role=web,env=prod`: the only labels selectors and `targets` match.
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
