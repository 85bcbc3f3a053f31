//! The fleetcmd controller: the fleet CA and enrollment, the registry of
//! connected agents, policy distribution, job submission and dispatch, and
//! durable results in the store. It is not trusted to run code: it forwards
//! signed jobs that the agents verify themselves (ARCHITECTURE.md invariants).

pub mod access;
pub mod audit;
pub mod auth;
pub mod bus;
pub mod claims;
pub mod cli_args;
pub mod config;
pub mod controller_metrics;
pub mod error;
pub mod health;
pub mod keyfile;
pub mod lease;
pub mod metrics;
pub mod pki;
pub mod revocation;
pub mod server;
pub mod service;
pub mod state;
pub mod store;

pub use config::ControllerConfig;
pub use server::{RunningController, start};
