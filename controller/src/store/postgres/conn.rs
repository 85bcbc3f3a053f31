//! The connections behind the PostgreSQL store: a runtime of its own (one
//! worker thread, `fleetcmd-pg`) that owns a few tokio-postgres clients
//! (`POOL`) and connects again when the server went away (a restart, a
//! fail-over), and
//! `Bridge::call`, which runs one operation there and waits for it.
//!
//! The `Store` trait is synchronous and is called from async workers as
//! well as from `spawn_blocking`. Waiting on a std channel works from both;
//! a nested `block_on` would panic inside a runtime. An operation is one
//! round trip or a short transaction on loopback or a LAN.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{Mutex, MutexGuard};
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::super::StoreError;

pub(super) struct Conn {
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    /// Where, for messages: host, port and database, never the password.
    pub(super) target: String,
    /// A few clients, each one operation at a time (a transaction needs
    /// its client to itself): a dispatch claim or a read does not wait
    /// behind a batch of results on another (BENCHMARKS.md: with one
    /// connection, a fan-out's claims queued behind its results). Each is
    /// connected on first use.
    clients: Vec<Mutex<Option<Client>>>,
    /// Where the next session starts looking for a free client.
    next: std::sync::atomic::AtomicUsize,
}

/// Connections per controller to the database. Writes that must take
/// turns (audit appends) take them under a database lock whatever the
/// connection; more connections would mostly wait on that lock.
pub(super) const POOL: usize = 4;

/// The client of one operation; derefs to a connected `Client`.
pub(super) struct Session<'a>(MutexGuard<'a, Option<Client>>);

impl std::ops::Deref for Session<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.0.as_ref().expect("a session always holds a client")
    }
}

impl std::ops::DerefMut for Session<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.0.as_mut().expect("a session always holds a client")
    }
}

impl Conn {
    /// The client, connected again first if the last one was closed.
    pub(super) async fn session(&self) -> Result<Session<'_>, StoreError> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let free = (0..self.clients.len())
            .map(|k| &self.clients[(start + k) % self.clients.len()])
            .find_map(|c| c.try_lock().ok());
        let mut guard = match free {
            Some(g) => g,
            None => self.clients[start % self.clients.len()].lock().await,
        };
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            let (client, connection) = self
                .config
                .connect(self.tls.clone())
                .await
                .map_err(|e| self.error(&e))?;
            let target = self.target.clone();
            // Ends when the client is dropped or the server goes away; the
            // runtime that owns it is shut down with the store.
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(database = %target, error = %super::describe(&e), "postgres connection lost");
                }
            });
            *guard = Some(client);
        }
        Ok(Session(guard))
    }

    pub(super) fn error(&self, e: &tokio_postgres::Error) -> StoreError {
        StoreError::Backend(format!("postgres {}: {}", self.target, super::describe(e)))
    }
}

pub(super) struct Bridge {
    rt: Option<tokio::runtime::Runtime>,
    conn: Arc<Conn>,
    closed: AtomicBool,
}

impl Bridge {
    pub(super) fn new(
        config: tokio_postgres::Config,
        tls: MakeRustlsConnect,
        target: String,
    ) -> Result<Bridge, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fleetcmd-pg")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Backend(format!("postgres runtime: {e}")))?;
        Ok(Bridge {
            rt: Some(rt),
            conn: Arc::new(Conn {
                config,
                tls,
                target,
                clients: (0..POOL).map(|_| Mutex::new(None)).collect(),
                next: std::sync::atomic::AtomicUsize::new(0),
            }),
            closed: AtomicBool::new(false),
        })
    }

    /// Runs `op` on the store's runtime and waits for its result.
    pub(super) fn call<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(Arc<Conn>) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
        T: Send + 'static,
    {
        let closed = || StoreError::Backend("the store is closed".into());
        if self.closed.load(Ordering::Acquire) {
            return Err(closed());
        }
        let rt = self.rt.as_ref().ok_or_else(closed)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let fut = op(self.conn.clone());
        rt.spawn(async move {
            // The caller may be gone (it never is: it waits below).
            let _ = tx.send(fut.await);
        });
        // Store calls come from async handlers too (a result is stored on
        // its agent stream's task): on a worker of a multi-thread runtime
        // the wait is announced (`block_in_place`, the worker's other tasks
        // move to another thread), so that results waiting for the one
        // connection do not stall every worker, and with them TLS
        // handshakes and agents' Welcomes — measured by the controller kill
        // test (tests/it/ha_kill.rs): A's agents took 8–10 s to be
        // welcomed by B and C during a fan-out, most of it waiting here.
        let on_multi_thread_worker = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if on_multi_thread_worker {
            tokio::task::block_in_place(|| rx.recv()).map_err(|_| closed())?
        } else {
            rx.recv().map_err(|_| closed())?
        }
    }

    /// Later calls fail; the connection is dropped.
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let conn = self.conn.clone();
        if let Some(rt) = &self.rt {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            rt.spawn(async move {
                for c in &conn.clients {
                    c.lock().await.take();
                }
                let _ = tx.send(());
            });
            let _ = rx.recv();
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics on an async worker; this
        // does not wait.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
