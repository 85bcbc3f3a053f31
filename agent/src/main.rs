//! `fleetcmd-agent`: parse flags, load and validate the config, join or run.

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Parser;

use fleetcmd_agent::cli_args::{Cli, Cmd};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        // Colour only for a person at a terminal, not in journals or files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
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
            no_start,
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
            // Without a config, join writes one (controller and state
            // dir) so `run` finds what join used: checked before joining,
            // so a join never leaves an identity without its config.
            let new_config = config.is_none();
            if new_config {
                check_new_config(&cli.config)?;
            }
            let id = fleetcmd_agent::join(&opts, now).await?;
            println!(
                "joined as {} (state in {})",
                id.agent_id,
                opts.state_dir.display()
            );
            if new_config {
                write_new_config(&cli.config, &opts.controller, &opts.state_dir)?;
            } else if let Err(e) = record_controller(&cli.config, &opts.controller) {
                eprintln!(
                    "fleetcmd-agent: {}; set `controller` there by hand",
                    fleetcmd_core::error_chain::error_chain(e.as_ref())
                );
            }
            if !no_start {
                start_service();
            }
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
            eprintln!(
                "fleetcmd-agent: {}",
                fleetcmd_core::error_chain::error_chain(e.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

/// Whether join may write a new config at `path`: its directory exists
/// or can be made, and nothing is there yet.
fn check_new_config(path: &std::path::Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("{}: cannot write the config here: {e}", dir.display()))?;
    }
    if std::fs::symlink_metadata(path).is_ok() {
        anyhow::bail!(
            "{}: exists but could not be read as a config",
            path.display()
        );
    }
    Ok(())
}

/// The config a first join writes: what `run` needs, nothing more
/// (deploy/agent.toml shows every key).
fn write_new_config(
    path: &std::path::Path,
    controller: &str,
    state_dir: &std::path::Path,
) -> anyhow::Result<()> {
    let text = format!(
        "# Written by `fleetcmd-agent join`; every key: deploy/agent.toml.\n\
         controller = {controller:?}\n\
         state_dir = {:?}\n",
        state_dir.display().to_string()
    );
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| anyhow::anyhow!("{}: writing the config: {e}", path.display()))?;
    use std::io::Write as _;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| anyhow::anyhow!("{}: writing the config: {e}", path.display()))?;
    fleetcmd_agent::config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("wrote {}", path.display());
    Ok(())
}

/// Keep the controller given to `join --controller` for `run`: rewrite the
/// `controller = ...` line of an existing config in place (comments, mode and
/// owner are kept).
fn record_controller(config: &std::path::Path, controller: &str) -> anyhow::Result<()> {
    let Ok(text) = std::fs::read_to_string(config) else {
        return Ok(());
    };
    let line = format!("controller = {controller:?}");
    let mut done = false;
    let mut out: Vec<&str> = Vec::new();
    for l in text.lines() {
        let key = l.split('=').next().unwrap_or("").trim();
        if !done && key == "controller" && l.contains('=') {
            if l.trim() == line {
                return Ok(());
            }
            out.push(&line);
            done = true;
        } else {
            out.push(l);
        }
    }
    if !done {
        anyhow::bail!("{}: no top-level `controller` line", config.display());
    }
    let mut new = out.join("\n");
    new.push('\n');
    std::fs::write(config, new)
        .map_err(|e| anyhow::anyhow!("{}: writing controller: {e}", config.display()))?;
    println!("{}: controller = {controller:?}", config.display());
    Ok(())
}

/// After a join in a package install: (re)start the enabled unit so the new
/// identity is used at once. Without systemd (a container), say what to run.
fn start_service() {
    const UNIT: &str = "fleetcmd-agent.service";
    if !std::path::Path::new("/run/systemd/system").is_dir() {
        println!("systemd is not running: start the agent with `fleetcmd-agent run`");
        return;
    }
    let systemctl = |args: &[&str]| {
        std::process::Command::new("systemctl")
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !systemctl(&["is-enabled", "--quiet", UNIT]) {
        println!("{UNIT} is not enabled: start the agent with `systemctl enable --now {UNIT}`");
    } else if systemctl(&["restart", UNIT]) {
        println!("started {UNIT}");
    } else {
        eprintln!("fleetcmd-agent: starting {UNIT} failed; see `journalctl -u {UNIT}`");
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
