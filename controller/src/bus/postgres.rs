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
    // also drives the client's statements. Aborted below with the session.
    let (heard_tx, mut heard) = mpsc::channel::<String>(INBOX);
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if heard_tx.send(n.payload().to_owned()).await.is_err() {
                        return;
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
                Some(payload) => match Signal::parse(&payload) {
                    Ok(signal) => {
                        if inbox.send(signal).await.is_err() {
                            return Ended::Stopped;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "ignoring a bus signal"),
                },
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
