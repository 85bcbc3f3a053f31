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

/// deploy/examples/health/services.toml, appended to controller.toml as
/// the file says, validates; and its services are the ones documented.
#[test]
fn example_services_validate_in_the_controller_config() {
    let base = std::fs::read_to_string(deploy("controller.toml")).expect("controller.toml");
    let services =
        std::fs::read_to_string(deploy("examples/health/services.toml")).expect("services.toml");
    let raw: fleetcmd_controller::config::RawConfig =
        toml::from_str(&format!("{base}\n{services}")).expect("parses");
    let cfg = raw
        .validate("controller.toml + services.toml")
        .expect("valid");
    let names: Vec<&str> = cfg.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["api", "db", "disks"]);
    assert!(cfg.services[2].damping.remind.is_zero());
    let hosts = cfg.host_alerts.expect("[host_alerts]");
    assert_eq!(hosts.checks, ["disk", "memory"]);
}

/// deploy/examples/health/agent-checks.toml, appended to agent.toml,
/// validates, and has every check the example services name.
#[test]
fn example_agent_checks_validate_and_match_the_example_services() {
    let base = std::fs::read_to_string(deploy("agent.toml")).expect("agent.toml");
    let checks = std::fs::read_to_string(deploy("examples/health/agent-checks.toml"))
        .expect("agent-checks.toml");
    let raw: fleetcmd_agent::config::RawConfig =
        toml::from_str(&format!("{base}\n{checks}")).expect("parses");
    let cfg = raw
        .validate("agent.toml + agent-checks.toml")
        .expect("valid");
    let names: Vec<&str> = cfg.checks.iter().map(|c| c.name.as_str()).collect();
    let services =
        std::fs::read_to_string(deploy("examples/health/services.toml")).expect("services.toml");
    let ctl: fleetcmd_controller::config::RawConfig =
        toml::from_str(&services).expect("services parse");
    for (name, s) in &ctl.services {
        assert!(
            names.contains(&s.check.as_str()),
            "service {name} checks {:?}, which agent-checks.toml does not define ({names:?})",
            s.check
        );
    }
    for c in &ctl.host_alerts.expect("[host_alerts]").checks {
        assert!(
            names.contains(&c.as_str()),
            "host_alerts check {c:?} not in {names:?}"
        );
    }
}

/// Runs a checker from the prometheus packages on an example file.
fn tool_accepts(tool: &str, args: &[&str], file: &str) {
    let out = std::process::Command::new(tool)
        .args(args)
        .arg(deploy(file))
        .output()
        .unwrap_or_else(|e| {
            panic!("{tool}: {e}; install it: apt-get install -y prometheus prometheus-alertmanager")
        });
    assert!(
        out.status.success(),
        "{tool} {args:?} {file}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Prometheus and Alertmanager examples pass the projects' own checkers.
#[test]
fn example_prometheus_and_alertmanager_configs_pass_their_checkers() {
    tool_accepts(
        "promtool",
        &["check", "config"],
        "examples/health/prometheus.yml",
    );
    tool_accepts(
        "promtool",
        &["check", "rules"],
        "examples/health/fleetcmd-rules.yml",
    );
    tool_accepts("amtool", &["check-config"], "examples/alertmanager.yml");
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
    assert!(
        cfg.section::<fleetcmd_gateway::adapters::console::ConsoleConfig>()
            .is_some_and(|c| c.enabled)
    );
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

/// The commented adapter sections of deploy/gateway.toml, uncommented, are
/// a valid configuration that enables every adapter at once.
#[test]
fn example_gateway_adapter_sections_validate_all_enabled_at_once() {
    let path = deploy("gateway.toml");
    let text = std::fs::read_to_string(&path).expect("read");
    let (head, adapters) = text
        .split_once("# Any set of the adapters below")
        .expect("the adapters block");
    let toml_line = |l: &str| {
        let t = l.trim_start_matches("# ");
        t.starts_with('[') || t.split_once(" = ").is_some_and(|(k, _)| !k.contains(' '))
    };
    let uncommented: String = adapters
        .lines()
        .map(|l| {
            if l.starts_with("# ") && toml_line(l) {
                l.trim_start_matches("# ").to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let all = format!("{head}\n#{uncommented}\n");
    let cfg = fleetcmd_gateway::config::GatewayConfig::parse(&all, &path)
        .unwrap_or_else(|e| panic!("all adapters enabled: {e}\n{all}"));
    // Every registered chat platform and integration has its example
    // section, and it parses as that component's config.
    for entry in fleetcmd_gateway::registry::components() {
        let section = cfg
            .sections
            .get(entry.name)
            .unwrap_or_else(|| panic!("[{}] missing from deploy/gateway.toml", entry.name));
        if let Err(e) = entry.parse(section, &cfg.paths()) {
            panic!("[{}]: {e}", entry.name);
        }
    }
    // The example names secret files under /etc that do not exist here;
    // anything else wrong with the sections is a failure.
    if let Err(problems) = cfg.validate() {
        let other: Vec<_> = problems
            .iter()
            .filter(|p| !(p.key.ends_with("_file") && p.message.contains("No such file")))
            // The checkout's copy is 0644; the package installs it 0640
            // (postinst), where its inline example values are accepted.
            .filter(|p| !(p.key == "secrets" && p.message.contains("mode 644")))
            .collect();
        assert!(other.is_empty(), "{other:#?}");
    }
}
