//! The fleetcmd agent: joins the fleet with a pinned token, keeps one
//! outbound mTLS stream to the controller, reports health, and runs only
//! allow-listed commands from jobs it has verified itself (invariant 5 in ARCHITECTURE.md).
//! It opens no listening port, except an optional loopback-only `/metrics`
//! (`metrics_listen`, see `exporter`).

pub mod checks;
pub mod cli_args;
pub mod config;
pub mod conn;
pub mod controllers;
pub mod exec;
pub mod exporter;
pub mod join;
pub mod link;
pub mod metrics;
pub mod renewal;
pub mod spool;
pub mod state;

pub use config::AgentConfig;
pub use conn::{AgentHandle, spawn};
pub use join::{JoinOptions, join};
