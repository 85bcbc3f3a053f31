//! A throwaway PostgreSQL for tests: Debian's server binaries
//! (`/usr/lib/postgresql/*/bin`), `initdb` into a temporary directory,
//! started with `pg_ctl` on a free loopback port with its unix socket in
//! that directory, password authentication (SCRAM) for one superuser
//! `fleetcmd` with a random password, and a fresh database per test.
//!
//! `initdb` refuses to run as root: as root, the cluster's directory is
//! given to the `postgres` user (created by Debian's `postgresql` package)
//! and every server command runs through `runuser -u postgres`; as anyone
//! else, as that user.
//!
//! A cluster is stopped when its `PgCluster` is dropped. `PgCluster::shared`
//! is one cluster per test process, held in a static that is never dropped:
//! a watchdog shell started with it waits on a pipe from this process and
//! stops the server and removes its directory when the pipe closes — when
//! the process exits, however it exits (a panic, `kill -9`). Under nextest
//! every test is its own process, so "shared" means per test there.
//!
//! A missing PostgreSQL fails the test with the install command; nothing
//! is skipped.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

/// What to run when the server binaries are missing.
pub const INSTALL: &str = "apt-get install --no-install-recommends postgresql (scripts/test does)";

/// The superuser the tests connect as.
pub const USER: &str = "fleetcmd";

/// A running (or stopped, between `stop` and `start_again`) test cluster.
pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    password: String,
    as_postgres: bool,
    watchdog: Mutex<Option<(Child, ChildStdin)>>,
    next_db: AtomicU32,
}

impl std::fmt::Debug for PgCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCluster")
            .field("dir", &self.dir.path())
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// A database of its own for one test.
#[derive(Debug, Clone)]
pub struct Database {
    pub name: String,
    /// `postgres://fleetcmd@127.0.0.1:PORT/NAME`, without the password
    /// (`PgCluster::password`, `PgCluster::password_file`).
    pub url: String,
}

/// The newest `/usr/lib/postgresql/VERSION/bin` that has `initdb`, or the
/// directory `FLEETCMD_PG_BIN` names.
pub fn server_bin_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("FLEETCMD_PG_BIN") {
        let dir = PathBuf::from(dir);
        return if dir.join("initdb").is_file() {
            Ok(dir)
        } else {
            Err(format!(
                "FLEETCMD_PG_BIN={}: no initdb there",
                dir.display()
            ))
        };
    }
    let root = Path::new("/usr/lib/postgresql");
    let versions = std::fs::read_dir(root).map_err(|e| {
        format!(
            "PostgreSQL server not found ({}: {e}): {INSTALL}",
            root.display()
        )
    })?;
    versions
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .max()
        .map(|(_, bin)| bin)
        .ok_or_else(|| {
            format!(
                "PostgreSQL server not found (no {}/*/bin/initdb): {INSTALL}",
                root.display()
            )
        })
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn postgres_ids() -> Result<(u32, u32), String> {
    let id = |flag: &str| -> Result<u32, String> {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .map_err(|e| format!("id {flag} postgres: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "running as root, the test PostgreSQL runs as the user postgres, which does not exist: {INSTALL}"
            ));
        }
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|e| format!("id {flag} postgres: {e}"))
    };
    Ok((id("-u")?, id("-g")?))
}

/// 16 random bytes as hex, from the kernel.
fn random_hex() -> Result<String, String> {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").map_err(|e| format!("/dev/urandom: {e}"))?,
        &mut bytes,
    )
    .map_err(|e| format!("/dev/urandom: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("free port: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("free port: {e}"))
}

fn run(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{what}: {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl PgCluster {
    /// `initdb` and start a new cluster; stopped and removed when dropped.
    pub fn start() -> Result<PgCluster, String> {
        let bin = server_bin_dir()?;
        let as_postgres = running_as_root();
        let dir = tempfile::Builder::new()
            .prefix("fleetcmd-pg-")
            .tempdir()
            .map_err(|e| format!("temporary directory: {e}"))?;
        let password = random_hex()?;
        let pwfile = dir.path().join("password");
        std::fs::write(&pwfile, format!("{password}\n"))
            .map_err(|e| format!("{}: {e}", pwfile.display()))?;
        let sock = dir.path().join("sock");
        std::fs::create_dir(&sock).map_err(|e| format!("{}: {e}", sock.display()))?;
        if as_postgres {
            let (uid, gid) = postgres_ids()?;
            for p in [dir.path(), &pwfile, &sock] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid))
                    .map_err(|e| format!("chown postgres {}: {e}", p.display()))?;
            }
        }
        let cluster = PgCluster {
            port: free_port()?,
            bin,
            password,
            as_postgres,
            watchdog: Mutex::new(None),
            next_db: AtomicU32::new(0),
            dir,
        };
        cluster.watch()?;
        let data = cluster.data_dir();
        run(
            cluster
                .server_cmd("initdb")
                .arg("--no-sync")
                .arg("-D")
                .arg(&data)
                .args([
                    "-U",
                    USER,
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--auth=scram-sha-256",
                ])
                .arg(format!("--pwfile={}", pwfile.display())),
            "initdb",
        )?;
        // Settings for a throwaway server: no fsync (a test's machine does
        // not lose power mid-test); loopback and our own socket only.
        let conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
             fsync = off\nfull_page_writes = off\nshared_buffers = 16MB\nmax_connections = 60\n",
            cluster.port,
            sock.display()
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .map_err(|e| format!("postgresql.conf: {e}"))?;
        cluster.start_again()?;
        Ok(cluster)
    }

    /// One cluster for this test process, started at first use; a failure
    /// to start fails the test with the reason (and the install command).
    pub fn shared() -> &'static PgCluster {
        static ONE: OnceLock<PgCluster> = OnceLock::new();
        ONE.get_or_init(|| PgCluster::start().unwrap_or_else(|e| panic!("test PostgreSQL: {e}")))
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A server command (`initdb`, `pg_ctl`), as `postgres` when we are root.
    fn server_cmd(&self, name: &str) -> Command {
        let program = self.bin.join(name);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        // Its own process group: a Ctrl-C meant for the test runner does
        // not stop the server under a test that is tearing down.
        cmd.process_group(0);
        cmd
    }

    /// The watchdog: stops the server and removes the directory once this
    /// process's end of its stdin closes.
    fn watch(&self) -> Result<(), String> {
        let runuser = if self.as_postgres {
            "runuser -u postgres -- "
        } else {
            ""
        };
        let script = format!(
            "read _; {runuser}\"$0\" -D \"$1\" stop -m immediate >/dev/null 2>&1; rm -rf \"$2\""
        );
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(self.bin.join("pg_ctl"))
            .arg(self.data_dir())
            .arg(self.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("watchdog: {e}"))?;
        let stdin = child.stdin.take().expect("stdin was piped");
        *self.watchdog.lock().unwrap_or_else(|p| p.into_inner()) = Some((child, stdin));
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser's password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// A file holding the password (and a newline), as a config would name.
    pub fn password_file(&self) -> PathBuf {
        self.dir.path().join("password")
    }

    /// The server's log, for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// A URL for `database` (no password in it).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{database}", self.port)
    }

    /// Runs SQL with `psql` in `database`; its output, unaligned.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String, String> {
        run(
            Command::new(self.bin.join("psql"))
                .args([
                    "-X",
                    "-q",
                    "-A",
                    "-t",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-h",
                    "127.0.0.1",
                ])
                .arg("-p")
                .arg(self.port.to_string())
                .args(["-U", USER, "-d", database, "-c", sql])
                .env("PGPASSWORD", &self.password),
            &format!("psql {database}"),
        )
    }

    /// A new empty database for one test.
    pub fn fresh_database(&self) -> Database {
        let name = format!(
            "test_{}_{}",
            std::process::id(),
            self.next_db.fetch_add(1, Ordering::Relaxed)
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("test PostgreSQL: {e}\nserver log:\n{}", self.log()));
        Database {
            url: self.url(&name),
            name,
        }
    }

    /// Stops the server (fast shutdown: clients are disconnected, what was
    /// committed stays), for tests of what happens while it is away.
    pub fn stop(&self) -> Result<(), String> {
        run(
            self.server_cmd("pg_ctl")
                .arg("-D")
                .arg(self.data_dir())
                .args(["-m", "fast", "-w", "stop"]),
            "pg_ctl stop",
        )
        .map(drop)
    }

    /// Starts the server (again) on the same port and data; returns once it
    /// accepts connections.
    pub fn start_again(&self) -> Result<(), String> {
        run(
            self.server_cmd("pg_ctl")
                .arg("-D")
                .arg(self.data_dir())
                .arg("-l")
                .arg(self.dir.path().join("log"))
                .args(["-w", "-t", "60", "start"]),
            "pg_ctl start",
        )
        .map(drop)
        .map_err(|e| format!("{e}\nserver log:\n{}", self.log()))
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = run(
            self.server_cmd("pg_ctl")
                .arg("-D")
                .arg(self.data_dir())
                .args(["-m", "immediate", "-w", "stop"]),
            "pg_ctl stop",
        );
        if let Some((mut child, stdin)) = self
            .watchdog
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            drop(stdin);
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_serves_fresh_databases_survives_a_restart_and_goes_away() {
        let cluster = PgCluster::start().expect("start");
        let a = cluster.fresh_database();
        let b = cluster.fresh_database();
        assert_ne!(a.name, b.name);
        cluster
            .psql(&a.name, "CREATE TABLE t (v int); INSERT INTO t VALUES (7)")
            .expect("write");
        // Fresh means empty: b does not see a's table.
        assert!(cluster.psql(&b.name, "SELECT v FROM t").is_err());
        // The password is required: a wrong one is refused.
        let wrong = Command::new(cluster.bin.join("psql"))
            .args(["-X", "-h", "127.0.0.1", "-p"])
            .arg(cluster.port.to_string())
            .args(["-U", USER, "-d", &a.name, "-c", "SELECT 1"])
            .env("PGPASSWORD", "wrong")
            .stdin(Stdio::null())
            .output()
            .expect("psql");
        assert!(!wrong.status.success());
        cluster.stop().expect("stop");
        assert!(cluster.psql(&a.name, "SELECT v FROM t").is_err(), "stopped");
        cluster.start_again().expect("start again");
        assert_eq!(
            cluster.psql(&a.name, "SELECT v FROM t").expect("read"),
            "7\n"
        );
        let dir = cluster.dir.path().to_owned();
        let port = cluster.port();
        drop(cluster);
        assert!(!dir.exists(), "{} removed", dir.display());
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    }

    #[test]
    fn the_watchdog_stops_the_server_when_its_pipe_closes() {
        let cluster = PgCluster::start().expect("start");
        let port = cluster.port();
        let (mut child, stdin) = cluster
            .watchdog
            .lock()
            .expect("lock")
            .take()
            .expect("watchdog");
        // What the process's exit does to the pipe.
        drop(stdin);
        child.wait().expect("watchdog ends");
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
        assert!(!cluster.dir.path().join("data").exists());
    }
}
