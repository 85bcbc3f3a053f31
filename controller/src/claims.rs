//! The `Claims` service: several gateways on one chat act once. Before a
//! gateway acts on something every gateway of that chat sees (a chat event
//! with its platform's id, a health alert to post, an audit record for the
//! audit channel), it claims a key here; the first claim wins until its
//! time to live ends, whichever controller of the database it reaches
//! (`store::ClaimStore`). Gateway certificates only (the interceptor in
//! `server.rs`): agents and operators have nothing to arbitrate.

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
/// `text`, which holds no NUL). Built only by [`ClaimKey::parse`].
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
        ] {
            assert_eq!(ClaimKey::parse(key), Err(want.clone()), "{key:?}");
        }
        assert_eq!(parse_ttl(0), Err(ClaimError::Ttl(0)));
        assert_eq!(parse_ttl(7 * 86_400 + 1), Err(ClaimError::Ttl(604_801)));
        assert_eq!(parse_ttl(3600), Ok(Duration::from_secs(3600)));
    }
}
