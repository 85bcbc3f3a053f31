//! Build tasks that need the binaries' clap definitions: `cargo xtask
//! assets --out DIR` writes a man page (section 1, one per subcommand too)
//! and bash, zsh and fish completions for each of the four binaries.
//! `scripts/dist` runs it and packages the result. The writing is
//! `fleetcmd_cli::assets`, which `fleetcmd man` and `fleetcmd completions`
//! use too.

use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Args {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Man pages and shell completions: DIR/man/BIN/*.1, DIR/completions/{bash,zsh,fish}/.
    Assets {
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let Task::Assets { out } = Args::parse().task;
    let commands = [
        fleetcmd_agent::cli_args::Cli::command(),
        fleetcmd_controller::cli_args::Cli::command(),
        fleetcmd_gateway::cli_args::Cli::command(),
        fleetcmd_cli::cli_args::Cli::command(),
    ];
    for cmd in commands {
        fleetcmd_cli::assets::write_all(cmd, &out)?;
    }
    println!("wrote man pages and completions to {}", out.display());
    Ok(())
}
