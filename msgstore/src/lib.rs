//! msgstore: one offline-message storage shard.
//!
//! A shard stores each user's offline messages in mmap-backed bucket files
//! (`buckets/XX/YY`), indexed by an LMDB map user -> bucket + mailbox state,
//! with a sequential write-ahead log as the durability point (group commit:
//! one sync per batch). See `docs/STORAGE.md` for the byte layout and the
//! crash analysis, and `ARCHITECTURE.md` for where this crate sits.
//!
//! * [`Shard`]: the engine, used in-process (tests, benchmarks) and by the
//!   daemon.
//! * [`server`]: the TCP daemon's connection handling.
//! * [`client`]: the client library every other component uses to talk to a
//!   shard.

pub mod client;
pub mod config;
pub mod daemon;
pub(crate) mod engine;
pub mod error;
mod handle;
mod log_writer;
pub mod metrics;
mod migration_client;
pub mod raft;
pub mod rebalance;
pub mod server;

pub use config::{EngineConfig, FsyncPolicy};
/// The kernel's per-process limit on mappings (`vm.max_map_count`), which
/// bounds how many bucket files a shard keeps mapped.
pub use engine::buckets::max_map_count;
pub use error::{Error, Result};
pub use handle::{AppendRequest, Fetched, Shard, Ticket};
pub use proto::shard::{MailboxStats, ShardStats, StoredRecord};
