//! What a component may reach while it is built: narrow handles, one per
//! kind of contribution, never the router's internals or another
//! component.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::adapters::{AuthFailures, ChatAdapter, ChatSender, HttpInbound};
use crate::controller::GrpcController;
use crate::integrations::AlertHook;
use crate::router::Router;
use crate::store::ReplayGuard;
use crate::{Gateway, launch::Stops};

use super::Commands;

/// The gateway being assembled, as one component sees it.
pub struct BuildContext {
    base: PathBuf,
    gw: Gateway<GrpcController>,
    replay: ReplayGuard,
    stops: Stops,
    senders: Vec<(String, Arc<dyn ChatSender>)>,
    /// Chat adapters built so far, served only once every component is
    /// built: a message read before a later component registered its
    /// commands would be answered "unknown command" (found by the launcher
    /// test of `[[plugin]]`: the console read `clock` before the plugin
    /// component had registered it).
    pending: Vec<PendingAdapter>,
    alert_hooks: Vec<AlertHook>,
    chat_lease: crate::standby::Timing,
}

type PendingAdapter = Box<dyn FnOnce(&mut Gateway<GrpcController>) + Send>;

impl std::fmt::Debug for BuildContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuildContext")
            .field("base", &self.base)
            .field(
                "senders",
                &self.senders.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("alert_hooks", &self.alert_hooks.len())
            .finish_non_exhaustive()
    }
}

/// What the launcher keeps once every component is built.
pub struct Assembled {
    pub gw: Gateway<GrpcController>,
    pub senders: Vec<(String, Arc<dyn ChatSender>)>,
    pub alert_hooks: Vec<AlertHook>,
}

impl BuildContext {
    pub(crate) fn new(
        base: &Path,
        gw: Gateway<GrpcController>,
        replay: ReplayGuard,
        stops: Stops,
        chat_lease: crate::standby::Timing,
    ) -> BuildContext {
        BuildContext {
            base: base.to_path_buf(),
            gw,
            replay,
            stops,
            senders: Vec::new(),
            pending: Vec::new(),
            alert_hooks: Vec::new(),
            chat_lease,
        }
    }

    /// The lease under which connection chats (IRC, XMPP, Matrix) connect
    /// (`crate::standby`, `chat_lease` in gateway.toml).
    pub fn chat_lease(&self) -> crate::standby::Timing {
        self.chat_lease
    }

    /// Starts serving every chat adapter, now that every command is
    /// registered.
    pub(crate) fn finish(mut self) -> Assembled {
        for serve in self.pending.drain(..) {
            serve(&mut self.gw);
        }
        Assembled {
            gw: self.gw,
            senders: self.senders,
            alert_hooks: self.alert_hooks,
        }
    }

    /// The config file's directory (relative paths are already resolved
    /// against it; this is for files read at build time).
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// Requests accepted once (by id or signature) are refused again, also
    /// after a restart: every inbound path that can be replayed uses it.
    pub fn replay_guard(&self) -> ReplayGuard {
        self.replay.clone()
    }

    /// Where refused inbound requests are reported (audited as
    /// `auth_failed`, rate-limited).
    pub fn auth_failures(&self) -> AuthFailures {
        self.gw.auth_failures()
    }

    /// Serves `adapter` on the router under `name` (the channel scheme its
    /// replies go to), once every component is built; its sender is
    /// reachable by that name at once.
    pub fn serve(&mut self, name: &str, adapter: impl ChatAdapter) {
        self.senders.push((name.to_string(), adapter.sender()));
        self.pending.push(Box::new(move |gw| gw.add(adapter)));
    }

    /// Serves `adapter` (see [`BuildContext::serve`]) and mounts its
    /// routes, with the gateway's replay guard and auth-failure reporter.
    pub fn serve_http(&mut self, name: &str, adapter: impl HttpInbound) {
        adapter.use_replay_guard(self.replay_guard());
        adapter.report_auth_failures(self.auth_failures());
        self.routes(adapter.routes());
        self.serve(name, adapter);
    }

    /// The sending halves of the chat platforms built so far, by name.
    pub fn senders(&self) -> Vec<(String, Arc<dyn ChatSender>)> {
        self.senders.clone()
    }

    /// Mounts HTTP routes on the gateway's one listener.
    pub fn routes(&mut self, routes: axum::Router) {
        self.gw.add_routes(routes);
    }

    /// Adds chat commands (guarded, audited and listed by the router).
    pub fn commands(&mut self, commands: Arc<dyn Commands>) -> Result<(), String> {
        self.gw
            .router()
            .register_commands(commands)
            .map_err(|e| e.to_string())
    }

    /// Receives every service alert event from the controller, in order,
    /// behind its own bounded queue.
    pub fn alert_hook(&mut self, hook: AlertHook) {
        self.alert_hooks.push(hook);
    }

    /// Runs `task` for as long as the gateway runs.
    pub fn background(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.gw.spawn_background(task);
    }

    /// Runs `stop` when the gateway is asked to stop, before it ends (IRC
    /// says QUIT).
    pub fn on_stop(&mut self, stop: impl Fn() + Send + Sync + 'static) {
        self.stops.add(stop);
    }

    /// The router, for integrations that read through it what the caller
    /// of no command may read (the audit channel's feed).
    pub fn router(&self) -> &Arc<Router<GrpcController>> {
        self.gw.router()
    }
}
