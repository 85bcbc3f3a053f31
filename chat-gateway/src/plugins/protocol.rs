//! The plugin protocol, version 1: JSON-RPC 2.0 over the plugin's stdin
//! and stdout, one JSON object per line (UTF-8, `\n`-terminated).
//!
//! Gateway → plugin: `initialize` once after start, then `command` per
//! chat call. Plugin → gateway, only while a `command` is being answered:
//! `job.run`, answered with what `run` posted for the caller. The types
//! here are the whole wire contract; docs/plugins.md describes it for
//! plugin authors.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The protocol version this gateway speaks. A plugin answers
/// `initialize` with the version it speaks; any other is refused.
pub const PROTOCOL_VERSION: u32 = 1;

/// JSON-RPC error code: the method is not known (JSON-RPC 2.0).
pub const METHOD_NOT_FOUND: i64 = -32601;
/// JSON-RPC error code: the parameters are not what the method takes.
pub const INVALID_PARAMS: i64 = -32602;

/// A request the gateway sends.
#[derive(Serialize, Debug)]
pub struct Request<'a, P> {
    pub jsonrpc: &'static str,
    pub id: u64,
    pub method: &'a str,
    pub params: P,
}

impl<'a, P> Request<'a, P> {
    pub fn new(id: u64, method: &'a str, params: P) -> Request<'a, P> {
        Request {
            jsonrpc: "2.0",
            id,
            method,
            params,
        }
    }
}

/// A response the gateway sends to a plugin's request.
#[derive(Serialize, Debug)]
pub struct Response {
    pub jsonrpc: &'static str,
    pub id: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<RpcError>,
}

impl Response {
    pub fn ok(id: Value, result: Value) -> Response {
        Response {
            jsonrpc: "2.0",
            id,
            result: Some(result),
            error: None,
        }
    }

    pub fn err(id: Value, code: i64, message: impl Into<String>) -> Response {
        Response {
            jsonrpc: "2.0",
            id,
            result: None,
            error: Some(RpcError {
                code,
                message: message.into(),
            }),
        }
    }
}

/// A JSON-RPC error object.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
}

/// Any line a plugin writes: a response (`id` with `result` or `error`)
/// or a request (`method`).
#[derive(Deserialize, Debug)]
pub struct FromPlugin {
    pub jsonrpc: String,
    #[serde(default)]
    pub id: Option<Value>,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub params: Option<Value>,
    #[serde(default)]
    pub result: Option<Value>,
    #[serde(default)]
    pub error: Option<RpcError>,
}

/// What a line from a plugin is.
#[derive(Debug)]
pub enum Message {
    Response {
        id: Value,
        outcome: Result<Value, RpcError>,
    },
    Request {
        id: Value,
        method: String,
        params: Value,
    },
}

/// Parses one line from a plugin; the error says what is wrong with it.
pub fn parse_line(line: &str) -> Result<Message, String> {
    let m: FromPlugin =
        serde_json::from_str(line).map_err(|e| format!("not a JSON-RPC object: {e}"))?;
    if m.jsonrpc != "2.0" {
        return Err(format!("jsonrpc must be \"2.0\", got {:?}", m.jsonrpc));
    }
    match (m.method, m.id) {
        (Some(method), Some(id)) => Ok(Message::Request {
            id,
            method,
            params: m.params.unwrap_or(Value::Null),
        }),
        (Some(method), None) => Err(format!(
            "notification {method:?}: the gateway takes no notifications (give it an id)"
        )),
        (None, Some(id)) => {
            let outcome = match (m.result, m.error) {
                (_, Some(e)) => Err(e),
                (Some(r), None) => Ok(r),
                (None, None) => return Err("a response needs result or error".to_string()),
            };
            Ok(Message::Response { id, outcome })
        }
        (None, None) => Err("neither a request (method) nor a response (id)".to_string()),
    }
}

/// `initialize` params.
#[derive(Serialize, Debug)]
pub struct InitializeParams<'a> {
    pub protocol_version: u32,
    /// The plugin's name as configured.
    pub plugin: &'a str,
    pub gateway_version: &'a str,
}

/// `initialize` result: the version the plugin speaks and the verbs it
/// serves (must be the manifest's, so the two cannot drift apart).
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct InitializeResult {
    pub protocol_version: u32,
    pub commands: Vec<String>,
}

/// Who is calling, as the gateway verified it (never what the plugin or
/// the message text claims).
#[derive(Serialize, Debug, Clone)]
pub struct Caller {
    /// The stable identity, e.g. `slack:T0001:U024BE7LH`.
    pub identity: String,
    /// The platform part of it (`slack`, `console`, …).
    pub platform: String,
    /// The identity without its platform, e.g. `T0001:U024BE7LH`.
    pub person: String,
    /// The channel the command was typed in.
    pub channel: String,
}

/// `command` params.
#[derive(Serialize, Debug)]
pub struct CommandParams<'a> {
    pub command: &'a str,
    /// The words after the verb, quotes removed.
    pub args: &'a [String],
    pub caller: &'a Caller,
}

/// `command` result: what to post. Every string is rendered inert (like
/// job output), so a plugin cannot mention everyone or fake a button.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct CommandResult {
    #[serde(default)]
    pub lines: Vec<String>,
    #[serde(default)]
    pub blocks: Vec<Block>,
}

/// A preformatted block of a reply.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct Block {
    #[serde(default)]
    pub title: String,
    pub text: String,
}

/// `job.run` params: a `run` on behalf of the caller of the `command`
/// being answered. Typed, never text: no value can become an option or
/// another selector.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JobRunParams {
    /// The id of the `command` request being answered: a `job.run` runs
    /// as that call's caller only (one left in the pipe after its call
    /// ended would otherwise run as the next caller — found by an outside
    /// test).
    pub call: u64,
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    pub selector: String,
    /// Whole seconds, at least 1, as `run --timeout`.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// As `run --dry-run`: the plan is posted, nothing submitted.
    #[serde(default)]
    pub dry_run: bool,
}

/// `job.run` result: how the run ended. The channel saw everything `run`
/// shows (a refusal, the approval request, the live job message).
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum JobRunResult {
    /// Signed as the caller and submitted; its result was posted.
    Submitted { job_id: String },
    /// `dry_run`: the plan was posted, nothing submitted.
    DryRun,
    /// Refused by the policy, not approved, bad arguments or refused by the
    /// controller: nothing runs.
    NotSubmitted { reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_run_outcomes_are_tagged_objects() {
        let check = |r: JobRunResult, want: &str| {
            assert_eq!(serde_json::to_string(&r).ok().as_deref(), Some(want));
        };
        check(
            JobRunResult::Submitted {
                job_id: "01j".into(),
            },
            r#"{"outcome":"submitted","job_id":"01j"}"#,
        );
        check(JobRunResult::DryRun, r#"{"outcome":"dry_run"}"#);
        check(
            JobRunResult::NotSubmitted {
                reason: "not approved".into(),
            },
            r#"{"outcome":"not_submitted","reason":"not approved"}"#,
        );
        // Options are typed fields; anything else is refused, not guessed.
        assert!(
            serde_json::from_str::<JobRunParams>(
                r#"{"command":"uptime","selector":"all","batch":"5"}"#
            )
            .is_err()
        );
    }

    #[test]
    fn lines_are_requests_responses_or_named_errors() {
        assert!(matches!(
            parse_line(r#"{"jsonrpc":"2.0","id":3,"result":{"lines":["hi"]}}"#),
            Ok(Message::Response { outcome: Ok(_), .. })
        ));
        assert!(matches!(
            parse_line(r#"{"jsonrpc":"2.0","id":3,"error":{"code":5,"message":"no"}}"#),
            Ok(Message::Response {
                outcome: Err(RpcError { code: 5, .. }),
                ..
            })
        ));
        assert!(matches!(
            parse_line(r#"{"jsonrpc":"2.0","id":"a","method":"job.run","params":{}}"#),
            Ok(Message::Request { .. })
        ));
        for (line, part) in [
            ("hello", "not a JSON-RPC object"),
            (r#"{"jsonrpc":"1.0","id":1,"result":1}"#, "jsonrpc must be"),
            (
                r#"{"jsonrpc":"2.0","method":"log"}"#,
                "takes no notifications",
            ),
            (r#"{"jsonrpc":"2.0","id":1}"#, "needs result or error"),
            (r#"{"jsonrpc":"2.0"}"#, "neither a request"),
        ] {
            match parse_line(line) {
                Err(e) => assert!(e.contains(part), "{line}: {e}"),
                Ok(m) => panic!("{line}: accepted as {m:?}"),
            }
        }
    }
}
