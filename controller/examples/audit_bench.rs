//! Audit search latency over a large trail (issue 6 / BENCHMARKS.md):
//! appends N records (default 1 000 000: 50 actors, 200 hosts, one record
//! per 100 ms of simulated time) to a fresh store, then times the
//! actor + time-range query (a random actor, a random 1 h window, first
//! page of 50, newest first) and reports p50/p90/p99.
//!
//! cargo run --release -p fleetcmd-controller --example audit_bench -- 1000000

use std::sync::Arc;
use std::time::Instant;

use fleetcmd_controller::audit::Audit;
use fleetcmd_controller::store::{SledStore, Store};
use fleetcmd_core::audit::{Event, EventKind, Filter};

fn main() -> anyhow::Result<()> {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("db"))?);
    let audit = Audit::open(store.clone(), &dir.path().join("audit"))?;
    let t0 = 1_700_000_000_000u64;
    let start = Instant::now();
    for i in 0..n {
        let e = Event::new(EventKind::JobFinished, format!("slack:T1:U{:03}", i % 50))
            .host(format!("web-{}", i % 200))
            .command(if i % 3 == 0 { "restart" } else { "uptime" })
            .job(format!("0190aaaa-0000-7000-8000-{:012}", i / 20))
            .field("exit_code", 0)
            .field("duration_ms", i % 900)
            .detail("finished");
        audit.append_at(t0 + i * 100, e)?;
        if i % 100_000 == 99_999 {
            store.flush()?;
        }
    }
    store.flush()?;
    let append = start.elapsed();
    println!(
        "appended {n} records in {:.1}s ({:.0} records/s)",
        append.as_secs_f64(),
        n as f64 / append.as_secs_f64()
    );
    let span = n * 100;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut times = Vec::new();
    let mut total = 0usize;
    for _ in 0..200 {
        let actor = format!("slack:T1:U{:03}", next() % 50);
        let since = t0 + next() % span.saturating_sub(3_600_000).max(1);
        let f = Filter {
            actor: Some(actor),
            since_ms: Some(since),
            until_ms: Some(since + 3_600_000),
            ..Filter::default()
        };
        let s = Instant::now();
        let page = audit.search(&f, 50, None)?;
        times.push(s.elapsed());
        total += page.records.len();
    }
    times.sort();
    let p = |q: f64| times[((times.len() as f64 - 1.0) * q) as usize].as_secs_f64() * 1000.0;
    println!(
        "actor + 1h range, page of 50, 200 queries: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms ({} records returned)",
        p(0.5),
        p(0.9),
        p(0.99),
        total
    );
    // Free text needs a scan: report it too, so nobody is surprised.
    let s = Instant::now();
    let page = audit.search(
        &Filter {
            text: Some("no such text".into()),
            ..Filter::default()
        },
        50,
        None,
    )?;
    println!(
        "free-text search (no index, one call scans up to {} records): {:.0} ms, {} found, next cursor {:?}",
        fleetcmd_controller::audit::MAX_SCAN,
        s.elapsed().as_secs_f64() * 1000.0,
        page.records.len(),
        page.next_before
    );
    let s = Instant::now();
    let v = audit.verify(None)?;
    println!(
        "verify all {n}: {:.1}s ({})",
        s.elapsed().as_secs_f64(),
        if v.is_ok() { "ok" } else { "BROKEN" }
    );
    Ok(())
}
