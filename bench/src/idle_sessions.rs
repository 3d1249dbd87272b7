//! Bytes per idle session: build N sessions with real handshakes in this
//! process (no sockets: the datagrams go through channels between a client
//! thread and the server endpoint), drop the clients, and measure what the
//! server endpoint holds.
//!
//! Virtual time: each chunk of handshakes happens `CHUNK_TICK` after the
//! previous one, with a `handshake_timeout` shorter than that, so the
//! endpoint forgets answered handshakes between chunks (as it would with
//! real time passing) while no session gets anywhere near its idle expiry.

use crate::{alloc_count, procs};
use anyhow::{ensure, Context, Result};
use proto::session::{
    ClientConfig, ClientSession, CookieMode, Event, ServerConfig, ServerEndpoint, ServerEvent,
    StaticKeypair,
};
use serde::Serialize;
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::mpsc,
    time::{Duration, Instant},
};

/// Handshakes per chunk (one message between the threads each way).
const CHUNK_HANDSHAKES: usize = 1024;
/// Virtual time between chunks.
const CHUNK_TICK: Duration = Duration::from_millis(2);
/// Chunks the client thread prepares ahead of the server.
const CHUNKS_AHEAD: usize = 2;

#[derive(Debug, Clone, Serialize)]
pub struct IdleResult {
    pub sessions: usize,
    /// Growth of the process's resident set (VmRSS) across building the
    /// sessions, after the clients are dropped and freed memory is given
    /// back (`malloc_trim`), divided by `sessions`. The reported figure.
    pub rss_bytes_per_session: f64,
    /// Live heap bytes the endpoint gained (counting allocator; includes
    /// untouched capacity of grown tables), divided by `sessions`.
    pub heap_bytes_per_session: f64,
    pub rss_growth_bytes: u64,
    pub heap_growth_bytes: u64,
    /// Seconds to build every session (both threads busy).
    pub build_secs: f64,
    /// Sessions the endpoint holds that are not idle (must be 0).
    pub active_sessions: usize,
}

type Datagrams = Vec<(SocketAddr, Vec<u8>)>;

/// A distinct fake client address for handshake `i` of a chunk.
fn client_addr(i: usize) -> SocketAddr {
    let ip = Ipv4Addr::from(0x0A00_0000 | (i as u32 >> 8));
    SocketAddrV4::new(ip, 10_000 + (i as u16 & 0xFF)).into()
}

fn chunk_index(addr: SocketAddr) -> Option<usize> {
    let SocketAddr::V4(a) = addr else { return None };
    let high = (u32::from(*a.ip()) & 0x00FF_FFFF) as usize;
    Some(high << 8 | (a.port() - 10_000) as usize)
}

/// Return freed heap pages to the kernel, so RSS shows what is live.
fn trim_heap() {
    // SAFETY: glibc's malloc_trim only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

pub fn measure(sessions: usize) -> Result<IdleResult> {
    measure_in_chunks(sessions, CHUNK_HANDSHAKES)
}

fn measure_in_chunks(sessions: usize, chunk: usize) -> Result<IdleResult> {
    assert!(chunk <= CHUNK_HANDSHAKES, "client addresses are per chunk");
    trim_heap();
    let rss_before = procs::rss_bytes(std::process::id())?;
    let heap_before = alloc_count::live_bytes();
    let started = Instant::now();
    let keys = StaticKeypair::generate(crate::udp_load::os_seed());
    let server_public = keys.public;
    let config = ServerConfig {
        sessions_max: sessions,
        cookie_mode: CookieMode::Never,
        handshake_timeout: CHUNK_TICK / 2,
        ..ServerConfig::default()
    };
    let mut now = Instant::now();
    let mut server = ServerEndpoint::new(config, keys, crate::udp_load::os_seed(), now);
    let (init_tx, init_rx) = mpsc::sync_channel::<Datagrams>(CHUNKS_AHEAD);
    let (resp_tx, resp_rx) = mpsc::channel::<Datagrams>();
    let clients = std::thread::Builder::new()
        .name("idle-clients".into())
        .spawn(move || run_clients(sessions, chunk, server_public, now, init_tx, resp_rx))
        .context("spawn the client thread")?;
    for inits in init_rx {
        now += CHUNK_TICK;
        server.handle_timeout(now);
        let answers = answer_chunk(&mut server, now, &inits);
        if resp_tx.send(answers).is_err() {
            break; // the client thread failed; its error comes from join
        }
    }
    drop(resp_tx);
    let connected = clients
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    let build_secs = started.elapsed().as_secs_f64();
    ensure!(
        connected == sessions && server.session_count() == sessions,
        "built {connected} client sessions and {} server sessions of {sessions}",
        server.session_count()
    );
    now += CHUNK_TICK;
    server.handle_timeout(now); // forget the last chunk's answered handshakes
    trim_heap();
    let rss_growth = procs::rss_bytes(std::process::id())?.saturating_sub(rss_before);
    let heap_growth = alloc_count::live_bytes().saturating_sub(heap_before);
    let active_sessions = server.active_session_count();
    drop(server);
    trim_heap();
    Ok(IdleResult {
        sessions,
        rss_bytes_per_session: rss_growth as f64 / sessions as f64,
        heap_bytes_per_session: heap_growth as f64 / sessions as f64,
        rss_growth_bytes: rss_growth,
        heap_growth_bytes: heap_growth as u64,
        build_secs,
        active_sessions,
    })
}

/// The server side of one chunk: read every initiation, accept every
/// login, and collect the responses.
fn answer_chunk(server: &mut ServerEndpoint, now: Instant, inits: &Datagrams) -> Datagrams {
    for (from, d) in inits {
        server.handle_datagram(now, *from, d);
        while let Some(event) = server.poll_event() {
            if let ServerEvent::HandshakeRequest { pending, .. } = event {
                // A failure shows as a missing session in the final check.
                let _ = server.accept(now, pending, b"ok");
            }
        }
    }
    let mut answers = Vec::with_capacity(inits.len());
    let mut buf = [0u8; proto::session::config::DATAGRAM_BYTES_MAX];
    while let Some(t) = server.poll_transmit(now, &mut buf) {
        answers.push((t.dest, buf[..t.len].to_vec()));
    }
    answers
}

/// The client thread: start every handshake, finish it with the server's
/// answer, drop the client. The number that connected.
fn run_clients(
    sessions: usize,
    chunk: usize,
    server_public: [u8; 32],
    now: Instant,
    init_tx: mpsc::SyncSender<Datagrams>,
    resp_rx: mpsc::Receiver<Datagrams>,
) -> Result<usize> {
    let mut in_flight = std::collections::VecDeque::new();
    let mut connected = 0;
    let mut started = 0;
    while started < sessions || !in_flight.is_empty() {
        if started < sessions && in_flight.len() < CHUNKS_AHEAD {
            let n = chunk.min(sessions - started);
            let (clients, inits) = start_chunk(n, server_public, now)?;
            init_tx.send(inits).context("server thread gone")?;
            in_flight.push_back(clients);
            started += n;
            continue;
        }
        let mut clients = in_flight.pop_front().expect("a chunk in flight");
        let answers = resp_rx.recv().context("server thread gone")?;
        connected += finish_chunk(&mut clients, now, &answers);
    }
    Ok(connected)
}

fn start_chunk(
    n: usize,
    server_public: [u8; 32],
    now: Instant,
) -> Result<(Vec<ClientSession>, Datagrams)> {
    let mut clients = Vec::with_capacity(n);
    let mut inits = Vec::with_capacity(n);
    let mut buf = [0u8; proto::session::config::DATAGRAM_BYTES_MAX];
    for i in 0..n {
        let seed = crate::udp_load::os_seed();
        let mut c = ClientSession::new(now, ClientConfig::default(), server_public, b"idle", seed)
            .context("client session")?;
        let len = c.poll_transmit(now, &mut buf).context("no initiation")?;
        inits.push((client_addr(i), buf[..len].to_vec()));
        clients.push(c);
    }
    Ok((clients, inits))
}

/// Hand each answer to its client; the number that connected.
fn finish_chunk(clients: &mut [ClientSession], now: Instant, answers: &Datagrams) -> usize {
    let mut connected = 0;
    for (to, d) in answers {
        let Some(c) = chunk_index(*to).and_then(|i| clients.get_mut(i)) else {
            continue;
        };
        c.handle_datagram(now, d);
        while let Some(event) = c.poll_event() {
            connected += usize::from(matches!(event, Event::Connected { .. }));
        }
    }
    connected
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_addresses_are_distinct_and_map_back() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..CHUNK_HANDSHAKES {
            let a = client_addr(i);
            assert!(seen.insert(a));
            assert_eq!(chunk_index(a), Some(i));
        }
    }

    #[test]
    fn a_small_build_connects_every_session_and_leaves_them_idle() {
        // 30 in chunks of 8: several chunks in flight, a short last one.
        // (`measure` itself checks that every session connected.)
        let r = measure_in_chunks(30, 8).unwrap();
        assert_eq!(r.sessions, 30);
        assert_eq!(r.active_sessions, 0);
    }
}
