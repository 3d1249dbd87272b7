//! The replication links of a group (a shard group, the profile group):
//! one authenticated connection per peer (`daemon::secure`), the shard
//! protocol's framing (`docs/PROTOCOL.md` §1.1: a u32 length, a postcard
//! body), one request at a time per connection. Generic over the group's
//! Raft types ([`GroupTypes`]).
//!
//! The same port carries the operator's group commands (`imctl shard
//! group`): [`PeerRequest::Admin`].
//!
//! Limits: a frame body over [`PEER_FRAME_BODY_BYTES_MAX`] closes the
//! connection (counted in `<prefix>_raft_bad_frames_total`); an RPC that
//! gets no answer within openraft's deadline is a timeout and the
//! connection is dropped (the next RPC dials again).

use crate::{metrics::metric_name, GroupTypes, Replica, ReplicaId};
use bytes::BytesMut;
use openraft::{
    error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable},
    network::{RPCOption, RaftNetwork, RaftNetworkFactory},
    raft::{
        AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest,
        InstallSnapshotResponse, VoteRequest, VoteResponse,
    },
};
use proto::frame::{self, Decoded};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest frame body on a replication link: an AppendEntries of
/// `max_payload_entries` batches (each at most about
/// [`super::BATCH_BYTES_MAX`]) or a snapshot chunk, with room to spare.
pub const PEER_FRAME_BODY_BYTES_MAX: usize = 80 * 1024 * 1024;

/// How long dialing a peer may take before the RPC counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// A request on the replication port.
#[derive(Debug, Serialize, Deserialize)]
#[serde(bound = "")]
#[allow(clippy::large_enum_variant)]
pub enum PeerRequest<C: GroupTypes> {
    AppendEntries(AppendEntriesRequest<C>),
    Vote(VoteRequest<ReplicaId>),
    InstallSnapshot(InstallSnapshotRequest<C>),
    Admin(AdminRequest),
}

/// An operator's command to a replica (`imctl shard group`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AdminRequest {
    /// Make a new group of these members (sent to one of them).
    Init {
        members: BTreeMap<ReplicaId, Replica>,
    },
    /// Start replicating to a new replica (it catches up by snapshot, then
    /// log); answered once it has caught up.
    AddLearner { id: ReplicaId, replica: Replica },
    /// Make the group's voters exactly these (learners among them are
    /// promoted; voters not among them are removed).
    ChangeMembership { voters: Vec<ReplicaId> },
    /// This replica's view of the group.
    Status,
    /// Asked of the leader by a follower that serves a read: confirm the
    /// leadership (a read index) and answer the index the follower must
    /// have applied before it reads.
    ReadIndex,
    /// Asked of the leader by a replica whose log was damaged (it lost
    /// entries it may have acknowledged): take it out of the group, as
    /// voter and as learner. `Done` also if it is no member.
    Leave { id: ReplicaId },
    /// Asked of the leader by that replica once out of the group: add it
    /// back as a learner, answer once it has caught up and is a voter
    /// again (`Done` at once if it is a voter).
    Rejoin { id: ReplicaId, replica: Replica },
    /// The same of a replica that was only a learner: add it back as a
    /// learner, answer once it has caught up; it stays a learner (`Done`
    /// at once if it is a member).
    RejoinAsLearner { id: ReplicaId, replica: Replica },
}

/// What an admin command answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AdminResponse {
    Done,
    Status(GroupStatus),
    /// Not done; `leader` (its replication address), if known, can do it.
    NotLeader {
        leader: Option<String>,
    },
    Failed(String),
    /// The leader's read index (none: nothing committed yet).
    ReadIndex(Option<u64>),
}

/// A replica's view of its group (from openraft's metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub id: ReplicaId,
    /// `leader`, `follower`, `candidate` or `learner`.
    pub role: String,
    pub term: u64,
    pub leader: Option<ReplicaId>,
    pub last_log_index: Option<u64>,
    pub committed_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub voters: Vec<ReplicaId>,
    pub learners: Vec<ReplicaId>,
    pub members: BTreeMap<ReplicaId, Replica>,
    /// On the leader: each replica's highest matched log index.
    pub matched: BTreeMap<ReplicaId, Option<u64>>,
}

/// An answer on the replication port. Raft errors travel as their
/// `Display` text: the caller only needs to know the call failed.
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerResponse {
    AppendEntries(Result<AppendEntriesResponse<ReplicaId>, RaftError<ReplicaId>>),
    Vote(Result<VoteResponse<ReplicaId>, RaftError<ReplicaId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<ReplicaId>, RaftError<ReplicaId, InstallSnapshotError>>,
    ),
    Admin(AdminResponse),
}

/// Failures of one exchange on a replication link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot reach {addr}: {error}")]
    Connect { addr: String, error: String },
    #[error("link to {addr} failed: {error}")]
    Io { addr: String, error: std::io::Error },
    #[error("bad frame from {addr}: {error}")]
    Frame { addr: String, error: String },
    #[error("no answer from {addr} within {ms} ms")]
    Timeout { addr: String, ms: u128 },
    #[error("{addr} answered a different kind of response")]
    Unexpected { addr: String },
}

/// Idle authenticated connections to peers, kept for the next client.
///
/// openraft makes a new client per follower for every leadership check of
/// a linearizable read (and for each election), so without a pool every
/// read would cost a Noise handshake and, under load, more handshakes from
/// one address than a listener's per-source limit.
#[derive(Default)]
pub struct LinkPool {
    idle: Mutex<HashMap<String, Vec<daemon::secure::Link>>>,
}

impl LinkPool {
    fn take(&self, addr: &str) -> Option<daemon::secure::Link> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let links = idle.get_mut(addr)?;
        let link = links.pop();
        if links.is_empty() {
            idle.remove(addr);
        }
        link
    }

    fn put(&self, addr: &str, link: daemon::secure::Link) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let links = idle.entry(addr.to_owned()).or_default();
        if links.len() < POOL_LINKS_PER_PEER_MAX {
            links.push(link);
        }
    }
}

/// Idle links kept per peer at most; more are closed.
pub const POOL_LINKS_PER_PEER_MAX: usize = 4;

/// One request/answer connection to a peer, dialed (or taken from the
/// pool) on first use and after any failure. A connection whose last
/// exchange finished goes back to the pool when the link is dropped; one
/// cut off mid-exchange is closed (its stream would be out of step).
pub struct Link {
    addr: String,
    stream: Option<daemon::secure::Link>,
    /// No exchange is half done on `stream`.
    clean: bool,
    buf: BytesMut,
    pool: Option<Arc<LinkPool>>,
}

impl Drop for Link {
    fn drop(&mut self) {
        if let (Some(stream), Some(pool), true) = (self.stream.take(), &self.pool, self.clean) {
            pool.put(&self.addr, stream);
        }
    }
}

impl Link {
    pub fn new(addr: String) -> Link {
        Link::with_pool(addr, None)
    }

    /// A link that takes its connection from `pool` and gives it back.
    pub fn pooled(addr: String, pool: Arc<LinkPool>) -> Link {
        Link::with_pool(addr, Some(pool))
    }

    fn with_pool(addr: String, pool: Option<Arc<LinkPool>>) -> Link {
        Link {
            addr,
            stream: None,
            clean: true,
            buf: BytesMut::new(),
            pool,
        }
    }

    /// Send `request` and wait for its answer within `deadline` (a dial,
    /// if needed, has its own [`CONNECT_TIMEOUT`]: a handshake is not
    /// counted against a heartbeat's deadline).
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &mut self,
        request: &Req,
        deadline: Duration,
    ) -> Result<Resp, LinkError> {
        let addr = self.addr.clone();
        if !self.clean {
            // The last call was cut off mid-exchange: its answer may still come.
            self.stream = None;
            self.clean = true;
        }
        self.connected().await?;
        self.clean = false;
        let result = tokio::time::timeout(deadline, self.exchange(request)).await;
        self.clean = true;
        match result {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => {
                self.stream = None;
                Err(e)
            }
            Err(_) => {
                self.stream = None;
                Err(LinkError::Timeout {
                    addr,
                    ms: deadline.as_millis(),
                })
            }
        }
    }

    async fn exchange<Req: Serialize, Resp: DeserializeOwned>(
        &mut self,
        request: &Req,
    ) -> Result<Resp, LinkError> {
        let mut bytes = Vec::new();
        frame::encode(request, PEER_FRAME_BODY_BYTES_MAX, &mut bytes).map_err(|e| {
            LinkError::Frame {
                addr: self.addr.clone(),
                error: e.to_string(),
            }
        })?;
        let stream = self.connected().await?;
        let io = |error| LinkError::Io {
            addr: String::new(),
            error,
        };
        stream.writer.send(&bytes).await.map_err(io)?;
        self.buf.clear();
        read_frame(
            &mut self.stream.as_mut().expect("connected").reader,
            &mut self.buf,
        )
        .await
        .map_err(|e| e.at(&self.addr))
    }

    async fn connected(&mut self) -> Result<&mut daemon::secure::Link, LinkError> {
        if self.stream.is_none() {
            self.stream = self.pool.as_ref().and_then(|p| p.take(&self.addr));
        }
        if self.stream.is_none() {
            let dial = tokio::time::timeout(CONNECT_TIMEOUT, daemon::secure::connect(&self.addr));
            let stream = match dial.await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    return Err(LinkError::Connect {
                        addr: self.addr.clone(),
                        error: e.to_string(),
                    })
                }
                Err(_) => {
                    return Err(LinkError::Connect {
                        addr: self.addr.clone(),
                        error: "timed out".into(),
                    })
                }
            };
            self.stream = Some(stream);
        }
        Ok(self.stream.as_mut().expect("just set"))
    }
}

impl LinkError {
    fn at(self, addr: &str) -> LinkError {
        match self {
            LinkError::Io { error, .. } => LinkError::Io {
                addr: addr.into(),
                error,
            },
            LinkError::Frame { error, .. } => LinkError::Frame {
                addr: addr.into(),
                error,
            },
            other => other,
        }
    }
}

/// Read one frame from `stream` (bytes beyond it stay in `buf`). `Ok(None)`
/// at a clean end of stream before any byte of a frame.
pub async fn read_frame_or_end<T: DeserializeOwned>(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
) -> Result<Option<T>, LinkError> {
    loop {
        match frame::decode::<T>(buf, PEER_FRAME_BODY_BYTES_MAX) {
            Ok(Decoded::Frame(msg)) => return Ok(Some(msg)),
            Ok(Decoded::Incomplete) => {}
            Err(e) => {
                return Err(LinkError::Frame {
                    addr: String::new(),
                    error: e.to_string(),
                });
            }
        }
        buf.reserve(64 * 1024);
        let n = stream.read_buf(buf).await.map_err(|error| LinkError::Io {
            addr: String::new(),
            error,
        })?;
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(LinkError::Io {
                addr: String::new(),
                error: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
    }
}

async fn read_frame<T: DeserializeOwned>(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
) -> Result<T, LinkError> {
    read_frame_or_end(stream, buf)
        .await?
        .ok_or_else(|| LinkError::Io {
            addr: String::new(),
            error: std::io::ErrorKind::UnexpectedEof.into(),
        })
}

/// Makes a [`PeerClient`] per peer for openraft.
pub struct Network<C> {
    pool: Arc<LinkPool>,
    /// First word of the metric names (`msgstore`, `profile`).
    metric_prefix: &'static str,
    types: std::marker::PhantomData<fn() -> C>,
}

impl<C> Network<C> {
    pub fn new(metric_prefix: &'static str) -> Network<C> {
        Network {
            pool: Arc::default(),
            metric_prefix,
            types: std::marker::PhantomData,
        }
    }
}

impl<C: GroupTypes> RaftNetworkFactory<C> for Network<C> {
    type Network = PeerClient<C>;

    async fn new_client(&mut self, target: ReplicaId, node: &Replica) -> PeerClient<C> {
        PeerClient {
            target,
            link: Link::pooled(node.raft_addr.clone(), self.pool.clone()),
            metric_prefix: self.metric_prefix,
            types: std::marker::PhantomData,
        }
    }
}

/// openraft's connection to one peer.
pub struct PeerClient<C> {
    target: ReplicaId,
    link: Link,
    metric_prefix: &'static str,
    types: std::marker::PhantomData<fn() -> C>,
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<ReplicaId, Replica, RaftError<ReplicaId, E>>>;

impl<C: GroupTypes> PeerClient<C> {
    async fn rpc<E: std::error::Error>(
        &mut self,
        request: PeerRequest<C>,
        option: &RPCOption,
    ) -> Result<PeerResponse, RPCError<ReplicaId, Replica, RaftError<ReplicaId, E>>> {
        let prefix = self.metric_prefix;
        self.link
            .call(&request, option.hard_ttl())
            .await
            .map_err(|e| match e {
                LinkError::Connect { .. } => RPCError::Unreachable(Unreachable::new(&e)),
                LinkError::Frame { .. } => {
                    metrics::counter!(metric_name(prefix, "raft_bad_frames_total")).increment(1);
                    RPCError::Network(NetworkError::new(&e))
                }
                _ => RPCError::Network(NetworkError::new(&e)),
            })
    }

    fn unexpected<E: std::error::Error>(
        &self,
    ) -> RPCError<ReplicaId, Replica, RaftError<ReplicaId, E>> {
        RPCError::Network(NetworkError::new(&LinkError::Unexpected {
            addr: format!("replica {}", self.target),
        }))
    }

    fn remote<E: std::error::Error>(
        &self,
        e: RaftError<ReplicaId, E>,
    ) -> RPCError<ReplicaId, Replica, RaftError<ReplicaId, E>> {
        RPCError::RemoteError(RemoteError::new(self.target, e))
    }
}

impl<C: GroupTypes> RaftNetwork<C> for PeerClient<C> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<ReplicaId>> {
        match self.rpc(PeerRequest::AppendEntries(rpc), &option).await? {
            PeerResponse::AppendEntries(r) => r.map_err(|e| self.remote(e)),
            _ => Err(self.unexpected()),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<C>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<ReplicaId>, InstallSnapshotError> {
        let bytes = rpc.data.len() as u64;
        match self.rpc(PeerRequest::InstallSnapshot(rpc), &option).await? {
            PeerResponse::InstallSnapshot(r) => {
                let name = metric_name(self.metric_prefix, "raft_snapshot_bytes_total");
                metrics::counter!(name, "direction" => "sent").increment(bytes);
                r.map_err(|e| self.remote(e))
            }
            _ => Err(self.unexpected()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<ReplicaId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<ReplicaId>> {
        match self.rpc(PeerRequest::Vote(rpc), &option).await? {
            PeerResponse::Vote(r) => r.map_err(|e| self.remote(e)),
            _ => Err(self.unexpected()),
        }
    }
}

/// Send one admin command to the replica whose replication port is `addr`.
pub async fn admin(
    addr: &str,
    request: AdminRequest,
    deadline: Duration,
) -> Result<AdminResponse, LinkError> {
    admin_on(&mut Link::new(addr.to_string()), request, deadline).await
}

/// [`admin`] on a link taken from `pool` (a follower asking its leader for
/// a read index for every read would otherwise pay a handshake each time).
pub async fn admin_pooled(
    pool: &Arc<LinkPool>,
    addr: &str,
    request: AdminRequest,
    deadline: Duration,
) -> Result<AdminResponse, LinkError> {
    admin_on(
        &mut Link::pooled(addr.to_string(), pool.clone()),
        request,
        deadline,
    )
    .await
}

async fn admin_on(
    link: &mut Link,
    request: AdminRequest,
    deadline: Duration,
) -> Result<AdminResponse, LinkError> {
    let addr = link.addr.clone();
    // Admin frames have the same form in every group: any type config does.
    let request = PeerRequest::<crate::AnyGroup>::Admin(request);
    match link.call::<_, PeerResponse>(&request, deadline).await? {
        PeerResponse::Admin(r) => Ok(r),
        _ => Err(LinkError::Unexpected { addr }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AnyGroup;
    use proptest::prelude::*;

    proptest! {
        /// Whatever a stranger sends to the replication port, decoding a
        /// request or an answer from it returns an error or a value; it
        /// never panics.
        #[test]
        fn peer_frames_from_arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..512)
        ) {
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = frame::decode::<PeerRequest<AnyGroup>>(&mut buf, PEER_FRAME_BODY_BYTES_MAX);
            let _ = frame::decode_body::<PeerRequest<AnyGroup>>(&bytes);
            let _ = frame::decode_body::<PeerResponse>(&bytes);
            let _ = frame::decode_body::<AdminRequest>(&bytes);
        }
    }

    #[test]
    fn an_oversized_frame_is_refused_before_its_body_arrives() {
        let mut buf = BytesMut::from(&(u32::MAX).to_le_bytes()[..]);
        let refused = frame::decode::<PeerRequest<AnyGroup>>(&mut buf, PEER_FRAME_BODY_BYTES_MAX);
        assert!(refused.is_err());
    }
}
