//! `fleetcmd-controller`: parse flags, load and validate the config, run.

use std::process::ExitCode;

use clap::Parser;
use fleetcmd_controller::keyfile::{Existing, check_target, write_private};
use fleetcmd_controller::pki::{Ca, Role};

use fleetcmd_controller::cli_args::{Cli, Cmd};

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
    let config = match fleetcmd_controller::config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(64);
        }
    };
    let result = match cli.cmd.unwrap_or(Cmd::Run) {
        Cmd::Validate => {
            println!("{}: ok", cli.config.display());
            return ExitCode::SUCCESS;
        }
        Cmd::IssueCert {
            role,
            name,
            out,
            days,
            force,
        } => issue(&config, &role, &name, &out, days, force),
        Cmd::Run => run(config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "fleetcmd-controller: {}",
                fleetcmd_core::error_chain::error_chain(e.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

/// Longest lifetime `issue-cert --days` gives.
const MAX_CERT_DAYS: u64 = 365;

fn issue(
    config: &fleetcmd_controller::ControllerConfig,
    role: &str,
    name: &str,
    out: &std::path::Path,
    days: Option<u64>,
    force: bool,
) -> anyhow::Result<()> {
    let existing = if force {
        Existing::Replace
    } else {
        Existing::Refuse
    };
    let role = match Role::parse(role) {
        Some(r @ (Role::Operator | Role::Gateway)) => r,
        _ => anyhow::bail!("--role must be `operator` or `gateway`, got {role:?}"),
    };
    fleetcmd_controller::pki::check_cert_name(name).map_err(anyhow::Error::msg)?;
    let ttl = match (days, role) {
        (Some(0), _) => anyhow::bail!("--days must be at least 1"),
        // A certificate is revocable, but its lifetime is what bounds one
        // that leaked unnoticed: no decade-long operator certificates.
        (Some(d), _) if d > MAX_CERT_DAYS => anyhow::bail!(
            "--days must be at most {MAX_CERT_DAYS}, got {d}: issue a new certificate when this one runs out"
        ),
        (Some(d), _) => std::time::Duration::from_secs(d.saturating_mul(86400)),
        (None, Role::Gateway) => config.gateway_cert_ttl,
        (None, _) => config.operator_cert_ttl,
    };
    // An operator's TLS key is ECDSA P-256 (what every gRPC client can
    // use); its jobs and approvals are signed with an Ed25519 key of its
    // own, NAME.sign.key, whose public key (NAME.sign.pub) goes into the
    // policy's `[[signers]]`. A gateway's signing key is configured apart.
    std::fs::create_dir_all(out)?;
    let key_path = out.join(format!("{name}.key"));
    let cert_path = out.join(format!("{name}.crt"));
    let ca_path = out.join("ca.crt");
    let sign_key_path = out.join(format!("{name}.sign.key"));
    let sign_pub_path = out.join(format!("{name}.sign.pub"));
    let mut paths = vec![&key_path, &cert_path, &ca_path];
    if role == Role::Operator {
        paths.extend([&sign_key_path, &sign_pub_path]);
    }
    // Every file is checked before anything is issued or written: nothing
    // half-done, and nothing logged as issued that was not.
    for path in paths {
        check_target(path, existing)?;
    }
    let pki = config.data_dir.join("pki");
    let ca = Ca::load_or_create(&pki)?;
    let id = ca.issue_identity(role, name, ttl)?;
    let peer = fleetcmd_controller::pki::pem_to_der(&id.cert_pem)
        .and_then(|der| fleetcmd_controller::pki::peer_from_cert(&der))
        .ok_or_else(|| anyhow::anyhow!("the issued certificate does not read back"))?;
    // What was issued, for the admins' inventory (`fleetcmd certs revoke`
    // by name needs no list: it refuses every certificate of that name
    // issued before the revocation).
    {
        use std::io::Write;
        let line = serde_json::json!({
            "role": role.as_str(),
            "name": name,
            "serial": peer.serial,
            "issued_at": peer.issued_at,
            "ttl_secs": ttl.as_secs(),
        });
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(pki.join("issued.jsonl"))?;
        writeln!(log, "{line}")?;
        log.sync_all()?;
    }
    let mut files = vec![
        (key_path, id.key_pem.expose().as_bytes().to_vec()),
        (cert_path, id.cert_pem.as_bytes().to_vec()),
        (ca_path, ca.cert_pem().as_bytes().to_vec()),
    ];
    let signer = match role {
        Role::Operator => {
            let pem = fleetcmd_controller::pki::new_signing_key_pem()?;
            let public = fleetcmd_core::crypto::SigningKey::from_pkcs8_pem(pem.expose())
                .map_err(|e| anyhow::anyhow!("the new signing key does not read back: {e}"))?
                .public_key();
            files.push((sign_key_path, pem.expose().as_bytes().to_vec()));
            files.push((sign_pub_path, format!("{public}\n").into_bytes()));
            Some(public)
        }
        _ => None,
    };
    for (path, contents) in &files {
        write_private(path, contents, existing)?;
    }
    let written: Vec<String> = files.iter().map(|(p, _)| p.display().to_string()).collect();
    println!(
        "wrote {} (serial {}, valid {} days)",
        written.join(", "),
        peer.serial,
        ttl.as_secs() / 86400
    );
    if let Some(public) = signer {
        println!("{name}'s job signing key, for a [[signers]] entry of the policy: {public}");
    }
    Ok(())
}

fn run(config: fleetcmd_controller::ControllerConfig) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let ctl = fleetcmd_controller::start(config).await?;
        // Listening: tell systemd (Type=notify); a no-op outside systemd.
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        let watchdog = spawn_watchdog();
        wait_for_signal().await;
        tracing::info!("shutting down");
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        if let Some(w) = watchdog {
            w.abort();
        }
        ctl.shutdown().await?;
        Ok(())
    })
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
