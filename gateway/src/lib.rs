//! The login gateway: the only process clients reach, over UDP.
//!
//! * [`router`]: the routing logic, sans-IO: sessions, sends, pushes,
//!   dedupe, rate limits, who may write to whom, timers.
//! * [`driver`]: the event loop around the session endpoint and the
//!   router (socket, clock, tasks for service work).
//! * [`login`]: checking a login off the loop (password via profile, or a
//!   resume token).
//! * [`calls`]: the service work: client calls answered by presence,
//!   profile and the shards, stores, notifications, relation reads;
//!   [`group_calls`]: the same for chat groups (paging a group's mailbox,
//!   cursors, the group list, forwarding a group message once per gateway).
//! * [`peers`]: the gateway-to-gateway link (forwarded messages).
//! * [`shards`]: placement by consistent hashing over the cluster map in
//!   use, following `Moved` and `Busy`; [`shard_links`]: the connections.
//! * [`map_update`]: which cluster map is in use (at start, and pushed);
//!   [`map_push`]: pushing one to a gateway (`imctl rebalance`).
//! * [`dedupe`]: outcomes of recent sends, for retries.
//! * [`resume`]: resume tokens. [`keys`]: key files. [`config`]: TOML.
//! * [`daemon`]: start and stop.

pub mod calls;
pub mod config;
pub mod daemon;
pub mod dedupe;
pub mod driver;
pub mod group_calls;
pub mod keys;
pub mod login;
pub mod map_push;
pub mod map_update;
pub mod metrics;
pub mod peers;
pub mod resume;
pub mod router;
pub mod services;
pub mod shard_links;
pub mod shards;
