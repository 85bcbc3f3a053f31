//! Matrix ids as fleetcmd names them: a user is `matrix:@name:server` (the
//! homeserver-verified sender of an event, never a display name), a room
//! is the channel `matrix:!id:server`.

use fleetcmd_core::ids::Identity;

use crate::adapters::AdapterError;

/// The identity and channel scheme of this adapter.
pub const SCHEME: &str = "matrix:";

/// Longest Matrix id (the spec's limit for user and room ids).
const MAX_ID_BYTES: usize = 255;

/// `sigil` + a non-empty local part + `:` + a non-empty server name, no
/// whitespace or control characters.
fn sigil_id(s: &str, sigil: char) -> bool {
    let Some(rest) = s.strip_prefix(sigil) else {
        return false;
    };
    s.len() <= MAX_ID_BYTES
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
        && matches!(rest.split_once(':'), Some((local, server)) if !local.is_empty() && !server.is_empty())
}

/// `@name:server`.
pub fn is_user_id(s: &str) -> bool {
    sigil_id(s, '@')
}

/// `!opaque:server`, or `!opaque` alone (room version 12 and later name
/// no server in a room id).
pub fn is_room_id(s: &str) -> bool {
    sigil_id(s, '!')
        || (s.len() > 1
            && s.len() <= MAX_ID_BYTES
            && s.starts_with('!')
            && !s
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '/'))
}

/// `#name:server`.
pub fn is_room_alias(s: &str) -> bool {
    sigil_id(s, '#')
}

/// The identity of the sender of an event.
pub fn identity(user_id: &str) -> Result<Identity, AdapterError> {
    if !is_user_id(user_id) {
        return Err(AdapterError::Platform {
            what: "matrix event".into(),
            message: format!(
                "sender {:?} is not a Matrix user id",
                fleetcmd_core::terminal::excerpt(user_id)
            ),
        });
    }
    Ok(Identity::parse(&format!("{SCHEME}{user_id}"))?)
}

/// The channel of a room.
pub fn channel(room_id: &str) -> String {
    format!("{SCHEME}{room_id}")
}

/// The room id of a channel.
pub fn room_of(channel: &str) -> Result<&str, AdapterError> {
    channel
        .strip_prefix(SCHEME)
        .filter(|r| is_room_id(r))
        .ok_or_else(|| AdapterError::Platform {
            what: "matrix channel".into(),
            message: format!(
                "{:?} is not matrix:!room:server",
                fleetcmd_core::terminal::excerpt(channel)
            ),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_by_their_sigil_and_server() {
        for (s, user, room, alias) in [
            ("@alice:example.com", true, false, false),
            ("@alice:localhost:8448", true, false, false),
            ("!AbC:example.com", false, true, false),
            ("!MRTjiXFl40o7lFdIDvKZ-4NZX9t8wQ", false, true, false),
            ("!", false, false, false),
            ("#ops:example.com", false, false, true),
            ("@alice", false, false, false),
            ("@:example.com", false, false, false),
            ("@alice:", false, false, false),
            ("@al ice:example.com", false, false, false),
            ("alice:example.com", false, false, false),
            ("", false, false, false),
        ] {
            assert_eq!(is_user_id(s), user, "{s}");
            assert_eq!(is_room_id(s), room, "{s}");
            assert_eq!(is_room_alias(s), alias, "{s}");
        }
        assert!(!is_user_id(&format!("@{}:x", "a".repeat(300))));
    }

    #[test]
    fn channels_round_trip_and_bad_ones_are_named() {
        assert_eq!(channel("!r:hs"), "matrix:!r:hs");
        assert_eq!(room_of("matrix:!r:hs").ok(), Some("!r:hs"));
        for bad in [
            "matrix:#ops:hs",
            "xmpp:!r:hs",
            "matrix:",
            "matrix:!",
            "!r:hs",
        ] {
            let e = room_of(bad).expect_err(bad).to_string();
            assert!(e.contains("not matrix:!room:server"), "{e}");
        }
        let e = identity("alice").expect_err("not an id").to_string();
        assert!(e.contains("not a Matrix user id"), "{e}");
    }
}
