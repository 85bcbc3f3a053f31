//! How `fleetcmd init` puts the fleet on disk: into a directory only its
//! user can change, every file and directory with an explicit mode whatever
//! the umask, and never into or over something that is already there.
//!
//! An outside test ran init under `umask 000`: the operator's env file
//! (which people `source`), the configs and the policy came out 0666 in a
//! 0777 directory, and a 0777 `--dir` owned by `nobody` was accepted, so
//! another user could rewrite the policy before the admin signed it.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io::Write as _;
use std::os::unix::fs::{
    DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};

/// The fleet's own directory: what is in it is public (policy, certificates)
/// or lives in a private sub-directory.
pub const TOP_DIR_MODE: u32 = 0o755;
/// Directories holding keys, tokens and the controller's database.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// Configs, the policy and its signature, certificates, public keys.
pub const PUBLIC_FILE_MODE: u32 = 0o644;
/// Keys, join lines, the operator's env file (what it points at is secret,
/// and a shell runs it).
pub const SECRET_FILE_MODE: u32 = 0o600;

/// Why a `--dir` is not a safe place for a new fleet.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DirProblem {
    #[error(
        "{dir}: a symlink to {target}, which does not exist: create that directory \
         (mkdir -m 0755) or give --dir a new path"
    )]
    DanglingSymlink { dir: String, target: String },
    #[error("{dir}: not a directory: give --dir a new path")]
    NotADirectory { dir: String },
    #[error(
        "{dir}: owned by uid {owner}, not you (uid {me}): another user could replace the \
         policy or keys init writes there; give --dir a directory of your own or a new path"
    )]
    OtherOwner { dir: String, owner: u32, me: u32 },
    #[error(
        "{dir}: writable by group or others (mode {mode:o}): they could replace the policy \
         before you sign it; chmod 0755 it or give --dir a new path"
    )]
    Writable { dir: String, mode: u32 },
    #[error("{dir} is not empty: init writes a new fleet into a new directory")]
    NotEmpty { dir: String },
    #[error("{dir}: {error}")]
    Io { dir: String, error: String },
}

/// Checks an existing `--dir` (following a symlink to it): a directory, ours,
/// not writable by anyone else (unless sticky: nobody can then remove or
/// rename what we create, and every file is created exclusively), empty.
/// `Ok(false)`: nothing there yet.
pub fn check_dir(dir: &Path, me: u32) -> Result<bool, DirProblem> {
    let name = dir.display().to_string();
    let io = |e: std::io::Error| DirProblem::Io {
        dir: name.clone(),
        error: e.to_string(),
    };
    let link = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io(e)),
    };
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && link.file_type().is_symlink() => {
            let target = std::fs::read_link(dir).map_err(io)?;
            return Err(DirProblem::DanglingSymlink {
                dir: name,
                target: target.display().to_string(),
            });
        }
        Err(e) => return Err(io(e)),
    };
    if !meta.is_dir() {
        return Err(DirProblem::NotADirectory { dir: name });
    }
    if meta.uid() != me {
        return Err(DirProblem::OtherOwner {
            dir: name,
            owner: meta.uid(),
            me,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(DirProblem::Writable { dir: name, mode });
    }
    if std::fs::read_dir(dir).map_err(io)?.next().is_some() {
        return Err(DirProblem::NotEmpty { dir: name });
    }
    Ok(true)
}

/// The fleet's directory, checked ([`check_dir`]) or created with
/// [`TOP_DIR_MODE`], and its private sub-directories; its absolute path.
pub fn prepare_dir(dir: &Path, subdirs: &[&str]) -> Result<PathBuf, DirProblem> {
    let io = |e: std::io::Error| DirProblem::Io {
        dir: dir.display().to_string(),
        error: e.to_string(),
    };
    if !check_dir(dir, effective_uid())? {
        DirBuilder::new()
            .recursive(true)
            .mode(TOP_DIR_MODE)
            .create(dir)
            .map_err(io)?;
        set_mode(dir, TOP_DIR_MODE).map_err(io)?;
    }
    let dir = std::fs::canonicalize(dir).map_err(io)?;
    for sub in subdirs {
        let path = dir.join(sub);
        let io = |e: std::io::Error| DirProblem::Io {
            dir: path.display().to_string(),
            error: e.to_string(),
        };
        // Created with the mode (the umask can only take bits away), then
        // set exactly; `create` fails on anything already there.
        DirBuilder::new()
            .mode(PRIVATE_DIR_MODE)
            .create(&path)
            .map_err(io)?;
        set_mode(&path, PRIVATE_DIR_MODE).map_err(io)?;
    }
    Ok(dir)
}

/// Writes a new file (never an existing one, never through a symlink) with
/// exactly `mode`.
pub fn write_new(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)?;
        f.set_permissions(Permissions::from_mode(mode))?;
        f.write_all(contents)?;
        f.sync_all()
    })();
    written.map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// [`write_new`] with [`PUBLIC_FILE_MODE`].
pub fn write_public(path: &Path, contents: impl AsRef<[u8]>) -> std::io::Result<()> {
    write_new(path, contents.as_ref(), PUBLIC_FILE_MODE)
}

/// [`write_new`] with [`SECRET_FILE_MODE`].
pub fn write_secret(path: &Path, contents: impl AsRef<[u8]>) -> std::io::Result<()> {
    write_new(path, contents.as_ref(), SECRET_FILE_MODE)
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    std::fs::set_permissions(path, Permissions::from_mode(mode))
}

/// Makes everything this process creates from now on private to its user
/// unless given a mode explicitly: the controller init runs for a moment
/// creates its database and key directories with the umask's modes (0777
/// under `umask 000`). A process-wide setting, and init is the whole
/// process.
#[allow(unsafe_code)]
pub fn private_umask() {
    // SAFETY: umask has no preconditions and cannot fail.
    unsafe {
        libc::umask(0o077);
    }
}

#[allow(unsafe_code)]
fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).expect("stat").mode() & 0o7777
    }

    #[test]
    fn a_dir_is_checked_before_anything_is_written() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let me = effective_uid();
        let d = |name: &str, m: u32| {
            let p = tmp.path().join(name);
            std::fs::create_dir(&p).expect("mkdir");
            set_mode(&p, m).expect("chmod");
            p
        };
        assert_eq!(check_dir(&tmp.path().join("new"), me), Ok(false));
        assert_eq!(check_dir(&d("mine", 0o755), me), Ok(true));
        assert_eq!(check_dir(&d("sticky", 0o1777), me), Ok(true));
        let open = d("open", 0o777);
        assert_eq!(
            check_dir(&open, me),
            Err(DirProblem::Writable {
                dir: open.display().to_string(),
                mode: 0o777
            })
        );
        let group = d("group", 0o775);
        assert!(matches!(
            check_dir(&group, me),
            Err(DirProblem::Writable { mode: 0o775, .. })
        ));
        let theirs = d("theirs", 0o755);
        assert!(matches!(
            check_dir(&theirs, me.wrapping_add(1)),
            Err(DirProblem::OtherOwner { .. })
        ));
        let used = d("used", 0o700);
        std::fs::write(used.join("x"), "x").expect("write");
        assert!(matches!(
            check_dir(&used, me),
            Err(DirProblem::NotEmpty { .. })
        ));
        let file = tmp.path().join("file");
        std::fs::write(&file, "x").expect("write");
        assert!(matches!(
            check_dir(&file, me),
            Err(DirProblem::NotADirectory { .. })
        ));
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(tmp.path().join("nowhere"), &link).expect("symlink");
        let err = check_dir(&link, me).expect_err("dangling");
        assert!(
            err.to_string().contains(&link.display().to_string())
                && err.to_string().contains("nowhere")
                && err.to_string().contains("does not exist"),
            "{err}"
        );
        // A symlink to a directory of ours is that directory.
        let to_mine = tmp.path().join("to-mine");
        std::os::unix::fs::symlink(tmp.path().join("sticky"), &to_mine).expect("symlink");
        assert_eq!(check_dir(&to_mine, me), Ok(true));
    }

    #[test]
    fn files_get_their_mode_whatever_was_there() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let p = tmp.path().join("policy.toml");
        write_public(&p, "x").expect("write");
        assert_eq!(mode(&p), 0o644);
        let s = tmp.path().join("a.env");
        write_secret(&s, "x").expect("write");
        assert_eq!(mode(&s), 0o600);
        // Never over an existing file, nor through a symlink.
        let err = write_public(&p, "y").expect_err("exists");
        assert!(err.to_string().contains("policy.toml"), "{err}");
        assert_eq!(std::fs::read_to_string(&p).expect("read"), "x");
        let link = tmp.path().join("l");
        std::os::unix::fs::symlink(tmp.path().join("elsewhere"), &link).expect("symlink");
        assert!(write_public(&link, "y").is_err());
        assert!(!tmp.path().join("elsewhere").exists());
    }
}
