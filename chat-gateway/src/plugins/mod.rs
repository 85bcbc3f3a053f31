//! Out-of-process plugins in any language (docs/plugins.md): chat commands
//! served by a separate program that speaks JSON-RPC 2.0 on its stdin and
//! stdout.
//!
//! - [`protocol`]: the wire contract (version 1).
//! - [`manifest`]: `plugin.toml`, the plugin's commands and secret names.
//! - [`config`]: `[[plugin]]` in `gateway.toml`, secret values and limits;
//!   the registry component that starts the host.
//! - [`process`]: how a plugin process is started and confined.
//! - [`sandbox`]: what a plugin may reach of the machine (Landlock rules,
//!   its own user and PID namespace).
//! - [`supervisor`]: one plugin's lifecycle: start, calls, timeouts,
//!   restart with backoff.
//! - [`host`]: the chat side: the plugins' commands on the registry
//!   (guarded by `plugin:NAME.VERB`; grants, `help` and audit are the
//!   router's, as for every registered command), rendering, and the
//!   plugin's `job.run` submitted as the caller through `run`'s own path.
//!
//! Architecture invariant: a plugin never sees a key and never signs (it
//! runs sandboxed, unable to read the gateway's files or reach its
//! process; [`sandbox`]); what
//! it may do on hosts is exactly what its caller may do, because its jobs
//! go through the same path as the caller typing `run`
//! ([`crate::registry::CallContext::run_as_caller`]). Plugins know nothing
//! of the router, the adapters or the controller.

pub mod config;
pub mod host;
pub mod manifest;
pub mod process;
pub mod protocol;
pub mod sandbox;
pub mod supervisor;

pub use host::PluginHost;
