//! Which embedded store a controller opens in its data dir, and the
//! refusal to open a data dir that holds the other one's files: sled
//! keeps the directory `db`, redb the file `db.redb`. Starting with the
//! other choice would silently begin an empty fleet beside the real one.

use std::path::Path;
use std::sync::Arc;

use super::{REDB_FILE, RedbStore, SLED_DIR, SledStore, Store, StoreError};

/// The embedded backends (`store = "sled"` or `"redb"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Embedded {
    /// The default.
    #[default]
    Sled,
    Redb,
}

impl Embedded {
    pub fn name(self) -> &'static str {
        match self {
            Embedded::Sled => "sled",
            Embedded::Redb => "redb",
        }
    }

    /// Where this backend's files live in `data_dir`.
    pub fn path(self, data_dir: &Path) -> std::path::PathBuf {
        data_dir.join(match self {
            Embedded::Sled => SLED_DIR,
            Embedded::Redb => REDB_FILE,
        })
    }

    fn other(self) -> Embedded {
        match self {
            Embedded::Sled => Embedded::Redb,
            Embedded::Redb => Embedded::Sled,
        }
    }

    /// Opens this backend's store in `data_dir` with a page cache of at
    /// most `cache_bytes`; refuses a data dir holding the other backend's
    /// files.
    pub fn open(self, data_dir: &Path, cache_bytes: u64) -> Result<Arc<dyn Store>, StoreError> {
        let other = self.other().path(data_dir);
        if other.exists() {
            return Err(StoreError::Open {
                path: data_dir.display().to_string(),
                reason: format!(
                    "it holds a {} store ({}), and the configuration says store = \"{}\"; set store = \"{}\" to use it",
                    self.other().name(),
                    other.display(),
                    self.name(),
                    self.other().name()
                ),
            });
        }
        let path = self.path(data_dir);
        Ok(match self {
            Embedded::Sled => Arc::new(SledStore::open_with_cache(&path, cache_bytes)?),
            Embedded::Redb => Arc::new(RedbStore::open_with_cache(&path, cache_bytes)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::TargetRecord;
    use fleetcmd_core::state::TargetState;

    #[test]
    fn a_data_dir_holding_the_other_backends_files_is_refused() {
        for (written, asked) in [
            (Embedded::Sled, Embedded::Redb),
            (Embedded::Redb, Embedded::Sled),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = written.open(dir.path(), 1 << 20).expect("open");
            store
                .put_target("j1", "web-1", &TargetRecord::new(TargetState::Ok, ""))
                .expect("put");
            store.flush().expect("flush");
            store.close();
            drop(store);
            let err = asked
                .open(dir.path(), 1 << 20)
                .err()
                .expect("the other backend is refused")
                .to_string();
            assert!(
                err.contains(&format!("it holds a {} store", written.name()))
                    && err.contains(&format!("set store = \"{}\"", written.name())),
                "{err}"
            );
            // The right choice still opens it, with its data.
            let store = written.open(dir.path(), 1 << 20).expect("reopen");
            assert_eq!(store.targets("j1").expect("targets").len(), 1);
        }
    }
}
