//! The `Claims` service: several gateways on one chat act once. Before a
//! gateway acts on something every gateway of that chat sees (a chat event
//! with its platform's id, a health alert to post, an audit record for the
//! audit channel), it claims a key here; the first claim wins until its
//! time to live ends, whichever controller of the database it reaches
//! (`store::ClaimStore`). Gateway certificates only (the interceptor in
//! `server.rs`): agents and operators have nothing to arbitrate.
//!
//! Connection chats (IRC, XMPP, Matrix) give every connection every
//! message, IRC with no id to claim, so their gateways `Hold` a lease on
//! the chat account instead (`store::LeaseStore`, fencing terms, the
//! database's clock) and only the holder connects. A gateway's lease is
//! stored as [`GATEWAY_LEASE_PREFIX`] and its name: whatever name a gateway
//! sends, it can never take, renew or release a controller singleton's
//! lease (`health`, `sweeper`, `audit-export:…`).

use std::sync::Arc;
use std::time::Duration;

use fleetcmd_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::error::ApiError;
use crate::state::Shared;

/// Longest key, in bytes: a platform's event id with its scope fits
/// many times over; a claim row stays small.
pub const MAX_CLAIM_KEY_BYTES: usize = 256;
/// Longest claim: the longest window in which a platform presents one
/// event again is a day (Mattermost trigger ids); a week leaves room.
pub const MAX_CLAIM_TTL: Duration = Duration::from_secs(7 * 86_400);

/// A key that may be claimed: 1 to [`MAX_CLAIM_KEY_BYTES`] bytes without
/// control characters (so it is safe in a log line and in a PostgreSQL
/// `text`, which holds no NUL) or invisible and format characters
/// (`fleetcmd_core::terminal::is_format`). Built only by
/// [`ClaimKey::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimKey(String);

/// Why a key or a time to live was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    #[error("claim key is empty")]
    EmptyKey,
    #[error("claim key is {0} bytes long, more than {MAX_CLAIM_KEY_BYTES}")]
    KeyTooLong(usize),
    #[error("claim key has a control character at byte {0}")]
    ControlCharacter(usize),
    #[error("claim key has an invisible or format character (U+{1:04X}) at byte {0}")]
    FormatCharacter(usize, u32),
    #[error("claim ttl_secs {0} is outside 1 to {max}", max = MAX_CLAIM_TTL.as_secs())]
    Ttl(u32),
}

impl ClaimKey {
    pub fn parse(key: &str) -> Result<ClaimKey, ClaimError> {
        if key.is_empty() {
            return Err(ClaimError::EmptyKey);
        }
        if key.len() > MAX_CLAIM_KEY_BYTES {
            return Err(ClaimError::KeyTooLong(key.len()));
        }
        if let Some((i, _)) = key.char_indices().find(|(_, c)| c.is_control()) {
            return Err(ClaimError::ControlCharacter(i));
        }
        // Bidi overrides, zero-width characters and the like make a
        // name in a log line read as another (found by an outside test).
        if let Some((i, c)) = key
            .char_indices()
            .find(|&(_, c)| fleetcmd_core::terminal::is_format(c))
        {
            return Err(ClaimError::FormatCharacter(i, u32::from(c)));
        }
        Ok(ClaimKey(key.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A claim's time to live from the request: 1 s to [`MAX_CLAIM_TTL`].
pub fn parse_ttl(secs: u32) -> Result<Duration, ClaimError> {
    let ttl = Duration::from_secs(u64::from(secs));
    if secs == 0 || ttl > MAX_CLAIM_TTL {
        return Err(ClaimError::Ttl(secs));
    }
    Ok(ttl)
}

/// What every gateway lease is stored under, apart from the controller's
/// own singleton leases.
pub const GATEWAY_LEASE_PREFIX: &str = "gateway/";
/// A gateway lease that ended this long ago is removed by retention
/// (`LeaseStore::prune_leases`): its holder is long gone, and a gateway
/// certificate could otherwise grow the table by naming leases.
pub const GATEWAY_LEASE_KEPT: Duration = Duration::from_secs(3600);
/// Longest holder id, in bytes (a host name, a pid and a random part).
pub const MAX_HOLDER_BYTES: usize = 128;
/// Shortest gateway lease: renewed every third of it, so shorter would
/// mean a renewal a second or more often from every gateway.
pub const MIN_HOLD_TTL: Duration = Duration::from_secs(5);
/// Longest gateway lease: a crashed holder keeps its chat silent this long.
pub const MAX_HOLD_TTL: Duration = Duration::from_secs(300);

/// Why a `Hold` request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HoldError {
    #[error("lease name: {0}")]
    Name(ClaimError),
    #[error("lease holder is empty")]
    EmptyHolder,
    #[error("lease holder is {0} bytes long, more than {MAX_HOLDER_BYTES}")]
    HolderTooLong(usize),
    #[error("lease holder has a non-printable byte at {0}")]
    HolderNotPrintable(usize),
    #[error(
        "lease ttl_secs {0} is outside {min} to {max}",
        min = MIN_HOLD_TTL.as_secs(),
        max = MAX_HOLD_TTL.as_secs()
    )]
    Ttl(u32),
    #[error("lease release needs the term it was granted (term 0 given)")]
    ReleaseWithoutTerm,
}

/// What a valid `Hold` request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldOp {
    /// Take the lease (or extend one's own running lease).
    Acquire,
    /// Extend the grant of this term.
    Renew(u64),
    /// Give up the grant of this term now.
    Release(u64),
}

/// A checked `Hold` request: `lease` is the stored name, prefixed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub lease: String,
    pub holder: String,
    pub ttl: Duration,
    pub op: HoldOp,
}

impl Hold {
    /// Checks `req`, made by the gateway certificate named `caller`: the
    /// stored holder is `caller:HOLDER`, so a lease is kept, extended and
    /// released only under the certificate that took it (found by an
    /// outside test: another gateway certificate, told the holder id when
    /// it stood by, renewed and released the chat's lease and kept every
    /// gateway off the chat).
    pub fn parse(req: &pb::HoldRequest, caller: &str) -> Result<Hold, HoldError> {
        let name = ClaimKey::parse(&req.name).map_err(HoldError::Name)?;
        let holder = &req.holder;
        if holder.is_empty() {
            return Err(HoldError::EmptyHolder);
        }
        if holder.len() > MAX_HOLDER_BYTES {
            return Err(HoldError::HolderTooLong(holder.len()));
        }
        if let Some(i) = holder.bytes().position(|b| !b.is_ascii_graphic()) {
            return Err(HoldError::HolderNotPrintable(i));
        }
        let ttl = Duration::from_secs(u64::from(req.ttl_secs));
        if !(MIN_HOLD_TTL..=MAX_HOLD_TTL).contains(&ttl) {
            return Err(HoldError::Ttl(req.ttl_secs));
        }
        let op = match (req.release, req.term) {
            (true, 0) => return Err(HoldError::ReleaseWithoutTerm),
            (true, t) => HoldOp::Release(t),
            (false, 0) => HoldOp::Acquire,
            (false, t) => HoldOp::Renew(t),
        };
        Ok(Hold {
            lease: format!("{GATEWAY_LEASE_PREFIX}{}", name.as_str()),
            holder: format!("{caller}:{holder}"),
            ttl,
            op,
        })
    }

    /// Runs the request against the store.
    pub fn apply(
        &self,
        store: &dyn crate::store::Store,
    ) -> Result<pb::HoldResponse, crate::store::StoreError> {
        let (name, holder) = (self.lease.as_str(), self.holder.as_str());
        let (held, term) = match self.op {
            HoldOp::Acquire => match store.lease_acquire(name, holder, self.ttl)? {
                Some(l) => (true, l.term),
                None => (false, 0),
            },
            HoldOp::Renew(t) => {
                let ok = store.lease_renew(name, holder, t, self.ttl)?;
                (ok, if ok { t } else { 0 })
            }
            HoldOp::Release(t) => {
                let ok = store.lease_release(name, holder, t)?;
                (ok, if ok { t } else { 0 })
            }
        };
        // Who holds it instead, for the standby's log line.
        let holder = if held || matches!(self.op, HoldOp::Release(_)) {
            String::new()
        } else {
            store
                .lease_holder(name)?
                .map(|l| l.holder)
                .unwrap_or_default()
        };
        Ok(pb::HoldResponse { held, term, holder })
    }
}

#[derive(Clone)]
pub struct ClaimsSvc(pub Arc<Shared>);

#[tonic::async_trait]
impl pb::claims_server::Claims for ClaimsSvc {
    async fn claim(
        &self,
        req: Request<pb::ClaimRequest>,
    ) -> Result<Response<pb::ClaimResponse>, Status> {
        let req = req.into_inner();
        let bad = |e: ClaimError| ApiError::InvalidArgument(e.to_string());
        let key = ClaimKey::parse(&req.key).map_err(bad)?;
        let ttl = parse_ttl(req.ttl_secs).map_err(bad)?;
        let store = self.0.store.clone();
        let won = tokio::task::spawn_blocking(move || store.claim(&key, ttl))
            .await
            .map_err(|e| ApiError::Internal(format!("claim task: {e}")))?
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::ClaimResponse { won }))
    }

    async fn hold(
        &self,
        req: Request<pb::HoldRequest>,
    ) -> Result<Response<pb::HoldResponse>, Status> {
        let caller = crate::auth::peer_of(&req).map(|p| p.name).ok_or_else(|| {
            ApiError::PermissionDenied("a gateway certificate is required".into())
        })?;
        let hold = Hold::parse(req.get_ref(), &caller)
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let store = self.0.store.clone();
        let resp = tokio::task::spawn_blocking(move || hold.apply(store.as_ref()))
            .await
            .map_err(|e| ApiError::Internal(format!("hold task: {e}")))?
            .map_err(ApiError::from)?;
        Ok(Response::new(resp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_ttls_are_bounded() {
        let long = "k".repeat(MAX_CLAIM_KEY_BYTES);
        assert_eq!(ClaimKey::parse(&long).map(|k| k.0.len()), Ok(256));
        for (key, want) in [
            ("", ClaimError::EmptyKey),
            (&format!("{long}k"), ClaimError::KeyTooLong(257)),
            ("slack/a\0b", ClaimError::ControlCharacter(7)),
            ("slack/a\nb", ClaimError::ControlCharacter(7)),
            ("irc/x\u{202e}", ClaimError::FormatCharacter(5, 0x202e)),
            ("irc/\u{200b}x", ClaimError::FormatCharacter(4, 0x200b)),
        ] {
            assert_eq!(ClaimKey::parse(key), Err(want.clone()), "{key:?}");
        }
        assert_eq!(parse_ttl(0), Err(ClaimError::Ttl(0)));
        assert_eq!(parse_ttl(7 * 86_400 + 1), Err(ClaimError::Ttl(604_801)));
        assert_eq!(parse_ttl(3600), Ok(Duration::from_secs(3600)));
    }

    fn req(name: &str, holder: &str, term: u64, ttl_secs: u32, release: bool) -> pb::HoldRequest {
        pb::HoldRequest {
            name: name.into(),
            holder: holder.into(),
            term,
            ttl_secs,
            release,
        }
    }

    #[test]
    fn hold_requests_are_checked_and_namespaced() {
        let ok = Hold::parse(&req("irc/abc", "gw-1", 0, 30, false), "main").expect("valid");
        assert_eq!(ok.lease, "gateway/irc/abc");
        assert_eq!(ok.holder, "main:gw-1");
        assert_eq!(ok.op, HoldOp::Acquire);
        assert_eq!(
            Hold::parse(&req("health", "gw-1", 7, 30, false), "main").map(|h| (h.lease, h.op)),
            Ok(("gateway/health".to_string(), HoldOp::Renew(7)))
        );
        let long = "h".repeat(MAX_HOLDER_BYTES + 1);
        for (r, want) in [
            (
                req("", "gw", 0, 30, false),
                HoldError::Name(ClaimError::EmptyKey),
            ),
            (
                req("a\nb", "gw", 0, 30, false),
                HoldError::Name(ClaimError::ControlCharacter(1)),
            ),
            (req("irc/x", "", 0, 30, false), HoldError::EmptyHolder),
            (
                req("irc/x", &long, 0, 30, false),
                HoldError::HolderTooLong(129),
            ),
            (
                req("irc/x", "gw 1", 0, 30, false),
                HoldError::HolderNotPrintable(2),
            ),
            (req("irc/x", "gw", 0, 4, false), HoldError::Ttl(4)),
            (req("irc/x", "gw", 0, 301, false), HoldError::Ttl(301)),
            (
                req("irc/x", "gw", 0, 30, true),
                HoldError::ReleaseWithoutTerm,
            ),
        ] {
            assert_eq!(Hold::parse(&r, "main"), Err(want.clone()), "{r:?}");
        }
        assert_eq!(
            HoldError::Ttl(4).to_string(),
            "lease ttl_secs 4 is outside 5 to 300"
        );
    }

    #[test]
    fn a_gateway_lease_never_touches_a_controller_lease() {
        use crate::store::{LeaseStore, SledStore};
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SledStore::open(dir.path()).expect("open");
        let ttl = Duration::from_secs(30);
        let ctl = store
            .lease_acquire("health", "controller-1", ttl)
            .expect("acquire")
            .expect("free");
        let hold_as = |caller: &str, r: pb::HoldRequest| {
            Hold::parse(&r, caller)
                .expect("valid request")
                .apply(&store)
                .expect("store")
        };
        let hold = |r: pb::HoldRequest| hold_as("main", r);
        // Renew and release of `health` at the controller's term touch
        // `gateway/health`, which nobody holds.
        for release in [false, true] {
            let got = hold(req("health", "controller-1", ctl.term, 30, release));
            assert!(!got.held, "release={release}: {got:?}");
        }
        // Acquiring `health` takes `gateway/health`, not the controller's.
        let got = hold(req("health", "gw-1", 0, 30, false));
        assert!(got.held);
        let still = store.lease_holder("health").expect("read").expect("held");
        assert_eq!(still, ctl);
        // A second gateway stands by and is told who holds it.
        let other = hold(req("irc/a", "gw-1", 0, 30, false));
        assert!(other.held);
        let lost = hold(req("irc/a", "gw-2", 0, 30, false));
        assert_eq!(
            (lost.held, lost.term, lost.holder.as_str()),
            (false, 0, "main:gw-1")
        );
        // Another gateway certificate, told the holder id, can neither
        // extend, renew nor release that lease.
        for (term, release) in [(0, false), (other.term, false), (other.term, true)] {
            let got = hold_as("evil", req("irc/a", "gw-1", term, 30, release));
            assert!(!got.held, "term {term} release {release}: {got:?}");
        }
        assert_eq!(
            store
                .lease_holder("gateway/irc/a")
                .expect("read")
                .map(|l| l.holder),
            Some("main:gw-1".to_string())
        );
        // Nor can it renew or release the first one's grant.
        let renew = hold(req("irc/a", "gw-2", other.term, 30, false));
        assert!(!renew.held);
        let release = hold(req("irc/a", "gw-2", other.term, 30, true));
        assert!(!release.held);
        // The holder's release frees it at once for the standby.
        assert!(hold(req("irc/a", "gw-1", other.term, 30, true)).held);
        let taken = hold(req("irc/a", "gw-2", 0, 30, false));
        assert!(taken.held && taken.term > other.term, "{taken:?}");
    }
}
