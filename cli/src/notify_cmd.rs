//! `fleetcmd notify`: posts a monitoring notification into chat through the
//! gateway's signed `/notify` endpoint — the command Nagios, Zabbix, Sensu
//! or any script hook runs (examples in `deploy/examples/`).

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleetcmd_gateway::adapters::webhook::sign;
use fleetcmd_gateway::notify::{NOTIFY_PATH, Severity};

use crate::{Failure, usage};

#[derive(clap::Args, Debug, Clone)]
pub struct NotifyArgs {
    /// The gateway's HTTP listener, e.g. `http://127.0.0.1:7081`.
    #[arg(long, env = "FLEETCMD_NOTIFY_URL")]
    pub url: String,
    /// File holding the `[notify]` secret of the gateway.
    #[arg(long, env = "FLEETCMD_NOTIFY_SECRET_FILE")]
    pub secret_file: PathBuf,
    /// Where to post, in the adapter's channel form (`slack:T0001:C0OPS`,
    /// `irc:libera:#ops`, …).
    #[arg(long)]
    pub channel: String,
    /// ok, info, warning, critical or unknown (Nagios and Zabbix names such
    /// as RECOVERY, DOWN or disaster are understood).
    #[arg(long)]
    pub severity: String,
    /// The message; `-` reads it from stdin.
    #[arg(long)]
    pub text: String,
    /// Who is talking (e.g. `nagios`, `zabbix`).
    #[arg(long, default_value = "")]
    pub source: String,
}

/// Sends one notification; prints what the gateway answered.
pub async fn run(args: NotifyArgs) -> Result<(), Failure> {
    Severity::parse(&args.severity).map_err(usage)?;
    let secret = std::fs::read_to_string(&args.secret_file)
        .map_err(|e| usage(format!("--secret-file {}: {e}", args.secret_file.display())))?;
    let text = if args.text == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| usage(format!("reading the text from stdin: {e}")))?;
        s
    } else {
        args.text.clone()
    };
    let body = serde_json::json!({
        "channel": args.channel,
        "severity": args.severity,
        "text": text,
        "source": args.source,
    })
    .to_string();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let signature = sign::sign(secret.trim().as_bytes(), now, body.as_bytes());
    let tls = fleetcmd_gateway::adapters::public_tls_config("notify TLS")
        .map_err(|e| Failure::from(anyhow::anyhow!("{e}")))?;
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| Failure::from(anyhow::anyhow!("HTTP client: {e}")))?;
    let url = format!("{}{NOTIFY_PATH}", args.url.trim_end_matches('/'));
    let resp = client
        .post(&url)
        .header("content-type", "application/json")
        .header(sign::TIMESTAMP_HEADER, now.to_string())
        .header(sign::SIGNATURE_HEADER, signature)
        .body(body)
        .send()
        .await
        .map_err(|e| Failure::from(anyhow::anyhow!("{url}: {e}")))?;
    let status = resp.status();
    let answer = resp.text().await.unwrap_or_default();
    if status.is_success() {
        println!("{}", fleetcmd_core::terminal::escape(answer.trim()));
        Ok(())
    } else {
        Err(Failure::from(anyhow::anyhow!(
            "{url}: HTTP {status}: {}",
            answer.trim()
        )))
    }
}
