//! `fleetcmd health`: the services of controller.toml (state, instances, recent
//! changes) and silencing their alerts, over the controller's `Health`
//! service with the operator certificate.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Subcommand;
use fleetcmd_proto::v1 as pb;

use crate::client::{channel, operator, status};
use crate::{Conn, Failure, usage};

#[derive(Subcommand)]
pub enum HealthCmd {
    /// Silence a service's alerts (chat messages and pages) for a while.
    Silence {
        service: String,
        /// How long, e.g. `30m`, `2h`; `off` lifts the silence.
        duration: String,
        /// Why (recorded in the audit trail).
        #[arg(long, default_value = "")]
        reason: String,
    },
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Lists services (worst first) or shows one. Exit status 0 when every
/// listed service is ok, 2 when one is not (for scripts and monitoring).
pub async fn show(conn: &Conn, service: Option<&str>, history: u32) -> Result<u8, Failure> {
    let op = operator(conn)?;
    let mut c = pb::health_client::HealthClient::new(channel(conn, &op).await?);
    let one = service.is_some();
    let services = c
        .services(pb::ServicesRequest {
            name: service.unwrap_or_default().to_owned(),
            history: if one { history } else { 0 },
        })
        .await
        .map_err(status)?
        .into_inner()
        .services;
    let (header, table) = fleetcmd_gateway::render::health_table(&services, one, now_ms());
    let mut out = crate::term::Mode::from_conn(conn)?.stdout();
    writeln!(out, "{header}")?;
    if !table.is_empty() {
        writeln!(out, "{table}")?;
    }
    Ok(if services.iter().all(|s| s.state == "ok") {
        0
    } else {
        2
    })
}

pub async fn run(conn: &Conn, cmd: HealthCmd) -> Result<u8, Failure> {
    let HealthCmd::Silence {
        service,
        duration,
        reason,
    } = cmd;
    let secs = if duration == "off" {
        0
    } else {
        match fleetcmd_core::duration::parse_duration(&duration) {
            Ok(d) if !d.is_zero() => d.as_secs().max(1),
            Ok(_) => return Err(usage("silence: the duration must be above zero (or `off`)")),
            Err(e) => return Err(usage(format!("silence: {e}"))),
        }
    };
    let op = operator(conn)?;
    let mut c = pb::health_client::HealthClient::new(channel(conn, &op).await?);
    let until = c
        .silence(pb::SilenceRequest {
            service: service.clone(),
            duration_secs: secs,
            reason,
            actor: String::new(),
            channel: String::new(),
        })
        .await
        .map_err(status)?
        .into_inner()
        .until_ms;
    if until == 0 {
        println!("alerts of {service} are no longer silenced");
    } else {
        println!(
            "alerts of {service} silenced for {duration}, until {}",
            fleetcmd_core::when::stamp(now_ms(), until)
        );
    }
    Ok(0)
}
