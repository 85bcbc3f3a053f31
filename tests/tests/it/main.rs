//! End-to-end tests: real controller, agents and gateway in-process on
//! loopback. One binary, one module per area.

mod e2e;
mod grpc;
