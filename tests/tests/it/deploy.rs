//! The example configs in `deploy/` stay valid as the code changes.

use std::path::Path;

fn deploy(file: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file)
}

#[test]
fn example_controller_config_validates() {
    fleetcmd_controller::config::load(&deploy("controller.toml"))
        .expect("deploy/controller.toml is valid");
}

#[test]
fn example_agent_config_validates() {
    fleetcmd_agent::config::load(&deploy("agent.toml")).expect("deploy/agent.toml is valid");
}

#[test]
fn example_policy_validates() {
    let text = std::fs::read_to_string(deploy("policy.toml")).expect("read");
    let p = fleetcmd_core::policy::Policy::parse(&text).expect("deploy/policy.toml is valid");
    assert!(
        p.command("restart")
            .is_some_and(|c| c.requires_approvals == 1)
    );
}

#[test]
fn example_gateway_config_parses_and_names_missing_files() {
    let path = deploy("gateway.toml");
    let text = std::fs::read_to_string(&path).expect("read");
    let cfg = fleetcmd_gateway::config::GatewayConfig::parse(&text, &path)
        .expect("deploy/gateway.toml parses");
    assert!(cfg.console.enabled);
    // The example points at /etc paths that do not exist here: loading the
    // options must say which file is missing rather than fail vaguely.
    let err = cfg
        .options(&path)
        .expect_err("files are absent here")
        .to_string();
    assert!(
        err.contains("/etc/fleetcmd/gateway/ca.crt") || err.contains("ca"),
        "{err}"
    );
}
