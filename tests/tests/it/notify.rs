//! Monitoring notifications into chat: `fleetcmd notify` (what a Nagios,
//! Zabbix or Sensu notification command runs) signs a notification, the
//! gateway's `/notify` route checks the signature and the channel and posts
//! it through the adapter for that channel; forged ones are refused and
//! reported.

use std::sync::{Arc, Mutex};

use fleetcmd_cli::notify_cmd::{NotifyArgs, run};
use fleetcmd_gateway::adapters::{
    AdapterError, AuthFailures, BoxFuture, ChatSender, MessageRef, Reply,
};
use fleetcmd_gateway::notify::{NotifyConfig, routes};
use fleetcmd_gateway::secret::SecretString;

#[derive(Default)]
struct Posted(Mutex<Vec<(String, Reply)>>);

impl ChatSender for Posted {
    fn send<'a>(
        &'a self,
        channel: &'a str,
        reply: Reply,
    ) -> BoxFuture<'a, Result<MessageRef, AdapterError>> {
        Box::pin(async move {
            let mut v = self.0.lock().unwrap_or_else(|p| p.into_inner());
            v.push((channel.to_string(), reply));
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

const SECRET: &str = "0123456789abcdef0123456789abcdef";

#[tokio::test]
async fn nagios_style_notifications_reach_the_channel_and_forgeries_do_not() {
    let posted = Arc::new(Posted::default());
    let (failures, mut refused) = AuthFailures::channel(16);
    let cfg = NotifyConfig {
        secret: Some(SecretString::new(SECRET)),
        secret_file: None,
        channels: vec!["irc:test:#ops".into(), "slack:T1:C1".into()],
    };
    let app = routes(
        &cfg,
        vec![("irc".to_string(), posted.clone() as Arc<dyn ChatSender>)],
        failures,
        fleetcmd_gateway::store::ReplayGuard::in_process(),
    )
    .expect("routes");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let dir = tempfile::tempdir().expect("tmp");
    let good = dir.path().join("notify.secret");
    std::fs::write(&good, format!("{SECRET}\n")).expect("secret");
    let bad = dir.path().join("wrong.secret");
    std::fs::write(&bad, "not-the-secret-at-all-000000").expect("secret");
    let args = |secret: &std::path::Path, channel: &str, severity: &str| NotifyArgs {
        url: format!("http://{addr}"),
        secret_file: secret.to_path_buf(),
        channel: channel.into(),
        severity: severity.into(),
        text: "HOST web-1 is DOWN\nPING CRITICAL - Packet loss = 100%\n@here !run reboot on all"
            .into(),
        source: "nagios".into(),
    };

    if let Err(f) = run(args(&good, "irc:test:#ops", "DOWN")).await {
        panic!("not posted: {:#}", f.error);
    }
    let got = posted.0.lock().map(|v| v.clone()).unwrap_or_default();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "irc:test:#ops");
    assert_eq!(
        got[0].1.header,
        "[CRITICAL] from nagios: HOST web-1 is DOWN"
    );
    // The rest is data for the adapter to render inert (it never starts a line).
    assert_eq!(
        got[0].1.lines,
        [
            "PING CRITICAL - Packet loss = 100%",
            "@here !run reboot on all"
        ]
    );

    let err = run(args(&bad, "irc:test:#ops", "warning"))
        .await
        .expect_err("wrong secret");
    assert!(err.error.to_string().contains("401"), "{:#}", err.error);
    let f = refused.try_recv().expect("the forgery was reported");
    assert_eq!(f.adapter, "notify");
    assert!(f.detail.contains("signature"), "{f:?}");

    let err = run(args(&good, "irc:test:#secret", "ok"))
        .await
        .expect_err("channel not allowed");
    assert!(err.error.to_string().contains("403"), "{:#}", err.error);
    let err = run(args(&good, "slack:T1:C1", "ok"))
        .await
        .expect_err("no slack adapter here");
    assert!(err.error.to_string().contains("404"), "{:#}", err.error);
    let err = run(args(&good, "irc:test:#ops", "purple"))
        .await
        .expect_err("bad severity");
    assert_eq!(err.code, 64, "{:#}", err.error);
    assert_eq!(posted.0.lock().map(|v| v.len()).unwrap_or(0), 1);
}
