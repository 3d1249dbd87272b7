//! The shard protocol served by a replica of a shard group.
//!
//! Each connection's reader decodes what one socket read brought and hands
//! it, as one *chunk*, to a task that answers it; the connection's writer
//! sends the chunks' answers in the order the chunks were read. Within a
//! chunk:
//! * the writes (append, ack, routing, freeze, import, release) are queued,
//!   in the order read, for the [proposer](super::proposer), which packs
//!   the writes of every connection into Raft entries; each is answered
//!   with what applying it gave, once committed on a majority and applied
//!   here;
//! * the reads (fetch, mailbox stats, routing, user lists) wait for the
//!   connection's earlier writes, then are answered from the engine after
//!   a read index (`ensure_linearizable`: the leader confirms it still
//!   leads and has applied everything committed when the read arrived),
//!   so no read shows a state older than an answer given;
//! * `Ping` and `Stats` are answered by any replica from its own state.
//!
//! A replica that does not lead answers writes and reads with
//! `NotLeader{leader}`; a leader that cannot commit within
//! `write_timeout_ms` answers `Unavailable` (the write may still commit).
//!
//! Limits: [`CHUNKS_INFLIGHT_MAX`] unanswered chunks per connection (the
//! reader waits), the server's frame limit per request (a bad frame closes
//! the connection), `connections_max` connections.

use super::{node::Node, proposer::answers_of};
use crate::server::RESPONSE_BODY_BYTES_MAX;
use bytes::BytesMut;
use daemon::secure::Link;
use openraft::error::{CheckIsLeaderError, ForwardToLeader, RaftError};
use proto::{
    frame::{self, Decoded},
    shard::{Request, RequestBody, Response, ResponseBody, ShardError, ShardErrorCode},
};
use std::{sync::Arc, time::Duration};
use tokio::{
    io::AsyncReadExt,
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};

/// Most chunks of one connection read and not yet written back.
pub const CHUNKS_INFLIGHT_MAX: usize = 64;

/// Bytes requested from the socket per read.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// What a request needs from the group.
enum Kind {
    Write,
    Read,
    Local,
}

fn kind(body: &RequestBody) -> Kind {
    match body {
        RequestBody::Append { .. }
        | RequestBody::AppendBatch { .. }
        | RequestBody::AppendBatchOnce { .. }
        | RequestBody::Ack { .. }
        | RequestBody::Expire { .. }
        | RequestBody::SetRouting(_)
        | RequestBody::Freeze { .. }
        | RequestBody::Import { .. }
        | RequestBody::Release { .. } => Kind::Write,
        RequestBody::Fetch { .. }
        | RequestBody::UserStats { .. }
        | RequestBody::GetRouting
        | RequestBody::ListUsers { .. } => Kind::Read,
        RequestBody::Stats | RequestBody::Ping => Kind::Local,
    }
}

/// Serve one client connection until it closes or the node stops.
pub async fn serve(node: Arc<Node>, link: Link) {
    let (mut rd, mut wr) = link.into_split();
    let (tx, mut rx) = mpsc::channel::<JoinHandle<Vec<u8>>>(CHUNKS_INFLIGHT_MAX);
    let writer = tokio::spawn(async move {
        while let Some(chunk) = rx.recv().await {
            let Ok(bytes) = chunk.await else { break };
            if wr.send(&bytes).await.is_err() {
                break;
            }
        }
    });
    let mut buf = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let frame_max = node.frame_body_bytes_max();
    let mut last_writes = None;
    loop {
        let mut requests = Vec::new();
        let bad = loop {
            match frame::decode::<Request>(&mut buf, frame_max) {
                Ok(Decoded::Frame(r)) => requests.push(r),
                Ok(Decoded::Incomplete) => break false,
                Err(e) => {
                    metrics::counter!("msgstore_bad_frames_total").increment(1);
                    if let Some(held_back) = crate::server::BAD_FRAME_WARNINGS.check() {
                        tracing::warn!(
                            error = %e,
                            held_back,
                            "bad frame from a client; closing its connection"
                        );
                    }
                    break true;
                }
            }
        };
        if !requests.is_empty() {
            // Queued here, in the order read; answered on a task.
            let chunk = Chunk::queue(&node, requests, &mut last_writes).await;
            let answer = tokio::spawn(chunk.answer(node.clone()));
            if tx.send(answer).await.is_err() {
                break;
            }
        }
        if bad {
            break;
        }
        buf.reserve(READ_CHUNK_BYTES);
        tokio::select! {
            read = rd.read_buf(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            },
            _ = node.stopping() => break,
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// The requests of one read: local ones answered, writes queued for the
/// proposer, reads waiting for the writes before them.
struct Chunk {
    ids: Vec<u64>,
    answers: Vec<Option<ResponseBody>>,
    /// Where the writes' answers go, and where they come from.
    write_slots: Vec<usize>,
    writes: Vec<oneshot::Receiver<Vec<ResponseBody>>>,
    /// Told once this chunk's writes are answered.
    writes_done: Option<watch::Sender<bool>>,
    reads: Vec<(usize, RequestBody)>,
    /// The connection's writes before this chunk, answered.
    earlier_writes: Option<watch::Receiver<bool>>,
}

impl Chunk {
    /// Sort the requests, answer the local ones, queue the writes.
    /// `last_writes` is the connection's latest queued writes' signal.
    async fn queue(
        node: &Node,
        requests: Vec<Request>,
        last_writes: &mut Option<watch::Receiver<bool>>,
    ) -> Chunk {
        let mut chunk = Chunk {
            ids: Vec::with_capacity(requests.len()),
            answers: vec![None; requests.len()],
            write_slots: Vec::new(),
            writes: Vec::new(),
            writes_done: None,
            reads: Vec::new(),
            earlier_writes: last_writes.clone(),
        };
        let mut writes = Vec::new();
        for (i, r) in requests.into_iter().enumerate() {
            chunk.ids.push(r.id);
            match kind(&r.body) {
                Kind::Write => {
                    chunk.write_slots.push(i);
                    writes.push(r.body);
                }
                Kind::Read => chunk.reads.push((i, r.body)),
                Kind::Local => chunk.answers[i] = Some(node.answer_locally(r.body).await),
            }
        }
        if writes.is_empty() {
            return chunk;
        }
        if node.overloaded() {
            // Checkpoints keep failing (a full disk?): what is not
            // checkpointed lives in memory, so no more is taken until they
            // succeed again.
            let refusal = error(
                ShardErrorCode::Unavailable,
                "the shard's checkpoints are failing (disk full?); nothing stored".into(),
            );
            metrics::counter!("msgstore_raft_proposals_refused_total").increment(1);
            for &i in &chunk.write_slots {
                chunk.answers[i] = Some(refusal.clone());
            }
            chunk.write_slots.clear();
            return chunk;
        }
        chunk.writes = node.proposer.queue(writes).await;
        let (done, signal) = watch::channel(false);
        chunk.writes_done = Some(done);
        *last_writes = Some(signal);
        chunk
    }

    /// Wait for the writes, then answer the reads; the response frames in
    /// the order of the requests.
    async fn answer(mut self, node: Arc<Node>) -> Vec<u8> {
        let count = self.write_slots.len();
        let bodies = answers_of(std::mem::take(&mut self.writes), count).await;
        for (&i, body) in self.write_slots.iter().zip(bodies) {
            self.answers[i] = Some(body);
        }
        if let Some(done) = self.writes_done.take() {
            let _ = done.send(true);
        }
        if !self.reads.is_empty() {
            if let Some(mut earlier) = self.earlier_writes.take() {
                // Gone only if that chunk's task is: nothing to wait for.
                let _ = earlier.wait_for(|answered| *answered).await;
            }
            for (i, body) in read_all(&node, std::mem::take(&mut self.reads)).await {
                self.answers[i] = Some(body);
            }
        }
        encode_answers(self.ids, self.answers)
    }
}

/// The response frames, in order.
fn encode_answers(ids: Vec<u64>, answers: Vec<Option<ResponseBody>>) -> Vec<u8> {
    let mut out = Vec::new();
    for (id, body) in ids.into_iter().zip(answers) {
        let body = body.expect("every request is answered");
        let response = Response { id, body };
        if let Err(e) = frame::encode(&response, RESPONSE_BODY_BYTES_MAX, &mut out) {
            let body = error(
                ShardErrorCode::Storage,
                format!("answer not encodable: {e}"),
            );
            frame::encode(&Response { id, body }, RESPONSE_BODY_BYTES_MAX, &mut out)
                .expect("an error answer encodes");
        }
    }
    out
}

/// Answer the reads after one read index for all of them.
async fn read_all(node: &Node, reads: Vec<(usize, RequestBody)>) -> Vec<(usize, ResponseBody)> {
    if reads.is_empty() {
        return Vec::new();
    }
    let check = tokio::time::timeout(
        node.write_timeout(),
        replication::group::read_index(&node.raft, "msgstore"),
    );
    let refusal = match check.await {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(read_refusal(&e)),
        Err(_) => Some(unavailable(node.write_timeout())),
    };
    if let Some(r) = refusal {
        return reads.into_iter().map(|(i, _)| (i, r.clone())).collect();
    }
    let mut guard = node.shared.engine();
    let Some(engine) = guard.as_mut() else {
        let r = error(
            ShardErrorCode::Unavailable,
            "the replica is installing a snapshot".into(),
        );
        return reads.into_iter().map(|(i, _)| (i, r.clone())).collect();
    };
    reads
        .into_iter()
        .map(|(i, body)| (i, engine.respond(body)))
        .collect()
}

fn read_refusal(e: &RaftError<u64, CheckIsLeaderError<u64, super::Replica>>) -> ResponseBody {
    match e {
        RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => not_leader(f),
        other => error(ShardErrorCode::Unavailable, other.to_string()),
    }
}

pub(crate) fn not_leader(f: &ForwardToLeader<u64, super::Replica>) -> ResponseBody {
    metrics::counter!("msgstore_raft_not_leader_answers_total").increment(1);
    error(
        ShardErrorCode::NotLeader {
            leader: f.leader_node.as_ref().map(|n| n.client_addr.clone()),
        },
        match f.leader_id {
            Some(id) => format!("this replica does not lead its group; replica {id} does"),
            None => "this replica does not lead its group and knows no leader".into(),
        },
    )
}

pub(crate) fn unavailable(waited: Duration) -> ResponseBody {
    error(
        ShardErrorCode::Unavailable,
        format!(
            "not committed within {} ms (no majority reachable?); it may still be",
            waited.as_millis()
        ),
    )
}

pub(crate) fn error(code: ShardErrorCode, message: String) -> ResponseBody {
    ResponseBody::Error(ShardError { code, message })
}
