//! Integration tests of the gateway crate: rendering, the console adapter
//! and the router against a fake controller.

mod alerting;
mod alertmanager;
mod approvals;
mod audit;
mod campfire;
mod config;
mod console;
mod irc;
mod limits;
mod matrix;
mod mattermost;
mod multi;
mod ngircd;
mod plugin_findings;
mod plugins;
mod prosody;
mod registry;
mod render;
mod replay;
mod router;
mod slack;
mod support;
mod synapse;
mod webhook;
mod xmpp;
