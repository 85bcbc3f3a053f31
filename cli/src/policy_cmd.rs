//! `fleetcmd policy`: check, keygen, sign, push, show.
//!
//! A signed bundle is two files: the policy TOML as written, and `FILE.sig`
//! with one `KEY_ID BASE64_SIGNATURE` line per root signature. The signature
//! covers the exact bytes of the TOML file.

use fleetcmd_controller::keyfile::Existing;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use clap::Subcommand;
use fleetcmd_core::crypto::SigningKey;
use fleetcmd_core::policy::Policy;
use fleetcmd_core::policy_bundle::{PolicySignature, sign_bundle};
use fleetcmd_proto::v1 as pb;

use crate::client::{channel, operator};
use crate::{Conn, Failure, usage};

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// Validate a policy file and print every error with its line.
    Check { file: PathBuf },
    /// Generate an admin root key (PKCS#8 PEM, mode 0600) and print its public key.
    Keygen {
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing regular file at OUT (a symlink or any other
        /// non-regular file is never replaced).
        #[arg(long)]
        force: bool,
    },
    /// Sign a policy file with a root key, writing FILE.sig.
    Sign {
        file: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
    /// Push a signed policy (FILE and FILE.sig) to the controller.
    Push { file: PathBuf },
    /// Show the controller's current policy version and hash.
    Show {
        /// Print the whole policy text too.
        #[arg(long)]
        full: bool,
    },
}

pub fn sig_path(file: &Path) -> PathBuf {
    let mut s = file.as_os_str().to_owned();
    s.push(".sig");
    PathBuf::from(s)
}

pub fn encode_sigs(sigs: &[PolicySignature]) -> String {
    sigs.iter()
        .map(|s| {
            format!(
                "{} {}\n",
                s.key_id,
                base64::engine::general_purpose::STANDARD.encode(&s.signature)
            )
        })
        .collect()
}

pub fn decode_sigs(text: &str, path: &Path) -> Result<Vec<PolicySignature>, Failure> {
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let bad = || {
            usage(format!(
                "{}:{}: expected `KEY_ID BASE64_SIGNATURE`",
                path.display(),
                i + 1
            ))
        };
        let (id, sig) = line.trim().split_once(' ').ok_or_else(bad)?;
        let sig = base64::engine::general_purpose::STANDARD
            .decode(sig.trim())
            .map_err(|_| bad())?;
        out.push(PolicySignature {
            key_id: id.to_owned(),
            signature: sig,
        });
    }
    Ok(out)
}

/// Generates an Ed25519 key and writes it to `out` (0600, atomically; an
/// existing file is kept unless `existing` says to replace a regular one).
pub fn keygen_to(out: &Path, existing: Existing) -> Result<SigningKey, Failure> {
    let pem = fleetcmd_controller::pki::new_signing_key_pem()?;
    fleetcmd_controller::keyfile::write_private(out, pem.expose().as_bytes(), existing)
        .map_err(|e| usage(e.to_string()))?;
    Ok(SigningKey::from_pkcs8_pem(pem.expose()).map_err(|e| anyhow::anyhow!("{e}"))?)
}

/// [`keygen_to`] a path that must not exist yet.
pub fn keygen(out: &Path) -> Result<SigningKey, Failure> {
    keygen_to(out, Existing::Refuse)
}

pub async fn run(conn: &Conn, cmd: PolicyCmd) -> Result<u8, Failure> {
    match cmd {
        PolicyCmd::Check { file } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| usage(format!("{}: {e}", file.display())))?;
            match Policy::parse(&text) {
                Ok(p) => {
                    println!(
                        "{}: ok (version {}, {} commands, {} roles)",
                        file.display(),
                        p.version,
                        p.commands.len(),
                        p.roles.len()
                    );
                    Ok(0)
                }
                Err(errs) => {
                    for e in &errs.0 {
                        eprintln!("{}: {e}", file.display());
                    }
                    Ok(64)
                }
            }
        }
        PolicyCmd::Keygen { out, force } => {
            let existing = if force {
                Existing::Replace
            } else {
                Existing::Refuse
            };
            let key = keygen_to(&out, existing)?;
            println!("{}", key.public_key());
            eprintln!(
                "wrote {}; its public key is above. A policy root key (keep it offline) goes into \
                 `policy_roots` of controller.toml and gateway.toml; a key that signs jobs (a gateway's \
                 `signing_key`) into a `[[signers]]` entry of the policy",
                out.display()
            );
            Ok(0)
        }
        PolicyCmd::Sign { file, key } => {
            let bytes =
                std::fs::read(&file).map_err(|e| usage(format!("{}: {e}", file.display())))?;
            let text = std::str::from_utf8(&bytes)
                .map_err(|_| usage(format!("{}: not UTF-8", file.display())))?;
            if let Err(errs) = Policy::parse(text) {
                for e in &errs.0 {
                    eprintln!("{}: {e}", file.display());
                }
                return Ok(64);
            }
            let pem = std::fs::read_to_string(&key)
                .map_err(|e| usage(format!("{}: {e}", key.display())))?;
            let key = SigningKey::from_pkcs8_pem(&pem)
                .map_err(|e| usage(format!("{}: {e}", key.display())))?;
            let out = sig_path(&file);
            std::fs::write(&out, encode_sigs(&[sign_bundle(&bytes, &key)]))?;
            println!("wrote {}", out.display());
            Ok(0)
        }
        PolicyCmd::Push { file } => {
            let bundle =
                std::fs::read(&file).map_err(|e| usage(format!("{}: {e}", file.display())))?;
            let sp = sig_path(&file);
            let sigs = std::fs::read_to_string(&sp).map_err(|e| {
                usage(format!(
                    "{}: {e} (sign with `fleetcmd policy sign`)",
                    sp.display()
                ))
            })?;
            let sigs = decode_sigs(&sigs, &sp)?;
            let op = operator(conn)?;
            let mut c = pb::policy_client::PolicyClient::new(channel(conn, &op).await?);
            let info = c
                .push(pb::SignedPolicy {
                    bundle,
                    signatures: sigs
                        .into_iter()
                        .map(|s| pb::PolicySignature {
                            key_id: s.key_id,
                            signature: s.signature,
                        })
                        .collect(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("controller: {}", s.message()))?
                .into_inner();
            println!("policy version {} pushed ({})", info.version, info.hash);
            Ok(0)
        }
        PolicyCmd::Show { full } => {
            let mode = crate::term::Mode::from_conn(conn)?;
            let op = operator(conn)?;
            let mut c = pb::policy_client::PolicyClient::new(channel(conn, &op).await?);
            let info = c
                .get(pb::GetPolicyRequest {})
                .await
                .map_err(|s| anyhow::anyhow!("controller: {}", s.message()))?
                .into_inner();
            let mut out = mode.stdout();
            writeln!(out, "version {}\nhash    {}", info.version, info.hash)?;
            if full {
                writeln!(out)?;
                out.write_all(&info.policy.unwrap_or_default().bundle)?;
                writeln!(out)?;
            }
            Ok(0)
        }
    }
}
