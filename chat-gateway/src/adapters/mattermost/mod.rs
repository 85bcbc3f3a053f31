//! The Mattermost adapter: a bot account on one server (docs/chat/mattermost.md).
//!
//! - Messages arrive on the WebSocket event stream (`ws`): `posted` events
//!   in channels the bot is a member of and its direct messages.
//! - Slash commands and button clicks arrive over HTTP ([`MattermostAdapter::routes`],
//!   under `/mattermost/`): slash commands carry a token checked in
//!   constant time; buttons carry an HMAC in their context (`buttons`).
//! - Replies go out through REST API v4 (`api`): a post per reply, edited
//!   in place (at most once a second per post), with text over the post
//!   limit cut and the full text uploaded as a file in the thread.
//!
//! Identities are `mattermost:<server>:<user_id>` (the stable user id,
//! never the username or display name), channels
//! `mattermost:<server>:<channel_id>`.

use crate::unix_now;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{AdapterError, BoxFuture, ChatAdapter, ChatSender, Incoming, MessageRef, Reply};

mod api;
pub mod buttons;
mod config;
mod http;
pub mod render;
mod ws;

pub use config::{DEFAULT_BUTTON_MAX_AGE, MattermostConfig};
pub use http::{ACTIONS_PATH, COMMAND_PATH};

use api::Api;
use buttons::ButtonSigner;
use http::HttpState;

/// Messages waiting for the router; when full, the WebSocket reader waits
/// (backpressure) and HTTP requests are answered 503.
const INCOMING_QUEUE: usize = 256;
/// Edits of one post are spaced at least this far apart.
pub const EDIT_INTERVAL: Duration = Duration::from_secs(1);
/// Posts whose edit times (and button state) are remembered.
const TRACKED_POSTS: usize = 1024;
/// Name of the file holding a reply too long for one post.
const OVERFLOW_FILE: &str = "fleetcmd-reply.txt";

fn config_error(message: String) -> AdapterError {
    AdapterError::Platform {
        what: "mattermost config".to_string(),
        message,
    }
}

/// The receiving half: events from the WebSocket and the HTTP routes.
pub struct MattermostAdapter {
    rx: mpsc::Receiver<Incoming>,
    sender: Arc<MattermostSender>,
    http: Arc<HttpState>,
    bot_user_id: String,
    bot_username: String,
    ws: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for MattermostAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MattermostAdapter")
            .field("server", &self.sender.server)
            .field("bot_user_id", &self.bot_user_id)
            .finish_non_exhaustive()
    }
}

impl Drop for MattermostAdapter {
    fn drop(&mut self) {
        self.ws.abort();
    }
}

impl MattermostAdapter {
    /// Validates `cfg`, reads its secrets, asks the server who the bot is
    /// (`GET /api/v4/users/me`), resolves `team`, and starts the WebSocket.
    pub async fn connect(cfg: &MattermostConfig) -> Result<MattermostAdapter, AdapterError> {
        let checked = cfg.clone();
        // Reads the `*_file` secrets: off the async workers.
        let secrets = tokio::task::spawn_blocking(move || {
            let problems = checked.validate();
            if !problems.is_empty() {
                return Err(config_error(
                    problems
                        .iter()
                        .map(|(k, m)| format!("{k}: {m}"))
                        .collect::<Vec<_>>()
                        .join("; "),
                ));
            }
            checked.load_secrets()
        })
        .await
        .map_err(|e| config_error(format!("reading secrets: {e}")))??;
        let max_age = cfg.button_max_age().map_err(config_error)?;

        let api = Api::new(&cfg.url, secrets.token.clone())?;
        let me = api.me().await?;
        if !me.is_bot {
            tracing::info!(username = %me.username, "mattermost token belongs to a user account, not a bot account");
        }
        let team_id = match &cfg.team {
            Some(t) => Some(api.team_id(t).await?),
            None => None,
        };
        let signer = Arc::new(ButtonSigner::new(
            secrets.action_secret.expose().as_bytes(),
            &cfg.callback_url,
            max_age,
        ));
        let (tx, rx) = mpsc::channel(INCOMING_QUEUE);
        let http = HttpState::new(
            cfg.server.clone(),
            team_id.clone(),
            tx.clone(),
            &secrets.slash_tokens,
            signer.clone(),
        )
        .map_err(|_| config_error("no random numbers for the token comparison key".into()))?;
        let ctx = ws::WsCtx {
            base: api.base().to_string(),
            token: api.token().clone(),
            server: cfg.server.clone(),
            bot_id: me.id.clone(),
            bot_username: me.username.clone(),
            team_id,
            tls: api::tls_config()?,
            replay: http.replay.clone(),
        };
        let ws = tokio::spawn(ws::run(ctx, tx));
        tracing::info!(server = %cfg.server, bot = %me.username, "mattermost adapter started");
        Ok(MattermostAdapter {
            rx,
            sender: Arc::new(MattermostSender {
                api,
                prefix: format!("mattermost:{}:", cfg.server),
                server: cfg.server.clone(),
                signer,
                last_edit: Mutex::new(HashMap::new()),
                with_buttons: Mutex::new(HashSet::new()),
            }),
            http: Arc::new(http),
            bot_user_id: me.id,
            bot_username: me.username,
            ws,
        })
    }

    /// The bot's Mattermost user id.
    pub fn bot_user_id(&self) -> &str {
        &self.bot_user_id
    }

    /// The bot's Mattermost username.
    pub fn bot_username(&self) -> &str {
        &self.bot_username
    }
}

impl ChatAdapter for MattermostAdapter {
    async fn recv(&mut self) -> Option<Incoming> {
        self.rx.recv().await
    }

    fn sender(&self) -> Arc<dyn ChatSender> {
        self.sender.clone()
    }
}

/// The sending half: REST API v4.
pub struct MattermostSender {
    api: Api,
    server: String,
    /// `mattermost:<server>:`, the prefix of every channel we serve.
    prefix: String,
    signer: Arc<ButtonSigner>,
    /// When each post may next be edited.
    last_edit: Mutex<HashMap<String, Instant>>,
    /// Posts currently showing buttons.
    with_buttons: Mutex<HashSet<String>>,
}

fn is_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric())
}

impl MattermostSender {
    fn channel_id<'a>(&self, channel: &'a str) -> Result<&'a str, AdapterError> {
        channel
            .strip_prefix(&self.prefix)
            .filter(|id| is_id(id))
            .ok_or_else(|| AdapterError::Platform {
                what: "mattermost".to_string(),
                message: format!(
                    "channel {channel:?} is not one of this server's (expected {}<channel_id>)",
                    self.prefix
                ),
            })
    }

    /// Reserves the next edit slot of `post_id` and returns how long to wait for it.
    fn edit_slot(&self, post_id: &str) -> Duration {
        let mut map = self.last_edit.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if map.len() > TRACKED_POSTS {
            map.retain(|_, at| *at + EDIT_INTERVAL * 10 > now);
        }
        let slot = match map.get(post_id) {
            Some(prev) if *prev + EDIT_INTERVAL > now => *prev + EDIT_INTERVAL,
            _ => now,
        };
        map.insert(post_id.to_string(), slot);
        slot - now
    }

    fn set_buttons(&self, post_id: &str, shown: bool) {
        let mut set = self.with_buttons.lock().unwrap_or_else(|p| p.into_inner());
        if shown {
            if set.len() >= TRACKED_POSTS {
                set.clear(); // a stale entry only costs an empty `attachments` on edit
            }
            set.insert(post_id.to_string());
        } else {
            set.remove(post_id);
        }
    }

    fn had_buttons(&self, post_id: &str) -> bool {
        self.with_buttons
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(post_id)
    }

    async fn upload_overflow(&self, channel_id: &str, root_id: &str, reply: &Reply) {
        let data = render::plain_file(reply).into_bytes();
        let file_id = match self.api.upload_file(channel_id, OVERFLOW_FILE, data).await {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!(error = %e, "mattermost: the full reply could not be uploaded");
                return;
            }
        };
        let body = json!({
            "channel_id": channel_id,
            "root_id": root_id,
            "message": "full text of the reply above",
            "file_ids": [file_id],
        });
        if let Err(e) = self.api.create_post(&body).await {
            tracing::warn!(error = %e, "mattermost: the full reply file could not be posted");
        }
    }
}

impl ChatSender for MattermostSender {
    fn send<'a>(
        &'a self,
        channel: &'a str,
        reply: Reply,
    ) -> BoxFuture<'a, Result<MessageRef, AdapterError>> {
        Box::pin(async move {
            let channel_id = self.channel_id(channel)?;
            let (body, cut) = render::post_body(channel_id, &reply, &self.signer, unix_now());
            let id = self.api.create_post(&body).await?;
            if !reply.actions.is_empty() {
                self.set_buttons(&id, true);
            }
            if cut {
                let root = reply
                    .thread
                    .as_deref()
                    .filter(|t| is_id(t))
                    .unwrap_or(&id)
                    .to_string();
                self.upload_overflow(channel_id, &root, &reply).await;
            }
            Ok(MessageRef {
                channel: channel.to_string(),
                id,
            })
        })
    }

    fn edit<'a>(
        &'a self,
        msg: &'a MessageRef,
        reply: Reply,
    ) -> BoxFuture<'a, Result<(), AdapterError>> {
        Box::pin(async move {
            let channel_id = self.channel_id(&msg.channel)?;
            if !is_id(&msg.id) {
                return Err(AdapterError::UnknownMessage(msg.id.clone()));
            }
            let wait = self.edit_slot(&msg.id);
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            let body = render::patch_body(
                channel_id,
                &reply,
                &self.signer,
                unix_now(),
                self.had_buttons(&msg.id),
            );
            self.api.patch_post(&msg.id, &body).await?;
            self.set_buttons(&msg.id, !reply.actions.is_empty());
            Ok(())
        })
    }
}

impl crate::adapters::HttpInbound for MattermostAdapter {
    /// The HTTP routes Mattermost calls: [`COMMAND_PATH`] (slash commands)
    /// and [`ACTIONS_PATH`] (button clicks). Mount them on the gateway's
    /// listener; `callback_url` must reach [`ACTIONS_PATH`].
    fn routes(&self) -> axum::Router {
        http::routes(self.http.clone())
    }

    /// Reports refused slash commands and forged button clicks to `to` (the
    /// gateway records them as `auth_failed`). Set once.
    fn report_auth_failures(&self, to: crate::adapters::AuthFailures) {
        let _ = self.http.auth_failures.set(to);
    }

    /// Keeps routed trigger ids in `guard` (the gateway's, persisted in its
    /// state directory) from now on.
    fn use_replay_guard(&self, guard: crate::store::ReplayGuard) {
        self.http.replay.set(guard);
    }
}

impl crate::registry::Component for MattermostConfig {
    const NAME: &'static str = "mattermost";
    const CHAT: bool = true;

    fn resolve_paths(&mut self, base: &std::path::Path) {
        for f in [
            &mut self.token_file,
            &mut self.slash_tokens_file,
            &mut self.action_secret_file,
        ]
        .into_iter()
        .flatten()
        {
            if f.is_relative() {
                *f = base.join(&*f);
            }
        }
    }

    fn validate(&self) -> Vec<(String, String)> {
        super::prefixed(Self::NAME, MattermostConfig::validate(self))
    }

    async fn build(self, cx: &mut crate::registry::BuildContext) -> Result<(), String> {
        let a = MattermostAdapter::connect(&self)
            .await
            .map_err(|e| e.to_string())?;
        cx.serve_http(Self::NAME, a);
        Ok(())
    }
}
