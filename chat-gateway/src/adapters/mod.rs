//! Chat adapters: one folder per platform, all behind [`ChatAdapter`].
//!
//! An adapter has two halves so the router can answer while it keeps
//! reading: the adapter itself is the receiving half (`recv` needs
//! `&mut self`), and [`ChatAdapter::sender`] hands out a shareable
//! [`ChatSender`] that any number of command tasks use at once.
//!
//! Replies are structured ([`Reply`]); each adapter renders them for its
//! platform and is responsible for keeping command output inert there
//! (invariant 11 in ARCHITECTURE.md).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use fleetcmd_core::ids::Identity;

pub mod campfire;
pub mod console;
pub mod irc;
pub mod matrix;
pub mod mattermost;
pub mod slack;
pub mod webhook;
pub mod xmpp;

/// A boxed, sendable future, for the object-safe [`ChatSender`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One chat message received by an adapter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Incoming {
    /// The platform's stable user id (invariant 8 in ARCHITECTURE.md), never a display name.
    pub identity: Identity,
    /// Where replies go; also the channel RBAC rules match on.
    pub channel: String,
    pub text: String,
    /// The thread to answer in, where the platform has threads.
    pub thread: Option<String>,
    /// A direct conversation with the bot: every message is addressed to it.
    pub direct: bool,
    /// Sent by a bot (this one or another): always ignored.
    pub from_bot: bool,
}

/// A posted message, for editing it later.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageRef {
    pub channel: String,
    /// The platform's message id (the console numbers its messages).
    pub id: String,
}

/// A structured reply: a header line, plain lines, then sections (one per
/// host for job results). Every piece of text may hold untrusted data
/// (argument values, agent output); adapters escape all of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reply {
    /// The thread to answer in (copied from [`Incoming::thread`]).
    pub thread: Option<String>,
    pub header: String,
    pub lines: Vec<String>,
    pub sections: Vec<Section>,
    /// Buttons, where the platform has them (approve / deny). Platforms
    /// without buttons show nothing extra: the text already says what to type.
    pub actions: Vec<Action>,
}

/// A button offered with a reply. Clicking it is the same as typing
/// `command`: the adapter verifies the platform's signature (or HMAC) on the
/// click and delivers it as an [`Incoming`] from the clicking user, with
/// `direct = true` so the bot name is not needed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Action {
    pub label: String,
    /// The chat command the click stands for, e.g. `approve 01a2b3c4`.
    pub command: String,
    /// Shown as a destructive action (red) where the platform can.
    pub danger: bool,
}

/// A titled part of a reply, e.g. one host's result.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Section {
    pub title: String,
    /// Plain lines under the title (notes such as "output truncated").
    pub notes: Vec<String>,
    /// Preformatted blocks (command output, tables), shown verbatim but inert.
    pub blocks: Vec<CodeBlock>,
}

/// Preformatted text with an optional label (`stdout`, `stderr`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CodeBlock {
    pub label: String,
    pub text: String,
    /// Lines of the original (a host's whole output) left out of `text`
    /// before the reply was built; an adapter that cuts further adds them
    /// to its own "N more lines", so the count says what is really missing.
    pub omitted_lines: usize,
}

impl Reply {
    /// A reply with just a header.
    pub fn text(header: impl Into<String>) -> Reply {
        Reply {
            header: header.into(),
            ..Reply::default()
        }
    }

    /// Everything in the reply as plain text, for logs and tests (not escaped).
    pub fn plain(&self) -> String {
        let mut s = self.header.clone();
        for l in &self.lines {
            s.push('\n');
            s.push_str(l);
        }
        for sec in &self.sections {
            s.push('\n');
            s.push_str(&sec.title);
            for n in &sec.notes {
                s.push('\n');
                s.push_str(n);
            }
            for b in &sec.blocks {
                s.push('\n');
                s.push_str(&b.label);
                s.push('\n');
                s.push_str(&b.text);
            }
        }
        s
    }
}

/// Why an adapter could not send or edit.
#[derive(thiserror::Error, Debug)]
pub enum AdapterError {
    #[error("writing to {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// The `IdError` already says "invalid identity"; saying it again
    /// read `invalid identity for this adapter: invalid identity …`.
    #[error("{0} (for this adapter)")]
    Identity(#[from] fleetcmd_core::ids::IdError),
    #[error("message {0} cannot be edited: unknown id")]
    UnknownMessage(String),
    /// The chat platform refused or failed a request (`what` names the
    /// platform and call, `message` says why; never a secret).
    #[error("{what}: {message}")]
    Platform { what: String, message: String },
}

/// A request an adapter refused before it reached the router — a bad
/// signature, HMAC or token, a stale timestamp, a forged button click. The
/// gateway records it in the audit trail as `auth_failed` (rate-limited per
/// adapter and source).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthFailure {
    /// `slack`, `mattermost`, `webhook:<name>`, …
    pub adapter: String,
    /// Where it came from: a peer address or the platform's claimed sender.
    pub source: String,
    /// What was wrong (never the secret or the signature itself).
    pub detail: String,
}

/// Where adapters send their [`AuthFailure`]s. Bounded and non-blocking: a
/// full queue drops the report (it is logged), so forged traffic cannot
/// slow an adapter down.
#[derive(Debug, Clone)]
pub struct AuthFailures(Option<tokio::sync::mpsc::Sender<AuthFailure>>);

impl AuthFailures {
    /// Reports go nowhere (adapters built outside a gateway, tests).
    pub fn none() -> AuthFailures {
        AuthFailures(None)
    }

    /// A reporter and the receiving end, holding up to `capacity` reports.
    pub fn channel(capacity: usize) -> (AuthFailures, tokio::sync::mpsc::Receiver<AuthFailure>) {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity);
        (AuthFailures(Some(tx)), rx)
    }

    /// Logs and queues one failure.
    pub fn report(&self, adapter: &str, source: impl Into<String>, detail: impl Into<String>) {
        let f = AuthFailure {
            adapter: adapter.to_string(),
            source: source.into(),
            detail: detail.into(),
        };
        tracing::warn!(adapter = %f.adapter, source = %f.source, detail = %f.detail, "chat request refused");
        if let Some(tx) = &self.0 {
            let _ = tx.try_send(f);
        }
    }
}

impl Default for AuthFailures {
    fn default() -> Self {
        AuthFailures::none()
    }
}

/// TLS for chat platforms' public endpoints (Slack, Mattermost, webhooks):
/// rustls with the ring provider and Mozilla's root list (no aws-lc, no
/// system store). `what` names the caller in the error.
pub fn public_tls_config(what: &str) -> Result<rustls::ClientConfig, AdapterError> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| AdapterError::Platform {
        what: what.to_string(),
        message: e.to_string(),
    })?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

/// The sending half of an adapter; shared by every command task.
pub trait ChatSender: Send + Sync {
    /// Posts `reply` in `channel`.
    fn send<'a>(
        &'a self,
        channel: &'a str,
        reply: Reply,
    ) -> BoxFuture<'a, Result<MessageRef, AdapterError>>;
    /// Replaces a posted message (platforms without edits post again).
    fn edit<'a>(
        &'a self,
        msg: &'a MessageRef,
        reply: Reply,
    ) -> BoxFuture<'a, Result<(), AdapterError>>;

    /// Whether `edit` really edits in place. On platforms without edits
    /// (IRC) the router skips progress updates and posts only the final
    /// summary instead of flooding the channel.
    fn can_edit(&self) -> bool {
        true
    }

    /// How long the router waits for a job's result before posting the
    /// "job … N targets" acknowledgement: a job that finishes within it
    /// gets its result alone. Zero (post at once) where messages can be
    /// edited; line-based platforms (IRC) pay for every line.
    fn ack_grace(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    /// Whether this gateway posts to the chat now: a connection chat
    /// whose lease another gateway holds does not (`crate::standby`), so
    /// alerts and audit records are left to the holder, unclaimed.
    fn active(&self) -> bool {
        true
    }
}

/// A chat platform connection.
/// A chat platform that also receives HTTP (events, slash commands, button
/// clicks): its routes are mounted on the gateway's one listener, refused
/// requests are reported, and accepted ones are remembered so a replay is
/// refused (also after a restart).
pub trait HttpInbound: ChatAdapter {
    /// The routes to mount on the gateway's listener.
    fn routes(&self) -> axum::Router;
    /// Where to report refused requests (audited as `auth_failed`); set once.
    fn report_auth_failures(&self, to: AuthFailures);
    /// Where accepted request ids and signatures are kept; set once.
    fn use_replay_guard(&self, guard: crate::store::ReplayGuard);
}

/// `found` (keys relative to a section) with the section name in front of
/// each key, as `gateway.toml validate` names them.
pub(crate) fn prefixed(section: &str, found: Vec<(String, String)>) -> Vec<(String, String)> {
    found
        .into_iter()
        .map(|(key, message)| (format!("{section}.{key}"), message))
        .collect()
}

pub trait ChatAdapter: Send + 'static {
    /// The next message; `None` at the end of input (the gateway then lets
    /// running commands finish and returns).
    fn recv(&mut self) -> impl Future<Output = Option<Incoming>> + Send;

    /// The sending half, usable while `recv` is pending.
    fn sender(&self) -> Arc<dyn ChatSender>;

    /// Posts `reply` in `channel` (shortcut for `sender().send`).
    fn send(
        &self,
        channel: &str,
        reply: Reply,
    ) -> impl Future<Output = Result<MessageRef, AdapterError>> + Send {
        let sender = self.sender();
        let channel = channel.to_owned();
        async move { sender.send(&channel, reply).await }
    }

    /// Replaces a posted message (shortcut for `sender().edit`).
    fn edit(
        &self,
        msg: &MessageRef,
        reply: Reply,
    ) -> impl Future<Output = Result<(), AdapterError>> + Send {
        let sender = self.sender();
        let msg = msg.clone();
        async move { sender.edit(&msg, reply).await }
    }
}
