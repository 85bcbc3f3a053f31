//! `fleetcmd`: the operator and admin command line, and `fleetcmd dev`.
//! Thin: parse flags, call the library code in the modules below, map
//! errors to exit codes (64 for bad usage or input, 1 for failures).

use std::process::ExitCode;

use clap::Parser;

use fleetcmd_cli::{Failure, client, dev, policy_cmd};

use fleetcmd_cli::cli_args::{AgentsCmd, Cli, Cmd, TokenCmd};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let is_dev = matches!(cli.cmd, Cmd::Dev(_));
    let is_dev_controller = matches!(cli.cmd, Cmd::DevController { .. });
    let filter = if is_dev_controller {
        "info"
    } else if is_dev {
        "warn"
    } else {
        "error"
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| filter.into()),
        )
        // Colour only for a person at a terminal, not in journals or files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
            Cmd::DevController { config } => fleetcmd_cli::dev_cluster::serve(&config).await,
            Cmd::Init(args) => fleetcmd_cli::init::run(args).await,
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
            Cmd::Job { id, rest } if id == "output" => match rest.as_slice() {
                [job] => client::job_output(&conn, job, None).await,
                [job, host] => client::job_output(&conn, job, Some(host)).await,
                _ => Err(fleetcmd_cli::usage("usage: fleetcmd job output ID [HOST]")),
            },
            Cmd::Job { id, rest } if rest.is_empty() => client::job(&conn, &id).await,
            Cmd::Job { .. } => Err(fleetcmd_cli::usage(
                "usage: fleetcmd job ID | fleetcmd job output ID [HOST]",
            )),
            Cmd::Jobs { mine, state, limit } => client::jobs(&conn, mine, state, limit).await,
            Cmd::Cancel { id } => client::cancel(&conn, &id).await,
            Cmd::Policy { action } => policy_cmd::run(&conn, action).await,
            Cmd::Certs { action } => fleetcmd_cli::certs_cmd::run(&conn, action).await,
            Cmd::Audit { action } => fleetcmd_cli::audit_cmd::run(&conn, action).await,
            Cmd::Health {
                action: Some(action),
                ..
            } => fleetcmd_cli::health_cmd::run(&conn, action).await,
            Cmd::Health {
                action: None,
                service,
                history,
            } => fleetcmd_cli::health_cmd::show(&conn, service.as_deref(), history).await,
            Cmd::Notify(args) => fleetcmd_cli::notify_cmd::run(args).await.map(|()| 0),
            Cmd::Completions { shell } => {
                let cmd = <Cli as clap::CommandFactory>::command();
                let script = fleetcmd_cli::assets::completions(cmd, shell);
                std::io::Write::write_all(&mut std::io::stdout().lock(), &script)
                    .map(|()| 0)
                    .map_err(Into::into)
            }
            Cmd::Man { subcommand } => {
                let cmd = <Cli as clap::CommandFactory>::command();
                fleetcmd_cli::assets::man_page(
                    cmd,
                    subcommand.as_deref(),
                    &mut std::io::stdout().lock(),
                )
                .map(|()| 0)
                .map_err(fleetcmd_cli::usage)
            }
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(Failure { code, error }) => {
            // Errors quote what the controller and the fleet said.
            let error = format!("{error:#}");
            eprintln!("fleetcmd: {}", fleetcmd_core::terminal::escape(&error));
            ExitCode::from(code)
        }
    }
}
