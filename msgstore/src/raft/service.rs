//! The shard protocol served by a replica of a shard group.
//!
//! Each connection's reader decodes what one socket read brought and hands
//! it, as one *chunk*, to a task that answers it; the connection's writer
//! sends the chunks' answers in the order the chunks were read. Within a
//! chunk:
//! * the writes (append, ack, routing, freeze, import, release) become one
//!   Raft entry (a [`Batch`], split only past [`BATCH_BYTES_MAX`]) and are
//!   answered with what applying it gave, once it is committed on a
//!   majority and applied here;
//! * the reads (fetch, mailbox stats, routing, user lists) are answered
//!   from the engine after a read index (`ensure_linearizable`: the leader
//!   confirms it still leads and has applied everything committed when the
//!   read arrived), so no read shows a state older than an answer given;
//! * `Ping` and `Stats` are answered by any replica from its own state.
//!
//! A replica that does not lead answers writes and reads with
//! `NotLeader{leader}`; a leader that cannot commit within
//! `write_timeout_ms` answers `Unavailable` (the write may still commit).
//!
//! Limits: [`CHUNKS_INFLIGHT_MAX`] unanswered chunks per connection (the
//! reader waits), the server's frame limit per request (a bad frame closes
//! the connection), `connections_max` connections.

use super::{node::Node, Batch, BATCH_BYTES_MAX};
use crate::server::RESPONSE_BODY_BYTES_MAX;
use bytes::BytesMut;
use openraft::error::{CheckIsLeaderError, ClientWriteError, ForwardToLeader, RaftError};
use proto::{
    frame::{self, Decoded},
    shard::{Request, RequestBody, Response, ResponseBody, ShardError, ShardErrorCode},
};
use std::{sync::Arc, time::Duration};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
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
        | RequestBody::Ack { .. }
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
pub async fn serve(node: Arc<Node>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<JoinHandle<Vec<u8>>>(CHUNKS_INFLIGHT_MAX);
    let writer = tokio::spawn(async move {
        while let Some(chunk) = rx.recv().await {
            let Ok(bytes) = chunk.await else { break };
            if wr.write_all(&bytes).await.is_err() {
                break;
            }
        }
    });
    let mut buf = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let frame_max = node.frame_body_bytes_max();
    loop {
        let mut requests = Vec::new();
        let bad = loop {
            match frame::decode::<Request>(&mut buf, frame_max) {
                Ok(Decoded::Frame(r)) => requests.push(r),
                Ok(Decoded::Incomplete) => break false,
                Err(e) => {
                    tracing::warn!(error = %e, "bad frame from a client; closing its connection");
                    metrics::counter!("msgstore_bad_frames_total").increment(1);
                    break true;
                }
            }
        };
        if !requests.is_empty() {
            let answer = tokio::spawn(answer_chunk(node.clone(), requests));
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

/// Answer one chunk's requests, encoded as response frames in order.
async fn answer_chunk(node: Arc<Node>, requests: Vec<Request>) -> Vec<u8> {
    let mut answers: Vec<Option<ResponseBody>> = vec![None; requests.len()];
    let mut writes = Vec::new();
    let mut reads = Vec::new();
    let mut ids = Vec::with_capacity(requests.len());
    for (i, r) in requests.into_iter().enumerate() {
        ids.push(r.id);
        match kind(&r.body) {
            Kind::Write => writes.push((i, r.body)),
            Kind::Read => reads.push((i, r.body)),
            Kind::Local => answers[i] = Some(node.answer_locally(r.body)),
        }
    }
    for (i, body) in write_all(&node, writes).await {
        answers[i] = Some(body);
    }
    for (i, body) in read_all(&node, reads).await {
        answers[i] = Some(body);
    }
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

/// Propose the writes (in batches of at most [`BATCH_BYTES_MAX`]) and
/// answer each with its outcome.
async fn write_all(node: &Node, writes: Vec<(usize, RequestBody)>) -> Vec<(usize, ResponseBody)> {
    let mut out = Vec::with_capacity(writes.len());
    if writes.is_empty() {
        return out;
    }
    if node.overloaded() {
        // Checkpoints keep failing (a full disk?): what is not checkpointed
        // lives in memory, so no more is taken until they succeed again.
        let refusal = error(
            ShardErrorCode::Unavailable,
            "the shard's checkpoints are failing (disk full?); nothing stored".into(),
        );
        metrics::counter!("msgstore_raft_proposals_refused_total").increment(1);
        return writes
            .into_iter()
            .map(|(i, _)| (i, refusal.clone()))
            .collect();
    }
    for group in split_by_bytes(writes) {
        let (slots, requests): (Vec<usize>, Vec<RequestBody>) = group.into_iter().unzip();
        let batch = Batch {
            now_ms: now_ms(),
            requests,
        };
        let n = slots.len();
        let write = tokio::time::timeout(node.write_timeout(), node.raft.client_write(batch));
        let bodies = match write.await {
            Ok(Ok(resp)) if resp.data.0.len() == n => resp.data.0,
            Ok(Ok(resp)) => vec![
                error(
                    ShardErrorCode::Storage,
                    format!("{} outcomes for {n} requests", resp.data.0.len())
                );
                n
            ],
            Ok(Err(e)) => vec![write_refusal(&e); n],
            Err(_) => vec![unavailable(node.write_timeout()); n],
        };
        metrics::counter!("msgstore_raft_proposals_total").increment(1);
        out.extend(slots.into_iter().zip(bodies));
    }
    out
}

/// Split writes so that no batch carries much more than
/// [`BATCH_BYTES_MAX`] of payload.
fn split_by_bytes(writes: Vec<(usize, RequestBody)>) -> Vec<Vec<(usize, RequestBody)>> {
    let mut groups = vec![Vec::new()];
    let mut bytes = 0usize;
    for (i, body) in writes {
        let size = payload_bytes(&body);
        if bytes > 0 && bytes + size > BATCH_BYTES_MAX {
            groups.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        groups.last_mut().expect("one group").push((i, body));
    }
    groups.retain(|g| !g.is_empty());
    groups
}

fn payload_bytes(body: &RequestBody) -> usize {
    match body {
        RequestBody::Append { payload, .. } => payload.len() + 64,
        RequestBody::AppendBatch { items } => items.iter().map(|i| i.payload.len() + 64).sum(),
        RequestBody::Import { records, .. } => records.iter().map(|r| r.payload.len() + 64).sum(),
        _ => 64,
    }
}

/// Answer the reads after one read index for all of them.
async fn read_all(node: &Node, reads: Vec<(usize, RequestBody)>) -> Vec<(usize, ResponseBody)> {
    if reads.is_empty() {
        return Vec::new();
    }
    let check = tokio::time::timeout(node.write_timeout(), node.raft.ensure_linearizable());
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

fn write_refusal(e: &RaftError<u64, ClientWriteError<u64, super::Replica>>) -> ResponseBody {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => not_leader(f),
        other => error(ShardErrorCode::Unavailable, other.to_string()),
    }
}

fn read_refusal(e: &RaftError<u64, CheckIsLeaderError<u64, super::Replica>>) -> ResponseBody {
    match e {
        RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => not_leader(f),
        other => error(ShardErrorCode::Unavailable, other.to_string()),
    }
}

fn not_leader(f: &ForwardToLeader<u64, super::Replica>) -> ResponseBody {
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

fn unavailable(waited: Duration) -> ResponseBody {
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

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
