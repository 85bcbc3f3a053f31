//! What Mattermost posts to the gateway: slash commands
//! (`/mattermost/command`, form-encoded, token-checked) and button clicks
//! (`/mattermost/actions`, JSON, HMAC-checked context). The slash token
//! vouches for the `user_id` Mattermost sends with it: whoever holds the
//! token can claim any user. A request delivered again with the same
//! `trigger_id` runs once (persisted, also across restarts).

use crate::unix_now;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Form, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use fleetcmd_core::crypto::Secret;
use fleetcmd_core::ids::Identity;
use ring::hmac;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::buttons::ButtonSigner;
use super::render::inline;
use crate::adapters::Incoming;
use crate::store::{Refusal, ReplaySlot};

/// The path of slash commands.
pub const COMMAND_PATH: &str = "/mattermost/command";
/// The path of button clicks (`callback_url` points here).
pub const ACTIONS_PATH: &str = "/mattermost/actions";
/// Largest request body accepted on either path.
const MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest command text shown back in an acknowledgement.
const MAX_ECHO_CHARS: usize = 200;

/// Shared by the two handlers.
pub(crate) struct HttpState {
    pub server: String,
    pub team_id: Option<String>,
    pub tx: mpsc::Sender<Incoming>,
    /// HMAC of each slash token under `compare_key`, so tokens are compared
    /// in constant time whatever their length.
    pub slash_macs: Vec<hmac::Tag>,
    pub compare_key: hmac::Key,
    pub signer: Arc<ButtonSigner>,
    /// Where refused requests are reported (the gateway's audit reporter).
    pub auth_failures: std::sync::OnceLock<crate::adapters::AuthFailures>,
    /// Trigger ids (and, from the WebSocket, post ids) already routed: the
    /// gateway's persisted replay records, shared with `ws.rs`.
    pub replay: Arc<ReplaySlot>,
}

/// How long a trigger id is remembered. Mattermost signs nothing and puts
/// no timestamp we can check on a slash command: this bounds re-deliveries
/// of one request, not what a holder of the slash token can send.
pub const DEDUPE_SECS: u64 = 24 * 60 * 60;

impl HttpState {
    pub fn new(
        server: String,
        team_id: Option<String>,
        tx: mpsc::Sender<Incoming>,
        slash_tokens: &[Secret<String>],
        signer: Arc<ButtonSigner>,
    ) -> Result<HttpState, ring::error::Unspecified> {
        let rng = ring::rand::SystemRandom::new();
        let compare_key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)?;
        let slash_macs = slash_tokens
            .iter()
            .map(|t| hmac::sign(&compare_key, t.expose().as_bytes()))
            .collect();
        Ok(HttpState {
            server,
            team_id,
            tx,
            slash_macs,
            compare_key,
            signer,
            auth_failures: std::sync::OnceLock::new(),
            replay: Arc::default(),
        })
    }

    /// `None` the first time `trigger_id` is seen (recorded durably
    /// first); else the answer to a request delivered again, which is
    /// reported. Requests without a trigger id cannot be told apart from a
    /// user typing the same command again, so they are not deduplicated.
    async fn delivered_again(&self, user_id: &str, trigger_id: &str) -> Option<StatusCode> {
        if trigger_id.is_empty() {
            return None;
        }
        let until = unix_now().saturating_add(DEDUPE_SECS);
        match self
            .replay
            .get()
            .admit("mattermost", trigger_id, until)
            .await
        {
            Ok(()) => None,
            Err(Refusal::Replay) => {
                tracing::warn!(
                    user_id,
                    "mattermost request delivered again (same trigger_id); not run twice"
                );
                self.refused(
                    user_id,
                    "request delivered again (same trigger_id); not run twice".into(),
                );
                Some(StatusCode::CONFLICT)
            }
            Err(Refusal::Unavailable) => Some(StatusCode::SERVICE_UNAVAILABLE),
            // Another gateway of this team answers it.
            Err(Refusal::Elsewhere) => Some(StatusCode::OK),
        }
    }

    fn refused(&self, user_id: &str, detail: String) {
        if let Some(a) = self.auth_failures.get() {
            a.report("mattermost", format!("user_id {user_id}"), detail);
        }
    }

    fn slash_token_ok(&self, token: &str) -> bool {
        // Every configured token is checked, so timing does not say which matched.
        self.slash_macs
            .iter()
            .map(|tag| hmac::verify(&self.compare_key, token.as_bytes(), tag.as_ref()).is_ok())
            .fold(false, |acc, ok| acc | ok)
    }

    fn wrong_team(&self, team_id: &str) -> bool {
        self.team_id
            .as_deref()
            .is_some_and(|want| !team_id.is_empty() && team_id != want)
    }

    fn incoming(&self, user_id: &str, channel_id: &str, text: String) -> Option<Incoming> {
        // Mattermost ids are 26 lowercase letters and digits.
        let id_ok = |s: &str| {
            !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric())
        };
        if !id_ok(user_id) || !id_ok(channel_id) {
            return None;
        }
        let identity = Identity::parse(&format!("mattermost:{}:{user_id}", self.server)).ok()?;
        Some(Incoming {
            identity,
            channel: format!("mattermost:{}:{channel_id}", self.server),
            text,
            thread: None,
            direct: true,
            from_bot: false,
        })
    }
}

/// The routes, with their state.
pub(crate) fn routes(state: Arc<HttpState>) -> axum::Router {
    axum::Router::new()
        .route(COMMAND_PATH, post(slash_command))
        .route(ACTIONS_PATH, post(action))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

fn ephemeral(status: StatusCode, text: &str) -> Response {
    (
        status,
        Json(json!({ "response_type": "ephemeral", "text": text })),
    )
        .into_response()
}

/// The slash command request (Mattermost's documented form fields; the
/// others are ignored).
#[derive(Deserialize, Debug, Default)]
struct SlashForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    user_id: String,
    #[serde(default)]
    channel_id: String,
    #[serde(default)]
    team_id: String,
    #[serde(default)]
    text: String,
    #[serde(default)]
    trigger_id: String,
}

fn echo(command: &str) -> String {
    let short: String = command.chars().take(MAX_ECHO_CHARS).collect();
    inline(&short)
}

async fn slash_command(
    State(st): State<Arc<HttpState>>,
    headers: HeaderMap,
    Form(form): Form<SlashForm>,
) -> Response {
    // The documented `token` field; the same token also arrives as
    // `Authorization: Token …`.
    let header_token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Token "))
        .unwrap_or("");
    let token = if form.token.is_empty() {
        header_token
    } else {
        form.token.as_str()
    };
    if token.is_empty() || !st.slash_token_ok(token) {
        tracing::warn!(user_id = %form.user_id, channel_id = %form.channel_id, "mattermost slash command refused: wrong token");
        st.refused(&form.user_id, "slash command with a wrong token".into());
        return ephemeral(StatusCode::UNAUTHORIZED, "invalid slash command token");
    }
    if st.wrong_team(&form.team_id) {
        tracing::info!(team_id = %form.team_id, "mattermost slash command from another team refused");
        return ephemeral(
            StatusCode::FORBIDDEN,
            "this gateway does not serve this team",
        );
    }
    if let Some(code) = st.delivered_again(&form.user_id, &form.trigger_id).await {
        if code == StatusCode::OK {
            // Another gateway answers it: say nothing here.
            return code.into_response();
        }
        return ephemeral(code, "this request was already received; it runs once");
    }
    let text = form.text.trim();
    let text = if text.is_empty() { "help" } else { text }.to_string();
    let Some(msg) = st.incoming(&form.user_id, &form.channel_id, text.clone()) else {
        return ephemeral(
            StatusCode::BAD_REQUEST,
            "missing or invalid user_id or channel_id",
        );
    };
    match st.tx.try_send(msg) {
        Ok(()) => ephemeral(StatusCode::OK, &format!("running: {}", echo(&text))),
        Err(mpsc::error::TrySendError::Full(_)) => {
            tracing::warn!("mattermost slash command dropped: the gateway is busy");
            ephemeral(
                StatusCode::SERVICE_UNAVAILABLE,
                "the gateway is busy; try again",
            )
        }
        Err(mpsc::error::TrySendError::Closed(_)) => ephemeral(
            StatusCode::SERVICE_UNAVAILABLE,
            "the gateway is shutting down",
        ),
    }
}

/// Mattermost's `PostActionIntegrationRequest` (fields used here).
#[derive(Deserialize, Debug, Default)]
struct ActionRequest {
    #[serde(default)]
    user_id: String,
    #[serde(default)]
    channel_id: String,
    #[serde(default)]
    team_id: String,
    #[serde(default)]
    context: Value,
    #[serde(default)]
    trigger_id: String,
}

fn action_answer(status: StatusCode, text: &str) -> Response {
    (status, Json(json!({ "ephemeral_text": text }))).into_response()
}

async fn action(State(st): State<Arc<HttpState>>, body: Bytes) -> Response {
    let req: ActionRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "mattermost button click: malformed JSON");
            return action_answer(StatusCode::BAD_REQUEST, "malformed request");
        }
    };
    let clicked_in = (!req.channel_id.is_empty()).then_some(req.channel_id.as_str());
    let click = match st.signer.verify(&req.context, clicked_in, unix_now()) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(user_id = %req.user_id, channel_id = %req.channel_id, reason = %e, "mattermost button click refused");
            st.refused(&req.user_id, format!("button click refused: {e}"));
            return action_answer(
                StatusCode::FORBIDDEN,
                "this button is not valid (expired or not from this gateway); type the command instead",
            );
        }
    };
    if st.wrong_team(&req.team_id) {
        return action_answer(
            StatusCode::FORBIDDEN,
            "this gateway does not serve this team",
        );
    }
    if let Some(code) = st.delivered_again(&req.user_id, &req.trigger_id).await {
        return action_answer(code, "this click was already received; it runs once");
    }
    let Some(msg) = st.incoming(&req.user_id, &click.channel_id, click.command.clone()) else {
        return action_answer(StatusCode::BAD_REQUEST, "missing or invalid user_id");
    };
    match st.tx.try_send(msg) {
        Ok(()) => action_answer(
            StatusCode::OK,
            &format!("sent as you: {}", echo(&click.command)),
        ),
        Err(_) => action_answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "the gateway is busy; try again",
        ),
    }
}
