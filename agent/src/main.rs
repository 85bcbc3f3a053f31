//! `fleetcmd-agent`: parse flags, load and validate the config, join or run.

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Parser;

use fleetcmd_agent::cli_args::{Cli, Cmd};
use fleetcmd_agent::controllers::Controllers;

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
        (Cmd::Join { controller, .. }, Err(_))
            if !controller.is_empty() && !cli.config.exists() =>
        {
            None
        }
        (_, Err(e)) => {
            eprintln!("{e}");
            return ExitCode::from(64);
        }
    };
    let rt = match runtime() {
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
            let controllers = match (controller.is_empty(), &config) {
                (false, _) => Controllers::parse("--controller", &controller)
                    .map_err(|p| anyhow::anyhow!("{}", p.join("; ")))?,
                (true, Some(c)) => c.controllers.clone(),
                (true, None) => anyhow::bail!("--controller URL is required without a config"),
            };
            let name = name.unwrap_or_else(hostname);
            let opts = fleetcmd_agent::JoinOptions {
                controller: controllers.first().to_owned(),
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
            let id = fleetcmd_agent::join::join_any(&opts, &controllers, now).await?;
            println!(
                "joined as {} (state in {})",
                id.agent_id,
                opts.state_dir.display()
            );
            if new_config {
                write_new_config(&cli.config, &controllers, &opts.state_dir)?;
            } else if let Err(e) = record_controllers(&cli.config, &controllers) {
                eprintln!(
                    "fleetcmd-agent: {}; set `controller` or `controllers` there by hand",
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
    controllers: &Controllers,
    state_dir: &std::path::Path,
) -> anyhow::Result<()> {
    let text = format!(
        "# Written by `fleetcmd-agent join`; every key: deploy/agent.toml.\n\
         {}\n\
         state_dir = {:?}\n",
        controllers_line(controllers),
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

/// The agent.toml line naming `controllers`: `controller = "…"` for one
/// (what older agents read), `controllers = ["…", …]` for several.
fn controllers_line(controllers: &Controllers) -> String {
    match controllers.urls() {
        [one] => format!("controller = {one:?}"),
        many => format!("controllers = {many:?}"),
    }
}

/// Keep the controllers given to `join --controller` for `run`: rewrite the
/// top-level `controller = ...` or `controllers = [...]` line of an
/// existing config in place (comments, mode and owner are kept).
fn record_controllers(config: &std::path::Path, controllers: &Controllers) -> anyhow::Result<()> {
    let Ok(text) = std::fs::read_to_string(config) else {
        return Ok(());
    };
    let line = controllers_line(controllers);
    let mut done = false;
    let mut out: Vec<&str> = Vec::new();
    for l in text.lines() {
        let key = l.split('=').next().unwrap_or("").trim();
        if !done && (key == "controller" || key == "controllers") && l.contains('=') {
            if key == "controllers" && !l.trim_end().ends_with(']') {
                anyhow::bail!(
                    "{}: `controllers` spans several lines; not rewritten",
                    config.display()
                );
            }
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
        anyhow::bail!(
            "{}: no top-level `controller` or `controllers` line",
            config.display()
        );
    }
    let mut new = out.join("\n");
    new.push('\n');
    std::fs::write(config, new)
        .map_err(|e| anyhow::anyhow!("{}: writing controllers: {e}", config.display()))?;
    println!("{}: {line}", config.display());
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

/// The agent's runtime: one worker thread, whatever the host's core count
/// (a job's process and its output are waited on, never computed; a
/// default runtime starts a worker per core, and each thread costs the
/// agent stack and allocator memory: 64 of them on a 64-core host).
/// Blocking work (files, `sysinfo`) runs on tokio's blocking pool as
/// before.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(urls: &[&str]) -> Controllers {
        let urls: Vec<String> = urls.iter().map(|u| u.to_string()).collect();
        Controllers::parse("--controller", &urls).expect("valid")
    }

    #[test]
    fn join_records_one_controller_or_all_of_them_in_the_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        // (config before, controllers given, config after or a piece of the error)
        let cases: &[(&str, &[&str], Result<&str, &str>)] = &[
            (
                "# mine\ncontroller = \"https://old:1\"\nstate_dir = \"/s\"\n",
                &["https://a:1", "https://b:1"],
                Ok(
                    "# mine\ncontrollers = [\"https://a:1\", \"https://b:1\"]\nstate_dir = \"/s\"\n",
                ),
            ),
            (
                "controllers = [\"https://a:1\", \"https://b:1\"]\nstate_dir = \"/s\"\n",
                &["https://c:1"],
                Ok("controller = \"https://c:1\"\nstate_dir = \"/s\"\n"),
            ),
            (
                "controllers = [\n  \"https://a:1\",\n]\n",
                &["https://c:1"],
                Err("`controllers` spans several lines"),
            ),
            (
                "state_dir = \"/s\"\n",
                &["https://c:1"],
                Err("no top-level `controller` or `controllers` line"),
            ),
        ];
        for (before, given, want) in cases {
            std::fs::write(&path, before).expect("write");
            let got = record_controllers(&path, &list(given));
            match (got, want) {
                (Ok(()), Ok(after)) => {
                    let text = std::fs::read_to_string(&path).expect("read");
                    assert_eq!(&text, after, "{before}");
                    // What was written is what `run` reads back.
                    let raw: fleetcmd_agent::config::RawConfig =
                        toml::from_str(&text).expect("toml");
                    let config = raw.validate("agent.toml").expect("valid");
                    assert_eq!(config.controllers, list(given));
                }
                (Err(e), Err(piece)) => assert!(e.to_string().contains(piece), "{before}: {e}"),
                (got, want) => panic!("{before}: got {got:?}, want {want:?}"),
            }
        }
    }
}
