//! `controller.toml`: loaded, then validated in one pass that reports every
//! problem with its key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetcmd_core::crypto::PublicKey;
use serde::Deserialize;

use crate::audit::export::{ExportConfig, RawExport};

/// The file as written. Defaults live in `Default` below, in one place.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub listen: String,
    pub data_dir: PathBuf,
    pub tls_names: Vec<String>,
    pub policy_roots: Vec<String>,
    pub policy_threshold: usize,
    pub agent_cert_ttl: String,
    /// Default lifetime of `issue-cert --role operator` certificates.
    pub operator_cert_ttl: String,
    /// Default lifetime of `issue-cert --role gateway` certificates.
    pub gateway_cert_ttl: String,
    pub heartbeat_interval: String,
    /// Finished jobs (with their output) are deleted after this long.
    pub job_retention: String,
    /// Finished jobs are deleted, oldest first, while their stored records
    /// take more than this many bytes.
    pub job_store_max_bytes: u64,
    /// `[[audit_export]]`: continuous copies of the audit trail.
    pub audit_export: Vec<RawExport>,
    /// Audit records older than this are removed (a signed checkpoint keeps
    /// the rest verifiable); `0` keeps them forever.
    pub audit_retention: String,
    /// Bytes of the embedded database's own page cache (sled's or redb's;
    /// sled's own default is 1 GiB; recently written and read pages are
    /// also in the OS page cache).
    pub store_cache_bytes: u64,
    /// Where the controller keeps its state: `sled` (embedded, in
    /// `data_dir/db`; the default), `redb` (embedded, in
    /// `data_dir/db.redb`) or `postgres` (`postgres_url`).
    pub store: String,
    /// With `store = "postgres"`: `postgres://USER@HOST:PORT/DATABASE`
    /// (libpq's URL or key=value form; `sslmode=require` to insist on TLS).
    /// No password here: `postgres_password_file`.
    pub postgres_url: String,
    /// A file holding the database password (a trailing newline is ignored).
    pub postgres_password_file: String,
    /// PEM CA certificates for the server's TLS certificate, besides the
    /// web PKI roots.
    pub postgres_ca_file: String,
    /// `[services.NAME]`: services made of agents and one of their checks.
    pub services: std::collections::BTreeMap<String, crate::health::RawService>,
    /// `[host_alerts]`: alerts on single hosts' checks.
    pub host_alerts: Option<crate::health::config::RawHostAlerts>,
    /// Address of the Prometheus `/metrics` listener (plain HTTP); empty:
    /// no listener.
    pub metrics_listen: String,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            listen: "127.0.0.1:7443".into(),
            data_dir: "/var/lib/fleetcmd/controller".into(),
            tls_names: Vec::new(),
            policy_roots: Vec::new(),
            policy_threshold: 1,
            agent_cert_ttl: "24h".into(),
            operator_cert_ttl: "7d".into(),
            gateway_cert_ttl: "30d".into(),
            heartbeat_interval: "10s".into(),
            job_retention: "30d".into(),
            job_store_max_bytes: 10 * 1024 * 1024 * 1024,
            audit_export: Vec::new(),
            audit_retention: "0".into(),
            store_cache_bytes: crate::store::DEFAULT_CACHE_BYTES,
            store: "sled".into(),
            postgres_url: String::new(),
            postgres_password_file: String::new(),
            postgres_ca_file: String::new(),
            services: Default::default(),
            host_alerts: None,
            metrics_listen: String::new(),
        }
    }
}

/// The validated configuration the controller runs with.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub tls_names: Vec<String>,
    pub policy_roots: Vec<PublicKey>,
    pub policy_threshold: usize,
    pub agent_cert_ttl: Duration,
    pub operator_cert_ttl: Duration,
    pub gateway_cert_ttl: Duration,
    pub heartbeat_interval: Duration,
    pub job_retention: Duration,
    pub job_store_max_bytes: u64,
    pub audit_export: Vec<ExportConfig>,
    /// `None`: keep the trail forever.
    pub audit_retention: Option<Duration>,
    pub store_cache_bytes: u64,
    /// `Some`: the PostgreSQL store instead of the embedded one.
    pub postgres: Option<PostgresConfig>,
    /// The embedded store, when `postgres` is `None`.
    pub embedded: crate::store::Embedded,
    pub services: Vec<crate::health::ServiceConfig>,
    pub host_alerts: Option<crate::health::config::HostAlertsConfig>,
    /// `None`: no `/metrics` listener.
    pub metrics_listen: Option<SocketAddr>,
}

/// The PostgreSQL store's settings; the files are read at start.
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    pub url: String,
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
}

impl PostgresConfig {
    /// The store's options, with the password and CA files read.
    pub fn options(&self) -> Result<crate::store::postgres::PostgresOptions, String> {
        let read = |key: &str, path: &Path| {
            std::fs::read_to_string(path).map_err(|e| format!("{key} {}: {e}", path.display()))
        };
        Ok(crate::store::postgres::PostgresOptions {
            url: self.url.clone(),
            password: self
                .password_file
                .as_deref()
                .map(|p| read("postgres_password_file", p))
                .transpose()?
                .map(|pw| pw.trim_end_matches(['\n', '\r']).to_owned()),
            ca_pem: self
                .ca_file
                .as_deref()
                .map(|p| read("postgres_ca_file", p))
                .transpose()?,
        })
    }
}

/// The store settings' problems, each with its key.
fn validate_store(
    raw: &RawConfig,
    problems: &mut Vec<String>,
) -> (crate::store::Embedded, Option<PostgresConfig>) {
    use crate::store::Embedded;
    let file = |key: &str, v: &str, problems: &mut Vec<String>| -> Option<PathBuf> {
        if v.is_empty() {
            return None;
        }
        if let Err(e) = std::fs::metadata(v) {
            problems.push(format!("{key}: {v}: {e}"));
        }
        Some(PathBuf::from(v))
    };
    let embedded = match raw.store.as_str() {
        "sled" => Embedded::Sled,
        "redb" => Embedded::Redb,
        _ => Embedded::default(),
    };
    let pg = match raw.store.as_str() {
        "sled" | "redb" => {
            for (key, v) in [
                ("postgres_url", &raw.postgres_url),
                ("postgres_password_file", &raw.postgres_password_file),
                ("postgres_ca_file", &raw.postgres_ca_file),
            ] {
                if !v.is_empty() {
                    problems.push(format!("{key}: only with store = \"postgres\""));
                }
            }
            None
        }
        "postgres" => {
            if raw.postgres_url.is_empty() {
                problems.push("postgres_url: required with store = \"postgres\"".into());
            } else {
                // Never echo the URL: it may hold a password after all.
                match raw.postgres_url.parse::<tokio_postgres::Config>() {
                    Err(e) => problems.push(format!(
                        "postgres_url: not a PostgreSQL URL: {}",
                        crate::store::postgres::describe(&e)
                    )),
                    Ok(c) if c.get_password().is_some() => problems.push(
                        "postgres_url: holds a password; put it in postgres_password_file".into(),
                    ),
                    Ok(_) => {}
                }
            }
            Some(PostgresConfig {
                url: raw.postgres_url.clone(),
                password_file: file(
                    "postgres_password_file",
                    &raw.postgres_password_file,
                    problems,
                ),
                ca_file: file("postgres_ca_file", &raw.postgres_ca_file, problems),
            })
        }
        other => {
            problems.push(format!(
                "store: must be \"sled\", \"redb\" or \"postgres\", got {other:?}"
            ));
            None
        }
    };
    (embedded, pg)
}

/// Every problem found in a configuration file.
#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.iter().map(|p| format!("{}: {p}", .file)).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    pub file: String,
    pub problems: Vec<String>,
}

impl RawConfig {
    pub fn validate(&self, file: &str) -> Result<ControllerConfig, ConfigError> {
        let mut problems = Vec::new();
        let listen = self
            .listen
            .parse::<SocketAddr>()
            .map_err(|e| problems.push(format!("listen: {:?} is not an address: {e}", self.listen)))
            .ok();
        let mut roots = Vec::new();
        for (i, r) in self.policy_roots.iter().enumerate() {
            match PublicKey::parse(r) {
                Ok(k) => roots.push(k),
                Err(e) => problems.push(format!("policy_roots[{i}]: {e}")),
            }
        }
        if self.policy_roots.is_empty() {
            problems.push(
                "policy_roots: at least one policy root key is required (`fleetcmd policy keygen`)"
                    .into(),
            );
        }
        if self.policy_threshold == 0 || self.policy_threshold > self.policy_roots.len().max(1) {
            problems.push(format!(
                "policy_threshold: must be between 1 and the number of policy_roots ({}), got {}",
                self.policy_roots.len(),
                self.policy_threshold
            ));
        }
        let mut duration = |key: &str, v: &str, min: Duration, max: Duration| -> Duration {
            match fleetcmd_core::duration::parse_duration(v) {
                Ok(d) if d >= min && d <= max => d,
                Ok(_) => {
                    problems.push(format!("{key}: {v:?} must be between {min:?} and {max:?}"));
                    min
                }
                Err(e) => {
                    problems.push(format!("{key}: {e}"));
                    min
                }
            }
        };
        let agent_cert_ttl = duration(
            "agent_cert_ttl",
            &self.agent_cert_ttl,
            Duration::from_secs(3),
            Duration::from_secs(90 * 86400),
        );
        // Operator and gateway certificates are not renewed automatically;
        // revocation cuts one off at once, the lifetime bounds a stolen one
        // nobody noticed.
        let operator_cert_ttl = duration(
            "operator_cert_ttl",
            &self.operator_cert_ttl,
            Duration::from_secs(60),
            Duration::from_secs(365 * 86400),
        );
        let gateway_cert_ttl = duration(
            "gateway_cert_ttl",
            &self.gateway_cert_ttl,
            Duration::from_secs(60),
            Duration::from_secs(365 * 86400),
        );
        let heartbeat_interval = duration(
            "heartbeat_interval",
            &self.heartbeat_interval,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        );
        let job_retention = duration(
            "job_retention",
            &self.job_retention,
            Duration::from_secs(1),
            Duration::from_secs(10 * 365 * 86400),
        );
        if self.job_store_max_bytes < 1024 * 1024 {
            problems.push(format!(
                "job_store_max_bytes: must be at least 1048576 (1 MiB), got {}",
                self.job_store_max_bytes
            ));
        }
        if self.store_cache_bytes < 1024 * 1024 {
            problems.push(format!(
                "store_cache_bytes: must be at least 1048576 (1 MiB), got {}",
                self.store_cache_bytes
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            problems.push("data_dir: must not be empty".into());
        }
        let audit_retention = match fleetcmd_core::duration::parse_duration(&self.audit_retention) {
            Ok(d) if d.is_zero() => None,
            Ok(d) if d >= Duration::from_secs(3600) => Some(d),
            Ok(_) => {
                problems.push(format!(
                    "audit_retention: {:?} must be 0 (forever) or at least 1h",
                    self.audit_retention
                ));
                None
            }
            Err(e) => {
                problems.push(format!("audit_retention: {e}"));
                None
            }
        };
        let metrics_listen = match self.metrics_listen.trim() {
            "" => None,
            addr => addr
                .parse::<SocketAddr>()
                .map_err(|e| {
                    problems.push(format!(
                        "metrics_listen: {addr:?} is not an address (e.g. \"127.0.0.1:9464\", or empty for none): {e}"
                    ))
                })
                .ok(),
        };
        let (embedded, postgres) = validate_store(self, &mut problems);
        let mut names = std::collections::BTreeSet::new();
        let mut audit_export = Vec::new();
        for (i, e) in self.audit_export.iter().enumerate() {
            let at = format!("audit_export[{i}]");
            if !names.insert(e.name.as_str()) {
                problems.push(format!("{at}.name: {:?} is used twice", e.name));
            }
            match e.validate(&at) {
                Ok(c) => audit_export.push(c),
                Err(p) => problems.extend(p),
            }
        }
        let services = crate::health::config::validate(&self.services)
            .map_err(|p| problems.extend(p))
            .unwrap_or_default();
        let host_alerts = self.host_alerts.as_ref().and_then(|h| {
            crate::health::config::validate_host_alerts(h)
                .map_err(|p| problems.extend(p))
                .ok()
        });
        match (listen, problems.is_empty()) {
            (Some(listen), true) => Ok(ControllerConfig {
                listen,
                data_dir: self.data_dir.clone(),
                tls_names: self.tls_names.clone(),
                policy_roots: roots,
                policy_threshold: self.policy_threshold,
                agent_cert_ttl,
                operator_cert_ttl,
                gateway_cert_ttl,
                heartbeat_interval,
                job_retention,
                job_store_max_bytes: self.job_store_max_bytes,
                audit_export,
                audit_retention,
                store_cache_bytes: self.store_cache_bytes,
                postgres,
                embedded,
                services,
                host_alerts,
                metrics_listen,
            }),
            _ => Err(ConfigError {
                file: file.to_owned(),
                problems,
            }),
        }
    }
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<ControllerConfig, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        problems: vec![e.to_string()],
    })?;
    let raw: RawConfig = toml::from_str(&text).map_err(|e| ConfigError {
        file: file.clone(),
        problems: vec![e.to_string().trim_end().to_string()],
    })?;
    raw.validate(&file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let raw: RawConfig = toml::from_str(
            "listen = \"nope\"\nagent_cert_ttl = \"forever\"\npolicy_roots = [\"ed25519:xx\"]\nmetrics_listen = \"localhost\"\n",
        )
        .expect("toml");
        let err = raw.validate("c.toml").expect_err("invalid");
        let text = err.to_string();
        for key in [
            "c.toml: listen:",
            "c.toml: agent_cert_ttl:",
            "c.toml: policy_roots[0]:",
            "c.toml: metrics_listen:",
        ] {
            assert!(text.contains(key), "{key} missing from:\n{text}");
        }
    }

    #[test]
    fn store_settings_are_checked_with_their_keys() {
        let pw = tempfile::NamedTempFile::new().expect("password file");
        let pw = pw.path().display().to_string();
        // (settings, the problem expected; "" for none about the store)
        let cases = [
            ("", ""),
            (
                "store = \"mysql\"",
                "store: must be \"sled\", \"redb\" or \"postgres\", got \"mysql\"",
            ),
            (
                "store = \"postgres\"",
                "postgres_url: required with store = \"postgres\"",
            ),
            (
                "store = \"postgres\"\npostgres_url = \"postgres://fc:s3cret@db/fleet\"",
                "postgres_url: holds a password; put it in postgres_password_file",
            ),
            (
                "store = \"postgres\"\npostgres_url = \"postgres://fc@db:port/fleet\"",
                "postgres_url: not a PostgreSQL URL",
            ),
            (
                "store = \"postgres\"\npostgres_url = \"postgres://fc@db/fleet\"\npostgres_password_file = \"/nonexistent/pw\"",
                "postgres_password_file: /nonexistent/pw:",
            ),
            (
                "postgres_url = \"postgres://fc@db/fleet\"",
                "postgres_url: only with store = \"postgres\"",
            ),
            ("store = \"redb\"", ""),
            (
                "store = \"redb\"\npostgres_url = \"postgres://fc@db/fleet\"",
                "postgres_url: only with store = \"postgres\"",
            ),
            (
                &format!(
                    "store = \"postgres\"\npostgres_url = \"postgres://fc@db/fleet\"\npostgres_password_file = {pw:?}"
                ),
                "",
            ),
        ];
        for (settings, want) in cases {
            let raw: RawConfig = toml::from_str(settings).expect("toml");
            // No policy root: validation always fails, listing every problem.
            let text = raw
                .validate("c.toml")
                .expect_err("no policy roots")
                .to_string();
            let store_problems: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("c.toml: store") || l.starts_with("c.toml: postgres"))
                .collect();
            if want.is_empty() {
                assert!(store_problems.is_empty(), "{settings}: {store_problems:?}");
            } else {
                assert_eq!(store_problems.len(), 1, "{settings}: {text}");
                assert!(store_problems[0].contains(want), "{settings}: {text}");
            }
            assert!(!text.contains("s3cret"), "no password echoed: {text}");
        }
        for (settings, want) in [
            ("", crate::store::Embedded::Sled),
            ("store = \"sled\"", crate::store::Embedded::Sled),
            ("store = \"redb\"", crate::store::Embedded::Redb),
        ] {
            let raw: RawConfig = toml::from_str(settings).expect("toml");
            let mut problems = Vec::new();
            let (embedded, pg) = validate_store(&raw, &mut problems);
            assert_eq!((embedded, pg.is_none()), (want, true), "{settings}");
            assert!(problems.is_empty(), "{settings}: {problems:?}");
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err =
            toml::from_str::<RawConfig>("lisen = \"127.0.0.1:1\"\n").expect_err("unknown key");
        assert!(err.to_string().contains("lisen"), "{err}");
    }
}
