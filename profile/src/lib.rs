//! profile: accounts, profiles, friend groups, avatars and chat groups
//! (members, roles, invitations, join requests, read cursors).
//!
//! * [`service::Service`]: the service itself (store + password pool +
//!   change notifications), used by the daemon and in-process by tests.
//! * [`store`]: LMDB storage, one writer thread, concurrent readers
//!   (layout in `docs/STORAGE.md`).
//! * [`server`] / [`daemon`]: the TCP daemon (`profile` binary).
//! * [`client::ProfileClient`]: the async client the gateway and imctl use
//!   (reconnects by itself; pushed invalidations and group changes on a
//!   bounded channel).
//! * [`passwords`]: argon2id on a bounded thread pool.
//! * [`avatar`]: image checks and content addresses.
//! * [`raft`]: the store as the state machine of a replicated profile
//!   group (openraft), with the shared `replication` pieces.

pub mod avatar;
pub mod client;
pub mod config;
pub mod daemon;
pub mod error;
pub mod fields;
pub mod metrics;
pub mod notify;
pub mod passwords;
pub mod raft;
pub mod server;
pub mod service;
pub mod store;
pub mod writes;

pub use client::{ClientConfig, ClientError, ProfileClient};
pub use config::Config;
pub use error::{Error, Result};
pub use proto::profile::{Event, UserId};
