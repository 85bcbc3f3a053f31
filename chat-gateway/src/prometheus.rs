//! `query PROMQL` in chat: one instant query against Prometheus'
//! HTTP API (`POST /api/v1/query`), answered as a small table (series
//! labels and value, sorted, at most [`MAX_ROWS`] rows). Errors from
//! Prometheus (`status: error`, `errorType`, `error`) are shown as they are.
//!
//! ```toml
//! [prometheus]
//! url = "http://127.0.0.1:9090"      # http or https, optional path prefix
//! bearer_token = "…"                 # optional
//! timeout = "10s"                    # default 10s
//! ```

use std::fmt::Write as _;
use std::time::Duration;

use fleetcmd_core::duration::parse_duration;
use serde::Deserialize;
use serde_json::Value;

use crate::adapters::{CodeBlock, Reply, Section};
use crate::registry::{Call, CallContext, CommandSpec, Commands, Guard};
use crate::render::asked_by;
use crate::secret::SecretString;
use futures_util::future::BoxFuture;

/// Rows a reply shows; the rest are counted.
pub const MAX_ROWS: usize = 20;
/// Largest answer read from Prometheus; a bigger one is refused (narrow
/// the query) rather than buffered.
pub const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

/// Defaults, in one place.
pub mod defaults {
    pub const TIMEOUT: &str = "10s";
    pub(super) fn timeout() -> String {
        TIMEOUT.to_string()
    }
}

/// `[prometheus]` in gateway.toml.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PrometheusConfig {
    /// Base URL of the Prometheus server (its HTTP API is under `/api/v1`).
    pub url: String,
    /// Sent as `Authorization: Bearer …` when set.
    #[serde(default)]
    pub bearer_token: Option<SecretString>,
    /// Per query, also passed to Prometheus as its evaluation timeout.
    #[serde(default = "defaults::timeout")]
    pub timeout: String,
}

impl PrometheusConfig {
    /// Every problem, keyed `prometheus.KEY`.
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if let Err(e) = base_url(&self.url) {
            p.push(("prometheus.url".into(), e));
        }
        if let Some(t) = &self.bearer_token {
            if t.expose().trim().is_empty() {
                p.push((
                    "prometheus.bearer_token".into(),
                    "must not be empty (leave it out for none)".into(),
                ));
            } else if t.expose().trim().chars().any(char::is_control) {
                // A header value cannot carry it: every query would fail.
                p.push((
                    "prometheus.bearer_token".into(),
                    "must not contain control characters (a newline?)".into(),
                ));
            }
        }
        match parse_duration(&self.timeout) {
            Ok(d) if d >= Duration::from_secs(1) && d <= Duration::from_secs(300) => {}
            Ok(_) => p.push((
                "prometheus.timeout".into(),
                "must be between 1s and 5m".into(),
            )),
            Err(e) => p.push(("prometheus.timeout".into(), e)),
        }
        p
    }
}

/// The base URL, checked: http(s), a host, no user name or password, no
/// query or fragment. Errors never quote the value (it may hold a password
/// or a token: an outside test saw one in chat).
fn base_url(text: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(text.trim())
        .map_err(|e| format!("not a URL (e.g. \"http://127.0.0.1:9090\"): {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("must be http:// or https://".into());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "must not carry a user name or password: give a token in `bearer_token` (or put a proxy that adds the credentials in front)".into(),
        );
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must not have a query or fragment".into());
    }
    Ok(url)
}

/// Why a query got no answer.
#[derive(Debug, thiserror::Error)]
pub enum PromError {
    #[error("[prometheus]: {0}")]
    Config(String),
    /// Shown in chat without the address (the log has it).
    #[error("prometheus unreachable: {message}")]
    Transport { url: String, message: String },
    #[error("prometheus answered HTTP {status} without an API error")]
    Http { status: u16 },
    #[error("prometheus answer is larger than {MAX_ANSWER_BYTES} bytes; narrow the query")]
    TooLarge,
    #[error("prometheus answer is not the API's JSON: {0}")]
    Decode(String),
    /// `status: error` from the API.
    #[error("{error_type}: {error}")]
    Api { error_type: String, error: String },
}

/// A Prometheus HTTP API client for instant queries.
#[derive(Debug)]
pub struct PromClient {
    http: reqwest::Client,
    endpoint: reqwest::Url,
    token: Option<SecretString>,
    timeout: Duration,
}

impl PromClient {
    pub fn new(cfg: &PrometheusConfig) -> Result<PromClient, PromError> {
        let problems = cfg.validate();
        if let Some((key, message)) = problems.into_iter().next() {
            return Err(PromError::Config(format!("{key}: {message}")));
        }
        let mut endpoint = base_url(&cfg.url).map_err(PromError::Config)?;
        let path = format!("{}/api/v1/query", endpoint.path().trim_end_matches('/'));
        endpoint.set_path(&path);
        let timeout = parse_duration(&cfg.timeout).map_err(PromError::Config)?;
        // A little longer than the evaluation timeout Prometheus is given,
        // so its own timeout error arrives instead of ours.
        let http = crate::http_client::http_client(timeout + Duration::from_secs(2))
            .map_err(|e| PromError::Config(e.to_string()))?;
        Ok(PromClient {
            http,
            endpoint,
            token: cfg.bearer_token.clone(),
            timeout,
        })
    }

    /// Runs one instant query; `data` of a successful answer.
    pub async fn query(&self, promql: &str) -> Result<QueryData, PromError> {
        let transport = |e: reqwest::Error| {
            let message = e.without_url().to_string();
            tracing::warn!(url = %self.endpoint, error = %message, "prometheus query failed");
            PromError::Transport {
                url: self.endpoint.to_string(),
                message,
            }
        };
        let timeout = format!("{}ms", self.timeout.as_millis());
        let mut req = self
            .http
            .post(self.endpoint.clone())
            .form(&[("query", promql), ("timeout", timeout.as_str())]);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t.expose());
        }
        let mut resp = req.send().await.map_err(transport)?;
        let status = resp.status().as_u16();
        let body = match crate::body::read_response(&mut resp, MAX_ANSWER_BYTES).await {
            Ok(b) => b,
            Err(crate::body::BodyError::TooLarge(_)) => return Err(PromError::TooLarge),
            Err(crate::body::BodyError::Read(message)) => {
                return Err(PromError::Transport {
                    url: self.endpoint.to_string(),
                    message,
                });
            }
        };
        parse_answer(status, &body)
    }
}

/// A successful answer's `data` (and the API's warnings).
#[derive(Debug, Clone, PartialEq)]
pub struct QueryData {
    pub result_type: String,
    pub result: Value,
    pub warnings: Vec<String>,
}

/// Decodes an API answer: `status: success` → its data; `status: error` →
/// [`PromError::Api`]; anything else by its HTTP status.
pub fn parse_answer(http_status: u16, body: &[u8]) -> Result<QueryData, PromError> {
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) if !(200..300).contains(&http_status) => {
            return Err(PromError::Http {
                status: http_status,
            });
        }
        Err(e) => return Err(PromError::Decode(e.to_string())),
    };
    let text = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    match v.get("status").and_then(Value::as_str) {
        Some("success") => {
            let data = v
                .get("data")
                .ok_or_else(|| PromError::Decode("no `data`".into()))?;
            Ok(QueryData {
                result_type: data
                    .get("resultType")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                result: data.get("result").cloned().unwrap_or(Value::Null),
                warnings: v
                    .get("warnings")
                    .and_then(Value::as_array)
                    .map(|w| {
                        w.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        }
        Some("error") => Err(PromError::Api {
            error_type: text("errorType"),
            error: text("error"),
        }),
        _ if !(200..300).contains(&http_status) => Err(PromError::Http {
            status: http_status,
        }),
        _ => Err(PromError::Decode("no `status`".into())),
    }
}

/// `name{a="1",b="2"}` with `__name__` first and the other labels sorted.
fn series_name(metric: Option<&Value>) -> String {
    let Some(Value::Object(m)) = metric else {
        return "{}".into();
    };
    let name = m.get("__name__").and_then(Value::as_str).unwrap_or("");
    let mut labels: Vec<(&String, &str)> = m
        .iter()
        .filter(|(k, _)| k.as_str() != "__name__")
        .map(|(k, v)| (k, v.as_str().unwrap_or("")))
        .collect();
    labels.sort();
    if labels.is_empty() && !name.is_empty() {
        return name.to_string();
    }
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}={}", serde_json::Value::from(*v)))
        .collect();
    format!("{name}{{{}}}", inner.join(","))
}

/// The value of a `[time, "value"]` pair.
fn sample_value(pair: Option<&Value>) -> String {
    pair.and_then(|p| p.get(1))
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_string()
}

/// (series, value) rows of a result, sorted by series.
fn rows(data: &QueryData) -> Vec<(String, String)> {
    let items = || data.result.as_array().into_iter().flatten();
    let mut rows: Vec<(String, String)> = match data.result_type.as_str() {
        "vector" => items()
            .map(|s| (series_name(s.get("metric")), sample_value(s.get("value"))))
            .collect(),
        // A range selector in an instant query: the newest sample and how
        // many there are.
        "matrix" => items()
            .map(|s| {
                let values = s.get("values").and_then(Value::as_array);
                let n = values.map_or(0, Vec::len);
                (
                    series_name(s.get("metric")),
                    format!(
                        "{} ({n} samples)",
                        sample_value(values.and_then(|v| v.last()))
                    ),
                )
            })
            .collect(),
        "scalar" | "string" => vec![(data.result_type.clone(), sample_value(Some(&data.result)))],
        other => vec![(format!("({other})"), data.result.to_string())],
    };
    rows.sort();
    rows
}

/// The chat reply for a successful answer.
pub fn render(promql: &str, data: &QueryData, who: &str) -> Reply {
    let rows = rows(data);
    let count = match data.result_type.as_str() {
        "vector" | "matrix" => format!("{} series", data.result.as_array().map_or(0, Vec::len)),
        t => t.to_string(),
    };
    let header = format!("query {promql}: {count}{}", asked_by(who));
    if rows.is_empty() {
        return Reply::text(header);
    }
    let width = rows
        .iter()
        .take(MAX_ROWS)
        .map(|(s, _)| s.chars().count())
        .max()
        .unwrap_or(0)
        .max("SERIES".len());
    let mut text = format!("{:<width$}  VALUE\n", "SERIES");
    for (series, value) in rows.iter().take(MAX_ROWS) {
        let _ = writeln!(text, "{series:<width$}  {value}");
    }
    let mut notes = Vec::new();
    if rows.len() > MAX_ROWS {
        notes.push(format!("… {} more", rows.len() - MAX_ROWS));
    }
    notes.extend(data.warnings.iter().map(|w| format!("warning: {w}")));
    Reply {
        header,
        sections: vec![Section {
            notes,
            blocks: vec![CodeBlock {
                label: String::new(),
                text: text.trim_end().to_string(),
                omitted_lines: 0,
            }],
            ..Section::default()
        }],
        ..Reply::default()
    }
}

/// The chat reply for a failed query.
pub fn render_error(promql: &str, err: &PromError, who: &str) -> Reply {
    let (what, detail) = match err {
        PromError::Api { error_type, error } => (
            format!("Prometheus refused it ({error_type})"),
            error.clone(),
        ),
        other => ("no answer".to_string(), other.to_string()),
    };
    Reply {
        header: format!("query {promql}: {what}{}", asked_by(who)),
        sections: vec![Section {
            blocks: vec![CodeBlock {
                label: "error".into(),
                text: detail,
                omitted_lines: 0,
            }],
            ..Section::default()
        }],
        ..Reply::default()
    }
}

fn spec() -> Vec<CommandSpec> {
    vec![CommandSpec {
        verb: "query".into(),
        usage: "query <promql>".into(),
        summary: "an instant query against the configured Prometheus".into(),
        help: String::new(),
        guard: Guard::AnyRoleHere,
    }]
}

/// `query` without `[prometheus]`: says what to configure.
pub fn not_configured() -> crate::registry::Unconfigured {
    crate::registry::Unconfigured {
        specs: spec(),
        message: "`query` needs a Prometheus server: set [prometheus] url in gateway.toml".into(),
    }
}
/// `query <promql>`: answered from this Prometheus server.
impl Commands for PromClient {
    fn commands(&self) -> Vec<CommandSpec> {
        spec()
    }

    fn call<'a>(&'a self, call: Call<'a>, _: &'a dyn CallContext) -> BoxFuture<'a, Reply> {
        let who = call.msg.identity.as_str();
        let promql = call.args;
        Box::pin(async move {
            if promql.is_empty() {
                return Reply::text(format!("usage: query <promql>{}", asked_by(who)));
            }
            match self.query(promql).await {
                Ok(data) => render(promql, &data, who),
                Err(e) => {
                    tracing::info!(error = %e, "prometheus query failed");
                    render_error(promql, &e, who)
                }
            }
        })
    }
}

impl crate::registry::Component for PrometheusConfig {
    const NAME: &'static str = "prometheus";
    const VERBS: &'static [&'static str] = &["query"];

    fn validate(&self) -> Vec<(String, String)> {
        PrometheusConfig::validate(self)
    }

    async fn build(self, cx: &mut crate::registry::BuildContext) -> Result<(), String> {
        let client = PromClient::new(&self).map_err(|e| e.to_string())?;
        cx.commands(std::sync::Arc::new(client))
    }

    fn absent(cx: &mut crate::registry::BuildContext) -> Result<(), String> {
        cx.commands(std::sync::Arc::new(not_configured()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(json: &str) -> QueryData {
        parse_answer(200, json.as_bytes()).expect("success")
    }

    #[test]
    fn a_vector_is_a_sorted_table_of_series_and_values() {
        let data = ok(
            r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"__name__":"fleetcmd_host_load1","host":"web-2","job":"fleet"},"value":[1.7e9,"0.5"]},
            {"metric":{"__name__":"fleetcmd_host_load1","job":"fleet","host":"web-1"},"value":[1.7e9,"1.25"]}]}}"#,
        );
        let reply = render("fleetcmd_host_load1", &data, "console:alice");
        assert_eq!(
            reply.header,
            "query fleetcmd_host_load1: 2 series — asked by console:alice"
        );
        assert_eq!(
            reply.sections[0].blocks[0].text,
            "SERIES                                         VALUE\n\
             fleetcmd_host_load1{host=\"web-1\",job=\"fleet\"}  1.25\n\
             fleetcmd_host_load1{host=\"web-2\",job=\"fleet\"}  0.5"
        );
    }

    #[test]
    fn long_results_are_capped_with_a_count_of_the_rest() {
        let items: Vec<String> = (0..25)
            .map(|i| format!(r#"{{"metric":{{"i":"{i:02}"}},"value":[1,"{i}"]}}"#))
            .collect();
        let data = ok(&format!(
            r#"{{"status":"success","data":{{"resultType":"vector","result":[{}]}}}}"#,
            items.join(",")
        ));
        let reply = render("x", &data, "u");
        let block = &reply.sections[0].blocks[0].text;
        assert_eq!(block.lines().count(), MAX_ROWS + 1, "{block}");
        assert!(
            block
                .lines()
                .nth(1)
                .is_some_and(|l| l.starts_with("{i=\"00\"}"))
        );
        assert_eq!(reply.sections[0].notes, vec!["… 5 more".to_string()]);
    }

    #[test]
    fn scalars_strings_and_empty_vectors() {
        let data = ok(r#"{"status":"success","data":{"resultType":"scalar","result":[1,"42"]}}"#);
        let reply = render("6*7", &data, "u");
        assert!(reply.plain().contains("scalar  42"), "{}", reply.plain());
        let data = ok(r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#);
        let reply = render("nothing", &data, "u");
        assert_eq!(reply.header, "query nothing: 0 series — asked by u");
        assert!(reply.sections.is_empty());
    }

    #[test]
    fn api_errors_are_shown_with_their_type_and_message() {
        let err = parse_answer(
            400,
            br#"{"status":"error","errorType":"bad_data","error":"1:5: parse error: unclosed left parenthesis"}"#,
        )
        .expect_err("error");
        let reply = render_error("sum(", &err, "console:alice");
        assert_eq!(
            reply.header,
            "query sum(: Prometheus refused it (bad_data) — asked by console:alice"
        );
        assert_eq!(
            reply.sections[0].blocks[0].text,
            "1:5: parse error: unclosed left parenthesis"
        );
        assert!(matches!(
            parse_answer(502, b"<html>bad gateway</html>"),
            Err(PromError::Http { status: 502 })
        ));
    }

    #[test]
    fn config_is_validated_with_key_paths() {
        let cfg = |url: &str, timeout: &str, token: Option<&str>| PrometheusConfig {
            url: url.into(),
            bearer_token: token.map(SecretString::new),
            timeout: timeout.into(),
        };
        assert!(
            cfg("http://127.0.0.1:9090", "10s", None)
                .validate()
                .is_empty()
        );
        assert!(
            cfg("https://prom.example.com/prometheus/", "1m", Some("t"))
                .validate()
                .is_empty()
        );
        let keys =
            |c: PrometheusConfig| c.validate().into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(
            keys(cfg("ftp://x", "0s", Some(" "))),
            [
                "prometheus.url",
                "prometheus.bearer_token",
                "prometheus.timeout"
            ]
        );
        assert_eq!(
            keys(cfg("http://x:9090/?a=b", "10s", None)),
            ["prometheus.url"]
        );
        assert!(!format!("{:?}", cfg("http://x", "10s", Some("sekrit"))).contains("sekrit"));
        // Credentials in the URL are refused, and no problem quotes the
        // value (an outside test saw a password in chat and in the log).
        for url in [
            "http://promuser:SECRETPW@127.0.0.1:9090",
            "http://SECRETPW@127.0.0.1:9090",
            "http://u:SECRETPW@127.0.0.1:1/x?token=SECRETPW",
            "SECRETPW not a url",
        ] {
            let problems = cfg(url, "10s", None).validate();
            assert_eq!(problems.len(), 1, "{url}: {problems:?}");
            assert!(!problems[0].1.contains("SECRETPW"), "{problems:?}");
        }
        assert!(
            cfg("http://u:p@127.0.0.1:9090", "10s", None).validate()[0]
                .1
                .contains("bearer_token")
        );
        // A token a header cannot carry is refused before any query fails.
        assert_eq!(
            keys(cfg("http://x", "10s", Some("abc\ndef"))),
            ["prometheus.bearer_token"]
        );
    }

    /// A query that got no answer tells chat what went wrong, not where
    /// Prometheus lives.
    #[tokio::test]
    async fn an_unreachable_prometheus_is_named_without_its_address() {
        let c = PromClient::new(&PrometheusConfig {
            url: "http://127.0.0.1:1/internal-prom/".into(),
            bearer_token: None,
            timeout: "1s".into(),
        })
        .expect("client");
        let err = c.query("up").await.expect_err("nothing listens on port 1");
        let reply = render_error("up", &err, "console:alice").plain();
        assert!(reply.contains("prometheus unreachable"), "{reply}");
        assert!(
            !reply.contains("127.0.0.1") && !reply.contains("internal-prom"),
            "{reply}"
        );
    }

    #[test]
    fn the_endpoint_keeps_a_path_prefix() {
        let c = PromClient::new(&PrometheusConfig {
            url: "http://127.0.0.1:9090/prom/".into(),
            bearer_token: None,
            timeout: "5s".into(),
        })
        .expect("client");
        assert_eq!(
            c.endpoint.as_str(),
            "http://127.0.0.1:9090/prom/api/v1/query"
        );
    }
}
