//! The chat side of plugins: every plugin's commands as one [`Commands`]
//! set on the gateway's registry (each guarded by `plugin:NAME.VERB` in the
//! signed policy; the router checks the grant, audits every call as
//! `chat_command` and every refusal as `chat_denied`, and lists in `help`
//! only what the asker may use), the plugin called with the verified
//! caller, its answer rendered inert, and its `job.run` handed to
//! [`CallContext::run_as_caller`]: the caller's own `run`.

use std::sync::Arc;
use std::time::Duration;

use fleetcmd_core::grammar::{self, RunOptions, RunRequest};

use super::config::PluginSpec;
use super::manifest;
use super::protocol::{Caller, CommandResult, JobRunParams, JobRunResult};
use super::supervisor::{JobRunner, Plugin};
use crate::adapters::{BoxFuture, CodeBlock, Incoming, Reply, Section};
use crate::registry::{AuditKind, Call, CallContext, CommandSpec, Commands, Guard, RunOutcome};
use crate::render::asked_by;

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
    pub fn find(&self, verb: &str) -> Option<(&Arc<Plugin>, &manifest::CommandSpec)> {
        self.plugins
            .iter()
            .find_map(|p| p.spec.manifest.command(verb).map(|c| (p, c)))
    }

    async fn answer(&self, call: Call<'_>, ctx: &dyn CallContext) -> Reply {
        let who = call.msg.identity.as_str();
        let Some((plugin, command)) = self.find(call.verb) else {
            // The router calls only the verbs registered from these manifests.
            return Reply::text(format!("unknown command `{}`{}", call.verb, asked_by(who)));
        };
        let args = match grammar::words(call.args) {
            Ok(a) => a,
            Err(e) => return Reply::text(format!("{e}{}", asked_by(who))),
        };
        if let Err(e) = command.check_args(&args) {
            return Reply::text(format!("{e}{}", asked_by(who)));
        }
        let jobs = AsCaller {
            ctx,
            plugin: plugin.name(),
            verb: call.verb,
            may_run: plugin.spec.may_run.as_deref(),
        };
        match plugin
            .call(call.verb, &args, &caller(call.msg), &jobs)
            .await
        {
            Ok(result) => render(
                plugin.name(),
                call.verb,
                who,
                result,
                plugin.spec.limits.reply_bytes,
            ),
            Err(e) => Reply::text(format!("{e}{}", asked_by(who))),
        }
    }
}

impl Commands for PluginHost {
    fn commands(&self) -> Vec<CommandSpec> {
        self.plugins
            .iter()
            .flat_map(|p| {
                p.spec.manifest.commands.iter().map(|c| CommandSpec {
                    verb: c.verb.clone(),
                    usage: c.usage(),
                    summary: format!("{} (plugin {})", c.summary, p.name()),
                    help: c.help.join("\n"),
                    guard: Guard::Action(c.action(p.name())),
                })
            })
            .collect()
    }

    fn call<'a>(&'a self, call: Call<'a>, ctx: &'a dyn CallContext) -> BoxFuture<'a, Reply> {
        Box::pin(self.answer(call, ctx))
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
    // The header names the outcome: the router audits it with the call.
    let mut reply = Reply::text(format!(
        "{verb}: answered by plugin {plugin}{}",
        asked_by(who)
    ));
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

/// A plugin's `job.run`, as the caller's own `run` (typed: the values
/// cannot become options or another selector).
pub fn run_request(p: JobRunParams) -> Result<RunRequest, String> {
    let timeout = match p.timeout_secs {
        Some(0) => return Err("timeout_secs must be at least 1".to_string()),
        t => t.map(Duration::from_secs),
    };
    Ok(RunRequest {
        command: p.command,
        args: p.args,
        selector: p.selector,
        options: RunOptions {
            timeout,
            dry_run: p.dry_run,
            ..RunOptions::default()
        },
    })
}

/// The protocol's form of how the run ended.
pub fn job_result(outcome: RunOutcome) -> JobRunResult {
    match outcome {
        RunOutcome::Submitted { job_id } => JobRunResult::Submitted { job_id },
        RunOutcome::DryRun => JobRunResult::DryRun,
        RunOutcome::NotSubmitted { reason } => JobRunResult::NotSubmitted { reason },
    }
}

/// `job.run` for one call, through the router's path for the caller;
/// every refusal audited as `chat_denied` and every job started as
/// `chat_command`, each naming the plugin and its verb.
struct AsCaller<'a> {
    ctx: &'a dyn CallContext,
    plugin: &'a str,
    verb: &'a str,
    /// `[[plugin]] may_run`.
    may_run: Option<&'a [String]>,
}

impl AsCaller<'_> {
    async fn refuse(&self, command: &str, why: String) -> String {
        self.ctx
            .audit(
                AuditKind::Denied,
                command,
                "",
                format!(
                    "via plugin {} ({}): job.run refused: {why}",
                    self.plugin, self.verb
                ),
            )
            .await;
        why
    }
}

impl JobRunner for AsCaller<'_> {
    fn run_as_caller(&self, req: JobRunParams) -> BoxFuture<'_, Result<JobRunResult, String>> {
        Box::pin(async move {
            let command = fleetcmd_core::terminal::excerpt(&req.command);
            if let Some(allowed) = self.may_run
                && !allowed.contains(&req.command)
            {
                let why = format!(
                    "plugin {} may not run `{command}` (its [[plugin]] may_run: {}); nothing run",
                    self.plugin,
                    if allowed.is_empty() {
                        "nothing".to_string()
                    } else {
                        allowed.join(", ")
                    }
                );
                return Err(self.refuse(&command, why).await);
            }
            let selector = fleetcmd_core::terminal::excerpt(&req.selector);
            let run = match run_request(req) {
                Ok(run) => run,
                Err(why) => return Err(self.refuse(&command, why).await),
            };
            let outcome = self.ctx.run_as_caller(run).await;
            match &outcome {
                RunOutcome::Submitted { job_id } => {
                    self.ctx
                        .audit(
                            AuditKind::Command,
                            self.verb,
                            job_id,
                            format!(
                                "job {job_id} ({command} on {selector}) started via plugin {}",
                                self.plugin
                            ),
                        )
                        .await;
                }
                RunOutcome::NotSubmitted { reason } => {
                    self.refuse(&command, format!("not submitted: {reason}"))
                        .await;
                }
                RunOutcome::DryRun => {}
            }
            Ok(job_result(outcome))
        })
    }

    fn refused(&self, why: String) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.ctx
                .audit(
                    AuditKind::Denied,
                    self.verb,
                    "",
                    format!("plugin {}: {why}", self.plugin),
                )
                .await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_request_is_the_run_it_names_and_nothing_more() {
        let params = |timeout_secs, dry_run| JobRunParams {
            call: 1,
            command: "restart".into(),
            args: vec!["x on all --dry-run".into()],
            selector: "role=web".into(),
            timeout_secs,
            dry_run,
        };
        assert_eq!(
            run_request(params(Some(90), false)),
            Ok(RunRequest {
                command: "restart".into(),
                args: vec!["x on all --dry-run".into()],
                selector: "role=web".into(),
                options: RunOptions {
                    timeout: Some(Duration::from_secs(90)),
                    ..RunOptions::default()
                },
            })
        );
        assert!(run_request(params(None, true)).is_ok_and(|r| r.options.dry_run));
        assert_eq!(
            run_request(params(Some(0), false)),
            Err("timeout_secs must be at least 1".to_string())
        );
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
