//! Versioned schema migrations: numbered SQL files embedded in the binary
//! (`migrations/NNNN_name.sql`), recorded in `schema_migrations`, applied
//! at start in one transaction — all that are missing, or none. A database
//! that an newer controller migrated further than this binary knows is
//! refused: this binary would misread it.
//!
//! Controllers starting together take turns (a transaction-scoped advisory
//! lock), so each migration runs once.

use tokio_postgres::Client;

/// One numbered schema change.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order; a new one is a new file and a new line.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("migrations/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "leases",
        sql: include_str!("migrations/0002_leases.sql"),
    },
    Migration {
        version: 3,
        name: "claims",
        sql: include_str!("migrations/0003_claims.sql"),
    },
    Migration {
        version: 4,
        name: "presence",
        sql: include_str!("migrations/0004_presence.sql"),
    },
    Migration {
        version: 5,
        name: "agent_live",
        sql: include_str!("migrations/0005_agent_live.sql"),
    },
    Migration {
        version: 6,
        name: "export_cursors",
        sql: include_str!("migrations/0006_export_cursors.sql"),
    },
];

/// The advisory lock key migrations hold ("fleetcmd" in ASCII).
const LOCK_KEY: i64 = 0x666c_6565_7463_6d64;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "the database's schema is at version {found}, newer than this controller knows ({known}): run the newer controller, or point postgres_url at another database"
    )]
    TooNew { found: i32, known: i32 },
    #[error("schema migration {version} ({name}): {reason}")]
    Failed {
        version: i32,
        name: &'static str,
        reason: String,
    },
    #[error("schema_migrations: {0}")]
    Table(String),
}

fn table_err(e: tokio_postgres::Error) -> MigrateError {
    MigrateError::Table(super::describe(&e))
}

/// Applies the migrations of `migrations` the database lacks, in one
/// transaction; returns the versions applied (empty: it was current).
pub async fn apply(
    client: &mut Client,
    migrations: &[Migration],
) -> Result<Vec<i32>, MigrateError> {
    let tx = client.transaction().await.map_err(table_err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await
        .map_err(table_err)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version integer PRIMARY KEY,
             name text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(table_err)?;
    let found: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM schema_migrations",
            &[],
        )
        .await
        .map_err(table_err)?
        .get(0);
    let known = migrations.last().map_or(0, |m| m.version);
    if found > known {
        return Err(MigrateError::TooNew { found, known });
    }
    let mut applied = Vec::new();
    for m in migrations.iter().filter(|m| m.version > found) {
        let failed = |e: tokio_postgres::Error| MigrateError::Failed {
            version: m.version,
            name: m.name,
            reason: super::describe(&e),
        };
        tx.batch_execute(m.sql).await.map_err(failed)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&m.version, &m.name],
        )
        .await
        .map_err(failed)?;
        applied.push(m.version);
    }
    tx.commit().await.map_err(table_err)?;
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_count_up_from_one_and_match_their_files() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1, "{}", m.name);
            assert!(!m.sql.trim().is_empty(), "{}", m.name);
        }
        // The file names carry the same numbers (include_str! above).
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store/postgres/migrations");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .expect("migrations dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        let want: Vec<String> = MIGRATIONS
            .iter()
            .map(|m| format!("{:04}_{}.sql", m.version, m.name))
            .collect();
        assert_eq!(files, want, "every file is listed in MIGRATIONS, in order");
    }
}
