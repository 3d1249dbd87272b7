//! What a Noise_NK responder's X25519 work costs on this machine, measured
//! in-process in the same run as the login storm it is compared with: one
//! ephemeral key pair and two Diffie-Hellman operations (`es` with the
//! static key, `ee` with the ephemeral one), through snow's default
//! resolver, the implementation the gateway's handshakes use. Also the
//! whole responder handshake (build, read the initiator's message, write
//! the answer), for scale.

use crate::procs;
use proto::session::crypto;
use serde::Serialize;
use snow::{
    params::DHChoice,
    resolvers::{CryptoResolver, DefaultResolver},
};
use std::time::{Duration, Instant};

/// How long each measurement loops (CPU time is read per thread) ...
const MEASURE_FOR: Duration = Duration::from_millis(100);
/// ... and how many times: the cheapest is kept (what the work costs when
/// nothing else disturbs it; any disturbance only adds), which can only
/// make a ratio over it larger.
const MEASUREMENTS: usize = 5;

#[derive(Debug, Clone, Serialize)]
pub struct ResponderCrypto {
    /// CPU of one key generation and two DH operations (the cheapest of
    /// several measurements).
    pub x25519_us: f64,
    /// CPU of one whole responder handshake (snow: build, read, write).
    pub handshake_us: f64,
    pub rounds: u64,
}

/// Measure both on a thread of their own (its CPU time is theirs alone).
pub fn measure() -> std::io::Result<ResponderCrypto> {
    std::thread::Builder::new()
        .name("x25519-cost".into())
        .spawn(|| {
            let (x25519_us, rounds) = per_round_us(x25519_round());
            let (handshake_us, _) = per_round_us(handshake_round());
            ResponderCrypto {
                x25519_us,
                handshake_us,
                rounds,
            }
        })?
        .join()
        .map_err(|_| std::io::Error::other("the measuring thread panicked"))
}

/// Thread CPU per call of `round`: the cheapest mean of
/// [`MEASUREMENTS`] loops of [`MEASURE_FOR`] each; and the calls made.
fn per_round_us(mut round: impl FnMut(u64)) -> (f64, u64) {
    round(0); // warm up
    let (mut best, mut total) = (f64::INFINITY, 0);
    for _ in 0..MEASUREMENTS {
        let (t0, cpu0) = (Instant::now(), procs::own_thread_cpu_time());
        let mut n = 0;
        while t0.elapsed() < MEASURE_FOR {
            round(total + n);
            n += 1;
        }
        let cpu = procs::own_thread_cpu_time() - cpu0;
        best = best.min(cpu.as_secs_f64() * 1e6 / n as f64);
        total += n;
    }
    (best, total)
}

/// One ephemeral key pair and two DH operations, as the responder does:
/// `es` (its static key with the initiator's ephemeral one), then a fresh
/// ephemeral key pair and `ee`. The static key is set once, outside.
fn x25519_round() -> impl FnMut(u64) {
    let dh = || {
        DefaultResolver
            .resolve_dh(&DHChoice::Curve25519)
            .expect("snow resolves X25519")
    };
    let mut rng = DefaultResolver.resolve_rng().expect("snow has an RNG");
    let mut stat = dh();
    stat.set(&seed(u64::MAX));
    let mut theirs = dh();
    theirs.set(&seed(1));
    let theirs = theirs.pubkey().to_vec();
    let mut ephemeral = dh();
    move |_| {
        let mut out = [0u8; 32];
        stat.dh(&theirs, &mut out).expect("X25519");
        ephemeral
            .generate(&mut *rng)
            .expect("X25519 key generation");
        ephemeral.dh(&theirs, &mut out).expect("X25519");
        std::hint::black_box(out);
    }
}

/// A whole Noise_NK responder handshake (a fresh responder each round) on
/// initiator messages made in advance, so only the responder is timed.
fn handshake_round() -> impl FnMut(u64) {
    let keys = crypto::StaticKeypair::generate(seed(u64::MAX));
    let mut first = vec![0u8; 256];
    let mut answer = vec![0u8; 256];
    let messages: Vec<Vec<u8>> = (0..64)
        .map(|i| {
            let mut init = crypto::initiator(&keys.public, seed(i));
            let len = init
                .write_message(&[], &mut first)
                .expect("initiator message");
            first[..len].to_vec()
        })
        .collect();
    move |n| {
        let mut resp = crypto::responder(&keys, seed(n));
        let msg = &messages[n as usize % messages.len()];
        let mut payload = [0u8; 64];
        resp.read_message(msg, &mut payload).expect("valid message");
        resp.write_message(&[], &mut answer)
            .expect("responder answer");
        std::hint::black_box(&answer);
    }
}

fn seed(n: u64) -> [u8; 32] {
    let mut s = [7u8; 32];
    s[..8].copy_from_slice(&n.to_le_bytes());
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_figures_are_measured() {
        let m = measure().unwrap();
        assert!(m.rounds > 0);
        assert!(m.x25519_us > 0.0 && m.handshake_us > 0.0, "{m:?}");
    }
}
