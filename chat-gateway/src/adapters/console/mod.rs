//! The console adapter: one local user typing on stdin, replies on stdout
//! (used by `fleetcmd dev`). Every line is addressed to the bot, so `!run …`
//! and `run …` both work.
//!
//! Rendering keeps output inert: each reply starts with `[#N]`, everything
//! else is indented, output lines are prefixed with `  | `, and control
//! characters other than tab are replaced, so no printed line can look like
//! a command or rewrite the terminal.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use fleetcmd_core::ids::Identity;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt, Lines};
use tokio::sync::Mutex;

use super::{AdapterError, BoxFuture, ChatAdapter, ChatSender, Incoming, MessageRef, Reply};
use crate::render::sanitize;

/// The channel name of every console message.
pub const CHANNEL: &str = "console";
/// Prefix of every line of command output.
pub const OUTPUT_PREFIX: &str = "  | ";

/// Reads commands from `R`, writes replies to a shared writer.
pub struct ConsoleAdapter<R> {
    lines: Lines<R>,
    identity: Identity,
    sender: Arc<ConsoleSender>,
}

impl<R> std::fmt::Debug for ConsoleAdapter<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleAdapter")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl<R: AsyncBufRead + Unpin + Send + 'static> ConsoleAdapter<R> {
    /// A console for OS user `user` (identity `console:<user>`).
    pub fn new<W>(input: R, output: W, user: &str) -> Result<ConsoleAdapter<R>, AdapterError>
    where
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let identity = Identity::parse(&format!("console:{user}"))?;
        Ok(ConsoleAdapter {
            lines: input.lines(),
            identity,
            sender: Arc::new(ConsoleSender {
                out: Mutex::new(Box::new(output)),
                next_id: AtomicU64::new(1),
            }),
        })
    }

    /// The identity every message is attributed to.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }
}

impl<R: AsyncBufRead + Unpin + Send + 'static> ChatAdapter for ConsoleAdapter<R> {
    async fn recv(&mut self) -> Option<Incoming> {
        loop {
            match self.lines.next_line().await {
                Ok(Some(line)) if line.trim().is_empty() => continue,
                Ok(Some(text)) => {
                    return Some(Incoming {
                        identity: self.identity.clone(),
                        channel: CHANNEL.to_string(),
                        text,
                        thread: None,
                        direct: true,
                        from_bot: false,
                    });
                }
                Ok(None) => return None,
                Err(e) => {
                    // Not UTF-8 or a broken pipe: nothing more can be read reliably.
                    tracing::warn!(error = %e, "console input ended");
                    return None;
                }
            }
        }
    }

    fn sender(&self) -> Arc<dyn ChatSender> {
        self.sender.clone()
    }
}

/// The writing half of the console.
pub struct ConsoleSender {
    out: Mutex<Box<dyn AsyncWrite + Unpin + Send>>,
    next_id: AtomicU64,
}

impl ConsoleSender {
    async fn write(&self, text: String) -> Result<(), AdapterError> {
        let mut out = self.out.lock().await;
        let io = |source| AdapterError::Io {
            what: "console".to_string(),
            source,
        };
        out.write_all(text.as_bytes()).await.map_err(io)?;
        out.flush().await.map_err(io)
    }
}

impl ChatSender for ConsoleSender {
    fn send<'a>(
        &'a self,
        _channel: &'a str,
        reply: Reply,
    ) -> BoxFuture<'a, Result<MessageRef, AdapterError>> {
        Box::pin(async move {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed).to_string();
            self.write(render(&id, false, &reply)).await?;
            Ok(MessageRef {
                channel: CHANNEL.to_string(),
                id,
            })
        })
    }

    fn edit<'a>(
        &'a self,
        msg: &'a MessageRef,
        reply: Reply,
    ) -> BoxFuture<'a, Result<(), AdapterError>> {
        Box::pin(async move { self.write(render(&msg.id, true, &reply)).await })
    }
}

/// Renders a reply as console text (every line ends with `\n`).
pub fn render(id: &str, edited: bool, reply: &Reply) -> String {
    let mut s = String::new();
    let mark = if edited { " (updated)" } else { "" };
    // The header is one line even if a value in it held a newline.
    s.push_str(&format!("[#{id}]{mark} {}\n", sanitize(&reply.header)));
    for line in &reply.lines {
        s.push_str(&format!("  {}\n", sanitize(line)));
    }
    for sec in &reply.sections {
        if !sec.title.is_empty() {
            s.push_str(&format!("  {}\n", sanitize(&sec.title)));
        }
        for note in &sec.notes {
            s.push_str(&format!("    ({})\n", sanitize(note)));
        }
        for block in &sec.blocks {
            if !block.label.is_empty() {
                s.push_str(&format!("    {}:\n", sanitize(&block.label)));
            }
            for line in block.text.split('\n') {
                s.push_str(OUTPUT_PREFIX);
                s.push_str(&sanitize(line));
                s.push('\n');
            }
        }
    }
    s
}

/// `[console]`: the stdin/stdout adapter.
#[derive(serde::Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Default false.
    #[serde(default)]
    pub enabled: bool,
}

impl crate::registry::Component for ConsoleConfig {
    const NAME: &'static str = "console";
    const CHAT: bool = true;

    fn validate(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    fn enabled(&self) -> bool {
        self.enabled
    }

    async fn build(self, cx: &mut crate::registry::BuildContext) -> Result<(), String> {
        if !self.enabled {
            return Ok(());
        }
        let user = std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            .unwrap_or_else(|_| "unknown".to_string());
        let stdin = tokio::io::BufReader::new(tokio::io::stdin());
        let console =
            ConsoleAdapter::new(stdin, tokio::io::stdout(), &user).map_err(|e| e.to_string())?;
        cx.serve(Self::NAME, console);
        Ok(())
    }
}
