//! presence: the in-memory online-status server.
//!
//! Answers "is this user online, and on which gateway and session" for every
//! gateway, pushes changes of watched users, and survives both a gateway's
//! death (its users go offline after a grace period) and its own restart
//! (gateways send their complete session lists again).
//!
//! * [`table`]: the compact sharded user -> slot table.
//! * [`State`]: table + gateways + watchers; every operation and the events
//!   it produces (no sockets, no clocks).
//! * [`server`]: the TCP daemon's connection handling; [`daemon`]: its
//!   config and startup.
//! * [`client`]: [`PresenceClient`], the library gateways use.

pub mod client;
pub mod daemon;
pub mod metrics;
pub mod replicas;
pub mod server;
pub mod state;
pub mod table;

pub use client::{ClientConfig, ClientError, PresenceClient, PresenceEvent};
pub use proto::presence::{Entry, SessionInfo, Status};
pub use replicas::PresenceReplicas;
pub use state::{Limits, State};
