//! The bus on PostgreSQL `LISTEN`/`NOTIFY`: one connection of its own per
//! controller (not the store's: a listening session must be polled for
//! notifications all the time, and the store's connection serves one
//! operation at a time). It listens on [`super::CHANNEL`] and sends the
//! outbox with `pg_notify` — up to [`BATCH`] signals in one statement.
//! PostgreSQL delivers a notification to every listening session,
//! the sender's own included, after the sending transaction commits.
//!
//! When the connection breaks (PostgreSQL restarted, a network cut) it
//! connects again with a capped backoff, and after every (re)connect the
//! inbox gets [`Signal::Resync`]: what was sent meanwhile is read from the
//! store. Signals queued while it was down are sent after it is back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_postgres::AsyncMessage;

use super::{Bus, INBOX, OUTBOX, Signal};
use crate::store::StoreError;
use crate::store::postgres::PostgresOptions;

/// Signals sent in one `pg_notify` statement at most.
pub const BATCH: usize = 256;
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The bus of a controller on PostgreSQL: its sending half, the signals
/// received (the caller follows them), and the task that owns the
/// connection (it ends when `stop` turns true or the inbox is dropped).
pub struct PgBus {
    pub bus: Bus,
    pub inbox: mpsc::Receiver<Signal>,
    pub task: JoinHandle<()>,
}

/// Starts the bus's connection task on the current runtime. Fails only on
/// a URL or TLS setting that can never work; an unreachable server is
/// retried by the task.
pub fn start(opts: &PostgresOptions, stop: watch::Receiver<bool>) -> Result<PgBus, StoreError> {
    let (config, tls, target) = crate::store::postgres::connect_config(opts, "fleetcmd-bus")?;
    let (outbox_tx, outbox) = mpsc::channel(OUTBOX);
    let (inbox_tx, inbox) = mpsc::channel(INBOX);
    let task = tokio::spawn(run(config, tls, target, outbox, inbox_tx, stop));
    Ok(PgBus {
        bus: Bus {
            outbox: Some(outbox_tx),
        },
        inbox,
        task,
    })
}

async fn run(
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    target: String,
    mut outbox: mpsc::Receiver<String>,
    inbox: mpsc::Sender<Signal>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_FIRST;
    loop {
        if *stop.borrow() {
            return;
        }
        match session(&config, &tls, &mut outbox, &inbox, &mut stop).await {
            Ended::Stopped => return,
            Ended::Lost(why) => {
                tracing::warn!(database = %target, error = %why, retry_in = ?backoff, "controller bus connection lost");
            }
            Ended::WasUp => backoff = BACKOFF_FIRST,
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

enum Ended {
    /// Asked to stop, or nobody follows the inbox any more.
    Stopped,
    /// Never came up.
    Lost(String),
    /// Was listening, then the connection ended.
    WasUp,
}

/// One connection: listen, then forward both ways until it breaks.
async fn session(
    config: &tokio_postgres::Config,
    tls: &tokio_postgres_rustls::MakeRustlsConnect,
    outbox: &mut mpsc::Receiver<String>,
    inbox: &mpsc::Sender<Signal>,
    stop: &mut watch::Receiver<bool>,
) -> Ended {
    let (client, mut connection) = match config.connect(tls.clone()).await {
        Ok(c) => c,
        Err(e) => return Ended::Lost(crate::store::postgres::describe(&e)),
    };
    // The connection's messages: notifications go to `heard`; polling it
    // also drives the client's statements, so it never waits: when `heard`
    // is full (the follower is behind) a notification is dropped and
    // `overflowed` asks for a resync instead — waiting would stall the
    // `pg_notify` below, whose answer this same polling reads (found by the
    // throughput benchmark: a controller hearing its own burst deadlocked).
    // Aborted below with the session.
    let (heard_tx, mut heard) = mpsc::channel::<String>(INBOX);
    let overflowed = Arc::new(AtomicBool::new(false));
    let overflow = overflowed.clone();
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    match heard_tx.try_send(n.payload().to_owned()) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            overflow.store(true, Ordering::Release);
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => return,
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!(error = %crate::store::postgres::describe(&e), "bus connection ended");
                    return;
                }
                None => return,
            }
        }
    });
    let _driver = AbortOnDrop(driver);
    if let Err(e) = client
        .batch_execute(&format!("LISTEN {}", super::CHANNEL))
        .await
    {
        return Ended::Lost(crate::store::postgres::describe(&e));
    }
    tracing::info!("controller bus listening");
    if inbox.send(Signal::Resync).await.is_err() {
        return Ended::Stopped;
    }
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            n = outbox.recv_many(&mut batch, BATCH) => {
                if n == 0 {
                    return Ended::Stopped;
                }
                let payloads = std::mem::take(&mut batch);
                if let Err(e) = client
                    .execute(
                        "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p",
                        &[&super::CHANNEL, &payloads],
                    )
                    .await
                {
                    // Those signals are lost; the resync after the
                    // reconnect (and the scan) read what they announced.
                    tracing::warn!(lost = payloads.len(), error = %crate::store::postgres::describe(&e), "sending bus signals");
                    return Ended::WasUp;
                }
            }
            heard = heard.recv() => match heard {
                Some(payload) => {
                    let signal = match Signal::parse(&payload) {
                        Ok(signal) => signal,
                        Err(e) => {
                            tracing::warn!(error = %e, "ignoring a bus signal");
                            continue;
                        }
                    };
                    if inbox.send(signal).await.is_err() {
                        return Ended::Stopped;
                    }
                    if overflowed.swap(false, Ordering::AcqRel) {
                        tracing::debug!("bus signals dropped while the follower was behind; resync");
                        if inbox.send(Signal::Resync).await.is_err() {
                            return Ended::Stopped;
                        }
                    }
                }
                None => return Ended::WasUp,
            },
            _ = stop.changed() => return Ended::Stopped,
        }
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use fleetcmd_pg_harness::PgCluster;
    use tokio::sync::{mpsc, watch};

    use super::*;

    fn options(cluster: &PgCluster, url: &str) -> PostgresOptions {
        PostgresOptions {
            url: url.to_owned(),
            password: Some(cluster.password().to_owned()),
            ca_pem: None,
        }
    }

    async fn next(inbox: &mut mpsc::Receiver<Signal>) -> Signal {
        tokio::time::timeout(Duration::from_secs(10), inbox.recv())
            .await
            .expect("a signal within 10 s")
            .expect("the bus runs")
    }

    /// Two buses on a fresh database, both listening (each has said
    /// `Resync`); they run until the returned sender is dropped.
    async fn two_buses() -> (
        &'static PgCluster,
        fleetcmd_pg_harness::Database,
        watch::Sender<bool>,
        PgBus,
        PgBus,
    ) {
        let (cluster, db) = tokio::task::spawn_blocking(|| {
            let cluster = PgCluster::shared();
            (cluster, cluster.fresh_database())
        })
        .await
        .expect("cluster");
        let (stop_tx, stop) = watch::channel(false);
        let mut a = start(&options(cluster, &db.url), stop.clone()).expect("bus a");
        let mut b = start(&options(cluster, &db.url), stop).expect("bus b");
        assert_eq!(next(&mut a.inbox).await, Signal::Resync);
        assert_eq!(next(&mut b.inbox).await, Signal::Resync);
        (cluster, db, stop_tx, a, b)
    }

    /// Two controllers' buses on one database: what one publishes both
    /// hear (the sender too); a listener whose connection is killed
    /// connects again and says `Resync`, and hears later signals.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn signals_reach_every_listener_and_a_cut_listener_resyncs() {
        let (cluster, db, _stop, mut a, mut b) = two_buses().await;
        let job = Signal::Job("0190ab12-34cd-7ef0-8123-456789abcdef".into());
        a.bus.publish(job.clone());
        assert_eq!(next(&mut b.inbox).await, job);
        assert_eq!(next(&mut a.inbox).await, job, "the sender hears itself");

        // Cut both connections (the server ends every session of the
        // database but ours).
        let name = db.name.clone();
        tokio::task::spawn_blocking(move || {
            cluster.psql(
                &name,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = 'fleetcmd-bus'",
            )
        })
        .await
        .expect("psql task")
        .expect("terminate the bus sessions");
        assert_eq!(next(&mut b.inbox).await, Signal::Resync, "b reconnected");
        assert_eq!(next(&mut a.inbox).await, Signal::Resync, "a reconnected");
        b.bus.publish(Signal::Policy);
        assert_eq!(next(&mut a.inbox).await, Signal::Policy);
    }

    /// How long a signal takes from one controller's bus to another's, and
    /// how many one bus sends per second (BENCHMARKS.md, "Controller bus").
    /// Run: `cargo nextest run -p fleetcmd-controller bus_latency
    /// --run-ignored all --no-capture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "benchmark (issue 19): prints numbers, asserts only that signals arrive"]
    async fn bus_latency_and_throughput() {
        let (_cluster, _db, _stop, a, mut b) = two_buses().await;
        let mut a_inbox = a.inbox;
        let mut lat = Vec::new();
        for i in 0..200 {
            let s = Signal::Job(format!("0190ab12-34cd-7ef0-8123-{i:012}"));
            let t = Instant::now();
            a.bus.publish(s.clone());
            loop {
                if next(&mut b.inbox).await == s {
                    break;
                }
            }
            lat.push(t.elapsed());
        }
        lat.sort();
        let pct = |p: usize| lat[(lat.len() * p / 100).min(lat.len() - 1)];
        eprintln!(
            "bus latency over {} signals: p50 {:?} p99 {:?} max {:?}",
            lat.len(),
            pct(50),
            pct(99),
            lat[lat.len() - 1]
        );
        // a hears its own signals too: drained, as its follower would.
        let drain = tokio::spawn(async move { while a_inbox.recv().await.is_some() {} });
        // Rounds that fit the outbox (a full outbox drops signals).
        let (rounds, per_round) = (10, 2_000);
        let n = rounds * per_round;
        let t = Instant::now();
        for r in 0..rounds {
            for i in 0..per_round {
                a.bus
                    .publish(Signal::Job(format!("0190ab12-34cd-7ef0-{r:04}-{i:012}")));
            }
            let mut got = 0;
            while got < per_round {
                match tokio::time::timeout(Duration::from_secs(10), b.inbox.recv()).await {
                    Ok(Some(Signal::Job(_))) => got += 1,
                    Ok(Some(_)) => {}
                    other => panic!("round {r}: {got} of {per_round} signals, then {other:?}"),
                }
            }
        }
        let took = t.elapsed();
        eprintln!(
            "bus throughput: {n} signals in {took:?} = {:.0}/s",
            n as f64 / took.as_secs_f64()
        );
        drain.abort();
    }
}
