//! The shared part of the fleet bench: simulated agents (`sim`) and the
//! open-files limit and `/proc` figures they need (`sys`). Used by
//! the `fleetcmd-bench` binary and by the tests crate's controller kill
//! test (tests/tests/it/ha_kill.rs), so the agents that are measured are
//! the agents that are tested.

pub mod sim;
pub mod sys;
