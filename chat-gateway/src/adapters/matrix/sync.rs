//! A `/sync` answer read into the few events the adapter acts on, in the
//! order they happened per room. Pure: no I/O, tested on JSON.

use serde_json::Value;

/// The filter of every `/sync`: no presence, typing, receipts or account
/// data; a short timeline (the first sync of a start reads no history).
pub const FILTER: &str = r#"{"presence":{"types":[]},"account_data":{"types":[]},"room":{"ephemeral":{"types":[]},"account_data":{"types":[]},"timeline":{"limit":20}}}"#;

/// What the adapter acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The bot was invited to `room`.
    Invited { room: String },
    /// `m.room.encryption` is (or became) part of a joined room's state.
    Encrypted { room: String },
    /// An `m.room.message`.
    Message {
        room: String,
        sender: String,
        event_id: String,
        msgtype: String,
        body: String,
        /// An edit (`m.replace`) of an earlier message.
        edit: bool,
    },
    /// An `m.reaction` (`m.annotation`) on `target`.
    Reaction {
        room: String,
        sender: String,
        target: String,
        key: String,
    },
    /// An `m.room.encrypted` event: nothing the bot can read.
    Undecryptable { room: String, sender: String },
}

/// One `/sync` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The `since` of the next `/sync`.
    pub next_batch: String,
    pub events: Vec<Event>,
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("")
}

fn events_of(v: &Value) -> &[Value] {
    v["events"].as_array().map_or(&[], Vec::as_slice)
}

/// One timeline or state event of a joined room.
fn read_event(room: &str, ev: &Value, out: &mut Vec<Event>) {
    let sender = str_of(ev, "sender").to_string();
    let content = &ev["content"];
    match str_of(ev, "type") {
        "m.room.encryption" if ev.get("state_key").is_some() => out.push(Event::Encrypted {
            room: room.to_string(),
        }),
        "m.room.message" => {
            let body = content["body"].as_str();
            let msgtype = content["msgtype"].as_str();
            if let (Some(body), Some(msgtype)) = (body, msgtype) {
                out.push(Event::Message {
                    room: room.to_string(),
                    sender,
                    event_id: str_of(ev, "event_id").to_string(),
                    msgtype: msgtype.to_string(),
                    body: body.to_string(),
                    edit: content["m.relates_to"]["rel_type"].as_str() == Some("m.replace"),
                });
            }
        }
        "m.reaction" => {
            let rel = &content["m.relates_to"];
            if rel["rel_type"].as_str() == Some("m.annotation") {
                out.push(Event::Reaction {
                    room: room.to_string(),
                    sender,
                    target: str_of(rel, "event_id").to_string(),
                    key: str_of(rel, "key").to_string(),
                });
            }
        }
        "m.room.encrypted" => out.push(Event::Undecryptable {
            room: room.to_string(),
            sender,
        }),
        _ => {}
    }
}

/// Reads a `/sync` answer: invites, then each joined room's state and
/// timeline in order.
pub fn read(v: &Value) -> Result<Batch, String> {
    let next_batch = v["next_batch"]
        .as_str()
        .filter(|s| !s.is_empty())
        .ok_or("the /sync answer has no next_batch")?
        .to_string();
    let mut events = Vec::new();
    if let Some(invites) = v["rooms"]["invite"].as_object() {
        for room in invites.keys() {
            events.push(Event::Invited { room: room.clone() });
        }
    }
    if let Some(joined) = v["rooms"]["join"].as_object() {
        for (room, r) in joined {
            for ev in events_of(&r["state"]) {
                read_event(room, ev, &mut events);
            }
            for ev in events_of(&r["timeline"]) {
                read_event(room, ev, &mut events);
            }
        }
    }
    Ok(Batch { next_batch, events })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_sync_answer_becomes_events_in_order() {
        let v = json!({
            "next_batch": "s72_5",
            "rooms": {
                "invite": {"!new:hs": {"invite_state": {"events": []}}},
                "join": {
                    "!ops:hs": {
                        "state": {"events": [
                            {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}
                        ]},
                        "timeline": {"events": [
                            {"type": "m.room.message", "sender": "@alice:hs", "event_id": "$1",
                             "content": {"msgtype": "m.text", "body": "!whoami"}},
                            {"type": "m.room.message", "sender": "@alice:hs", "event_id": "$2",
                             "content": {"msgtype": "m.text", "body": "* !run x",
                                         "m.relates_to": {"rel_type": "m.replace", "event_id": "$1"}}},
                            {"type": "m.reaction", "sender": "@bob:hs", "event_id": "$3",
                             "content": {"m.relates_to": {"rel_type": "m.annotation", "event_id": "$0", "key": "✅"}}},
                            {"type": "m.room.encrypted", "sender": "@eve:hs", "event_id": "$4", "content": {}},
                            {"type": "m.room.message", "sender": "@x:hs", "event_id": "$5", "content": {"msgtype": "m.text"}},
                            {"type": "m.room.member", "sender": "@x:hs", "state_key": "@x:hs", "content": {}}
                        ]}
                    }
                }
            }
        });
        let b = read(&v).expect("valid");
        assert_eq!(b.next_batch, "s72_5");
        let room = || "!ops:hs".to_string();
        assert_eq!(
            b.events,
            vec![
                Event::Invited {
                    room: "!new:hs".into()
                },
                Event::Encrypted { room: room() },
                Event::Message {
                    room: room(),
                    sender: "@alice:hs".into(),
                    event_id: "$1".into(),
                    msgtype: "m.text".into(),
                    body: "!whoami".into(),
                    edit: false
                },
                Event::Message {
                    room: room(),
                    sender: "@alice:hs".into(),
                    event_id: "$2".into(),
                    msgtype: "m.text".into(),
                    body: "* !run x".into(),
                    edit: true
                },
                Event::Reaction {
                    room: room(),
                    sender: "@bob:hs".into(),
                    target: "$0".into(),
                    key: "✅".into()
                },
                Event::Undecryptable {
                    room: room(),
                    sender: "@eve:hs".into()
                },
            ]
        );
        assert!(read(&json!({"rooms": {}})).is_err());
    }
}
