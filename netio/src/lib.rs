//! Network I/O that the gateway, the client SDK and the benchmarks share,
//! kept apart so that none of them depends on another for it.
//!
//! * [`udp`]: batched UDP I/O (`recvmmsg` / `sendmmsg`) on a tokio socket.
//! * [`sleep_until`]: the optional deadline every event loop selects on.

pub mod udp;

use std::time::Instant;

/// Sleep until `deadline`, or forever without one: an event loop whose
/// session layer has no timer pending selects on this unchanged.
pub async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
