//! Revoked operator and gateway certificates: kept in the store's
//! `revoked_certs` tree, held in memory for the interceptors (checked on
//! every RPC), and announced to open streams so they close at once.
//! Agents are revoked through their registry record instead.

use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use fleetcmd_core::audit::{Event, EventKind};

use crate::error::{ApiError, ApiResult};
use crate::pki::{Peer, Role};
use crate::store::RevocationStore;

/// One revocation: of one certificate (`serial`), or of every certificate
/// of that role and name issued at or before `revoked_at`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRevocation {
    pub role: String,
    pub name: String,
    /// Lowercase hex without leading zeros; `None`: by name.
    pub serial: Option<String>,
    /// Unix seconds.
    pub revoked_at: u64,
    pub by: String,
    pub reason: String,
}

impl CertRevocation {
    /// Whether this revocation refuses `peer`'s certificate. By name, a
    /// certificate issued in the same second as the revocation is refused
    /// too (the times have whole seconds): fail closed.
    pub fn covers(&self, peer: &Peer) -> bool {
        self.role == peer.role.as_str()
            && self.name == peer.name
            && match &self.serial {
                Some(s) => *s == peer.serial,
                None => peer.issued_at <= self.revoked_at,
            }
    }

    pub(crate) fn key(&self) -> String {
        format!(
            "{}/{}/{:020}/{}",
            self.role,
            self.name,
            self.revoked_at,
            self.serial.as_deref().unwrap_or("-")
        )
    }
}

/// The revocations in force.
pub struct Revocations {
    list: RwLock<Vec<CertRevocation>>,
    /// Bumped after each revocation; open streams wait on it.
    generation: tokio::sync::watch::Sender<u64>,
}

impl Revocations {
    /// Loads every revocation from the store.
    pub fn load(store: &dyn RevocationStore) -> ApiResult<Revocations> {
        let list = store.revocations()?;
        Ok(Revocations {
            list: RwLock::new(list),
            generation: tokio::sync::watch::channel(0).0,
        })
    }

    /// Whether `peer` (an operator or gateway) presents a revoked certificate.
    pub fn is_revoked(&self, peer: &Peer) -> bool {
        peer.role != Role::Agent
            && self
                .list
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .any(|r| r.covers(peer))
    }

    pub fn list(&self) -> Vec<CertRevocation> {
        self.list.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Writes `rec` to the store (the caller flushes before it calls
    /// [`Revocations::activate`]).
    pub fn store(&self, store: &dyn RevocationStore, rec: &CertRevocation) -> ApiResult<()> {
        store.put_revocation(rec)?;
        Ok(())
    }

    /// Puts a durable revocation in force and tells open streams.
    pub fn activate(&self, rec: CertRevocation) {
        self.list
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(rec);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Takes the store's revocations as they are now (another controller
    /// revoked a certificate) and tells open streams when any is new.
    pub fn reload(&self, store: &dyn RevocationStore) -> ApiResult<()> {
        let stored = store.revocations()?;
        let mut list = self.list.write().unwrap_or_else(|p| p.into_inner());
        let new = stored.iter().any(|r| !list.contains(r));
        *list = stored;
        drop(list);
        if new {
            self.generation.send_modify(|g| *g += 1);
        }
        Ok(())
    }

    /// Forwards `inner` until `peer`'s certificate is revoked, then ends the
    /// stream with `PERMISSION_DENIED`: a revoked operator or gateway keeps
    /// no open `Watch`.
    pub fn cut_off<T: Send + 'static>(
        self: &Arc<Self>,
        peer: Peer,
        inner: impl Stream<Item = Result<T, Status>> + Send + 'static,
    ) -> ReceiverStream<Result<T, Status>> {
        let this = self.clone();
        let mut changed = self.generation.subscribe();
        // Bounded like the streams it wraps; a slow client is backpressured.
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            tokio::pin!(inner);
            loop {
                tokio::select! {
                    item = inner.next() => match item {
                        Some(item) => {
                            if tx.send(item).await.is_err() {
                                return;
                            }
                        }
                        None => return,
                    },
                    r = changed.changed() => {
                        if r.is_err() || this.is_revoked(&peer) {
                            // Full channel: dropping `tx` still ends the stream.
                            let _ = tx.try_send(Err(Status::permission_denied(format!(
                                "the {} certificate of {} was revoked",
                                peer.role, peer.name
                            ))));
                            return;
                        }
                    }
                    () = tx.closed() => return,
                }
            }
        });
        ReceiverStream::new(rx)
    }
}

/// Revokes an operator or gateway certificate (one serial, or every one
/// of that name issued until now): durable and audited before it is in
/// force, then every later call is refused and open streams are closed.
/// The caller has checked `certs.revoke`.
pub async fn revoke(
    shared: &crate::state::Shared,
    by: &Peer,
    role: &str,
    name: &str,
    serial: &str,
    reason: &str,
) -> ApiResult<CertRevocation> {
    let role = match Role::parse(role) {
        Some(r @ (Role::Operator | Role::Gateway)) => r,
        _ => {
            return Err(ApiError::InvalidArgument(format!(
                "role must be `operator` or `gateway` (agents: `fleetcmd agents revoke`), got {role:?}"
            )));
        }
    };
    if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        return Err(ApiError::InvalidArgument(format!(
            "certificate name {name:?} must be 1 to 128 characters without control characters"
        )));
    }
    let serial = serial.trim().trim_start_matches("0x").to_ascii_lowercase();
    let serial = serial.trim_start_matches('0');
    if serial.len() > 64 || !serial.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(ApiError::InvalidArgument(format!(
            "serial {serial:?} must be hex, as `issue-cert` prints it"
        )));
    }
    if reason.len() > 1024 {
        return Err(ApiError::InvalidArgument("reason over 1 KiB".into()));
    }
    // Hex of whole bytes, as `pki::serial_hex` writes it.
    let serial = (!serial.is_empty()).then(|| {
        if serial.len() % 2 == 1 {
            format!("0{serial}")
        } else {
            serial.to_owned()
        }
    });
    let rec = CertRevocation {
        role: role.as_str().to_owned(),
        name: name.to_owned(),
        serial,
        revoked_at: crate::state::now_secs(),
        by: crate::audit::peer_actor(by),
        reason: reason.to_owned(),
    };
    shared.certs.store(shared.store.as_ref(), &rec)?;
    let what = match &rec.serial {
        Some(s) => format!("{role} certificate {name} (serial {s}) revoked"),
        None => format!("every {role} certificate of {name} issued until now revoked"),
    };
    let mut event = Event::new(EventKind::CertRevoked, rec.by.clone())
        .detail(if reason.is_empty() {
            what
        } else {
            format!("{what}: {reason}")
        })
        .field("role", role.as_str())
        .field("name", name);
    if let Some(s) = &rec.serial {
        event = event.field("serial", s.as_str());
    }
    shared.audit.record(event)?;
    shared.flush_now().await?;
    shared.certs.activate(rec.clone());
    shared.bus.publish(crate::bus::Signal::CertRevoked);
    tracing::warn!(role = %role, name, serial = ?rec.serial, "certificate revoked");
    Ok(rec)
}

/// A warning for a revocation of a certificate that `issue-cert` never
/// recorded in `pki/issued.jsonl` under `data_dir` (a misspelt name
/// revokes nothing that exists); `None` when it is recorded.
pub fn unrecorded_warning(data_dir: &std::path::Path, rec: &CertRevocation) -> Option<String> {
    let path = data_dir.join("pki").join("issued.jsonl");
    let what = match &rec.serial {
        Some(s) => format!("{} certificate {} with serial {s}", rec.role, rec.name),
        None => format!("{} certificate named {}", rec.role, rec.name),
    };
    let a = if rec.role.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    match std::fs::read_to_string(&path) {
        Ok(log) if issued_in(&log, rec) => None,
        Ok(_) => Some(format!(
            "no {what} is recorded in {}: check the name; revoked all the same",
            path.display()
        )),
        // With several controllers each records what it issued on its own
        // host: one that issued nothing has no file, which says nothing
        // of a certificate another one issued (found by an outside test:
        // the warning made a correct revocation look doubtful).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(format!(
            "this controller has issued no certificates ({} does not exist), so it cannot check the {what}; if another controller issued it, its pki/issued.jsonl records it; revoked all the same",
            path.display()
        )),
        Err(e) => Some(format!(
            "could not check {} for {a} {what} ({e}); revoked all the same",
            path.display()
        )),
    }
}

/// Whether the `issued.jsonl` text records a certificate `rec` covers.
fn issued_in(log: &str, rec: &CertRevocation) -> bool {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .any(|line| {
            line["role"] == rec.role.as_str()
                && line["name"] == rec.name.as_str()
                && rec
                    .serial
                    .as_ref()
                    .is_none_or(|s| line["serial"] == s.as_str())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(role: Role, name: &str, serial: &str, issued_at: u64) -> Peer {
        Peer {
            role,
            name: name.into(),
            serial: serial.into(),
            issued_at,
        }
    }

    #[test]
    fn a_controller_that_issued_nothing_says_so_not_that_it_failed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rec = CertRevocation {
            role: "operator".into(),
            name: "admin".into(),
            serial: Some("60239d".into()),
            revoked_at: 1,
            by: "cli:root".into(),
            reason: String::new(),
        };
        let warning = unrecorded_warning(dir.path(), &rec).expect("a warning");
        assert!(
            warning.contains("this controller has issued no certificates")
                && warning.contains("if another controller issued it")
                && !warning.contains("could not check"),
            "{warning}"
        );
    }

    #[test]
    fn a_revocation_of_an_unrecorded_certificate_is_found() {
        let log = concat!(
            r#"{"role":"operator","name":"alice","serial":"0a1b","issued_at":1,"ttl_secs":604800}"#,
            "\n",
            r#"{"role":"gateway","name":"main","serial":"77","issued_at":2,"ttl_secs":2592000}"#,
            "\n",
            "not json\n",
        );
        let rec = |role: &str, name: &str, serial: Option<&str>| CertRevocation {
            role: role.into(),
            name: name.into(),
            serial: serial.map(str::to_owned),
            revoked_at: 10,
            by: "cli:admin".into(),
            reason: String::new(),
        };
        // (revocation, recorded)
        for (r, recorded) in [
            (rec("operator", "alice", None), true),
            (rec("operator", "alice", Some("0a1b")), true),
            (rec("gateway", "main", None), true),
            // A typo, another role, another serial.
            (rec("operator", "alcie", None), false),
            (rec("gateway", "alice", None), false),
            (rec("operator", "alice", Some("0a1c")), false),
        ] {
            assert_eq!(issued_in(log, &r), recorded, "{r:?}");
        }
        assert!(issued_in(log, &rec("operator", "alice", None)));
        assert!(!issued_in("", &rec("operator", "alice", None)));
    }

    #[test]
    fn what_a_revocation_covers() {
        let by_name = CertRevocation {
            role: "operator".into(),
            name: "alice".into(),
            serial: None,
            revoked_at: 1000,
            by: "cli:admin".into(),
            reason: String::new(),
        };
        let by_serial = CertRevocation {
            serial: Some("0a1b".into()),
            ..by_name.clone()
        };
        // (revocation, peer, covered)
        for (rev, p, covered) in [
            (&by_name, peer(Role::Operator, "alice", "01", 999), true),
            (&by_name, peer(Role::Operator, "alice", "01", 1000), true),
            // A replacement issued after the revocation.
            (&by_name, peer(Role::Operator, "alice", "02", 1001), false),
            (&by_name, peer(Role::Gateway, "alice", "01", 999), false),
            (&by_name, peer(Role::Operator, "alice2", "01", 999), false),
            (
                &by_serial,
                peer(Role::Operator, "alice", "0a1b", 5000),
                true,
            ),
            (&by_serial, peer(Role::Operator, "alice", "0a1c", 5), false),
            (&by_serial, peer(Role::Gateway, "alice", "0a1b", 5), false),
        ] {
            assert_eq!(rev.covers(&p), covered, "{rev:?} {p:?}");
        }
    }

    #[test]
    fn revocations_survive_a_reopen_of_the_store() {
        use crate::store::{SledStore, Store};
        let dir = tempfile::tempdir().expect("tempdir");
        let rec = CertRevocation {
            role: "gateway".into(),
            name: "main".into(),
            serial: Some("0a1b".into()),
            revoked_at: 7,
            by: "cli:admin".into(),
            reason: "key leaked".into(),
        };
        {
            let store = SledStore::open(dir.path()).expect("open");
            let revs = Revocations::load(&store).expect("load");
            assert!(revs.list().is_empty());
            revs.store(&store, &rec).expect("store");
            store.flush().expect("flush");
            store.close();
        }
        let store = SledStore::open(dir.path()).expect("reopen");
        let revs = Revocations::load(&store).expect("load");
        assert_eq!(revs.list(), vec![rec]);
        assert!(revs.is_revoked(&peer(Role::Gateway, "main", "0a1b", 1)));
        assert!(!revs.is_revoked(&peer(Role::Gateway, "main", "0a1c", 1)));
    }
}
