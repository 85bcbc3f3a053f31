//! The client's TCP connector: every connection to the controller carries the
//! options that let an agent notice a vanished controller without the
//! controller answering anything extra (see `channel.rs`).

use std::time::Duration;

use fleetcmd_proto::channel;
use tower_service::Service;

#[tokio::test]
async fn client_connections_carry_the_user_timeout_and_keepalive() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let addr = listener.local_addr().expect("address");
    let accept = tokio::spawn(async move { listener.accept().await.map(|(s, _)| s) });

    let mut tcp = channel::tcp_connector();
    let uri: tonic::codegen::http::Uri = format!("https://{addr}").parse().expect("uri");
    std::future::poll_fn(|cx| tcp.poll_ready(cx))
        .await
        .expect("ready");
    let io = tcp.call(uri).await.expect("connects to the listener");
    let _server = accept.await.expect("joins").expect("accepts");

    let sock = socket2::SockRef::from(io.inner());
    assert_eq!(
        sock.tcp_user_timeout().expect("getsockopt"),
        Some(channel::TCP_USER_TIMEOUT),
        "TCP_USER_TIMEOUT"
    );
    assert!(sock.keepalive().expect("getsockopt"), "SO_KEEPALIVE");
    assert_eq!(
        sock.tcp_keepalive_time().expect("getsockopt"),
        channel::TCP_KEEPALIVE
    );
    assert_eq!(
        sock.tcp_keepalive_interval().expect("getsockopt"),
        channel::TCP_KEEPALIVE_INTERVAL
    );
    assert!(sock.tcp_nodelay().expect("getsockopt"), "TCP_NODELAY");
    // A heartbeat every 10 s (the default) keeps data in flight often
    // enough that the user timeout, not a PING, notices a dead controller.
    assert!(channel::TCP_USER_TIMEOUT <= Duration::from_secs(30));
    assert!(channel::HTTP2_PING_AFTER >= Duration::from_secs(60));
}
