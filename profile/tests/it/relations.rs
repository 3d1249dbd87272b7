//! Block lists, credential epochs and the relations a gateway caches:
//! blocking is idempotent and bounded, a blocked user's friend request
//! looks like one to an unknown user, password changes and disabling
//! revoke (epoch + version), and every real change is pushed as an
//! `Invalidate` while a no-op pushes nothing.

use crate::common;

use profile::service::Service;
use proto::profile::{ErrorCode, Event, Relations, RequestBody, ResponseBody, UserId};
use std::time::Duration;

fn code(r: ResponseBody) -> ErrorCode {
    match r {
        ResponseBody::Error(e) => e.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn version(r: ResponseBody) -> u64 {
    match r {
        ResponseBody::Version(v) => v,
        other => panic!("expected a version, got {other:?}"),
    }
}

fn block(user: UserId, blocked: UserId) -> RequestBody {
    RequestBody::Block { user, blocked }
}

fn unblock(user: UserId, blocked: UserId) -> RequestBody {
    RequestBody::Unblock { user, blocked }
}

async fn relations(s: &Service, users: Vec<UserId>) -> Vec<Relations> {
    match s.handle(RequestBody::GetRelations { users }).await {
        ResponseBody::Relations(r) => r,
        other => panic!("{other:?}"),
    }
}

async fn one(s: &Service, user: UserId) -> Relations {
    relations(s, vec![user]).await.remove(0)
}

async fn befriend(s: &Service, a: UserId, b: UserId) {
    let req = RequestBody::FriendRequest {
        from: a,
        to: b,
        group: b"g".to_vec(),
    };
    assert_eq!(s.handle(req).await, ResponseBody::Done);
    let accept = RequestBody::FriendAccept {
        user: b,
        from: a,
        group: b"g".to_vec(),
    };
    assert_eq!(s.handle(accept).await, ResponseBody::Done);
}

#[tokio::test]
async fn block_and_unblock_are_idempotent_and_checked() {
    let t = common::open(|_| {});
    let s = &t.service;
    let ids = common::import(s, 3).await;
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    let v0 = one(s, a).await.version;

    let v1 = version(s.handle(block(a, c)).await);
    assert_eq!(v1, v0 + 1, "a real change bumps the version");
    let v2 = version(s.handle(block(a, b)).await);
    assert_eq!(v2, v1 + 1);
    assert_eq!(
        version(s.handle(block(a, c)).await),
        v2,
        "blocking again changes nothing"
    );
    let r = one(s, a).await;
    assert_eq!(
        (r.blocked, r.version),
        (vec![b, c], v2),
        "sorted, no duplicate"
    );
    assert!(one(s, c).await.blocked.is_empty(), "one-sided");

    for (req, want) in [
        (block(a, a), ErrorCode::InvalidField),
        (unblock(a, a), ErrorCode::InvalidField),
        (block(a, 999), ErrorCode::NotFound),
        (block(999, a), ErrorCode::NotFound),
        (unblock(a, 999), ErrorCode::NotFound),
        (unblock(999, a), ErrorCode::NotFound),
    ] {
        assert_eq!(code(s.handle(req.clone()).await), want, "{req:?}");
    }
    assert_eq!(one(s, a).await.version, v2, "failures change nothing");

    let v3 = version(s.handle(unblock(a, c)).await);
    assert_eq!(v3, v2 + 1);
    assert_eq!(
        version(s.handle(unblock(a, c)).await),
        v3,
        "unblocking someone not blocked changes nothing"
    );
    version(s.handle(unblock(a, b)).await);
    assert!(one(s, a).await.blocked.is_empty());
}

#[tokio::test]
async fn blocks_max_is_reached_exactly_with_a_typed_error() {
    let t = common::open(|c| c.limits.blocks_max = 2);
    let s = &t.service;
    let ids = common::import(s, 4).await;
    version(s.handle(block(ids[0], ids[3])).await);
    let full = version(s.handle(block(ids[0], ids[1])).await);
    assert_eq!(
        code(s.handle(block(ids[0], ids[2])).await),
        ErrorCode::LimitReached,
        "a third block at blocks_max = 2"
    );
    let r = one(s, ids[0]).await;
    assert_eq!(
        (r.blocked, r.version),
        (vec![ids[1], ids[3]], full),
        "nothing stored"
    );
    assert_eq!(
        version(s.handle(block(ids[0], ids[1])).await),
        full,
        "re-blocking at the limit is still a no-op, not an error"
    );
    version(s.handle(unblock(ids[0], ids[1])).await);
    version(s.handle(block(ids[0], ids[2])).await);
}

#[tokio::test]
async fn a_blocked_user_cannot_send_a_friend_request_and_blocking_keeps_friends() {
    let t = common::open(|_| {});
    let s = &t.service;
    let ids = common::import(s, 3).await;
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    version(s.handle(block(b, a)).await);
    let ask = |from, to| RequestBody::FriendRequest {
        from,
        to,
        group: b"g".to_vec(),
    };
    let refused = s.handle(ask(a, b)).await;
    let unknown = s.handle(ask(a, 999)).await;
    match (&refused, &unknown) {
        (ResponseBody::Error(r), ResponseBody::Error(u)) => {
            assert_eq!((r.code, u.code), (ErrorCode::NotFound, ErrorCode::NotFound));
            assert_eq!(
                r.message.replace(&b.to_string(), "N"),
                u.message.replace("999", "N"),
                "the same words as for an unknown user"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(s.store().pending_requests().unwrap().is_empty());
    // The blocker may still ask the one it blocks.
    assert_eq!(s.handle(ask(b, a)).await, ResponseBody::Done);

    // Blocking does not end a friendship, nor does a friendship lift a block.
    befriend(s, a, c).await;
    version(s.handle(block(a, c)).await);
    let r = one(s, a).await;
    assert_eq!((r.friends, r.blocked), (vec![c], vec![c]));
    assert_eq!(one(s, c).await.friends, vec![a]);
}

#[tokio::test]
async fn blocking_drops_the_blocked_users_pending_friend_request() {
    let t = common::open(|_| {});
    let s = &t.service;
    let ids = common::import(s, 3).await;
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    let ask = |from, to| RequestBody::FriendRequest {
        from,
        to,
        group: b"g".to_vec(),
    };
    assert_eq!(s.handle(ask(a, b)).await, ResponseBody::Done);
    assert_eq!(s.handle(ask(c, b)).await, ResponseBody::Done);
    version(s.handle(block(b, a)).await);
    let accept = RequestBody::FriendAccept {
        user: b,
        from: a,
        group: b"g".to_vec(),
    };
    assert_eq!(code(s.handle(accept).await), ErrorCode::NotFound, "gone");
    assert_eq!(s.store().pending_requests().unwrap().len(), 1, "c's stays");
}

#[tokio::test]
async fn relations_are_sorted_consistent_and_leave_unknown_users_out() {
    let t = common::open(|_| {});
    let s = &t.service;
    let ids = common::import(s, 5).await;
    // Friends filed in two groups, added out of order.
    for (i, group) in [(4, "b"), (1, "a"), (3, "b")] {
        let req = RequestBody::FriendRequest {
            from: ids[i],
            to: ids[0],
            group: b"g".to_vec(),
        };
        assert_eq!(s.handle(req).await, ResponseBody::Done);
        let accept = RequestBody::FriendAccept {
            user: ids[0],
            from: ids[i],
            group: group.as_bytes().to_vec(),
        };
        assert_eq!(s.handle(accept).await, ResponseBody::Done);
    }
    for i in [3, 2] {
        version(s.handle(block(ids[0], ids[i])).await);
    }
    let off = RequestBody::SetDisabled {
        user: ids[2],
        disabled: true,
    };
    assert_eq!(s.handle(off).await, ResponseBody::Done);

    let got = relations(s, vec![999, ids[2], ids[0], 0]).await;
    let profile = s.store().profile(ids[0]).unwrap();
    assert_eq!(
        got,
        vec![
            Relations {
                user: ids[2],
                disabled: true,
                credential_epoch: 1,
                version: s.store().profile(ids[2]).unwrap().version,
                friends: vec![],
                blocked: vec![],
            },
            Relations {
                user: ids[0],
                disabled: false,
                credential_epoch: 0,
                version: profile.version,
                friends: vec![ids[1], ids[3], ids[4]],
                blocked: vec![ids[2], ids[3]],
            },
        ],
        "in the order asked, unknown users left out"
    );
    assert_eq!(
        code(
            s.handle(RequestBody::GetRelations {
                users: vec![ids[0]; proto::profile::GET_PROFILES_MAX + 1]
            })
            .await
        ),
        ErrorCode::BadRequest
    );
    assert_eq!(
        relations(s, vec![ids[0]; proto::profile::GET_PROFILES_MAX])
            .await
            .len(),
        proto::profile::GET_PROFILES_MAX,
        "exactly the maximum is fine"
    );
    assert!(Service::is_read(&RequestBody::GetRelations {
        users: vec![]
    }));
}

#[tokio::test]
async fn password_changes_and_disabling_bump_epoch_and_version() {
    let t = common::open(|_| {});
    let s = &t.service;
    let ids = common::import(s, 1).await;
    let u = ids[0];
    let r0 = one(s, u).await;
    assert_eq!(r0.credential_epoch, 0, "absent = 0");

    let pw = RequestBody::SetPassword {
        user: u,
        password: b"new".to_vec(),
    };
    assert_eq!(s.handle(pw.clone()).await, ResponseBody::Done);
    let r1 = one(s, u).await;
    assert_eq!(
        (r1.credential_epoch, r1.version),
        (1, r0.version + 1),
        "SetPassword"
    );
    assert_eq!(s.handle(pw).await, ResponseBody::Done);
    let r2 = one(s, u).await;
    assert_eq!(
        (r2.credential_epoch, r2.version),
        (2, r1.version + 1),
        "even the same password again"
    );

    let disabled = |d| RequestBody::SetDisabled {
        user: u,
        disabled: d,
    };
    assert_eq!(s.handle(disabled(true)).await, ResponseBody::Done);
    let r3 = one(s, u).await;
    assert_eq!(
        (r3.disabled, r3.credential_epoch, r3.version),
        (true, 3, r2.version + 1)
    );
    assert_eq!(s.handle(disabled(true)).await, ResponseBody::Done);
    assert_eq!(one(s, u).await, r3, "no change of the flag: nothing");
    assert_eq!(s.handle(disabled(false)).await, ResponseBody::Done);
    let r4 = one(s, u).await;
    assert_eq!(
        (r4.disabled, r4.credential_epoch, r4.version),
        (false, 4, r3.version + 1)
    );
    assert_eq!(
        s.store().profile(u).unwrap().version,
        r4.version,
        "the profile's version is the same number"
    );
}

/// The next event, failing instead of hanging.
async fn next(sub: &profile::notify::Subscription) -> Vec<Event> {
    tokio::time::timeout(Duration::from_secs(30), sub.next_events())
        .await
        .expect("an event in time")
}

#[tokio::test]
async fn every_real_change_is_pushed_and_no_ops_are_not() {
    let t = common::open(|_| {});
    let s = &t.service;
    let ids = common::import(s, 2).await;
    let (a, b) = (ids[0], ids[1]);
    let sub = s.hub().subscribe(1024);
    assert_eq!(next(&sub).await, vec![Event::CacheReset]);
    let inv = |user, version| vec![Event::Invalidate { user, version }];

    let v = version(s.handle(block(a, b)).await);
    assert_eq!(next(&sub).await, inv(a, v), "block");
    assert_eq!(version(s.handle(block(a, b)).await), v);
    let v = version(s.handle(unblock(a, b)).await);
    assert_eq!(
        next(&sub).await,
        inv(a, v),
        "unblock; the no-op pushed nothing"
    );
    assert_eq!(version(s.handle(unblock(a, b)).await), v);

    let pw = RequestBody::SetPassword {
        user: b,
        password: b"new".to_vec(),
    };
    assert_eq!(s.handle(pw).await, ResponseBody::Done);
    let vb = one(s, b).await.version;
    assert_eq!(
        next(&sub).await,
        inv(b, vb),
        "set_password; the unblock no-op pushed nothing"
    );
    let off = RequestBody::SetDisabled {
        user: b,
        disabled: true,
    };
    assert_eq!(s.handle(off.clone()).await, ResponseBody::Done);
    assert_eq!(next(&sub).await, inv(b, vb + 1), "set_disabled");
    assert_eq!(s.handle(off).await, ResponseBody::Done);
    // A last real change: had the no-op pushed anything, it would come first.
    let v = version(s.handle(block(b, a)).await);
    assert_eq!(
        next(&sub).await,
        inv(b, v),
        "the disable no-op pushed nothing"
    );
}
