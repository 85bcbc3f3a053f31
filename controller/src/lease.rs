//! Singletons under leases: among controllers sharing one database, each
//! singleton (the sweeper, retention, health evaluation, audit head
//! signing) runs on the one controller that holds its lease in the store
//! (`LeaseStore`). A keeper task per lease acquires it, renews it every
//! TTL/3, and publishes a [`Leadership`] that the singleton asks before
//! each pass.
//!
//! Stepping down does not wait for the store: a grant counts from the
//! moment its request was sent, and leadership ends on its own once the
//! last successful renewal is TTL*2/3 old, whether or not the keeper is
//! still waiting on a stuck database. The database expires the lease at
//! TTL (by its clock), so a former leader has stopped a third of the TTL
//! before anyone else can start. Writes that must never come from a stale
//! leader also carry the term (`Fence`) and the store refuses old terms.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::store::{Fence, Store};

/// The controller's singletons, one lease each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Singleton {
    /// Overdue jobs and targets (`Shared::sweep`).
    Sweeper,
    /// Job and audit retention.
    Retention,
    /// Health evaluation and its announcements.
    Health,
    /// Signing the audit chain head.
    AuditHeads,
}

impl Singleton {
    pub const ALL: [Singleton; 4] = [
        Singleton::Sweeper,
        Singleton::Retention,
        Singleton::Health,
        Singleton::AuditHeads,
    ];

    /// The lease's name in the store.
    pub fn lease_name(self) -> &'static str {
        match self {
            Singleton::Sweeper => "sweeper",
            Singleton::Retention => "retention",
            Singleton::Health => "health",
            Singleton::AuditHeads => "audit-heads",
        }
    }
}

/// How long a lease runs, and the renewal and step-down times derived
/// from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTiming {
    pub ttl: Duration,
}

impl LeaseTiming {
    pub const DEFAULT_TTL: Duration = Duration::from_secs(15);

    /// A keeper renews (or tries to acquire) this often.
    pub fn renew_every(self) -> Duration {
        self.ttl / 3
    }

    /// Leadership ends this long after the last successful renewal was sent.
    pub fn lead_for(self) -> Duration {
        self.ttl * 2 / 3
    }
}

impl Default for LeaseTiming {
    fn default() -> Self {
        LeaseTiming {
            ttl: Self::DEFAULT_TTL,
        }
    }
}

/// A unique holder name for this controller process: the pid and 64
/// random bits (two controllers on one host, or a restart, never share it).
pub fn holder_id() -> String {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 8];
    // On failure (no entropy source) the time still tells processes apart.
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        bytes = nanos.to_be_bytes();
    }
    format!(
        "ctl-{}-{:016x}",
        std::process::id(),
        u64::from_be_bytes(bytes)
    )
}

#[derive(Debug, Clone)]
struct Held {
    fence: Fence,
    until: Instant,
}

/// Whether this controller leads one singleton now: cheap to ask, shared
/// between the keeper and the singleton.
#[derive(Debug, Clone, Default)]
pub struct Leadership(Arc<Mutex<Option<Held>>>);

impl Leadership {
    /// The fence to write under while leading; `None` when not leading
    /// (never granted, refused, or the last renewal is too old).
    pub fn fence(&self) -> Option<Fence> {
        let held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        held.as_ref()
            .filter(|h| Instant::now() < h.until)
            .map(|h| h.fence.clone())
    }

    pub fn is_leader(&self) -> bool {
        self.fence().is_some()
    }

    fn set(&self, held: Option<Held>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = held;
    }

    fn held(&self) -> Option<Held> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Keeps one lease until `stop` turns true, then releases it (so another
/// controller takes over at once after a clean shutdown).
pub async fn keep(
    store: Arc<dyn Store>,
    name: String,
    holder: String,
    timing: LeaseTiming,
    leadership: Leadership,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let name: Arc<str> = name.into();
    let mut tick = tokio::time::interval(timing.renew_every());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        let sent = Instant::now();
        let held = leadership.held().filter(|h| sent < h.until);
        let (s, h, n) = (store.clone(), holder.clone(), name.clone());
        let step = match &held {
            Some(held) => {
                let term = held.fence.term;
                tokio::task::spawn_blocking(move || {
                    s.lease_renew(&n, &h, term, timing.ttl)
                        .map(|ok| ok.then_some(term))
                })
                .await
            }
            None => {
                tokio::task::spawn_blocking(move || {
                    s.lease_acquire(&n, &h, timing.ttl)
                        .map(|l| l.map(|l| l.term))
                })
                .await
            }
        };
        match step {
            Ok(Ok(Some(term))) => {
                if held.as_ref().is_none_or(|h| h.fence.term != term) {
                    tracing::info!(lease = %name, term, "leading");
                }
                leadership.set(Some(Held {
                    fence: Fence {
                        lease: name.to_string(),
                        holder: holder.clone(),
                        term,
                    },
                    until: sent + timing.lead_for(),
                }));
            }
            Ok(Ok(None)) => {
                if held.is_some() {
                    tracing::warn!(
                        lease = %name,
                        "lease lost to another controller; stepping down"
                    );
                }
                leadership.set(None);
            }
            // Leadership runs out by itself at `until`; the next tick tries
            // again.
            Ok(Err(e)) => tracing::warn!(lease = %name, error = %e, "renewing the lease"),
            Err(e) => tracing::error!(lease = %name, error = %e, "lease task"),
        }
    }
    if let Some(held) = leadership.held() {
        leadership.set(None);
        let term = held.fence.term;
        let n = name.clone();
        let released =
            tokio::task::spawn_blocking(move || store.lease_release(&n, &holder, term)).await;
        if let Ok(Err(e)) = released {
            tracing::warn!(lease = %name, error = %e, "releasing the lease; it expires by itself");
        }
    }
}

/// The leaderships of every singleton of one controller (and of its
/// audit exporters, `audit-export:NAME`), and their keepers.
pub struct Leases {
    pub holder: String,
    by_singleton: Vec<(Singleton, Leadership)>,
    store: Arc<dyn Store>,
    timing: LeaseTiming,
    stop: tokio::sync::watch::Sender<bool>,
    keepers: tokio::task::JoinSet<()>,
}

impl Leases {
    /// Starts one keeper per singleton on the current runtime.
    pub fn start(store: Arc<dyn Store>, holder: String, timing: LeaseTiming) -> Leases {
        let (stop, _) = tokio::sync::watch::channel(false);
        let mut keepers = tokio::task::JoinSet::new();
        let mut by_singleton = Vec::new();
        for s in Singleton::ALL {
            let l = Leadership::default();
            keepers.spawn(keep(
                store.clone(),
                s.lease_name().to_owned(),
                holder.clone(),
                timing,
                l.clone(),
                stop.subscribe(),
            ));
            by_singleton.push((s, l));
        }
        Leases {
            holder,
            by_singleton,
            store,
            timing,
            stop,
            keepers,
        }
    }

    /// Keeps one more lease, `name` (not a singleton's), from now on.
    pub fn keep_named(&mut self, name: String) -> Leadership {
        let l = Leadership::default();
        self.keepers.spawn(keep(
            self.store.clone(),
            name,
            self.holder.clone(),
            self.timing,
            l.clone(),
            self.stop.subscribe(),
        ));
        l
    }

    /// The fence of singleton `s` now: the held one, or — when its keeper
    /// has not been granted it yet (a controller stopped right after it
    /// started) — one acquisition tried at once. `None` when another
    /// controller holds it or the store fails.
    pub async fn fence_now(&self, s: Singleton) -> Option<Fence> {
        let leadership = self.of(s);
        if let Some(fence) = leadership.fence() {
            return Some(fence);
        }
        let sent = Instant::now();
        let (store, holder, timing) = (self.store.clone(), self.holder.clone(), self.timing);
        let name = s.lease_name();
        let granted =
            tokio::task::spawn_blocking(move || store.lease_acquire(name, &holder, timing.ttl))
                .await;
        let term = match granted {
            Ok(Ok(Some(lease))) => lease.term,
            Ok(Ok(None)) => return None,
            Ok(Err(e)) => {
                tracing::warn!(lease = name, error = %e, "acquiring the lease");
                return None;
            }
            Err(e) => {
                tracing::error!(lease = name, error = %e, "lease task");
                return None;
            }
        };
        // The same holder acquiring again keeps the term, so this agrees
        // with whatever the keeper is doing at the same moment; the keeper
        // renews it from here and releases it at `stop`.
        let fence = Fence {
            lease: name.to_owned(),
            holder: self.holder.clone(),
            term,
        };
        leadership.set(Some(Held {
            fence: fence.clone(),
            until: sent + self.timing.lead_for(),
        }));
        Some(fence)
    }

    pub fn of(&self, s: Singleton) -> &Leadership {
        &self
            .by_singleton
            .iter()
            .find(|(k, _)| *k == s)
            .expect("every singleton has a leadership")
            .1
    }

    /// Stops the keepers and releases the leases held.
    pub async fn stop(&mut self) {
        let _ = self.stop.send(true);
        while self.keepers.join_next().await.is_some() {}
    }
}
