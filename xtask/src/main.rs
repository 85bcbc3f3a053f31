//! Build tasks that need the binaries' clap definitions: `cargo xtask
//! assets --out DIR` writes a man page (section 1, one per subcommand too)
//! and bash, zsh and fish completions for each of the four binaries.
//! `scripts/dist` runs it and packages the result.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use clap_complete::Shell;

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
        assets(cmd, &out)?;
    }
    println!("wrote man pages and completions to {}", out.display());
    Ok(())
}

fn assets(mut cmd: clap::Command, out: &Path) -> anyhow::Result<()> {
    let name = cmd.get_name().to_string();
    cmd = cmd.bin_name(&name);
    // No pages for clap's `help` subcommands (`fleetcmd-agent-help-join.1`).
    let mut man_cmd = without_help(cmd.clone());
    man_cmd.build();
    cmd.build();
    let man = out.join("man").join(&name);
    std::fs::create_dir_all(&man).with_context(|| man.display().to_string())?;
    // One page for the binary and one per subcommand (`fleetcmd-agent-join.1`).
    clap_mangen::generate_to(man_cmd, &man).with_context(|| format!("man pages of {name}"))?;
    for (shell, dir, file) in [
        (Shell::Bash, "bash", name.clone()),
        (Shell::Zsh, "zsh", format!("_{name}")),
        (Shell::Fish, "fish", format!("{name}.fish")),
    ] {
        let dir = out.join("completions").join(dir);
        std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
        let mut f = std::fs::File::create(dir.join(&file))
            .with_context(|| format!("{}/{file}", dir.display()))?;
        clap_complete::generate(shell, &mut cmd, &name, &mut f);
    }
    Ok(())
}

fn without_help(cmd: clap::Command) -> clap::Command {
    cmd.disable_help_subcommand(true)
        .mut_subcommands(without_help)
}
