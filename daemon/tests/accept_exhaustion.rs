//! [`daemon::Acceptor`] with the process's descriptors really exhausted.
//!
//! Lowering `RLIMIT_NOFILE` applies to the whole process, so this file is
//! its own test binary with this one test.

use daemon::Acceptor;
use std::{fs::File, time::Duration};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// The highest descriptor number open now.
fn highest_fd() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .max()
        .unwrap()
}

fn set_nofile(soft: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    let old = limit.rlim_cur;
    limit.rlim_cur = soft;
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
    old
}

/// The value of `name{kind="emfile"}` in the rendered metrics.
fn emfile_count(rendered: &str, name: &str) -> u64 {
    let prefix = format!("{name}{{kind=\"emfile\"}} ");
    rendered
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn the_acceptor_backs_off_while_descriptors_run_out_and_recovers() {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();
    // Paused time: every backoff sleep ends as soon as the runtime is idle,
    // so the test counts attempts, not seconds.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut acceptor = Acceptor::new(listener, "exhaust");

        let old_limit = set_nofile(highest_fd() + 16);
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut filler = Vec::new();
        let exhausted = loop {
            match File::open("/dev/null") {
                Ok(f) => filler.push(f),
                Err(e) => break e,
            }
        };
        assert_eq!(exhausted.raw_os_error(), Some(libc::EMFILE));

        // Ten seconds of failing accepts: 1+2+...+512 ms, then one a second.
        let waited = tokio::time::timeout(Duration::from_secs(10), acceptor.accept()).await;
        assert!(
            waited.is_err(),
            "nothing can be accepted without descriptors"
        );
        let attempts = acceptor.errors();
        assert!(
            (15..=25).contains(&attempts),
            "about 20 attempts in 10 s, not a busy loop: {attempts}"
        );
        assert_eq!(acceptor.backoffs(), attempts, "every EMFILE backs off");
        assert_eq!(acceptor.backoff(), Some(Duration::from_secs(1)), "capped");
        assert_eq!(
            emfile_count(&metrics.render(), "exhaust_accept_errors_total"),
            attempts
        );

        // A shutdown signal ends the wait at once, mid-backoff.
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let _ = stop.send(true);
        });
        tokio::select! {
            _ = acceptor.accept() => panic!("accepted without descriptors"),
            _ = stopped.wait_for(|s| *s) => {}
        }
        assert_eq!(
            acceptor.errors(),
            attempts,
            "no attempt before the backoff ends"
        );

        // Descriptors freed: the pending connection is accepted, the
        // backoff is reset.
        drop(filler);
        let (mut accepted, from) = tokio::time::timeout(Duration::from_secs(10), acceptor.accept())
            .await
            .expect("accepted once descriptors are free");
        assert_eq!(from, client.local_addr().unwrap());
        assert_eq!(acceptor.backoff(), None);
        assert_eq!(acceptor.errors(), attempts);
        client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        accepted.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        set_nofile(old_limit);
    });
}
