//! Writing private files (keys, certificates next to them): mode 0600,
//! atomically, never through a symlink, and never over something that is
//! already there unless the caller says so.
//!
//! A key is written to a fresh temporary file in the target's directory
//! (created exclusively, so a symlink or file planted at that name is never
//! opened), synced, then moved into place. Without [`Existing::Replace`]
//! the move is a hard link, which fails if the target exists, so even a
//! file created between the check and the move is never overwritten. With
//! it, only a regular file is replaced: a symlink, device node, FIFO or
//! directory at the target is refused, whatever `--force` says.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// What to do when the target already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Refuse (the default of every command that writes keys).
    Refuse,
    /// Replace it if it is a regular file (`--force`).
    Replace,
}

/// Why a private file was not written.
#[derive(thiserror::Error, Debug)]
pub enum KeyFileError {
    #[error(
        "{path}: already exists; refusing to overwrite it (pass --force to replace a regular file)"
    )]
    Exists { path: PathBuf },
    #[error("{path}: is {kind}, not a regular file; refusing to replace it")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn kind_of(t: fs::FileType) -> &'static str {
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_block_device() || t.is_char_device() {
        "a device node"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Checks what is at `path` now (without following a symlink there).
pub fn check_target(path: &Path, existing: Existing) -> Result<(), KeyFileError> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(KeyFileError::Io {
            path: path.to_owned(),
            source,
        }),
        Ok(m) if !m.file_type().is_file() => Err(KeyFileError::NotRegular {
            path: path.to_owned(),
            kind: kind_of(m.file_type()),
        }),
        Ok(_) if existing == Existing::Refuse => Err(KeyFileError::Exists {
            path: path.to_owned(),
        }),
        Ok(_) => Ok(()),
    }
}

/// Writes `contents` to `path` with mode 0600 as described in the module
/// documentation. On any error nothing is left behind and `path` is as it was.
pub fn write_private(path: &Path, contents: &[u8], existing: Existing) -> Result<(), KeyFileError> {
    let io = |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    };
    check_target(path, existing)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io(io::Error::other("the path names no file")))?;
    let tmp = dir.join(format!(
        ".{}.{:016x}.tmp",
        name.to_string_lossy(),
        random_u64()
    ));
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()
    })();
    let placed = written.map_err(io).and_then(|()| match existing {
        Existing::Refuse => fs::hard_link(&tmp, path).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                KeyFileError::Exists {
                    path: path.to_owned(),
                }
            } else {
                io(e)
            }
        }),
        Existing::Replace => {
            // Re-checked just before the rename, which replaces the directory
            // entry itself and never writes through what was there.
            check_target(path, existing)?;
            fs::rename(&tmp, path).map_err(io)
        }
    });
    let _ = fs::remove_file(&tmp);
    placed?;
    if let Ok(d) = fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("the OS random source is available");
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"))
    }

    fn read(p: &Path) -> String {
        fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    fn leftovers(d: &Path) -> Vec<String> {
        fs::read_dir(d)
            .map(|r| {
                r.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".tmp"))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn a_new_file_is_written_0600() {
        let d = dir();
        let p = d.path().join("k.key");
        write_private(&p, b"secret", Existing::Refuse).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read(&p), "secret");
        let mode = fs::metadata(&p)
            .map(|m| m.permissions().mode() & 0o777)
            .ok();
        assert_eq!(mode, Some(0o600));
        assert!(leftovers(d.path()).is_empty());
    }

    #[test]
    fn an_existing_file_is_kept_unless_replacing_is_asked_for() {
        let d = dir();
        let p = d.path().join("root.key");
        fs::write(&p, "the policy root key").unwrap_or_else(|e| panic!("{e}"));
        let err = write_private(&p, b"new", Existing::Refuse).err();
        assert!(matches!(err, Some(KeyFileError::Exists { .. })), "{err:?}");
        assert!(err.is_some_and(|e| e.to_string().contains("--force")));
        assert_eq!(read(&p), "the policy root key");
        write_private(&p, b"new", Existing::Replace).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read(&p), "new");
        assert!(leftovers(d.path()).is_empty());
    }

    #[test]
    fn symlinks_fifos_and_directories_are_never_written_through_or_replaced() {
        let d = dir();
        let victim = d.path().join("victim");
        fs::write(&victim, "untouched").unwrap_or_else(|e| panic!("{e}"));
        let link = d.path().join("link.key");
        std::os::unix::fs::symlink(&victim, &link).unwrap_or_else(|e| panic!("{e}"));
        let dangling = d.path().join("dangling.key");
        std::os::unix::fs::symlink(d.path().join("nowhere"), &dangling)
            .unwrap_or_else(|e| panic!("{e}"));
        let fifo = d.path().join("fifo.key");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        let sub = d.path().join("sub");
        fs::create_dir(&sub).unwrap_or_else(|e| panic!("{e}"));
        for (p, kind) in [
            (&link, "a symbolic link"),
            (&dangling, "a symbolic link"),
            (&fifo, "a FIFO"),
            (&sub, "a directory"),
        ] {
            for existing in [Existing::Refuse, Existing::Replace] {
                let err = write_private(p, b"key", existing).err();
                assert!(
                    err.as_ref().is_some_and(|e| e.to_string().contains(kind)),
                    "{}: {err:?}",
                    p.display()
                );
            }
        }
        assert_eq!(read(&victim), "untouched");
        assert!(!d.path().join("nowhere").exists());
        assert!(fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()));
        assert!(leftovers(d.path()).is_empty());
    }

    #[test]
    fn a_planted_temporary_name_is_not_followed() {
        // The temporary name is random and created exclusively: a symlink
        // planted at the old fixed name (`k.tmp`) is left alone.
        let d = dir();
        let victim = d.path().join("victim");
        fs::write(&victim, "untouched").unwrap_or_else(|e| panic!("{e}"));
        std::os::unix::fs::symlink(&victim, d.path().join("k.tmp"))
            .unwrap_or_else(|e| panic!("{e}"));
        let p = d.path().join("k.key");
        write_private(&p, b"secret", Existing::Refuse).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read(&victim), "untouched");
        assert_eq!(read(&p), "secret");
    }
}
