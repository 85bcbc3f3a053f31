//! The chat side of plugins: finds the plugin serving a verb, checks the
//! caller's `plugin:NAME.VERB` grant, calls it, renders its answer inert,
//! audits the call (`plugin_called`, or `chat_denied` when refused), lists
//! usable plugin commands in `help`, and serves the plugin's `job.run` by
//! handing the router the `run` command the caller could have typed.

use std::sync::Arc;

use fleetcmd_core::grammar::{self, ChatCommand};
use fleetcmd_core::policy::Policy;
use fleetcmd_core::rbac::may_action;

use super::config::PluginSpec;
use super::manifest::CommandSpec;
use super::protocol::{Caller, CommandResult, JobRunParams, JobRunResult};
use super::supervisor::{JobRunner, Plugin};
use crate::adapters::{BoxFuture, ChatSender, CodeBlock, Incoming, MessageRef, Reply, Section};
use crate::controller::ControllerApi;
use crate::render::asked_by;
use crate::router::{Router, event};

/// Every configured plugin.
#[derive(Debug, Default)]
pub struct PluginHost {
    plugins: Vec<Arc<Plugin>>,
}

impl PluginHost {
    pub fn new(specs: Vec<PluginSpec>) -> PluginHost {
        PluginHost {
            plugins: specs
                .into_iter()
                .map(|s| Arc::new(Plugin::new(s)))
                .collect(),
        }
    }

    /// The plugin serving `verb`, and the command.
    pub fn find(&self, verb: &str) -> Option<(&Arc<Plugin>, &CommandSpec)> {
        self.plugins
            .iter()
            .find_map(|p| p.spec.manifest.command(verb).map(|c| (p, c)))
    }

    /// `help` lines for the plugin commands `msg`'s sender may use here.
    pub fn help_lines(&self, policy: &Policy, msg: &Incoming) -> Vec<String> {
        let mut lines = Vec::new();
        for p in &self.plugins {
            for c in &p.spec.manifest.commands {
                if may_action(policy, &msg.identity, &msg.channel, &c.action(p.name())) {
                    lines.push(format!(
                        "{} — {} (plugin {})",
                        c.usage(),
                        c.summary,
                        p.name()
                    ));
                }
            }
        }
        lines
    }
}

/// Bytes of `s` counted against a reply's budget; `s` is cut at a char
/// boundary when over it.
fn take(budget: &mut usize, cut: &mut usize, s: String) -> Option<String> {
    if *budget == 0 {
        *cut += s.len();
        return None;
    }
    if s.len() <= *budget {
        *budget -= s.len();
        return Some(s);
    }
    let mut end = *budget;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    *cut += s.len() - end;
    *budget = 0;
    Some(s[..end].to_string())
}

/// The plugin's answer as a reply: lines and titled blocks, at most
/// `max_bytes` of text; what is over it is cut and said so. Adapters
/// escape every string, so nothing in it can mention, format or click.
pub fn render(
    plugin: &str,
    verb: &str,
    who: &str,
    result: CommandResult,
    max_bytes: usize,
) -> Reply {
    let mut budget = max_bytes;
    let mut cut = 0usize;
    let mut reply = Reply::text(format!("{verb} (plugin {plugin}){}", asked_by(who)));
    for l in result.lines {
        if let Some(l) = take(&mut budget, &mut cut, l) {
            reply.lines.push(l);
        }
    }
    for b in result.blocks {
        let title = take(&mut budget, &mut cut, b.title);
        let text = take(&mut budget, &mut cut, b.text);
        if let Some(text) = text {
            reply.sections.push(Section {
                title: title.unwrap_or_default(),
                notes: Vec::new(),
                blocks: vec![CodeBlock {
                    label: String::new(),
                    text,
                    omitted_lines: 0,
                }],
            });
        }
    }
    if cut > 0 {
        reply.lines.push(format!(
            "(plugin output cut: {cut} bytes over the {max_bytes}-byte limit of a reply)"
        ));
    }
    reply
}

/// The verified caller as the protocol passes it.
pub fn caller(msg: &Incoming) -> Caller {
    let identity = msg.identity.as_str().to_string();
    let (platform, person) = identity
        .split_once(':')
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .unwrap_or_default();
    Caller {
        identity,
        platform,
        person,
        channel: msg.channel.clone(),
    }
}

/// Double quotes `s` for the chat grammar (`\` and `"` escaped).
fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The `run` command text a `job.run` stands for, checked to parse back to
/// exactly the request (so no value can smuggle in an option or selector).
pub fn run_text(req: &JobRunParams) -> Result<String, String> {
    let mut text = format!("run {}", quoted(&req.command));
    for a in &req.args {
        text.push(' ');
        text.push_str(&quoted(a));
    }
    text.push_str(" on ");
    text.push_str(&quoted(&req.selector));
    if let Some(t) = req.timeout_secs {
        text.push_str(&format!(" --timeout {t}s"));
    }
    match grammar::parse(&text) {
        Ok(ChatCommand::Run(r))
            if r.command == req.command
                && r.args == req.args
                && r.selector == req.selector
                && r.options.timeout.map(|d| d.as_secs()) == req.timeout_secs
                && !r.options.dry_run =>
        {
            Ok(text)
        }
        Ok(_) => Err("the request does not make one unambiguous run command".to_string()),
        Err(e) => Err(format!("not a valid run request: {e}")),
    }
}

/// Posts through to the chat and keeps the text of what was posted.
struct Recording<'a> {
    out: &'a dyn ChatSender,
    posted: std::sync::Mutex<Vec<String>>,
}

impl Recording<'_> {
    fn keep(&self, reply: &Reply) {
        if let Ok(mut p) = self.posted.lock() {
            p.push(reply.plain());
        }
    }
}

impl ChatSender for Recording<'_> {
    fn send<'a>(
        &'a self,
        channel: &'a str,
        reply: Reply,
    ) -> BoxFuture<'a, Result<MessageRef, crate::adapters::AdapterError>> {
        self.keep(&reply);
        self.out.send(channel, reply)
    }

    fn edit<'a>(
        &'a self,
        msg: &'a MessageRef,
        reply: Reply,
    ) -> BoxFuture<'a, Result<(), crate::adapters::AdapterError>> {
        self.keep(&reply);
        self.out.edit(msg, reply)
    }

    fn can_edit(&self) -> bool {
        self.out.can_edit()
    }

    fn ack_grace(&self) -> std::time::Duration {
        self.out.ack_grace()
    }
}

/// `job.run` for one call: the caller's message, the router, the chat.
struct AsCaller<'a, C> {
    router: &'a Router<C>,
    msg: &'a Incoming,
    out: &'a dyn ChatSender,
}

impl<C: ControllerApi> JobRunner for AsCaller<'_, C> {
    fn run_as_caller(&self, req: JobRunParams) -> BoxFuture<'_, Result<JobRunResult, String>> {
        Box::pin(async move {
            let text = run_text(&req)?;
            let msg = Incoming {
                text,
                direct: true,
                ..self.msg.clone()
            };
            let rec = Recording {
                out: self.out,
                posted: std::sync::Mutex::new(Vec::new()),
            };
            // The same path as the caller typing it: RBAC, approvals,
            // signing, submission, audit, the result posted to them.
            self.router.handle_boxed(msg, &rec).await;
            let replies = rec.posted.into_inner().unwrap_or_default();
            Ok(JobRunResult { replies })
        })
    }
}

impl<C: ControllerApi> Router<C> {
    /// Serves the commands of `host`'s plugins (set once; later calls are
    /// ignored).
    pub fn serve_plugins(&self, host: PluginHost) {
        let _ = self.plugins.set(Arc::new(host));
    }

    /// A `handle` whose future is boxed: a plugin's `job.run` re-enters it.
    fn handle_boxed<'a>(&'a self, msg: Incoming, out: &'a dyn ChatSender) -> BoxFuture<'a, ()> {
        Box::pin(self.handle(msg, out))
    }

    /// Answers `text` when its verb is a plugin's; `None` otherwise.
    pub(crate) async fn plugin_command(
        &self,
        host: &PluginHost,
        msg: &Incoming,
        text: &str,
        out: &dyn ChatSender,
    ) -> Option<Reply> {
        let words = grammar::words(text).ok()?;
        let (verb, args) = words.split_first()?;
        let (plugin, command) = host.find(verb)?;
        let who = msg.identity.as_str();
        let action = command.action(plugin.name());
        let policy = match self.current_policy().await {
            Ok(p) => p,
            Err(e) => return Some(Reply::text(format!("{e}{}", asked_by(who)))),
        };
        if !may_action(&policy.policy, &msg.identity, &msg.channel, &action) {
            self.report(event(
                "chat_denied",
                msg,
                &action,
                "",
                format!("{action}: no role grants it in this channel"),
            ))
            .await;
            return Some(Reply::text(format!(
                "refused: none of your roles grants `{action}` in this channel{}",
                asked_by(who)
            )));
        }
        if let Err(e) = command.check_args(args) {
            return Some(Reply::text(format!("{e}{}", asked_by(who))));
        }
        let jobs = AsCaller {
            router: self,
            msg,
            out,
        };
        let outcome = plugin.call(verb, args, &caller(msg), &jobs).await;
        let (detail, reply) = match outcome {
            Ok(result) => (
                "answered".to_string(),
                render(
                    plugin.name(),
                    verb,
                    who,
                    result,
                    plugin.spec.limits.reply_bytes,
                ),
            ),
            Err(e) => (e.to_string(), Reply::text(format!("{e}{}", asked_by(who)))),
        };
        self.report(event(
            "plugin_called",
            msg,
            &action,
            "",
            format!("{} {}: {detail}", verb, args.len()),
        ))
        .await;
        Some(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(command: &str, args: &[&str], selector: &str) -> JobRunParams {
        JobRunParams {
            command: command.to_string(),
            args: args.iter().map(|s| s.to_string()).collect(),
            selector: selector.to_string(),
            timeout_secs: None,
        }
    }

    #[test]
    fn a_job_request_becomes_exactly_one_run_command() {
        assert_eq!(
            run_text(&req("restart", &["nginx.service"], "role=web")).as_deref(),
            Ok(r#"run "restart" "nginx.service" on "role=web""#)
        );
        // Values that look like grammar stay values.
        let tricky = req("echo", &["x on all --dry-run", "a \"b\" \\"], "role=web");
        assert!(run_text(&tricky).is_ok(), "{:?}", run_text(&tricky));
        // A selector carrying an option is refused, not run with it.
        assert!(run_text(&req("uptime", &[], "all --dry-run")).is_err());
        assert!(run_text(&req("uptime", &[], "")).is_err());
    }

    #[test]
    fn replies_are_cut_at_their_byte_limit_and_say_so() {
        let result = CommandResult {
            lines: vec!["a".repeat(200), "b".repeat(200)],
            blocks: vec![super::super::protocol::Block {
                title: "t".into(),
                text: "é".repeat(100),
            }],
        };
        let r = render("p", "v", "console:alice", result, 300);
        assert_eq!(r.lines[0].len(), 200);
        assert_eq!(r.lines[1].len(), 100);
        assert!(r.sections.is_empty());
        assert_eq!(
            r.lines.last().map(String::as_str),
            Some("(plugin output cut: 301 bytes over the 300-byte limit of a reply)")
        );
    }
}
