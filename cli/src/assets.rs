//! Man pages and shell completions, generated from clap definitions so they
//! cannot drift from the flags. `fleetcmd man` and `fleetcmd completions
//! SHELL` print them for a binary installed without its package;
//! `cargo xtask assets` writes them for every binary into the packages.

use std::io::Write;
use std::path::Path;

use clap::ValueEnum;

/// The shells completions are written for.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

impl CompletionShell {
    pub const ALL: [CompletionShell; 3] = [Self::Bash, Self::Zsh, Self::Fish];

    fn shell(self) -> clap_complete::Shell {
        match self {
            Self::Bash => clap_complete::Shell::Bash,
            Self::Zsh => clap_complete::Shell::Zsh,
            Self::Fish => clap_complete::Shell::Fish,
        }
    }

    /// The folder (under `completions/`) and file name the shell's
    /// completion loader looks for, as the packages install them.
    pub fn file(self, bin: &str) -> (&'static str, String) {
        match self {
            Self::Bash => ("bash", bin.to_string()),
            Self::Zsh => ("zsh", format!("_{bin}")),
            Self::Fish => ("fish", format!("{bin}.fish")),
        }
    }
}

/// The command as its pages and completions name it: its own name as the
/// binary's, without clap's `help` subcommands (no `fleetcmd-help-run.1`).
fn prepared(cmd: clap::Command) -> clap::Command {
    let name = cmd.get_name().to_string();
    let mut cmd = without_help(cmd.bin_name(name));
    cmd.build();
    cmd
}

fn without_help(cmd: clap::Command) -> clap::Command {
    cmd.disable_help_subcommand(true)
        .mut_subcommands(without_help)
}

/// `shell`'s completion script for `cmd`. Built in memory: clap_complete
/// panics when its writer fails (a closed pipe), so the caller writes it.
pub fn completions(cmd: clap::Command, shell: CompletionShell) -> Vec<u8> {
    let mut cmd = prepared(cmd);
    let name = cmd.get_name().to_string();
    let mut out = Vec::new();
    clap_complete::generate(shell.shell(), &mut cmd, name, &mut out);
    out
}

/// Writes the man page (roff) of `cmd`, or of its subcommand `sub`
/// (`fleetcmd-run(1)`); an unknown `sub` is an error naming the known ones.
pub fn man_page(cmd: clap::Command, sub: Option<&str>, out: &mut dyn Write) -> anyhow::Result<()> {
    let cmd = prepared(cmd);
    let page = match sub {
        None => cmd,
        Some(sub) => {
            let name = cmd.get_name().to_string();
            // Hidden subcommands (`fleetcmd dev-controller`, started by
            // `fleetcmd dev`) have no page.
            let pages = || cmd.get_subcommands().filter(|c| !c.is_hide_set());
            let found = pages()
                .find(|c| c.get_name() == sub)
                .cloned()
                .ok_or_else(|| {
                    let known: Vec<&str> = pages().map(|c| c.get_name()).collect();
                    anyhow::anyhow!(
                        "{name} has no subcommand {sub:?}; man pages: {}",
                        known.join(", ")
                    )
                })?;
            // Built: its display name is already `BIN-SUB`, the page's title.
            found
        }
    };
    clap_mangen::Man::new(page).render(out)?;
    Ok(())
}

/// Writes `DIR/man/BIN/*.1` (one page for the binary and one per
/// subcommand) and `DIR/completions/{bash,zsh,fish}/` for `cmd`.
pub fn write_all(cmd: clap::Command, dir: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let cmd = prepared(cmd);
    let name = cmd.get_name().to_string();
    let man = dir.join("man").join(&name);
    std::fs::create_dir_all(&man).with_context(|| man.display().to_string())?;
    clap_mangen::generate_to(cmd.clone(), &man).with_context(|| format!("man pages of {name}"))?;
    for shell in CompletionShell::ALL {
        let (folder, file) = shell.file(&name);
        let folder = dir.join("completions").join(folder);
        std::fs::create_dir_all(&folder).with_context(|| folder.display().to_string())?;
        let path = folder.join(&file);
        std::fs::write(&path, completions(cmd.clone(), shell))
            .with_context(|| path.display().to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn a_subcommand_page_is_named_after_the_binary_and_unknown_ones_are_named() {
        let mut out = Vec::new();
        man_page(crate::cli_args::Cli::command(), Some("run"), &mut out).expect("page");
        let page = String::from_utf8(out).expect("utf-8");
        assert!(page.contains(".TH fleetcmd-run 1"), "{page}");
        let err = man_page(
            crate::cli_args::Cli::command(),
            Some("nope"),
            &mut Vec::new(),
        )
        .expect_err("no such subcommand");
        assert!(
            err.to_string()
                .starts_with("fleetcmd has no subcommand \"nope\"; man pages: dev, init"),
            "{err}"
        );
    }
}
