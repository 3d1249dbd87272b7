//! Bad input gets typed errors and stores nothing: oversized fields,
//! invalid UTF-8, non-images and decompression bombs, unknown users,
//! wrong passwords, limits.

use crate::common;

use profile::avatar::samples;
use proto::profile::{ErrorCode, ImportUser, RequestBody, ResponseBody};

fn code(r: ResponseBody) -> ErrorCode {
    match r {
        ResponseBody::Error(e) => e.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_profile_fields_are_typed_errors_and_store_nothing() {
    let t = common::open(|_| {});
    let s = &t.service;
    let ids = common::import(s, 1).await;
    let before = s.store().profile(ids[0]).unwrap();
    let set = |nickname: Option<Vec<u8>>, signature: Option<Vec<u8>>| RequestBody::SetProfile {
        user: ids[0],
        nickname,
        signature,
    };
    let cases = [
        (set(Some(vec![b'a'; 65]), None), ErrorCode::FieldTooLong),
        (set(None, Some(vec![b'a'; 257])), ErrorCode::FieldTooLong),
        (set(Some(vec![0xc3, 0x28]), None), ErrorCode::InvalidUtf8),
        // A valid nickname with a bad signature: neither is stored.
        (
            set(Some(b"ok".to_vec()), Some(vec![0xff])),
            ErrorCode::InvalidUtf8,
        ),
        (
            set(Some(b"tab\there".to_vec()), None),
            ErrorCode::InvalidField,
        ),
        (
            RequestBody::SetProfile {
                user: 999,
                nickname: Some(b"x".to_vec()),
                signature: None,
            },
            ErrorCode::NotFound,
        ),
    ];
    for (req, want) in cases {
        assert_eq!(code(s.handle(req.clone()).await), want, "{req:?}");
    }
    assert_eq!(s.store().profile(ids[0]).unwrap(), before, "nothing stored");
    match s.handle(set(Some("Zoë".as_bytes().to_vec()), None)).await {
        ResponseBody::Version(v) => assert_eq!(v, before.version + 1),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn bad_avatars_are_refused_and_good_ones_served_in_ranges() {
    let t = common::open(|_| {});
    let s = &t.service;
    let ids = common::import(s, 2).await;
    let set = |image: Vec<u8>| RequestBody::SetAvatar {
        user: ids[0],
        image,
    };
    let cases = [
        (
            set(b"just some text, not an image".to_vec()),
            ErrorCode::BadImage,
        ),
        (set(samples::png(60_000, 60_000, 16)), ErrorCode::BadImage),
        (
            set(b"GIF89a\x01\x00\x01\x00\x00\x00\x00".to_vec()),
            ErrorCode::BadImage,
        ),
        (
            set(samples::png(16, 16, 300 * 1024)),
            ErrorCode::ImageTooLarge,
        ),
        (set(vec![]), ErrorCode::BadImage),
        (
            RequestBody::SetAvatar {
                user: 999,
                image: samples::png(8, 8, 0),
            },
            ErrorCode::NotFound,
        ),
    ];
    for (req, want) in cases {
        assert_eq!(code(s.handle(req).await), want);
    }
    assert_eq!(s.store().avatar_count().unwrap(), 0, "nothing stored");
    assert_eq!(s.store().profile(ids[0]).unwrap().avatar, None);

    let image = samples::png(32, 32, 2500);
    let (hash, _) = match s.handle(set(image.clone())).await {
        ResponseBody::Avatar { hash, version } => (hash, version),
        other => panic!("{other:?}"),
    };
    assert_eq!(hash, profile::avatar::hash(&image));
    let mut got = Vec::new();
    while got.len() < image.len() {
        let req = RequestBody::AvatarRange {
            hash,
            offset: got.len() as u32,
            len: u32::MAX,
        };
        match s.handle(req).await {
            ResponseBody::AvatarBytes { total_len, bytes } => {
                assert_eq!(total_len as usize, image.len());
                assert!(!bytes.is_empty() && bytes.len() <= 1000, "{}", bytes.len());
                got.extend_from_slice(&bytes);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got, image);
    // Same image for a second user: stored once; replaced: still there for
    // the first; replaced for both: gone.
    let other = RequestBody::SetAvatar {
        user: ids[1],
        image: image.clone(),
    };
    assert!(matches!(s.handle(other).await, ResponseBody::Avatar { .. }));
    assert_eq!(s.store().avatar_count().unwrap(), 1);
    for &u in &ids {
        let req = RequestBody::SetAvatar {
            user: u,
            image: samples::png(8, 8, 0),
        };
        assert!(matches!(s.handle(req).await, ResponseBody::Avatar { .. }));
    }
    assert_eq!(
        s.store().avatar_count().unwrap(),
        1,
        "the unused image is deleted"
    );
    let gone = RequestBody::AvatarRange {
        hash,
        offset: 0,
        len: 10,
    };
    assert_eq!(code(s.handle(gone).await), ErrorCode::NotFound);
}

#[tokio::test]
async fn accounts_passwords_and_unknown_users() {
    let t = common::open(|_| {});
    let s = &t.service;
    let create = |name: &[u8], pw: &[u8]| RequestBody::CreateUser {
        username: name.to_vec(),
        password: pw.to_vec(),
    };
    let alice = match s.handle(create(b"alice", b"right")).await {
        ResponseBody::User(u) => u,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        code(s.handle(create(b"alice", b"x")).await),
        ErrorCode::UsernameTaken
    );
    assert_eq!(
        code(s.handle(create(b"Bad Name", b"x")).await),
        ErrorCode::InvalidField
    );
    assert_eq!(
        code(s.handle(create(&[0xff], b"x")).await),
        ErrorCode::InvalidUtf8
    );
    assert_eq!(
        code(s.handle(create(b"bob", &[1; 300])).await),
        ErrorCode::FieldTooLong
    );
    let check = |name: &[u8], pw: &[u8]| RequestBody::CheckPassword {
        username: name.to_vec(),
        password: pw.to_vec(),
    };
    assert_eq!(
        s.handle(check(b"alice", b"right")).await,
        ResponseBody::User(alice)
    );
    assert_eq!(
        code(s.handle(check(b"alice", b"wrong")).await),
        ErrorCode::WrongCredentials
    );
    assert_eq!(
        code(s.handle(check(b"nobody", b"right")).await),
        ErrorCode::WrongCredentials
    );
    let pw = RequestBody::SetPassword {
        user: alice,
        password: b"new".to_vec(),
    };
    assert_eq!(s.handle(pw).await, ResponseBody::Done);
    assert_eq!(
        code(s.handle(check(b"alice", b"right")).await),
        ErrorCode::WrongCredentials
    );
    assert_eq!(
        s.handle(check(b"alice", b"new")).await,
        ResponseBody::User(alice)
    );
    let off = RequestBody::SetDisabled {
        user: alice,
        disabled: true,
    };
    assert_eq!(s.handle(off).await, ResponseBody::Done);
    assert_eq!(
        code(s.handle(check(b"alice", b"new")).await),
        ErrorCode::AccountDisabled
    );
    assert_eq!(
        code(s.handle(check(b"alice", b"old")).await),
        ErrorCode::WrongCredentials
    );
    for req in [
        RequestBody::GetProfile { user: 42 },
        RequestBody::GetAccount { user: 42 },
        RequestBody::LoginView { user: 42 },
        RequestBody::SetDisabled {
            user: 42,
            disabled: true,
        },
        RequestBody::SetPassword {
            user: 42,
            password: b"x".to_vec(),
        },
        RequestBody::FriendRequest {
            from: alice,
            to: 42,
            group: b"g".to_vec(),
        },
        RequestBody::FriendAccept {
            user: alice,
            from: 42,
            group: b"g".to_vec(),
        },
        RequestBody::ImportFriendships {
            group: b"g".to_vec(),
            pairs: vec![(alice, 42)],
        },
    ] {
        assert_eq!(
            code(s.handle(req.clone()).await),
            ErrorCode::NotFound,
            "{req:?}"
        );
    }
    assert!(
        s.store().friend_lists().unwrap().is_empty(),
        "nothing stored"
    );
    assert!(s.store().pending_requests().unwrap().is_empty());
    // Imports: weak or foreign hashes are refused one by one.
    let users = vec![
        ImportUser {
            username: b"carol".to_vec(),
            phc: common::phc(),
        },
        ImportUser {
            username: b"dave".to_vec(),
            phc: "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA".into(),
        },
        ImportUser {
            username: b"alice".to_vec(),
            phc: common::phc(),
        },
    ];
    match s.handle(RequestBody::ImportUsers { users }).await {
        ResponseBody::Imported(r) => {
            assert!(r[0].is_ok());
            assert_eq!(r[1].as_ref().unwrap_err().code, ErrorCode::InvalidField);
            assert_eq!(r[2].as_ref().unwrap_err().code, ErrorCode::UsernameTaken);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        s.handle(check(b"carol", b"pw")).await,
        ResponseBody::User(alice + 1)
    );
    assert_eq!(
        code(
            s.handle(RequestBody::LookupUser {
                username: b"dave".to_vec()
            })
            .await
        ),
        ErrorCode::NotFound
    );
}

#[tokio::test]
async fn friend_limits_are_typed_errors() {
    let t = common::open(|c| {
        c.limits.friends_max = 2;
        c.limits.groups_max = 1;
        c.limits.requests_pending_max = 1;
    });
    let s = &t.service;
    let ids = common::import(s, 5).await;
    let req = |from: u64, to: u64, g: &str| RequestBody::FriendRequest {
        from,
        to,
        group: g.as_bytes().to_vec(),
    };
    let accept = |user: u64, from: u64, g: &str| RequestBody::FriendAccept {
        user,
        from,
        group: g.as_bytes().to_vec(),
    };
    assert_eq!(s.handle(req(ids[1], ids[0], "f")).await, ResponseBody::Done);
    assert_eq!(
        code(s.handle(req(ids[2], ids[0], "f")).await),
        ErrorCode::LimitReached,
        "pending max"
    );
    assert_eq!(
        code(s.handle(req(ids[0], ids[0], "f")).await),
        ErrorCode::InvalidField
    );
    assert_eq!(
        s.handle(accept(ids[0], ids[1], "f")).await,
        ResponseBody::Done
    );
    assert_eq!(s.handle(req(ids[3], ids[0], "f")).await, ResponseBody::Done);
    assert_eq!(
        code(s.handle(accept(ids[0], ids[3], "other")).await),
        ErrorCode::LimitReached,
        "groups max"
    );
    assert_eq!(
        code(s.handle(req(ids[0], ids[1], "f")).await),
        ErrorCode::AlreadyFriends
    );
    let pairs = vec![(ids[0], ids[2]), (ids[0], ids[3])];
    let imp = RequestBody::ImportFriendships {
        group: b"f".to_vec(),
        pairs,
    };
    assert_eq!(
        code(s.handle(imp).await),
        ErrorCode::LimitReached,
        "friends max"
    );
    let view = match s.handle(RequestBody::LoginView { user: ids[0] }).await {
        ResponseBody::LoginView(v) => v,
        other => panic!("{other:?}"),
    };
    let friends: Vec<u64> = view
        .groups
        .iter()
        .flat_map(|g| g.friends.iter().map(|p| p.user))
        .collect();
    assert_eq!(friends, vec![ids[1]], "the failed import stored nothing");
    assert_eq!(
        code(
            s.handle(RequestBody::GetProfiles {
                users: vec![1; 1001]
            })
            .await
        ),
        ErrorCode::BadRequest
    );
}
