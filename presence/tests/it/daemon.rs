//! End-to-end tests of the `presence` binary and the gateway client over
//! real sockets (authenticated links: the daemon gets the test process's
//! cluster key).

use daemon::{
    secure::Link,
    testing::{idle_raw_connections, link, link_from, DaemonProcess as Daemon},
};
use presence::{
    client::{request_once, ClientConfig, ClientError, PresenceClient, PresenceEvent},
    Status,
};
use proto::presence::{ErrorCode, RequestBody, ResponseBody, BATCH_USERS_MAX};
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::Command,
    time::{Duration, Instant},
};
use tokio::{io::AsyncReadExt, sync::mpsc};

/// Guard against a hung test; never a performance assertion.
const HANG_LIMIT: Duration = Duration::from_secs(60);

fn command(listen: &str, grace_ms: u32) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_presence"));
    cmd.args(["--listen", listen, "--grace-ms", &grace_ms.to_string()])
        .env("RUST_LOG", "warn");
    cmd
}

fn start(grace_ms: u32) -> Daemon {
    Daemon::start(command("127.0.0.1:0", grace_ms), "presence", HANG_LIMIT)
}

/// Start a daemon with `toml` as its config file (kept in the returned
/// directory).
fn start_with_config(toml: &str) -> (Daemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("presence.toml");
    std::fs::write(&file, toml).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_presence"));
    cmd.args(["--listen", "127.0.0.1:0", "--config"])
        .arg(&file)
        .env("RUST_LOG", "warn");
    (Daemon::start(cmd, "presence", HANG_LIMIT), dir)
}

/// Send request `id` on `link`; its answer (events are skipped), or `None`
/// once the server closed the link.
async fn ask(link: &mut Link, id: u64, body: RequestBody) -> Option<ResponseBody> {
    use proto::{
        frame::Decoded,
        presence::{Request, ServerFrame},
    };
    let mut out = Vec::new();
    proto::frame::encode(&Request { id, body }, 1024, &mut out).unwrap();
    if link.writer.send(&out).await.is_err() {
        return None;
    }
    let mut buf = bytes::BytesMut::new();
    let answer = async {
        loop {
            if let Decoded::Frame(f) =
                proto::frame::decode::<ServerFrame>(&mut buf, 1 << 24).unwrap()
            {
                match f {
                    ServerFrame::Response(r) => {
                        assert_eq!(r.id, id);
                        return Some(r.body);
                    }
                    ServerFrame::Event(_) => continue,
                }
            }
            match link.reader.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(HANG_LIMIT, answer)
        .await
        .expect("answered or closed")
}

fn config() -> ClientConfig {
    ClientConfig {
        backoff_min_ms: 20,
        backoff_max_ms: 200,
        ..ClientConfig::default()
    }
}

async fn gateway(addr: SocketAddr, id: u32) -> (PresenceClient, mpsc::Receiver<PresenceEvent>) {
    PresenceClient::connect(addr.to_string(), id, config())
        .await
        .expect("connect to presence")
}

/// The next event that `want` accepts (others are skipped).
async fn next_event(
    events: &mut mpsc::Receiver<PresenceEvent>,
    want: impl Fn(&PresenceEvent) -> bool,
) -> PresenceEvent {
    let deadline = Instant::now() + HANG_LIMIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Some(e)) if want(&e) => return e,
            Ok(Some(_)) => {}
            Ok(None) => panic!("event stream ended"),
            Err(_) => panic!("no matching event within {HANG_LIMIT:?}"),
        }
    }
}

#[tokio::test]
async fn a_replaced_session_s_gateway_is_told() {
    let d = start(10_000);
    let (gw1, mut ev1) = gateway(d.addr, 1).await;
    let (gw2, _ev2) = gateway(d.addr, 2).await;
    assert_eq!(gw1.online(5, 100, Status::Online).await.unwrap(), None);
    let replaced = gw2.online(5, 200, Status::Away).await.unwrap();
    let replaced = replaced.expect("the first session was replaced");
    assert_eq!((replaced.gateway, replaced.session), (1, 100));
    let kicked = next_event(&mut ev1, |e| matches!(e, PresenceEvent::Kicked { .. })).await;
    assert_eq!(
        kicked,
        PresenceEvent::Kicked {
            user: 5,
            session: 100
        }
    );
    assert!(gw1.tracked_sessions().is_empty(), "the client dropped it");
    let entry = gw1.lookup(&[5]).await.unwrap()[0].expect("online");
    assert_eq!(
        (entry.gateway, entry.session, entry.status),
        (2, 200, Status::Away)
    );
    // A stale offline of the replaced session changes nothing.
    assert!(!gw1.offline(5, 100).await.unwrap());
    assert!(gw1.lookup(&[5]).await.unwrap()[0].is_some());
}

#[tokio::test]
async fn a_dropped_gateway_s_users_go_offline_after_the_grace_and_watchers_hear_it() {
    let d = start(300);
    let (gw1, _ev1) = gateway(d.addr, 1).await;
    let (gw2, mut ev2) = gateway(d.addr, 2).await;
    for user in 1..=50 {
        gw1.online(user, 1000 + user, Status::Online).await.unwrap();
    }
    let now = gw2.watch(77, &[3, 4, 999]).await.unwrap();
    assert!(now[0].is_some() && now[1].is_some() && now[2].is_none());
    drop(gw1);
    let mut offline = Vec::new();
    while offline.len() < 2 {
        let e = next_event(&mut ev2, |e| {
            matches!(e, PresenceEvent::StatusChanged { .. })
        })
        .await;
        let PresenceEvent::StatusChanged {
            user,
            entry,
            sessions,
        } = e
        else {
            unreachable!()
        };
        assert_eq!(entry, None, "user {user} went offline");
        assert_eq!(sessions, vec![77]);
        offline.push(user);
    }
    offline.sort_unstable();
    assert_eq!(offline, vec![3, 4]);
    // The expiry scans the table a shard at a time while serving others:
    // wait for it to finish.
    let deadline = Instant::now() + HANG_LIMIT;
    while gw2.stats().await.unwrap().expired_users_total < 50 {
        assert!(Instant::now() < deadline, "expiry did not finish");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let users: Vec<u64> = (1..=50).collect();
    let entries = gw2.lookup(&users).await.unwrap();
    assert!(entries.iter().all(Option::is_none));
    let stats = gw2.stats().await.unwrap();
    assert_eq!(stats.users_online, 0);
    assert_eq!(stats.expired_users_total, 50);
    assert_eq!(gw2.gateways().await.unwrap().len(), 1, "gateway 1 is gone");
}

#[tokio::test]
async fn a_restarted_server_is_refilled_by_the_gateways() {
    let d = start(10_000);
    let addr = d.addr;
    let (gw1, mut ev1) = gateway(addr, 1).await;
    let (gw2, mut ev2) = gateway(addr, 2).await;
    for user in 1..=300u64 {
        let gw = if user % 2 == 0 { &gw1 } else { &gw2 };
        gw.online(user, user * 10, Status::Online).await.unwrap();
    }
    gw1.offline(2, 20).await.unwrap();
    gw1.watch(40, &[1, 3]).await.unwrap();
    d.kill();
    // While the server is down, calls fail at once and never hang; the
    // change is kept for the next sync.
    let down = tokio::time::timeout(HANG_LIMIT, gw2.online(1001, 5, Status::Busy))
        .await
        .expect("a call while disconnected returns");
    assert!(matches!(down, Err(ClientError::Disconnected)), "{down:?}");
    let d = Daemon::start(command(&addr.to_string(), 10_000), "presence", HANG_LIMIT);
    next_event(&mut ev1, |e| *e == PresenceEvent::Reconnected).await;
    next_event(&mut ev2, |e| *e == PresenceEvent::Reconnected).await;
    let mut expected: HashMap<u64, (u32, u64)> = HashMap::new();
    for (id, gw) in [(1u32, &gw1), (2, &gw2)] {
        for s in gw.tracked_sessions() {
            expected.insert(s.user, (id, s.session));
        }
    }
    assert_eq!(expected.len(), 300, "299 logged in before, one while down");
    assert_eq!(expected[&1001], (2, 5));
    let users: Vec<u64> = (1..=1001).collect();
    let entries = gw1.lookup(&users).await.unwrap();
    for (user, entry) in users.iter().zip(entries) {
        let got = entry.map(|e| (e.gateway, e.session));
        assert_eq!(got, expected.get(user).copied(), "user {user}");
    }
    // Watches were sent again too.
    gw2.offline(3, 30).await.unwrap();
    let e = next_event(&mut ev1, |e| {
        matches!(
            e,
            PresenceEvent::StatusChanged {
                user: 3,
                entry: None,
                ..
            }
        )
    })
    .await;
    assert_eq!(
        e,
        PresenceEvent::StatusChanged {
            user: 3,
            entry: None,
            sessions: vec![40]
        }
    );
    drop(d);
}

#[tokio::test]
async fn typed_errors_over_the_wire() {
    let d = start(10_000);
    let addr = d.addr.to_string();
    let err = request_once(
        &addr,
        RequestBody::Online {
            user: 1,
            session: 1,
            status: Status::Online,
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, ClientError::Presence(e) if e.code == ErrorCode::NotRegistered),
        "{err}"
    );
    let config = ClientConfig {
        batch_users_max: BATCH_USERS_MAX + 1,
        ..config()
    };
    let (gw, _ev) = PresenceClient::connect(addr.as_str(), 9, config)
        .await
        .unwrap();
    let users: Vec<u64> = (0..BATCH_USERS_MAX as u64 + 1).collect();
    let err = gw.lookup(&users).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Presence(e) if e.code == ErrorCode::BatchTooLarge),
        "{err}"
    );
    // The connection still works after a refused request.
    assert_eq!(gw.lookup(&users[..10]).await.unwrap().len(), 10);
    match request_once(&addr, RequestBody::Stats).await.unwrap() {
        ResponseBody::Stats(s) => assert_eq!(s.gateways_connected, 1),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn bad_frames_close_only_their_connection_and_sigterm_exits_cleanly() {
    let d = start(10_000);
    let (gw, _ev) = gateway(d.addr, 1).await;
    for garbage in [
        vec![0xFFu8, 0xFF, 0xFF, 0xFF],
        vec![3, 0, 0, 0, 0xEE, 0xEE, 0xEE],
        vec![0, 0, 0, 0],
    ] {
        // Inside an authenticated link, so the frame decoder sees it.
        let mut raw = link(d.addr).await;
        raw.writer.send(&garbage).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(HANG_LIMIT, raw.reader.read(&mut buf))
            .await
            .expect("the server closes a bad connection")
            .unwrap_or(0);
        assert_eq!(n, 0, "closed without an answer");
    }
    gw.online(1, 1, Status::Online).await.unwrap();
    assert!(gw.lookup(&[1]).await.unwrap()[0].is_some());
    let status = d.terminate();
    assert!(status.success(), "SIGTERM exits 0: {status}");
}

#[test]
fn help_works() {
    let out = Command::new(env!("CARGO_BIN_EXE_presence"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in ["--listen", "--metrics-addr", "--config", "--grace-ms"] {
        assert!(text.contains(flag), "{flag} in --help");
    }
}

/// Frames of `bodies` as requests with ids 1, 2, ...
fn frames(bodies: Vec<RequestBody>) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, body) in bodies.into_iter().enumerate() {
        let request = proto::presence::Request {
            id: i as u64 + 1,
            body,
        };
        proto::frame::encode(&request, 1024, &mut out).unwrap();
    }
    out
}

#[tokio::test]
async fn a_silent_gateway_loses_its_lease_and_then_its_users() {
    let (d, _dir) = start_with_config("[server]\nlease_ms = 200\ngrace_ms = 100\n");
    let mut raw = link(d.addr).await;
    let register = RequestBody::Register {
        gateway: 3,
        peer_addr: "127.0.0.1:1".into(),
    };
    let online = RequestBody::Online {
        user: 8,
        session: 80,
        status: Status::Online,
    };
    raw.writer
        .send(&frames(vec![register, online]))
        .await
        .unwrap();
    // Read until the server closes the silent connection.
    let mut sink = Vec::new();
    tokio::time::timeout(HANG_LIMIT, raw.reader.read_to_end(&mut sink))
        .await
        .expect("the server closes a connection whose lease ran out")
        .unwrap();
    assert!(!sink.is_empty(), "both requests were answered first");
    let deadline = Instant::now() + HANG_LIMIT;
    loop {
        let answer = request_once(&d.addr.to_string(), RequestBody::Lookup { users: vec![8] })
            .await
            .unwrap();
        if answer
            == (ResponseBody::Entries {
                entries: vec![None],
            })
        {
            break;
        }
        assert!(Instant::now() < deadline, "user 8 never went offline");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_gateway_that_does_not_read_its_events_is_cut_off() {
    let d = start(60_000);
    // Gateway 50 has many sessions watching user 1 (each event names them
    // all, so events are large) and never reads.
    let mut raw = link(d.addr).await;
    let mut bodies = vec![RequestBody::Register {
        gateway: 50,
        peer_addr: String::new(),
    }];
    bodies.extend((1..=5000u64).map(|session| RequestBody::Watch {
        session,
        users: vec![1],
    }));
    let mut out = Vec::new();
    for (i, body) in bodies.into_iter().enumerate() {
        let request = proto::presence::Request {
            id: i as u64 + 1,
            body,
        };
        proto::frame::encode(&request, 1 << 20, &mut out).unwrap();
    }
    raw.writer.send(&out).await.unwrap();
    let (gw, _ev) = gateway(d.addr, 2).await;
    let connected = |gateways: Vec<proto::presence::GatewayInfo>| {
        gateways.iter().any(|g| g.gateway == 50 && g.connected)
    };
    let deadline = Instant::now() + HANG_LIMIT;
    while !connected(gw.gateways().await.unwrap()) {
        assert!(Instant::now() < deadline, "gateway 50 never registered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut toggles = 0u64;
    loop {
        gw.online(1, toggles, Status::Online).await.unwrap();
        toggles += 1;
        if toggles.is_multiple_of(100) && !connected(gw.gateways().await.unwrap()) {
            break;
        }
        assert!(Instant::now() < deadline, "gateway 50 was never cut off");
    }
    assert!(
        gw.gateways().await.unwrap().iter().any(|g| g.gateway == 50),
        "cut off, it is in its grace period"
    );
    // Its connection is closed: reading ends.
    let mut sink = Vec::new();
    tokio::time::timeout(HANG_LIMIT, raw.reader.read_to_end(&mut sink))
        .await
        .expect("the connection was closed")
        .ok();
}

/// Past `connections_max` an authenticated link is closed at once while
/// the admitted one is served; connections that never prove the cluster
/// key take none of those slots and lock no peer out: with 2,000 of them
/// open from 127.0.0.1, a peer from another address gets the one slot, and
/// one from 127.0.0.1 itself (the strangers' own address) gets in and is
/// answered too while they stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_past_the_limit_are_closed_and_strangers_lock_no_peer_out() {
    let (d, _dir) = start_with_config("[server]\nconnections_max = 1\n");
    let raw = idle_raw_connections(d.addr, 2_000).await;

    let other = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let mut first = tokio::time::timeout(HANG_LIMIT, link_from(other, d.addr))
        .await
        .expect("no hang")
        .expect("a peer from another address gets through");
    assert_eq!(
        ask(&mut first, 1, RequestBody::Ping).await,
        Some(ResponseBody::Pong),
        "the strangers took no connection slot"
    );
    let mut second = link_from(other, d.addr).await.expect("handshake");
    assert_eq!(
        ask(&mut second, 1, RequestBody::Ping).await,
        None,
        "past connections_max: closed unanswered"
    );
    assert_eq!(
        ask(&mut first, 2, RequestBody::Ping).await,
        Some(ResponseBody::Pong),
        "the admitted link is still served"
    );
    drop(first);

    // From the strangers' own address. Retried (until a generous deadline,
    // no timing asserted): the gate may turn a peer away while their
    // handshakes are pending, and the daemon frees `first`'s slot when it
    // sees it go.
    let addr = d.addr.to_string();
    let deadline = Instant::now() + HANG_LIMIT;
    while !matches!(
        request_once(&addr, RequestBody::Ping).await,
        Ok(ResponseBody::Pong)
    ) {
        assert!(
            Instant::now() < deadline,
            "a peer on 127.0.0.1 was locked out"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(raw);
}

#[tokio::test]
async fn requests_in_flight_when_the_server_dies_fail_and_never_hang() {
    let d = start(10_000);
    let (gw, _ev) = gateway(d.addr, 1).await;
    let users: Vec<u64> = (1..=1000).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (gw, users) = (gw.clone(), users.clone());
        tasks.spawn(async move {
            loop {
                if let Err(e) = gw.lookup(&users).await {
                    return e;
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    d.kill();
    let mut errors = Vec::new();
    while let Some(done) = tokio::time::timeout(HANG_LIMIT, tasks.join_next())
        .await
        .expect("every caller got an answer or an error")
    {
        errors.push(done.unwrap());
    }
    assert_eq!(errors.len(), 20);
    assert!(
        errors
            .iter()
            .all(|e| matches!(e, ClientError::Disconnected)),
        "{errors:?}"
    );
}

#[tokio::test]
async fn the_client_keeps_its_copy_in_step_with_the_server() {
    let (d, _dir) = start_with_config("[limits]\nusers_max = 2\nwatches_per_session_max = 2\n");
    let (gw, _ev) = gateway(d.addr, 1).await;
    gw.online(1, 10, Status::Online).await.unwrap();
    gw.online(2, 20, Status::Online).await.unwrap();
    let err = gw.online(3, 30, Status::Online).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Presence(e) if e.code == ErrorCode::TableFull),
        "{err}"
    );
    let mut tracked: Vec<u64> = gw.tracked_sessions().iter().map(|s| s.user).collect();
    tracked.sort_unstable();
    assert_eq!(tracked, vec![1, 2], "a refused login is not tracked");
    let err = gw.watch(10, &[1, 2, 3]).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Presence(e) if e.code == ErrorCode::WatchesFull),
        "{err}"
    );
    assert_eq!(gw.watch(10, &[2, 3]).await.unwrap().len(), 2);
    assert_eq!(gw.unwatch(10, &[3, 99]).await.unwrap(), 1);
    // The gateway's complete list is now only user 1: user 2 goes offline.
    let only = presence::SessionInfo {
        user: 1,
        session: 10,
        since_s: 5,
        status: Status::Busy,
    };
    assert_eq!(gw.resync(vec![only]).await.unwrap(), 1);
    let entries = gw.lookup(&[1, 2]).await.unwrap();
    let first = entries[0].expect("user 1 stays online");
    assert_eq!((first.since_s, first.status), (5, Status::Busy));
    assert_eq!(entries[1], None);
    assert_eq!(gw.tracked_sessions(), vec![only]);
    assert_eq!(gw.stats().await.unwrap().users_online, 1);
}
