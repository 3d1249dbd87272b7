//! Every byte that crosses a wire or a process boundary.
//!
//! * [`app`]: what clients and gateways say inside a UDP session.
//! * [`clock`]: governor rate limiters driven by the `now` passed in.
//! * [`cluster`]: the cluster map and the placement of users on shards.
//! * [`frame`]: the length-prefixed postcard framing used by every TCP link
//!   between daemons (gateway, presence, profile, msgstore).
//! * [`groups`]: chat group ids, roles, members and cursors.
//! * [`inbox`]: the receiving side of a mailbox (sans-IO): each message
//!   shown once, in seq order, whether pushed or fetched.
//! * [`peer`]: the gateway-to-gateway link (forwarded messages).
//! * [`shard`]: the messages of the msgstore shard protocol;
//!   [`shard_page`]: a fetch page encoded without copying its records.
//! * [`session`]: the sans-IO secure, reliable UDP session layer between
//!   clients and gateways.
//! * [`presence`]: the messages between gateways and the presence server.
//! * [`profile`]: the messages of the profile service protocol.
//!
//! `proto` never touches a socket, a clock or a thread: it turns bytes into
//! values and values into bytes.

pub mod app;
pub mod clock;
pub mod cluster;
pub mod frame;
pub mod groups;
pub mod inbox;
pub mod link;
pub mod peer;
pub mod presence;
pub mod profile;
pub mod session;
pub mod shard;
pub mod shard_page;
