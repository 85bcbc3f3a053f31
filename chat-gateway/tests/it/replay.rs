//! Replays across a gateway restart: a signed request captured from the
//! wire and sent again after the gateway was stopped and a new one started
//! on the same state directory is refused as a replay and reported
//! (`auth_failed`), for the generic webhooks and `/notify`. (Slack,
//! Campfire and Mattermost have theirs next to their other tests.)

use fleetcmd_gateway::adapters::HttpInbound;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use fleetcmd_gateway::adapters::webhook::{WebhookAdapter, WebhookConfig, sign};
use fleetcmd_gateway::adapters::{
    AdapterError, AuthFailure, AuthFailures, BoxFuture, ChatAdapter, ChatSender, MessageRef, Reply,
};
use fleetcmd_gateway::notify::{NOTIFY_PATH, NotifyConfig};
use fleetcmd_gateway::secret::SecretString;
use fleetcmd_gateway::store::GatewayStore;
use tokio::sync::{mpsc, oneshot};

use crate::campfire::client;
use crate::webhook::{SECRET, hook, line, now, post_signed};

/// One running gateway's HTTP side: stop it with [`Running::stop`].
struct Running {
    url: String,
    stop: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    reports: mpsc::Receiver<AuthFailure>,
}

impl Running {
    /// Serves `routes` the way the gateway does (its listener and limits).
    async fn start(routes: axum::Router, reports: mpsc::Receiver<AuthFailure>) -> Running {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(fleetcmd_gateway::http::serve(listener, routes, async {
            let _ = stopped.await;
        }));
        Running {
            url: format!("http://{addr}"),
            stop,
            server,
            reports,
        }
    }

    /// Stops the listener and waits for it to end (its routes, and the
    /// state they hold, are dropped).
    async fn stop(self) -> mpsc::Receiver<AuthFailure> {
        let _ = self.stop.send(());
        let ended = tokio::time::timeout(Duration::from_secs(10), self.server)
            .await
            .unwrap_or_else(|_| panic!("the listener did not stop"));
        ended
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        self.reports
    }
}

fn reported(rx: &mut mpsc::Receiver<AuthFailure>) -> Vec<String> {
    let mut got = Vec::new();
    while let Ok(f) = rx.try_recv() {
        got.push(format!("{} {} {}", f.adapter, f.source, f.detail));
    }
    got
}

/// A webhook gateway on the state directory `dir`.
async fn webhook_gateway(dir: &Path) -> (Running, WebhookAdapter) {
    let store = GatewayStore::open(dir).unwrap_or_else(|e| panic!("{e}"));
    let adapter = WebhookAdapter::new(&WebhookConfig {
        incoming: vec![hook(None, 100)],
        outgoing: vec![],
    })
    .unwrap_or_else(|e| panic!("{e}"));
    adapter.use_replay_guard(store.replay().unwrap_or_else(|e| panic!("{e}")));
    let (failures, reports) = AuthFailures::channel(16);
    adapter.report_auth_failures(failures);
    (Running::start(adapter.routes(), reports).await, adapter)
}

#[tokio::test]
async fn a_signed_webhook_replayed_after_a_gateway_restart_is_refused_and_reported() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (ts, body) = (now(), line("alice", "", "!run uptime on all"));

    let (gw, mut adapter) = webhook_gateway(dir.path()).await;
    let first = post_signed(&format!("{}/webhook/ops", gw.url), SECRET, ts, body.clone()).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.body);
    let routed = tokio::time::timeout(Duration::from_secs(5), adapter.recv())
        .await
        .unwrap_or_else(|_| panic!("nothing routed"))
        .unwrap_or_else(|| panic!("closed"));
    assert_eq!(routed.text, "!run uptime on all");
    // Stopped: the listener, the adapter and the store are gone.
    let mut reports = gw.stop().await;
    drop(adapter);
    assert!(reported(&mut reports).is_empty());

    // A new gateway on the same state directory; the captured request
    // again, inside its signature window.
    let (gw, mut adapter) = webhook_gateway(dir.path()).await;
    let again = post_signed(&format!("{}/webhook/ops", gw.url), SECRET, ts, body).await;
    assert_eq!(again.status, StatusCode::CONFLICT, "{}", again.body);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), adapter.recv())
            .await
            .is_err(),
        "the replay was routed"
    );
    // A fresh request still runs.
    let fresh = post_signed(
        &format!("{}/webhook/ops", gw.url),
        SECRET,
        now(),
        line("alice", "", "whoami"),
    )
    .await;
    assert_eq!(fresh.status, StatusCode::ACCEPTED, "{}", fresh.body);
    let mut reports = gw.stop().await;
    assert_eq!(
        reported(&mut reports),
        ["webhook:ops /webhook/ops replayed request (409)"]
    );
}

#[derive(Default)]
struct Posted(Mutex<Vec<String>>);

impl ChatSender for Posted {
    fn send<'a>(
        &'a self,
        channel: &'a str,
        reply: Reply,
    ) -> BoxFuture<'a, Result<MessageRef, AdapterError>> {
        Box::pin(async move {
            let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner());
            v.push(reply.plain());
            Ok(MessageRef {
                channel: channel.to_string(),
                id: v.len().to_string(),
            })
        })
    }
    fn edit<'a>(
        &'a self,
        _msg: &'a MessageRef,
        _reply: Reply,
    ) -> BoxFuture<'a, Result<(), AdapterError>> {
        Box::pin(async { Ok(()) })
    }
}

const NOTIFY_SECRET: &str = "0123456789abcdef0123456789abcdef";

async fn notify_gateway(dir: &Path, posted: Arc<Posted>) -> Running {
    let store = GatewayStore::open(dir).unwrap_or_else(|e| panic!("{e}"));
    let (failures, reports) = AuthFailures::channel(16);
    let routes = fleetcmd_gateway::notify::routes(
        &NotifyConfig {
            secret: Some(SecretString::new(NOTIFY_SECRET)),
            secret_file: None,
            channels: vec![],
        },
        vec![("irc".to_string(), posted as Arc<dyn ChatSender>)],
        failures,
        store.replay().unwrap_or_else(|e| panic!("{e}")),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    Running::start(routes, reports).await
}

async fn post_notify(url: &str, ts: u64, body: &[u8]) -> StatusCode {
    let sig = sign::sign(NOTIFY_SECRET.as_bytes(), ts, body);
    client()
        .post(format!("{url}{NOTIFY_PATH}"))
        .header(sign::TIMESTAMP_HEADER, ts.to_string())
        .header(sign::SIGNATURE_HEADER, sig)
        .body(body.to_vec())
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .status()
}

#[tokio::test]
async fn a_signed_notification_replayed_after_a_gateway_restart_is_refused_and_reported() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let posted = Arc::new(Posted::default());
    let body = br#"{"channel":"irc:test:#ops","severity":"critical","text":"disk full on db-1","source":"nagios"}"#;
    let ts = now();

    let gw = notify_gateway(dir.path(), posted.clone()).await;
    assert_eq!(post_notify(&gw.url, ts, body).await, StatusCode::OK);
    let mut reports = gw.stop().await;
    assert!(reported(&mut reports).is_empty());

    let gw = notify_gateway(dir.path(), posted.clone()).await;
    assert_eq!(post_notify(&gw.url, ts, body).await, StatusCode::CONFLICT);
    let mut reports = gw.stop().await;
    assert_eq!(
        reported(&mut reports),
        ["notify /notify notification refused: replayed request (409)"]
    );
    let texts = posted.0.lock().map(|v| v.clone()).unwrap_or_default();
    assert_eq!(texts.len(), 1, "posted once: {texts:?}");
    assert!(texts[0].contains("disk full on db-1"), "{texts:?}");
}
