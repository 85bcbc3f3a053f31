//! What the adapter does with each [`Event`]: which rooms it serves, which
//! invites it accepts, which rooms it refuses as end-to-end encrypted, and
//! which reactions stand for `approve`/`deny`. Pure: no I/O.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Mutex;

use super::ids;
use super::sync::Event;
use crate::adapters::{Action, Incoming};

/// Posted once per start in a served room that turned out to be
/// end-to-end encrypted.
pub const E2EE_REFUSAL: &str = "This room is end-to-end encrypted. fleetcmd holds no encryption keys: it cannot read commands here and does not answer in this room. Use an unencrypted room for fleetcmd.";

/// Reaction keys that stand for an approval's buttons.
pub const APPROVE_KEY: &str = "✅";
pub const DENY_KEY: &str = "❌";

/// Approval messages remembered for reactions; older ones still take the
/// typed command.
const MAX_APPROVALS: usize = 256;

/// What to do for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Hand this to the router.
    Deliver(Incoming),
    /// Accept the invite to this room.
    Join(String),
    /// Post this notice in this room.
    Notice { room: String, text: String },
}

/// Approval messages the bot posted, for reactions on them.
#[derive(Debug, Default)]
pub struct Approvals(Mutex<VecDeque<(String, String, String, String)>>);

impl Approvals {
    /// Remembers `event` in `room` when `actions` offer approve and deny.
    pub fn record(&self, room: &str, event: &str, actions: &[Action]) {
        let find = |verb: &str| {
            actions
                .iter()
                .find(|a| a.command.split_whitespace().next() == Some(verb))
                .map(|a| a.command.clone())
        };
        let (Some(approve), Some(deny)) = (find("approve"), find("deny")) else {
            return;
        };
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() == MAX_APPROVALS {
            q.pop_front();
        }
        q.push_back((room.to_string(), event.to_string(), approve, deny));
    }

    /// The command a reaction `key` on `event` in `room` stands for.
    pub fn command(&self, room: &str, event: &str, key: &str) -> Option<String> {
        // Emoji keyboards add a variation selector (U+FE0F) or not.
        let key = key.trim_end_matches('\u{FE0F}');
        let q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (_, _, approve, deny) = q.iter().find(|(r, e, _, _)| r == room && e == event)?;
        match key {
            APPROVE_KEY => Some(approve.clone()),
            DENY_KEY => Some(deny.clone()),
            _ => None,
        }
    }
}

/// The rooms the bot serves and what it learned about them.
#[derive(Debug)]
pub struct Rooms {
    me: String,
    served: BTreeSet<String>,
    encrypted: BTreeSet<String>,
}

impl Rooms {
    /// `me`: the bot's user id; `served`: the configured rooms' ids.
    pub fn new(me: &str, served: impl IntoIterator<Item = String>) -> Rooms {
        Rooms {
            me: me.to_string(),
            served: served.into_iter().collect(),
            encrypted: BTreeSet::new(),
        }
    }

    /// Whether the bot answers in `room`.
    pub fn answers_in(&self, room: &str) -> bool {
        self.served.contains(room) && !self.encrypted.contains(room)
    }

    /// The steps for `ev`. `history`: the event came with the first sync
    /// of this start, before the bot was listening; messages and reactions
    /// in it are not acted on.
    pub fn step(&mut self, ev: Event, history: bool, approvals: &Approvals) -> Option<Step> {
        match ev {
            Event::Invited { room } if self.served.contains(&room) => Some(Step::Join(room)),
            Event::Invited { room } => {
                tracing::info!(room = %room, "[matrix] invite to a room not in matrix.rooms; not joining");
                None
            }
            Event::Encrypted { room } => {
                if !self.served.contains(&room) || !self.encrypted.insert(room.clone()) {
                    return None;
                }
                tracing::warn!(room = %room, "[matrix] room is end-to-end encrypted; refusing to serve it");
                Some(Step::Notice {
                    room,
                    text: E2EE_REFUSAL.to_string(),
                })
            }
            _ if history => None,
            Event::Message {
                room,
                sender,
                msgtype,
                body,
                edit,
                ..
            } => {
                if sender == self.me || !self.answers_in(&room) || edit {
                    return None;
                }
                // m.notice is what bots send (this one included): never
                // commands, so two bots cannot talk each other into a loop.
                let from_bot = msgtype == "m.notice";
                if msgtype != "m.text" && !from_bot {
                    return None;
                }
                self.incoming(&room, &sender, body, false, from_bot)
            }
            Event::Reaction {
                room,
                sender,
                target,
                key,
            } => {
                if sender == self.me || !self.answers_in(&room) {
                    return None;
                }
                let command = approvals.command(&room, &target, &key)?;
                self.incoming(&room, &sender, command, true, false)
            }
            Event::Undecryptable { room, sender } => {
                tracing::debug!(room = %room, sender = %sender, "[matrix] encrypted event ignored");
                None
            }
        }
    }

    fn incoming(
        &self,
        room: &str,
        sender: &str,
        text: String,
        direct: bool,
        from_bot: bool,
    ) -> Option<Step> {
        match ids::identity(sender) {
            Ok(identity) => Some(Step::Deliver(Incoming {
                identity,
                channel: ids::channel(room),
                text,
                thread: None,
                direct,
                from_bot,
            })),
            Err(e) => {
                tracing::warn!(room = %room, error = %e, "[matrix] message from an unusable sender ignored");
                None
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    const OPS: &str = "!ops:hs";

    /// A request for one approval of `reboot`, job `0123456789ab`.
    pub(in crate::adapters::matrix) fn approval_request() -> crate::adapters::Reply {
        crate::render::approval_request(
            "0123456789ab",
            "reboot",
            &[],
            "all",
            1,
            std::time::Duration::from_secs(60),
            "matrix:@alice:hs",
        )
    }

    fn rooms() -> Rooms {
        Rooms::new("@bot:hs", [OPS.to_string()])
    }

    fn msg(room: &str, sender: &str, msgtype: &str, edit: bool) -> Event {
        Event::Message {
            room: room.into(),
            sender: sender.into(),
            event_id: "$e".into(),
            msgtype: msgtype.into(),
            body: "!whoami".into(),
            edit,
        }
    }

    fn delivered(s: Option<Step>) -> Option<(String, String, String, bool, bool)> {
        match s? {
            Step::Deliver(i) => Some((
                i.identity.as_str().to_string(),
                i.channel,
                i.text,
                i.direct,
                i.from_bot,
            )),
            other => panic!("not a delivery: {other:?}"),
        }
    }

    #[test]
    fn invites_are_accepted_for_served_rooms_only() {
        let a = Approvals::default();
        let mut r = rooms();
        let inv = |room: &str| Event::Invited { room: room.into() };
        assert_eq!(r.step(inv(OPS), true, &a), Some(Step::Join(OPS.into())));
        assert_eq!(r.step(inv(OPS), false, &a), Some(Step::Join(OPS.into())));
        assert_eq!(r.step(inv("!other:hs"), false, &a), None);
    }

    #[test]
    fn the_bot_itself_edits_history_and_other_rooms_are_ignored() {
        let a = Approvals::default();
        let mut r = rooms();
        assert_eq!(
            r.step(msg(OPS, "@bot:hs", "m.text", false), false, &a),
            None
        );
        assert_eq!(
            r.step(msg(OPS, "@alice:hs", "m.text", true), false, &a),
            None
        );
        assert_eq!(
            r.step(msg(OPS, "@alice:hs", "m.text", false), true, &a),
            None
        );
        assert_eq!(
            r.step(msg("!x:hs", "@alice:hs", "m.text", false), false, &a),
            None
        );
        assert_eq!(
            r.step(msg(OPS, "@alice:hs", "m.image", false), false, &a),
            None
        );
        let bot = delivered(r.step(msg(OPS, "@other-bot:hs", "m.notice", false), false, &a));
        assert_eq!(bot.map(|d| d.4), Some(true), "m.notice is from a bot");
    }

    #[test]
    fn an_encrypted_room_is_refused_once_and_then_ignored() {
        let a = Approvals::default();
        let mut r = rooms();
        let enc = || Event::Encrypted { room: OPS.into() };
        assert_eq!(
            r.step(enc(), true, &a),
            Some(Step::Notice {
                room: OPS.into(),
                text: E2EE_REFUSAL.into()
            })
        );
        assert_eq!(r.step(enc(), false, &a), None, "one notice");
        assert!(!r.answers_in(OPS));
        assert_eq!(
            r.step(msg(OPS, "@alice:hs", "m.text", false), false, &a),
            None
        );
        let other = Event::Encrypted {
            room: "!x:hs".into(),
        };
        assert_eq!(r.step(other, false, &a), None, "not served, nothing said");
    }

    #[test]
    fn reactions_on_an_approval_request_are_its_commands() {
        let a = Approvals::default();
        let actions = approval_request().actions;
        a.record(OPS, "$req", &actions);
        a.record(OPS, "$plain", &[]);
        let mut r = rooms();
        let react = |target: &str, key: &str, sender: &str| Event::Reaction {
            room: OPS.into(),
            sender: sender.into(),
            target: target.into(),
            key: key.into(),
        };
        let d = delivered(r.step(react("$req", "✅️", "@bob:hs"), false, &a));
        assert_eq!(
            d,
            Some((
                "matrix:@bob:hs".into(),
                "matrix:!ops:hs".into(),
                "approve 0123456789ab".into(),
                true,
                false
            ))
        );
        let d = delivered(r.step(react("$req", "❌", "@bob:hs"), false, &a));
        assert_eq!(d.map(|d| d.2), Some("deny 0123456789ab".into()));
        assert_eq!(r.step(react("$req", "👍", "@bob:hs"), false, &a), None);
        assert_eq!(r.step(react("$plain", "✅", "@bob:hs"), false, &a), None);
        assert_eq!(r.step(react("$req", "✅", "@bot:hs"), false, &a), None);
        assert_eq!(r.step(react("$req", "✅", "@bob:hs"), true, &a), None);
    }
}
