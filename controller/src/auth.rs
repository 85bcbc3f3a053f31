//! Authentication of every RPC but `Join`: the TLS layer has verified the
//! client certificate against the fleet CA; here its role must match the
//! service, and a revoked agent or revoked operator/gateway certificate is
//! refused at once (invariant 2 in ARCHITECTURE.md).

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use fleetcmd_core::ratelimit::WindowLimiter;

use tonic::{Request, Status};

use crate::pki::{Peer, Role, peer_from_cert};
use crate::state::Shared;

/// `a gateway`, `an operator`, `an agent`: a role as a sentence names it.
fn with_article(role: Role) -> String {
    let role = role.to_string();
    let vowel = role.starts_with(['a', 'e', 'i', 'o', 'u']);
    format!("{} {role}", if vowel { "an" } else { "a" })
}

/// Reads the authenticated peer from a request, if it presented a certificate.
pub fn peer_of<T>(req: &Request<T>) -> Option<Peer> {
    let certs = req.peer_certs()?;
    peer_from_cert(certs.first()?.as_ref())
}

/// An interceptor admitting only the given roles; it stores the `Peer` in the
/// request extensions for the handler.
pub fn require(
    shared: Arc<Shared>,
    roles: &'static [Role],
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut req: Request<()>| {
        let Some(peer) = peer_of(&req) else {
            let ip = req.remote_addr().map(|a| a.ip());
            if let Some(suppressed) = shared.auth_limiter.admit(ip) {
                let mut event =
                    auth_failed(&req, "anonymous").detail("call without a client certificate");
                if suppressed > 0 {
                    event = event.field("suppressed_before", suppressed);
                }
                shared.security_event(event);
            }
            return Err(Status::unauthenticated(
                "a client certificate issued by the fleet CA is required",
            ));
        };
        if !roles.contains(&peer.role) {
            shared.security_event(auth_failed(&req, crate::audit::peer_actor(&peer)).detail(
                format!(
                    "wrong role: {} certificate called a service for {roles:?}",
                    with_article(peer.role)
                ),
            ));
            return Err(Status::permission_denied(format!(
                "{} certificate may not call this service",
                with_article(peer.role)
            )));
        }
        if peer.role == Role::Agent && shared.registry.is_revoked(&peer.name) {
            shared.security_event(
                auth_failed(&req, crate::audit::peer_actor(&peer))
                    .host(&peer.name)
                    .detail("revoked agent tried to connect"),
            );
            return Err(Status::permission_denied(format!(
                "agent {} is revoked",
                peer.name
            )));
        }
        if peer.role == Role::Agent && !shared.registry.agent_cert_current(&peer) {
            // Issued before the name was enrolled again: its previous
            // holder. Retries forever, so recorded at the bounded rate.
            let ip = req.remote_addr().map(|a| a.ip());
            if let Some(suppressed) = shared.auth_limiter.admit(ip) {
                let mut event = auth_failed(&req, crate::audit::peer_actor(&peer))
                    .host(&peer.name)
                    .detail(format!(
                        "agent certificate (serial {}) issued before the name's last enrolment used",
                        peer.serial
                    ));
                if suppressed > 0 {
                    event = event.field("suppressed_before", suppressed);
                }
                shared.security_event(event);
            }
            return Err(Status::permission_denied(format!(
                "agent {} was enrolled again; this certificate is no longer accepted",
                peer.name
            )));
        }
        if shared.certs.is_revoked(&peer) {
            // A revoked gateway or script retries forever: recorded at the
            // same bounded rate per address as anonymous calls.
            let ip = req.remote_addr().map(|a| a.ip());
            if let Some(suppressed) = shared.auth_limiter.admit(ip) {
                let mut event = auth_failed(&req, crate::audit::peer_actor(&peer))
                    .detail(format!("revoked certificate (serial {}) used", peer.serial));
                if suppressed > 0 {
                    event = event.field("suppressed_before", suppressed);
                }
                shared.security_event(event);
            }
            return Err(Status::permission_denied(format!(
                "the {} certificate of {} is revoked",
                peer.role, peer.name
            )));
        }
        req.extensions_mut().insert(peer);
        Ok(req)
    }
}

/// Audit records of anonymous authentication failures kept per source
/// address and minute; the rest are counted, not recorded, so a client
/// hammering the controller without a certificate cannot flood the trail.
pub const AUTH_FAILURES_RECORDED_PER_MINUTE: u32 = 10;
/// Source addresses tracked at once.
const AUTH_FAILURE_SOURCES: usize = 10_000;

/// Decides which anonymous authentication failures become audit records.
pub struct AuthFailureLimiter(Mutex<WindowLimiter<Option<IpAddr>>>);

impl Default for AuthFailureLimiter {
    fn default() -> Self {
        AuthFailureLimiter(Mutex::new(WindowLimiter::new(
            AUTH_FAILURES_RECORDED_PER_MINUTE,
            60_000,
            AUTH_FAILURE_SOURCES,
        )))
    }
}

impl AuthFailureLimiter {
    /// `Some(n)` when this failure is to be recorded (`n` suppressed since
    /// the last record from that address); `None` to only count it.
    pub fn admit(&self, ip: Option<IpAddr>) -> Option<u64> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(ip, crate::audit::now_ms())
    }
}

/// An authentication failure, from the caller's address and to the method.
fn auth_failed(req: &Request<()>, actor: impl Into<String>) -> fleetcmd_core::audit::Event {
    let source = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
    fleetcmd_core::audit::Event::new(fleetcmd_core::audit::EventKind::AuthFailed, actor)
        .source(source)
}

/// The peer the interceptor admitted.
pub fn admitted<T>(req: &Request<T>) -> Result<Peer, Status> {
    req.extensions().get::<Peer>().cloned().ok_or_else(|| {
        Status::unauthenticated("a client certificate issued by the fleet CA is required")
    })
}
