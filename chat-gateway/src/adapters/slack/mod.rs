//! The Slack adapter: Socket Mode or the Events API over HTTP
//! for what users say, the Web API (`chat.postMessage`, `chat.update`, file
//! uploads) for replies, Block Kit for rendering and buttons. A small
//! client of our own (reqwest + tokio-tungstenite), no Slack SDK.
//!
//! - Identity: `slack:<team>:<user>` — the user's stable id, never the
//!   display name (`user_name` in slash commands is ignored).
//! - Channel: `slack:<team>:<channel_id>` (the workspace from `auth.test`);
//!   `send` accepts that form (or a bare channel id) back.
//! - Button clicks are delivered as the clicking user typing the button's
//!   `approve ID` / `deny ID` command; over HTTP they are signature-checked
//!   like every request, over Socket Mode they came on our authenticated
//!   socket.
//!
//! Setup, scopes and every config key: `docs/chat/slack.md`.

mod api;
pub mod blocks;
mod config;
pub mod http;
mod inbound;
mod socket;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub use api::{CHANNEL_INTERVAL, MAX_ATTEMPTS, MAX_RETRY_AFTER};
pub use config::{ConfigSecret, DEFAULT_API_BASE, SlackConfig, SlackMode, SlackSecrets};
pub use inbound::{is_approval_command, unescape};

use super::{AdapterError, BoxFuture, ChatAdapter, ChatSender, Incoming, MessageRef, Reply};
use api::{Api, Args, Token, Whoami, platform};
use config::is_slack_id;
use inbound::{Ctx, Inbound};

/// Messages waiting for the router. When full, new ones are dropped with a
/// warning and counted ([`SlackAdapter::dropped`]): Slack must be answered
/// within 3 s, so the adapter never waits for the router.
pub const QUEUE: usize = 256;
/// Overflow uploads remembered per message (to upload each content once).
const UPLOADS_REMEMBERED: usize = 1024;

/// A connected Slack workspace: the receiving half.
pub struct SlackAdapter {
    rx: mpsc::Receiver<Incoming>,
    closed: watch::Receiver<bool>,
    close: Arc<watch::Sender<bool>>,
    sender: Arc<SlackSender>,
    http: Arc<http::HttpState>,
    inbound: Arc<Inbound>,
    socket: Option<JoinHandle<()>>,
    whoami: Whoami,
}

impl std::fmt::Debug for SlackAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlackAdapter")
            .field("team_id", &self.whoami.team_id)
            .field("bot_user_id", &self.whoami.user_id)
            .field("socket_mode", &self.socket.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for SlackAdapter {
    fn drop(&mut self) {
        if let Some(task) = self.socket.take() {
            task.abort();
        }
    }
}

/// Ends [`SlackAdapter::recv`] (so `serve` drains and returns).
#[derive(Clone, Debug)]
pub struct SlackShutdown(Arc<watch::Sender<bool>>);

impl SlackShutdown {
    pub fn shutdown(&self) {
        self.0.send_replace(true);
    }
}

impl SlackAdapter {
    /// Checks `cfg`, reads its secrets (relative `*_file` paths against the
    /// current directory) and connects; see [`SlackAdapter::connect_with`].
    pub async fn connect(cfg: &SlackConfig) -> Result<SlackAdapter, AdapterError> {
        let secrets = cfg.secrets(Path::new("."))?;
        SlackAdapter::connect_with(cfg, secrets).await
    }

    /// Calls `auth.test` (who we are, which workspace), then in socket mode
    /// opens the first Socket Mode connection (so a bad app token fails
    /// here) and keeps it up in a background task owned by the adapter.
    /// In events mode nothing listens until [`SlackAdapter::routes`] is
    /// mounted.
    pub async fn connect_with(
        cfg: &SlackConfig,
        secrets: SlackSecrets,
    ) -> Result<SlackAdapter, AdapterError> {
        let problems = cfg.validate();
        if !problems.is_empty() {
            let list: Vec<String> = problems.iter().map(|(k, m)| format!("{k}: {m}")).collect();
            return Err(platform("slack config", list.join("; ")));
        }
        let api = Arc::new(Api::new(
            &cfg.api_base,
            secrets.bot_token,
            secrets.app_token,
        )?);
        let whoami = api.auth_test().await?;
        if let Some(team) = &cfg.team_id
            && team != &whoami.team_id
        {
            return Err(platform(
                "slack auth.test",
                format!(
                    "the bot token belongs to workspace {}, not team_id {team}",
                    whoami.team_id
                ),
            ));
        }
        if !is_slack_id(&whoami.team_id) || !is_slack_id(&whoami.user_id) {
            return Err(platform(
                "slack auth.test",
                "team_id or user_id is not a Slack id",
            ));
        }
        tracing::info!(team_id = %whoami.team_id, bot_user_id = %whoami.user_id, "slack: authenticated");
        let (tx, rx) = mpsc::channel(QUEUE);
        let inbound = Arc::new(Inbound::new(
            Ctx {
                team_id: whoami.team_id.clone(),
                bot_user_id: whoami.user_id.clone(),
            },
            tx,
        ));
        let socket = match cfg.mode {
            SlackMode::Socket => {
                let first = socket::open(&api).await?;
                Some(tokio::spawn(socket::run(
                    api.clone(),
                    inbound.clone(),
                    first,
                )))
            }
            SlackMode::Events => None,
        };
        let (close, closed) = watch::channel(false);
        Ok(SlackAdapter {
            rx,
            closed,
            close: Arc::new(close),
            sender: Arc::new(SlackSender {
                api,
                team_id: whoami.team_id.clone(),
                uploaded: Mutex::new(HashMap::new()),
            }),
            http: Arc::new(http::HttpState {
                inbound: inbound.clone(),
                signing_secret: secrets.signing_secret,
                auth_failures: std::sync::OnceLock::new(),
            }),
            inbound,
            socket,
            whoami,
        })
    }

    /// A handle that ends `recv`.
    pub fn shutdown_handle(&self) -> SlackShutdown {
        SlackShutdown(self.close.clone())
    }

    /// The workspace id (from `auth.test`).
    pub fn team_id(&self) -> &str {
        &self.whoami.team_id
    }

    /// The bot's own user id (its messages are marked `from_bot`).
    pub fn bot_user_id(&self) -> &str {
        &self.whoami.user_id
    }

    /// Messages dropped because the router queue was full.
    pub fn dropped(&self) -> u64 {
        self.inbound.dropped()
    }
}

impl ChatAdapter for SlackAdapter {
    async fn recv(&mut self) -> Option<Incoming> {
        if *self.closed.borrow() {
            return None;
        }
        tokio::select! {
            m = self.rx.recv() => m,
            _ = self.closed.wait_for(|c| *c) => None,
        }
    }

    fn sender(&self) -> Arc<dyn ChatSender> {
        self.sender.clone()
    }
}

/// The sending half: Web API calls with the bot token.
pub struct SlackSender {
    api: Arc<Api>,
    team_id: String,
    /// message ts → hash of the overflow last uploaded in its thread.
    uploaded: Mutex<HashMap<String, u64>>,
}

fn content_hash(s: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

impl SlackSender {
    /// The channel id in `slack:<team>:<id>` (or a bare id).
    fn channel_id<'c>(&self, channel: &'c str) -> Result<&'c str, AdapterError> {
        let id = match channel.strip_prefix("slack:") {
            Some(rest) => {
                let (team, id) = rest.split_once(':').ok_or_else(|| {
                    platform(
                        "slack",
                        format!("channel {channel:?}: expected slack:<team>:<channel>"),
                    )
                })?;
                if team != self.team_id {
                    return Err(platform(
                        "slack",
                        format!("channel {channel}: not in workspace {}", self.team_id),
                    ));
                }
                id
            }
            None => channel,
        };
        if !is_slack_id(id) {
            return Err(platform(
                "slack",
                format!("channel {channel:?}: not a Slack channel id"),
            ));
        }
        Ok(id)
    }

    /// Uploads what did not fit, once per content, in `thread_ts`.
    async fn upload_overflow(&self, channel: &str, thread_ts: &str, key: &str, content: &str) {
        let hash = content_hash(content);
        {
            let mut up = self.uploaded.lock().unwrap_or_else(|p| p.into_inner());
            if up.get(key) == Some(&hash) {
                return;
            }
            if up.len() >= UPLOADS_REMEMBERED {
                up.clear();
            }
            up.insert(key.to_string(), hash);
        }
        if let Err(e) = self
            .api
            .upload(
                channel,
                thread_ts,
                blocks::OVERFLOW_FILE,
                "full reply",
                content,
            )
            .await
        {
            tracing::warn!(error = %e, channel, "slack: the full reply could not be uploaded");
            self.uploaded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(key);
        }
    }

    async fn post(&self, channel: &str, reply: Reply) -> Result<MessageRef, AdapterError> {
        let id = self.channel_id(channel)?;
        let r = blocks::render(&reply);
        let mut body = json!({
            "channel": id,
            "text": r.text,
            "blocks": r.blocks,
            "parse": "none",
            "link_names": false,
            "unfurl_links": false,
            "unfurl_media": false,
        });
        if let Some(t) = &reply.thread {
            body["thread_ts"] = Value::String(t.clone());
        }
        self.api.wait_turn(id).await;
        let v = self
            .api
            .call("chat.postMessage", Token::Bot, Args::Json(body))
            .await?;
        let ts = v
            .get("ts")
            .and_then(Value::as_str)
            .ok_or_else(|| platform("slack chat.postMessage", "response lacks ts"))?
            .to_string();
        let posted_in = v
            .get("channel")
            .and_then(Value::as_str)
            .filter(|c| is_slack_id(c))
            .unwrap_or(id)
            .to_string();
        if let Some(content) = r.overflow {
            let thread = reply.thread.clone().unwrap_or_else(|| ts.clone());
            self.upload_overflow(&posted_in, &thread, &ts, &content)
                .await;
        }
        Ok(MessageRef {
            channel: format!("slack:{}:{posted_in}", self.team_id),
            id: ts,
        })
    }

    async fn update(&self, msg: &MessageRef, reply: Reply) -> Result<(), AdapterError> {
        let id = self.channel_id(&msg.channel)?;
        let r = blocks::render(&reply);
        let body = json!({
            "channel": id,
            "ts": msg.id,
            "text": r.text,
            "blocks": r.blocks,
            "parse": "none",
            "link_names": false,
        });
        self.api.wait_turn(id).await;
        self.api
            .call("chat.update", Token::Bot, Args::Json(body))
            .await?;
        if let Some(content) = r.overflow {
            let thread = reply.thread.clone().unwrap_or_else(|| msg.id.clone());
            self.upload_overflow(id, &thread, &msg.id, &content).await;
        }
        Ok(())
    }
}

impl ChatSender for SlackSender {
    fn send<'a>(
        &'a self,
        channel: &'a str,
        reply: Reply,
    ) -> BoxFuture<'a, Result<MessageRef, AdapterError>> {
        Box::pin(self.post(channel, reply))
    }

    fn edit<'a>(
        &'a self,
        msg: &'a MessageRef,
        reply: Reply,
    ) -> BoxFuture<'a, Result<(), AdapterError>> {
        Box::pin(self.update(msg, reply))
    }
}

impl crate::adapters::HttpInbound for SlackAdapter {
    /// The HTTP routes (`POST /slack/events`, `/slack/commands`,
    /// `/slack/actions`), to mount at the root of the gateway's listener.
    /// They refuse everything (401) when no signing secret is configured.
    fn routes(&self) -> axum::Router {
        http::routes(self.http.clone())
    }

    /// Reports requests refused for a bad or stale signature to `to` (the
    /// gateway records them as `auth_failed`). Set once; later calls are
    /// ignored.
    fn report_auth_failures(&self, to: crate::adapters::AuthFailures) {
        let _ = self.http.auth_failures.set(to);
    }

    /// Keeps dedupe keys and request signatures in `guard` (the gateway's,
    /// persisted in its state directory) from now on.
    fn use_replay_guard(&self, guard: crate::store::ReplayGuard) {
        self.inbound.use_replay_guard(guard);
    }
}

impl crate::registry::Component for SlackConfig {
    const NAME: &'static str = "slack";
    const CHAT: bool = true;

    fn validate(&self) -> Vec<(String, String)> {
        super::prefixed(Self::NAME, SlackConfig::validate(self))
    }

    async fn build(self, cx: &mut crate::registry::BuildContext) -> Result<(), String> {
        let secrets = self.secrets(cx.base()).map_err(|e| e.to_string())?;
        let a = SlackAdapter::connect_with(&self, secrets)
            .await
            .map_err(|e| e.to_string())?;
        cx.serve_http(Self::NAME, a);
        Ok(())
    }
}
