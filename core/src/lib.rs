//! Pure domain logic of fleetcmd: identifiers, label selectors, the policy
//! model and its validation, argv building from templates, job specs with
//! their signatures, the agent's authorization decision, RBAC for chat users,
//! signed policy bundles and the chat command grammar.
//!
//! Nothing in this crate touches files, sockets, clocks, randomness, the
//! environment or an async runtime: time is passed in as unix seconds, so
//! expiry and replay logic is tested without sleeping.
#![forbid(unsafe_code)]

pub mod approval;
pub mod argv;
pub mod audit;
pub mod authorize;
pub mod crypto;
pub mod duration;
pub mod error_chain;
pub mod grammar;
pub mod health;
pub mod host;
pub mod ids;
pub mod job;
pub mod join_token;
pub mod nagios;
pub mod policy;
pub mod policy_bundle;
pub mod ratelimit;
pub mod rbac;
pub mod rollout;
pub mod selector;
pub mod state;
pub mod terminal;
pub mod when;

mod glob;
