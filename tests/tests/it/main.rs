//! End-to-end tests: real controller, agents and gateway in-process on
//! loopback. One binary, one module per area.

mod allow_list;
mod approvals;
mod audit;
mod audit_export;
mod authn;
mod bus;
mod crash;
mod deploy;
mod dev_ha;
mod docs;
mod e2e;
mod enrollment;
mod exec_limits;
mod failover;
mod gateway_dedup;
mod gateway_plugins;
mod gateway_restart;
mod grpc;
mod ha_kill;
mod hardening;
mod health;
mod init;
mod job_signatures;
mod key_files;
mod labels;
mod leases;
mod live;
mod moment_of_use;
// The gateway tests' real ngircd, one file for both test binaries.
#[path = "../../../chat-gateway/tests/it/ngircd.rs"]
#[allow(dead_code)] // the TLS half serves the gateway's IRC tests
mod ngircd;
mod notify;
mod operators;
mod output_trust;
mod partition;
mod path_args;
mod pg_restart;
mod policy_trust;
mod postgres;
mod prometheus;
// The gateway tests' real prosody and XMPP user, one file for both test
// binaries.
#[path = "../../../chat-gateway/tests/it/prosody.rs"]
#[allow(dead_code)] // the rest serves the gateway's XMPP tests
mod prosody;
mod python_api;
mod rollout;
mod short_ids;
mod storage;
mod support;
// The gateway tests' real Synapse and matrix-nio user, one file for both
// test binaries.
#[path = "../../../chat-gateway/tests/it/synapse.rs"]
#[allow(dead_code)] // the rest serves the gateway's Matrix tests
mod synapse;
mod systemd;
mod tls_migration;
mod transport;
