//! `fleetcmd certs`: revoke operator and gateway certificates (needs
//! `certs.revoke` in one of your policy roles) and list the revocations.

use clap::Subcommand;
use fleetcmd_proto::v1 as pb;

use crate::client::{channel, operator, status};
use crate::{Conn, Failure, usage};

#[derive(Subcommand, Debug)]
pub enum CertsCmd {
    /// Revoke a certificate: refused at once on every call, open streams
    /// closed. Without --serial, every certificate of that role and name
    /// issued until now (a replacement issued afterwards works).
    Revoke {
        /// `operator` or `gateway` (agents: `fleetcmd agents revoke`).
        #[arg(long)]
        role: String,
        /// The name in the certificate (`issue-cert --name`).
        #[arg(long)]
        name: String,
        /// Only this certificate (hex, as `issue-cert` prints it).
        #[arg(long)]
        serial: Option<String>,
        /// Why (recorded in the audit trail).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// List revoked operator and gateway certificates.
    Revoked,
}

pub async fn run(conn: &Conn, cmd: CertsCmd) -> Result<u8, Failure> {
    let op = operator(conn)?;
    let mut c = pb::certs_client::CertsClient::new(channel(conn, &op).await?);
    match cmd {
        CertsCmd::Revoke {
            role,
            name,
            serial,
            reason,
        } => {
            if !matches!(role.as_str(), "operator" | "gateway") {
                return Err(usage(format!(
                    "--role must be `operator` or `gateway`, got {role:?}"
                )));
            }
            let resp = c
                .revoke(pb::RevokeCertRequest {
                    role: role.clone(),
                    name: name.clone(),
                    serial: serial.clone().unwrap_or_default(),
                    reason,
                })
                .await
                .map_err(status)?
                .into_inner();
            if !resp.warning.is_empty() {
                eprintln!("warning: {}", resp.warning);
            }
            match serial {
                Some(s) => println!("{role} certificate {name} (serial {s}) revoked"),
                None => println!(
                    "every {role} certificate of {name} issued until {} revoked",
                    fleetcmd_core::when::rfc3339(resp.revoked_at.saturating_mul(1000))
                ),
            }
            Ok(0)
        }
        CertsCmd::Revoked => {
            let list = c
                .list_revoked(pb::ListRevokedCertsRequest {})
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "{:<9} {:<20} {:<34} {:<34} BY",
                "ROLE", "NAME", "SERIAL", "REVOKED"
            );
            let now = crate::client::now_ms();
            for r in list.revoked {
                let serial = if r.serial.is_empty() {
                    "(all issued before)".to_string()
                } else {
                    r.serial
                };
                println!(
                    "{:<9} {:<20} {:<34} {:<34} {}",
                    r.role,
                    r.name.escape_debug(),
                    serial,
                    fleetcmd_core::when::stamp(now, r.revoked_at.saturating_mul(1000)),
                    r.by.escape_debug()
                );
            }
            Ok(0)
        }
    }
}
