//! Why an embedded cluster did not start: which component, and whether it
//! was because another process (or component) already listens on its
//! address, which is what a person running `imctl up` can fix with a flag.

use std::{fmt, io, net::SocketAddr};

/// A part of the embedded cluster that can fail to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// Creating the data directory.
    DataDir,
    /// Reading or writing the cluster key file.
    ClusterKey,
    Presence,
    Profile,
    /// Shard `n`, counted from 1 in the order of `EmbeddedConfig::shards`.
    Shard(usize),
    /// Writing the cluster map.
    ClusterMap,
    /// The gateway (its UDP port, or anything else of its start).
    Gateway,
    /// The gateway's TCP listener for other gateways and map pushes.
    GatewayPeer,
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Component::DataDir => write!(f, "the data directory"),
            Component::ClusterKey => write!(f, "the cluster key"),
            Component::Presence => write!(f, "presence"),
            Component::Profile => write!(f, "profile"),
            Component::Shard(n) => write!(f, "shard {n}"),
            Component::ClusterMap => write!(f, "the cluster map"),
            Component::Gateway => write!(f, "the gateway"),
            Component::GatewayPeer => write!(f, "the gateway's peer listener"),
        }
    }
}

/// The cause is kept as text (like the daemons' own errors) so that a
/// report printing the whole chain does not repeat it; what a caller acts
/// on is in the fields.
#[derive(Debug, thiserror::Error)]
#[error("cannot start {component}: {message}")]
pub struct EmbeddedError {
    pub component: Component,
    /// The address `component` could not listen on because it is taken.
    pub addr_in_use: Option<SocketAddr>,
    pub message: String,
}

impl EmbeddedError {
    pub(crate) fn new(component: Component, cause: impl fmt::Display) -> Self {
        EmbeddedError {
            component,
            addr_in_use: None,
            message: cause.to_string(),
        }
    }

    /// `cause` was binding `addr`: remember the address if it was taken.
    pub(crate) fn listen(
        component: Component,
        addr: SocketAddr,
        error: &io::Error,
        cause: impl fmt::Display,
    ) -> Self {
        EmbeddedError {
            addr_in_use: (error.kind() == io::ErrorKind::AddrInUse).then_some(addr),
            ..EmbeddedError::new(component, cause)
        }
    }
}
