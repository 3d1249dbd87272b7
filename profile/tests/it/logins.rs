//! Login freshness: `ClaimLogin` records a user's newest `login_ns` once,
//! refuses anything not newer (a replayed handshake) without changing
//! anything, answers with the user's relations, and remembers across a
//! restart of the service. `ClaimLoginOnce` does the same, and answers
//! the very same claim (same `login_ns`, same number) again as claimed.

use crate::common;

use profile::service::Service;
use proto::profile::{ErrorCode, Event, RequestBody, ResponseBody, UserId};

async fn claim(s: &Service, user: UserId, login_ns: u64) -> ResponseBody {
    s.handle(RequestBody::ClaimLogin { user, login_ns }).await
}

async fn claim_once(s: &Service, user: UserId, login_ns: u64, claim: u64) -> ResponseBody {
    let body = RequestBody::ClaimLoginOnce {
        user,
        login_ns,
        claim,
    };
    s.handle(body).await
}

fn claimed(r: &ResponseBody) -> bool {
    matches!(r, ResponseBody::LoginClaimed(_))
}

#[tokio::test]
async fn a_login_is_claimed_once_and_older_ones_are_stale() {
    let t = common::open(|_| {});
    let s = &t.service;
    let ids = common::import(s, 2).await;
    let (a, b) = (ids[0], ids[1]);
    let sub = s.hub().subscribe(16);
    assert_eq!(sub.next_events().await, vec![Event::CacheReset]);

    match claim(s, a, 1_000).await {
        ResponseBody::LoginClaimed(r) => {
            assert_eq!((r.user, r.disabled, r.credential_epoch), (a, false, 0))
        }
        other => panic!("{other:?}"),
    }
    let stale = |last_ns| ResponseBody::StaleLogin { last_ns };
    assert_eq!(claim(s, a, 1_000).await, stale(1_000), "the same again");
    assert_eq!(claim(s, a, 999).await, stale(1_000), "an older one");
    assert_eq!(claim(s, a, 0).await, stale(1_000));
    assert!(matches!(
        claim(s, a, 1_001).await,
        ResponseBody::LoginClaimed(_)
    ));
    assert_eq!(claim(s, a, 1_000).await, stale(1_001));
    assert!(
        matches!(claim(s, b, 5).await, ResponseBody::LoginClaimed(r) if r.user == b),
        "each user has its own"
    );
    match claim(s, 9_999, 1).await {
        ResponseBody::Error(e) => assert_eq!(e.code, ErrorCode::NotFound),
        other => panic!("{other:?}"),
    }
    // A login changes nothing a gateway caches: the next event is the one
    // of the next real change.
    let version = match s
        .handle(RequestBody::Block {
            user: a,
            blocked: b,
        })
        .await
    {
        ResponseBody::Version(v) => v,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        sub.next_events().await,
        vec![Event::Invalidate { user: a, version }]
    );
}

#[tokio::test]
async fn the_last_login_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::config(dir.path());
    let user = {
        let (s, writer) = Service::open(dir.path(), &config).unwrap();
        let user = common::import(&s, 1).await[0];
        assert!(matches!(
            claim(&s, user, 77).await,
            ResponseBody::LoginClaimed(_)
        ));
        drop(s);
        writer.join().unwrap();
        user
    };
    let (s, _writer) = Service::open(dir.path(), &config).unwrap();
    assert_eq!(
        claim(&s, user, 77).await,
        ResponseBody::StaleLogin { last_ns: 77 }
    );
    assert!(matches!(
        claim(&s, user, 78).await,
        ResponseBody::LoginClaimed(_)
    ));
}

#[tokio::test]
async fn a_numbered_claim_sent_again_is_claimed_again_and_no_other_is() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::config(dir.path());
    let stale = |last_ns| ResponseBody::StaleLogin { last_ns };
    let user = {
        let (s, writer) = Service::open(dir.path(), &config).unwrap();
        let user = common::import(&s, 1).await[0];
        assert!(claimed(&claim_once(&s, user, 500, 7).await));
        assert!(
            claimed(&claim_once(&s, user, 500, 7).await),
            "the same claim again (sent to a second replica)"
        );
        assert_eq!(
            claim_once(&s, user, 500, 8).await,
            stale(500),
            "a replay of that login: another claim of the same login_ns"
        );
        assert_eq!(claim(&s, user, 500).await, stale(500), "an unnumbered one");
        assert_eq!(claim_once(&s, user, 499, 7).await, stale(500), "older");
        drop(s);
        writer.join().unwrap();
        user
    };
    let (s, _writer) = Service::open(dir.path(), &config).unwrap();
    assert!(
        claimed(&claim_once(&s, user, 500, 7).await),
        "the claim's number is durable"
    );
    // An unnumbered claim (an older gateway) records no number: the same
    // login_ns with any number is then stale.
    assert!(claimed(&claim(&s, user, 600).await));
    assert_eq!(claim_once(&s, user, 600, 0).await, stale(600));
    assert!(
        claimed(&claim_once(&s, user, 601, 0).await),
        "0 is a number too"
    );
    assert!(claimed(&claim_once(&s, user, 601, 0).await));
}
