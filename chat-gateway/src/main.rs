//! `fleetcmd-gateway`: load and validate `gateway.toml`, then run the chat
//! gateway (`run`) or only check the configuration (`validate`).

use std::process::ExitCode;

use clap::Parser;
use fleetcmd_gateway::adapters::console::ConsoleAdapter;
use fleetcmd_gateway::config::GatewayConfig;

/// EX_USAGE: bad flags or configuration.
const EXIT_CONFIG: u8 = 64;
/// Runtime failure.
const EXIT_RUNTIME: u8 = 1;

use fleetcmd_gateway::cli_args::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs go to stderr: the console adapter owns stdout.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();

    let options = match GatewayConfig::load(&cli.config).and_then(|c| c.options(&cli.config)) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("fleetcmd-gateway: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command {
        Command::Validate => {
            println!("{}: ok", cli.config.display());
            ExitCode::SUCCESS
        }
        Command::Run => {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("fleetcmd-gateway: starting the async runtime: {e}");
                    return ExitCode::from(EXIT_RUNTIME);
                }
            };
            runtime.block_on(async move {
                let user = std::env::var("USER")
                    .or_else(|_| std::env::var("LOGNAME"))
                    .unwrap_or_else(|_| "unknown".to_string());
                let stdin = tokio::io::BufReader::new(tokio::io::stdin());
                let adapter = match ConsoleAdapter::new(stdin, tokio::io::stdout(), &user) {
                    Ok(a) => a,
                    Err(e) => {
                        eprintln!("fleetcmd-gateway: console user {user:?}: {e}");
                        return ExitCode::from(EXIT_CONFIG);
                    }
                };
                // Configured and about to serve: tell systemd (Type=notify);
                // a no-op outside systemd.
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
                let _watchdog = spawn_watchdog();
                match fleetcmd_gateway::run(options, adapter).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("fleetcmd-gateway: {e}");
                        ExitCode::from(EXIT_RUNTIME)
                    }
                }
            })
        }
    }
}

/// systemd `Type=notify`: ping the watchdog at half its interval while the
/// runtime is alive (no-op without `WATCHDOG_USEC`, i.e. outside systemd).
fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return None;
    }
    let every = std::time::Duration::from_micros(usec / 2);
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
        }
    }))
}
