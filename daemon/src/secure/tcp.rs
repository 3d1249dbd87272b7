//! The socket options of every link between the cluster's processes.
//!
//! A peer that vanishes without closing (its machine died, a partition)
//! leaves the link open at this end for hours by default. Every link is
//! therefore probed when idle (TCP keepalive: the first probe after
//! [`KEEPALIVE_IDLE_MS`] of silence, then every [`KEEPALIVE_INTERVAL_MS`],
//! closed after [`KEEPALIVE_PROBES`] unanswered), and closed when data it
//! sent stays unacknowledged for [`UNACKED_MS_MAX`] (`TCP_USER_TIMEOUT`).
//! The process's end then sees the link fail, drops it and, on the dialing
//! side, dials again. A live idle link (a pooled one) answers the probes
//! from its kernel and is kept; a paused process's kernel answers them
//! too, so a pause alone closes nothing unless data waits longer than
//! [`UNACKED_MS_MAX`].

use socket2::{SockRef, TcpKeepalive};
use std::{io, time::Duration};
use tokio::net::TcpStream;

/// Silence on a link before its first keepalive probe.
pub const KEEPALIVE_IDLE_MS: u64 = 10_000;
/// Between keepalive probes.
pub const KEEPALIVE_INTERVAL_MS: u64 = 5_000;
/// Unanswered probes that close the link (a dead peer is found within
/// idle + probes x interval: 25 s).
pub const KEEPALIVE_PROBES: u32 = 3;
/// Data unacknowledged this long closes the link.
pub const UNACKED_MS_MAX: u64 = 30_000;

/// Set the options on `stream`: no Nagle delay, keepalive probes, and the
/// unacknowledged-data limit.
pub fn tune(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let socket = SockRef::from(stream);
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_millis(KEEPALIVE_IDLE_MS))
        .with_interval(Duration::from_millis(KEEPALIVE_INTERVAL_MS))
        .with_retries(KEEPALIVE_PROBES);
    socket.set_tcp_keepalive(&keepalive)?;
    socket.set_tcp_user_timeout(Some(Duration::from_millis(UNACKED_MS_MAX)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ends of a link, dialed and accepted, carry the options.
    #[tokio::test]
    async fn both_ends_of_a_link_are_probed_when_idle() {
        let (dialed, accepted) = crate::secure::loopback_pair().await;
        for link in [&dialed, &accepted] {
            let socket = SockRef::from(link.reader.tcp());
            assert!(socket.keepalive().unwrap());
            let idle = Duration::from_millis(KEEPALIVE_IDLE_MS);
            assert_eq!(socket.tcp_keepalive_time().unwrap(), idle);
            let interval = Duration::from_millis(KEEPALIVE_INTERVAL_MS);
            assert_eq!(socket.tcp_keepalive_interval().unwrap(), interval);
            assert_eq!(socket.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
            let unacked = Some(Duration::from_millis(UNACKED_MS_MAX));
            assert_eq!(socket.tcp_user_timeout().unwrap(), unacked);
            assert!(socket.tcp_nodelay().unwrap());
        }
    }
}
