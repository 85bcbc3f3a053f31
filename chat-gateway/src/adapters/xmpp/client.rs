//! A small XMPP client connection (RFC 6120): TCP, stream open, STARTTLS
//! (or direct TLS, XEP-0368) with rustls/ring, SASL (SCRAM-SHA-256,
//! SCRAM-SHA-1, PLAIN only over TLS or loopback), resource binding. After
//! [`Connection::connect`] the stream is split into a [`Reader`] of stanzas
//! and a [`Writer`] of raw XML.
//!
//! It is public so tests (and tools) can act as an ordinary XMPP user.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use fleetcmd_core::crypto::Secret;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

use super::jid::Jid;
use super::sasl::{self, SaslError, Scram, ScramHash};
use super::xml::{Element, FrameEvent, Framer, NS_STREAM, XmlError, escape_attr, escape_text};

pub const NS_TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
pub const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
pub const NS_BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
pub const NS_SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
pub const NS_STREAMS_ERR: &str = "urn:ietf:params:xml:ns:xmpp-streams";

/// Time allowed for TCP connect + TLS + SASL + bind.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// How the connection is protected.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// STARTTLS, mandatory: a server that does not offer it is refused.
    #[default]
    #[serde(alias = "required")]
    StartTls,
    /// TLS from the first byte (XEP-0368, usually port 5223).
    Direct,
    /// No TLS; only allowed to a loopback address.
    None,
}

/// Everything needed to log in.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// The account (bare JID).
    pub jid: Jid,
    pub password: Secret<String>,
    pub resource: String,
    /// Where to connect (defaults: the JID's domain, 5222).
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    /// Trust for the server certificate (see [`tls_config`]).
    pub tls_config: Arc<ClientConfig>,
    pub max_stanza: usize,
}

/// Why a connection failed or ended. Never contains the password.
#[derive(thiserror::Error, Debug)]
pub enum ClientError {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Xml(#[from] XmlError),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("stream error from the server: {0}")]
    Stream(String),
    #[error("the server closed the stream")]
    Closed,
    #[error("timed out {0}")]
    Timeout(&'static str),
}

impl From<SaslError> for ClientError {
    fn from(e: SaslError) -> ClientError {
        ClientError::Auth(e.to_string())
    }
}

/// A rustls client config (ring provider) trusting the PEM CA certificates
/// in `ca_file` only, or the Mozilla roots (webpki-roots) without one.
pub fn tls_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("{}: no PEM certificate in it", path.display()));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Whether `host` names a loopback address (`localhost`, 127.0.0.0/8, ::1).
pub fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The reading half: stanzas one by one.
pub struct Reader {
    io: ReadHalf<Box<dyn Io>>,
    framer: Framer,
    buf: Box<[u8]>,
}

/// The writing half: raw XML (callers escape with the `stanza` builders).
pub struct Writer {
    io: WriteHalf<Box<dyn Io>>,
}

/// A logged-in, bound connection.
pub struct Connection {
    pub reader: Reader,
    pub writer: Writer,
    /// The full JID the server bound.
    pub jid: Jid,
    /// The SASL mechanism used.
    pub mechanism: &'static str,
    /// Whether TLS protects the stream.
    pub tls: bool,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("jid", &self.jid)
            .field("mechanism", &self.mechanism)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> ClientError {
    move |source| ClientError::Io { what, source }
}

async fn read_event<S: AsyncRead + Unpin + ?Sized>(
    io: &mut S,
    framer: &mut Framer,
    buf: &mut [u8],
) -> Result<FrameEvent, ClientError> {
    loop {
        if let Some(ev) = framer.next_event()? {
            return Ok(ev);
        }
        // Cancel-safe: bytes are only consumed when `read` completes.
        let n = io
            .read(buf)
            .await
            .map_err(io_err("reading from the server"))?;
        if n == 0 {
            return Err(ClientError::Closed);
        }
        framer.push(&buf[..n]);
    }
}

/// The stanza, or the stream error / close it was.
fn stanza_of(ev: FrameEvent) -> Result<Element, ClientError> {
    match ev {
        FrameEvent::Stanza(el) if el.is("error", NS_STREAM) => {
            let cond = el
                .elements()
                .find(|c| c.ns == NS_STREAMS_ERR && c.name != "text")
                .map(|c| c.name.clone())
                .unwrap_or_else(|| "undefined-condition".into());
            let text = el
                .child("text", NS_STREAMS_ERR)
                .map(|t| format!(" ({})", t.text().chars().take(200).collect::<String>()))
                .unwrap_or_default();
            Err(ClientError::Stream(format!("{cond}{text}")))
        }
        FrameEvent::Stanza(el) => Ok(el),
        FrameEvent::Close => Err(ClientError::Closed),
        FrameEvent::Open(_) => Err(ClientError::Protocol("unexpected stream header".into())),
    }
}

async fn next_stanza<S: AsyncRead + Unpin + ?Sized>(
    io: &mut S,
    framer: &mut Framer,
    buf: &mut [u8],
) -> Result<Element, ClientError> {
    stanza_of(read_event(io, framer, buf).await?)
}

async fn write<S: AsyncWrite + Unpin + ?Sized>(io: &mut S, xml: &str) -> Result<(), ClientError> {
    io.write_all(xml.as_bytes())
        .await
        .map_err(io_err("writing to the server"))?;
    io.flush().await.map_err(io_err("writing to the server"))
}

/// Opens (or reopens) the stream and returns the server's features.
async fn open_stream<S: AsyncRead + AsyncWrite + Unpin + ?Sized>(
    io: &mut S,
    framer: &mut Framer,
    buf: &mut [u8],
    domain: &str,
) -> Result<Element, ClientError> {
    framer.restart();
    let header = format!(
        "<?xml version='1.0'?><stream:stream to='{}' version='1.0' xml:lang='en' xmlns='jabber:client' xmlns:stream='{NS_STREAM}'>",
        escape_attr(domain)
    );
    write(io, &header).await?;
    match read_event(io, framer, buf).await? {
        FrameEvent::Open(h) => {
            if h.attr("version").is_some_and(|v| !v.starts_with('1')) {
                return Err(ClientError::Protocol(format!(
                    "stream version {:?}",
                    h.attr("version")
                )));
            }
        }
        other => stanza_of(other).map(|_| ()).and(Err(ClientError::Protocol(
            "expected a stream header".into(),
        )))?,
    }
    let features = next_stanza(io, framer, buf).await?;
    if !features.is("features", NS_STREAM) {
        return Err(ClientError::Protocol(format!(
            "expected <stream:features>, got <{}>",
            features.name
        )));
    }
    Ok(features)
}

impl Connection {
    /// Connects, secures, authenticates and binds a resource.
    pub async fn connect(opts: &ClientOptions) -> Result<Connection, ClientError> {
        tokio::time::timeout(CONNECT_TIMEOUT, Self::connect_inner(opts))
            .await
            .map_err(|_| ClientError::Timeout("connecting and logging in"))?
    }

    async fn connect_inner(opts: &ClientOptions) -> Result<Connection, ClientError> {
        let domain = opts.jid.domain.clone();
        let tcp = TcpStream::connect((opts.host.as_str(), opts.port))
            .await
            .map_err(io_err("connecting"))?;
        let _ = tcp.set_nodelay(true);
        let peer: SocketAddr = tcp.peer_addr().map_err(io_err("connecting"))?;
        let loopback = peer.ip().is_loopback();
        let mut framer = Framer::new(opts.max_stanza);
        let mut buf = vec![0u8; 16 * 1024].into_boxed_slice();
        let server_name = ServerName::try_from(domain.clone())
            .map_err(|e| ClientError::Tls(format!("server name {domain}: {e}")))?;

        let (mut io, tls): (Box<dyn Io>, bool) = match opts.tls {
            TlsMode::None => {
                if !loopback {
                    return Err(ClientError::Tls(format!(
                        "tls = \"none\" is only allowed to a loopback address, not {peer}"
                    )));
                }
                (Box::new(tcp), false)
            }
            TlsMode::Direct => {
                let mut cfg = (*opts.tls_config).clone();
                cfg.alpn_protocols = vec![b"xmpp-client".to_vec()];
                let s = TlsConnector::from(Arc::new(cfg))
                    .connect(server_name, tcp)
                    .await
                    .map_err(|e| ClientError::Tls(e.to_string()))?;
                (Box::new(s), true)
            }
            TlsMode::StartTls => {
                let mut tcp = tcp;
                let features = open_stream(&mut tcp, &mut framer, &mut buf, &domain).await?;
                if features.child("starttls", NS_TLS).is_none() {
                    return Err(ClientError::Tls(
                        "the server does not offer STARTTLS (tls = \"starttls\" requires it)"
                            .into(),
                    ));
                }
                write(&mut tcp, &format!("<starttls xmlns='{NS_TLS}'/>")).await?;
                let answer = next_stanza(&mut tcp, &mut framer, &mut buf).await?;
                if !answer.is("proceed", NS_TLS) {
                    return Err(ClientError::Tls(format!(
                        "server answered <{}> to STARTTLS",
                        answer.name
                    )));
                }
                if framer.pending() > 0 {
                    // Plaintext after <proceed/> would be injected by a MITM.
                    return Err(ClientError::Tls("data after <proceed/>".into()));
                }
                let s = TlsConnector::from(opts.tls_config.clone())
                    .connect(server_name, tcp)
                    .await
                    .map_err(|e| ClientError::Tls(e.to_string()))?;
                (Box::new(s), true)
            }
        };

        // SASL
        let features = open_stream(&mut io, &mut framer, &mut buf, &domain).await?;
        if !tls
            && features
                .child("starttls", NS_TLS)
                .is_some_and(|s| s.child("required", NS_TLS).is_some())
        {
            return Err(ClientError::Tls(
                "the server requires TLS but tls = \"none\"".into(),
            ));
        }
        let offered: Vec<String> = features
            .child("mechanisms", NS_SASL)
            .map(|m| {
                m.elements()
                    .filter(|e| e.is("mechanism", NS_SASL))
                    .map(|e| e.text().trim().to_string())
                    .collect()
            })
            .unwrap_or_default();
        let user = opts
            .jid
            .local
            .clone()
            .ok_or_else(|| ClientError::Auth("the JID has no localpart".into()))?;
        let has = |m: &str| offered.iter().any(|o| o == m);
        let mechanism = if has("SCRAM-SHA-256") {
            "SCRAM-SHA-256"
        } else if has("SCRAM-SHA-1") {
            "SCRAM-SHA-1"
        } else if has("PLAIN") && (tls || loopback) {
            "PLAIN"
        } else {
            return Err(ClientError::Auth(format!(
                "no usable SASL mechanism (offered: {}; PLAIN only over TLS or loopback)",
                offered.join(", ")
            )));
        };
        match mechanism {
            "PLAIN" => {
                let initial = B64.encode(sasl::plain(&user, opts.password.expose()));
                write(
                    &mut io,
                    &format!("<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{initial}</auth>"),
                )
                .await?;
                let answer = next_stanza(&mut io, &mut framer, &mut buf).await?;
                sasl_outcome(&answer)?;
            }
            _ => {
                let hash = if mechanism == "SCRAM-SHA-256" {
                    ScramHash::Sha256
                } else {
                    ScramHash::Sha1
                };
                let (scram, first) = Scram::start(hash, &user, &Scram::new_nonce());
                write(
                    &mut io,
                    &format!(
                        "<auth xmlns='{NS_SASL}' mechanism='{}'>{}</auth>",
                        hash.mechanism(),
                        B64.encode(first)
                    ),
                )
                .await?;
                let challenge = next_stanza(&mut io, &mut framer, &mut buf).await?;
                let server_first = sasl_challenge(&challenge)?;
                let password = opts.password.clone();
                // PBKDF2 takes milliseconds: keep it off the async workers.
                let (scram, fin) = tokio::task::spawn_blocking(move || {
                    let mut scram = scram;
                    let fin = scram.respond(&server_first, password.expose());
                    (scram, fin)
                })
                .await
                .map_err(|e| ClientError::Auth(format!("SCRAM task: {e}")))?;
                let fin = fin?;
                write(
                    &mut io,
                    &format!("<response xmlns='{NS_SASL}'>{}</response>", B64.encode(fin)),
                )
                .await?;
                let mut answer = next_stanza(&mut io, &mut framer, &mut buf).await?;
                if answer.is("challenge", NS_SASL) {
                    // Some servers send the verifier as a last challenge.
                    scram.verify(&sasl_challenge(&answer)?)?;
                    write(&mut io, &format!("<response xmlns='{NS_SASL}'/>")).await?;
                    answer = next_stanza(&mut io, &mut framer, &mut buf).await?;
                    sasl_outcome(&answer)?;
                } else {
                    let extra = sasl_outcome(&answer)?;
                    scram.verify(&extra)?;
                }
            }
        }

        // Bind
        let features = open_stream(&mut io, &mut framer, &mut buf, &domain).await?;
        if features.child("bind", NS_BIND).is_none() {
            return Err(ClientError::Protocol(
                "the server offers no resource binding".into(),
            ));
        }
        write(
            &mut io,
            &format!(
                "<iq type='set' id='bind-1'><bind xmlns='{NS_BIND}'><resource>{}</resource></bind></iq>",
                escape_text(&opts.resource)
            ),
        )
        .await?;
        let bound = loop {
            let el = next_stanza(&mut io, &mut framer, &mut buf).await?;
            if el.name == "iq" && el.attr("id") == Some("bind-1") {
                break el;
            }
        };
        if bound.attr("type") != Some("result") {
            return Err(ClientError::Protocol(format!(
                "resource binding refused: {}",
                error_name(&bound)
            )));
        }
        let jid_text = bound
            .child("bind", NS_BIND)
            .and_then(|b| b.child("jid", NS_BIND))
            .map(Element::text)
            .ok_or_else(|| ClientError::Protocol("bind result without a JID".into()))?;
        let jid = Jid::parse(jid_text.trim()).map_err(|e| ClientError::Protocol(e.to_string()))?;
        if jid.bare() != opts.jid.bare() {
            return Err(ClientError::Protocol(format!(
                "the server bound another account: {jid}"
            )));
        }
        // RFC 3921 sessions: only where the server still requires them.
        if let Some(s) = features.child("session", NS_SESSION)
            && s.child("optional", NS_SESSION).is_none()
        {
            write(
                &mut io,
                &format!("<iq type='set' id='sess-1'><session xmlns='{NS_SESSION}'/></iq>"),
            )
            .await?;
            loop {
                let el = next_stanza(&mut io, &mut framer, &mut buf).await?;
                if el.name == "iq" && el.attr("id") == Some("sess-1") {
                    if el.attr("type") != Some("result") {
                        return Err(ClientError::Protocol(format!(
                            "session refused: {}",
                            error_name(&el)
                        )));
                    }
                    break;
                }
            }
        }
        let (r, w) = tokio::io::split(io);
        Ok(Connection {
            reader: Reader { io: r, framer, buf },
            writer: Writer { io: w },
            jid,
            mechanism,
            tls,
        })
    }
}

fn error_name(el: &Element) -> String {
    el.elements()
        .find(|e| e.name == "error")
        .and_then(|e| e.elements().next())
        .map(|c| c.name.clone())
        .unwrap_or_else(|| "no reason given".into())
}

fn sasl_challenge(el: &Element) -> Result<Vec<u8>, ClientError> {
    if el.is("challenge", NS_SASL) {
        B64.decode(el.text().trim())
            .map_err(|_| ClientError::Auth("challenge is not base64".into()))
    } else {
        sasl_outcome(el).and(Err(ClientError::Auth(
            "success without a SCRAM exchange".into(),
        )))
    }
}

/// `<success>` → its additional data; `<failure>` → the condition.
fn sasl_outcome(el: &Element) -> Result<Vec<u8>, ClientError> {
    if el.is("success", NS_SASL) {
        let t = el.text();
        let t = t.trim();
        if t.is_empty() || t == "=" {
            return Ok(Vec::new());
        }
        return B64
            .decode(t)
            .map_err(|_| ClientError::Auth("success data is not base64".into()));
    }
    if el.is("failure", NS_SASL) {
        let cond = el
            .elements()
            .find(|c| c.ns == NS_SASL && c.name != "text")
            .map(|c| c.name.clone())
            .unwrap_or_else(|| "failure".into());
        return Err(ClientError::Auth(cond));
    }
    Err(ClientError::Protocol(format!(
        "unexpected <{}> during SASL",
        el.name
    )))
}

impl Reader {
    /// The next stanza. Errors end the stream: a stream error, the server
    /// closing, or bytes that cannot be framed (oversized, malformed).
    pub async fn next(&mut self) -> Result<Element, ClientError> {
        next_stanza(&mut self.io, &mut self.framer, &mut self.buf).await
    }
}

impl Writer {
    /// Writes `xml` and flushes.
    pub async fn send(&mut self, xml: &str) -> Result<(), ClientError> {
        write(&mut self.io, xml).await
    }

    /// Closes the stream politely.
    pub async fn close(&mut self) -> Result<(), ClientError> {
        write(&mut self.io, "</stream:stream>").await?;
        self.io.shutdown().await.map_err(io_err("closing"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for (h, want) in [
            ("localhost", true),
            ("LOCALHOST", true),
            ("127.0.0.1", true),
            ("127.8.9.1", true),
            ("::1", true),
            ("[::1]", true),
            ("10.0.0.1", false),
            ("xmpp.example.com", false),
            ("localhost.example.com", false),
        ] {
            assert_eq!(is_loopback_host(h), want, "{h}");
        }
    }

    #[test]
    fn ca_file_errors_name_the_file() {
        let e = tls_config(Some(Path::new("/nonexistent/ca.pem")))
            .err()
            .unwrap_or_default();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        assert!(tls_config(None).is_ok());
    }
}
