//! The gateway's extension points: what a chat platform or an integration
//! implements to plug into the gateway, and the one list of them.
//!
//! - [`command`]: chat commands an integration (or plugin) adds to the
//!   grammar; the router guards, audits and lists them.
pub mod command;

pub use command::{
    Call, CallContext, CommandError, CommandSpec, CommandTable, Commands, Guard, RunOutcome,
};
