//! The client side of the UDP session layer over real sockets.
//!
//! * [`udp`]: batched UDP I/O (`recvmmsg` / `sendmmsg`) on a tokio socket,
//!   shared with the gateway.
//! * [`driver`]: [`Client`], a tokio driver around one
//!   `proto::session::ClientSession`.
//! * [`echo`]: [`EchoServer`], a tokio driver around
//!   `proto::session::ServerEndpoint` that accepts every login and echoes
//!   every message (tests and `imbench session`).
//!
//! * [`sdk`]: the client SDK a chat application uses: login, requests
//!   matched to replies, an outbox re-sent across reconnects, duplicate
//!   deliveries dropped, profile / friend / avatar calls.

pub mod driver;
pub mod echo;
pub mod sdk;
pub mod udp;

pub use driver::{Client, DriverConfig, DriverError, DriverStats};
pub use echo::{EchoConfig, EchoServer, EchoStats};

use std::time::Instant;

/// Sleep until `deadline`, or forever without one.
pub async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
