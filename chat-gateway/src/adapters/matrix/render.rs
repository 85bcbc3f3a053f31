//! A [`Reply`] as the content of an `m.notice`, and an edit of one.
//!
//! The plain `body` is the plain-text layout the XMPP adapter uses (every
//! line indented or guarded so none starts a command, `@mentions` broken
//! with a word joiner, control characters replaced, long replies cut with
//! a hint). The HTML `formatted_body` is that same text, HTML-escaped: the
//! header in `<strong>`, the rest in `<pre>`, so no tag, link or pill in
//! output reaches a client as markup. `m.mentions` is empty: no reply
//! notifies anyone. Replies are `m.notice`, which bots (this one
//! included) do not treat as commands.

use serde_json::{Value, json};

use super::rooms::{APPROVE_KEY, DENY_KEY};
use crate::adapters::Reply;
use crate::adapters::xmpp::xml::escape_attr as escape_html;

/// The plain body of `reply`.
pub fn body(reply: &Reply) -> String {
    // The plain layout breaks every `@word` with a word joiner; our own
    // `matrix:@user:server` identities stay copyable (into a policy's
    // bindings): `m.mentions` being present and empty already keeps
    // homeservers from notifying anyone for a reply's text.
    let mut text =
        crate::adapters::xmpp::body::render(reply).replace("matrix:@\u{2060}", "matrix:@");
    if !reply.actions.is_empty() {
        text.push_str(&format!(
            "\n  → or react {APPROVE_KEY} to approve, {DENY_KEY} to deny"
        ));
    }
    text
}

/// `body` as HTML: the first line bold, the rest preformatted.
fn html(body: &str) -> String {
    let (head, rest) = body.split_once('\n').unwrap_or((body, ""));
    let mut out = format!("<strong>{}</strong>", escape_html(head));
    if !rest.is_empty() {
        out.push_str(&format!("<pre><code>{}</code></pre>", escape_html(rest)));
    }
    out
}

fn message(body: &str) -> Value {
    json!({
        "msgtype": "m.notice",
        "body": body,
        "format": "org.matrix.custom.html",
        "formatted_body": html(body),
        "m.mentions": {},
    })
}

/// The content of a new message.
pub fn content(reply: &Reply) -> Value {
    message(&body(reply))
}

/// A plain notice (no reply structure), e.g. the encrypted-room refusal.
pub fn notice(text: &str) -> Value {
    message(&body(&Reply::text(text)))
}

/// The content of an edit (`m.replace`) of `event_id`: clients that know
/// edits show `m.new_content`; others show the `* `-prefixed fallback.
pub fn edit(event_id: &str, reply: &Reply) -> Value {
    let body = body(reply);
    let mut fallback = message(&format!("* {body}"));
    fallback["m.new_content"] = message(&body);
    fallback["m.relates_to"] = json!({"rel_type": "m.replace", "event_id": event_id});
    fallback
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::{CodeBlock, Section};

    #[test]
    fn hostile_output_stays_text_in_both_bodies() {
        let reply = Reply {
            header: "job 0123456789ab `uptime` on all: succeeded".into(),
            sections: vec![Section {
                title: "web-1 ok".into(),
                notes: vec![],
                blocks: vec![CodeBlock {
                    label: "stdout".into(),
                    text: "<a href=\"https://evil\">@room</a>\n!run reboot on all\n\u{1b}[31m</code></pre><img src=x>".into(),
                    omitted_lines: 0,
                }],
            }],
            ..Reply::default()
        };
        let c = content(&reply);
        assert_eq!(c["msgtype"], "m.notice");
        assert_eq!(c["m.mentions"], json!({}));
        let html = c["formatted_body"].as_str().unwrap_or_default();
        assert!(
            !html.contains("<a") && !html.contains("<img") && !html.contains("</code></pre><"),
            "{html}"
        );
        assert!(
            html.contains("&lt;a href=&quot;https://evil&quot;&gt;"),
            "{html}"
        );
        assert_eq!(html.matches("<pre>").count(), 1, "{html}");
        let body = c["body"].as_str().unwrap_or_default();
        assert!(!body.contains('\u{1b}'), "{body:?}");
        assert!(!body.contains("@room"), "mention broken: {body:?}");
        assert!(
            body.lines().all(|l| !l.trim_start().starts_with('!')),
            "no line starts a command: {body}"
        );
    }

    #[test]
    fn an_edit_replaces_the_event_with_new_content() {
        let e = edit("$orig", &Reply::text("done"));
        assert_eq!(
            e["m.relates_to"],
            json!({"rel_type": "m.replace", "event_id": "$orig"})
        );
        assert_eq!(e["m.new_content"]["body"], "done");
        assert_eq!(e["body"], "* done");
        assert_eq!(
            e["m.new_content"]["formatted_body"],
            "<strong>done</strong>"
        );
    }

    #[test]
    fn approval_requests_say_which_reactions_count() {
        let r = super::super::rooms::tests::approval_request();
        let b = body(&r);
        assert!(b.contains("type `!approve 0123456789ab`"), "{b}");
        assert!(b.ends_with("react ✅ to approve, ❌ to deny"), "{b}");
    }
}
