//! `fleetcmd init`: everything a team's fleet needs, in one directory, from
//! a few flags — the policy root key, the controller's config with its CA,
//! the operator's certificate and environment, a first signed policy already
//! in the controller's store, the gateway's config with its certificate and
//! signing key, and one join line (with its token) per host.
//!
//! The controller runs in this process for a moment, on loopback, to issue
//! the certificates, take the policy and create the tokens through the same
//! code paths as later `issue-cert`, `policy push` and `token create`.

pub mod disk;
pub mod files;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use fleetcmd_controller::keyfile::{Existing, write_private};
use fleetcmd_controller::pki::{Peer, Role};
use fleetcmd_core::crypto::SigningKey;
use fleetcmd_core::policy_bundle::sign_bundle;
use fleetcmd_proto::v1 as pb;

use crate::policy_cmd::{encode_sigs, keygen, sig_path};
use crate::{Failure, usage};
use files::{GATEWAY_NAME, Irc, Plan};

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Directory to write everything into: a new path, or an empty
    /// directory of yours that nobody else can write to.
    #[arg(long, default_value = "fleet")]
    pub dir: PathBuf,
    /// Where agents, operators and the gateway will reach the controller.
    #[arg(long, default_value = "https://127.0.0.1:7443")]
    pub url: String,
    /// Address the controller listens on (default: all interfaces, the
    /// URL's port; loopback when the URL names a loopback address).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// The operator (a certificate and `cli:NAME` with the admin role).
    #[arg(long, default_value = "admin")]
    pub operator: String,
    /// A host to enrol, with its labels: `web-1:role=web,env=prod`
    /// (repeatable). Each gets a one-time join token bound to its name.
    #[arg(long = "host", value_name = "NAME[:LABELS]")]
    pub hosts: Vec<String>,
    /// How long the join tokens stay valid.
    #[arg(long, default_value = "24h")]
    pub token_ttl: String,
    /// Chats the gateway serves: `console`, `irc` (comma-separated).
    #[arg(long, default_value = "console", value_delimiter = ',')]
    pub chat: Vec<String>,
    /// Chat users who get the `ops` role (every command), by their stable
    /// id, e.g. `irc:libera:alice!*@ops.example.com` (repeatable).
    #[arg(long = "chat-admin", value_name = "IDENTITY")]
    pub chat_admins: Vec<String>,
    /// IRC server `HOST[:PORT]` (port default 6697 with TLS, 6667 without).
    #[arg(long)]
    pub irc_server: Option<String>,
    /// Connect to IRC without TLS (a server on this machine or your LAN).
    #[arg(long)]
    pub irc_no_tls: bool,
    /// The IRC network's name in identities (`irc:NETWORK:nick!user@host`).
    #[arg(long, default_value = "irc")]
    pub irc_network: String,
    /// IRC channels the bot joins (repeatable).
    #[arg(long = "irc-channel", default_value = "#ops")]
    pub irc_channels: Vec<String>,
    /// The bot's IRC nick.
    #[arg(long, default_value = "fleetcmd")]
    pub irc_nick: String,
}

/// What the command line asks for, checked: every error names its flag.
fn plan(args: &InitArgs) -> Result<Plan, Failure> {
    let url = controller_url(&args.url).map_err(|e| usage(format!("--url {:?}: {e}", args.url)))?;
    let listen = match args.listen {
        Some(l) => l,
        None => {
            let ip = match url.host.parse::<std::net::IpAddr>() {
                Ok(ip) if ip.is_loopback() => ip,
                _ if url.host == "localhost" => std::net::Ipv4Addr::LOCALHOST.into(),
                _ => std::net::Ipv4Addr::UNSPECIFIED.into(),
            };
            SocketAddr::new(ip, url.port)
        }
    };
    fleetcmd_controller::pki::check_cert_name(&args.operator)
        .map_err(|e| usage(e.replace("--name", "--operator")))?;
    let mut hosts = BTreeMap::new();
    for h in &args.hosts {
        let (name, labels) = h.split_once(':').unwrap_or((h.as_str(), ""));
        fleetcmd_core::ids::AgentId::parse(name)
            .map_err(|e| usage(format!("--host {h:?}: {e}")))?;
        let labels = if labels.is_empty() {
            BTreeMap::new()
        } else {
            fleetcmd_core::selector::parse_labels(labels)
                .map_err(|e| usage(format!("--host {h:?}: labels: {e}")))?
        };
        if hosts.insert(name.to_string(), labels).is_some() {
            return Err(usage(format!("--host {name} is given twice")));
        }
    }
    let mut console = false;
    let mut irc = None;
    for chat in &args.chat {
        match chat.as_str() {
            "console" => console = true,
            "irc" => irc = Some(irc_plan(args)?),
            other => {
                return Err(usage(format!(
                    "--chat {other:?}: init writes `console` and `irc`; the other chats are \
                     commented sections of gateway.toml to fill in (docs/chat/)"
                )));
            }
        }
    }
    if irc.is_none() && args.irc_server.is_some() {
        return Err(usage("--irc-server needs --chat irc"));
    }
    for who in &args.chat_admins {
        check_chat_admin(who)?;
    }
    let tls_names = match url.host.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.is_loopback() => Vec::new(),
        _ if url.host == "localhost" => Vec::new(),
        _ => vec![url.host.clone()],
    };
    Ok(Plan {
        url: args.url.trim_end_matches('/').to_string(),
        listen,
        tls_names,
        operator: args.operator.clone(),
        chat_admins: args.chat_admins.clone(),
        console,
        irc,
        hosts,
    })
}

/// A chat admin gets every command: a well-formed identity or pattern,
/// and on IRC one that a stranger cannot take by picking a nick. A
/// `nick!user@host` is only as strong as its host part (the user part is
/// the client's word where the server runs no identd), so the host must be
/// named (`alice!*@ops.example.com`), or the IRCv3 account used
/// (`irc:libera:alice`). An outside test took `alice!*@*` by connecting as
/// alice.
fn check_chat_admin(who: &str) -> Result<(), Failure> {
    fleetcmd_core::ids::Identity::parse(who)
        .map_err(|e| usage(format!("--chat-admin {who:?}: {e}")))?;
    if let Some(rest) = who.strip_prefix("irc:")
        && let Some((_, userhost)) = rest.split_once('!')
    {
        let host = userhost.rsplit_once('@').map_or("", |(_, h)| h);
        if host.is_empty() || host.contains('*') {
            return Err(usage(format!(
                "--chat-admin {who:?}: anyone can take a nick; name the host                  (irc:NET:alice!*@ops.example.com) or use the IRCv3 account (irc:NET:alice)"
            )));
        }
    }
    Ok(())
}

/// The host and port of an `https://HOST:PORT` controller URL.
#[derive(Debug, PartialEq, Eq)]
struct ControllerUrl {
    host: String,
    port: u16,
}

fn controller_url(s: &str) -> Result<ControllerUrl, String> {
    let rest = s
        .strip_prefix("https://")
        .ok_or("must start with https:// (the controller speaks TLS only)")?;
    let rest = rest.trim_end_matches('/');
    if rest.contains(['/', '?', '#', '@']) {
        return Err("must be https://HOST:PORT, without a path or user".into());
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') => match p.parse::<u16>() {
            Ok(p) if p > 0 => (h, p),
            _ => return Err(format!("bad port {p:?}")),
        },
        _ => (rest, 7443),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let plain = host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b".-:".contains(&b));
    if host.is_empty() || !plain {
        return Err(format!("bad host {host:?}"));
    }
    Ok(ControllerUrl {
        host: host.to_string(),
        port,
    })
}

fn irc_plan(args: &InitArgs) -> Result<Irc, Failure> {
    let server = args
        .irc_server
        .as_deref()
        .ok_or_else(|| usage("--chat irc needs --irc-server HOST[:PORT]"))?;
    let tls = !args.irc_no_tls;
    let (host, port) = match server.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| usage(format!("--irc-server {server:?}: bad port {p:?}")))?,
        ),
        None => (server, if tls { 6697 } else { 6667 }),
    };
    if host.is_empty() {
        return Err(usage(format!("--irc-server {server:?}: no host")));
    }
    for c in &args.irc_channels {
        if !c.starts_with('#') || c.len() < 2 || c.contains([' ', ',', '\x07']) {
            return Err(usage(format!(
                "--irc-channel {c:?}: a channel name like #ops"
            )));
        }
    }
    Ok(Irc {
        server: host.to_string(),
        port,
        tls,
        network: args.irc_network.clone(),
        channels: args.irc_channels.clone(),
        nick: args.irc_nick.clone(),
    })
}

pub async fn run(args: InitArgs) -> Result<u8, Failure> {
    let plan = plan(&args)?;
    let token_ttl = fleetcmd_core::duration::parse_duration(&args.token_ttl)
        .map_err(|e| usage(format!("--token-ttl {:?}: {e}", args.token_ttl)))?;
    // Everything but the policy and certificates is someone's secret: the
    // controller's directory holds its CA key and database.
    disk::private_umask();
    let dir = disk::prepare_dir(
        &args.dir,
        &["admin", "controller", "operator", "gateway", "hosts"],
    )
    .map_err(|e| usage(format!("--dir {e}")))?;
    let written = write_fleet(&plan, &dir, token_ttl).await;
    if let Err(e) = written {
        // Nothing half-done: a failed init leaves no directory to trust.
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }
    print_next_steps(&plan, &dir);
    Ok(0)
}

async fn write_fleet(plan: &Plan, dir: &Path, token_ttl: Duration) -> Result<(), Failure> {
    let root = keygen(&dir.join("admin/policy-root.key"))?;
    let gateway_sign = keygen(&dir.join("gateway/sign.key"))?;
    let controller_toml = dir.join("controller/controller.toml");
    disk::write_public(
        &controller_toml,
        files::controller_toml(plan, &dir.join("controller/data"), &root.public_key()),
    )?;
    let mut config = fleetcmd_controller::config::load(&controller_toml)
        .map_err(|e| anyhow::anyhow!("the controller.toml init wrote: {e}"))?;
    // The moment's controller listens on loopback only, on any free port.
    config.listen = "127.0.0.1:0".parse().expect("a valid literal address");
    config.metrics_listen = None;
    let ctl = fleetcmd_controller::start(config.clone())
        .await
        .map_err(|e| anyhow::anyhow!("starting the controller on {}: {e}", dir.display()))?;
    let result = enrol(plan, dir, &config, &ctl, &root, &gateway_sign, token_ttl).await;
    ctl.shutdown()
        .await
        .map_err(|e| anyhow::anyhow!("stopping the controller: {e}"))?;
    result
}

async fn enrol(
    plan: &Plan,
    dir: &Path,
    config: &fleetcmd_controller::ControllerConfig,
    ctl: &fleetcmd_controller::RunningController,
    root: &SigningKey,
    gateway_sign: &SigningKey,
    token_ttl: Duration,
) -> Result<(), Failure> {
    let shared = ctl.shared();
    let ca_pem = shared.ca.cert_pem().to_owned();
    // The operator's certificate (TLS), and the Ed25519 key that signs the
    // operator's jobs, as `issue-cert` writes them.
    let op_dir = dir.join("operator");
    let op = shared
        .ca
        .issue_identity(Role::Operator, &plan.operator, config.operator_cert_ttl)?;
    write_identity(&op_dir, &plan.operator, &op, &ca_pem)?;
    let op_key = keygen(&op_dir.join(format!("{}.sign.key", plan.operator)))?;
    disk::write_public(
        &op_dir.join(format!("{}.sign.pub", plan.operator)),
        format!("{}\n", op_key.public_key()),
    )?;
    // A shell runs it, and it says where the operator's keys are.
    disk::write_secret(
        &op_dir.join(format!("{}.env", plan.operator)),
        files::operator_env(plan, &op_dir),
    )?;
    // The gateway's certificate and config.
    let gw_dir = dir.join("gateway");
    let gw = shared
        .ca
        .issue_identity(Role::Gateway, GATEWAY_NAME, config.gateway_cert_ttl)?;
    write_identity(&gw_dir, GATEWAY_NAME, &gw, &ca_pem)?;
    disk::write_public(
        &gw_dir.join("gateway.toml"),
        files::gateway_toml(plan, &root.public_key()),
    )?;
    // The first policy, signed by the root key, in the controller's store.
    let text = files::policy(plan, &gateway_sign.public_key(), &op_key.public_key());
    let policy_path = dir.join("policy.toml");
    disk::write_public(&policy_path, &text)?;
    let sig = sign_bundle(text.as_bytes(), root);
    disk::write_public(
        &sig_path(&policy_path),
        encode_sigs(std::slice::from_ref(&sig)),
    )?;
    let signed = pb::SignedPolicy {
        bundle: text.into_bytes(),
        signatures: vec![pb::PolicySignature {
            key_id: sig.key_id,
            signature: sig.signature,
        }],
    };
    let by = Peer::in_process(Role::Operator, &plan.operator);
    shared
        .push_policy(signed, &by)
        .await
        .map_err(|e| anyhow::anyhow!("the first policy: {e}"))?;
    // One join line per host, with a one-time token bound to its name.
    for (host, labels) in &plan.hosts {
        let (token, _) = shared
            .create_token(
                labels.clone(),
                token_ttl,
                1,
                Some(host.clone()),
                &format!("cli:{}", plan.operator),
            )
            .await
            .map_err(|e| anyhow::anyhow!("join token for {host}: {e}"))?;
        let line = files::join_line(plan, host, token.expose());
        disk::write_secret(&dir.join(format!("hosts/{host}.join")), format!("{line}\n"))?;
    }
    Ok(())
}

fn write_identity(
    dir: &Path,
    name: &str,
    id: &fleetcmd_controller::pki::IssuedIdentity,
    ca_pem: &str,
) -> Result<(), Failure> {
    write_private(
        &dir.join(format!("{name}.key")),
        id.key_pem.expose().as_bytes(),
        Existing::Refuse,
    )?;
    disk::write_public(&dir.join(format!("{name}.crt")), &id.cert_pem)?;
    disk::write_public(&dir.join("ca.crt"), ca_pem)?;
    Ok(())
}

fn print_next_steps(plan: &Plan, dir: &Path) {
    let d = dir.display();
    let mut hosts = String::new();
    for host in plan.hosts.keys() {
        // The file is named, not found through `hostname`: a host's name
        // there is often its FQDN, not the --host name.
        hosts.push_str(&format!(
            "     {host}: copy {d}/hosts/{host}.join there, then: sh {host}.join\n"
        ));
    }
    if hosts.is_empty() {
        hosts
            .push_str("     (no --host given: `fleetcmd token create --name HOST --labels ...`)\n");
    }
    let approval = if plan.two_approvers_possible() {
        String::new()
    } else {
        format!("\nNote: {}.\n", files::RESTART_APPROVAL_NOTE)
    };
    println!(
        "fleetcmd init: a fleet in {d}\n\
         \n\
         1. start the controller:   fleetcmd-controller -c {d}/controller/controller.toml run\n\
         2. on each host, run its join file (HOST.join) with sh, then start the agent \
         (fleetcmd-agent run):\n\
         {hosts}\
         3. start the gateway:      fleetcmd-gateway -c {d}/gateway/gateway.toml run\n\
         4. as {op}:                source {d}/operator/{op}.env && fleetcmd agents\n\
         \n\
         Keep {d}/admin/policy-root.key offline: it signs every policy.\n\
         {approval}\
         \n\
         Hosts' labels:\n{labels}",
        op = plan.operator,
        labels = files::describe_hosts(plan),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_urls() {
        let ok = |s: &str, host: &str, port: u16| {
            assert_eq!(
                controller_url(s),
                Ok(ControllerUrl {
                    host: host.into(),
                    port
                }),
                "{s}"
            );
        };
        ok("https://ctl.example.com:7443", "ctl.example.com", 7443);
        ok("https://ctl.example.com/", "ctl.example.com", 7443);
        ok("https://127.0.0.1:9000", "127.0.0.1", 9000);
        ok("https://[::1]:9000", "::1", 9000);
        for bad in [
            "http://ctl:7443",
            "ctl:7443",
            "https://ctl:0",
            "https://ctl:99999",
            "https://ctl:7443/path",
            "https://u@ctl:7443",
            "https://:7443",
            "https://c tl:7443",
        ] {
            assert!(controller_url(bad).is_err(), "{bad}");
        }
    }
}
