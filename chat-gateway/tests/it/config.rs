//! Loading `gateway.toml` and the files it names.

use std::path::Path;

use base64::Engine;
use fleetcmd_gateway::adapters::campfire::CampfireAdapter;
use fleetcmd_gateway::adapters::webhook::WebhookAdapter;
use fleetcmd_gateway::config::{ConfigError, GatewayConfig};

const ROOT: &str = "ed25519:MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=";

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap_or_else(|e| panic!("{name}: {e}"));
}

fn fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let ck = rcgen::generate_simple_self_signed(vec!["gateway".to_string()])
        .unwrap_or_else(|e| panic!("{e}"));
    write(dir.path(), "ca.pem", &ck.cert.pem());
    write(dir.path(), "cert.pem", &ck.cert.pem());
    write(dir.path(), "key.pem", &ck.signing_key.serialize_pem());
    let rng = ring::rand::SystemRandom::new();
    let der =
        ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap_or_else(|e| panic!("{e}"));
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(der.as_ref())
    );
    write(dir.path(), "sign.pem", &pem);
    dir
}

fn config(signing_key: &str, cert: &str) -> String {
    format!(
        "controller = \"127.0.0.1:7443\"\nca = \"ca.pem\"\ncert = \"{cert}\"\nkey = \"key.pem\"\n\
         signing_key = \"{signing_key}\"\nsigner_id = \"gw\"\npolicy_roots = [\"{ROOT}\"]\nbot_name = \"opsbot\"\n\
         [console]\nenabled = true\n"
    )
}

#[test]
fn loads_options_with_paths_relative_to_the_file() {
    let dir = fixture();
    let file = dir.path().join("gateway.toml");
    write(dir.path(), "gateway.toml", &config("sign.pem", "cert.pem"));
    let opts = GatewayConfig::load(&file)
        .and_then(|c| c.options(&file))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (opts.signer_id.as_str(), opts.bot_name.as_str()),
        ("gw", "opsbot")
    );
    assert_eq!(opts.policy_roots.len(), 1);
    assert_eq!(opts.policy_threshold, 1);
    assert_eq!(opts.job_expiry.as_secs(), 600);
    assert_eq!(opts.poll_interval.as_millis(), 100);
    assert!(
        !format!("{opts:?}").contains("PRIVATE KEY"),
        "key material must not be in Debug"
    );
}

#[test]
fn file_problems_are_all_reported_with_file_and_key() {
    let dir = fixture();
    write(
        dir.path(),
        "bad-sign.pem",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    );
    let file = dir.path().join("gateway.toml");
    write(
        dir.path(),
        "gateway.toml",
        &config("bad-sign.pem", "missing.pem"),
    );
    let err = GatewayConfig::load(&file)
        .and_then(|c| c.options(&file))
        .err();
    let Some(ConfigError::Invalid { file: f, problems }) = err else {
        panic!("expected invalid: {err:?}")
    };
    assert_eq!(f, file);
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["cert", "signing_key"], "{problems:?}");
    assert!(problems[0].message.contains("missing.pem"), "{problems:?}");
}

/// Every adapter section at once, secrets in files next to gateway.toml
/// (named relative to it, as documented).
fn all_adapters(mattermost_dir: &str) -> String {
    format!(
        r##"
[slack]
mode = "events"
bot_token_file = "slack-bot-token"
signing_secret_file = "slack-signing-secret"

[mattermost]
url = "https://chat.example.com"
server = "chat"
token_file = "{mattermost_dir}mattermost.token"
slash_tokens_file = "{mattermost_dir}mattermost-slash.tokens"
action_secret_file = "{mattermost_dir}mattermost-action.key"
callback_url = "https://gw.example.com/mattermost/actions"

[irc]
server = "irc.example.com"
nick = "fleetcmd"
network = "example"
channels = ["#ops"]
sasl_account = "fleetcmd"
sasl_password_file = "irc-sasl"

[xmpp]
jid = "fleetcmd@example.com"
password_file = "xmpp-password"
rooms = ["ops@conference.example.com"]

[campfire]
url = "https://campfire.example.com"
server = "acme"
bot_key_file = "campfire-bot-key"
path_token_file = "campfire-path-token"

[[webhook.incoming]]
name = "ops-tool"
secret_file = "webhook-ops-tool.secret"
reply_url = "https://ops-tool.example.com/fleetcmd/replies"

[[webhook.outgoing]]
name = "pager"
url = "https://pager.example.com/hooks/fleetcmd"
secret_file = "webhook-pager.secret"
"##
    )
}

fn write_adapter_secrets(dir: &Path) {
    for (name, text) in [
        ("slack-bot-token", "xoxb-1234-5678-abcdefghijkl\n"),
        ("slack-signing-secret", "8f742231b10e8888abcd99yyyzzz85a5\n"),
        ("mattermost.token", "bottoken0123456789abcdefgh\n"),
        ("mattermost-slash.tokens", "slashtoken0123456789abcdef\n"),
        ("mattermost-action.key", "action-secret-0123456789abcdef\n"),
        ("irc-sasl", "sasl password\n"),
        ("xmpp-password", "correct horse battery staple\n"),
        ("campfire-bot-key", "7-kR3x9mP8qL2nZ5\n"),
        ("campfire-path-token", "Zq3vN8xK2mW9pL4rT7yB1cD6\n"),
        ("webhook-ops-tool.secret", "s3cret-0123456789-abcdef\n"),
        ("webhook-pager.secret", "out-s3cret-0123456789-abcdef\n"),
    ] {
        write(dir, name, text);
    }
}

#[test]
fn every_adapter_enabled_at_once_parses_and_validates() {
    let dir = fixture();
    write_adapter_secrets(dir.path());
    let file = dir.path().join("gateway.toml");
    // No [console]: the chat adapters alone are enough.
    let head = config("sign.pem", "cert.pem").replace("[console]\nenabled = true\n", "");
    // Every secret file is named relative to gateway.toml.
    write(
        dir.path(),
        "gateway.toml",
        &format!("{head}{}", all_adapters("")),
    );
    let cfg = GatewayConfig::load(&file).unwrap_or_else(|e| panic!("{e}"));
    use fleetcmd_gateway::adapters::{
        campfire::CampfireConfig, console::ConsoleConfig, irc::IrcConfig,
        mattermost::MattermostConfig, slack::SlackConfig, webhook::WebhookConfig, xmpp::XmppConfig,
    };
    assert!(cfg.section::<ConsoleConfig>().is_none());
    assert!(cfg.section::<SlackConfig>().is_some() && cfg.section::<MattermostConfig>().is_some());
    assert!(cfg.section::<IrcConfig>().is_some() && cfg.section::<XmppConfig>().is_some());
    assert!(cfg.section::<CampfireConfig>().is_some() && cfg.section::<WebhookConfig>().is_some());
    if let Err(problems) = cfg.validate() {
        panic!("{problems:#?}");
    }
    let opts = cfg.options(&file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(opts.bot_name, "opsbot");

    // The relative secret files are read from gateway.toml's directory by
    // the adapters that can be built without a network.
    let slack = cfg.section::<SlackConfig>().map(|s| s.secrets(dir.path()));
    assert!(matches!(slack, Some(Ok(_))), "{slack:?}");
    let mut campfire = cfg
        .section::<CampfireConfig>()
        .unwrap_or_else(|| panic!("[campfire]"));
    campfire.resolve_paths(dir.path());
    if let Err(e) = CampfireAdapter::new(&campfire) {
        panic!("{e}");
    }
    let mut webhook = cfg
        .section::<WebhookConfig>()
        .unwrap_or_else(|| panic!("[webhook]"));
    webhook.resolve_paths(dir.path());
    if let Err(e) = WebhookAdapter::new(&webhook) {
        panic!("{e}");
    }
}

#[test]
fn no_adapter_enabled_names_console_enabled() {
    let dir = fixture();
    let file = dir.path().join("gateway.toml");
    let head = config("sign.pem", "cert.pem").replace("[console]\nenabled = true\n", "");
    for text in [head.clone(), format!("{head}[console]\nenabled = false\n")] {
        write(dir.path(), "gateway.toml", &text);
        let cfg = GatewayConfig::load(&file).unwrap_or_else(|e| panic!("{e}"));
        let problems = cfg.validate().err().unwrap_or_default();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["console.enabled"], "{text}");
        for section in [
            "[slack]",
            "[mattermost]",
            "[irc]",
            "[xmpp]",
            "[campfire]",
            "[webhook]",
        ] {
            assert!(problems[0].message.contains(section), "{problems:?}");
        }
        let err = cfg.options(&file).err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("console.enabled: no chat adapter is enabled")),
            "{err:?}"
        );
    }
}
