//! The XML side of an XMPP stream: a framer that cuts the byte stream into
//! top-level stanzas (without trusting the peer: a size and depth cap, no
//! DTDs, comments or processing instructions inside the stream), a small
//! element tree with namespaces resolved, and escaping for what we write.
//!
//! The framer only finds stanza boundaries; each complete stanza is then
//! parsed on its own with quick-xml, so a malformed stanza is reported as
//! such instead of desynchronising the stream.

use std::collections::HashMap;

use quick_xml::events::Event;

/// The stream namespace (`stream:` prefix).
pub const NS_STREAM: &str = "http://etherx.jabber.org/streams";
/// The default namespace of client streams.
pub const NS_CLIENT: &str = "jabber:client";

/// Largest stanza accepted by default (prosody's own c2s default).
pub const DEFAULT_MAX_STANZA: usize = 256 * 1024;
/// Deepest element nesting accepted inside one stanza.
pub const MAX_DEPTH: usize = 64;

/// A parsed element: local name, resolved namespace, attributes (qualified
/// names, unescaped values) and children.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    pub ns: String,
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Node>,
}

/// A child of an element.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Element(Element),
    Text(String),
}

impl Element {
    /// The value of attribute `name` (qualified name as written).
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether this element is `name` in namespace `ns`.
    pub fn is(&self, name: &str, ns: &str) -> bool {
        self.name == name && self.ns == ns
    }

    /// Child elements.
    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    /// The first child element `name` in namespace `ns`.
    pub fn child(&self, name: &str, ns: &str) -> Option<&Element> {
        self.elements().find(|e| e.is(name, ns))
    }

    /// The concatenated text directly inside this element.
    pub fn text(&self) -> String {
        let mut s = String::new();
        for n in &self.children {
            if let Node::Text(t) = n {
                s.push_str(t);
            }
        }
        s
    }
}

/// What the framer found in the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameEvent {
    /// `<stream:stream …>`: the header's attributes.
    Open(Element),
    /// One complete top-level element.
    Stanza(Element),
    /// `</stream:stream>`.
    Close,
}

/// Why the stream could not be read. After any of these the stream cannot
/// be resynchronised; the connection is closed and reopened.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum XmlError {
    #[error("stanza larger than {0} bytes")]
    TooLarge(usize),
    #[error("elements nested deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("restricted XML in the stream: {0}")]
    Restricted(&'static str),
    #[error("malformed XML: {0}")]
    Malformed(String),
    #[error("stream header is not <stream:stream>: <{0}>")]
    NotAStream(String),
}

/// Cuts a byte stream into [`FrameEvent`]s. Feed it with [`Framer::push`],
/// take events with [`Framer::next_event`].
#[derive(Debug)]
pub struct Framer {
    buf: Vec<u8>,
    /// Next byte to scan.
    pos: usize,
    /// Start of the stanza being framed (valid while `depth >= 2`).
    start: usize,
    /// 0 before the stream header, 1 between stanzas, more inside one.
    depth: usize,
    max: usize,
}

impl Framer {
    /// A framer that refuses stanzas over `max` bytes.
    pub fn new(max: usize) -> Framer {
        Framer {
            buf: Vec::new(),
            pos: 0,
            start: 0,
            depth: 0,
            max,
        }
    }

    /// Adds bytes read from the network.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Expects a new stream header (after STARTTLS or SASL success); bytes
    /// not yet framed are kept.
    pub fn restart(&mut self) {
        self.buf.drain(..self.pos);
        self.pos = 0;
        self.start = 0;
        self.depth = 0;
    }

    /// Bytes received but not yet framed.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next complete event, `Ok(None)` when more bytes are needed.
    pub fn next_event(&mut self) -> Result<Option<FrameEvent>, XmlError> {
        loop {
            if self.depth <= 1 {
                // Between stanzas: drop what was consumed, skip whitespace
                // keepalives (and any stray text).
                self.buf.drain(..self.pos);
                self.pos = 0;
                let Some(lt) = self.buf.iter().position(|b| *b == b'<') else {
                    if self.depth == 0 && self.buf.iter().any(|b| !b.is_ascii_whitespace()) {
                        return Err(XmlError::Malformed("text before the stream header".into()));
                    }
                    self.buf.clear();
                    return Ok(None);
                };
                self.pos = lt;
            } else if let Some(lt) = self.buf[self.pos..].iter().position(|b| *b == b'<') {
                self.pos += lt;
            } else {
                self.pos = self.buf.len();
                self.check_size()?;
                return Ok(None);
            }
            // self.buf[self.pos] == b'<'
            let Some(end) = self.tag_end()? else {
                self.check_size()?;
                return Ok(None);
            };
            let tag_start = self.pos;
            let tag = &self.buf[tag_start..end];
            self.pos = end;
            if tag.starts_with(b"<?") {
                if self.depth == 0 {
                    continue; // the XML declaration
                }
                return Err(XmlError::Restricted("processing instruction"));
            }
            if tag.starts_with(b"<!--") {
                return Err(XmlError::Restricted("comment"));
            }
            if tag.starts_with(b"<![CDATA[") {
                if self.depth < 2 {
                    return Err(XmlError::Malformed("CDATA outside a stanza".into()));
                }
                continue;
            }
            if tag.starts_with(b"<!") {
                return Err(XmlError::Restricted("DTD"));
            }
            if tag.starts_with(b"</") {
                match self.depth {
                    0 => {
                        return Err(XmlError::Malformed(
                            "end tag before the stream header".into(),
                        ));
                    }
                    1 => {
                        self.depth = 0;
                        return Ok(Some(FrameEvent::Close));
                    }
                    2 => {
                        self.depth = 1;
                        if end - self.start > self.max {
                            return Err(XmlError::TooLarge(self.max));
                        }
                        let stanza = parse_element(&self.buf[self.start..end])?;
                        return Ok(Some(FrameEvent::Stanza(stanza)));
                    }
                    _ => {
                        self.depth -= 1;
                        continue;
                    }
                }
            }
            let empty = tag.ends_with(b"/>");
            match (self.depth, empty) {
                (0, true) => return Err(XmlError::Malformed("empty stream header".into())),
                (0, false) => {
                    let mut header = tag.to_vec();
                    header.pop();
                    header.extend_from_slice(b"/>");
                    let el = parse_element_in(&header, stream_context())?;
                    if !el.is("stream", NS_STREAM) {
                        return Err(XmlError::NotAStream(el.name));
                    }
                    self.depth = 1;
                    return Ok(Some(FrameEvent::Open(el)));
                }
                (1, true) => {
                    if end - tag_start > self.max {
                        return Err(XmlError::TooLarge(self.max));
                    }
                    let stanza = parse_element(&self.buf[tag_start..end])?;
                    return Ok(Some(FrameEvent::Stanza(stanza)));
                }
                (1, false) => {
                    self.start = tag_start;
                    self.depth = 2;
                }
                (_, true) => {}
                (d, false) => {
                    if d > MAX_DEPTH {
                        return Err(XmlError::TooDeep);
                    }
                    self.depth += 1;
                }
            }
        }
    }

    fn check_size(&self) -> Result<(), XmlError> {
        let from = if self.depth >= 2 { self.start } else { 0 };
        if self.buf.len() - from > self.max {
            Err(XmlError::TooLarge(self.max))
        } else {
            Ok(())
        }
    }

    /// The index just past the markup starting at `self.pos`, if complete.
    fn tag_end(&self) -> Result<Option<usize>, XmlError> {
        let rest = &self.buf[self.pos..];
        let find = |needle: &[u8]| {
            rest.windows(needle.len())
                .position(|w| w == needle)
                .map(|i| self.pos + i + needle.len())
        };
        if rest.starts_with(b"<!--") {
            return Ok(find(b"-->"));
        }
        if rest.starts_with(b"<![CDATA[") {
            return Ok(find(b"]]>"));
        }
        if rest.starts_with(b"<?") {
            return Ok(find(b"?>"));
        }
        if rest.len() < 9 && (b"<![CDATA[".starts_with(rest) || b"<!--".starts_with(rest)) {
            return Ok(None);
        }
        if rest.starts_with(b"<!") {
            // A DTD (or garbage): refused before its internal subset is read.
            return Err(XmlError::Restricted("DTD"));
        }
        let mut quote: Option<u8> = None;
        for (i, b) in rest.iter().enumerate().skip(1) {
            match (quote, *b) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, b'"' | b'\'') => quote = Some(*b),
                (None, b'>') => return Ok(Some(self.pos + i + 1)),
                (None, b'<') => return Err(XmlError::Malformed("`<` inside a tag".into())),
                _ => {}
            }
        }
        Ok(None)
    }
}

/// Namespace context: default namespace and prefix bindings.
#[derive(Clone, Debug)]
struct Ns {
    default: String,
    prefixes: HashMap<String, String>,
}

fn stream_context() -> Ns {
    Ns {
        default: NS_CLIENT.to_string(),
        prefixes: HashMap::from([("stream".to_string(), NS_STREAM.to_string())]),
    }
}

/// Parses one complete element as found inside a client stream.
pub fn parse_element(bytes: &[u8]) -> Result<Element, XmlError> {
    parse_element_in(bytes, stream_context())
}

fn malformed(e: impl std::fmt::Display) -> XmlError {
    XmlError::Malformed(e.to_string())
}

fn parse_element_in(bytes: &[u8], ctx: Ns) -> Result<Element, XmlError> {
    let text = std::str::from_utf8(bytes).map_err(|_| malformed("not UTF-8"))?;
    let mut reader = quick_xml::Reader::from_str(text);
    let mut stack: Vec<(Element, Ns)> = Vec::new();
    let mut root: Option<Element> = None;
    loop {
        let ev = reader.read_event().map_err(malformed)?;
        let parent_ns = stack.last().map(|(_, n)| n).unwrap_or(&ctx);
        match ev {
            Event::Start(ref s) | Event::Empty(ref s) => {
                if root.is_some() {
                    return Err(malformed("content after the element"));
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(XmlError::TooDeep);
                }
                let (el, ns) = open(s, parent_ns)?;
                if matches!(ev, Event::Start(_)) {
                    stack.push((el, ns));
                } else {
                    close(&mut stack, &mut root, el);
                }
            }
            Event::End(_) => {
                let Some((el, _)) = stack.pop() else {
                    return Err(malformed("unmatched end tag"));
                };
                close(&mut stack, &mut root, el);
            }
            Event::Text(t) => {
                let s = t.decode().map_err(malformed)?;
                push_text(&mut stack, &s)?;
            }
            Event::CData(t) => {
                let s = t.decode().map_err(malformed)?;
                push_text(&mut stack, &s)?;
            }
            Event::GeneralRef(r) => {
                let c = match r.resolve_char_ref().map_err(malformed)? {
                    Some(c) => c,
                    None => match r.decode().map_err(malformed)?.as_ref() {
                        "amp" => '&',
                        "lt" => '<',
                        "gt" => '>',
                        "quot" => '"',
                        "apos" => '\'',
                        other => return Err(malformed(format!("unknown entity &{other};"))),
                    },
                };
                push_text(&mut stack, c.encode_utf8(&mut [0; 4]))?;
            }
            Event::Comment(_) => return Err(XmlError::Restricted("comment")),
            Event::PI(_) | Event::Decl(_) => {
                return Err(XmlError::Restricted("processing instruction"));
            }
            Event::DocType(_) => return Err(XmlError::Restricted("DTD")),
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(malformed("unclosed element"));
    }
    root.ok_or_else(|| malformed("no element"))
}

fn push_text(stack: &mut [(Element, Ns)], s: &str) -> Result<(), XmlError> {
    match stack.last_mut() {
        Some((el, _)) => {
            if !s.chars().all(xml_char) {
                return Err(malformed("character not allowed in XML"));
            }
            match el.children.last_mut() {
                Some(Node::Text(t)) => t.push_str(s),
                _ => el.children.push(Node::Text(s.to_string())),
            }
            Ok(())
        }
        None if s.trim().is_empty() => Ok(()),
        None => Err(malformed("text outside the element")),
    }
}

fn close(stack: &mut [(Element, Ns)], root: &mut Option<Element>, el: Element) {
    match stack.last_mut() {
        Some((parent, _)) => parent.children.push(Node::Element(el)),
        None => *root = Some(el),
    }
}

fn open(s: &quick_xml::events::BytesStart<'_>, parent: &Ns) -> Result<(Element, Ns), XmlError> {
    let mut ns = parent.clone();
    let mut attrs = Vec::new();
    for a in s.attributes() {
        let a = a.map_err(malformed)?;
        let key = std::str::from_utf8(a.key.as_ref())
            .map_err(malformed)?
            .to_string();
        let value = a
            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
            .map_err(malformed)?
            .into_owned();
        if key == "xmlns" {
            ns.default = value.clone();
        } else if let Some(p) = key.strip_prefix("xmlns:") {
            ns.prefixes.insert(p.to_string(), value.clone());
        }
        attrs.push((key, value));
    }
    let qname = std::str::from_utf8(s.name().as_ref())
        .map_err(malformed)?
        .to_string();
    let (namespace, local) = match qname.split_once(':') {
        Some((p, l)) => match ns.prefixes.get(p) {
            Some(uri) => (uri.clone(), l.to_string()),
            None => return Err(malformed(format!("unbound prefix `{p}`"))),
        },
        None => (ns.default.clone(), qname),
    };
    Ok((
        Element {
            name: local,
            ns: namespace,
            attrs,
            children: Vec::new(),
        },
        ns,
    ))
}

/// Whether `c` may appear in an XML 1.0 document.
pub fn xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// Escapes text content; characters XML cannot carry are replaced by U+FFFD
/// so a hostile string can never break the stream.
pub fn escape_text(s: &str) -> String {
    escape(s, false)
}

/// Escapes an attribute value (quotes too).
pub fn escape_attr(s: &str) -> String {
    escape(s, true)
}

fn escape(s: &str, attr: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' if attr => out.push_str("&quot;"),
            '\'' if attr => out.push_str("&apos;"),
            '\r' => out.push_str("&#13;"),
            c if xml_char(c) => out.push(c),
            _ => out.push('\u{FFFD}'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' id='s1' from='localhost' version='1.0'>";

    fn events(chunks: &[&str]) -> Result<Vec<FrameEvent>, XmlError> {
        let mut f = Framer::new(1024);
        let mut out = Vec::new();
        for c in chunks {
            f.push(c.as_bytes());
            while let Some(ev) = f.next_event()? {
                out.push(ev);
            }
        }
        Ok(out)
    }

    fn stanza(xml: &str) -> Element {
        match parse_element(xml.as_bytes()) {
            Ok(e) => e,
            Err(e) => panic!("{xml}: {e}"),
        }
    }

    #[test]
    fn frames_stanzas_across_arbitrary_splits() {
        let body = "<message from='a@b/c' type='chat'><body>x &amp; y &lt;/body&gt; 'q' </body></message> \n<presence/><iq id='1' type='result'/></stream:stream>";
        let all = format!("{HEADER}{body}");
        let whole = events(&[&all]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(whole.len(), 5, "{whole:#?}");
        for split in 1..all.len() {
            let (a, b) = all.split_at(split);
            let parts = events(&[a, b]).unwrap_or_else(|e| panic!("split at {split}: {e}"));
            assert_eq!(parts, whole, "split at {split}");
        }
        let FrameEvent::Open(open) = &whole[0] else {
            panic!("{whole:#?}")
        };
        assert_eq!(open.attr("id"), Some("s1"));
        let FrameEvent::Stanza(msg) = &whole[1] else {
            panic!("{whole:#?}")
        };
        assert!(msg.is("message", NS_CLIENT));
        let body = msg.child("body", NS_CLIENT).map(Element::text);
        assert_eq!(body.as_deref(), Some("x & y </body> 'q' "));
        assert_eq!(whole[4], FrameEvent::Close);
    }

    #[test]
    fn resolves_namespaces_and_prefixes() {
        let el = stanza(
            "<presence from='r@c/n'><x xmlns='http://jabber.org/protocol/muc#user'><item jid='a@b/c' role='participant'/><status code='110'/></x><stream:error/></presence>",
        );
        let x = el.child("x", "http://jabber.org/protocol/muc#user");
        let item = x.and_then(|x| x.child("item", "http://jabber.org/protocol/muc#user"));
        assert_eq!(item.and_then(|i| i.attr("jid")), Some("a@b/c"));
        assert!(el.child("error", NS_STREAM).is_some());
        let features = stanza(
            "<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls></stream:features>",
        );
        assert!(features.is("features", NS_STREAM));
        let tls = features.child("starttls", "urn:ietf:params:xml:ns:xmpp-tls");
        assert!(
            tls.and_then(|t| t.child("required", "urn:ietf:params:xml:ns:xmpp-tls"))
                .is_some()
        );
    }

    #[test]
    fn refuses_restricted_and_malformed_xml() {
        for (bad, why) in [
            ("<message><!-- hi --></message>", "comment"),
            ("<message><?pi x?></message>", "processing"),
            ("<!DOCTYPE x [<!ENTITY a 'b'>]><message/>", "DTD"),
            ("<message><body>&bogus;</body></message>", "unknown entity"),
            ("<message><body></message></body>", "malformed"),
            ("<message><a:b/></message>", "unbound prefix"),
            ("<message><body>&#0;</body></message>", "malformed"),
        ] {
            let r = events(&[HEADER, bad]);
            let msg = match r {
                Err(e) => e.to_string(),
                Ok(ev) => panic!("{bad}: accepted as {ev:#?}"),
            };
            assert!(msg.contains(why), "{bad}: {msg}");
        }
        let r = events(&["<html>"]);
        assert!(matches!(r, Err(XmlError::NotAStream(_))), "{r:?}");
        let r = events(&["hello"]);
        assert!(r.is_err(), "{r:?}");
    }

    #[test]
    fn enforces_the_size_and_depth_limits() {
        let big = format!("<message><body>{}</body></message>", "a".repeat(2000));
        assert_eq!(events(&[HEADER, &big]), Err(XmlError::TooLarge(1024)));
        // An unterminated tag cannot grow without bound either.
        let open_tag = format!("<message a='{}", "b".repeat(2000));
        assert_eq!(events(&[HEADER, &open_tag]), Err(XmlError::TooLarge(1024)));
        let deep = "<a>".repeat(MAX_DEPTH + 5);
        assert_eq!(events(&[HEADER, &deep]), Err(XmlError::TooDeep));
    }

    #[test]
    fn restart_keeps_unframed_bytes() {
        let mut f = Framer::new(1024);
        f.push(format!("{HEADER}<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>").as_bytes());
        assert!(matches!(f.next_event(), Ok(Some(FrameEvent::Open(_)))));
        assert!(matches!(f.next_event(), Ok(Some(FrameEvent::Stanza(_)))));
        f.restart();
        f.push(HEADER.as_bytes());
        assert!(matches!(f.next_event(), Ok(Some(FrameEvent::Open(_)))));
        assert_eq!(f.next_event(), Ok(None));
    }

    #[test]
    fn escaping_keeps_hostile_text_inert_and_well_formed() {
        let hostile = "</body><body>x</body>&amp; \"q\" 'a' \u{1b}[2J \u{0} \r";
        let xml = format!(
            "<message><body a='{}'>{}</body></message>",
            escape_attr(hostile),
            escape_text(hostile)
        );
        let el = stanza(&xml);
        let body = el
            .child("body", NS_CLIENT)
            .map(Element::text)
            .unwrap_or_default();
        assert_eq!(
            body,
            "</body><body>x</body>&amp; \"q\" 'a' \u{FFFD}[2J \u{FFFD} \r"
        );
        let attr = el
            .child("body", NS_CLIENT)
            .and_then(|b| b.attr("a"))
            .unwrap_or_default()
            .to_string();
        assert_eq!(attr, body);
    }
}
