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
pub mod state;

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
    /// Whether the instance counts as passing for its service:
    /// its agent is online and its check is OK or WARNING. The controller
    /// counts with this and the gateway lists the others as failing.
    pub fn passes(&self) -> bool {
        self.online
            && (self.state == v1::CheckState::Ok as i32
                || self.state == v1::CheckState::Warning as i32)
    }
}

/// One number of a `HostMetrics` sample as a metric: the name after the
/// exporter's prefix, its help text, and how to read it.
pub type HostFigure = (&'static str, &'static str, fn(&v1::HostMetrics) -> f64);

/// The host figures both Prometheus exporters publish: the controller per
/// host (`fleetcmd_host_*`, label `host`), the agent its own
/// (`fleetcmd_agent_*`).
pub const HOST_FIGURES: [HostFigure; 10] = [
    (
        "cpu_percent",
        "CPU usage over the last heartbeat interval, 0-100",
        |m| f64::from(m.cpu_percent),
    ),
    ("load1", "1-minute load average", |m| m.load1),
    ("load5", "5-minute load average", |m| m.load5),
    ("load15", "15-minute load average", |m| m.load15),
    ("memory_used_bytes", "Memory in use", |m| {
        m.mem_used_bytes as f64
    }),
    ("memory_total_bytes", "Memory installed", |m| {
        m.mem_total_bytes as f64
    }),
    ("swap_used_bytes", "Swap in use", |m| {
        m.swap_used_bytes as f64
    }),
    ("swap_total_bytes", "Swap configured", |m| {
        m.swap_total_bytes as f64
    }),
    ("uptime_seconds", "Seconds since the host booted", |m| {
        m.uptime_secs as f64
    }),
    ("processes", "Processes running on the host", |m| {
        f64::from(m.process_count)
    }),
];
