//! A plugin's manifest: `plugin.toml` beside its executable. It travels
//! with the plugin's code (its author knows the commands and the secrets it
//! needs); which plugins run and where secret values come from is the
//! operator's, in `gateway.toml` (see [`super::config`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use fleetcmd_core::policy::{PLUGIN_ACTION_PREFIX, valid_plugin_part};
use serde::Deserialize;

use super::protocol::PROTOCOL_VERSION;

/// The manifest as written.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    name: String,
    protocol: u32,
    executable: PathBuf,
    #[serde(default)]
    secrets: Vec<String>,
    #[serde(default)]
    commands: Vec<RawCommand>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawCommand {
    verb: String,
    summary: String,
    #[serde(default)]
    help: Vec<String>,
    #[serde(default)]
    args: Vec<RawArg>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawArg {
    name: String,
    #[serde(default = "default_kind")]
    kind: String,
    #[serde(default)]
    optional: bool,
}

fn default_kind() -> String {
    "word".to_string()
}

/// A checked manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub name: String,
    /// Absolute: relative paths are resolved against the manifest's folder.
    pub executable: PathBuf,
    /// Names of the environment variables the plugin needs.
    pub secrets: Vec<String>,
    pub commands: Vec<CommandSpec>,
}

/// One chat command a plugin serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandSpec {
    pub verb: String,
    pub summary: String,
    pub help: Vec<String>,
    pub args: Vec<ArgSpec>,
}

/// One positional argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArgSpec {
    pub name: String,
    pub kind: ArgKind,
    pub optional: bool,
}

/// What an argument may be; the gateway checks it before the plugin is
/// called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgKind {
    /// One word (quotes make several words one).
    Word,
    /// A decimal integer.
    Int,
}

impl CommandSpec {
    /// The policy action that guards it: `plugin:NAME.VERB`.
    pub fn action(&self, plugin: &str) -> String {
        format!("{PLUGIN_ACTION_PREFIX}{plugin}.{}", self.verb)
    }

    /// `verb <a> [b]`.
    pub fn usage(&self) -> String {
        let mut s = self.verb.clone();
        for a in &self.args {
            let kind = match a.kind {
                ArgKind::Word => "",
                ArgKind::Int => ":int",
            };
            if a.optional {
                s.push_str(&format!(" [{}{kind}]", a.name));
            } else {
                s.push_str(&format!(" <{}{kind}>", a.name));
            }
        }
        s
    }

    /// Checks the words typed after the verb against the arguments.
    pub fn check_args(&self, args: &[String]) -> Result<(), String> {
        let required = self.args.iter().filter(|a| !a.optional).count();
        if args.len() < required || args.len() > self.args.len() {
            return Err(format!(
                "{} takes {}{} argument{}; usage: {}",
                self.verb,
                if required == self.args.len() {
                    String::new()
                } else {
                    format!("{required} to ")
                },
                self.args.len(),
                if self.args.len() == 1 { "" } else { "s" },
                self.usage()
            ));
        }
        for (spec, value) in self.args.iter().zip(args) {
            if spec.kind == ArgKind::Int && value.parse::<i64>().is_err() {
                return Err(format!(
                    "argument {} must be an integer, got `{}`; usage: {}",
                    spec.name,
                    fleetcmd_core::terminal::excerpt(value),
                    self.usage()
                ));
            }
        }
        Ok(())
    }
}

/// Why a manifest was refused: every problem, each with its key.
#[derive(thiserror::Error, Debug)]
#[error("plugin manifest {}: {}", path.display(), problems.join("; "))]
pub struct ManifestError {
    pub path: PathBuf,
    pub problems: Vec<String>,
}

/// What the gateway will run must be what its operator installed: the
/// plugin's folder, its manifest and its executable writable by their owner
/// only (another local user could otherwise swap the plugin), and the
/// executable a regular file inside the folder, not a symlink (found by an
/// outside test: `/bin/sh`, `../other/…` and symlinks were accepted).
fn on_disk(manifest: &Path, dir: &Path, executable: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt as _;
    let mut problems = Vec::new();
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let foreign = super::sandbox::owned_by_another_user;
    for (what, p) in [("its folder", dir), ("the manifest", manifest)] {
        match std::fs::metadata(p) {
            Ok(m) if m.mode() & 0o022 != 0 => problems.push(format!(
                "{what} {} is writable by group or others (mode {:o}): chmod go-w it",
                p.display(),
                m.mode() & 0o777
            )),
            Ok(m) if foreign(&m) => problems.push(format!(
                "{what} {} belongs to user {}, neither root nor the gateway's user: that user could change the plugin",
                p.display(),
                m.uid()
            )),
            Ok(_) => {}
            Err(e) => problems.push(format!("{what} {}: {e}", p.display())),
        }
    }
    // Everything inside the folder is the plugin too (a module it
    // imports, a `__pycache__`): the same rules, every entry (found by the
    // third outside attack: a 0666 module another user owned passed).
    let mut seen = 0usize;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            seen += 1;
            if seen > MAX_FOLDER_ENTRIES {
                problems.push(format!(
                    "its folder {} holds more than {MAX_FOLDER_ENTRIES} entries: too many to check",
                    dir.display()
                ));
                return problems;
            }
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if foreign(&m) {
                problems.push(format!(
                    "{} in the plugin's folder belongs to user {}, neither root nor the gateway's user: that user could change the plugin",
                    e.path().display(),
                    m.uid()
                ));
            } else if !m.file_type().is_symlink() && m.mode() & 0o022 != 0 {
                problems.push(format!(
                    "{} in the plugin's folder is writable by group or others (mode {:o}): chmod go-w it",
                    e.path().display(),
                    m.mode() & 0o777
                ));
            }
            if m.is_dir() {
                stack.push(e.path());
            }
            // A link out of the folder: what it names is the plugin too
            // (a link to a module another user owned ran that user's code
            // with the plugin's secrets — fourth outside attack).
            if m.file_type().is_symlink()
                && let Ok(target) = e.path().canonicalize()
                && !dir.canonicalize().is_ok_and(|d| target.starts_with(d))
                && let Ok(t) = std::fs::metadata(&target)
            {
                if foreign(&t) {
                    problems.push(format!(
                        "{} in the plugin's folder links to {}, which belongs to user {}",
                        e.path().display(),
                        target.display(),
                        t.uid()
                    ));
                } else if t.mode() & 0o022 != 0 {
                    problems.push(format!(
                        "{} in the plugin's folder links to {}, which group or others may write (mode {:o})",
                        e.path().display(),
                        target.display(),
                        t.mode() & 0o777
                    ));
                }
            }
        }
    }
    // Whoever may rename entries in a directory above the folder — as
    // written (a link on the way) or as resolved — may put another folder
    // in its place (found by the second and third outside attacks).
    let absolute = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    for link in absolute.ancestors() {
        if let Ok(m) = link.symlink_metadata()
            && m.file_type().is_symlink()
            && foreign(&m)
        {
            problems.push(format!(
                "{} on the way to the plugin's folder is a link belonging to user {}",
                link.display(),
                m.uid()
            ));
        }
    }
    if let Ok(real) = dir.canonicalize() {
        for above in real.ancestors().skip(1) {
            match std::fs::metadata(above) {
                Ok(m) if foreign(&m) => problems.push(format!(
                    "{} above the plugin's folder belongs to user {}: that user could replace the folder",
                    above.display(),
                    m.uid()
                )),
                Ok(m) if m.mode() & 0o022 != 0 && m.mode() & 0o1000 == 0 => problems.push(format!(
                    "{} above the plugin's folder is writable by group or others without the sticky bit (mode {:o}): they could replace the folder",
                    above.display(),
                    m.mode() & 0o7777
                )),
                _ => {}
            }
        }
    }
    match std::fs::symlink_metadata(executable) {
        Err(e) => problems.push(format!("executable {}: {e}", executable.display())),
        Ok(m) if !m.file_type().is_file() => problems.push(format!(
            "executable {}: must be a regular file in the plugin's folder, not a symlink",
            executable.display()
        )),
        Ok(m) if foreign(&m) => problems.push(format!(
            "executable {} belongs to user {}, neither root nor the gateway's user: that user could change it",
            executable.display(),
            m.uid()
        )),
        Ok(m) => {
            let inside = match (dir.canonicalize(), executable.canonicalize()) {
                (Ok(d), Ok(e)) => e.starts_with(&d),
                _ => false,
            };
            if !inside {
                problems.push(format!(
                    "executable {}: must be inside the plugin's folder {}",
                    executable.display(),
                    dir.display()
                ));
            }
            if m.mode() & 0o100 == 0 {
                problems.push(format!(
                    "executable {} is not executable by its owner (mode {:o}): chmod u+x it",
                    executable.display(),
                    m.mode() & 0o777
                ));
            }
            if m.mode() & 0o022 != 0 {
                problems.push(format!(
                    "executable {} is writable by group or others (mode {:o}): chmod go-w it",
                    executable.display(),
                    m.mode() & 0o777
                ));
            }
        }
    }
    problems
}

/// Entries of a plugin's folder checked at most (a `node_modules` can be
/// large; more is refused rather than half checked).
const MAX_FOLDER_ENTRIES: usize = 20_000;

/// Verbs a plugin may not take: the gateway's own.
fn builtin_verb(verb: &str) -> bool {
    fleetcmd_core::grammar::VERBS.iter().any(|v| v.verb == verb)
}

impl Manifest {
    /// Reads and checks the manifest at `path`. The executable comes out
    /// absolute even for a relative `path`: the plugin starts in its own
    /// folder, where a relative path would name another file (found by an
    /// outside test: `-c gateway.toml` validated, then could not start it).
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let fail = |path: &Path, p: String| ManifestError {
            path: path.to_path_buf(),
            problems: vec![p],
        };
        let path = &std::path::absolute(path)
            .map_err(|e| fail(path, format!("cannot make the path absolute: {e}")))?;
        let fail = |p: String| fail(path, p);
        let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let manifest = Manifest::parse(&text, dir).map_err(|problems| ManifestError {
            path: path.to_path_buf(),
            problems,
        })?;
        let problems = on_disk(path, dir, &manifest.executable);
        if problems.is_empty() {
            Ok(manifest)
        } else {
            Err(ManifestError {
                path: path.to_path_buf(),
                problems,
            })
        }
    }

    /// Parses manifest text; relative executables are taken from `dir`.
    pub fn parse(text: &str, dir: &Path) -> Result<Manifest, Vec<String>> {
        let raw: RawManifest = toml::from_str(text).map_err(|e| vec![e.to_string()])?;
        let mut problems = Vec::new();
        if !valid_plugin_part(&raw.name) {
            problems.push(format!(
                "name: \"{}\" must be 1-64 of a-z, 0-9, _ and -, starting with a letter or digit",
                raw.name
            ));
        }
        if raw.protocol != PROTOCOL_VERSION {
            problems.push(format!(
                "protocol: this gateway speaks protocol {PROTOCOL_VERSION}, the manifest asks for {}",
                raw.protocol
            ));
        }
        let executable = if raw.executable.is_absolute() {
            raw.executable
        } else {
            dir.join(raw.executable)
        };
        let mut seen = BTreeSet::new();
        for s in &raw.secrets {
            let ok = !s.is_empty()
                && s.bytes()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_')
                && !s.as_bytes()[0].is_ascii_digit();
            if !ok {
                problems.push(format!(
                    "secrets: \"{s}\" must be an environment variable name (A-Z, 0-9, _)"
                ));
            }
            if s == "PATH" {
                problems.push("secrets: PATH is set by the gateway".to_string());
            }
            if !seen.insert(s.clone()) {
                problems.push(format!("secrets: \"{s}\" is listed twice"));
            }
        }
        if raw.commands.is_empty() {
            problems.push("commands: a plugin needs at least one command".to_string());
        }
        let mut verbs = BTreeSet::new();
        let mut commands = Vec::new();
        for (i, c) in raw.commands.into_iter().enumerate() {
            let key = format!("commands[{i}]");
            if !valid_plugin_part(&c.verb) {
                problems.push(format!(
                    "{key}.verb: \"{}\" must be 1-64 of a-z, 0-9, _ and -, starting with a letter or digit",
                    c.verb
                ));
            } else if builtin_verb(&c.verb) {
                problems.push(format!("{key}.verb: \"{}\" is a built-in command", c.verb));
            }
            if !verbs.insert(c.verb.clone()) {
                problems.push(format!("{key}.verb: \"{}\" is listed twice", c.verb));
            }
            if c.summary.trim().is_empty() {
                problems.push(format!("{key}.summary: must not be empty"));
            }
            let mut args = Vec::new();
            let mut optional_seen = false;
            for (j, a) in c.args.into_iter().enumerate() {
                let akey = format!("{key}.args[{j}]");
                let kind = match a.kind.as_str() {
                    "word" => ArgKind::Word,
                    "int" => ArgKind::Int,
                    other => {
                        problems.push(format!("{akey}.kind: \"{other}\" is not one of word, int"));
                        ArgKind::Word
                    }
                };
                if a.name.is_empty() {
                    problems.push(format!("{akey}.name: must not be empty"));
                }
                if optional_seen && !a.optional {
                    problems.push(format!("{akey}: a required argument after an optional one"));
                }
                optional_seen |= a.optional;
                args.push(ArgSpec {
                    name: a.name,
                    kind,
                    optional: a.optional,
                });
            }
            commands.push(CommandSpec {
                verb: c.verb,
                summary: c.summary,
                help: c.help,
                args,
            });
        }
        if problems.is_empty() {
            Ok(Manifest {
                name: raw.name,
                executable,
                secrets: raw.secrets,
                commands,
            })
        } else {
            Err(problems)
        }
    }

    pub fn command(&self, verb: &str) -> Option<&CommandSpec> {
        self.commands.iter().find(|c| c.verb == verb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "deploy"
protocol = 1
executable = "deploy.py"
secrets = ["DEPLOY_TOKEN"]

[[commands]]
verb = "rollback"
summary = "Roll an app back"
help = ["rolls back to the previous release"]
args = [{ name = "app" }, { name = "steps", kind = "int", optional = true }]
"#;

    #[test]
    fn a_manifest_resolves_its_executable_and_checks_arguments() {
        let m = Manifest::parse(GOOD, Path::new("/opt/p")).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(m.executable, Path::new("/opt/p/deploy.py"));
        let c = m.command("rollback").unwrap_or_else(|| panic!("rollback"));
        assert_eq!(c.usage(), "rollback <app> [steps:int]");
        assert_eq!(c.action("deploy"), "plugin:deploy.rollback");
        assert!(c.check_args(&["web".into()]).is_ok());
        assert!(c.check_args(&["web".into(), "2".into()]).is_ok());
        let e = c.check_args(&[]).err().unwrap_or_default();
        assert!(e.contains("takes 1 to 2 arguments"), "{e}");
        let e = c
            .check_args(&["web".into(), "two".into()])
            .err()
            .unwrap_or_default();
        assert!(e.contains("steps must be an integer, got `two`"), "{e}");
    }

    #[test]
    fn every_problem_is_named_at_once() {
        let bad = r#"
name = "Deploy"
protocol = 2
executable = "x"
secrets = ["PATH", "lower"]
[[commands]]
verb = "run"
summary = ""
args = [{ name = "a", optional = true }, { name = "b", kind = "float" }]
"#;
        let problems = Manifest::parse(bad, Path::new("/"))
            .err()
            .unwrap_or_default();
        for part in [
            "name: \"Deploy\"",
            "protocol: this gateway speaks protocol 1",
            "PATH is set by the gateway",
            "\"lower\" must be an environment variable name",
            "\"run\" is a built-in command",
            "summary: must not be empty",
            "\"float\" is not one of word, int",
            "a required argument after an optional one",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(part)),
                "{part} not in {problems:?}"
            );
        }
        let e = Manifest::parse(
            "name = \"x\"\nprotocol = 1\nexecutable = \"x\"\nroutes = []\n",
            Path::new("/"),
        )
        .err()
        .unwrap_or_default();
        assert!(
            e.iter().any(|p| p.contains("unknown field `routes`")),
            "{e:?}"
        );
    }

    /// The plugin on disk is what the operator installed: see [`on_disk`].
    #[test]
    fn what_runs_is_a_private_regular_file_inside_the_plugins_folder() {
        use std::os::unix::fs::PermissionsExt as _;
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("p");
        std::fs::create_dir(&dir).expect("dir");
        let chmod = |p: &Path, mode: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod")
        };
        chmod(&dir, 0o755);
        let manifest = dir.join("plugin.toml");
        let write = |exe: &str| {
            std::fs::write(
                &manifest,
                format!("name = \"p\"\nprotocol = 1\nexecutable = \"{exe}\"\n[[commands]]\nverb = \"pp\"\nsummary = \"s\"\n"),
            )
            .expect("manifest");
            chmod(&manifest, 0o644);
        };
        std::fs::write(dir.join("p.sh"), "#!/bin/sh\n").expect("exe");
        chmod(&dir.join("p.sh"), 0o755);
        write("p.sh");
        Manifest::load(&manifest).unwrap_or_else(|e| panic!("{e}"));
        let refused = |want: &str| {
            let e = Manifest::load(&manifest).expect_err(want).to_string();
            assert!(e.contains(want), "{want}: {e}");
        };
        let other = root.path().join("other.sh");
        std::fs::write(&other, "#!/bin/sh\n").expect("exe");
        write(&other.display().to_string());
        refused("must be inside the plugin's folder");
        write("../other.sh");
        refused("must be inside the plugin's folder");
        std::os::unix::fs::symlink("/bin/sh", dir.join("link")).expect("symlink");
        write("link");
        refused("not a symlink");
        write("p.sh");
        chmod(&dir.join("p.sh"), 0o777);
        refused("writable by group or others");
        chmod(&dir.join("p.sh"), 0o755);
        chmod(&dir, 0o777);
        refused("its folder");
        chmod(&dir, 0o755);
        chmod(&manifest, 0o666);
        let e = Manifest::load(&manifest).expect_err("manifest").to_string();
        assert!(e.contains("the manifest"), "{e}");
    }
}
