//! The Prometheus `/metrics` HTTP endpoint: a minimal HTTP/1.1 server of
//! our own on an [`Acceptor`], so it backs off under descriptor exhaustion
//! like every other listener (the exporter crate's own listener retries a
//! failed accept at once, in a busy loop).
//!
//! Every request (any method, any path but `/health`) is answered with the
//! rendered metrics and the connection is closed. Limits: at most
//! [`METRICS_CONNECTIONS_MAX`] connections at once (further ones are
//! accepted and closed at once), a request head of at most
//! [`REQUEST_HEAD_BYTES_MAX`] bytes, read within [`REQUEST_TIMEOUT`].

use crate::accept::{Acceptor, LogLimiter};
use metrics_exporter_prometheus::PrometheusHandle;
use std::{sync::Arc, time::Duration};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::Semaphore,
};

/// Scrapes served at once at most.
pub const METRICS_CONNECTIONS_MAX: usize = 64;
/// Largest request head read; a longer one is answered anyway.
pub const REQUEST_HEAD_BYTES_MAX: usize = 8 * 1024;
/// A client that has not sent its request head by then is dropped.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the recorder's histograms are drained.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Serve `handle` on `acceptor` forever (ends with the runtime).
pub(crate) async fn serve(mut acceptor: Acceptor, handle: PrometheusHandle) {
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(UPKEEP_INTERVAL).await;
            upkeep.run_upkeep();
        }
    });
    let slots = Arc::new(Semaphore::new(METRICS_CONNECTIONS_MAX));
    let mut refusals = LogLimiter::new(crate::accept::WARN_INTERVAL);
    loop {
        let (stream, from) = acceptor.accept().await;
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            if let Some(held_back) = refusals.check() {
                tracing::warn!(%from, held_back, "too many metrics scrapes at once; closing");
            }
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, handle)).await;
        });
    }
}

async fn answer(mut stream: TcpStream, handle: PrometheusHandle) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < REQUEST_HEAD_BYTES_MAX {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let path = head
        .split(|&b| b == b' ')
        .nth(1)
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let body = if path == "/health" {
        "OK".to_string()
    } else {
        crate::heap::refresh();
        tokio::task::spawn_blocking(move || handle.render())
            .await
            .map_err(std::io::Error::other)?
    };
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
