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
//! Not here yet: a connection pool (one connection serves every call).

mod conn;
pub mod migrate;

use std::sync::Arc;

use tokio_postgres::types::Json;

use fleetcmd_core::audit::{Record, SignedHead};
use fleetcmd_core::state::JobState;

use super::{
    AgentRecord, AgentStore, AuditDim, AuditIndexEntry, AuditStore, HealthRecord, HealthStore,
    HealthTransition, JobClash, JobQuery, JobRecord, JobStore, Order, PolicyRecord, PolicyStore,
    RevocationStore, Store, StoreError, TargetRecord, TargetWrite, TokenRecord, TokenRefusal,
    TokenStore,
};
use crate::revocation::CertRevocation;
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

/// How to connect as `opts` says, under `application` (what
/// `pg_stat_activity` shows): the parsed config, its TLS setup and the
/// target for messages (host, port, database).
pub(crate) fn connect_config(
    opts: &PostgresOptions,
    application: &str,
) -> Result<
    (
        tokio_postgres::Config,
        tokio_postgres_rustls::MakeRustlsConnect,
        String,
    ),
    StoreError,
> {
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
    config.application_name(application);
    let target = target_of(&config);
    Ok((config, tls(opts.ca_pem.as_deref())?, target))
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

/// Parameters, boxed so they can move to the store's runtime.
macro_rules! params {
    ($($p:expr),* $(,)?) => {
        vec![$(Box::new($p) as Box<dyn tokio_postgres::types::ToSql + Send + Sync>),*]
    };
}

// After `params!`, which it uses.
mod claims;
mod leases;
mod presence;

/// Statement parameters, boxed so they can move to the store's runtime.
type Params = Vec<Box<dyn tokio_postgres::types::ToSql + Send + Sync>>;

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
        let (config, tls, target) = connect_config(opts, "fleetcmd-controller")?;
        let bridge = Bridge::new(config, tls, target.clone())?;
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
    fn execute(&self, sql: &'static str, params: Params) -> Result<u64, StoreError> {
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
        params: Params,
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        self.bridge.call(move |conn| async move {
            let client = conn.session().await?;
            let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                params.iter().map(|p| p.as_ref() as _).collect();
            client.query(sql, &refs).await.map_err(|e| conn.error(&e))
        })
    }

    /// The `record` column of every row.
    fn records<T>(&self, sql: &'static str, params: Params) -> Result<Vec<T>, StoreError>
    where
        T: serde::de::DeserializeOwned + std::fmt::Debug,
    {
        Ok(self
            .query(sql, params)?
            .iter()
            .map(|r| r.get::<_, Json<T>>("record").0)
            .collect())
    }

    fn record<T>(&self, sql: &'static str, params: Params) -> Result<Option<T>, StoreError>
    where
        T: serde::de::DeserializeOwned + std::fmt::Debug,
    {
        Ok(self.records(sql, params)?.pop())
    }
}

fn dim_name(dim: AuditDim) -> &'static str {
    match dim {
        AuditDim::Actor => "actor",
        AuditDim::Host => "host",
        AuditDim::Command => "command",
        AuditDim::Job => "job",
        AuditDim::Kind => "kind",
    }
}

/// A bound for a range query: `u64::MAX` (no bound) as the largest bigint.
fn bound(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The states a `JobQuery.finished` filter admits.
fn states_where_finished(finished: bool) -> Vec<String> {
    JobState::ALL
        .into_iter()
        .filter(|s| s.is_terminal() == finished)
        .map(|s| s.as_str().to_owned())
        .collect()
}

/// Audit index entries as columns for `unnest`: dims, values, times, seqs.
type IndexColumns = (Vec<&'static str>, Vec<String>, Vec<i64>, Vec<i64>);

fn index_columns(index: &[AuditIndexEntry]) -> Result<IndexColumns, StoreError> {
    let mut cols = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for e in index {
        cols.0.push(dim_name(e.dim));
        cols.1.push(e.value.clone());
        cols.2.push(int(e.time_ms, "audit time")?);
        cols.3.push(int(e.seq, "audit seq")?);
    }
    Ok(cols)
}

const INSERT_INDEX: &str = "INSERT INTO audit_index (dim, value, time_ms, seq)
     SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])
     ON CONFLICT DO NOTHING";

/// Target records as columns for `unnest`; the last record of an agent
/// wins, as with single writes (one statement may not change a row twice).
type TargetColumns = (
    Vec<String>,
    Vec<&'static str>,
    Vec<Option<Vec<u8>>>,
    Vec<String>,
    Vec<i64>,
);

fn target_columns(recs: &[(&str, &TargetRecord)]) -> Result<TargetColumns, StoreError> {
    let last: std::collections::BTreeMap<&str, &TargetRecord> =
        recs.iter().map(|(a, r)| (*a, *r)).collect();
    let mut cols: TargetColumns = Default::default();
    for (agent, rec) in last {
        cols.0.push(agent.to_owned());
        cols.1.push(rec.state.as_str());
        cols.2.push(rec.result.clone());
        cols.3.push(rec.reason.clone());
        cols.4.push(int(rec.dispatched_at, "dispatch time")?);
    }
    Ok(cols)
}

/// Writes the targets of `target_columns` ($2..$6) of job $1.
macro_rules! upsert_targets {
    () => {
        "INSERT INTO targets (job_id, agent, state, result, reason, dispatched_at)
     SELECT $1, a, s, r, re, d
     FROM unnest($2::text[], $3::text[], $4::bytea[], $5::text[], $6::bigint[])
       AS t(a, s, r, re, d)
     ON CONFLICT (job_id, agent) DO UPDATE SET state = EXCLUDED.state,
       result = EXCLUDED.result, reason = EXCLUDED.reason,
       dispatched_at = EXCLUDED.dispatched_at"
    };
}

const UPSERT_TARGETS: &str = upsert_targets!();

/// `UPSERT_TARGETS` only where the target is pending (no row, or a
/// `pending` one: $7); returns the agents written.
const CLAIM_PENDING_TARGETS: &str = concat!(
    upsert_targets!(),
    "
     WHERE targets.state = $7
     RETURNING agent"
);

/// Rewrites targets whose stored state is $7; returns the agents written.
const UPDATE_TARGETS_FROM: &str = "UPDATE targets SET state = t.s, result = t.r,
       reason = t.re, dispatched_at = t.d
     FROM unnest($2::text[], $3::text[], $4::bytea[], $5::text[], $6::bigint[])
       AS t(a, s, r, re, d)
     WHERE targets.job_id = $1 AND targets.agent = t.a AND targets.state = $7
     RETURNING targets.agent";

const UPSERT_JOB: &str = "INSERT INTO jobs (id, created_at_ms, state, requester, command, record)
     VALUES ($1, $2, $3, $4, $5, $6)
     ON CONFLICT (id) DO UPDATE SET created_at_ms = EXCLUDED.created_at_ms,
       state = EXCLUDED.state, requester = EXCLUDED.requester,
       command = EXCLUDED.command, record = EXCLUDED.record";

/// `put_targets_audited`'s columns: job, agent, state, result, reason,
/// dispatch time ($1..$6).
type WriteColumns = (
    Vec<String>,
    Vec<String>,
    Vec<&'static str>,
    Vec<Option<Vec<u8>>>,
    Vec<String>,
    Vec<i64>,
);

/// Writes targets of any jobs ($1..$6) only where the target is pending
/// (no row, or a `pending` one: $7); returns the (job, agent) written.
const CLAIM_PENDING_WRITES: &str =
    "INSERT INTO targets (job_id, agent, state, result, reason, dispatched_at)
     SELECT j, a, s, r, re, d
     FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::text[], $6::bigint[])
       AS t(j, a, s, r, re, d)
     ON CONFLICT (job_id, agent) DO UPDATE SET state = EXCLUDED.state,
       result = EXCLUDED.result, reason = EXCLUDED.reason,
       dispatched_at = EXCLUDED.dispatched_at
     WHERE targets.state = $7
     RETURNING job_id, agent";

/// Rewrites targets of any jobs ($1..$6) whose stored state is $7; returns
/// the (job, agent) written.
const UPDATE_WRITES_FROM: &str = "UPDATE targets SET state = t.s, result = t.r,
       reason = t.re, dispatched_at = t.d
     FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::text[], $6::bigint[])
       AS t(j, a, s, r, re, d)
     WHERE targets.job_id = t.j AND targets.agent = t.a AND targets.state = $7
     RETURNING targets.job_id, targets.agent";

/// The statement that writes targets whose stored state is `from`
/// (`$7`): a pending target may have no row yet.
fn targets_from_sql(from: fleetcmd_core::state::TargetState) -> &'static str {
    if from == fleetcmd_core::state::TargetState::Pending {
        CLAIM_PENDING_TARGETS
    } else {
        UPDATE_TARGETS_FROM
    }
}

/// The advisory lock key audit appends hold ("fleetaud").
const AUDIT_LOCK: i64 = 0x666c_6565_7461_7564;

/// The audit append inside `tx`: takes the audit lock (appends take
/// turns, so the check and the insert are one step even with several
/// controllers), checks that the first of `records` is next, and inserts
/// them (in sequence) and their index entries. Nothing is committed here.
async fn append_audit_in(
    tx: &tokio_postgres::Transaction<'_>,
    conn: &conn::Conn,
    records: &[(i64, Record)],
    cols: &IndexColumns,
) -> Result<(), StoreError> {
    let err = |e: tokio_postgres::Error| conn.error(&e);
    let Some((seq, _)) = records.first() else {
        return Ok(());
    };
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&AUDIT_LOCK])
        .await
        .map_err(err)?;
    let last: Option<i64> = tx
        .query_one("SELECT max(seq) FROM audit_log", &[])
        .await
        .map_err(err)?
        .get(0);
    if let Some(last) = last
        && last.checked_add(1) != Some(*seq)
    {
        return Err(StoreError::Conflict {
            what: format!("audit record {seq}"),
            reason: format!("the log ends at {last}: the next record is {}", last + 1),
        });
    }
    let seqs: Vec<i64> = records.iter().map(|(s, _)| *s).collect();
    let bodies: Vec<Json<&Record>> = records.iter().map(|(_, r)| Json(r)).collect();
    tx.execute(
        "INSERT INTO audit_log (seq, record) SELECT * FROM unnest($1::bigint[], $2::jsonb[])",
        &[&seqs, &bodies],
    )
    .await
    .map_err(err)?;
    tx.execute(INSERT_INDEX, &[&cols.0, &cols.1, &cols.2, &cols.3])
        .await
        .map_err(err)?;
    Ok(())
}

/// Under the audit lock in `tx`: the records of `events` made after the
/// stored tip (at `now_ms`) and appended. The lock first: the tip read
/// under it is the tip appended to. Returns the chain after them and the
/// records.
async fn append_at_tip_in(
    tx: &tokio_postgres::Transaction<'_>,
    conn: &conn::Conn,
    now_ms: u64,
    events: &[fleetcmd_core::audit::Event],
) -> Result<(fleetcmd_core::audit::Chain, Vec<Record>), StoreError> {
    let err = |e: tokio_postgres::Error| conn.error(&e);
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&AUDIT_LOCK])
        .await
        .map_err(err)?;
    let tip = tx
        .query_opt(
            "SELECT record FROM audit_log ORDER BY seq DESC LIMIT 1",
            &[],
        )
        .await
        .map_err(err)?
        .map(|row| row.get::<_, Json<Record>>(0).0);
    let mut chain = match &tip {
        Some(last) => fleetcmd_core::audit::Chain::after(last),
        None => fleetcmd_core::audit::Chain::genesis(),
    };
    let made = crate::audit::make_records(&mut chain, now_ms, events);
    let records: Vec<(i64, Record)> = made
        .iter()
        .map(|(r, _)| Ok((int(r.seq, "audit seq")?, r.clone())))
        .collect::<Result<_, StoreError>>()?;
    let index: Vec<AuditIndexEntry> = made.into_iter().flat_map(|(_, i)| i).collect();
    append_audit_in(tx, conn, &records, &index_columns(&index)?).await?;
    Ok((chain, records.into_iter().map(|(_, r)| r).collect()))
}

/// The audit records of a target write: made by the caller, or to be made
/// after the stored tip under the lock (`append_at_tip_in`).
enum AuditPart {
    Made(Vec<(i64, Record)>, IndexColumns),
    AtTip(u64, Vec<fleetcmd_core::audit::Event>),
}

impl PostgresStore {
    /// `Store::put_targets_audited` and its `_at_tip` form: the records
    /// and the target writes in one transaction. Returns the chain after
    /// the records made at the tip (`None` for records made by the
    /// caller).
    fn targets_audited(
        &self,
        from: fleetcmd_core::state::TargetState,
        writes: &[TargetWrite<'_>],
        audit: AuditPart,
    ) -> Result<Result<Option<fleetcmd_core::audit::Chain>, Vec<usize>>, StoreError> {
        super::check_distinct(writes)?;
        let mut cols = WriteColumns::default();
        for w in writes {
            cols.0.push(w.job.to_owned());
            cols.1.push(w.agent.to_owned());
            cols.2.push(w.rec.state.as_str());
            cols.3.push(w.rec.result.clone());
            cols.4.push(w.rec.reason.clone());
            cols.5.push(int(w.rec.dispatched_at, "dispatch time")?);
        }
        let sql = if from == fleetcmd_core::state::TargetState::Pending {
            CLAIM_PENDING_WRITES
        } else {
            UPDATE_WRITES_FROM
        };
        let from = from.as_str();
        self.bridge.call(move |conn| async move {
            let mut client = conn.session().await?;
            let err = |e: tokio_postgres::Error| conn.error(&e);
            let tx = client.transaction().await.map_err(err)?;
            // The audit lock first (in `append_audit_in`), as every append
            // takes it, then the targets' rows: targets not all written
            // roll the records back with them.
            let chain = match &audit {
                AuditPart::Made(records, index) => {
                    append_audit_in(&tx, &conn, records, index).await?;
                    None
                }
                AuditPart::AtTip(now_ms, events) => {
                    Some(append_at_tip_in(&tx, &conn, *now_ms, events).await?.0)
                }
            };
            let written: std::collections::HashSet<(String, String)> = tx
                .query(
                    sql,
                    &[&cols.0, &cols.1, &cols.2, &cols.3, &cols.4, &cols.5, &from],
                )
                .await
                .map_err(err)?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            if written.len() < cols.0.len() {
                // Dropped without commit: rolled back.
                return Ok(Err((0..cols.0.len())
                    .filter(|&i| !written.contains(&(cols.0[i].clone(), cols.1[i].clone())))
                    .collect()));
            }
            tx.commit().await.map_err(err)?;
            Ok(Ok(chain))
        })
    }
}

impl Store for PostgresStore {
    fn flush(&self) -> Result<(), StoreError> {
        // Every statement was committed (and so made durable) when it
        // returned.
        Ok(())
    }

    fn put_targets_audited(
        &self,
        from: fleetcmd_core::state::TargetState,
        writes: &[TargetWrite<'_>],
        audit: &[(Record, Vec<AuditIndexEntry>)],
    ) -> Result<Result<(), Vec<usize>>, StoreError> {
        let records: Vec<(i64, Record)> = audit
            .iter()
            .map(|(r, _)| Ok((int(r.seq, "audit seq")?, r.clone())))
            .collect::<Result<_, StoreError>>()?;
        let index: Vec<AuditIndexEntry> = audit.iter().flat_map(|(_, i)| i.clone()).collect();
        let audit = AuditPart::Made(records, index_columns(&index)?);
        Ok(self.targets_audited(from, writes, audit)?.map(drop))
    }

    fn put_targets_audited_at_tip(
        &self,
        from: fleetcmd_core::state::TargetState,
        writes: &[TargetWrite<'_>],
        now_ms: u64,
        events: &[fleetcmd_core::audit::Event],
    ) -> Result<Result<fleetcmd_core::audit::Chain, Vec<usize>>, StoreError> {
        let audit = AuditPart::AtTip(now_ms, events.to_vec());
        Ok(self
            .targets_audited(from, writes, audit)?
            .map(|chain| chain.expect("records made at the tip give the chain after them")))
    }

    fn close(&self) {
        self.bridge.close();
    }
}

impl JobStore for PostgresStore {
    fn create_job(
        &self,
        short: &str,
        rec: &JobRecord,
        targets: &[(&str, &TargetRecord)],
    ) -> Result<Result<(), JobClash>, StoreError> {
        let (short, rec) = (short.to_owned(), rec.clone());
        let created = int(rec.created_at_ms, "job creation time")?;
        let cols = target_columns(targets)?;
        self.bridge.call(move |conn| async move {
            let mut client = conn.session().await?;
            let err = |e: tokio_postgres::Error| conn.error(&e);
            let tx = client.transaction().await.map_err(err)?;
            let inserted = tx
                .execute(
                    "INSERT INTO jobs (id, created_at_ms, state, requester, command, record)
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
                    &[
                        &rec.id,
                        &created,
                        &rec.state.as_str(),
                        &rec.requester,
                        &rec.command,
                        &Json(&rec),
                    ],
                )
                .await
                .map_err(err)?;
            if inserted == 0 {
                return Ok(Err(JobClash::IdExists));
            }
            // A concurrent claim of the same short id makes this insert
            // wait for it; the select after it (a new statement, a new
            // snapshot) then sees the holder.
            let claimed = tx
                .execute(
                    "INSERT INTO job_short (short, job_id) VALUES ($1, $2)
                     ON CONFLICT (short) DO NOTHING",
                    &[&short, &rec.id],
                )
                .await
                .map_err(err)?;
            if claimed == 0 {
                let holder: Option<String> = tx
                    .query_opt("SELECT job_id FROM job_short WHERE short = $1", &[&short])
                    .await
                    .map_err(err)?
                    .map(|r| r.get(0));
                if let Some(holder) = holder.filter(|h| *h != rec.id) {
                    return Ok(Err(JobClash::ShortIdTaken { holder }));
                }
            }
            if !cols.0.is_empty() {
                tx.execute(
                    UPSERT_TARGETS,
                    &[&rec.id, &cols.0, &cols.1, &cols.2, &cols.3, &cols.4],
                )
                .await
                .map_err(err)?;
            }
            tx.commit().await.map_err(err)?;
            Ok(Ok(()))
        })
    }

    fn put_job(&self, rec: &JobRecord) -> Result<(), StoreError> {
        self.execute(
            UPSERT_JOB,
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
        self.record(
            "SELECT record FROM jobs WHERE id = $1",
            params![id.to_owned()],
        )
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

    fn list_jobs(&self, q: &JobQuery) -> Result<Vec<JobRecord>, StoreError> {
        if q.limit == 0 {
            return Ok(Vec::new());
        }
        let created_before = q
            .created_before_ms
            .map(|t| int(t, "creation time"))
            .transpose()?;
        let params = params![
            q.requester.clone(),
            q.state.map(|s| s.as_str().to_owned()),
            q.finished.map(states_where_finished),
            created_before,
            q.after.clone(),
            limit(q.limit),
        ];
        match q.order {
            Order::NewestFirst => self.records(
                "SELECT record FROM jobs
                 WHERE ($1::text IS NULL OR requester = $1)
                   AND ($2::text IS NULL OR state = $2)
                   AND ($3::text[] IS NULL OR state = ANY($3))
                   AND ($4::bigint IS NULL OR created_at_ms < $4)
                   AND ($5::text IS NULL OR id < $5)
                 ORDER BY id DESC LIMIT $6",
                params,
            ),
            Order::OldestFirst => self.records(
                "SELECT record FROM jobs
                 WHERE ($1::text IS NULL OR requester = $1)
                   AND ($2::text IS NULL OR state = $2)
                   AND ($3::text[] IS NULL OR state = ANY($3))
                   AND ($4::bigint IS NULL OR created_at_ms < $4)
                   AND ($5::text IS NULL OR id > $5)
                 ORDER BY id LIMIT $6",
                params,
            ),
        }
    }

    fn delete_job(&self, id: &str) -> Result<u64, StoreError> {
        let id = id.to_owned();
        self.bridge.call(move |conn| async move {
            let mut client = conn.session().await?;
            let err = |e: tokio_postgres::Error| conn.error(&e);
            let tx = client.transaction().await.map_err(err)?;
            // Measured as `job_bytes` measures (a row as stored), before
            // the rows go: a RETURNING row is measured unpacked.
            let freed: i64 = tx
                .query_one(
                    "SELECT ((SELECT coalesce(sum(pg_column_size(j.*)), 0) FROM jobs j
                               WHERE id = $1)
                           + (SELECT coalesce(sum(pg_column_size(t.*)), 0) FROM targets t
                               WHERE job_id = $1))::bigint",
                    &[&id],
                )
                .await
                .map_err(err)?
                .get(0);
            for sql in [
                "DELETE FROM targets WHERE job_id = $1",
                "DELETE FROM jobs WHERE id = $1",
                "DELETE FROM job_short WHERE job_id = $1",
            ] {
                tx.execute(sql, &[&id]).await.map_err(err)?;
            }
            tx.commit().await.map_err(err)?;
            uint(freed, &id)
        })
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

    fn put_target(&self, job: &str, agent: &str, rec: &TargetRecord) -> Result<(), StoreError> {
        self.put_targets(job, &[(agent, rec)])
    }

    fn put_targets(&self, job: &str, recs: &[(&str, &TargetRecord)]) -> Result<(), StoreError> {
        let (agents, states, results, reasons, dispatched) = target_columns(recs)?;
        self.execute(
            UPSERT_TARGETS,
            params![job.to_owned(), agents, states, results, reasons, dispatched],
        )
        .map(drop)
    }

    fn put_targets_if(
        &self,
        job: &str,
        from: fleetcmd_core::state::TargetState,
        recs: &[(&str, &TargetRecord)],
    ) -> Result<Vec<String>, StoreError> {
        let (agents, states, results, reasons, dispatched) = target_columns(recs)?;
        // One statement: the row lock of each target orders controllers
        // racing for it, and the state is checked under that lock.
        Ok(self
            .query(
                targets_from_sql(from),
                params![
                    job.to_owned(),
                    agents,
                    states,
                    results,
                    reasons,
                    dispatched,
                    from.as_str()
                ],
            )?
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect())
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
}

impl TokenStore for PostgresStore {
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
            "SELECT secret_hash, expires_at FROM tokens WHERE id = $1",
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
}

impl AgentStore for PostgresStore {
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
        self.record(
            "SELECT record FROM agents WHERE id = $1",
            params![id.to_owned()],
        )
    }

    fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.records("SELECT record FROM agents ORDER BY id", params![])
    }

    fn get_agents(&self, ids: &[&str]) -> Result<Vec<AgentRecord>, StoreError> {
        let ids: Vec<String> = ids.iter().map(|&id| id.to_owned()).collect();
        self.records(
            "SELECT record FROM agents WHERE id = ANY($1) ORDER BY id",
            params![ids],
        )
    }
}

impl PolicyStore for PostgresStore {
    fn put_policy(&self, rec: &PolicyRecord) -> Result<bool, StoreError> {
        // One statement: the row lock orders two pushes, and the version
        // is compared under it.
        Ok(!self
            .query(
                "INSERT INTO policy (singleton, version, record) VALUES (true, $1, $2)
                 ON CONFLICT (singleton) DO UPDATE SET version = EXCLUDED.version,
                   record = EXCLUDED.record
                 WHERE policy.version < EXCLUDED.version
                 RETURNING 1",
                params![int(rec.version, "policy version")?, Json(rec.clone())],
            )?
            .is_empty())
    }

    fn get_policy(&self) -> Result<Option<PolicyRecord>, StoreError> {
        self.record("SELECT record FROM policy", params![])
    }
}

impl AuditStore for PostgresStore {
    fn audit_append(&self, rec: &Record, index: &[AuditIndexEntry]) -> Result<(), StoreError> {
        let records = [(int(rec.seq, "audit seq")?, rec.clone())];
        let cols = index_columns(index)?;
        self.bridge.call(move |conn| async move {
            let mut client = conn.session().await?;
            let err = |e: tokio_postgres::Error| conn.error(&e);
            let tx = client.transaction().await.map_err(err)?;
            append_audit_in(&tx, &conn, &records, &cols).await?;
            tx.commit().await.map_err(err)
        })
    }

    fn audit_append_at_tip(
        &self,
        now_ms: u64,
        event: fleetcmd_core::audit::Event,
    ) -> Result<Record, StoreError> {
        self.bridge.call(move |conn| async move {
            let mut client = conn.session().await?;
            let err = |e: tokio_postgres::Error| conn.error(&e);
            let tx = client.transaction().await.map_err(err)?;
            let (_, mut made) = append_at_tip_in(&tx, &conn, now_ms, &[event]).await?;
            tx.commit().await.map_err(err)?;
            made.pop()
                .ok_or_else(|| StoreError::Backend("no audit record made".into()))
        })
    }

    fn audit_put_index(&self, index: &[AuditIndexEntry]) -> Result<(), StoreError> {
        let (dims, values, times, seqs) = index_columns(index)?;
        self.execute(INSERT_INDEX, params![dims, values, times, seqs])
            .map(drop)
    }

    fn audit_last(&self) -> Result<Option<Record>, StoreError> {
        self.record(
            "SELECT record FROM audit_log ORDER BY seq DESC LIMIT 1",
            params![],
        )
    }

    fn audit_first_seq(&self) -> Result<Option<u64>, StoreError> {
        let rows = self.query("SELECT min(seq) FROM audit_log", params![])?;
        rows.first()
            .and_then(|r| r.get::<_, Option<i64>>(0))
            .map(|s| uint(s, "audit first seq"))
            .transpose()
    }

    fn audit_get(&self, seq: u64) -> Result<Option<Record>, StoreError> {
        self.record(
            "SELECT record FROM audit_log WHERE seq = $1",
            params![bound(seq)],
        )
    }

    fn audit_records(
        &self,
        from: u64,
        to: u64,
        order: Order,
        n: usize,
    ) -> Result<Vec<Record>, StoreError> {
        let params = params![bound(from), bound(to), limit(n)];
        match order {
            Order::OldestFirst => self.records(
                "SELECT record FROM audit_log WHERE seq >= $1 AND seq < $2
                 ORDER BY seq LIMIT $3",
                params,
            ),
            Order::NewestFirst => self.records(
                "SELECT record FROM audit_log WHERE seq >= $1 AND seq < $2
                 ORDER BY seq DESC LIMIT $3",
                params,
            ),
        }
    }

    fn audit_index_page(
        &self,
        dim: AuditDim,
        value: &str,
        since_ms: u64,
        before: (u64, u64),
        n: usize,
    ) -> Result<Vec<(u64, u64)>, StoreError> {
        self.query(
            "SELECT time_ms, seq FROM audit_index
             WHERE dim = $1 AND value = $2 AND time_ms >= $3 AND (time_ms, seq) < ($4, $5)
             ORDER BY time_ms DESC, seq DESC LIMIT $6",
            params![
                dim_name(dim),
                value.to_owned(),
                bound(since_ms),
                bound(before.0),
                bound(before.1),
                limit(n),
            ],
        )?
        .iter()
        .map(|r| Ok((uint(r.get(0), "audit time")?, uint(r.get(1), "audit seq")?)))
        .collect()
    }

    fn audit_remove_through(
        &self,
        through: u64,
        _index: &[AuditIndexEntry],
    ) -> Result<(), StoreError> {
        // The index rows of the removed records are exactly those with
        // their seqs: removed by seq, whatever the caller lists.
        let through = bound(through);
        self.bridge.call(move |conn| async move {
            let mut client = conn.session().await?;
            let err = |e: tokio_postgres::Error| conn.error(&e);
            let tx = client.transaction().await.map_err(err)?;
            tx.execute("DELETE FROM audit_index WHERE seq <= $1", &[&through])
                .await
                .map_err(err)?;
            tx.execute("DELETE FROM audit_log WHERE seq <= $1", &[&through])
                .await
                .map_err(err)?;
            tx.commit().await.map_err(err)
        })
    }

    fn audit_put_head(&self, head: &SignedHead) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO audit_heads (seq, record) VALUES ($1, $2)
             ON CONFLICT (seq) DO UPDATE SET record = EXCLUDED.record",
            params![int(head.seq, "audit head seq")?, Json(head.clone())],
        )
        .map(drop)
    }

    fn audit_heads_from(&self, from: u64) -> Result<Vec<SignedHead>, StoreError> {
        self.records(
            "SELECT record FROM audit_heads WHERE seq >= $1 ORDER BY seq",
            params![bound(from)],
        )
    }

    fn audit_last_head_seq(&self) -> Result<Option<u64>, StoreError> {
        let rows = self.query("SELECT max(seq) FROM audit_heads", params![])?;
        rows.first()
            .and_then(|r| r.get::<_, Option<i64>>(0))
            .map(|s| uint(s, "audit head seq"))
            .transpose()
    }

    fn audit_remove_heads_before(&self, before: u64) -> Result<(), StoreError> {
        self.execute(
            "DELETE FROM audit_heads WHERE seq < $1",
            params![bound(before)],
        )
        .map(drop)
    }
}

impl HealthStore for PostgresStore {
    fn health_state(&self, name: &str) -> Result<Option<HealthRecord>, StoreError> {
        self.record(
            "SELECT record FROM health_state WHERE name = $1",
            params![name.to_owned()],
        )
    }

    fn put_health_state(&self, name: &str, rec: &HealthRecord) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO health_state (name, record) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET record = EXCLUDED.record",
            params![name.to_owned(), Json(rec.clone())],
        )
        .map(drop)
    }

    fn add_health_transition(
        &self,
        name: &str,
        t: &HealthTransition,
        keep: usize,
    ) -> Result<(), StoreError> {
        let (name, t) = (name.to_owned(), t.clone());
        let at = int(t.at_ms, "transition time")?;
        let keep = limit(keep);
        self.bridge.call(move |conn| async move {
            let mut client = conn.session().await?;
            let err = |e: tokio_postgres::Error| conn.error(&e);
            let tx = client.transaction().await.map_err(err)?;
            tx.execute(
                "INSERT INTO health_transitions (name, at_ms, record) VALUES ($1, $2, $3)
                 ON CONFLICT (name, at_ms) DO UPDATE SET record = EXCLUDED.record",
                &[&name, &at, &Json(&t)],
            )
            .await
            .map_err(err)?;
            tx.execute(
                "DELETE FROM health_transitions WHERE name = $1 AND at_ms NOT IN
                   (SELECT at_ms FROM health_transitions WHERE name = $1
                    ORDER BY at_ms DESC LIMIT $2)",
                &[&name, &keep],
            )
            .await
            .map_err(err)?;
            tx.commit().await.map_err(err)
        })
    }

    fn health_transitions(
        &self,
        name: &str,
        n: usize,
    ) -> Result<Vec<HealthTransition>, StoreError> {
        self.records(
            "SELECT record FROM health_transitions WHERE name = $1
             ORDER BY at_ms DESC LIMIT $2",
            params![name.to_owned(), limit(n)],
        )
    }
}

impl RevocationStore for PostgresStore {
    fn put_revocation(&self, rec: &CertRevocation) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO revocations (key, record) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET record = EXCLUDED.record",
            params![rec.key(), Json(rec.clone())],
        )
        .map(drop)
    }

    fn revocations(&self) -> Result<Vec<CertRevocation>, StoreError> {
        self.records("SELECT record FROM revocations ORDER BY key", params![])
    }
}

#[cfg(test)]
mod tests;
