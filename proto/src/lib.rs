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
