//! Builds and starts every adapter a `gateway.toml` enables, on one router
//! and one HTTP listener: what `fleetcmd-gateway run` does after loading
//! its configuration.

use std::path::Path;
use std::sync::Arc;

use crate::adapters::campfire::CampfireAdapter;
use crate::adapters::console::ConsoleAdapter;
use crate::adapters::irc::IrcAdapter;
use crate::adapters::mattermost::MattermostAdapter;
use crate::adapters::slack::SlackAdapter;
use crate::adapters::webhook::WebhookAdapter;
use crate::adapters::xmpp::XmppAdapter;
use crate::adapters::{AdapterError, ChatAdapter, ChatSender};
use crate::config::GatewayConfig;
use crate::controller::GrpcController;
use crate::router::Router;
use crate::{Gateway, GatewayOptions};

/// Why the gateway could not start.
#[derive(thiserror::Error, Debug)]
pub enum LaunchError {
    #[error(transparent)]
    Controller(#[from] fleetcmd_proto::channel::ChannelError),
    #[error("[{adapter}]: {source}")]
    Adapter {
        adapter: &'static str,
        source: AdapterError,
    },
    #[error("{0}")]
    Http(std::io::Error),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("[audit_channel]: {0}")]
    AuditChannel(String),
    #[error("[notify]: {0}")]
    Notify(String),
    #[error("{0}")]
    Prometheus(String),
    #[error("[[plugin]]: {0}")]
    Plugins(#[from] crate::plugins::config::PluginConfigError),
    #[error("[alertmanager]: {0}")]
    Alertmanager(String),
    /// The message names the section (`[pagerduty]: …`).
    #[error("{0}")]
    Alerts(String),
}

fn adapter(name: &'static str) -> impl Fn(AdapterError) -> LaunchError {
    move |source| LaunchError::Adapter {
        adapter: name,
        source,
    }
}

/// Connects every enabled adapter (a bad token or an unreachable chat
/// server fails here, naming the adapter), binds the HTTP listener when one
/// needs it, then serves until every adapter's input has ended.
/// `on_ready` runs once everything is connected (systemd notification).
/// What to tell on a stop signal before the process ends: IRC says QUIT
/// (the channel sees the bot leave, not a dead connection).
#[derive(Clone, Default, Debug)]
pub struct Stops(Arc<std::sync::Mutex<Vec<crate::adapters::irc::IrcStop>>>);

impl Stops {
    fn add(&self, stop: crate::adapters::irc::IrcStop) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(stop);
    }

    /// Tells every adapter that says goodbye to say it now.
    pub fn stop_all(&self) {
        for s in self.0.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            s.stop();
        }
    }
}

pub async fn run(
    cfg: &GatewayConfig,
    file: &Path,
    opts: GatewayOptions,
    on_ready: impl FnOnce(),
    stops: &Stops,
) -> Result<(), LaunchError> {
    let base = file.parent().unwrap_or(Path::new("."));
    let ctl = GrpcController::connect_lazy(&opts.controller_url, &opts.tls)?;
    // The gateway's state: replay records of every inbound path, the job
    // results it still owes the chat and the pending approvals, persisted so
    // a restart forgets none of them.
    let store = crate::store::GatewayStore::open(&cfg.state_dir)?;
    let mut router = Router::new(opts.router_config(), ctl).with_store(&store)?;
    if let Some(p) = &cfg.prometheus {
        let client = crate::prometheus::PromClient::new(p)
            .map_err(|e| LaunchError::Prometheus(e.to_string()))?;
        router = router.with_prometheus(client);
    }
    let router = Arc::new(router);
    router.serve_plugins(crate::plugins::PluginHost::new(
        crate::plugins::config::load(&cfg.plugin)?,
    ));
    // A request accepted once is refused after a restart too.
    let replay = store.replay()?;
    let mut gw = Gateway::new(router.clone());
    // Each adapter's sending half by channel scheme, for the audit channel.
    let mut senders: Vec<(&'static str, Arc<dyn ChatSender>)> = Vec::new();
    if cfg.console.enabled {
        let user = std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            .unwrap_or_else(|_| "unknown".to_string());
        let stdin = tokio::io::BufReader::new(tokio::io::stdin());
        let console =
            ConsoleAdapter::new(stdin, tokio::io::stdout(), &user).map_err(adapter("console"))?;
        senders.push(("console", console.sender()));
        gw.add(console);
    }
    if let Some(slack) = &cfg.slack {
        let secrets = slack.secrets(base).map_err(adapter("slack"))?;
        let a = SlackAdapter::connect_with(slack, secrets)
            .await
            .map_err(adapter("slack"))?;
        a.use_replay_guard(replay.clone());
        a.report_auth_failures(gw.auth_failures());
        gw.add_routes(a.routes());
        senders.push(("slack", a.sender()));
        gw.add(a);
    }
    if let Some(mm) = &cfg.mattermost {
        let a = MattermostAdapter::connect(mm)
            .await
            .map_err(adapter("mattermost"))?;
        a.use_replay_guard(replay.clone());
        a.report_auth_failures(gw.auth_failures());
        gw.add_routes(a.routes());
        senders.push(("mattermost", a.sender()));
        gw.add(a);
    }
    if let Some(irc) = &cfg.irc {
        let a = IrcAdapter::connect(irc).await.map_err(adapter("irc"))?;
        stops.add(a.stop_handle());
        senders.push(("irc", a.sender()));
        gw.add(a);
    }
    if let Some(x) = &cfg.xmpp {
        let a = XmppAdapter::connect(x).await.map_err(adapter("xmpp"))?;
        senders.push(("xmpp", a.sender()));
        gw.add(a);
    }
    if let Some(c) = &cfg.campfire {
        let a = CampfireAdapter::new(c).map_err(adapter("campfire"))?;
        a.use_replay_guard(replay.clone());
        a.report_auth_failures(gw.auth_failures());
        gw.add_routes(a.routes());
        senders.push(("campfire", a.sender()));
        gw.add(a);
    }
    if let Some(w) = &cfg.webhook {
        let a = WebhookAdapter::new(w).map_err(adapter("webhook"))?;
        a.use_replay_guard(replay.clone());
        a.report_auth_failures(gw.auth_failures());
        gw.add_routes(a.routes());
        senders.push(("webhook", a.sender()));
        gw.add(a);
    }
    let named: Vec<(String, Arc<dyn ChatSender>)> = senders
        .iter()
        .map(|(s, out)| (s.to_string(), out.clone()))
        .collect();
    // What was owed to the chat when the gateway last stopped.
    gw.spawn_background(crate::resume::run(router.clone(), named.clone()));
    // Service alerts to PagerDuty / Opsgenie / Statuspage, fed by
    // alerts::run below (bounded; see integrations::Integrations::run).
    let alert_events = match crate::integrations::Integrations::from_config(
        cfg.pagerduty.as_ref(),
        cfg.opsgenie.as_ref(),
        cfg.statuspage.as_ref(),
    )
    .map_err(LaunchError::Alerts)?
    {
        Some(integrations) => {
            let (tx, rx) = tokio::sync::mpsc::channel(crate::integrations::QUEUE);
            gw.spawn_background(integrations.run(rx));
            Some(tx)
        }
        None => None,
    };
    // Service alerts from the controller into their channels.
    gw.spawn_background(crate::alerts::run(
        router.clone(),
        named.clone(),
        alert_events,
    ));
    if let Some(n) = &cfg.notify {
        let routes = crate::notify::routes(n, named, gw.auth_failures(), replay.clone())
            .map_err(LaunchError::Notify)?;
        gw.add_routes(routes);
    }
    if let Some(am) = &cfg.alertmanager {
        let named = senders
            .iter()
            .map(|(s, out)| (s.to_string(), out.clone()))
            .collect();
        let routes = crate::alertmanager::routes(am, named, gw.auth_failures())
            .map_err(LaunchError::Alertmanager)?;
        gw.add_routes(routes);
    }
    if let Some(pd) = &cfg.pagerduty
        && let Some(oncall) = crate::oncall::Oncall::from_config(pd)
            .map_err(|e| LaunchError::Alerts(format!("[pagerduty]: {e}")))?
    {
        router.set_oncall(oncall);
    }
    if let Some(ac) = &cfg.audit_channel {
        let scheme = ac.channel.split(':').next().unwrap_or_default();
        let scheme = if scheme == "webhook-out" {
            "webhook"
        } else {
            scheme
        };
        let Some((_, out)) = senders.iter().find(|(s, _)| *s == scheme) else {
            return Err(LaunchError::AuditChannel(format!(
                "{}: no enabled adapter posts to `{scheme}:` channels",
                ac.channel
            )));
        };
        let kinds = ac
            .kinds()
            .map_err(|p| LaunchError::AuditChannel(format!("{p:?}")))?;
        gw.spawn_background(crate::audit_feed::run(
            router.clone(),
            out.clone(),
            ac.channel.clone(),
            kinds,
            ac.interval(),
        ));
    }
    let http = if gw.needs_http() {
        let addr =
            cfg.http.listen.parse().map_err(|e| {
                LaunchError::Http(std::io::Error::other(format!("http.listen: {e}")))
            })?;
        let listener = crate::http::bind(addr).await.map_err(LaunchError::Http)?;
        tracing::info!(%addr, "HTTP listener for chat webhooks");
        Some(listener)
    } else {
        None
    };
    on_ready();
    gw.run(http).await.map_err(LaunchError::Http)
}
