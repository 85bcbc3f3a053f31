//! `fleetcmd-gateway`: load and validate `gateway.toml`, then run the chat
//! gateway (`run`) or only check the configuration (`validate`).

use std::process::ExitCode;

use clap::Parser;
use fleetcmd_gateway::config::GatewayConfig;
use fleetcmd_gateway::launch;

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
        // Colour only for a person at a terminal, not in journals or files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Before any key is read: other processes of this user (plugins
    // included) must not read this one's memory.
    if let Err(e) = fleetcmd_gateway::plugins::sandbox::keep_own_memory_private() {
        eprintln!("fleetcmd-gateway: cannot make this process non-dumpable: {e}");
        return ExitCode::from(EXIT_RUNTIME);
    }

    let loaded =
        GatewayConfig::load(&cli.config).and_then(|c| c.options(&cli.config).map(|o| (c, o)));
    let (config, options) = match loaded {
        Ok(v) => v,
        Err(e) => {
            eprintln!("fleetcmd-gateway: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command {
        Command::Validate => {
            // What `run` would refuse before connecting anything.
            if let Err(e) = fleetcmd_gateway::store::check_state_dir(&config.state_dir) {
                eprintln!("fleetcmd-gateway: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
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
                let mut watchdog = None;
                let ready = || {
                    // Every adapter connected: tell systemd (Type=notify);
                    // a no-op outside systemd.
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
                    watchdog = spawn_watchdog();
                };
                let stops = launch::Stops::default();
                let run = launch::run(&config, &cli.config, options, ready, &stops);
                tokio::pin!(run);
                tokio::select! {
                    res = &mut run => match res {
                        Ok(()) => ExitCode::SUCCESS,
                        Err(e @ launch::LaunchError::Component { .. }) => {
                            eprintln!("fleetcmd-gateway: {e}");
                            ExitCode::from(EXIT_CONFIG)
                        }
                        Err(e) => {
                            eprintln!("fleetcmd-gateway: {e}");
                            ExitCode::from(EXIT_RUNTIME)
                        }
                    },
                    _ = shutdown_signal() => {
                        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
                        tracing::info!("stopping on signal");
                        // Goodbyes (IRC QUIT) go out while the adapters
                        // still run; at most 2 s, then the process ends.
                        stops.stop_all();
                        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), &mut run).await;
                        ExitCode::SUCCESS
                    }
                }
            })
        }
    }
}

/// SIGTERM (systemd stop) or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
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
