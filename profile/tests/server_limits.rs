//! The TCP server's limits, each with its defined outcome: a bad or
//! oversized frame closes that connection only; past `connections_max` a
//! connection is closed at once; at `inflight_requests_max` the server
//! stops reading the connection until an answer is written.

mod common;

use bytes::BytesMut;
use proto::{
    frame::{self, Decoded},
    profile::{ImportUser, Request, RequestBody, ResponseBody, ServerMessage},
};
use std::time::Duration;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Guards against hangs only.
const DEADLINE: Duration = Duration::from_secs(30);

async fn start(
    adjust: impl FnOnce(&mut profile::Config),
) -> (profile::daemon::Daemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    adjust(&mut config);
    (profile::daemon::start(config).await.unwrap(), dir)
}

async fn send(stream: &mut TcpStream, id: u64, body: RequestBody) {
    let mut out = Vec::new();
    frame::encode(&Request { id, body }, 1 << 20, &mut out).unwrap();
    stream.write_all(&out).await.unwrap();
}

/// The next response, or `None` once the server closed the connection.
async fn next(stream: &mut TcpStream, buf: &mut BytesMut) -> Option<(u64, ResponseBody)> {
    tokio::time::timeout(DEADLINE, async {
        loop {
            if let Decoded::Frame(m) = frame::decode::<ServerMessage>(buf, 16 << 20).unwrap() {
                match m {
                    ServerMessage::Response(r) => return Some((r.id, r.body)),
                    ServerMessage::Event(_) => continue,
                }
            }
            match stream.read_buf(buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("no hang")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_only_their_connection() {
    let (daemon, _dir) = start(|_| {}).await;
    let addr = daemon.local_addr();
    let mut buf = BytesMut::new();
    let mut garbage = TcpStream::connect(addr).await.unwrap();
    garbage
        .write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    assert_eq!(
        next(&mut garbage, &mut buf).await,
        None,
        "malformed: closed"
    );
    let mut big = TcpStream::connect(addr).await.unwrap();
    big.write_all(&(64u32 << 20).to_le_bytes()).await.unwrap();
    assert_eq!(
        next(&mut big, &mut BytesMut::new()).await,
        None,
        "oversized: closed"
    );
    let mut fine = TcpStream::connect(addr).await.unwrap();
    send(&mut fine, 9, RequestBody::Ping).await;
    assert_eq!(
        next(&mut fine, &mut BytesMut::new()).await,
        Some((9, ResponseBody::Pong))
    );
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_are_closed() {
    let (daemon, _dir) = start(|c| c.server.connections_max = 1).await;
    let mut first = TcpStream::connect(daemon.local_addr()).await.unwrap();
    send(&mut first, 1, RequestBody::Ping).await;
    assert_eq!(
        next(&mut first, &mut BytesMut::new()).await,
        Some((1, ResponseBody::Pong))
    );
    let mut second = TcpStream::connect(daemon.local_addr()).await.unwrap();
    send(&mut second, 2, RequestBody::Ping).await;
    assert_eq!(next(&mut second, &mut BytesMut::new()).await, None);
    send(&mut first, 3, RequestBody::Ping).await;
    assert_eq!(
        next(&mut first, &mut BytesMut::new()).await,
        Some((3, ResponseBody::Pong))
    );
    daemon.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inflight_limit_holds_later_requests_back() {
    {
        let (daemon, _dir) = start(|c| c.server.inflight_requests_max = 1).await;
        let mut s = TcpStream::connect(daemon.local_addr()).await.unwrap();
        let mut buf = BytesMut::new();
        let users = vec![ImportUser {
            username: b"ann".to_vec(),
            phc: common::phc(),
        }];
        send(&mut s, 1, RequestBody::ImportUsers { users }).await;
        assert!(matches!(
            next(&mut s, &mut buf).await,
            Some((1, ResponseBody::Imported(_)))
        ));
        // A password check takes an argon2 run on the pool, while a Ping is
        // answered as soon as it is read: without the limit the Ping comes
        // back first. With one slot, the Ping is not even read until the
        // check's answer is written.
        let check = RequestBody::CheckPassword {
            username: b"ann".to_vec(),
            password: b"pw".to_vec(),
        };
        let mut both = Vec::new();
        frame::encode(&Request { id: 2, body: check }, 1 << 20, &mut both).unwrap();
        frame::encode(
            &Request {
                id: 3,
                body: RequestBody::Ping,
            },
            1 << 20,
            &mut both,
        )
        .unwrap();
        s.write_all(&both).await.unwrap();
        let first = next(&mut s, &mut buf).await.unwrap().0;
        let second = next(&mut s, &mut buf).await.unwrap().0;
        assert_eq!((first, second), (2, 3));
        daemon.shutdown().await;
    }
}
