//! `fleetcmd audit`: verify the trail (over gRPC, or an exported file
//! offline with only the audit public key), export it as JSON lines, and
//! search it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use fleetcmd_core::audit::{
    Broken, ExportLine, Record, SignedHead, Verified, verify_chain, verify_options,
};
use fleetcmd_core::crypto::PublicKey;
use fleetcmd_proto::v1 as pb;
use tonic::transport::Channel;

use crate::client::{channel, operator};
use crate::{Conn, Failure, usage};

#[derive(Subcommand, Debug)]
pub enum AuditCmd {
    /// Check the hash chain and the signed chain heads; names the first bad record.
    Verify {
        /// Start at this sequence number (trusting its link to the one before).
        #[arg(long)]
        from: Option<u64>,
        /// Verify an exported file offline instead of the controller's trail.
        #[arg(long, requires = "audit_key")]
        file: Option<PathBuf>,
        /// The audit public key (`ed25519:…`) or a file holding it
        /// (the controller writes DATA_DIR/audit/audit.pub). Required with
        /// --file; over gRPC it pins the key instead of taking the controller's.
        /// (Not `--key`: that global flag is the operator's private key.)
        #[arg(long)]
        audit_key: Option<String>,
    },
    /// Write the trail (records and signed heads) as JSON lines.
    Export {
        /// Output file, or `-` for stdout.
        #[arg(long)]
        out: PathBuf,
        /// First sequence number.
        #[arg(long, default_value_t = 1)]
        from: u64,
    },
    /// Search the trail, newest first.
    Search(SearchArgs),
}

#[derive(Args, Debug, Default, Clone)]
pub struct SearchArgs {
    /// Free text, anywhere in the event (case-insensitive).
    pub text: Option<String>,
    /// Who acted (`cli:admin`, `slack:T1:U2`, `agent:web-1`; `prefix*`).
    #[arg(long)]
    pub actor: Option<String>,
    #[arg(long)]
    pub command: Option<String>,
    #[arg(long)]
    pub host: Option<String>,
    /// Job: its 12-digit short id, the full id, or 8+ characters of it.
    #[arg(long)]
    pub job: Option<String>,
    /// Event kind (repeatable), e.g. `job_submitted`, `auth_failed`.
    #[arg(long)]
    pub kind: Vec<String>,
    /// Only newer than this: a duration back from now (`2h`, `30m`) or RFC 3339 time.
    #[arg(long)]
    pub since: Option<String>,
    /// Only older than this: a duration back from now or RFC 3339 time.
    #[arg(long)]
    pub until: Option<String>,
    /// Records per page.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// Page cursor (printed at the end of a full page).
    #[arg(long)]
    pub before: Option<u64>,
    /// One JSON record per line.
    #[arg(long)]
    pub json: bool,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Reads `--key`: the key itself or a file holding it.
pub fn read_key(arg: &str) -> Result<PublicKey, Failure> {
    let text = if Path::new(arg).is_file() {
        std::fs::read_to_string(arg).map_err(|e| usage(format!("audit key {arg}: {e}")))?
    } else {
        arg.to_owned()
    };
    PublicKey::parse(text.trim()).map_err(|e| usage(format!("audit key: {e}")))
}

/// A fetched or read trail.
#[derive(Debug, Clone, Default)]
pub struct Trail {
    pub records: Vec<Record>,
    pub heads: Vec<SignedHead>,
    /// The key the controller says it signs with (empty for files).
    pub controller_key: String,
}

/// Parses exported JSON lines; a line that does not parse is reported with
/// its line number.
pub fn parse_lines(text: &str) -> Result<Trail, String> {
    let mut t = Trail::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<ExportLine>(line) {
            Ok(ExportLine::Record(r)) => t.records.push(r),
            Ok(ExportLine::Head { signed_head }) => t.heads.push(signed_head),
            Err(e) => return Err(format!("line {}: {e}", i + 1)),
        }
    }
    // Exports are in sequence order; keep what the file says so a reordered
    // file is detected, not repaired.
    Ok(t)
}

/// Fetches the trail from `from` over the `Audit/Export` stream.
pub async fn fetch(ch: Channel, from: u64) -> Result<Trail, Failure> {
    let mut c = pb::audit_client::AuditClient::new(ch);
    let mut stream = c
        .export(pb::AuditExportRequest { from_seq: from })
        .await
        .map_err(status)?
        .into_inner();
    let mut text = String::new();
    let mut key = String::new();
    while let Some(chunk) = stream.message().await.map_err(status)? {
        if !chunk.public_key.is_empty() {
            key = chunk.public_key;
        }
        for l in chunk.heads.iter().chain(chunk.records.iter()) {
            text.push_str(l);
            text.push('\n');
        }
    }
    let mut t = parse_lines(&text).map_err(|e| Failure::from(anyhow::anyhow!("{e}")))?;
    t.controller_key = key;
    Ok(t)
}

/// Verifies a trail with `key`.
/// A trail that starts after a retention prune is anchored at its signed
/// checkpoint (see `fleetcmd_core::audit::verify_options`).
pub fn verify_trail(t: &Trail, key: &PublicKey, from: Option<u64>) -> Result<Verified, Broken> {
    let opts = verify_options(t.records.first().map(|r| r.seq), &t.heads, Some(key), from)?;
    verify_chain(
        t.records.iter().cloned().map(Ok::<_, String>),
        &t.heads,
        Some(key),
        &opts,
    )
}

fn status(s: tonic::Status) -> Failure {
    Failure {
        code: 1,
        error: anyhow::anyhow!("controller: {}", s.message()),
    }
}

fn report(result: Result<Verified, Broken>) -> Result<u8, Failure> {
    match result {
        Ok(v) => {
            println!(
                "audit trail ok: records {}..{} ({}), {} signed heads, signed up to {}",
                v.first, v.last, v.records, v.heads, v.signed_up_to
            );
            if v.signed_up_to < v.last {
                println!(
                    "note: records after {} are chained but not covered by a signed head yet",
                    v.signed_up_to
                );
            }
            Ok(0)
        }
        Err(b) => Err(Failure {
            code: 1,
            error: anyhow::anyhow!("audit trail broken at record {}: {b}", b.seq()),
        }),
    }
}

pub async fn run(conn: &Conn, cmd: AuditCmd) -> Result<u8, Failure> {
    match cmd {
        AuditCmd::Verify {
            from,
            file: Some(file),
            audit_key,
        } => {
            let key = read_key(audit_key.as_deref().unwrap_or_default())?;
            let text = std::fs::read_to_string(&file)
                .map_err(|e| usage(format!("{}: {e}", file.display())))?;
            let t = parse_lines(&text).map_err(|e| Failure {
                code: 1,
                error: anyhow::anyhow!("{}: {e}", file.display()),
            })?;
            report(verify_trail(&t, &key, from))
        }
        AuditCmd::Verify {
            from,
            file: None,
            audit_key,
        } => {
            let op = operator(conn)?;
            let t = fetch(channel(conn, &op).await?, from.unwrap_or(1)).await?;
            let key = match audit_key {
                Some(k) => read_key(&k)?,
                None => {
                    eprintln!(
                        "using the audit key the controller reports; pin it with --audit-key DATA_DIR/audit/audit.pub"
                    );
                    PublicKey::parse(&t.controller_key)
                        .map_err(|e| anyhow::anyhow!("controller audit key: {e}"))?
                }
            };
            report(verify_trail(&t, &key, from))
        }
        AuditCmd::Export { out, from } => {
            let op = operator(conn)?;
            let t = fetch(channel(conn, &op).await?, from).await?;
            let mut buf = Vec::new();
            for h in &t.heads {
                serde_json::to_writer(
                    &mut buf,
                    &ExportLine::Head {
                        signed_head: h.clone(),
                    },
                )?;
                buf.push(b'\n');
            }
            for r in &t.records {
                serde_json::to_writer(&mut buf, &ExportLine::Record(r.clone()))?;
                buf.push(b'\n');
            }
            if out.as_os_str() == "-" {
                let mode = crate::term::Mode::from_conn(conn)?;
                let text = String::from_utf8(buf).map_err(|e| anyhow::anyhow!("export: {e}"))?;
                mode.stdout().write_verbatim(&mode.json(&text))?;
            } else {
                std::fs::write(&out, &buf).map_err(|e| usage(format!("{}: {e}", out.display())))?;
                eprintln!(
                    "exported {} records and {} signed heads to {}",
                    t.records.len(),
                    t.heads.len(),
                    out.display()
                );
            }
            Ok(0)
        }
        AuditCmd::Search(args) => {
            let op = operator(conn)?;
            let page = search(channel(conn, &op).await?, &args).await?;
            let mode = crate::term::Mode::from_conn(conn)?;
            let mut out = mode.stdout();
            for r in &page.0 {
                if args.json {
                    let line = serde_json::to_string(r)?;
                    out.write_verbatim(&mode.json(&line))?;
                    writeln!(out)?;
                } else {
                    writeln!(out, "{}", r.line())?;
                }
            }
            if page.1 > 0 {
                writeln!(out, "-- more: --before {}", page.1)?;
            }
            Ok(0)
        }
    }
}

/// Runs one search page: the records (newest first) and the next cursor (0 = none).
pub async fn search(ch: Channel, args: &SearchArgs) -> Result<(Vec<Record>, u64), Failure> {
    let now = now_ms();
    let t = |s: &Option<String>| -> Result<u64, Failure> {
        s.as_deref()
            .map(|s| fleetcmd_core::duration::parse_time_ms(s, now).map_err(usage))
            .transpose()
            .map(|v| v.unwrap_or(0))
    };
    let req = pb::AuditSearchRequest {
        text: args.text.clone().unwrap_or_default(),
        actor: args.actor.clone().unwrap_or_default(),
        command: args.command.clone().unwrap_or_default(),
        host: args.host.clone().unwrap_or_default(),
        job_id: args.job.clone().unwrap_or_default(),
        kinds: args.kind.clone(),
        since_ms: t(&args.since)?,
        until_ms: t(&args.until)?,
        limit: args.limit,
        before_seq: args.before.unwrap_or(0),
    };
    let resp = pb::audit_client::AuditClient::new(ch)
        .search(req)
        .await
        .map_err(status)?
        .into_inner();
    let records = resp
        .records
        .iter()
        .map(|l| match serde_json::from_str::<ExportLine>(l) {
            Ok(ExportLine::Record(r)) => Ok(r),
            Ok(ExportLine::Head { .. }) => Err(anyhow::anyhow!("search returned a head")),
            Err(e) => Err(anyhow::anyhow!("search result: {e}")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((records, resp.next_before_seq))
}
