//! `fleetcmd-agent`: parse flags, load and validate the config, join or run.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "fleetcmd-agent",
    version,
    about = "The fleetcmd agent: runs allow-listed, signed jobs and reports health"
)]
struct Cli {
    /// Configuration file.
    #[arg(
        long,
        short,
        global = true,
        default_value = "/etc/fleetcmd/agent.toml",
        env = "FLEETCMD_AGENT_CONFIG"
    )]
    config: PathBuf,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent (the default).
    Run,
    /// Check the configuration file and exit (0 = valid, 64 = invalid).
    Validate,
    /// Join the fleet with a token from `fleetcmd token create`.
    Join {
        /// Controller address, e.g. https://ctl.example.com:7443 (default: the config's `controller`).
        #[arg(long)]
        controller: Option<String>,
        /// The join token.
        #[arg(long, env = "FLEETCMD_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        /// Name to ask for (default: this host's name; the token's name wins).
        #[arg(long)]
        name: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cmd = cli.cmd.unwrap_or(Cmd::Run);
    // `join` may run before the config names a controller.
    let config = match (&cmd, fleetcmd_agent::config::load(&cli.config)) {
        (_, Ok(c)) => Some(c),
        (
            Cmd::Join {
                controller: Some(_),
                ..
            },
            Err(_),
        ) if !cli.config.exists() => None,
        (_, Err(e)) => {
            eprintln!("{e}");
            return ExitCode::from(64);
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fleetcmd-agent: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = match cmd {
        Cmd::Validate => {
            println!("{}: ok", cli.config.display());
            Ok(())
        }
        Cmd::Join {
            controller,
            token,
            name,
        } => rt.block_on(async {
            let state_dir = config
                .as_ref()
                .map(|c| c.state_dir.clone())
                .unwrap_or_else(|| "/var/lib/fleetcmd/agent".into());
            let controller = controller
                .or_else(|| config.as_ref().map(|c| c.controller.clone()))
                .unwrap_or_default();
            let name = name.unwrap_or_else(hostname);
            let opts = fleetcmd_agent::JoinOptions {
                controller,
                token,
                name,
                state_dir,
            };
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let id = fleetcmd_agent::join(&opts, now).await?;
            println!(
                "joined as {} (state in {})",
                id.agent_id,
                opts.state_dir.display()
            );
            Ok(())
        }),
        Cmd::Run => rt.block_on(async {
            let config = config.expect("run requires a config (checked above)");
            let agent = fleetcmd_agent::spawn(config)?;
            wait_for_signal().await;
            agent.shutdown().await;
            Ok(())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetcmd-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_ascii_lowercase())
        .unwrap_or_else(|_| "localhost".into())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
