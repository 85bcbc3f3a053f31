//! Builds and starts every component a `gateway.toml` enables (the chat
//! platforms and integrations of [`crate::registry`], each selected by its
//! section name), on one router and one HTTP listener: what
//! `fleetcmd-gateway run` does after loading its configuration.

use std::path::Path;
use std::sync::Arc;

use crate::config::GatewayConfig;
use crate::controller::GrpcController;
use crate::registry::{BuildContext, components};
use crate::router::Router;
use crate::{Gateway, GatewayOptions};

/// Why the gateway could not start.
#[derive(thiserror::Error, Debug)]
pub enum LaunchError {
    #[error(transparent)]
    Controller(#[from] fleetcmd_proto::channel::ChannelError),
    /// A component could not be built (a bad token, an unreachable chat
    /// server, a file it names): the message names its section.
    #[error("[{component}]: {message}")]
    Component {
        component: &'static str,
        message: String,
    },
    #[error("{0}")]
    Http(std::io::Error),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// What to do on a stop signal before the process ends: IRC says QUIT
/// (the channel sees the bot leave, not a dead connection).
#[derive(Clone, Default)]
pub struct Stops(Arc<std::sync::Mutex<Vec<StopFn>>>);

type StopFn = Box<dyn Fn() + Send + Sync>;

impl std::fmt::Debug for Stops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map(|s| s.len()).unwrap_or(0);
        f.debug_tuple("Stops").field(&n).finish()
    }
}

impl Stops {
    pub(crate) fn add(&self, stop: impl Fn() + Send + Sync + 'static) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(stop));
    }

    /// Tells every component that says goodbye to say it now.
    pub fn stop_all(&self) {
        for s in self.0.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            s();
        }
    }
}

/// Builds every enabled component in registry order (a bad token or an
/// unreachable chat server fails here, naming the section), binds the HTTP
/// listener when one needs it, then serves until every adapter's input has
/// ended. `on_ready` runs once everything is connected (systemd
/// notification).
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
    // Several gateways on one chat act once on each request: the local
    // record first, then a claim at the controller (`crate::claims`).
    let arbiter: Arc<dyn crate::claims::Arbiter> = Arc::new(ctl.clone());
    let router = Arc::new(Router::new(opts.router_config(), ctl).with_store(&store)?);
    // A request accepted once is refused after a restart too.
    let replay = store.replay()?.with_arbiter(arbiter);
    // Connection chats (IRC, XMPP, Matrix) connect only while this
    // gateway holds their lease (`crate::standby`).
    let chat_lease = crate::standby::Timing {
        ttl: cfg
            .chat_lease_ttl()
            .map_err(|message| LaunchError::Component {
                component: "chat_lease",
                message,
            })?,
    };
    let mut cx = BuildContext::new(
        base,
        Gateway::new(router.clone()),
        replay,
        stops.clone(),
        chat_lease,
    );
    let paths = cfg.paths();
    for entry in components() {
        let component = entry.name;
        let failed = |message: String| LaunchError::Component { component, message };
        match cfg.sections.get(component) {
            Some(section) => {
                let parsed = entry.parse(section, &paths).map_err(failed)?;
                if parsed.enabled {
                    parsed.build(&mut cx).await.map_err(failed)?;
                    tracing::info!(component, "enabled");
                }
            }
            None => entry.absent(&mut cx).map_err(failed)?,
        }
    }
    let assembled = cx.finish();
    let mut gw = assembled.gw;
    let named = assembled.senders;
    // What was owed to the chat when the gateway last stopped.
    gw.spawn_background(crate::resume::run(router.clone(), named.clone()));
    // Service alerts to the components that hook them (PagerDuty,
    // Opsgenie, Statuspage), each behind its own bounded queue.
    let alert_events = if assembled.alert_hooks.is_empty() {
        None
    } else {
        let (tx, rx) = tokio::sync::mpsc::channel(crate::integrations::QUEUE);
        let hooks = crate::integrations::Integrations {
            hooks: assembled.alert_hooks,
        };
        gw.spawn_background(hooks.run(rx));
        Some(tx)
    };
    // Service alerts from the controller into their channels.
    gw.spawn_background(crate::alerts::run(router.clone(), named, alert_events));
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
