//! Every TCP link between the cluster's processes, authenticated and
//! encrypted with the cluster key: `proto::link`'s handshake and records,
//! run over tokio sockets (PROTOCOL.md §8).
//!
//! * [`key`]: the process's cluster key (installed once, like an Erlang
//!   node's cookie), key files.
//! * [`stream`]: [`Link`], its [`LinkReader`] (an `AsyncRead`) and
//!   [`LinkWriter`] (explicit `send`/`flush`: nothing sealed can be left
//!   unflushed by a caller that forgot to flush).
//! * [`listener`]: [`SecureListener`], the accept side: handshakes run
//!   concurrently under a deadline and per-source and total limits, and only
//!   authenticated links reach the daemon, so strangers never hold the
//!   daemon's connection slots.
//! * [`connect`]: the dialing side.
//! * [`tcp`]: the socket options of every link (keepalive probes and an
//!   unacknowledged-data limit, so a vanished peer's link closes).

pub mod key;
pub mod listener;
pub mod stream;
pub mod tcp;

pub use key::{
    generate, install_key, key, load_key_file, load_or_create_key_file, write_key_file, KeyArgs,
    KeyError,
};
pub use listener::{GateLimits, SecureListener};
pub use proto::link::ClusterKey;
pub use stream::{Link, LinkReader, LinkWriter};

use proto::link::{Dialer, HELLO_BYTES};
use std::{io, time::Duration};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, ToSocketAddrs},
};

/// A handshake (either side) not finished by then fails.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 5_000;

/// Dial `addr` and authenticate with the process's cluster key.
pub async fn connect(addr: impl ToSocketAddrs) -> io::Result<Link> {
    connect_with(addr, key()).await
}

/// Dial `addr` and authenticate with `key`.
pub async fn connect_with(addr: impl ToSocketAddrs, key: &ClusterKey) -> io::Result<Link> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    dial(stream, key).await
}

/// Authenticate an open connection as its dialer.
pub async fn dial(mut stream: TcpStream, key: &ClusterKey) -> io::Result<Link> {
    let timeout = Duration::from_millis(HANDSHAKE_TIMEOUT_MS);
    let handshake = async {
        let (dialer, hello) = Dialer::new(key, key::random_seed());
        stream.write_all(&hello).await?;
        let mut answer = [0u8; HELLO_BYTES];
        stream.read_exact(&mut answer).await.map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                refused()
            } else {
                e
            }
        })?;
        dialer.finish(&answer).map_err(invalid)
    };
    let keys = tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "link handshake timed out"))??;
    Link::new(stream, keys)
}

fn refused() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionRefused,
        "the peer closed the link during the handshake: it holds another cluster key, or is no cluster process",
    )
}

pub(crate) fn invalid(e: proto::link::LinkError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Two ends of one link over loopback, for tests: (dialer, listener).
pub async fn loopback_pair() -> (Link, Link) {
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let mut listener = SecureListener::new(tcp, "loopback_pair", GateLimits::default());
    let addr = listener.local_addr().expect("bound");
    let (dialed, accepted) = tokio::join!(connect(addr), listener.accept());
    (dialed.expect("dial loopback"), accepted)
}
