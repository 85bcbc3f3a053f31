//! The Matrix adapter: the client-server API over HTTP (login, `/sync`
//! long polls, sending), no SDK.
//!
//! - Identity is `matrix:@name:server`, the sender the homeserver vouches
//!   for on each event, never a display name ([`ids`]).
//! - Channels are rooms, `matrix:!id:server`. The bot serves the rooms in
//!   `matrix.rooms` (ids or aliases, joined at start) and accepts invites
//!   to those only; messages elsewhere are ignored.
//! - It starts listening fresh: the first `/sync` of a start only learns
//!   where "now" is and which rooms are encrypted; commands typed while the
//!   gateway was down are not run late.
//! - End-to-end encrypted rooms are refused: the bot holds no keys, says so
//!   once in the room ([`rooms::E2EE_REFUSAL`]) and ignores it from then on.
//! - Replies are `m.notice` with an escaped HTML body ([`render`]); a job's
//!   message is edited in place (`m.replace`) as it progresses.
//! - A reaction ✅ / ❌ on an approval request is `approve ID` / `deny ID`
//!   from the reacting user (RBAC decides as if they had typed it).
//! - The bot's own events and `m.notice`s (other bots) are never commands.
//! - Rate limits (429 `M_LIMIT_EXCEEDED`) are waited out; a refused token
//!   fails the start, or ends the adapter's input with an error naming
//!   `[matrix]`.
//!
//! See `docs/chat/matrix.md` for setup.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{AdapterError, BoxFuture, ChatAdapter, ChatSender, Incoming, MessageRef, Reply};
use crate::integrations::Retry;

pub mod api;
pub mod config;
pub mod ids;
pub mod render;
pub mod rooms;
pub mod sync;

pub use config::MatrixConfig;

use api::{Api, MatrixError};
use rooms::{Approvals, Rooms, Step};

/// Messages handed to the router and not yet taken. When full, the sync
/// task waits (backpressure: the next `/sync` is not asked for).
const INCOMING_QUEUE: usize = 64;
/// Backoff after a failed `/sync`: 1 s × 2ⁿ with jitter, capped at a
/// minute (the shared [`Retry`] shape).
const SYNC_BACKOFF_MS: u64 = 1000;

/// The sending half: posts and edits notices.
pub struct MatrixSender {
    api: Arc<Api>,
    approvals: Arc<Approvals>,
}

impl ChatSender for MatrixSender {
    fn send<'a>(
        &'a self,
        channel: &'a str,
        reply: Reply,
    ) -> BoxFuture<'a, Result<MessageRef, AdapterError>> {
        Box::pin(async move {
            let room = ids::room_of(channel)?;
            let id = self
                .api
                .send(room, "m.room.message", &render::content(&reply))
                .await?;
            self.approvals.record(room, &id, &reply.actions);
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
            let room = ids::room_of(&msg.channel)?;
            self.api
                .send(room, "m.room.message", &render::edit(&msg.id, &reply))
                .await?;
            Ok(())
        })
    }
}

/// A connected Matrix bot.
pub struct MatrixAdapter {
    rx: mpsc::Receiver<Incoming>,
    sender: Arc<MatrixSender>,
    task: JoinHandle<()>,
}

impl Drop for MatrixAdapter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MatrixAdapter {
    /// Logs in, joins the configured rooms, reads where "now" is (the
    /// first `/sync`), then keeps syncing in a task owned by the adapter.
    /// A refused token, an unknown alias or a room the bot may not join
    /// fails here, naming it.
    pub async fn connect(cfg: &MatrixConfig) -> Result<MatrixAdapter, AdapterError> {
        let login = cfg.login()?;
        let api = Arc::new(Api::login(&cfg.homeserver, &cfg.user_id, login).await?);
        let mut served = Vec::new();
        for r in &cfg.rooms {
            let id = if ids::is_room_alias(r) {
                api.resolve_alias(r).await?
            } else {
                r.clone()
            };
            match api.join(&id).await {
                Ok(()) => {}
                // Not invited yet: the invite is accepted when it comes.
                Err(e) if e.errcode() == Some("M_FORBIDDEN") => {
                    tracing::warn!(room = %r, error = %e, "[matrix] cannot join yet; waiting for an invite")
                }
                Err(e) => return Err(e.into()),
            }
            served.push(id);
        }
        let approvals = Arc::new(Approvals::default());
        let mut rooms = Rooms::new(api.user_id(), served);
        let first = api.sync(None, Duration::ZERO, sync::FILTER).await?;
        let first = sync::read(&first).map_err(|message| AdapterError::Platform {
            what: "matrix /sync".into(),
            message,
        })?;
        let (tx, rx) = mpsc::channel(INCOMING_QUEUE);
        for ev in first.events {
            if let Some(step) = rooms.step(ev, true, &approvals) {
                act(&api, step, &tx).await;
            }
        }
        let timeout = Duration::from_secs(cfg.sync_timeout_secs);
        let task = tokio::spawn(sync_loop(
            api.clone(),
            rooms,
            approvals.clone(),
            first.next_batch,
            timeout,
            tx,
        ));
        Ok(MatrixAdapter {
            rx,
            sender: Arc::new(MatrixSender { api, approvals }),
            task,
        })
    }

    /// The bot's user id.
    pub fn user_id(&self) -> &str {
        self.sender.api.user_id()
    }
}

impl ChatAdapter for MatrixAdapter {
    async fn recv(&mut self) -> Option<Incoming> {
        self.rx.recv().await
    }

    fn sender(&self) -> Arc<dyn ChatSender> {
        self.sender.clone()
    }
}

/// Carries out one step; failures are logged (the next event goes on).
async fn act(api: &Api, step: Step, tx: &mpsc::Sender<Incoming>) {
    match step {
        Step::Deliver(msg) => {
            // Closed only when the adapter is gone.
            let _ = tx.send(msg).await;
        }
        Step::Join(room) => {
            if let Err(e) = api.join(&room).await {
                tracing::warn!(room = %room, error = %e, "[matrix] accepting the invite failed");
            }
        }
        Step::Notice { room, text } => {
            if let Err(e) = api
                .send(&room, "m.room.message", &render::notice(&text))
                .await
            {
                tracing::warn!(room = %room, error = %e, "[matrix] posting a notice failed");
            }
        }
    }
}

/// Long-polls `/sync` until the adapter is dropped or the homeserver
/// refuses the token (then the input ends: the gateway stops with the
/// error logged, rather than serving a chat it cannot hear).
async fn sync_loop(
    api: Arc<Api>,
    mut rooms: Rooms,
    approvals: Arc<Approvals>,
    mut since: String,
    timeout: Duration,
    tx: mpsc::Sender<Incoming>,
) {
    let retry = Retry::new(u32::MAX, SYNC_BACKOFF_MS);
    let mut failures = 0u32;
    loop {
        let answer = match api.sync(Some(&since), timeout, sync::FILTER).await {
            Ok(v) => sync::read(&v).map_err(|message| MatrixError::Transport {
                what: "GET /sync".into(),
                message,
            }),
            Err(e) => Err(e),
        };
        match answer {
            Ok(batch) => {
                failures = 0;
                for ev in batch.events {
                    if let Some(step) = rooms.step(ev, false, &approvals) {
                        act(&api, step, &tx).await;
                    }
                }
                since = batch.next_batch;
            }
            Err(e @ MatrixError::Auth { .. }) => {
                tracing::error!(error = %e, "[matrix] stopped: the homeserver no longer accepts the bot's token");
                return;
            }
            Err(e) => {
                let wait = retry.delay(failures, None);
                failures = failures.saturating_add(1);
                tracing::warn!(error = %e, wait_ms = wait.as_millis() as u64, "[matrix] /sync failed; retrying");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

impl crate::registry::Component for MatrixConfig {
    const NAME: &'static str = "matrix";
    const CHAT: bool = true;

    fn resolve_paths(&mut self, base: &std::path::Path) {
        MatrixConfig::resolve_paths(self, base);
    }

    fn validate(&self) -> Vec<(String, String)> {
        super::prefixed(Self::NAME, MatrixConfig::validate(self))
    }

    /// Connected only while this gateway holds the lease of this user on
    /// this homeserver (`crate::standby`); dropping the adapter stops its
    /// sync.
    async fn build(self, cx: &mut crate::registry::BuildContext) -> Result<(), String> {
        let account = [self.homeserver.clone(), self.user_id.clone()];
        let connect =
            crate::standby::connect_fn(
                self,
                |cfg| async move { MatrixAdapter::connect(&cfg).await },
            );
        crate::standby::serve(cx, Self::NAME, &[&account[0], &account[1]], connect).await
    }
}
