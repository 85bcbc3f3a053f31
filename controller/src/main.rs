//! `fleetcmd-controller`: parse flags, load and validate the config, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fleetcmd_controller::pki::{Ca, Role, write_private};

#[derive(Parser)]
#[command(
    name = "fleetcmd-controller",
    version,
    about = "The fleetcmd controller: CA, agent registry, job dispatch"
)]
struct Cli {
    /// Configuration file.
    #[arg(
        long,
        short,
        global = true,
        default_value = "/etc/fleetcmd/controller.toml",
        env = "FLEETCMD_CONTROLLER_CONFIG"
    )]
    config: PathBuf,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
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
        /// Certificate lifetime in days.
        #[arg(long, default_value_t = 90)]
        days: u64,
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
        } => issue(&config, &role, &name, &out, days),
        Cmd::Run => run(config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetcmd-controller: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn issue(
    config: &fleetcmd_controller::ControllerConfig,
    role: &str,
    name: &str,
    out: &std::path::Path,
    days: u64,
) -> anyhow::Result<()> {
    let role = match Role::parse(role) {
        Some(r @ (Role::Operator | Role::Gateway)) => r,
        _ => anyhow::bail!("--role must be `operator` or `gateway`, got {role:?}"),
    };
    let ca = Ca::load_or_create(&config.data_dir.join("pki"))?;
    let id = ca.issue_identity(role, name, std::time::Duration::from_secs(days * 86400))?;
    std::fs::create_dir_all(out)?;
    write_private(
        &out.join(format!("{name}.key")),
        id.key_pem.expose().as_bytes(),
    )?;
    std::fs::write(out.join(format!("{name}.crt")), &id.cert_pem)?;
    std::fs::write(out.join("ca.crt"), ca.cert_pem())?;
    println!(
        "wrote {0}/{name}.crt, {0}/{name}.key and {0}/ca.crt",
        out.display()
    );
    Ok(())
}

fn run(config: fleetcmd_controller::ControllerConfig) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let ctl = fleetcmd_controller::start(config).await?;
        wait_for_signal().await;
        tracing::info!("shutting down");
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
