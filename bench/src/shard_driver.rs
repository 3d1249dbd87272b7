//! Our shard as a load target: the `msgstore` daemon as a child process and
//! a lean codec straight on `proto::frame` + `proto::shard` (no client
//! library, so the load generator stays minimal and independent of it).

use crate::{
    load::{batch_payloads, Codec, Op, Reply},
    procs::{self, ChildProc},
};
use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use msgstore::FsyncPolicy;
use proto::{
    frame::{self, Decoded, FRAME_BODY_BYTES_MAX_DEFAULT},
    shard::{
        AppendItem, Request, RequestBody, Response, ResponseBody, ShardStats, FETCH_BYTES_MAX,
    },
};
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};
use tokio::io::AsyncReadExt;

/// A running `msgstore` daemon.
pub struct ShardServer {
    pub proc: ChildProc,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    /// From spawning to the listening line (with `precreate`, this includes
    /// creating every bucket file).
    pub start_secs: f64,
}

/// The daemon binary: `explicit`, else `msgstore` next to this executable.
pub fn locate_msgstore(explicit: Option<&Path>) -> Result<PathBuf> {
    procs::locate_sibling("msgstore", "msgstore", explicit)
}

/// Start the daemon on a free loopback port and wait for its listening line;
/// with `precreate` it creates all its bucket files before it listens
/// (`--precreate-buckets`); `config` is passed as `--config`.
pub fn start(
    bin: &Path,
    data_dir: &Path,
    fsync: FsyncPolicy,
    precreate: bool,
    config: Option<&Path>,
) -> Result<ShardServer> {
    std::fs::create_dir_all(data_dir).with_context(|| format!("create {}", data_dir.display()))?;
    let started = std::time::Instant::now();
    let mut cmd = Command::new(bin);
    cmd.arg("--data")
        .arg(data_dir)
        .args(["--listen", "127.0.0.1:0", "--fsync"])
        .arg(fsync.to_string())
        .env("NO_COLOR", "1");
    if precreate {
        cmd.arg("--precreate-buckets");
    }
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    let (proc, addr) = procs::start_daemon("msgstore", &mut cmd, Duration::from_secs(600))?;
    Ok(ShardServer {
        proc,
        addr,
        data_dir: data_dir.to_path_buf(),
        start_secs: started.elapsed().as_secs_f64(),
    })
}

/// Encodes ops as shard requests with sequential ids (the request's index
/// on its connection); replies are matched by id, as the shard may answer
/// a fetch of durable records before earlier requests.
#[derive(Debug, Default)]
pub struct ShardCodec {
    next_id: u64,
    answered: Option<u64>,
}

impl ShardCodec {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Codec for ShardCodec {
    const SECURE_LINK: bool = true;

    fn encode(&mut self, op: &Op, payload: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let body = match *op {
            Op::Append { user, msg_id } => RequestBody::Append {
                user,
                msg_id,
                payload: payload.to_vec(),
            },
            Op::AppendBatch {
                user,
                first_msg_id,
                count,
            } => RequestBody::AppendBatch {
                items: batch_payloads(payload, count)
                    .zip(first_msg_id..)
                    .map(|(payload, msg_id)| AppendItem {
                        user,
                        msg_id,
                        payload: payload.to_vec(),
                    })
                    .collect(),
            },
            Op::Fetch {
                user,
                after_seq,
                max_count,
            } => RequestBody::Fetch {
                user,
                after_seq,
                max_count,
                max_bytes: FETCH_BYTES_MAX,
            },
            Op::Trim {
                user, up_to_seq, ..
            } => RequestBody::Ack { user, up_to_seq },
        };
        let req = Request {
            id: self.next_id,
            body,
        };
        self.next_id += 1;
        frame::encode(&req, FRAME_BODY_BYTES_MAX_DEFAULT, out).context("encode shard request")
    }

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Reply>> {
        let resp: Response = match frame::decode(buf, FRAME_BODY_BYTES_MAX_DEFAULT)
            .context("decode shard response")?
        {
            Decoded::Frame(r) => r,
            Decoded::Incomplete => return Ok(None),
        };
        if resp.id >= self.next_id {
            bail!("shard answered id {}, which was never sent", resp.id);
        }
        self.answered = Some(resp.id);
        Ok(Some(match resp.body {
            ResponseBody::Appended { .. } => Reply::Appended,
            ResponseBody::AppendedBatch { results } => {
                match results.into_iter().find_map(Result::err) {
                    None => Reply::Appended,
                    Some(e) => Reply::Error(format!("{:?}: {}", e.code, e.message)),
                }
            }
            ResponseBody::Records { records, more } => Reply::Page {
                count: records.len() as u64,
                last_seq: records.last().map(|r| r.seq),
                more: Some(more),
            },
            ResponseBody::Acked { .. } => Reply::Trimmed,
            ResponseBody::Error(e) => Reply::Error(format!("{:?}: {}", e.code, e.message)),
            other => bail!("unexpected shard response {other:?}"),
        }))
    }

    fn answered(&self) -> Option<u64> {
        self.answered
    }
}

/// One `Stats` request on a fresh (secure) link.
pub async fn fetch_stats(addr: SocketAddr) -> Result<ShardStats> {
    let mut link = daemon::secure::connect(addr)
        .await
        .with_context(|| format!("open a secure link to {addr}"))?;
    let mut out = Vec::new();
    frame::encode(
        &Request {
            id: 1,
            body: RequestBody::Stats,
        },
        FRAME_BODY_BYTES_MAX_DEFAULT,
        &mut out,
    )?;
    link.writer.send(&out).await?;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if let Decoded::Frame(resp) =
            frame::decode::<Response>(&mut buf, FRAME_BODY_BYTES_MAX_DEFAULT)?
        {
            return match resp.body {
                ResponseBody::Stats(s) => Ok(s),
                other => bail!("unexpected answer to Stats: {other:?}"),
            };
        }
        if link.reader.read_buf(&mut buf).await? == 0 {
            bail!("shard closed the connection before answering Stats");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::shard::StoredRecord;

    #[test]
    fn round_trips_through_frames() {
        let mut c = ShardCodec::new();
        let mut out = Vec::new();
        c.encode(&Op::Append { user: 3, msg_id: 9 }, b"xyz", &mut out)
            .unwrap();
        let mut buf = BytesMut::from(&out[..]);
        let Decoded::Frame(req) = frame::decode::<Request>(&mut buf, 4096).unwrap() else {
            panic!("incomplete")
        };
        assert_eq!(req.id, 0);
        assert!(matches!(req.body, RequestBody::Append { user: 3, .. }));
        out.clear();
        let batch = Op::AppendBatch {
            user: 4,
            first_msg_id: 10,
            count: 2,
        };
        c.encode(&batch, b"abcd", &mut out).unwrap();
        let mut buf = BytesMut::from(&out[..]);
        let Decoded::Frame(req) = frame::decode::<Request>(&mut buf, 4096).unwrap() else {
            panic!("incomplete")
        };
        let RequestBody::AppendBatch { items } = req.body else {
            panic!("{:?}", req.body)
        };
        let got: Vec<_> = items
            .iter()
            .map(|i| (i.user, i.msg_id, i.payload.as_slice()))
            .collect();
        assert_eq!(got, [(4, 10, &b"ab"[..]), (4, 11, &b"cd"[..])]);

        let mut wire = Vec::new();
        let record = StoredRecord {
            seq: 17,
            msg_id: 1,
            timestamp_ms: 0,
            payload: vec![1],
        };
        let resp = Response {
            id: 0,
            body: ResponseBody::Records {
                records: vec![record],
                more: true,
            },
        };
        frame::encode(&resp, 4096, &mut wire).unwrap();
        let mut buf = BytesMut::from(&wire[..]);
        assert_eq!(
            c.decode(&mut buf).unwrap(),
            Some(Reply::Page {
                count: 1,
                last_seq: Some(17),
                more: Some(true)
            })
        );
        assert_eq!(c.answered(), Some(0));
        // An id never sent is an error.
        let mut wire = Vec::new();
        let stale = Response {
            id: 5,
            body: ResponseBody::Pong,
        };
        frame::encode(&stale, 4096, &mut wire).unwrap();
        let mut buf = BytesMut::from(&wire[..]);
        assert!(c.decode(&mut buf).is_err());
    }
}
