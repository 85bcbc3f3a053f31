//! What Slack sends us (Events API callbacks, slash commands, block_actions
//! clicks), turned into [`Incoming`] messages, whichever way it arrived
//! (Socket Mode or HTTP). Retries and replays are dropped here, by event
//! id, envelope id, trigger id and message timestamp, kept in the
//! gateway's persisted replay records for [`DEDUPE_SECS`].

use std::sync::atomic::{AtomicU64, Ordering};

use fleetcmd_core::ids::Identity;
use serde_json::Value;
use tokio::sync::mpsc;

use super::blocks::{ACTION_PREFIX, MAX_BUTTON_VALUE};
use super::config::is_slack_id;
use crate::adapters::Incoming;
use crate::store::{Refusal, ReplayGuard, ReplaySlot};

/// How long a dedupe key is kept (persisted): longer than Slack's retry
/// schedule (retries after about 1 and 5 minutes) and than the five
/// minutes a request signature stays valid, so neither a retry nor a
/// replayed request runs twice, also after a gateway restart.
pub const DEDUPE_SECS: u64 = 60 * 60;

/// Who we are in the workspace.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub team_id: String,
    pub bot_user_id: String,
}

/// Shared by the socket task and the HTTP handlers.
pub struct Inbound {
    pub ctx: Ctx,
    seen: ReplaySlot,
    tx: mpsc::Sender<Incoming>,
    dropped: AtomicU64,
}

/// Why a payload was not delivered (logged by the caller).
#[derive(Debug, PartialEq, Eq)]
pub enum Skip {
    /// Seen before (a retry).
    Duplicate,
    /// Not for us: an edit, a join, a hidden message, another event type.
    Ignored(&'static str),
    /// Malformed or refused.
    Refused(String),
}

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Skip::Duplicate => f.write_str("duplicate (retry)"),
            Skip::Ignored(why) => write!(f, "ignored: {why}"),
            Skip::Refused(why) => write!(f, "refused: {why}"),
        }
    }
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for k in path {
        cur = cur.get(k)?;
    }
    cur.as_str()
}

fn refused(why: impl Into<String>) -> Skip {
    Skip::Refused(why.into())
}

/// `slack:<team>:<user>` from ids Slack gave us.
pub fn identity(team: &str, user: &str) -> Result<Identity, Skip> {
    if !is_slack_id(team) || !is_slack_id(user) {
        return Err(refused("team or user id is not a Slack id"));
    }
    Identity::parse(&format!("slack:{team}:{user}")).map_err(|e| refused(e.to_string()))
}

/// Message text as the user typed it: Slack's `<url|label>` links become
/// their label (`<url>` its URL), then `&lt;`, `&gt;` and `&amp;` are
/// unescaped. Mentions (`<@U…>`, `<#C…>`, `<!here>`) are kept as they are.
pub fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('<') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        match after.find('>') {
            Some(end) => {
                let inner = &after[..end];
                if inner.starts_with(['@', '#', '!']) {
                    out.push('<');
                    out.push_str(inner);
                    out.push('>');
                } else {
                    out.push_str(inner.split_once('|').map_or(inner, |(_, label)| label));
                }
                rest = &after[end + 1..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// Strips a leading mention of the bot (`<@UBOT>` or `<@UBOT|name>`, then
/// an optional `:` or `,`); `None` when the text does not start with one.
fn strip_mention<'a>(text: &'a str, bot_user: &str) -> Option<&'a str> {
    let rest = text.trim_start().strip_prefix("<@")?;
    let end = rest.find('>')?;
    let id = rest[..end].split('|').next().unwrap_or_default();
    if id != bot_user {
        return None;
    }
    let rest = &rest[end + 1..];
    Some(rest.strip_prefix([':', ',']).unwrap_or(rest).trim())
}

/// Whether a clicked button's value is one we put there: `approve ID` or
/// `deny ID`.
pub fn is_approval_command(value: &str) -> bool {
    let Some((verb, id)) = value.split_once(' ') else {
        return false;
    };
    matches!(verb, "approve" | "deny")
        && (1..=64).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

impl Inbound {
    pub fn new(ctx: Ctx, tx: mpsc::Sender<Incoming>) -> Inbound {
        Inbound {
            ctx,
            seen: ReplaySlot::default(),
            tx,
            dropped: AtomicU64::new(0),
        }
    }

    /// Keeps dedupe keys in `guard` (the gateway's, persisted) from now on.
    pub fn use_replay_guard(&self, guard: ReplayGuard) {
        self.seen.set(guard);
    }

    /// `Ok` the first time `key` is seen (recorded durably first);
    /// [`Skip::Duplicate`] after, also across restarts.
    pub async fn first(&self, key: String) -> Result<(), Skip> {
        let until = crate::unix_now().saturating_add(DEDUPE_SECS);
        match self.seen.get().admit("slack", &key, until).await {
            Ok(()) => Ok(()),
            Err(Refusal::Replay) => Err(Skip::Duplicate),
            Err(Refusal::Unavailable) => Err(refused("dedupe record not kept")),
            Err(Refusal::Elsewhere) => Err(Skip::Ignored("handled by another gateway")),
        }
    }

    /// Messages dropped because the router was not keeping up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Hands `msg` to the router. Never waits: Slack wants an answer within
    /// 3 s, so when the queue is full the message is dropped with a
    /// warning and counted.
    fn deliver(&self, msg: Incoming) -> Result<(), Skip> {
        match self.tx.try_send(msg) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(m)) => {
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::warn!(identity = %m.identity, channel = %m.channel, dropped_total = n, "slack: router queue full; message dropped");
                Err(refused("router queue full"))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(refused("adapter closed")),
        }
    }

    fn channel(&self, id: &str) -> Result<String, Skip> {
        if !is_slack_id(id) {
            return Err(refused("channel id is not a Slack id"));
        }
        Ok(format!("slack:{}:{id}", self.ctx.team_id))
    }

    fn check_team(&self, team: Option<&str>) -> Result<(), Skip> {
        match team {
            Some(t) if t == self.ctx.team_id => Ok(()),
            Some(t) => Err(refused(format!(
                "from workspace {} (this gateway serves {})",
                t.chars().take(32).collect::<String>(),
                self.ctx.team_id
            ))),
            None => Err(refused("no team_id")),
        }
    }

    /// An Events API `event_callback` (the HTTP body, or a Socket Mode
    /// `events_api` payload).
    pub async fn event_callback(&self, v: &Value) -> Result<(), Skip> {
        if v.get("type").and_then(Value::as_str) != Some("event_callback") {
            return Err(Skip::Ignored("not an event_callback"));
        }
        self.check_team(str_at(v, &["team_id"]))?;
        if let Some(id) = str_at(v, &["event_id"]) {
            self.first(format!("event:{id}")).await?;
        }
        let ev = v.get("event").ok_or_else(|| refused("no event"))?;
        let kind = str_at(ev, &["type"]).unwrap_or_default();
        if kind != "message" && kind != "app_mention" {
            return Err(Skip::Ignored("event type"));
        }
        if ev.get("subtype").is_some() {
            return Err(Skip::Ignored(
                "message subtype (edit, join, bot message, …)",
            ));
        }
        if ev.get("hidden").and_then(Value::as_bool) == Some(true) {
            return Err(Skip::Ignored("hidden message"));
        }
        let user = str_at(ev, &["user"]).ok_or(Skip::Ignored("no user"))?;
        let channel_id = str_at(ev, &["channel"]).ok_or_else(|| refused("no channel"))?;
        let ts = str_at(ev, &["ts"]).ok_or_else(|| refused("no ts"))?;
        let raw = str_at(ev, &["text"]).unwrap_or_default();
        // The user's own workspace (Slack Connect users come from others).
        let user_team = str_at(ev, &["user_team"])
            .or_else(|| str_at(ev, &["team"]))
            .unwrap_or(&self.ctx.team_id);
        let identity = identity(user_team, user)?;
        let channel = self.channel(channel_id)?;
        // A mention arrives twice (message + app_mention): once is enough.
        self.first(format!("msg:{channel_id}:{ts}")).await?;
        let from_bot =
            ev.get("bot_id").is_some_and(|b| !b.is_null()) || user == self.ctx.bot_user_id;
        let im = str_at(ev, &["channel_type"]) == Some("im");
        let (text, direct) = match strip_mention(raw, &self.ctx.bot_user_id) {
            Some(rest) => (unescape(rest), true),
            None => (unescape(raw), im || kind == "app_mention"),
        };
        self.deliver(Incoming {
            identity,
            channel,
            text,
            thread: str_at(ev, &["thread_ts"]).map(str::to_string),
            direct,
            from_bot,
        })
    }

    /// A slash command (`/fleetcmd run uptime on all`): the form fields of
    /// the HTTP POST, or the Socket Mode payload (same names). The text is
    /// the command; the identity is `user_id` in `team_id` (never
    /// `user_name`, which anyone can change).
    pub async fn slash_command(&self, f: &Value) -> Result<(), Skip> {
        let team = str_at(f, &["team_id"]);
        self.check_team(team)?;
        if let Some(t) = str_at(f, &["trigger_id"]) {
            self.first(format!("trigger:{t}")).await?;
        }
        let user = str_at(f, &["user_id"]).ok_or_else(|| refused("no user_id"))?;
        let channel_id = str_at(f, &["channel_id"]).ok_or_else(|| refused("no channel_id"))?;
        let identity = identity(team.unwrap_or_default(), user)?;
        let channel = self.channel(channel_id)?;
        let text = unescape(str_at(f, &["text"]).unwrap_or_default());
        self.deliver(Incoming {
            identity,
            channel,
            text: text.trim().to_string(),
            thread: None,
            direct: true,
            from_bot: false,
        })
    }

    /// An interactivity payload. Only `block_actions` clicks on our own
    /// buttons whose value is an approve/deny command are delivered, as a
    /// message from the clicking user.
    pub async fn interaction(&self, p: &Value) -> Result<(), Skip> {
        if str_at(p, &["type"]) != Some("block_actions") {
            return Err(Skip::Ignored("interaction type"));
        }
        let team = str_at(p, &["team", "id"]).or_else(|| str_at(p, &["user", "team_id"]));
        self.check_team(team)?;
        if let Some(t) = str_at(p, &["trigger_id"]) {
            self.first(format!("trigger:{t}")).await?;
        }
        let user = str_at(p, &["user", "id"]).ok_or_else(|| refused("no user.id"))?;
        let user_team = str_at(p, &["user", "team_id"]).or(team).unwrap_or_default();
        let channel_id = str_at(p, &["channel", "id"])
            .or_else(|| str_at(p, &["container", "channel_id"]))
            .ok_or_else(|| refused("no channel"))?;
        let action = p
            .get("actions")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .ok_or_else(|| refused("no actions"))?;
        let action_id = str_at(action, &["action_id"]).unwrap_or_default();
        let value = str_at(action, &["value"]).unwrap_or_default();
        if !action_id.starts_with(ACTION_PREFIX) {
            return Err(refused("not one of our buttons"));
        }
        if value.len() > MAX_BUTTON_VALUE || !is_approval_command(value) {
            return Err(refused("button value is not an approve/deny command"));
        }
        let identity = identity(user_team, user)?;
        let channel = self.channel(channel_id)?;
        let thread = str_at(p, &["message", "thread_ts"])
            .or_else(|| str_at(p, &["container", "thread_ts"]))
            .map(str::to_string);
        self.deliver(Incoming {
            identity,
            channel,
            text: value.to_string(),
            thread,
            direct: true,
            from_bot: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescaping_user_text() {
        for (input, expected) in [
            ("run logs a&amp;b on all", "run logs a&b on all"),
            ("x &lt;y&gt;", "x <y>"),
            (
                "on <http://web-1.example.com|web-1.example.com>",
                "on web-1.example.com",
            ),
            ("see <https://example.com>", "see https://example.com"),
            ("<@U1> and <!here> <#C1|ops>", "<@U1> and <!here> <#C1|ops>"),
            ("dangling < bracket", "dangling < bracket"),
            ("&amp;lt;", "&lt;"),
        ] {
            assert_eq!(unescape(input), expected, "{input:?}");
        }
    }

    #[test]
    fn bot_mentions_are_stripped() {
        assert_eq!(strip_mention("<@UBOT> run x", "UBOT"), Some("run x"));
        assert_eq!(
            strip_mention("  <@UBOT|fleetcmd>: help", "UBOT"),
            Some("help")
        );
        assert_eq!(strip_mention("<@UOTHER> run x", "UBOT"), None);
        assert_eq!(strip_mention("hi <@UBOT>", "UBOT"), None);
    }

    #[test]
    fn only_approval_commands_are_button_values() {
        for (v, ok) in [
            ("approve 01890a5d-ac96-774b", true),
            ("deny 0189", true),
            ("run reboot on all", false),
            ("approve", false),
            ("approve 0189 extra", false),
            ("approve <!here>", false),
            ("deny ", false),
        ] {
            assert_eq!(is_approval_command(v), ok, "{v:?}");
        }
    }
}
