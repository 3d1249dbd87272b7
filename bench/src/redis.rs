//! The Redis peer: a private redis-server process and a lean RESP codec.
//!
//! Mailbox ops map to list commands on key `user:<id>`: Append = RPUSH,
//! Fetch = LRANGE key 0 n-1, Trim = LTRIM key count -1.

use crate::{
    load::{batch_payloads, Codec, Op, Reply},
    procs::{self, ChildProc},
};
use anyhow::{bail, Context, Result};
use bytes::{Buf, BytesMut};
use std::{
    fmt,
    fs::File,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// Redis persistence settings compared against our fsync policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisAof {
    Always,
    EverySec,
    Off,
}

impl fmt::Display for RedisAof {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RedisAof::Always => "aof_always",
            RedisAof::EverySec => "aof_everysec",
            RedisAof::Off => "aof_off",
        })
    }
}

/// A running redis-server with its data in `data_dir`.
pub struct RedisServer {
    pub proc: ChildProc,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
}

/// Start redis-server on a free loopback port with its data (and nothing
/// else) in `root/data`, its log in `root/redis.log`; wait until it answers.
pub fn start(redis_bin: &Path, root: &Path, aof: RedisAof) -> Result<RedisServer> {
    start_with(redis_bin, root, aof, &[])
}

/// [`start`] with more command-line arguments (e.g. `--replicaof`).
pub fn start_with(
    redis_bin: &Path,
    root: &Path,
    aof: RedisAof,
    extra: &[String],
) -> Result<RedisServer> {
    let data_dir = root.join("data");
    std::fs::create_dir_all(&data_dir).with_context(|| format!("create {}", data_dir.display()))?;
    let log_path = root.join("redis.log");
    let log = File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;
    let port = procs::free_loopback_port()?;
    let mut cmd = Command::new(redis_bin);
    cmd.arg("--port")
        .arg(port.to_string())
        .args(["--bind", "127.0.0.1", "--protected-mode", "no"])
        .args(["--save", ""])
        .arg("--dir")
        .arg(&data_dir)
        .args(["--daemonize", "no", "--logfile", ""]);
    match aof {
        RedisAof::Always => cmd.args(["--appendonly", "yes", "--appendfsync", "always"]),
        RedisAof::EverySec => cmd.args(["--appendonly", "yes", "--appendfsync", "everysec"]),
        RedisAof::Off => cmd.args(["--appendonly", "no"]),
    };
    cmd.args(extra);
    cmd.stdout(log.try_clone()?).stderr(Stdio::from(log));
    let mut proc = procs::spawn("redis-server", &mut cmd)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if ping(addr).is_ok() {
            break;
        }
        if let Err(e) = proc.check_running() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(e.context(format!("redis-server log:\n{log}")));
        }
        if Instant::now() >= deadline {
            bail!("redis-server on {addr} did not answer PING within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(RedisServer {
        proc,
        addr,
        data_dir,
    })
}

fn ping(addr: SocketAddr) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    s.write_all(b"*1\r\n$4\r\nPING\r\n")?;
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf)?;
    if &buf != b"+PONG\r\n" {
        bail!("unexpected PING answer {:?}", String::from_utf8_lossy(&buf));
    }
    Ok(())
}

/// Encodes ops as RESP arrays of bulk strings; decodes the replies.
#[derive(Debug, Default)]
pub struct RespCodec {
    key: Vec<u8>,
}

impl RespCodec {
    pub fn new() -> Self {
        Self::default()
    }

    fn set_key(&mut self, user: u64) {
        self.key.clear();
        // Writing to a Vec cannot fail.
        let _ = write!(self.key, "user:{user}");
    }

    fn put_rpush(&self, out: &mut Vec<u8>, value: &[u8]) {
        out.extend_from_slice(b"*3\r\n$5\r\nRPUSH\r\n");
        put_bulk(out, &self.key);
        put_bulk(out, value);
    }
}

/// [`RespCodec`] for workloads of `Op::AppendBatch`: a batch is sent as
/// `count` pipelined RPUSH and its `count` replies are decoded as one
/// (the first error among them, if any).
#[derive(Debug, Default)]
pub struct RespBatchCodec {
    inner: RespCodec,
    /// Replies still due per outstanding request, oldest first.
    replies_due: std::collections::VecDeque<u32>,
    first_error: Option<Reply>,
}

impl RespBatchCodec {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Codec for RespBatchCodec {
    fn encode(&mut self, op: &Op, payload: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let replies = match *op {
            // One RPUSH per item, pipelined: answered by `count` replies,
            // folded into one by `decode`.
            Op::AppendBatch { user, count, .. } => {
                self.inner.set_key(user);
                for item in batch_payloads(payload, count) {
                    self.inner.put_rpush(out, item);
                }
                count.max(1)
            }
            _ => {
                self.inner.encode(op, payload, out)?;
                1
            }
        };
        self.replies_due.push_back(replies);
        Ok(())
    }

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Reply>> {
        loop {
            let Some(reply) = decode_reply(buf)? else {
                return Ok(None);
            };
            let due = self
                .replies_due
                .front_mut()
                .context("a reply to no request")?;
            if matches!(reply, Reply::Error(_)) && self.first_error.is_none() {
                self.first_error = Some(reply.clone());
            }
            *due -= 1;
            if *due == 0 {
                self.replies_due.pop_front();
                return Ok(Some(self.first_error.take().unwrap_or(reply)));
            }
        }
    }
}

/// Append one command (an array of bulk strings) to `out`.
pub fn put_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    let _ = write!(out, "*{}\r\n", args.len());
    for a in args {
        put_bulk(out, a);
    }
}

pub(crate) fn put_bulk(out: &mut Vec<u8>, bytes: &[u8]) {
    let _ = write!(out, "${}\r\n", bytes.len());
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

fn put_int_bulk(out: &mut Vec<u8>, v: i64) {
    let mut s = Vec::with_capacity(20);
    let _ = write!(s, "{v}");
    put_bulk(out, &s);
}

impl Codec for RespCodec {
    fn encode(&mut self, op: &Op, payload: &[u8], out: &mut Vec<u8>) -> Result<()> {
        match *op {
            Op::Append { user, .. } => {
                self.set_key(user);
                self.put_rpush(out, payload);
            }
            // Its `count` replies would each be taken for a request's.
            Op::AppendBatch { .. } => bail!("a batch of appends needs RespBatchCodec"),
            Op::Fetch {
                user, max_count, ..
            } => {
                self.set_key(user);
                out.extend_from_slice(b"*4\r\n$6\r\nLRANGE\r\n");
                put_bulk(out, &self.key);
                put_int_bulk(out, 0);
                put_int_bulk(out, i64::from(max_count) - 1);
            }
            Op::Trim { user, count, .. } => {
                self.set_key(user);
                out.extend_from_slice(b"*4\r\n$5\r\nLTRIM\r\n");
                put_bulk(out, &self.key);
                put_int_bulk(out, i64::try_from(count).context("trim count")?);
                put_int_bulk(out, -1);
            }
        }
        Ok(())
    }

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Reply>> {
        decode_reply(buf)
    }
}

/// Decode one reply from the front of `buf`, consuming it; `None` if it is
/// not complete yet.
pub(crate) fn decode_reply(buf: &mut BytesMut) -> Result<Option<Reply>> {
    match parse_reply(buf)? {
        Some((used, reply)) => {
            buf.advance(used);
            Ok(Some(reply))
        }
        None => Ok(None),
    }
}

/// The line starting at `at` (without CRLF) and the offset after its CRLF.
fn line(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let rest = buf.get(at..)?;
    let end = rest.windows(2).position(|w| w == b"\r\n")?;
    Some((&rest[..end], at + end + 2))
}

fn int(bytes: &[u8]) -> Result<i64> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad RESP integer {:?}", String::from_utf8_lossy(bytes)))
}

/// One RESP2 reply, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RespValue {
    Simple(Vec<u8>),
    Int(i64),
    Error(String),
    Bulk(Option<Vec<u8>>),
    Array(Vec<RespValue>),
}

/// Parse one reply from the front of `buf`: `(bytes used, value)`, or
/// `None` if it is not complete yet.
pub fn parse_value(buf: &[u8]) -> Result<Option<(usize, RespValue)>> {
    parse_at(buf, 0)
}

/// The value starting at `at` and the offset after it.
fn parse_at(buf: &[u8], at: usize) -> Result<Option<(usize, RespValue)>> {
    let Some(&kind) = buf.get(at) else {
        return Ok(None);
    };
    let Some((body, mut at)) = line(buf, at + 1) else {
        return Ok(None);
    };
    let value = match kind {
        b'+' => RespValue::Simple(body.to_vec()),
        b':' => RespValue::Int(int(body)?),
        b'-' => RespValue::Error(String::from_utf8_lossy(body).into_owned()),
        b'$' => {
            let Ok(len) = usize::try_from(int(body)?) else {
                return Ok(Some((at, RespValue::Bulk(None))));
            };
            let Some(bytes) = buf.get(at..at + len) else {
                return Ok(None);
            };
            if buf.len() < at + len + 2 {
                return Ok(None);
            }
            let value = RespValue::Bulk(Some(bytes.to_vec()));
            at += len + 2;
            value
        }
        b'*' => {
            let n = int(body)?.max(0);
            let mut elements = Vec::with_capacity(usize::try_from(n).unwrap_or(0).min(4096));
            for _ in 0..n {
                let Some((after, element)) = parse_at(buf, at)? else {
                    return Ok(None);
                };
                elements.push(element);
                at = after;
            }
            RespValue::Array(elements)
        }
        other => bail!("unexpected RESP reply type {:?}", other as char),
    };
    Ok(Some((at, value)))
}

/// Parse one mailbox reply from the front of `buf`: `(bytes used, reply)`,
/// or `None` if incomplete. Array elements are owned copies, as the shard's
/// client owns the records of a page: both sides do the same client work.
fn parse_reply(buf: &[u8]) -> Result<Option<(usize, Reply)>> {
    let Some((used, value)) = parse_value(buf)? else {
        return Ok(None);
    };
    let reply = match value {
        RespValue::Simple(_) => Reply::Trimmed,
        RespValue::Int(_) => Reply::Appended,
        RespValue::Error(e) => Reply::Error(e),
        RespValue::Array(elements) => Reply::Page {
            count: elements.len() as u64,
            last_seq: None,
            more: None,
        },
        RespValue::Bulk(_) => bail!("unexpected RESP bulk reply to a mailbox op"),
    };
    Ok(Some((used, reply)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_rpush() {
        let mut c = RespCodec::new();
        let mut out = Vec::new();
        c.encode(
            &Op::Append {
                user: 42,
                msg_id: 1,
            },
            b"hi",
            &mut out,
        )
        .unwrap();
        assert_eq!(out, b"*3\r\n$5\r\nRPUSH\r\n$7\r\nuser:42\r\n$2\r\nhi\r\n");
    }

    #[test]
    fn a_batch_is_pipelined_rpushes_answered_as_one() {
        let mut c = RespBatchCodec::new();
        let mut out = Vec::new();
        let batch = Op::AppendBatch {
            user: 7,
            first_msg_id: 1,
            count: 2,
        };
        c.encode(&batch, b"abcd", &mut out).unwrap();
        assert_eq!(
            out,
            b"*3\r\n$5\r\nRPUSH\r\n$6\r\nuser:7\r\n$2\r\nab\r\n\
              *3\r\n$5\r\nRPUSH\r\n$6\r\nuser:7\r\n$2\r\ncd\r\n"
        );
        c.encode(&batch, b"abcd", &mut out).unwrap();
        let mut buf = BytesMut::from(&b":1\r\n"[..]);
        assert_eq!(c.decode(&mut buf).unwrap(), None, "one of two replies");
        buf.extend_from_slice(b":2\r\n-ERR full\r\n:4\r\n");
        assert_eq!(c.decode(&mut buf).unwrap(), Some(Reply::Appended));
        assert_eq!(
            c.decode(&mut buf).unwrap(),
            Some(Reply::Error("ERR full".into()))
        );
        assert!(buf.is_empty());
        let plain = RespCodec::new().encode(&batch, b"abcd", &mut Vec::new());
        assert!(plain.is_err(), "the plain codec would miscount the replies");
    }

    #[test]
    fn encodes_lrange_and_ltrim() {
        let mut c = RespCodec::new();
        let mut out = Vec::new();
        let fetch = Op::Fetch {
            user: 1,
            after_seq: 0,
            max_count: 100,
        };
        c.encode(&fetch, b"", &mut out).unwrap();
        assert_eq!(
            out,
            b"*4\r\n$6\r\nLRANGE\r\n$6\r\nuser:1\r\n$1\r\n0\r\n$2\r\n99\r\n"
        );
        out.clear();
        let trim = Op::Trim {
            user: 1,
            up_to_seq: 9,
            count: 100,
        };
        c.encode(&trim, b"", &mut out).unwrap();
        assert_eq!(
            out,
            b"*4\r\n$5\r\nLTRIM\r\n$6\r\nuser:1\r\n$3\r\n100\r\n$2\r\n-1\r\n"
        );
    }

    #[test]
    fn decodes_replies_and_waits_for_complete_ones() {
        let wire = b":5\r\n+OK\r\n*2\r\n$3\r\nabc\r\n$0\r\n\r\n-ERR no\r\n*0\r\n";
        for cut in 0..wire.len() {
            let mut c = RespCodec::new();
            let mut buf = BytesMut::from(&wire[..cut]);
            while c.decode(&mut buf).unwrap().is_some() {}
            // Whatever is left is an incomplete prefix of the next reply.
            assert!(wire[..cut].ends_with(&buf[..]));
        }
        let mut c = RespCodec::new();
        let mut buf = BytesMut::from(&wire[..]);
        let mut got = Vec::new();
        while let Some(r) = c.decode(&mut buf).unwrap() {
            got.push(r);
        }
        let page = |count| Reply::Page {
            count,
            last_seq: None,
            more: None,
        };
        assert_eq!(
            got,
            vec![
                Reply::Appended,
                Reply::Trimmed,
                page(2),
                Reply::Error("ERR no".into()),
                page(0)
            ]
        );
        assert!(buf.is_empty());
    }
}
