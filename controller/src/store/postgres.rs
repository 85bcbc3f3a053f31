//! The PostgreSQL backend of `Store`, for several controllers sharing one
//! database. Queries run in the database (order, limits, prefixes, the
//! token and short-id checks); records keep their JSON form in a `record`
//! column beside the columns that are queried. The schema comes from
//! `migrate` at open.
//!
//! Every statement commits when it returns (PostgreSQL's default
//! `synchronous_commit`), so `flush` has nothing left to do. Operations
//! that change several rows (deleting a job) are one transaction.
//!
//! Not here yet: `tree` (audit and health still keep sled trees; they move
//! with the typed store parts), a connection pool.

mod conn;
pub mod migrate;

use std::sync::Arc;

use tokio_postgres::types::Json;

use super::{
    AgentRecord, JobRecord, PolicyRecord, Store, StoreError, TargetRecord, TokenRecord,
    TokenRefusal,
};
use conn::Bridge;

/// Where the database is and how to log in.
#[derive(Clone)]
pub struct PostgresOptions {
    /// A libpq-style URL or key=value string (`postgres://user@host/db`).
    pub url: String,
    /// The password, when it is not in the URL (read from a file).
    pub password: Option<String>,
    /// PEM CA certificates trusted for the server's TLS certificate, besides
    /// the web PKI roots (`sslmode=require` in the URL to insist on TLS).
    pub ca_pem: Option<String>,
}

impl std::fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresOptions")
            .field("url", &"<redacted>")
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("ca_pem", &self.ca_pem.is_some())
            .finish()
    }
}

/// A tokio-postgres error with its cause (the server's message, or the I/O
/// error), on one line.
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => match std::error::Error::source(e) {
            Some(src) => format!("{e}: {src}"),
            None => e.to_string(),
        },
    }
}

/// The TLS setup: rustls with the ring provider (the one crypto provider
/// of the project), web PKI roots plus the configured CA.
fn tls(ca_pem: Option<&str>) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = ca_pem {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| StoreError::Backend(format!("postgres CA certificates: {e}")))?;
        if certs.is_empty() {
            return Err(StoreError::Backend(
                "postgres CA certificates: no certificate in the PEM".into(),
            ));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| StoreError::Backend(format!("postgres CA certificate: {e}")))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StoreError::Backend(format!("postgres TLS: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Host, port and database of a config, for messages (no user, no password).
fn target_of(config: &tokio_postgres::Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{host}:{port}/{}",
        config.get_dbname().unwrap_or("(default database)")
    )
}

fn int(v: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(v)
        .map_err(|_| StoreError::Backend(format!("{what} {v} is beyond the database's range")))
}

fn uint(v: i64, key: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt {
        key: key.into(),
        reason: format!("negative value {v}"),
    })
}

fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// `prefix` as a LIKE pattern that matches exactly the ids starting with it.
fn like_prefix(prefix: &str) -> String {
    let mut p = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

fn target_from_row(row: &tokio_postgres::Row, key: &str) -> Result<TargetRecord, StoreError> {
    let state: String = row.get("state");
    Ok(TargetRecord {
        state: state
            .parse()
            .map_err(
                |e: fleetcmd_core::state::UnknownState| StoreError::Corrupt {
                    key: key.into(),
                    reason: e.to_string(),
                },
            )?,
        result: row.get("result"),
        reason: row.get("reason"),
        dispatched_at: uint(row.get("dispatched_at"), key)?,
    })
}

/// The PostgreSQL store.
pub struct PostgresStore {
    bridge: Bridge,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects and brings the schema up to date (`migrate::MIGRATIONS`).
    /// Blocks: call it through `spawn_blocking` from async code.
    pub fn open(opts: &PostgresOptions) -> Result<PostgresStore, StoreError> {
        Self::open_with(opts, migrate::MIGRATIONS)
    }

    pub(crate) fn open_with(
        opts: &PostgresOptions,
        migrations: &'static [migrate::Migration],
    ) -> Result<PostgresStore, StoreError> {
        let mut config: tokio_postgres::Config =
            opts.url
                .parse()
                .map_err(|e: tokio_postgres::Error| StoreError::Connect {
                    target: "postgres_url".into(),
                    reason: format!("not a PostgreSQL URL: {}", describe(&e)),
                })?;
        if let Some(pw) = &opts.password {
            config.password(pw.as_bytes());
        }
        config.application_name("fleetcmd-controller");
        let target = target_of(&config);
        let bridge = Bridge::new(config, tls(opts.ca_pem.as_deref())?, target.clone())?;
        bridge
            .call(move |conn| async move {
                let mut client = conn.session().await?;
                migrate::apply(&mut client, migrations)
                    .await
                    .map_err(|e| StoreError::Connect {
                        target: conn.target.clone(),
                        reason: e.to_string(),
                    })
            })
            .map_err(|e| match e {
                StoreError::Backend(reason) => StoreError::Connect {
                    target: target.clone(),
                    reason,
                },
                other => other,
            })?;
        Ok(PostgresStore { bridge })
    }

    /// Runs one statement that changes rows.
    fn execute(
        &self,
        sql: &'static str,
        params: Vec<Box<dyn tokio_postgres::types::ToSql + Send + Sync>>,
    ) -> Result<u64, StoreError> {
        self.bridge.call(move |conn| async move {
            let client = conn.session().await?;
            let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                params.iter().map(|p| p.as_ref() as _).collect();
            client.execute(sql, &refs).await.map_err(|e| conn.error(&e))
        })
    }

    /// Runs one query and returns its rows.
    fn query(
        &self,
        sql: &'static str,
        params: Vec<Box<dyn tokio_postgres::types::ToSql + Send + Sync>>,
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        self.bridge.call(move |conn| async move {
            let client = conn.session().await?;
            let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                params.iter().map(|p| p.as_ref() as _).collect();
            client.query(sql, &refs).await.map_err(|e| conn.error(&e))
        })
    }

    fn jobs(&self, sql: &'static str, n: usize) -> Result<Vec<JobRecord>, StoreError> {
        self.query(sql, vec![Box::new(limit(n))])?
            .iter()
            .map(|r| Ok(r.get::<_, Json<JobRecord>>("record").0))
            .collect()
    }
}

/// Parameters, boxed so they can move to the store's runtime.
macro_rules! params {
    ($($p:expr),* $(,)?) => {
        vec![$(Box::new($p) as Box<dyn tokio_postgres::types::ToSql + Send + Sync>),*]
    };
}

impl Store for PostgresStore {
    fn put_token(&self, id: &str, rec: &TokenRecord) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO tokens (id, secret_hash, expires_at, uses_left, record)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (id) DO UPDATE SET secret_hash = EXCLUDED.secret_hash,
               expires_at = EXCLUDED.expires_at, uses_left = EXCLUDED.uses_left,
               record = EXCLUDED.record",
            params![
                id.to_owned(),
                rec.secret_hash.clone(),
                int(rec.expires_at, "token expiry")?,
                i32::try_from(rec.uses_left).unwrap_or(i32::MAX),
                Json(rec.clone()),
            ],
        )
        .map(drop)
    }

    fn consume_token(
        &self,
        id: &str,
        secret_hash: &str,
        now: u64,
    ) -> Result<Result<TokenRecord, TokenRefusal>, StoreError> {
        let now = int(now, "time")?;
        // One statement: of two concurrent callers of a single-use token,
        // the second waits for the first's row lock and then finds none
        // left.
        let used = self.query(
            "UPDATE tokens SET uses_left = uses_left - 1
             WHERE id = $1 AND secret_hash = $2 AND expires_at >= $3 AND uses_left > 0
             RETURNING uses_left + 1 AS before, record",
            params![id.to_owned(), secret_hash.to_owned(), now],
        )?;
        if let Some(row) = used.first() {
            let mut rec = row.get::<_, Json<TokenRecord>>("record").0;
            rec.uses_left = u32::try_from(row.get::<_, i32>("before")).unwrap_or(0);
            return Ok(Ok(rec));
        }
        // Why not: read again (a concurrent use may have just used it up).
        let rows = self.query(
            "SELECT secret_hash, expires_at, uses_left FROM tokens WHERE id = $1",
            params![id.to_owned()],
        )?;
        let Some(row) = rows.first() else {
            return Ok(Err(TokenRefusal::Unknown));
        };
        // Comparing hashes, not secrets: timing reveals nothing an attacker
        // can steer.
        Ok(Err(if row.get::<_, String>("secret_hash") != secret_hash {
            TokenRefusal::Unknown
        } else if now > row.get::<_, i64>("expires_at") {
            TokenRefusal::Expired
        } else {
            TokenRefusal::Used
        }))
    }

    fn put_agent(&self, rec: &AgentRecord) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO agents (id, revoked, joined_at, record) VALUES ($1, $2, $3, $4)
             ON CONFLICT (id) DO UPDATE SET revoked = EXCLUDED.revoked,
               joined_at = EXCLUDED.joined_at, record = EXCLUDED.record",
            params![
                rec.id.clone(),
                rec.revoked,
                int(rec.joined_at, "join time")?,
                Json(rec.clone()),
            ],
        )
        .map(drop)
    }

    fn get_agent(&self, id: &str) -> Result<Option<AgentRecord>, StoreError> {
        Ok(self
            .query(
                "SELECT record FROM agents WHERE id = $1",
                params![id.to_owned()],
            )?
            .first()
            .map(|r| r.get::<_, Json<AgentRecord>>("record").0))
    }

    fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        Ok(self
            .query("SELECT record FROM agents ORDER BY id", params![])?
            .iter()
            .map(|r| r.get::<_, Json<AgentRecord>>("record").0)
            .collect())
    }

    fn put_job(&self, rec: &JobRecord) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO jobs (id, created_at_ms, state, requester, command, record)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (id) DO UPDATE SET created_at_ms = EXCLUDED.created_at_ms,
               state = EXCLUDED.state, requester = EXCLUDED.requester,
               command = EXCLUDED.command, record = EXCLUDED.record",
            params![
                rec.id.clone(),
                int(rec.created_at_ms, "job creation time")?,
                rec.state.as_str(),
                rec.requester.clone(),
                rec.command.clone(),
                Json(rec.clone()),
            ],
        )
        .map(drop)
    }

    fn get_job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        Ok(self
            .query(
                "SELECT record FROM jobs WHERE id = $1",
                params![id.to_owned()],
            )?
            .first()
            .map(|r| r.get::<_, Json<JobRecord>>("record").0))
    }

    fn claim_short_id(&self, short: &str, id: &str) -> Result<Option<String>, StoreError> {
        // Two statements, not one: a statement's snapshot would not see a
        // claim committed while its insert waited on it.
        loop {
            let inserted = self.execute(
                "INSERT INTO job_short (short, job_id) VALUES ($1, $2)
                 ON CONFLICT (short) DO NOTHING",
                params![short.to_owned(), id.to_owned()],
            )?;
            if inserted == 1 {
                return Ok(None);
            }
            match self.job_id_by_short(short)? {
                Some(holder) if holder == id => return Ok(None),
                Some(holder) => return Ok(Some(holder)),
                // Freed meanwhile (its job was deleted): claim again.
                None => continue,
            }
        }
    }

    fn job_id_by_short(&self, short: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .query(
                "SELECT job_id FROM job_short WHERE short = $1",
                params![short.to_owned()],
            )?
            .first()
            .map(|r| r.get("job_id")))
    }

    fn job_ids_with_prefix(&self, prefix: &str, n: usize) -> Result<Vec<String>, StoreError> {
        Ok(self
            .query(
                "SELECT id FROM jobs WHERE id LIKE $1 ORDER BY id LIMIT $2",
                params![like_prefix(prefix), limit(n)],
            )?
            .iter()
            .map(|r| r.get("id"))
            .collect())
    }

    fn list_jobs(&self, n: usize) -> Result<Vec<JobRecord>, StoreError> {
        self.jobs("SELECT record FROM jobs ORDER BY id DESC LIMIT $1", n)
    }

    fn put_target(&self, job: &str, agent: &str, rec: &TargetRecord) -> Result<(), StoreError> {
        self.put_targets(job, &[(agent, rec)])
    }

    fn put_targets(&self, job: &str, recs: &[(&str, &TargetRecord)]) -> Result<(), StoreError> {
        // The last record of an agent wins, as with single writes (one
        // statement may not change a row twice).
        let last: std::collections::BTreeMap<&str, &TargetRecord> =
            recs.iter().map(|(a, r)| (*a, *r)).collect();
        let mut agents = Vec::with_capacity(last.len());
        let mut states = Vec::with_capacity(last.len());
        let mut results = Vec::with_capacity(last.len());
        let mut reasons = Vec::with_capacity(last.len());
        let mut dispatched = Vec::with_capacity(last.len());
        for (agent, rec) in last {
            agents.push(agent.to_owned());
            states.push(rec.state.as_str());
            results.push(rec.result.clone());
            reasons.push(rec.reason.clone());
            dispatched.push(int(rec.dispatched_at, "dispatch time")?);
        }
        self.execute(
            "INSERT INTO targets (job_id, agent, state, result, reason, dispatched_at)
             SELECT $1, a, s, r, re, d
             FROM unnest($2::text[], $3::text[], $4::bytea[], $5::text[], $6::bigint[])
               AS t(a, s, r, re, d)
             ON CONFLICT (job_id, agent) DO UPDATE SET state = EXCLUDED.state,
               result = EXCLUDED.result, reason = EXCLUDED.reason,
               dispatched_at = EXCLUDED.dispatched_at",
            params![job.to_owned(), agents, states, results, reasons, dispatched],
        )
        .map(drop)
    }

    fn get_target(&self, job: &str, agent: &str) -> Result<Option<TargetRecord>, StoreError> {
        self.query(
            "SELECT state, result, reason, dispatched_at FROM targets
             WHERE job_id = $1 AND agent = $2",
            params![job.to_owned(), agent.to_owned()],
        )?
        .first()
        .map(|r| target_from_row(r, &format!("{job}/{agent}")))
        .transpose()
    }

    fn targets(&self, job: &str) -> Result<Vec<(String, TargetRecord)>, StoreError> {
        self.query(
            "SELECT agent, state, result, reason, dispatched_at FROM targets
             WHERE job_id = $1 ORDER BY agent",
            params![job.to_owned()],
        )?
        .iter()
        .map(|r| {
            let agent: String = r.get("agent");
            let rec = target_from_row(r, &format!("{job}/{agent}"))?;
            Ok((agent, rec))
        })
        .collect()
    }

    fn put_policy(&self, rec: &PolicyRecord) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO policy (singleton, version, record) VALUES (true, $1, $2)
             ON CONFLICT (singleton) DO UPDATE SET version = EXCLUDED.version,
               record = EXCLUDED.record",
            params![int(rec.version, "policy version")?, Json(rec.clone())],
        )
        .map(drop)
    }

    fn get_policy(&self) -> Result<Option<PolicyRecord>, StoreError> {
        Ok(self
            .query("SELECT record FROM policy", params![])?
            .first()
            .map(|r| r.get::<_, Json<PolicyRecord>>("record").0))
    }

    fn flush(&self) -> Result<(), StoreError> {
        // Every statement was committed (and so made durable) when it
        // returned.
        Ok(())
    }

    fn delete_job(&self, id: &str) -> Result<u64, StoreError> {
        let id = id.to_owned();
        self.bridge.call(move |conn| async move {
            let mut client = conn.session().await?;
            let err = |e: tokio_postgres::Error| conn.error(&e);
            let tx = client.transaction().await.map_err(err)?;
            let mut freed: i64 = 0;
            for sql in [
                "WITH d AS (DELETE FROM targets WHERE job_id = $1
                   RETURNING pg_column_size(targets.*) AS n)
                 SELECT coalesce(sum(n), 0)::bigint FROM d",
                "WITH d AS (DELETE FROM jobs WHERE id = $1
                   RETURNING pg_column_size(jobs.*) AS n)
                 SELECT coalesce(sum(n), 0)::bigint FROM d",
            ] {
                freed += tx
                    .query_one(sql, &[&id])
                    .await
                    .map_err(err)?
                    .get::<_, i64>(0);
            }
            tx.execute("DELETE FROM job_short WHERE job_id = $1", &[&id])
                .await
                .map_err(err)?;
            tx.commit().await.map_err(err)?;
            uint(freed, &id)
        })
    }

    fn oldest_jobs(&self, n: usize) -> Result<Vec<JobRecord>, StoreError> {
        self.jobs("SELECT record FROM jobs ORDER BY id LIMIT $1", n)
    }

    fn job_bytes(&self) -> Result<u64, StoreError> {
        let rows = self.query(
            "SELECT ((SELECT coalesce(sum(pg_column_size(j.*)), 0) FROM jobs j)
                   + (SELECT coalesce(sum(pg_column_size(t.*)), 0) FROM targets t))::bigint",
            params![],
        )?;
        let n: i64 = rows.first().map_or(0, |r| r.get(0));
        uint(n, "job bytes")
    }

    fn close(&self) {
        self.bridge.close();
    }

    fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Err(StoreError::Backend(format!(
            "the postgres store keeps no sled tree ({name}): the audit trail and health state need their typed store parts first"
        )))
    }
}

#[cfg(test)]
mod tests;
