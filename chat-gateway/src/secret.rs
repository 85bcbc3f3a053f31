//! Secrets from `gateway.toml`: given inline or as a file, redacted in
//! `Debug`, never logged. Every component reads its tokens, keys and
//! webhook secrets through this module.

use std::path::{Path, PathBuf};

use fleetcmd_core::crypto::Secret;
use serde::{Deserialize, Deserializer};

/// A secret from the config file: redacted in `Debug`, comparable so the
/// config structs can derive `PartialEq`.
#[derive(Clone, Debug)]
pub struct SecretString(pub Secret<String>);

impl SecretString {
    pub fn new(s: impl Into<String>) -> SecretString {
        SecretString(Secret::new(s.into()))
    }
    pub fn expose(&self) -> &str {
        self.0.expose()
    }
}

impl PartialEq for SecretString {
    fn eq(&self, other: &SecretString) -> bool {
        self.expose() == other.expose()
    }
}
impl Eq for SecretString {}

impl<'de> Deserialize<'de> for SecretString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<SecretString, D::Error> {
        let s = String::deserialize(d).map(SecretString::new)?;
        INLINE_SEEN.with(|n| n.set(n.get().map(|k| k + 1)));
        Ok(s)
    }
}

thread_local! {
    /// Inline secret values read inside [`counting_inline`] on this thread.
    static INLINE_SEEN: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Runs `parse` and counts the inline secret values it deserialized (the
/// config types know which keys are secrets; this asks them without a list
/// of key names that could drift).
pub fn counting_inline<T>(parse: impl FnOnce() -> T) -> (T, usize) {
    let before = INLINE_SEEN.with(|n| n.replace(Some(0)));
    let out = parse();
    let seen = INLINE_SEEN.with(|n| n.replace(before)).unwrap_or(0);
    (out, seen)
}

/// Inline secret values are refused in a config file every local user may
/// read (found by an outside test: tokens in a 0644 gateway.toml were
/// accepted without a word); the file is checked like a secret file. A
/// file that cannot be read here (a test's text) is not judged.
pub fn check_inline_allowed(config: &Path, inline: usize) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    if inline == 0 {
        return Ok(());
    }
    let Ok(meta) = std::fs::metadata(config) else {
        return Ok(());
    };
    let mode = meta.permissions().mode();
    if mode & 0o007 == 0 {
        return Ok(());
    }
    Err(format!(
        "{} holds {inline} secret value(s) inline and is readable or writable by every local user (mode {:o}): chmod o-rwx it, or give each secret as `NAME_file` pointing at a private file",
        config.display(),
        mode & 0o777
    ))
}

/// Whether a file holding a secret (a key, a token, a password) keeps it
/// from other local users: no permission bits for "others" (group read is
/// how the packages share a key with the `fleetcmd` group). A key anyone on
/// the host can read lets them sign jobs as every chat user the gateway
/// speaks for (found by an outside test: a 0644 signing key and a 0666
/// password file were taken without a word).
pub fn check_private_file(path: &Path) -> Result<(), String> {
    kept_private(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Reads a secret file, refused (`PermissionDenied`) when other local users
/// may read or write it ([`check_private_file`]): every secret file the
/// gateway reads goes through here.
pub fn read_private(path: &Path) -> std::io::Result<String> {
    kept_private(path)?;
    std::fs::read_to_string(path)
}

/// Writes a secret file 0600, for unit tests.
#[cfg(test)]
pub(crate) fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text).expect("secret file written");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

fn kept_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path)?.permissions().mode();
    if mode & 0o007 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "readable or writable by every local user (mode {:o}): chmod o-rwx it (0600, or 0640 for the service's group)",
                mode & 0o777
            ),
        ));
    }
    Ok(())
}

/// A secret given inline or as a file: every problem, keyed `at.name`.
pub fn check_secret(
    p: &mut Vec<(String, String)>,
    at: &str,
    name: &str,
    inline: &Option<SecretString>,
    file: &Option<PathBuf>,
) {
    match (inline, file) {
        (Some(_), Some(_)) => p.push((
            format!("{at}.{name}"),
            format!("give either `{name}` or `{name}_file`, not both"),
        )),
        (Some(s), None) if s.expose().trim().is_empty() => {
            p.push((format!("{at}.{name}"), "must not be empty".into()))
        }
        (None, Some(f)) => match read_file(f) {
            Ok(s) if s.is_empty() => p.push((
                format!("{at}.{name}_file"),
                format!("{}: empty", f.display()),
            )),
            Ok(_) => {}
            Err(e) => p.push((format!("{at}.{name}_file"), e)),
        },
        _ => {}
    }
}

/// The secret's value (read from the file when given), if any.
pub fn load_secret(
    inline: &Option<SecretString>,
    file: &Option<PathBuf>,
    key: &str,
) -> Result<Option<Secret<String>>, String> {
    match (inline, file) {
        (Some(s), _) => Ok(Some(Secret::new(s.expose().trim().to_string()))),
        (None, Some(f)) => read_file(f)
            .map(|s| Some(Secret::new(s)))
            .map_err(|e| format!("{key}_file: {e}")),
        (None, None) => Ok(None),
    }
}

/// A secret file's value: its content with surrounding whitespace (the
/// trailing newline editors add) removed. The one way secret files are
/// read (through [`read_private`]); the error names the file.
pub fn read_file(path: &Path) -> Result<String, String> {
    read_private(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Where a secret's value comes from when it is not written in the file
/// itself: `{ file = "…" }` or `{ env = "VAR" }` (an environment variable
/// of the gateway).
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
}

impl SecretSource {
    /// Makes a relative file path relative to `base` (the config file's
    /// directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        if let SecretSource::File(f) = self
            && f.is_relative()
        {
            *f = base.join(&*f);
        }
    }

    /// The value: one non-empty line (surrounding whitespace removed), so
    /// it can be passed on as an environment variable.
    pub fn load(&self) -> Result<Secret<String>, String> {
        let (value, from) = match self {
            SecretSource::File(path) => (read_file(path)?, path.display().to_string()),
            SecretSource::Env(var) => (
                std::env::var(var)
                    .map(|v| v.trim().to_string())
                    .map_err(|_| format!("environment variable {var} is not set"))?,
                format!("${var}"),
            ),
        };
        if value.is_empty() || value.contains(['\r', '\n', '\0']) {
            return Err(format!("{from} must hold one non-empty line"));
        }
        Ok(Secret::new(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_secrets_are_refused_in_a_config_others_may_read() {
        use std::os::unix::fs::PermissionsExt as _;
        #[derive(Deserialize)]
        struct Section {
            token: Option<SecretString>,
            #[allow(dead_code)]
            url: String,
        }
        let (s, n) = counting_inline(|| {
            toml::from_str::<Section>("token = \"t0k\"\nurl = \"x\"").map_err(|e| e.to_string())
        });
        assert!(s.is_ok_and(|s| s.token.is_some()));
        assert_eq!(n, 1);
        // Outside a count nothing is counted, and counts do not leak.
        let _ = toml::from_str::<Section>("token = \"t0k\"\nurl = \"x\"");
        assert_eq!(counting_inline(|| ()).1, 0);

        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let file = dir.path().join("gateway.toml");
        std::fs::write(&file, "").unwrap_or_else(|e| panic!("{e}"));
        let chmod = |m| {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(m))
                .unwrap_or_else(|e| panic!("{e}"))
        };
        chmod(0o644);
        let e = check_inline_allowed(&file, 2).expect_err("refused");
        assert!(
            e.contains("holds 2 secret value(s) inline") && e.contains("mode 644"),
            "{e}"
        );
        assert_eq!(check_inline_allowed(&file, 0), Ok(()));
        chmod(0o640);
        assert_eq!(check_inline_allowed(&file, 2), Ok(()));
    }

    #[test]
    fn a_secret_source_gives_one_trimmed_line_or_names_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let write = |name: &str, text: &str| {
            write_private(&dir.path().join(name), text);
            SecretSource::File(PathBuf::from(name))
        };
        let load = |mut s: SecretSource| {
            s.resolve_paths(dir.path());
            s.load().map(|v| v.expose().clone())
        };
        assert_eq!(load(write("ok", "s3cret\n")), Ok("s3cret".to_string()));
        let two = load(write("two", "a\nb\n")).expect_err("refused");
        assert!(two.ends_with("two must hold one non-empty line"), "{two}");
        let empty = load(write("empty", "\n")).expect_err("refused");
        assert!(
            empty.ends_with("empty must hold one non-empty line"),
            "{empty}"
        );
        let missing = load(SecretSource::File("missing".into())).expect_err("refused");
        assert!(missing.contains("missing: "), "{missing}");
        let unset =
            load(SecretSource::Env("FLEETCMD_TEST_UNSET_SECRET".into())).expect_err("refused");
        assert_eq!(
            unset,
            "environment variable FLEETCMD_TEST_UNSET_SECRET is not set"
        );
    }
}
