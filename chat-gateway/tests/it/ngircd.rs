//! A real ngircd for tests: started on a free loopback port with its
//! config in a temporary directory, killed on drop. Shared by the gateway's
//! IRC tests and the workspace's docs test (`tests/tests/it/docs.rs`
//! includes this file by path), so it depends on nothing but std, tokio,
//! tempfile and rcgen.

use std::os::unix::fs::MetadataExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

const NGIRCD: &str = "/usr/sbin/ngircd";
/// The network name ngircd announces.
pub const NETWORK: &str = "test";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// A CA and a `localhost` server certificate signed by it (PEM).
pub struct TestPki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

pub fn test_pki(cn: &str) -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, cn);
    let ca = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("server key");
    let params = CertificateParams::new(vec!["localhost".to_string()]).expect("server params");
    let cert = params.signed_by(&key, &issuer).expect("server cert");
    TestPki {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// One ngircd process with its config in a temporary directory.
pub struct Ngircd {
    pub dir: tempfile::TempDir,
    conf: PathBuf,
    pub port: u16,
    pub tls_port: Option<u16>,
    child: Option<std::process::Child>,
}

impl Drop for Ngircd {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Ngircd {
    pub async fn start(tls: Option<&TestPki>) -> Ngircd {
        assert!(
            std::path::Path::new(NGIRCD).exists(),
            "{NGIRCD} not found: these tests need a real IRC server; install it with `apt-get install -y ngircd`"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        // ngircd started as root drops to `nobody`: let it reach its pid file.
        let meta = std::fs::metadata(dir.path()).expect("tempdir metadata");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod tempdir");
        let run = dir.path().join("run");
        std::fs::create_dir(&run).expect("run dir");
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o777)).expect("chmod run");
        let motd = dir.path().join("motd");
        std::fs::write(&motd, "fleetcmd test server\n").expect("motd");
        let port = free_port();
        let ids = if meta.uid() == 0 {
            // ngircd refuses to keep running as root and picks nobody anyway.
            "ServerUID = 65534\nServerGID = 65534\n".to_string()
        } else {
            format!("ServerUID = {}\nServerGID = {}\n", meta.uid(), meta.gid())
        };
        let mut conf_text = format!(
            "[Global]\nName = irc.test.local\nInfo = fleetcmd test\nListen = 127.0.0.1\n\
             Ports = {port}\nMotdFile = {motd}\nPidFile = {pid}\nNetwork = {NETWORK}\n{ids}\
             AdminInfo1 = test\nAdminInfo2 = test\nAdminEMail = test@example.invalid\n\
             [Limits]\nMaxNickLength = 30\nPingTimeout = 120\nPongTimeout = 20\n\
             MaxConnectionsIP = 0\n\
             # Our own token bucket is what the flood test measures.\nMaxPenaltyTime = 0\n\
             [Options]\nDNS = no\nIdent = no\nPAM = no\n",
            motd = motd.display(),
            pid = run.join("ngircd.pid").display(),
        );
        let mut tls_port = None;
        if let Some(pki) = tls {
            let cert = dir.path().join("cert.pem");
            let key = dir.path().join("key.pem");
            std::fs::write(&cert, &pki.cert_pem).expect("cert");
            std::fs::write(&key, &pki.key_pem).expect("key");
            let p = free_port();
            conf_text.push_str(&format!(
                "[SSL]\nCertFile = {}\nKeyFile = {}\nPorts = {p}\n",
                cert.display(),
                key.display()
            ));
            tls_port = Some(p);
        }
        let conf = dir.path().join("ngircd.conf");
        std::fs::write(&conf, conf_text).expect("conf");
        let mut n = Ngircd {
            dir,
            conf,
            port,
            tls_port,
            child: None,
        };
        n.spawn().await;
        n
    }

    pub async fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("ngircd.log")).expect("log file");
        let child = std::process::Command::new(NGIRCD)
            .arg("-n")
            .arg("-f")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {NGIRCD}: {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        for port in [Some(self.port), self.tls_port].into_iter().flatten() {
            loop {
                if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "ngircd did not listen on {port} within 10 s; log:\n{}",
                    self.log()
                );
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        }
    }

    /// Kills ngircd (SIGKILL: no goodbye to the clients) and reaps it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ngircd.log")).unwrap_or_default()
    }
}
