//! What the conformance suite does not cover of the redb store: its file,
//! its lock, and durability by `flush` across a reopen.

use fleetcmd_core::state::TargetState;

use super::*;

fn result(byte: u8) -> TargetRecord {
    TargetRecord {
        result: Some(vec![byte; 3]),
        ..TargetRecord::new(TargetState::Ok, "")
    }
}

#[test]
fn flushed_writes_survive_a_reopen_and_the_file_is_one_redb_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(REDB_FILE);
    {
        let store = RedbStore::open(&path).expect("open");
        store.put_target("j1", "web-1", &result(1)).expect("put");
        store
            .put_targets("j1", &[("web-2", &result(2)), ("web-3", &result(3))])
            .expect("put");
        store.flush().expect("flush");
        // A second flush with nothing new written returns at once.
        store.flush().expect("flush again");
        assert!(store.file_bytes().expect("size") > 0);
        store.close();
        assert!(store.get_target("j1", "web-1").is_err(), "closed");
    }
    let store = RedbStore::open(&path).expect("reopen");
    let got = store.targets("j1").expect("targets");
    assert_eq!(
        got,
        vec![
            ("web-1".to_owned(), result(1)),
            ("web-2".to_owned(), result(2)),
            ("web-3".to_owned(), result(3)),
        ]
    );
    assert!(store.batches_results(), "redb takes results in batches");
}

#[test]
fn a_database_held_open_elsewhere_is_refused_with_its_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(REDB_FILE);
    let _held = RedbStore::open(&path).expect("open");
    let err = RedbStore::open(&path).expect_err("second open").to_string();
    assert!(err.contains("could not acquire lock"), "{err}");
    assert!(err.contains(&path.display().to_string()), "{err}");
}

#[test]
fn a_file_that_is_not_a_redb_database_is_refused_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(REDB_FILE);
    std::fs::write(&path, vec![0x5a; 8192]).expect("write");
    let err = RedbStore::open(&path).expect_err("garbage").to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("restore the directory from a backup"), "{err}");
}
