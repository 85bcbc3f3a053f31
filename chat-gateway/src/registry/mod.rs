//! The gateway's extension points and the one list of what plugs into
//! them: every chat platform and every integration is a [`Component`]
//! (its `gateway.toml` section type, with `validate` and `build`), listed
//! once in [`components`]. A `gateway.toml` section is selected by its name
//! (the section `[slack]` builds the component named `slack`); a section no
//! component claims is refused when the file is loaded.
//!
//! Adding a chat platform or an integration is one folder (its config type
//! implementing [`Component`]) plus one line in [`components`]. What a
//! component may contribute, through [`BuildContext`]:
//!
//! - a chat adapter ([`BuildContext::serve`]): its messages go to the one
//!   router, its sending half becomes reachable by its name (the channel
//!   scheme, for the audit channel, alerts and resumed jobs);
//! - HTTP routes on the gateway's one listener ([`BuildContext::routes`]);
//! - chat commands ([`command`], [`BuildContext::commands`]);
//! - alert hooks ([`BuildContext::alert_hook`]): the controller's service
//!   alert stream (PagerDuty, Opsgenie, Statuspage consume it);
//! - background tasks ([`BuildContext::background`]), owned by the gateway
//!   and stopped with it.
//!
//! A component never signs, never sees a key, and reaches the router only
//! through these narrow handles.

pub mod command;
pub mod context;

use std::future::Future;
use std::path::{Path, PathBuf};

use futures_util::future::LocalBoxFuture;
use serde::de::DeserializeOwned;

pub use command::{
    AuditKind, Call, CallContext, CommandError, CommandSpec, CommandTable, Commands, Guard,
    RunOutcome, Unconfigured,
};
pub use context::BuildContext;

/// A chat platform or an integration, configured by the `gateway.toml`
/// section named [`Component::NAME`].
pub trait Component: DeserializeOwned + Send + 'static {
    /// The section name, which is also the component's name in logs and
    /// errors (and, for chat platforms, the channel scheme).
    const NAME: &'static str;
    /// A chat platform: the gateway needs at least one enabled.
    const CHAT: bool = false;
    /// The chat verbs it registers (configured or not), so `validate` can
    /// name a clash with a plugin's verb before anything is built.
    const VERBS: &'static [&'static str] = &[];
    /// Makes relative file paths relative to the config file's directory.
    fn resolve_paths(&mut self, _base: &Path) {}
    /// Told what is the gateway's own before `validate` and `build`: a
    /// component that hands paths to another process (the plugins'
    /// sandboxes) must keep these out of its reach.
    fn private_paths(&mut self, _private: &Private) {}
    /// Every problem, each with its full key path (`slack.app_token`).
    fn validate(&self) -> Vec<(String, String)>;
    /// Whether the section turns the component on (`[console] enabled =
    /// false` does not).
    fn enabled(&self) -> bool {
        true
    }
    /// Connects and contributes to the gateway; an error names no section
    /// (the launcher adds it).
    fn build(self, cx: &mut BuildContext) -> impl Future<Output = Result<(), String>>;
    /// What the component contributes when the file has no section for it
    /// (a chat command that says what to configure); nothing by default.
    fn absent(_cx: &mut BuildContext) -> Result<(), String> {
        Ok(())
    }
}

/// A [`Component`] with its type erased: what the registry lists.
pub struct Entry {
    pub name: &'static str,
    pub chat: bool,
    /// [`Component::VERBS`].
    pub verbs: &'static [&'static str],
    parse: fn(&toml::Value, &Paths) -> Result<Parsed, String>,
    absent: fn(&mut BuildContext) -> Result<(), String>,
}

/// One section, checked.
pub struct Parsed {
    pub enabled: bool,
    pub problems: Vec<(String, String)>,
    build: BuildFn,
}

type BuildFn =
    Box<dyn for<'a> FnOnce(&'a mut BuildContext) -> LocalBoxFuture<'a, Result<(), String>>>;

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

impl Entry {
    /// Parses `section` (its shape: unknown keys are refused) with paths
    /// resolved against `paths.base`.
    pub fn parse(&self, section: &toml::Value, paths: &Paths) -> Result<Parsed, String> {
        (self.parse)(section, paths)
    }

    /// Contributes what the component offers without a section.
    pub fn absent(&self, cx: &mut BuildContext) -> Result<(), String> {
        (self.absent)(cx)
    }
}

impl Parsed {
    /// Builds the component into `cx`.
    pub async fn build(self, cx: &mut BuildContext) -> Result<(), String> {
        (self.build)(cx).await
    }
}

/// What a section's relative paths are resolved against, and what is the
/// gateway's own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Paths {
    /// The config file's directory.
    pub base: PathBuf,
    pub private: Private,
}

impl Paths {
    /// Paths resolved against `base`, nothing declared private (tests,
    /// and parsing a section's shape only).
    pub fn base(base: &Path) -> Paths {
        Paths {
            base: base.to_path_buf(),
            private: Private::default(),
        }
    }
}

/// What is the gateway's own, which nothing it starts may reach.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Private {
    /// The configuration directory: nothing on it or above it; folders
    /// beneath it (`/etc/fleetcmd/plugins/NAME`) are fine, checked
    /// against `paths`.
    pub config_dir: PathBuf,
    /// Files and directories nothing may be granted on, above or inside:
    /// the configuration file, keys, certificates, secret files, the
    /// state directory.
    pub paths: Vec<PathBuf>,
}

/// The section as `T`, paths resolved.
pub fn typed<T: Component>(section: &toml::Value, paths: &Paths) -> Result<T, String> {
    let mut c: T = section
        .clone()
        .try_into()
        .map_err(|e: toml::de::Error| e.message().trim_end().to_string())?;
    c.resolve_paths(&paths.base);
    c.private_paths(&paths.private);
    Ok(c)
}

fn parse<T: Component>(section: &toml::Value, paths: &Paths) -> Result<Parsed, String> {
    let c: T = typed(section, paths)?;
    Ok(Parsed {
        enabled: c.enabled(),
        problems: c.validate(),
        build: Box::new(move |cx| Box::pin(c.build(cx))),
    })
}

/// The registry line of `T`.
pub fn entry<T: Component>() -> Entry {
    Entry {
        name: T::NAME,
        chat: T::CHAT,
        verbs: T::VERBS,
        parse: parse::<T>,
        absent: T::absent,
    }
}

/// Every chat platform and integration, in build order: chat platforms
/// first (integrations that post to chat find their senders), then the
/// integrations.
pub fn components() -> Vec<Entry> {
    use crate::adapters;
    vec![
        entry::<adapters::console::ConsoleConfig>(),
        entry::<adapters::slack::SlackConfig>(),
        entry::<adapters::mattermost::MattermostConfig>(),
        entry::<adapters::irc::IrcConfig>(),
        entry::<adapters::xmpp::XmppConfig>(),
        entry::<adapters::matrix::MatrixConfig>(),
        entry::<adapters::campfire::CampfireConfig>(),
        entry::<adapters::webhook::WebhookConfig>(),
        entry::<crate::prometheus::PrometheusConfig>(),
        entry::<crate::integrations::PagerDutyConfig>(),
        entry::<crate::integrations::OpsgenieConfig>(),
        entry::<crate::integrations::StatuspageConfig>(),
        entry::<crate::alertmanager::AlertmanagerConfig>(),
        entry::<crate::notify::NotifyConfig>(),
        entry::<crate::audit_feed::AuditChannelConfig>(),
        entry::<crate::plugins::config::PluginsConfig>(),
    ]
}

/// Every verb a component registers, with the component's name.
pub fn registered_verbs() -> Vec<(&'static str, &'static str)> {
    components()
        .iter()
        .flat_map(|e| e.verbs.iter().map(move |v| (e.name, *v)))
        .collect()
}

/// The registry entry named `name`.
pub fn find(name: &str) -> Option<Entry> {
    components().into_iter().find(|e| e.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `validate` checks plugin verbs against [`Component::VERBS`]: each
    /// integration declares exactly the verbs it registers.
    #[test]
    fn declared_verbs_are_the_registered_ones() {
        let of = |u: command::Unconfigured| u.specs.into_iter().map(|s| s.verb).collect::<Vec<_>>();
        let verbs = registered_verbs();
        assert_eq!(
            verbs,
            [("prometheus", "query"), ("pagerduty", "oncall")],
            "a component registers verbs it does not declare"
        );
        assert_eq!(of(crate::prometheus::not_configured()), ["query"]);
        assert_eq!(of(crate::oncall::not_configured()), ["oncall"]);
    }
}
