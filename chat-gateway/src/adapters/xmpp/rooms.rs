//! What the adapter does with each stanza once a session is up: tracks who
//! sits behind each room nickname (from MUC presence), turns live messages
//! into [`Incoming`]s and decides what must be refused.
//!
//! Pure (no I/O), so the identity rules are unit-tested stanza by stanza:
//! - in a room, the identity is the occupant's REAL bare JID as the room
//!   reported it in presence, never the nickname; a nick whose real JID is
//!   hidden (or unknown) identifies nobody and its messages are refused;
//! - a nick taken over by someone else is re-mapped by the newcomer's own
//!   presence, so the newcomer gets nothing of the previous holder;
//! - history (`<delay/>`), our own messages, MUC private messages and
//!   messages from rooms we were not configured for are not commands.

use std::collections::{BTreeMap, HashMap};

use fleetcmd_core::ids::Identity;

use super::jid::Jid;
use super::stanza::{self, Message, MessageKind, Presence, PresenceKind, Stanza, status};
use crate::adapters::Incoming;

/// Nick conflicts tolerated (each retry appends `_`) before giving up.
pub const MAX_NICK_RETRIES: u32 = 5;

/// The warning posted (once per join) in a room that hides real JIDs.
pub const HIDDEN_JIDS_WARNING: &str = "I cannot tell who you are in this room: it hides members' real JIDs from me, so I refuse every command here. A room owner can make real JIDs visible to everyone (room configuration: \"who may discover real JIDs\" = anyone), or message me directly.";

/// One configured room, as seen in this session.
#[derive(Debug, Clone)]
struct Room {
    nick: String,
    joined: bool,
    nick_retries: u32,
    /// Nick → the occupant's real bare JID (`None`: hidden from us).
    occupants: HashMap<String, Option<Jid>>,
    warned: bool,
}

/// What the session should do after a stanza.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Hand a message to the router.
    Deliver(Incoming),
    /// Write this stanza.
    Send(String),
}

/// The per-session state; a reconnect starts a new one.
#[derive(Debug, Clone)]
pub struct Rooms {
    me: Jid,
    rooms: BTreeMap<Jid, Room>,
}

/// `xmpp:<bare-jid>` for identities and channels.
pub fn channel_of(jid: &Jid) -> String {
    format!("xmpp:{}", jid.bare())
}

impl Rooms {
    /// `me` is our bare JID; `rooms` are bare room JIDs, joined as `nick`.
    pub fn new(me: &Jid, rooms: &[Jid], nick: &str) -> Rooms {
        Rooms {
            me: me.bare(),
            rooms: rooms
                .iter()
                .map(|r| {
                    (
                        r.bare(),
                        Room {
                            nick: nick.to_string(),
                            joined: false,
                            nick_retries: 0,
                            occupants: HashMap::new(),
                            warned: false,
                        },
                    )
                })
                .collect(),
        }
    }

    /// The join presences for every room.
    pub fn join_all(&self) -> Vec<String> {
        self.rooms
            .iter()
            .map(|(jid, r)| stanza::join(jid, &r.nick))
            .collect()
    }

    /// Join presences for the rooms not joined (a join refused because the
    /// room was locked or the service down, or a kick): sent again on each
    /// keepalive tick.
    pub fn rejoin_missing(&self) -> Vec<String> {
        self.rooms
            .iter()
            .filter(|(_, r)| !r.joined)
            .map(|(jid, r)| stanza::join(jid, &r.nick))
            .collect()
    }

    /// Whether `jid` is one of the configured rooms.
    pub fn is_room(&self, jid: &Jid) -> bool {
        self.rooms.contains_key(&jid.bare())
    }

    /// Rooms joined so far.
    pub fn joined(&self) -> Vec<Jid> {
        self.rooms
            .iter()
            .filter(|(_, r)| r.joined)
            .map(|(j, _)| j.clone())
            .collect()
    }

    /// Our nick in `room`.
    pub fn nick(&self, room: &Jid) -> Option<&str> {
        self.rooms.get(room).map(|r| r.nick.as_str())
    }

    /// Handles one stanza (iq is answered by the caller).
    pub fn on_stanza(&mut self, s: Stanza) -> Vec<Action> {
        match s {
            Stanza::Message(m) => self.on_message(m),
            Stanza::Presence(p) => self.on_presence(p),
            Stanza::Iq(_) | Stanza::Other(_) => Vec::new(),
        }
    }

    fn on_presence(&mut self, p: Presence) -> Vec<Action> {
        let Some(from) = p.from else {
            return Vec::new();
        };
        let room_jid = from.bare();
        let Some(room) = self.rooms.get_mut(&room_jid) else {
            return Vec::new();
        };
        let Some(nick) = from.resource.clone() else {
            return Vec::new();
        };
        let is_self = p.statuses.contains(&status::SELF);
        match p.kind {
            PresenceKind::Error => {
                if nick != room.nick || room.joined {
                    tracing::warn!(room = %room_jid, nick, error = ?p.error, "presence error from room");
                    return Vec::new();
                }
                if p.error.as_deref() == Some("conflict") && room.nick_retries < MAX_NICK_RETRIES {
                    room.nick_retries += 1;
                    room.nick.push('_');
                    tracing::info!(room = %room_jid, nick = %room.nick, "nick in use; joining with another");
                    return vec![Action::Send(stanza::join(&room_jid, &room.nick))];
                }
                tracing::error!(room = %room_jid, nick, error = ?p.error, "cannot join room; trying again at the next keepalive");
                Vec::new()
            }
            PresenceKind::Unavailable => {
                if is_self || (room.joined && nick == room.nick && p.new_nick.is_none()) {
                    tracing::warn!(room = %room_jid, statuses = ?p.statuses, "left or removed from room; rejoining at the next keepalive");
                    room.joined = false;
                    room.occupants.clear();
                } else {
                    room.occupants.remove(&nick);
                }
                if is_self && let Some(new) = p.new_nick {
                    room.nick = new;
                    room.joined = true;
                }
                Vec::new()
            }
            PresenceKind::Available => {
                let real = p.real_jid.map(|j| j.bare());
                if is_self {
                    let visible = p.statuses.contains(&status::NON_ANONYMOUS);
                    if !room.joined {
                        tracing::info!(room = %room_jid, nick, real_jids_visible = visible, "joined room");
                    }
                    if p.statuses.contains(&status::NICK_ASSIGNED) || nick != room.nick {
                        room.nick = nick.clone();
                    }
                    room.joined = true;
                    room.warned = false;
                    room.occupants.insert(nick, real);
                    if p.statuses.contains(&status::CREATED) {
                        return vec![Action::Send(stanza::instant_room(&room_jid))];
                    }
                } else {
                    room.occupants.insert(nick, real);
                }
                Vec::new()
            }
            PresenceKind::Other => Vec::new(),
        }
    }

    fn on_message(&mut self, m: Message) -> Vec<Action> {
        let Some(from) = m.from.clone() else {
            return Vec::new();
        };
        match m.kind {
            MessageKind::Error => {
                tracing::warn!(from = %from, error = ?m.error, "message bounced");
                Vec::new()
            }
            MessageKind::Headline => Vec::new(),
            MessageKind::GroupChat => self.on_groupchat(from, m),
            MessageKind::Chat | MessageKind::Normal => self.on_direct(from, m),
        }
    }

    fn on_groupchat(&mut self, from: Jid, m: Message) -> Vec<Action> {
        let room_jid = from.bare();
        let Some(room) = self.rooms.get_mut(&room_jid) else {
            tracing::debug!(from = %from, "groupchat from a room we were not configured for; ignored");
            return Vec::new();
        };
        let (Some(nick), Some(body)) = (from.resource.as_deref(), m.body) else {
            return Vec::new(); // the room itself (subject, notices) or no body
        };
        if m.delayed {
            return Vec::new(); // history from before we joined
        }
        let channel = channel_of(&room_jid);
        if nick == room.nick {
            return deliver(&self.me, channel, body, false, true);
        }
        match room.occupants.get(nick) {
            Some(Some(real)) => {
                let real = real.clone();
                deliver(&real, channel, body, false, real == self.me)
            }
            known => {
                tracing::warn!(room = %room_jid, nick, occupant_known = known.is_some(), "message refused: the room does not show this occupant's real JID, so nobody can be identified");
                let addressed = {
                    let t = body.trim_start();
                    t.starts_with('!')
                        || t.starts_with('@')
                        || t.to_lowercase().contains(&room.nick.to_lowercase())
                };
                if addressed && !room.warned {
                    room.warned = true;
                    let msg = stanza::message(
                        &room_jid,
                        "groupchat",
                        &stanza::new_id(),
                        HIDDEN_JIDS_WARNING,
                        None,
                    );
                    return vec![Action::Send(msg)];
                }
                Vec::new()
            }
        }
    }

    fn on_direct(&mut self, from: Jid, m: Message) -> Vec<Action> {
        let Some(body) = m.body else {
            return Vec::new();
        };
        if m.muc_user || self.is_room(&from) {
            tracing::info!(from = %from, "private message through a room ignored: message the bot's JID directly");
            return Vec::new();
        }
        if from.local.is_none() {
            tracing::debug!(from = %from, "message from a server or service ignored");
            return Vec::new();
        }
        if m.delayed {
            tracing::info!(from = %from.bare(), "delayed (offline) message ignored: commands are only taken live");
            return Vec::new();
        }
        let bare = from.bare();
        deliver(&bare, channel_of(&bare), body, true, bare == self.me)
    }
}

fn deliver(who: &Jid, channel: String, text: String, direct: bool, from_bot: bool) -> Vec<Action> {
    match Identity::parse(&channel_of(who)) {
        Ok(identity) => vec![Action::Deliver(Incoming {
            identity,
            channel,
            text,
            thread: None,
            direct,
            from_bot,
        })],
        Err(e) => {
            tracing::warn!(error = %e, "message from an unusable JID ignored");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::xmpp::stanza::classify;
    use crate::adapters::xmpp::xml::parse_element;

    const ROOM: &str = "ops@conference.localhost";

    fn jid(s: &str) -> Jid {
        Jid::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    fn rooms() -> Rooms {
        let mut r = Rooms::new(&jid("bot@localhost"), &[jid(ROOM)], "fleetcmd");
        feed(&mut r, &self_presence("fleetcmd", "100"));
        r
    }

    fn feed(r: &mut Rooms, xml: &str) -> Vec<Action> {
        let el = parse_element(xml.as_bytes()).unwrap_or_else(|e| panic!("{xml}: {e}"));
        let st = classify(&el).unwrap_or_else(|e| panic!("{xml}: {e}"));
        r.on_stanza(st)
    }

    fn self_presence(nick: &str, codes: &str) -> String {
        let status: String = codes
            .split(',')
            .map(|c| format!("<status code='{c}'/>"))
            .collect();
        format!(
            "<presence from='{ROOM}/{nick}'><x xmlns='http://jabber.org/protocol/muc#user'><item affiliation='none' role='participant' jid='bot@localhost/fleetcmd'/>{status}<status code='110'/></x></presence>"
        )
    }

    fn occupant(nick: &str, real: Option<&str>) -> String {
        let jid = real.map(|j| format!(" jid='{j}'")).unwrap_or_default();
        format!(
            "<presence from='{ROOM}/{nick}'><x xmlns='http://jabber.org/protocol/muc#user'><item affiliation='none' role='participant'{jid}/></x></presence>"
        )
    }

    fn left(nick: &str) -> String {
        format!(
            "<presence type='unavailable' from='{ROOM}/{nick}'><x xmlns='http://jabber.org/protocol/muc#user'><item affiliation='none' role='none'/></x></presence>"
        )
    }

    fn groupchat(nick: &str, body: &str) -> String {
        format!(
            "<message type='groupchat' from='{ROOM}/{nick}' id='x'><body>{body}</body></message>"
        )
    }

    fn delivered(actions: &[Action]) -> Option<(String, String, bool, bool)> {
        match actions {
            [Action::Deliver(m)] => Some((
                m.identity.as_str().to_string(),
                m.channel.clone(),
                m.direct,
                m.from_bot,
            )),
            [] => None,
            other => panic!("{other:#?}"),
        }
    }

    #[test]
    fn identity_is_the_real_jid_never_the_nick() {
        let mut r = rooms();
        assert_eq!(r.joined(), vec![jid(ROOM)]);
        feed(&mut r, &occupant("admin", Some("Alice@localhost/laptop")));
        let got = delivered(&feed(&mut r, &groupchat("admin", "!whoami")));
        assert_eq!(
            got,
            Some((
                "xmpp:alice@localhost".into(),
                "xmpp:ops@conference.localhost".into(),
                false,
                false
            ))
        );
    }

    #[test]
    fn a_taken_over_nick_maps_to_the_newcomer() {
        let mut r = rooms();
        feed(&mut r, &occupant("alice", Some("alice@localhost/a")));
        feed(&mut r, &left("alice"));
        // Nobody holds the nick now: a message claiming it identifies nobody.
        assert_eq!(delivered(&feed(&mut r, &groupchat("alice", "hello"))), None);
        feed(&mut r, &occupant("alice", Some("mallory@localhost/m")));
        let got = delivered(&feed(&mut r, &groupchat("alice", "!run uptime on all")));
        assert_eq!(got.map(|g| g.0), Some("xmpp:mallory@localhost".into()));
    }

    #[test]
    fn hidden_real_jids_are_refused_with_one_warning() {
        let mut r = rooms();
        feed(&mut r, &occupant("alice", None));
        let first = feed(&mut r, &groupchat("alice", "!whoami"));
        let [Action::Send(warning)] = first.as_slice() else {
            panic!("{first:#?}")
        };
        assert!(
            warning.contains("type='groupchat'") && warning.contains("hides members' real JIDs"),
            "{warning}"
        );
        assert!(
            feed(&mut r, &groupchat("alice", "!whoami")).is_empty(),
            "warned once"
        );
        assert!(
            feed(&mut r, &groupchat("stranger", "!whoami")).is_empty(),
            "unknown nick: refused"
        );
    }

    #[test]
    fn history_own_messages_and_room_notices_are_not_commands() {
        let mut r = rooms();
        feed(&mut r, &occupant("alice", Some("alice@localhost/a")));
        let history = format!(
            "<message type='groupchat' from='{ROOM}/alice'><body>!run reboot on all</body><delay xmlns='urn:xmpp:delay' stamp='2020-01-01T00:00:00Z'/></message>"
        );
        assert!(feed(&mut r, &history).is_empty());
        let own = delivered(&feed(&mut r, &groupchat("fleetcmd", "job 1 done")));
        assert_eq!(own.map(|o| o.3), Some(true), "from_bot");
        let subject = format!(
            "<message type='groupchat' from='{ROOM}'><subject>ops</subject><body>topic</body></message>"
        );
        assert!(feed(&mut r, &subject).is_empty());
        let other_room = "<message type='groupchat' from='dev@conference.localhost/alice'><body>!whoami</body></message>";
        assert!(feed(&mut r, other_room).is_empty());
    }

    #[test]
    fn direct_messages_use_the_sender_bare_jid() {
        let mut r = rooms();
        let dm = "<message type='chat' from='Alice@localhost/phone'><body>whoami</body></message>";
        assert_eq!(
            delivered(&feed(&mut r, dm)),
            Some((
                "xmpp:alice@localhost".into(),
                "xmpp:alice@localhost".into(),
                true,
                false
            ))
        );
        let own = "<message type='chat' from='bot@localhost/other'><body>x</body></message>";
        assert_eq!(delivered(&feed(&mut r, own)).map(|o| o.3), Some(true));
        for ignored in [
            format!("<message type='chat' from='{ROOM}/alice'><body>!whoami</body><x xmlns='http://jabber.org/protocol/muc#user'/></message>"),
            format!("<message type='chat' from='{ROOM}/alice'><body>!whoami</body></message>"),
            "<message type='chat' from='localhost'><body>motd</body></message>".to_string(),
            "<message type='chat' from='alice@localhost/a'><body>!run x</body><delay xmlns='urn:xmpp:delay' stamp='2020-01-01T00:00:00Z'/></message>".to_string(),
            "<message type='chat' from='alice@localhost/a'><active xmlns='http://jabber.org/protocol/chatstates'/></message>".to_string(),
            "<message type='error' from='alice@localhost/a'><body>x</body><error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>".to_string(),
        ] {
            assert!(feed(&mut r, &ignored).is_empty(), "{ignored}");
        }
    }

    #[test]
    fn nick_conflict_retries_with_an_underscore() {
        let mut r = Rooms::new(&jid("bot@localhost"), &[jid(ROOM)], "fleetcmd");
        let conflict = |nick: &str| {
            format!(
                "<presence type='error' from='{ROOM}/{nick}'><error type='cancel'><conflict xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></presence>"
            )
        };
        let a = feed(&mut r, &conflict("fleetcmd"));
        let [Action::Send(join)] = a.as_slice() else {
            panic!("{a:#?}")
        };
        assert!(
            join.contains("to='ops@conference.localhost/fleetcmd_'"),
            "{join}"
        );
        feed(&mut r, &self_presence("fleetcmd_", "100"));
        assert_eq!(r.nick(&jid(ROOM)), Some("fleetcmd_"));
        let own = delivered(&feed(&mut r, &groupchat("fleetcmd_", "x")));
        assert_eq!(own.map(|o| o.3), Some(true));
        let mut r = Rooms::new(&jid("bot@localhost"), &[jid(ROOM)], "n");
        for i in 0..MAX_NICK_RETRIES {
            let nick = format!("n{}", "_".repeat(i as usize));
            assert_eq!(feed(&mut r, &conflict(&nick)).len(), 1);
        }
        let nick = format!("n{}", "_".repeat(MAX_NICK_RETRIES as usize));
        assert!(feed(&mut r, &conflict(&nick)).is_empty(), "gives up");
    }

    #[test]
    fn a_created_room_is_unlocked_and_a_kick_is_noticed() {
        let mut r = Rooms::new(&jid("bot@localhost"), &[jid(ROOM)], "fleetcmd");
        let a = feed(&mut r, &self_presence("fleetcmd", "201"));
        assert!(
            matches!(a.as_slice(), [Action::Send(s)] if s.contains("muc#owner") && s.contains("type='submit'")),
            "{a:#?}"
        );
        let kicked = format!(
            "<presence type='unavailable' from='{ROOM}/fleetcmd'><x xmlns='http://jabber.org/protocol/muc#user'><item role='none'/><status code='307'/><status code='110'/></x></presence>"
        );
        feed(&mut r, &kicked);
        assert!(r.joined().is_empty());
        let again = r.rejoin_missing();
        assert!(
            matches!(again.as_slice(), [j] if j.contains("to='ops@conference.localhost/fleetcmd'")),
            "{again:?}"
        );
        feed(&mut r, &self_presence("fleetcmd", "100"));
        assert!(r.rejoin_missing().is_empty());
    }
}
