//! Crash-loop helper: writes results through the controller's `Store` as
//! fast as it can, in group commits, and prints the index of each record
//! only after `flush` returned — the same "acknowledge after durable" order
//! the controller uses. The crash-loop test `kill -9`s it at random moments.
//!
//! usage: store-writer DATA_DIR FIRST_INDEX [sled|redb]
//! (the store in DATA_DIR as the controller keeps it; sled by default)

use std::io::Write;

use fleetcmd_controller::store::{DEFAULT_CACHE_BYTES, Embedded};

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: store-writer DATA_DIR FIRST_INDEX [sled|redb]";
    let (Some(dir), Some(first)) = (args.next(), args.next()) else {
        eprintln!("{usage}");
        std::process::exit(64);
    };
    let Ok(mut next) = first.parse::<u64>() else {
        eprintln!("FIRST_INDEX must be a number, got {first:?}");
        std::process::exit(64);
    };
    let backend = match args.next().as_deref() {
        None | Some("sled") => Embedded::Sled,
        Some("redb") => Embedded::Redb,
        Some(other) => {
            eprintln!("the store must be sled or redb, got {other:?}; {usage}");
            std::process::exit(64);
        }
    };
    // The checker reopens the database between kills; sled releases its
    // file lock from a background thread shortly after the handle is
    // dropped, so wait (bounded) for it rather than fail.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let store = loop {
        match backend.open(std::path::Path::new(&dir), DEFAULT_CACHE_BYTES) {
            Ok(s) => break s,
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => {
                eprintln!("open: {e}");
                std::process::exit(2);
            }
        }
    };
    let mut out = std::io::stdout().lock();
    loop {
        // Group commit: a batch of 1..=16 writes, one flush, then the acks.
        let batch = 1 + next % 16;
        for i in next..next + batch {
            if let Err(e) = store.put_target(
                &fleetcmd_tests::crash::job_key(i),
                "agent",
                &fleetcmd_tests::crash::record(i),
            ) {
                eprintln!("write {i}: {e}");
                std::process::exit(3);
            }
        }
        if let Err(e) = store.flush() {
            eprintln!("flush: {e}");
            std::process::exit(3);
        }
        next += batch;
        if writeln!(out, "{}", next - 1)
            .and_then(|_| out.flush())
            .is_err()
        {
            return;
        }
    }
}
