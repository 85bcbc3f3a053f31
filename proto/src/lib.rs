//! The fleetcmd gRPC protocol: the `.proto` files under `proto/` and the Rust
//! code generated from them (committed under `src/gen/`, checked for
//! staleness by this crate's tests). Proto types stop at the gRPC boundary:
//! the services convert them into `fleetcmd-core` types and reject bad input
//! there.

/// Messages and services of package `fleetcmd.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!("gen/fleetcmd.v1.rs");
}

/// Encoded `FileDescriptorSet` of the protocol, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("gen/fleetcmd_descriptor.bin");

/// Path of the `.proto` sources relative to the `proto/` include directory, for the codegen check.
pub const PROTO_FILES: &[&str] = &["fleetcmd/v1/fleetcmd.proto"];

pub mod channel;
pub mod codec;

impl v1::CheckState {
    /// The Nagios name of a check result's state (`OK`, `WARNING`,
    /// `CRITICAL`, `UNKNOWN`); an unset or unknown value is `UNKNOWN`.
    pub fn label(state: i32) -> &'static str {
        match v1::CheckState::try_from(state) {
            Ok(v1::CheckState::Ok) => "OK",
            Ok(v1::CheckState::Warning) => "WARNING",
            Ok(v1::CheckState::Critical) => "CRITICAL",
            _ => "UNKNOWN",
        }
    }
}

impl v1::ServiceInstance {
    /// Whether the instance counts as passing for its service (DESIGN §6):
    /// its agent is online and its check is OK or WARNING. The controller
    /// counts with this and the gateway lists the others as failing.
    pub fn passes(&self) -> bool {
        self.online
            && (self.state == v1::CheckState::Ok as i32
                || self.state == v1::CheckState::Warning as i32)
    }
}
