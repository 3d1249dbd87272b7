//! Nobody can read, forge, replay or redirect a session, and the gateway
//! cannot be used to amplify traffic. Every bad datagram is dropped without
//! any state change, and counted.

use crate::support::{message, server_addr, NetConfig, Sim};
use proptest::prelude::*;
use proto::session::{
    wire, ClientConfig, ClientSession, CloseReason, CookieMode, Event, ServerConfig, ServerEvent,
    StaticKeypair,
};
use std::{net::SocketAddr, time::Duration};

fn server_config(cookie_mode: CookieMode) -> ServerConfig {
    ServerConfig {
        cookie_mode,
        ..ServerConfig::default()
    }
}

/// A gateway and one logged-in client on a perfect network.
fn connected(cookie_mode: CookieMode) -> (Sim, u64) {
    let mut sim = Sim::new(11, NetConfig::perfect(), server_config(cookie_mode));
    let key = sim.public_key();
    sim.connect(ClientConfig::default(), key, b"login");
    assert!(sim.run_until(Duration::from_secs(30), |s| s.session_of(0).is_some()));
    let id = sim.session_of(0).unwrap();
    (sim, id)
}

/// Client -> gateway transport datagrams seen so far.
fn client_transports(sim: &Sim) -> Vec<Vec<u8>> {
    sim.log
        .iter()
        .filter(|(_, to, d)| *to == server_addr() && d[0] == wire::TYPE_TRANSPORT)
        .map(|(_, _, d)| d.clone())
        .collect()
}

/// Send one message from the client and let it be delivered; the datagram
/// that carried it.
fn send_one(sim: &mut Sim, tag: u32) -> Vec<u8> {
    let before = client_transports(sim).len();
    sim.clients[0].session.send(message(tag, 64)).unwrap();
    let id = sim.session_of(0).unwrap();
    let n = sim.server_messages(id).len();
    assert!(
        sim.run_until(Duration::from_secs(5), |s| s.server_messages(id).len()
            == n + 1)
    );
    client_transports(sim)[before].clone()
}

/// Inject `d` as if from the client and check it changed nothing: no event,
/// and one more drop counted.
fn assert_dropped(sim: &mut Sim, from: SocketAddr, d: Vec<u8>) {
    let events = sim.server_events.len();
    let dropped = sim.server.stats().dropped_total();
    let sessions = sim.server.session_count();
    sim.inject(from, server_addr(), d);
    sim.run_until(Duration::from_secs(1), |_| false);
    assert_eq!(
        sim.server.stats().dropped_total(),
        dropped + 1,
        "the drop is counted"
    );
    assert_eq!(
        sim.server_events.len(),
        events,
        "no event from a dropped datagram"
    );
    assert_eq!(sim.server.session_count(), sessions);
}

/// The session still works after the attacks: one more message, once.
fn assert_still_works(sim: &mut Sim, tag: u32) {
    let id = sim.session_of(0).unwrap();
    let before = sim.server_messages(id);
    send_one(sim, tag);
    let after = sim.server_messages(id);
    assert_eq!(after.len(), before.len() + 1);
    assert_eq!(after.last(), Some(&message(tag, 64)));
}

#[test]
fn forged_truncated_and_wrong_session_datagrams_are_dropped() {
    let (mut sim, id) = connected(CookieMode::Never);
    let real = send_one(&mut sim, 1);
    let from = sim.clients[0].addr;
    // Forged: right header, random ciphertext.
    let mut forged = real.clone();
    for b in &mut forged[wire::TRANSPORT_HEADER_BYTES..] {
        *b = b.wrapping_mul(31).wrapping_add(7);
    }
    forged[9..17].copy_from_slice(&1000u64.to_le_bytes()); // a fresh counter
    assert_dropped(&mut sim, from, forged);
    // A flipped bit anywhere in the ciphertext or tag.
    let mut flipped = real.clone();
    flipped[real.len() - 1] ^= 0x40;
    flipped[9..17].copy_from_slice(&1001u64.to_le_bytes());
    assert_dropped(&mut sim, from, flipped);
    // Truncated.
    assert_dropped(&mut sim, from, real[..real.len() - 5].to_vec());
    assert_dropped(&mut sim, from, real[..10].to_vec());
    // Wrong session id (no such session).
    let mut wrong = real.clone();
    wrong[1..9].copy_from_slice(&(id ^ 1).to_le_bytes());
    assert_dropped(&mut sim, from, wrong);
    // Unknown type, empty.
    assert_dropped(&mut sim, from, vec![9; 100]);
    assert_dropped(&mut sim, from, Vec::new());
    let s = sim.server.stats().clone();
    assert!(
        s.dropped_unauthentic >= 3 && s.dropped_malformed >= 3 && s.dropped_unknown_session >= 1,
        "{s:?}"
    );
    assert_still_works(&mut sim, 2);
}

#[test]
fn replayed_datagrams_are_dropped_and_deliver_nothing_twice() {
    let (mut sim, _) = connected(CookieMode::Never);
    let real = send_one(&mut sim, 1);
    let from = sim.clients[0].addr;
    assert_dropped(&mut sim, from, real.clone());
    assert_eq!(sim.server.stats().dropped_replayed, 1);
    // Replayed from another address: still dropped, and the session is not
    // redirected there.
    let attacker: SocketAddr = "10.9.9.9:666".parse().unwrap();
    assert_dropped(&mut sim, attacker, real);
    assert_eq!(sim.server.peer(sim.session_of(0).unwrap()), Some(from));
    assert_still_works(&mut sim, 2);
}

#[test]
fn a_datagram_older_than_the_replay_window_is_dropped() {
    let (mut sim, _) = connected(CookieMode::Never);
    let from = sim.clients[0].addr;
    // Capture a datagram without delivering it, then move 200 counters on.
    sim.net.loss = 1.0;
    sim.clients[0].session.send(message(1, 64)).unwrap();
    sim.run_until(Duration::from_millis(1), |_| false);
    let held = client_transports(&sim).last().unwrap().clone();
    sim.net.loss = 0.0;
    for tag in 2..200 {
        sim.clients[0].session.send(message(tag, 10)).unwrap();
        sim.run_until(Duration::from_millis(50), |_| false);
    }
    let id = sim.session_of(0).unwrap();
    assert!(
        sim.run_until(Duration::from_secs(30), |s| s.server_messages(id).len()
            == 199)
    );
    assert_dropped(&mut sim, from, held);
    assert!(sim.server.stats().dropped_replayed >= 1);
}

#[test]
fn an_authentic_datagram_from_a_new_address_moves_the_session_there() {
    let (mut sim, id) = connected(CookieMode::Never);
    let old = sim.clients[0].addr;
    let new: SocketAddr = "10.0.7.7:4242".parse().unwrap();
    sim.clients[0].addr = new; // NAT rebinding
    send_one(&mut sim, 1);
    assert_eq!(sim.server.peer(id), Some(new));
    assert_ne!(old, new);
}

#[test]
fn a_client_with_the_wrong_server_key_never_connects() {
    let mut sim = Sim::new(12, NetConfig::perfect(), server_config(CookieMode::Never));
    let wrong = StaticKeypair::generate([99; 32]).public;
    let config = ClientConfig {
        handshake_timeout: Duration::from_secs(5),
        ..ClientConfig::default()
    };
    sim.connect(config, wrong, b"login");
    assert!(sim.run_until(Duration::from_secs(10), |s| s.clients[0]
        .session
        .is_closed()));
    assert_eq!(
        sim.clients[0].events,
        vec![Event::Closed(CloseReason::HandshakeTimedOut)]
    );
    assert!(
        sim.server_events.is_empty(),
        "no handshake request reached the app"
    );
    assert!(
        sim.server.stats().dropped_unauthentic >= 1,
        "mac1 check failed and counted"
    );
    assert_eq!(sim.server.pending_count(), 0, "no state kept for it");
}

#[test]
fn a_forged_handshake_response_does_not_break_the_login() {
    let mut sim = Sim::new(13, NetConfig::perfect(), server_config(CookieMode::Never));
    sim.net.delay = Duration::from_millis(100);
    let key = sim.public_key();
    sim.connect(ClientConfig::default(), key, b"login");
    // Let the initiation go out, then race a forged response to the client.
    sim.step();
    let init = sim.log[0].2.clone();
    let mut forged = vec![0u8; 200];
    forged[0] = wire::TYPE_RESPONSE;
    forged[1..5].copy_from_slice(&init[1..5]); // the client index is visible on the path
    sim.clients[0].session.handle_datagram(sim.now, &forged);
    assert_eq!(sim.clients[0].session.stats().dropped_unauthentic, 1);
    // The spent handshake is rebuilt with a fresh key on the next retry.
    assert!(sim.run_until(Duration::from_secs(30), |s| s.session_of(0).is_some()));
}

#[test]
fn the_cookie_path_demands_a_round_trip_and_keeps_no_state() {
    let mut sim = Sim::new(14, NetConfig::perfect(), server_config(CookieMode::Always));
    let key = sim.public_key();
    sim.connect(ClientConfig::default(), key, b"login");
    assert!(sim.run_until(Duration::from_secs(30), |s| s.session_of(0).is_some()));
    // One answer, sent twice (`COOKIE_COPIES`).
    assert_eq!(sim.server.stats().cookies_sent, 2);
    let cookie_replies: Vec<_> = sim
        .log
        .iter()
        .filter(|(_, _, d)| d[0] == wire::TYPE_COOKIE)
        .collect();
    assert_eq!(cookie_replies.len(), 2);
    assert_eq!(cookie_replies[0].2.len(), wire::COOKIE_BYTES);
    // The initiation that carried a valid mac2 for its address, replayed
    // from another address, only gets a cookie again (no state, no event).
    let with_cookie = sim
        .log
        .iter()
        .filter(|(_, _, d)| d[0] == wire::TYPE_INIT)
        .nth(1)
        .unwrap()
        .2
        .clone();
    assert_ne!(&with_cookie[wire::INIT_MAC2_AT..], &[0u8; 16][..]);
    let attacker: SocketAddr = "10.9.9.9:666".parse().unwrap();
    let events = sim.server_events.len();
    sim.inject(attacker, server_addr(), with_cookie);
    sim.run_until(Duration::from_secs(1), |_| false);
    assert_eq!(sim.server.stats().cookies_sent, 4);
    assert_eq!(sim.server_events.len(), events);
    assert_eq!(sim.server.session_count(), 1);
}

#[test]
fn under_load_the_gateway_switches_to_cookies() {
    let mut config = server_config(CookieMode::UnderLoad { inits_per_s_max: 5 });
    config.pending_handshakes_max = 100;
    let mut sim = Sim::new(15, NetConfig::perfect(), config);
    let key = sim.public_key();
    for _ in 0..20 {
        sim.connect(ClientConfig::default(), key, b"login");
    }
    assert!(sim.run_until(Duration::from_secs(30), |s| (0..20)
        .all(|i| s.session_of(i).is_some())));
    assert!(
        sim.server.stats().cookies_sent >= 15,
        "{:?}",
        sim.server.stats()
    );
}

#[test]
fn no_handshake_answer_is_larger_than_its_initiation() {
    let mut sim = Sim::new(16, NetConfig::perfect(), server_config(CookieMode::Always));
    sim.auto_accept = Some(vec![0xAB; wire::RESPONSE_PAYLOAD_MAX]);
    let key = sim.public_key();
    sim.connect(ClientConfig::default(), key, &[1; wire::INIT_PAYLOAD_MAX]);
    assert!(sim.run_until(Duration::from_secs(30), |s| s.session_of(0).is_some()));
    let mut answers = 0;
    for (from, _, d) in &sim.log {
        if *from == server_addr() && d[0] != wire::TYPE_TRANSPORT {
            assert!(
                d.len() <= proto::session::config::HANDSHAKE_INIT_BYTES,
                "{} bytes",
                d.len()
            );
            answers += 1;
        }
        if d[0] == wire::TYPE_INIT {
            assert_eq!(d.len(), proto::session::config::HANDSHAKE_INIT_BYTES);
        }
    }
    // Two copies of the cookie reply (42 bytes for 1,200), then the INIT
    // with mac2 sent twice: the second copy arrives while the first is
    // still being decided and is dropped (`DuplicateHandshake`).
    assert_eq!(answers, 3, "two cookie copies and one response");
    assert_eq!(sim.server.stats().dropped_duplicate_handshake, 1);
    // The largest answer payload is the limit; one byte more is refused.
    let too_big = vec![0; wire::RESPONSE_PAYLOAD_MAX + 1];
    sim.auto_accept = None;
    sim.connect(ClientConfig::default(), key, b"x");
    sim.run_until(Duration::from_secs(5), |s| {
        s.server_events
            .iter()
            .filter(|e| matches!(e, ServerEvent::HandshakeRequest { .. }))
            .count()
            == 2
    });
    let pending = sim
        .server_events
        .iter()
        .rev()
        .find_map(|e| match e {
            ServerEvent::HandshakeRequest { pending, .. } => Some(*pending),
            _ => None,
        })
        .unwrap();
    assert!(sim.server.accept(sim.now, pending, &too_big).is_err());
    assert!(ClientSession::new(
        sim.now,
        ClientConfig::default(),
        key,
        &[0; wire::INIT_PAYLOAD_MAX + 1],
        [0; 32]
    )
    .is_err());
}

#[test]
fn a_rejected_login_gets_its_answer_and_no_session() {
    let mut sim = Sim::new(17, NetConfig::perfect(), server_config(CookieMode::Never));
    sim.auto_accept = None;
    let key = sim.public_key();
    sim.connect(ClientConfig::default(), key, b"wrong password");
    sim.run_until(Duration::from_secs(5), |s| !s.server_events.is_empty());
    let ServerEvent::HandshakeRequest {
        pending, payload, ..
    } = sim.server_events[0].clone()
    else {
        panic!("expected a handshake request");
    };
    assert_eq!(payload, b"wrong password");
    sim.server.reject(pending, b"bad credentials").unwrap();
    assert!(sim.run_until(Duration::from_secs(5), |s| s.clients[0].session.is_closed()));
    assert_eq!(
        sim.clients[0].events,
        vec![Event::Rejected {
            payload: b"bad credentials".to_vec()
        }]
    );
    assert_eq!(sim.server.session_count(), 0);
}

#[test]
fn a_retransmitted_initiation_gets_the_same_answer_not_a_second_login() {
    let mut sim = Sim::new(18, NetConfig::perfect(), server_config(CookieMode::Never));
    let key = sim.public_key();
    sim.connect(ClientConfig::default(), key, b"login");
    sim.step();
    let init = sim.log[0].2.clone();
    let from = sim.clients[0].addr;
    // The same initiation three more times (retransmissions or replays).
    for _ in 0..3 {
        sim.inject(from, server_addr(), init.clone());
    }
    assert!(sim.run_until(Duration::from_secs(5), |s| s.session_of(0).is_some()));
    sim.run_until(Duration::from_secs(1), |_| false);
    let requests = sim
        .server_events
        .iter()
        .filter(|e| matches!(e, ServerEvent::HandshakeRequest { .. }))
        .count();
    assert_eq!(requests, 1, "one login decision for one initiation");
    assert_eq!(sim.server.session_count(), 1);
}

#[test]
fn the_session_limit_refuses_logins_with_a_defined_answer() {
    let config = ServerConfig {
        sessions_max: 2,
        cookie_mode: CookieMode::Never,
        ..ServerConfig::default()
    };
    let mut sim = Sim::new(19, NetConfig::perfect(), config);
    let key = sim.public_key();
    for _ in 0..2 {
        sim.connect(ClientConfig::default(), key, b"login");
    }
    assert!(sim.run_until(Duration::from_secs(5), |s| s.server.session_count() == 2));
    // A third initiation while the table is full: dropped and counted.
    sim.connect(
        ClientConfig {
            handshake_timeout: Duration::from_secs(3),
            ..ClientConfig::default()
        },
        key,
        b"login",
    );
    assert!(sim.run_until(Duration::from_secs(5), |s| s.clients[2].session.is_closed()));
    assert_eq!(sim.server.session_count(), 2);
    assert!(sim.server.stats().dropped_full >= 1);
    assert_eq!(
        sim.clients[2].events,
        vec![Event::Closed(CloseReason::HandshakeTimedOut)]
    );
}

#[test]
fn a_full_table_at_accept_time_refuses_the_accept() {
    let config = ServerConfig {
        sessions_max: 1,
        cookie_mode: CookieMode::Never,
        ..ServerConfig::default()
    };
    let mut sim = Sim::new(20, NetConfig::perfect(), config);
    sim.auto_accept = None;
    let key = sim.public_key();
    sim.connect(ClientConfig::default(), key, b"a");
    sim.connect(ClientConfig::default(), key, b"b");
    sim.run_until(Duration::from_secs(1), |s| s.server_events.len() == 2);
    let pendings: Vec<_> = sim
        .server_events
        .iter()
        .filter_map(|e| match e {
            ServerEvent::HandshakeRequest { pending, .. } => Some(*pending),
            _ => None,
        })
        .collect();
    assert_eq!(
        pendings.len(),
        2,
        "both were read before either was decided"
    );
    sim.server.accept(sim.now, pendings[0], b"ok").unwrap();
    assert_eq!(
        sim.server.accept(sim.now, pendings[1], b"ok"),
        Err(proto::session::AcceptError::Full)
    );
    // The application answers the refused one (the pending is still open).
    sim.server.reject(pendings[1], b"server full").unwrap();
    assert!(sim.run_until(Duration::from_secs(5), |s| s.clients[1].session.is_closed()));
    assert_eq!(
        sim.clients[1].events,
        vec![Event::Rejected {
            payload: b"server full".to_vec()
        }]
    );
}

#[test]
fn the_pending_handshake_limit_drops_with_a_count() {
    let config = ServerConfig {
        pending_handshakes_max: 1,
        cookie_mode: CookieMode::Never,
        ..ServerConfig::default()
    };
    let mut sim = Sim::new(21, NetConfig::perfect(), config);
    sim.auto_accept = None;
    let key = sim.public_key();
    sim.connect(ClientConfig::default(), key, b"a");
    sim.connect(ClientConfig::default(), key, b"b");
    sim.run_until(Duration::from_millis(100), |_| false);
    assert_eq!(sim.server.pending_count(), 1);
    assert!(sim.server.stats().dropped_full >= 1);
    // Undecided handshakes expire after handshake_timeout, freeing room.
    sim.run_until(Duration::from_secs(11), |_| false);
    assert!(sim.server.pending_count() <= 1);
}

#[test]
fn answered_handshakes_do_not_use_up_the_pending_limit() {
    let config = ServerConfig {
        pending_handshakes_max: 2,
        answered_handshakes_max: 3,
        cookie_mode: CookieMode::Never,
        ..ServerConfig::default()
    };
    let mut sim = Sim::new(22, NetConfig::perfect(), config);
    let key = sim.public_key();
    // Ten logins one after another within one handshake_timeout: each is
    // answered, so the two deciding slots are free again for the next.
    for i in 0..10 {
        sim.connect(ClientConfig::default(), key, b"login");
        assert!(
            sim.run_until(Duration::from_secs(2), |s| s.session_of(i).is_some()),
            "login {i}"
        );
    }
    assert_eq!(sim.server.session_count(), 10);
    assert_eq!(sim.server.stats().dropped_full, 0);
    assert_eq!(sim.server.pending_count(), 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn endpoints_never_panic_on_arbitrary_datagrams(
        datagrams in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..1300), 1..20),
        first in 0u8..7,
    ) {
        let (mut sim, _) = connected(CookieMode::Never);
        let from = sim.clients[0].addr;
        for mut d in datagrams {
            if !d.is_empty() { d[0] = first; }
            sim.server.handle_datagram(sim.now, from, &d);
            sim.clients[0].session.handle_datagram(sim.now, &d);
        }
        prop_assert_eq!(sim.server.session_count(), 1);
        assert_still_works(&mut sim, 3);
    }
}
