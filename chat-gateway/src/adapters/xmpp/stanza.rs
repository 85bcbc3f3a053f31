//! Reading the stanzas the adapter cares about (messages, MUC presence,
//! pings) out of parsed elements, and writing the ones it sends. Anything
//! that does not fit is reported as malformed, never a panic.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use super::jid::Jid;
use super::xml::{Element, NS_CLIENT, escape_attr, escape_text};

pub const NS_MUC: &str = "http://jabber.org/protocol/muc";
pub const NS_MUC_USER: &str = "http://jabber.org/protocol/muc#user";
pub const NS_MUC_OWNER: &str = "http://jabber.org/protocol/muc#owner";
pub const NS_DELAY: &str = "urn:xmpp:delay";
/// XEP-0091, obsolete, still sent by old servers for history.
pub const NS_LEGACY_DELAY: &str = "jabber:x:delay";
pub const NS_PING: &str = "urn:xmpp:ping";
pub const NS_CORRECT: &str = "urn:xmpp:message-correct:0";
pub const NS_STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";

/// MUC status codes (XEP-0045 §15.6) the adapter acts on.
pub mod status {
    /// Real JIDs are visible to every occupant.
    pub const NON_ANONYMOUS: u16 = 100;
    /// This presence is about you.
    pub const SELF: u16 = 110;
    /// A new room was created (and is locked until configured).
    pub const CREATED: u16 = 201;
    /// The server changed your nick.
    pub const NICK_ASSIGNED: u16 = 210;
}

/// The stanzas the adapter handles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stanza {
    Message(Message),
    Presence(Presence),
    Iq(Iq),
    /// Anything else at the top level (stream errors are handled earlier).
    Other(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageKind {
    Chat,
    GroupChat,
    Normal,
    Headline,
    Error,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub from: Option<Jid>,
    pub id: Option<String>,
    pub kind: MessageKind,
    pub body: Option<String>,
    /// Carries `<delay/>`: history or an offline message, not live.
    pub delayed: bool,
    /// Carries `<x xmlns='…muc#user'>`: a MUC private message or invite.
    pub muc_user: bool,
    /// The defined condition of a `type='error'` message.
    pub error: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PresenceKind {
    Available,
    Unavailable,
    Error,
    /// subscribe, probe…: not about rooms.
    Other,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Presence {
    pub from: Option<Jid>,
    pub kind: PresenceKind,
    /// `<item jid='…'/>` of the MUC user payload: the occupant's real JID,
    /// present only where the room shows it to us.
    pub real_jid: Option<Jid>,
    /// `<item nick='…'/>` (the new nick on a nick change).
    pub new_nick: Option<String>,
    pub statuses: Vec<u16>,
    pub muc_user: bool,
    pub error: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IqKind {
    Get,
    Set,
    Result,
    Error,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Iq {
    pub from: Option<Jid>,
    pub id: String,
    pub kind: IqKind,
    /// A XEP-0199 ping.
    pub ping: bool,
}

fn jid_attr(el: &Element, name: &str) -> Result<Option<Jid>, String> {
    el.attr(name)
        .map(|s| Jid::parse(s).map_err(|e| format!("{name}: {e}")))
        .transpose()
}

fn error_condition(el: &Element) -> Option<String> {
    el.child("error", NS_CLIENT).map(|e| {
        e.elements()
            .find(|c| c.ns == NS_STANZAS && c.name != "text")
            .map(|c| c.name.clone())
            .unwrap_or_else(|| "undefined-condition".to_string())
    })
}

/// Reads a top-level element as a stanza; `Err` says why it is malformed.
pub fn classify(el: &Element) -> Result<Stanza, String> {
    if el.ns != NS_CLIENT {
        return Ok(Stanza::Other(format!("{{{}}}{}", el.ns, el.name)));
    }
    match el.name.as_str() {
        "message" => {
            let kind = match el.attr("type").unwrap_or("normal") {
                "chat" => MessageKind::Chat,
                "groupchat" => MessageKind::GroupChat,
                "normal" => MessageKind::Normal,
                "headline" => MessageKind::Headline,
                "error" => MessageKind::Error,
                other => return Err(format!("message type `{other}`")),
            };
            let bodies: Vec<&Element> = el.elements().filter(|c| c.is("body", NS_CLIENT)).collect();
            // Several bodies are alternative languages; without xml:lang
            // negotiation the first one without a language (or the first) wins.
            let body = bodies
                .iter()
                .find(|b| b.attr("xml:lang").is_none())
                .or(bodies.first())
                .map(|b| b.text());
            Ok(Stanza::Message(Message {
                from: jid_attr(el, "from")?,
                id: el.attr("id").map(str::to_string),
                kind,
                body,
                delayed: el.child("delay", NS_DELAY).is_some()
                    || el.child("x", NS_LEGACY_DELAY).is_some(),
                muc_user: el.child("x", NS_MUC_USER).is_some(),
                error: error_condition(el),
            }))
        }
        "presence" => {
            let kind = match el.attr("type") {
                None => PresenceKind::Available,
                Some("unavailable") => PresenceKind::Unavailable,
                Some("error") => PresenceKind::Error,
                Some(_) => PresenceKind::Other,
            };
            let x = el.child("x", NS_MUC_USER);
            let item = x.and_then(|x| x.child("item", NS_MUC_USER));
            let statuses = x
                .map(|x| {
                    x.elements()
                        .filter(|c| c.is("status", NS_MUC_USER))
                        .filter_map(|c| c.attr("code").and_then(|c| c.parse().ok()))
                        .collect()
                })
                .unwrap_or_default();
            Ok(Stanza::Presence(Presence {
                from: jid_attr(el, "from")?,
                kind,
                real_jid: item.map(|i| jid_attr(i, "jid")).transpose()?.flatten(),
                new_nick: item.and_then(|i| i.attr("nick")).map(str::to_string),
                statuses,
                muc_user: x.is_some(),
                error: error_condition(el),
            }))
        }
        "iq" => {
            let kind = match el.attr("type") {
                Some("get") => IqKind::Get,
                Some("set") => IqKind::Set,
                Some("result") => IqKind::Result,
                Some("error") => IqKind::Error,
                other => return Err(format!("iq type {other:?}")),
            };
            let id = el.attr("id").ok_or("iq without id")?.to_string();
            Ok(Stanza::Iq(Iq {
                from: jid_attr(el, "from")?,
                id,
                kind,
                ping: el.child("ping", NS_PING).is_some(),
            }))
        }
        other => Ok(Stanza::Other(other.to_string())),
    }
}

/// A fresh stanza id: a per-process random prefix and a counter.
pub fn new_id() -> String {
    static PREFIX: OnceLock<String> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let prefix = PREFIX.get_or_init(|| {
        let mut b = [0u8; 6];
        // A fixed prefix only makes ids less unique across restarts.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    });
    format!("fc{prefix}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// `<message>` with a body; `replace` makes it a XEP-0308 correction of
/// the message with that id.
pub fn message(to: &Jid, kind: &str, id: &str, body: &str, replace: Option<&str>) -> String {
    let mut s = format!(
        "<message to='{}' type='{}' id='{}'><body>{}</body>",
        escape_attr(&to.to_string()),
        escape_attr(kind),
        escape_attr(id),
        escape_text(body)
    );
    if let Some(r) = replace {
        s.push_str(&format!(
            "<replace xmlns='{NS_CORRECT}' id='{}'/>",
            escape_attr(r)
        ));
    }
    s.push_str("</message>");
    s
}

/// Joins `room` as `nick`, asking for no history.
pub fn join(room: &Jid, nick: &str) -> String {
    format!(
        "<presence to='{}' id='{}'><x xmlns='{NS_MUC}'><history maxstanzas='0'/></x></presence>",
        escape_attr(&room.with_resource(nick).to_string()),
        new_id()
    )
}

/// Accepts the default configuration of a room we just created
/// (XEP-0045 §10.1.2, "instant room"), which unlocks it for others.
pub fn instant_room(room: &Jid) -> String {
    format!(
        "<iq type='set' to='{}' id='{}'><query xmlns='{NS_MUC_OWNER}'><x xmlns='jabber:x:data' type='submit'/></query></iq>",
        escape_attr(&room.to_string()),
        new_id()
    )
}

/// A XEP-0199 ping to `to`.
pub fn ping(to: &str, id: &str) -> String {
    format!(
        "<iq type='get' to='{}' id='{}'><ping xmlns='{NS_PING}'/></iq>",
        escape_attr(to),
        escape_attr(id)
    )
}

/// The answer to an iq `get`/`set`: an empty result for pings,
/// `service-unavailable` for anything else (RFC 6120 §8.2.3 wants an answer).
pub fn iq_answer(iq: &Iq) -> String {
    let to = iq
        .from
        .as_ref()
        .map(|f| format!(" to='{}'", escape_attr(&f.to_string())))
        .unwrap_or_default();
    if iq.ping {
        format!("<iq type='result' id='{}'{to}/>", escape_attr(&iq.id))
    } else {
        format!(
            "<iq type='error' id='{}'{to}><error type='cancel'><service-unavailable xmlns='{NS_STANZAS}'/></error></iq>",
            escape_attr(&iq.id)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::xmpp::xml::parse_element;

    fn parse(xml: &str) -> Result<Stanza, String> {
        let el = parse_element(xml.as_bytes()).map_err(|e| e.to_string())?;
        classify(&el)
    }

    fn jid(s: &str) -> Jid {
        Jid::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn groupchat_message_with_and_without_history_delay() {
        let live = parse(
            "<message from='ops@conference.localhost/alice' type='groupchat' id='m1'><body>!whoami</body></message>",
        );
        assert_eq!(
            live,
            Ok(Stanza::Message(Message {
                from: Some(jid("ops@conference.localhost/alice")),
                id: Some("m1".into()),
                kind: MessageKind::GroupChat,
                body: Some("!whoami".into()),
                delayed: false,
                muc_user: false,
                error: None,
            }))
        );
        let history = parse(
            "<message from='ops@conference.localhost/alice' type='groupchat'><body>!run x</body><delay xmlns='urn:xmpp:delay' stamp='2020-01-01T00:00:00Z' from='ops@conference.localhost'/></message>",
        );
        assert!(
            matches!(history, Ok(Stanza::Message(Message { delayed: true, .. }))),
            "{history:?}"
        );
        let legacy = parse(
            "<message from='a@b/c' type='chat'><body>x</body><x xmlns='jabber:x:delay' stamp='20200101T00:00:00'/></message>",
        );
        assert!(
            matches!(legacy, Ok(Stanza::Message(Message { delayed: true, .. }))),
            "{legacy:?}"
        );
    }

    #[test]
    fn muc_presence_carries_the_real_jid_and_status_codes() {
        let p = parse(
            "<presence from='ops@conference.localhost/alice'><x xmlns='http://jabber.org/protocol/muc#user'><item affiliation='none' role='participant' jid='Alice@localhost/laptop'/><status code='100'/><status code='110'/></x></presence>",
        );
        assert_eq!(
            p,
            Ok(Stanza::Presence(Presence {
                from: Some(jid("ops@conference.localhost/alice")),
                kind: PresenceKind::Available,
                real_jid: Some(jid("alice@localhost/laptop")),
                new_nick: None,
                statuses: vec![100, 110],
                muc_user: true,
                error: None,
            }))
        );
        let hidden = parse(
            "<presence from='ops@conference.localhost/alice'><x xmlns='http://jabber.org/protocol/muc#user'><item affiliation='none' role='participant'/></x></presence>",
        );
        assert!(
            matches!(
                hidden,
                Ok(Stanza::Presence(Presence {
                    real_jid: None,
                    muc_user: true,
                    ..
                }))
            ),
            "{hidden:?}"
        );
        let conflict = parse(
            "<presence from='ops@conference.localhost/fleetcmd' type='error'><x xmlns='http://jabber.org/protocol/muc'/><error type='cancel' by='ops@conference.localhost'><conflict xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/><text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>Nickname in use</text></error></presence>",
        );
        assert!(
            matches!(&conflict, Ok(Stanza::Presence(Presence { kind: PresenceKind::Error, error: Some(c), .. })) if c == "conflict"),
            "{conflict:?}"
        );
    }

    #[test]
    fn malformed_stanzas_are_errors_not_panics() {
        for (xml, why) in [
            (
                "<message from='a b@c' type='chat'><body>x</body></message>",
                "localpart",
            ),
            ("<message type='weird'/>", "message type"),
            (
                "<iq type='get'><ping xmlns='urn:xmpp:ping'/></iq>",
                "without id",
            ),
            ("<iq id='1' type='bogus'/>", "iq type"),
            (
                "<presence from='r@c/n'><x xmlns='http://jabber.org/protocol/muc#user'><item jid='@bad'/></x></presence>",
                "jid",
            ),
        ] {
            match parse(xml) {
                Err(e) => assert!(e.contains(why), "{xml}: {e}"),
                Ok(s) => panic!("{xml}: accepted as {s:?}"),
            }
        }
        assert_eq!(
            parse("<a xmlns='urn:x'/>"),
            Ok(Stanza::Other("{urn:x}a".into()))
        );
    }

    #[test]
    fn built_stanzas_parse_back() {
        let room = jid("ops@conference.localhost");
        let m = message(
            &room,
            "groupchat",
            "id'1",
            "a </body><body> & b",
            Some("orig<"),
        );
        let el = parse_element(m.as_bytes()).unwrap_or_else(|e| panic!("{m}: {e}"));
        assert_eq!(el.attr("id"), Some("id'1"));
        assert_eq!(
            el.child("body", NS_CLIENT).map(Element::text).as_deref(),
            Some("a </body><body> & b")
        );
        assert_eq!(
            el.child("replace", NS_CORRECT).and_then(|r| r.attr("id")),
            Some("orig<")
        );
        let j = join(&room, "fleet'cmd");
        let el = parse_element(j.as_bytes()).unwrap_or_else(|e| panic!("{j}: {e}"));
        assert_eq!(el.attr("to"), Some("ops@conference.localhost/fleet'cmd"));
        assert!(el.child("x", NS_MUC).is_some());
        let iq = Iq {
            from: Some(jid("localhost")),
            id: "p1".into(),
            kind: IqKind::Get,
            ping: true,
        };
        assert_eq!(iq_answer(&iq), "<iq type='result' id='p1' to='localhost'/>");
        assert_ne!(new_id(), new_id());
    }
}
