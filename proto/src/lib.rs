//! Every byte that crosses a wire or a process boundary.
//!
//! * [`frame`]: the length-prefixed postcard framing used by every TCP link
//!   between daemons (gateway, presence, profile, msgstore).
//! * [`shard`]: the messages of the msgstore shard protocol.
//! * [`profile`]: the messages of the profile service protocol.
//!
//! `proto` never touches a socket, a clock or a thread: it turns bytes into
//! values and values into bytes.

pub mod frame;
pub mod profile;
pub mod shard;
