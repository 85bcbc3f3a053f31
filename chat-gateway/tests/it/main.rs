//! Integration tests of the gateway crate: rendering, the console adapter
//! and the router against a fake controller.

mod config;
mod console;
mod render;
mod router;
mod support;
mod xmpp;
