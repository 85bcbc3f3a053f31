//! `tcp`: can a connection be opened within the timeout? Reports the
//! connect time as perfdata (`time=0.0012s`).

use std::time::{Duration, Instant};

use fleetcmd_core::nagios::CheckState;

use super::{Outcome, humantime, perf};

pub(super) async fn run(address: &str, timeout: Duration) -> Outcome {
    let started = Instant::now();
    // Name resolution counts against the timeout too.
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address)).await {
        Ok(Ok(stream)) => {
            let took = started.elapsed().as_secs_f64();
            let peer = stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| address.to_owned());
            drop(stream);
            let mut out = Outcome::new(
                CheckState::Ok,
                format!("TCP OK - connected to {peer} in {took:.4} s"),
            );
            out.perfdata.push(perf(
                "time",
                took,
                "s",
                "",
                "",
                Some(0.0),
                Some(timeout.as_secs_f64()),
            ));
            out
        }
        Ok(Err(e)) => Outcome::new(
            CheckState::Critical,
            format!("TCP CRITICAL - connect to {address}: {e}"),
        ),
        Err(_) => Outcome::new(
            CheckState::Critical,
            format!(
                "TCP CRITICAL - no connection to {address} within {}",
                humantime(timeout)
            ),
        ),
    }
}
