//! The one load loop every TCP target runs through.
//!
//! A target (Redis, our shard) only supplies a [`Codec`]: how to encode a
//! mailbox [`Op`] as its request bytes, how to decode its reply, and
//! whether it is spoken over a secure link ([`Codec::SECURE_LINK`]: our
//! daemons accept nothing else) or plain TCP (Redis). A
//! [`Workload`] decides which ops to issue (random appends, a prefill, a
//! drain). Each connection task keeps up to `pipeline` requests in flight,
//! writes everything it can issue in one `write_all`, and matches replies to
//! requests: in order (Redis), or by the id the reply carries (our shard,
//! which may answer a fetch of durable records before earlier requests).

use crate::report::{LatencyHist, RateSample};
use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// One load connection: plain TCP, or a link authenticated and encrypted
/// with this process's cluster key (the key the daemons this benchmark
/// starts are given, see `procs::start_daemon`).
pub enum Conn {
    Plain(TcpStream),
    Secure(Box<daemon::secure::Link>),
}

impl Conn {
    /// Connect to `addr`: a secure link if `secure`.
    pub async fn connect(addr: SocketAddr, secure: bool) -> Result<Conn> {
        let conn = if secure {
            Conn::Secure(Box::new(
                daemon::secure::connect(addr)
                    .await
                    .with_context(|| format!("open a secure link to {addr}"))?,
            ))
        } else {
            let stream = TcpStream::connect(addr)
                .await
                .with_context(|| format!("connect to {addr}"))?;
            stream.set_nodelay(true)?;
            Conn::Plain(stream)
        };
        Ok(conn)
    }

    /// Send all of `bytes`.
    pub async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.write_all(bytes).await,
            Conn::Secure(l) => l.writer.send(bytes).await,
        }
    }

    /// Read what is there into `buf`; 0 at the end of the stream.
    pub async fn read_buf(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read_buf(buf).await,
            Conn::Secure(l) => l.reader.read_buf(buf).await,
        }
    }
}

/// One mailbox operation, independent of the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Store one message (RPUSH / Append).
    Append { user: u64, msg_id: u128 },
    /// Store `count` messages in one mailbox in one request, as a gateway
    /// stores a conversation's queue (`count` pipelined RPUSH / one
    /// `AppendBatch`); msg ids `first_msg_id ..`.
    AppendBatch {
        user: u64,
        first_msg_id: u128,
        count: u32,
    },
    /// Read the oldest page (LRANGE 0 n-1 / Fetch after_seq).
    Fetch {
        user: u64,
        after_seq: u64,
        max_count: u32,
    },
    /// Remove what was read (LTRIM count -1 / Ack up_to_seq).
    Trim {
        user: u64,
        up_to_seq: u64,
        count: u64,
    },
}

/// An operation a [`Workload`] issues and a [`Codec`] encodes: the mailbox
/// [`Op`] here, presence operations in `presence.rs`.
pub trait LoadOp: Copy + Send + 'static {
    /// How many of the spec's fresh random payloads the op carries (back
    /// to back in the payload slice the codec is given).
    fn payloads(&self) -> usize {
        0
    }
}

impl LoadOp for Op {
    fn payloads(&self) -> usize {
        match self {
            Op::Append { .. } => 1,
            Op::AppendBatch { count, .. } => *count as usize,
            Op::Fetch { .. } | Op::Trim { .. } => 0,
        }
    }
}

/// The `count` payloads of an `Op::AppendBatch`, from the bytes the load
/// loop gave its codec (back to back, see [`LoadOp::payloads`]).
pub fn batch_payloads(payload: &[u8], count: u32) -> std::slice::Chunks<'_, u8> {
    payload.chunks(payload.len().div_ceil(count.max(1) as usize).max(1))
}

/// A decoded reply, independent of the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Appended,
    Page {
        count: u64,
        /// Highest seq of the page, if the target has sequence numbers.
        last_seq: Option<u64>,
        /// Whether more records remain, if the target says so.
        more: Option<bool>,
    },
    Trimmed,
    Error(String),
}

/// Per-target request encoder and reply decoder.
pub trait Codec<O = Op>: Send + 'static {
    /// Whether the target speaks over a secure link (our daemons) rather
    /// than plain TCP (Redis).
    const SECURE_LINK: bool = false;
    fn encode(&mut self, op: &O, payload: &[u8], out: &mut Vec<u8>) -> Result<()>;
    /// Decode one reply from the front of `buf`, consuming it; `None` if the
    /// reply is not complete yet.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Reply>>;
    /// Which request the reply `decode` just returned answers: its index
    /// among the requests encoded on this connection (from 0), or `None`
    /// for the oldest outstanding one (targets that answer in order).
    fn answered(&self) -> Option<u64> {
        None
    }
}

/// What one connection issues and how it reacts to replies.
pub trait Workload<O = Op>: Send + 'static {
    /// The next op to issue now, or `None` if there is nothing to issue until
    /// more replies arrive (or at all).
    fn next_op(&mut self) -> Option<O>;
    /// Handle a successful reply to `op`; returns how many messages (items)
    /// it completes (1 per append, the page size per fetch, 0 per trim).
    fn on_reply(&mut self, op: &O, reply: Reply) -> Result<u64>;
}

#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub addr: SocketAddr,
    pub connections: usize,
    pub pipeline: usize,
    /// Stop issuing new requests after this long; `None` = run the workload
    /// to completion.
    pub duration: Option<Duration>,
    /// Every append carries this many fresh pseudo-random (incompressible)
    /// bytes, like an end-to-end encrypted message.
    pub payload_bytes: usize,
}

/// The merged result of all connections of one load run.
#[derive(Debug)]
pub struct LoadOutcome {
    /// Messages completed, including those answered after the deadline.
    pub ops: u64,
    /// Messages completed by the deadline (timed runs).
    pub ops_in_window: u64,
    /// Requests still unanswered when the post-deadline grace ran out.
    pub abandoned: u64,
    /// The timed window, if the run was timed.
    pub window: Option<Duration>,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    pub hist: LatencyHist,
    /// Completions per second every [`RATE_SAMPLE_INTERVAL`] from the
    /// start to the deadline (timed runs: the tail after it is no part of
    /// the rate) or to the last answer (the last interval may be shorter).
    pub rate_samples: Vec<RateSample>,
}

/// How often a load run samples its completions for the timeline.
pub const RATE_SAMPLE_INTERVAL: Duration = Duration::from_millis(250);

/// Samples `done` every [`RATE_SAMPLE_INTERVAL`] until the first tick at
/// or past `until`, or until `stop` fires (then once more): the
/// completions per second of each interval since `start`. A last interval
/// under a quarter of the others is folded into the one before (a rate
/// over a few milliseconds is noise).
async fn sample_rate(
    done: Arc<AtomicU64>,
    (start, until): (Instant, Option<Instant>),
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Vec<RateSample> {
    let mut ticks =
        tokio::time::interval_at((start + RATE_SAMPLE_INTERVAL).into(), RATE_SAMPLE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut samples = Vec::new();
    // Where the last sample's interval began, and where it ended.
    let (mut prev, mut last) = ((start, 0u64), (start, 0u64));
    loop {
        let stopped = tokio::select! {
            _ = ticks.tick() => false,
            _ = &mut stop => true,
        };
        let (now, n) = (Instant::now(), done.load(Ordering::Relaxed));
        let short = (now - last.0) < RATE_SAMPLE_INTERVAL / 4;
        let from = if short && stopped && !samples.is_empty() {
            samples.pop();
            prev
        } else {
            last
        };
        let secs = (now - from.0).as_secs_f64();
        if secs > 0.0 {
            samples.push(RateSample {
                t_secs: (now - start).as_secs_f64(),
                ops_per_s: (n - from.1) as f64 / secs,
            });
            (prev, last) = (from, (now, n));
        }
        if stopped || until.is_some_and(|u| now >= u) {
            return samples;
        }
    }
}

impl LoadOutcome {
    /// Timed runs: messages completed within the window / the window, so a
    /// slow tail of answers after it neither inflates nor dilutes the rate.
    /// Untimed runs: all messages / the time until the last answer.
    pub fn ops_per_sec(&self) -> f64 {
        match self.window {
            Some(w) => self.ops_in_window as f64 / w.as_secs_f64().max(1e-9),
            None => self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9),
        }
    }
}

/// How long a timed run waits after its deadline for outstanding answers
/// before it drops the connection and counts them as abandoned.
pub fn tail_grace(window: Duration) -> Duration {
    window.min(Duration::from_secs(5))
}

/// What one connection (or one in-process appender) did.
#[derive(Default)]
pub struct ConnOutcome {
    pub ops: u64,
    pub ops_in_window: u64,
    pub abandoned: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub hist: LatencyHist,
}

/// Run `spec.connections` connections, connection `i` with `make(i)`.
/// All connections are established before the clock starts.
pub async fn run_load<O, C, W>(
    spec: &LoadSpec,
    mut make: impl FnMut(usize) -> (C, W),
) -> Result<LoadOutcome>
where
    O: LoadOp,
    C: Codec<O>,
    W: Workload<O>,
{
    let mut streams = Vec::with_capacity(spec.connections);
    for _ in 0..spec.connections {
        streams.push(Conn::connect(spec.addr, C::SECURE_LINK).await?);
    }
    let start = Instant::now();
    let deadline = spec.duration.map(|d| start + d);
    let done = Arc::new(AtomicU64::new(0));
    let (stop_sampling, stop) = tokio::sync::oneshot::channel();
    let sampler = tokio::spawn(sample_rate(done.clone(), (start, deadline), stop));
    let mut tasks = Vec::with_capacity(spec.connections);
    for (i, stream) in streams.into_iter().enumerate() {
        let (codec, workload) = make(i);
        let payload = vec![0u8; spec.payload_bytes];
        let pipeline = spec.pipeline.max(1);
        let run = (start, deadline, done.clone());
        tasks.push(tokio::spawn(drive(
            stream, codec, workload, pipeline, run, payload,
        )));
    }
    let mut total = LoadOutcome {
        ops: 0,
        ops_in_window: 0,
        abandoned: 0,
        window: spec.duration,
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
        hist: LatencyHist::new(),
        rate_samples: Vec::new(),
    };
    let joined = join_all(tasks, &mut total).await;
    let _ = stop_sampling.send(());
    total.rate_samples = sampler.await.context("rate sampler panicked")?;
    joined?;
    total.elapsed = start.elapsed();
    Ok(total)
}

/// Wait for every connection task and merge what each did into `total`.
async fn join_all(
    tasks: Vec<tokio::task::JoinHandle<Result<ConnOutcome>>>,
    total: &mut LoadOutcome,
) -> Result<()> {
    for task in tasks {
        let conn = task.await.context("load task panicked")??;
        total.ops += conn.ops;
        total.ops_in_window += conn.ops_in_window;
        total.abandoned += conn.abandoned;
        total.errors += conn.errors;
        if total.first_error.is_none() {
            total.first_error = conn.first_error;
        }
        total.hist.merge(&conn.hist)?;
    }
    Ok(())
}

/// One connection's loop. `run`: the run's start, its deadline (timed
/// runs) and the completions of all its connections so far (sampled for
/// the timeline).
async fn drive<O: LoadOp, C: Codec<O>, W: Workload<O>>(
    mut stream: Conn,
    mut codec: C,
    mut workload: W,
    pipeline: usize,
    run: (Instant, Option<Instant>, Arc<AtomicU64>),
    mut payload: Vec<u8>,
) -> Result<ConnOutcome> {
    let (start, deadline, done) = run;
    let mut payload_rng = Rng::new(start.elapsed().as_nanos() as u64 ^ payload.len() as u64);
    let payload_bytes = payload.len();
    const READ_RESERVE_BYTES: usize = 64 * 1024;
    let mut wbuf = Vec::with_capacity(READ_RESERVE_BYTES);
    let mut rbuf = BytesMut::with_capacity(4 * READ_RESERVE_BYTES);
    // (op, sent at, its index on this connection)
    let mut inflight: VecDeque<(O, Instant, u64)> = VecDeque::with_capacity(pipeline);
    let mut sent = 0u64;
    let mut out = ConnOutcome::default();
    loop {
        let now = Instant::now();
        if deadline.is_none_or(|d| now < d) {
            while inflight.len() < pipeline {
                let Some(op) = workload.next_op() else { break };
                let payloads = op.payloads();
                if payloads > 0 {
                    payload.resize(payloads * payload_bytes, 0);
                    payload_rng.fill(&mut payload);
                }
                codec.encode(&op, &payload, &mut wbuf)?;
                inflight.push_back((op, now, sent));
                sent += 1;
            }
        }
        if !wbuf.is_empty() {
            stream.write_all(&wbuf).await.context("write request")?;
            wbuf.clear();
        }
        if inflight.is_empty() {
            break;
        }
        if rbuf.capacity() - rbuf.len() < READ_RESERVE_BYTES {
            rbuf.reserve(READ_RESERVE_BYTES);
        }
        let n = match deadline {
            Some(d) => {
                let give_up = d + tail_grace(d - start);
                match tokio::time::timeout_at(give_up.into(), stream.read_buf(&mut rbuf)).await {
                    Ok(n) => n.context("read reply")?,
                    Err(_) => {
                        out.abandoned = inflight.len() as u64;
                        break;
                    }
                }
            }
            None => stream.read_buf(&mut rbuf).await.context("read reply")?,
        };
        if n == 0 {
            bail!(
                "peer closed the connection with {} requests in flight",
                inflight.len()
            );
        }
        let ops_before = out.ops;
        while let Some(reply) = codec.decode(&mut rbuf)? {
            let at = match codec.answered() {
                None => 0,
                Some(n) => inflight
                    .iter()
                    .position(|(_, _, i)| *i == n)
                    .with_context(|| format!("reply to request {n}, which is not outstanding"))?,
            };
            let (op, t0, _) = inflight
                .remove(at)
                .context("reply without an outstanding request")?;
            let now = Instant::now();
            let in_window = deadline.is_none_or(|d| now <= d);
            out.hist.record(now - t0);
            match reply {
                Reply::Error(e) => {
                    out.errors += 1;
                    if out.first_error.is_none() {
                        out.first_error = Some(e);
                    }
                }
                reply => {
                    let n = workload.on_reply(&op, reply)?;
                    out.ops += n;
                    if in_window {
                        out.ops_in_window += n;
                    }
                }
            }
        }
        // Once per read, not per reply: the connections share this counter.
        done.fetch_add(out.ops - ops_before, Ordering::Relaxed);
    }
    Ok(out)
}

/// A small, fast, deterministic generator (splitmix64) for user choice.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Unique message ids: connection index in the high half, a counter below.
fn msg_id(conn: u64, counter: u64) -> u128 {
    (u128::from(conn) << 64) | u128::from(counter)
}

/// Appends to users drawn uniformly from `user_base..user_base + users`,
/// for as long as the run lasts: one message per op, or (`batched`)
/// `batch_items` messages to one user per op.
pub struct RandomAppends {
    rng: Rng,
    conn: u64,
    counter: u64,
    user_base: u64,
    users: u64,
    batch_items: u32,
}

impl RandomAppends {
    pub fn new(conn: usize, seed: u64, user_base: u64, users: u64) -> Self {
        Self {
            rng: Rng::new(seed ^ (conn as u64).wrapping_mul(0x1000_0000_01B3)),
            conn: conn as u64,
            counter: 0,
            user_base,
            users,
            batch_items: 1,
        }
    }

    /// Ops of `batch_items` messages each (`Op::AppendBatch` if more
    /// than one), to users `0..users`.
    pub fn batched(conn: usize, seed: u64, users: u64, batch_items: u32) -> Self {
        Self {
            batch_items: batch_items.max(1),
            ..Self::new(conn, seed, 0, users)
        }
    }
}

impl Workload for RandomAppends {
    fn next_op(&mut self) -> Option<Op> {
        let user = self.user_base + self.rng.below(self.users);
        let first_msg_id = msg_id(self.conn, self.counter + 1);
        self.counter += u64::from(self.batch_items);
        Some(match self.batch_items {
            1 => Op::Append {
                user,
                msg_id: first_msg_id,
            },
            count => Op::AppendBatch {
                user,
                first_msg_id,
                count,
            },
        })
    }

    fn on_reply(&mut self, op: &Op, _reply: Reply) -> Result<u64> {
        Ok(op.payloads() as u64)
    }
}

/// Appends `per_user` messages to each of `users`, round-robin, then stops.
pub struct Prefill {
    conn: u64,
    users: Vec<u64>,
    per_user: u64,
    issued: u64,
}

impl Prefill {
    pub fn new(conn: usize, users: Vec<u64>, per_user: u64) -> Self {
        Self {
            conn: conn as u64,
            users,
            per_user,
            issued: 0,
        }
    }
}

impl Workload for Prefill {
    fn next_op(&mut self) -> Option<Op> {
        let total = self.users.len() as u64 * self.per_user;
        if self.issued >= total {
            return None;
        }
        let user = self.users[(self.issued % self.users.len() as u64) as usize];
        self.issued += 1;
        Some(Op::Append {
            user,
            msg_id: msg_id(self.conn, self.issued),
        })
    }

    fn on_reply(&mut self, _op: &Op, _reply: Reply) -> Result<u64> {
        Ok(1)
    }
}

/// Drains every mailbox of `users` page by page: fetch a page, then trim
/// what it returned while fetching the next page (the next fetch only needs
/// the page's last seq, not the trim's answer).
pub struct Drain {
    ready: VecDeque<Op>,
    page_count: u32,
}

impl Drain {
    pub fn new(users: &[u64], page_count: u32) -> Self {
        let ready = users
            .iter()
            .map(|&user| Op::Fetch {
                user,
                after_seq: 0,
                max_count: page_count,
            })
            .collect();
        Self { ready, page_count }
    }
}

impl Workload for Drain {
    fn next_op(&mut self) -> Option<Op> {
        self.ready.pop_front()
    }

    fn on_reply(&mut self, op: &Op, reply: Reply) -> Result<u64> {
        match (op, reply) {
            (
                Op::Fetch {
                    user, after_seq, ..
                },
                Reply::Page {
                    count,
                    last_seq,
                    more,
                },
            ) => {
                if count == 0 {
                    return Ok(0);
                }
                let last = last_seq.unwrap_or(after_seq + count);
                self.ready.push_back(Op::Trim {
                    user: *user,
                    up_to_seq: last,
                    count,
                });
                if more.unwrap_or(count >= u64::from(self.page_count)) {
                    self.ready.push_back(Op::Fetch {
                        user: *user,
                        after_seq: last,
                        max_count: self.page_count,
                    });
                }
                Ok(count)
            }
            (Op::Trim { .. }, Reply::Trimmed) => Ok(0),
            (op, reply) => bail!("unexpected reply {reply:?} to {op:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_trims_then_fetches_next_page() {
        let mut d = Drain::new(&[7], 100);
        let first = d.next_op().unwrap();
        assert_eq!(d.next_op(), None);
        let page = Reply::Page {
            count: 100,
            last_seq: None,
            more: None,
        };
        assert_eq!(d.on_reply(&first, page).unwrap(), 100);
        assert_eq!(
            d.next_op(),
            Some(Op::Trim {
                user: 7,
                up_to_seq: 100,
                count: 100
            })
        );
        let next = d.next_op().unwrap();
        assert_eq!(
            next,
            Op::Fetch {
                user: 7,
                after_seq: 100,
                max_count: 100
            }
        );
        let last = Reply::Page {
            count: 20,
            last_seq: Some(120),
            more: Some(false),
        };
        assert_eq!(d.on_reply(&next, last).unwrap(), 20);
        assert!(matches!(d.next_op(), Some(Op::Trim { up_to_seq: 120, .. })));
        assert_eq!(d.next_op(), None);
    }

    #[tokio::test]
    async fn the_rate_sampler_accounts_for_every_completion() {
        let done = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let (stop_tx, stop) = tokio::sync::oneshot::channel();
        let sampler = tokio::spawn(sample_rate(done.clone(), (start, None), stop));
        for _ in 0..70 {
            done.fetch_add(100, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A last interval of a few milliseconds folds into the one before.
        tokio::time::sleep_until((start + RATE_SAMPLE_INTERVAL * 3).into()).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        done.fetch_add(1, Ordering::Relaxed);
        stop_tx.send(()).unwrap();
        let samples = sampler.await.unwrap();
        assert!(samples.len() >= 2, "{samples:?}");
        assert!(samples.windows(2).all(|w| w[0].t_secs < w[1].t_secs));
        // Rate x interval, summed, gives back every completion.
        let mut last_t = 0.0;
        let total: f64 = samples
            .iter()
            .map(|s| {
                let n = s.ops_per_s * (s.t_secs - last_t);
                last_t = s.t_secs;
                n
            })
            .sum();
        assert!((total - 7001.0).abs() < 1.0, "{total} {samples:?}");
        let quarter = RATE_SAMPLE_INTERVAL.as_secs_f64() / 4.0;
        let mut t = 0.0;
        for s in &samples {
            assert!(
                s.t_secs - t >= quarter,
                "a short interval left: {samples:?}"
            );
            t = s.t_secs;
        }

        // A timed run's samples end at its deadline.
        let (_stop_tx, stop) = tokio::sync::oneshot::channel();
        let start = Instant::now();
        let until = start + RATE_SAMPLE_INTERVAL * 2;
        let samples = sample_rate(done, (start, Some(until)), stop).await;
        assert_eq!(samples.len(), 2, "{samples:?}");
    }

    #[test]
    fn batched_appends_count_every_item_and_never_reuse_a_msg_id() {
        let mut w = RandomAppends::batched(3, 1, 10, 4);
        let (a, b) = (w.next_op().unwrap(), w.next_op().unwrap());
        let (
            Op::AppendBatch {
                first_msg_id: fa,
                count: 4,
                ..
            },
            Op::AppendBatch {
                first_msg_id: fb, ..
            },
        ) = (a, b)
        else {
            panic!("{a:?} {b:?}")
        };
        assert_eq!(fb, fa + 4);
        assert_eq!(w.on_reply(&a, Reply::Appended).unwrap(), 4);
        let mut single = RandomAppends::batched(0, 1, 10, 1);
        assert!(matches!(single.next_op(), Some(Op::Append { .. })));
    }

    #[test]
    fn prefill_issues_exactly_users_times_per_user() {
        let mut p = Prefill::new(0, vec![1, 2, 3], 4);
        let mut n = 0;
        while p.next_op().is_some() {
            n += 1;
        }
        assert_eq!(n, 12);
    }
}
