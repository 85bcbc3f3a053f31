//! Integration tests of the agent: one binary, one module per area.

mod checks;
mod join_errors;
