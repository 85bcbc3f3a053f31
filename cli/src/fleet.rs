//! A whole fleet on this machine: controller, agents joined through real
//! tokens, operator and gateway identities, a signed example policy. Used by
//! `fleetcmd dev` and by the end-to-end tests, so the README's demo and the
//! tests exercise the same path.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use fleetcmd_agent::{AgentConfig, AgentHandle};
use fleetcmd_controller::keyfile::{Existing, write_private};
use fleetcmd_controller::pki::{Peer, Role};
use fleetcmd_controller::{ControllerConfig, RunningController};
use fleetcmd_core::crypto::{PublicKey, SigningKey};
use fleetcmd_core::policy_bundle::sign_bundle;
use fleetcmd_proto::channel::ClientTls;
use fleetcmd_proto::v1 as pb;

use crate::policy_cmd::keygen_to;

/// Name of the gateway's signer in the example policy.
pub const GATEWAY_SIGNER: &str = "gateway-dev";
/// Name of the operator's signer in the example policy.
pub const OPERATOR_SIGNER: &str = "operator-dev";
pub const OPERATOR_NAME: &str = "admin";

/// The commands every first policy starts with (`fleetcmd dev`'s and
/// `fleetcmd init`'s): they read, never change, a host.
pub const BASIC_COMMANDS: &str = r#"[commands.uptime]
description = "Load average and uptime"
argv = ["/usr/bin/uptime"]
timeout = "10s"

[commands.df]
description = "Disk usage of local file systems"
argv = ["/usr/bin/df", "-h", "-l", "-x", "tmpfs", "-x", "devtmpfs", "-x", "overlay"]
timeout = "10s"
"#;

/// The example policy of `fleetcmd dev`: `{gateway}` and `{operator}` are the
/// signers' public keys, `{version}` the version, `{basic}` the
/// [`BASIC_COMMANDS`].
pub const EXAMPLE_POLICY: &str = r#"# fleetcmd dev: example policy (the allow-list and who may use it)
version = {version}

[[signers]]
id = "gateway-dev"
public_key = "{gateway}"
may_sign = ["*"]
vouches_for = ["console:*"]    # approvals it may attest: the chat users it verifies

[[signers]]
id = "operator-dev"
public_key = "{operator}"
may_sign = ["*"]
vouches_for = ["cli:admin"]    # an operator's key vouches for that operator only

{basic}
[commands.echo]
description = "Print a text"
argv = ["/usr/bin/echo", "{text}"]
args.text = { kind = "text", max_len = 200 }
timeout = "10s"

[commands.sleep]
description = "Sleep for some seconds"
argv = ["/usr/bin/sleep", "{seconds}"]
args.seconds = { kind = "int", min = 0, max = 3600 }
timeout = "1h"

[commands.false]
description = "Exit with status 1"
argv = ["/usr/bin/false"]
timeout = "10s"

[roles.admin]
commands = ["*"]
# Beyond running commands: read and cancel every job, search and export the
# audit trail, create tokens for any labels, revoke agents and certificates.
may = ["*"]

[[bindings]]
subjects = ["console:*", "cli:*"]
roles = ["admin"]
"#;

pub fn example_policy(version: u64, gateway: &PublicKey, operator: &PublicKey) -> String {
    EXAMPLE_POLICY
        .replace("{basic}", BASIC_COMMANDS)
        .replace("{version}", &version.to_string())
        .replace("{gateway}", &gateway.to_string())
        .replace("{operator}", &operator.to_string())
}

/// What to start.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub agents: usize,
    pub heartbeat: Duration,
    pub agent_cert_ttl: Duration,
    /// Number of policy root keys (admin.key, admin-2.key, …).
    pub policy_roots: usize,
    /// Root signatures a bundle needs.
    pub policy_threshold: usize,
    /// Each agent's `max_concurrent_jobs`.
    pub agent_max_concurrent_jobs: usize,
    pub job_retention: Duration,
    pub job_store_max_bytes: u64,
    /// `[services.NAME]` of the controller.
    pub services: Vec<fleetcmd_controller::health::ServiceConfig>,
    /// `[[check]]`s of the agents, by agent name (`dev-1`, …).
    pub agent_checks: BTreeMap<String, Vec<fleetcmd_agent::checks::CheckConfig>>,
    /// The controller's `metrics_listen` (`None`: no `/metrics`).
    pub controller_metrics: Option<SocketAddr>,
    /// Agents serve their own `/metrics` on `127.0.0.1:0`.
    pub agent_metrics: bool,
    /// The controller's PostgreSQL store (`None`: the embedded one).
    pub postgres: Option<fleetcmd_controller::config::PostgresConfig>,
    /// The embedded store without `postgres` (sled by default).
    pub embedded: fleetcmd_controller::store::Embedded,
}

impl FleetOptions {
    pub fn new(data_dir: &Path) -> FleetOptions {
        FleetOptions {
            data_dir: data_dir.to_owned(),
            listen: "127.0.0.1:0".parse().expect("a valid literal address"),
            agents: 3,
            heartbeat: Duration::from_secs(10),
            agent_cert_ttl: Duration::from_secs(24 * 3600),
            policy_roots: 1,
            policy_threshold: 1,
            agent_max_concurrent_jobs: 16,
            job_retention: Duration::from_secs(30 * 86400),
            job_store_max_bytes: 10 * 1024 * 1024 * 1024,
            services: Vec::new(),
            agent_checks: BTreeMap::new(),
            controller_metrics: None,
            agent_metrics: false,
            postgres: None,
            embedded: Default::default(),
        }
    }
}

/// A running local fleet.
pub struct Fleet {
    pub dir: PathBuf,
    pub controller: RunningController,
    pub controller_config: ControllerConfig,
    pub agents: Vec<AgentHandle>,
    /// The first policy root key.
    pub admin_key: SigningKey,
    /// Further root keys (M-of-N); `push_policy` signs with as many keys as
    /// the threshold needs.
    pub more_admin_keys: Vec<SigningKey>,
    pub policy_threshold: usize,
    pub gateway_key: Arc<SigningKey>,
    pub operator_key: SigningKey,
    /// Operator TLS identity (also in DIR/operator.{crt,key}).
    pub operator_tls: ClientTls,
    pub gateway_tls: ClientTls,
    pub url: String,
    pub policy_version: u64,
    pub agent_max_concurrent_jobs: usize,
    /// Agents serve `/metrics` on loopback (`FleetOptions::agent_metrics`).
    pub agent_metrics: bool,
    /// The controllers the next started agent knows, in the order it tries
    /// them (`agent.toml`'s `controllers`); empty: only this fleet's `url`.
    pub agent_controllers: Vec<String>,
    agent_checks: BTreeMap<String, Vec<fleetcmd_agent::checks::CheckConfig>>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("dir", &self.dir)
            .field("url", &self.url)
            .finish()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Labels of dev agent number `i` (1-based): odd = web, even = db.
pub fn dev_labels(i: usize) -> BTreeMap<String, String> {
    let role = if i % 2 == 1 { "web" } else { "db" };
    BTreeMap::from([
        ("role".to_string(), role.to_string()),
        ("env".to_string(), "dev".to_string()),
    ])
}

impl Fleet {
    pub async fn start(opts: FleetOptions) -> anyhow::Result<Fleet> {
        let dir = opts.data_dir.clone();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // A dev fleet's files are its own: a restart in the same directory
        // replaces them (still never through a symlink).
        let keygen = |p: PathBuf| keygen_to(&p, Existing::Replace).map_err(|f| f.error);
        let admin_key = keygen(dir.join("admin.key"))?;
        let more_admin_keys = (2..=opts.policy_roots.max(1))
            .map(|i| keygen(dir.join(format!("admin-{i}.key"))))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let gateway_key = keygen(dir.join("gateway-sign.key"))?;
        let mut roots = vec![admin_key.public_key()];
        roots.extend(more_admin_keys.iter().map(|k| k.public_key()));
        let config = ControllerConfig {
            audit_export: Vec::new(),
            audit_retention: None,
            listen: opts.listen,
            data_dir: dir.join("controller"),
            tls_names: Vec::new(),
            policy_roots: roots,
            policy_threshold: opts.policy_threshold,
            agent_cert_ttl: opts.agent_cert_ttl,
            operator_cert_ttl: Duration::from_secs(7 * 86400),
            gateway_cert_ttl: Duration::from_secs(30 * 86400),
            heartbeat_interval: opts.heartbeat,
            job_retention: opts.job_retention,
            job_store_max_bytes: opts.job_store_max_bytes,
            store_cache_bytes: fleetcmd_controller::store::DEFAULT_CACHE_BYTES,
            postgres: opts.postgres.clone(),
            embedded: opts.embedded,
            services: opts.services.clone(),
            host_alerts: None,
            metrics_listen: opts.controller_metrics,
        };
        let controller = fleetcmd_controller::start(config.clone())
            .await
            .context("starting the controller")?;
        let url = format!("https://{}", controller.addr());
        let ca = &controller.shared().ca;
        let ca_pem = ca.cert_pem().to_owned();
        std::fs::write(dir.join("ca.crt"), &ca_pem)?;
        let ttl = Duration::from_secs(30 * 86400);
        let op = ca.issue_identity(Role::Operator, OPERATOR_NAME, ttl)?;
        write_private(
            &dir.join("operator.key"),
            op.key_pem.expose().as_bytes(),
            Existing::Replace,
        )?;
        std::fs::write(dir.join("operator.crt"), &op.cert_pem)?;
        let gw = ca.issue_identity(Role::Gateway, "dev", ttl)?;
        write_private(
            &dir.join("gateway.key"),
            gw.key_pem.expose().as_bytes(),
            Existing::Replace,
        )?;
        std::fs::write(dir.join("gateway.crt"), &gw.cert_pem)?;
        // The operator's TLS key is P-256; its jobs are signed with an
        // Ed25519 key of its own, as `issue-cert` makes them.
        let operator_key = keygen(dir.join("operator.sign.key"))?;
        let operator_tls = ClientTls {
            ca_pem: ca_pem.clone(),
            cert_pem: op.cert_pem,
            key_pem: op.key_pem.expose().clone(),
        };
        let gateway_tls = ClientTls {
            ca_pem,
            cert_pem: gw.cert_pem,
            key_pem: gw.key_pem.expose().clone(),
        };
        let mut controller_config = config;
        controller_config.listen = controller.addr();
        controller_config.metrics_listen = controller.metrics_addr();
        let mut fleet = Fleet {
            dir,
            controller,
            controller_config,
            agents: Vec::new(),
            admin_key,
            more_admin_keys,
            policy_threshold: opts.policy_threshold,
            gateway_key: Arc::new(gateway_key),
            operator_key,
            operator_tls,
            gateway_tls,
            url,
            policy_version: 0,
            agent_max_concurrent_jobs: opts.agent_max_concurrent_jobs,
            agent_metrics: opts.agent_metrics,
            agent_controllers: Vec::new(),
            agent_checks: opts.agent_checks.clone(),
        };
        let policy = example_policy(
            1,
            &fleet.gateway_key.public_key(),
            &fleet.operator_key.public_key(),
        );
        fleet.push_policy(&policy).await?;
        for i in 1..=opts.agents {
            fleet
                .add_agent(&format!("dev-{i}"), dev_labels(i), None)
                .await?;
        }
        fleet.wait_online(Duration::from_secs(20)).await?;
        Ok(fleet)
    }

    /// Signs `text` with the admin root key, writes it as DIR/policy.toml
    /// (+ .sig) and pushes it.
    pub async fn push_policy(&mut self, text: &str) -> anyhow::Result<()> {
        let path = self.dir.join("policy.toml");
        std::fs::write(&path, text)?;
        // As many root signatures as the threshold needs (M-of-N roots).
        let sigs: Vec<_> = std::iter::once(&self.admin_key)
            .chain(&self.more_admin_keys)
            .take(self.policy_threshold.max(1))
            .map(|k| sign_bundle(text.as_bytes(), k))
            .collect();
        std::fs::write(
            crate::policy_cmd::sig_path(&path),
            crate::policy_cmd::encode_sigs(&sigs),
        )?;
        let signed = pb::SignedPolicy {
            bundle: text.as_bytes().to_vec(),
            signatures: sigs
                .into_iter()
                .map(|s| pb::PolicySignature {
                    key_id: s.key_id,
                    signature: s.signature,
                })
                .collect(),
        };
        let peer = Peer::in_process(Role::Operator, OPERATOR_NAME);
        let cur = self
            .controller
            .shared()
            .push_policy(signed, &peer)
            .await
            .map_err(|e| anyhow::anyhow!("pushing the policy: {e}"))?;
        self.policy_version = cur.policy.version;
        Ok(())
    }

    /// Creates a token, joins a new agent through the real Join RPC, starts it.
    pub async fn add_agent(
        &mut self,
        name: &str,
        labels: BTreeMap<String, String>,
        allow: Option<Vec<String>>,
    ) -> anyhow::Result<()> {
        self.join_agent(name, labels).await?;
        self.start_agent(name, allow)
    }

    /// Creates a token and joins a new agent through the real Join RPC
    /// (its state directory is written; it is not started).
    pub async fn join_agent(
        &mut self,
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> anyhow::Result<()> {
        let (token, _) = self
            .controller
            .shared()
            .create_token(
                labels,
                Duration::from_secs(600),
                1,
                Some(name.to_owned()),
                OPERATOR_NAME,
            )
            .await
            .map_err(|e| anyhow::anyhow!("creating a token: {e}"))?;
        let state_dir = self.dir.join("agents").join(name);
        let opts = fleetcmd_agent::JoinOptions {
            controller: self.url.clone(),
            token: token.expose().clone(),
            name: name.to_owned(),
            state_dir: state_dir.clone(),
        };
        fleetcmd_agent::join(&opts, now())
            .await
            .with_context(|| format!("joining agent {name}"))?;
        Ok(())
    }

    /// Starts an already joined agent from its state directory.
    pub fn start_agent(&mut self, name: &str, allow: Option<Vec<String>>) -> anyhow::Result<()> {
        let controllers = if self.agent_controllers.is_empty() {
            fleetcmd_agent::controllers::Controllers::one(&self.url)
        } else {
            fleetcmd_agent::controllers::Controllers::parse("controllers", &self.agent_controllers)
        };
        let config = AgentConfig {
            controllers: controllers.map_err(|p| anyhow::anyhow!("{}", p.join("; ")))?,
            state_dir: self.dir.join("agents").join(name),
            facts: BTreeMap::new(),
            allow,
            max_output_bytes: 1024 * 1024,
            max_concurrent_jobs: self.agent_max_concurrent_jobs,
            metrics_listen: self
                .agent_metrics
                .then(|| "127.0.0.1:0".parse().expect("a valid literal address")),
            checks: self.agent_checks.get(name).cloned().unwrap_or_default(),
        };
        self.agents
            .push(fleetcmd_agent::spawn(config).with_context(|| format!("starting agent {name}"))?);
        Ok(())
    }

    /// Stops one agent (its state directory stays).
    pub async fn stop_agent(&mut self, name: &str) {
        if let Some(pos) = self.agents.iter().position(|a| a.agent_id == name) {
            self.agents.remove(pos).shutdown().await;
        }
    }

    /// Ends one agent at once, as a crash would (`AgentHandle::abort`).
    pub fn kill_agent(&mut self, name: &str) {
        if let Some(pos) = self.agents.iter().position(|a| a.agent_id == name) {
            self.agents.remove(pos).abort();
        }
    }

    /// Stops the controller, keeps it down for `downtime`, and starts it
    /// again on the same address and data directory (agents reconnect).
    pub async fn restart_controller(&mut self, downtime: Duration) -> anyhow::Result<()> {
        self.controller.stop().await?;
        tokio::time::sleep(downtime).await;
        self.controller = fleetcmd_controller::start(self.controller_config.clone())
            .await
            .context("restarting the controller")?;
        Ok(())
    }

    /// Waits until every started agent is online with the current policy.
    pub async fn wait_online(&self, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            let list = self
                .controller
                .shared()
                .registry
                .list_agents("")
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let ready = self.agents.iter().all(|h| {
                list.iter().any(|a| {
                    a.agent_id == h.agent_id && a.online && a.policy_version == self.policy_version
                })
            });
            if ready {
                return Ok(());
            }
            if start.elapsed() > limit {
                anyhow::bail!(
                    "agents not online with policy {} after {limit:?}: {list:?}",
                    self.policy_version
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `export …` lines for an operator shell.
    pub fn env_file(&self) -> String {
        format!(
            "export FLEETCMD_CONTROLLER={}\nexport FLEETCMD_CA={}\nexport FLEETCMD_CERT={}\nexport FLEETCMD_KEY={}\nexport FLEETCMD_SIGNING_KEY={}\n",
            self.url,
            self.dir.join("ca.crt").display(),
            self.dir.join("operator.crt").display(),
            self.dir.join("operator.key").display(),
            self.dir.join("operator.sign.key").display()
        )
    }

    /// Gateway options for this fleet.
    pub fn gateway_options(&self) -> fleetcmd_gateway::GatewayOptions {
        fleetcmd_gateway::GatewayOptions {
            controller_url: self.url.clone(),
            tls: self.gateway_tls.clone(),
            signing_key: self.gateway_key.clone(),
            signer_id: GATEWAY_SIGNER.into(),
            policy_roots: vec![self.admin_key.public_key()],
            policy_threshold: 1,
            bot_name: "fleetcmd".into(),
            job_expiry: Duration::from_secs(fleetcmd_core::job::DEFAULT_EXPIRY_SECS),
            poll_interval: Duration::from_millis(20),
            approval_window: fleetcmd_gateway::DEFAULT_APPROVAL_WINDOW,
        }
    }

    pub async fn shutdown(self) -> anyhow::Result<()> {
        for a in self.agents {
            a.shutdown().await;
        }
        self.controller.shutdown().await?;
        Ok(())
    }
}
