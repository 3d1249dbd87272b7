//! The `profile` daemon as a real process: pushed invalidations (profile,
//! friends, blocks, passwords) reach a subscribed client, a restart makes it drop its cache and reconnect,
//! requests never hang on a dead link, SIGTERM exits 0, the data directory
//! is locked.

use crate::common;

use daemon::testing::DaemonProcess;
use profile::{ClientConfig, ClientError, ProfileClient};
use proto::profile::{Event, ImportUser};
use std::{net::SocketAddr, path::Path, process::Command, time::Duration};
use tokio::sync::mpsc;

/// Guards against hangs only; nothing here is a timing assertion.
const DEADLINE: Duration = Duration::from_secs(30);

fn start(data: &Path, listen: &str) -> DaemonProcess {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_profile"));
    cmd.args(["--listen", listen, "--data"]).arg(data);
    DaemonProcess::start(cmd, "profile", DEADLINE)
}

async fn next_event(rx: &mut mpsc::Receiver<Event>) -> Event {
    tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .expect("an event in time")
        .expect("event channel open")
}

fn quick_reconnect() -> ClientConfig {
    ClientConfig {
        reconnect_min_ms: 20,
        reconnect_max_ms: 200,
        ..ClientConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidations_are_pushed_and_a_restart_resets_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = start(dir.path(), "127.0.0.1:0");
    let addr: SocketAddr = daemon.addr;
    let (watcher, mut events) =
        ProfileClient::connect_subscribed(addr.to_string(), quick_reconnect())
            .await
            .unwrap();
    assert_eq!(
        next_event(&mut events).await,
        Event::CacheReset,
        "first event"
    );

    let writer = ProfileClient::connect(addr.to_string()).await.unwrap();
    let users = ["ann", "ben"]
        .map(|n| ImportUser {
            username: n.as_bytes().to_vec(),
            phc: common::phc(),
        })
        .to_vec();
    let ids: Vec<u64> = writer
        .import_users(users)
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let (ann, ben) = (ids[0], ids[1]);
    assert_eq!(writer.check_password("ann", b"pw").await.unwrap(), ann);

    let v = writer
        .set_profile(ann, Some("Ann"), Some("hello"))
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut events).await,
        Event::Invalidate {
            user: ann,
            version: v
        }
    );
    writer.friend_request(ann, ben, "Friends").await.unwrap();
    assert_eq!(
        next_event(&mut events).await,
        Event::Invalidate {
            user: ben,
            version: 2
        }
    );
    writer.friend_accept(ben, ann, "Buddies").await.unwrap();
    let mut got = vec![next_event(&mut events).await, next_event(&mut events).await];
    got.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(
        got,
        vec![
            Event::Invalidate {
                user: ann,
                version: v + 1
            },
            Event::Invalidate {
                user: ben,
                version: 3
            }
        ]
    );
    let view = watcher.friends(ben).await.unwrap();
    assert_eq!(view.profile.version, 3);
    assert_eq!(view.groups.len(), 1);
    assert_eq!(view.groups[0].name, "Buddies");
    assert_eq!(view.groups[0].friends[0].nickname, "Ann");

    // Blocks and credential changes reach the gateway's cache the same way.
    let v = writer.block(ben, ann).await.unwrap();
    assert_eq!(v, 4);
    assert_eq!(
        next_event(&mut events).await,
        Event::Invalidate {
            user: ben,
            version: v
        }
    );
    assert_eq!(writer.block(ben, ann).await.unwrap(), v, "no-op");
    writer.set_password(ben, b"new").await.unwrap();
    assert_eq!(
        next_event(&mut events).await,
        Event::Invalidate {
            user: ben,
            version: v + 1
        },
        "the no-op pushed nothing"
    );
    let relations = watcher.relations(vec![ben, 999]).await.unwrap();
    assert_eq!(relations.len(), 1, "unknown users left out");
    let r = &relations[0];
    assert_eq!(
        (&r.friends, &r.blocked, r.credential_epoch, r.version),
        (&vec![ann], &vec![ann], 1, v + 1)
    );
    assert_eq!(writer.unblock(ben, ann).await.unwrap(), v + 2);
    assert_eq!(
        next_event(&mut events).await,
        Event::Invalidate {
            user: ben,
            version: v + 2
        }
    );

    // A password check in flight when the daemon dies fails; it never hangs.
    let pending = {
        let w = writer.clone();
        tokio::spawn(async move { w.check_password("ann", b"pw").await })
    };
    tokio::time::sleep(Duration::from_millis(5)).await;
    daemon.kill();
    let outcome = tokio::time::timeout(DEADLINE, pending)
        .await
        .expect("no hang")
        .unwrap();
    assert!(
        matches!(outcome, Ok(id) if id == ann) || matches!(outcome, Err(ClientError::Disconnected)),
        "{outcome:?}"
    );
    assert_eq!(
        next_event(&mut events).await,
        Event::CacheReset,
        "link lost"
    );
    assert!(matches!(
        watcher.get_profile(ann).await,
        Err(ClientError::Disconnected)
    ));

    // Same address, same data: the client reconnects by itself, is told to
    // reset its cache again, and reads what was committed.
    let daemon = start(dir.path(), &addr.to_string());
    assert_eq!(
        next_event(&mut events).await,
        Event::CacheReset,
        "resubscribed"
    );
    let profile = tokio::time::timeout(DEADLINE, async {
        loop {
            match watcher.get_profile(ann).await {
                Ok(p) => return p,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
    .expect("reconnected");
    assert_eq!(
        (profile.nickname.as_str(), profile.signature.as_str()),
        ("Ann", "hello")
    );
    let v = writer_after_restart(&addr)
        .await
        .set_profile(ben, Some("Ben"), None)
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut events).await,
        Event::Invalidate {
            user: ben,
            version: v
        }
    );
    assert!(daemon.terminate().success(), "SIGTERM exits 0");
}

async fn writer_after_restart(addr: &SocketAddr) -> ProfileClient {
    ProfileClient::connect(addr.to_string()).await.unwrap()
}

#[test]
fn a_locked_data_directory_refuses_a_second_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let first = start(dir.path(), "127.0.0.1:0");
    let mut second = Command::new(env!("CARGO_BIN_EXE_profile"));
    second
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path());
    // With the key, so it is the lock that stops it.
    daemon::testing::with_cluster_key(&mut second);
    let out = second.output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("locked"), "{stderr}");
    assert!(first.terminate().success());
}
