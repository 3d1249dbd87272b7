//! The client side of the UDP session layer over real sockets.
//!
//! * [`driver`]: [`Client`], a tokio driver around one
//!   `proto::session::ClientSession`.
//! * [`echo`]: [`EchoServer`], a tokio driver around
//!   `proto::session::ServerEndpoint` that accepts every login and echoes
//!   every message (tests and `imbench session`).
//!
//! * [`login_clock`]: the freshness value every login carries.
//! * [`sdk`]: the client SDK a chat application uses: login, requests
//!   matched to replies, an outbox re-sent across reconnects, duplicate
//!   deliveries dropped, profile / friend / avatar calls.

pub mod driver;
pub mod echo;
pub mod login_clock;
pub mod sdk;

pub use driver::{Client, DriverConfig, DriverError, DriverStats};
pub use echo::{EchoConfig, EchoServer, EchoStats};
pub use login_clock::next_login_ns;
