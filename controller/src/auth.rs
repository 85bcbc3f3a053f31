//! Authentication of every RPC but `Join`: the TLS layer has verified the
//! client certificate against the fleet CA; here its role must match the
//! service and a revoked agent is refused at once (DESIGN §2.2).

use std::sync::Arc;

use tonic::{Request, Status};

use crate::pki::{Peer, Role, peer_from_cert};
use crate::state::Shared;

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
            shared.security_event(
                auth_failed(&req, "anonymous").detail("call without a client certificate"),
            );
            return Err(Status::unauthenticated(
                "a client certificate issued by the fleet CA is required",
            ));
        };
        if !roles.contains(&peer.role) {
            shared.security_event(auth_failed(&req, crate::audit::peer_actor(&peer)).detail(
                format!(
                    "wrong role: a {} certificate called a service for {roles:?}",
                    peer.role
                ),
            ));
            return Err(Status::permission_denied(format!(
                "a {} certificate may not call this service",
                peer.role
            )));
        }
        if peer.role == Role::Agent && shared.is_revoked(&peer.name) {
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
        req.extensions_mut().insert(peer);
        Ok(req)
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
