//! Chat groups in the profile service: every rule of docs/PROTOCOL.md §5.3
//! "Groups" with its typed error (a failed request changes nothing), the
//! limits, cursors and the lowest cursor, dissolving, the pushed events,
//! the client's methods against a daemon, and the wire layout of the
//! documented example frames.

use crate::common;

use profile::{daemon, notify::Subscription, service::Service, ClientConfig, ProfileClient};
use proto::{
    frame,
    groups::{
        GroupId, GroupInfo, GroupInvite, GroupMember, GroupMembership, GroupRole, UserGroups,
        GROUP_ID_BASE,
    },
    profile::{ErrorCode, Event, Request, RequestBody, Response, ResponseBody, ServerMessage},
};
use std::time::Duration;

const G1: GroupId = GROUP_ID_BASE + 1;
/// Guards against hangs only.
const DEADLINE: Duration = Duration::from_secs(30);

async fn call(s: &Service, body: RequestBody) -> ResponseBody {
    s.handle(body).await
}

async fn err(s: &Service, body: RequestBody) -> ErrorCode {
    match call(s, body.clone()).await {
        ResponseBody::Error(e) => e.code,
        other => panic!("{body:?}: expected an error, got {other:?}"),
    }
}

async fn done(s: &Service, body: RequestBody) {
    assert_eq!(call(s, body.clone()).await, ResponseBody::Done, "{body:?}");
}

async fn create(s: &Service, owner: u64, name: &str) -> GroupInfo {
    let body = RequestBody::GroupCreate {
        owner,
        name: name.as_bytes().to_vec(),
        topic: b"topic".to_vec(),
    };
    match call(s, body).await {
        ResponseBody::Group(g) => g,
        other => panic!("{other:?}"),
    }
}

async fn get(s: &Service, group: GroupId) -> GroupInfo {
    match call(s, RequestBody::GetGroup { group }).await {
        ResponseBody::Group(g) => g,
        other => panic!("{other:?}"),
    }
}

async fn groups_of(s: &Service, user: u64) -> UserGroups {
    match call(s, RequestBody::GetUserGroups { user }).await {
        ResponseBody::UserGroups(g) => g,
        other => panic!("{other:?}"),
    }
}

async fn read(s: &Service, user: u64, group: GroupId, up_to_seq: u64) -> (u64, u64) {
    let body = RequestBody::GroupRead {
        user,
        group,
        up_to_seq,
    };
    match call(s, body).await {
        ResponseBody::GroupRead {
            read_seq,
            min_read_seq,
        } => (read_seq, min_read_seq),
        other => panic!("{other:?}"),
    }
}

fn version(s: &Service, user: u64) -> u64 {
    s.store().profile(user).unwrap().version
}

fn invite(by: u64, group: GroupId, invitee: u64) -> RequestBody {
    RequestBody::GroupInvite { by, group, invitee }
}

fn answer_invite(user: u64, group: GroupId, accept: bool, read_seq: u64) -> RequestBody {
    RequestBody::GroupAnswerInvite {
        user,
        group,
        accept,
        read_seq,
    }
}

fn join(user: u64, group: GroupId) -> RequestBody {
    RequestBody::GroupJoinRequest { user, group }
}

fn answer_join(by: u64, group: GroupId, user: u64, accept: bool, read_seq: u64) -> RequestBody {
    RequestBody::GroupAnswerJoin {
        by,
        group,
        user,
        accept,
        read_seq,
    }
}

fn set_role(by: u64, group: GroupId, user: u64, role: GroupRole) -> RequestBody {
    RequestBody::GroupSetRole {
        by,
        group,
        user,
        role,
    }
}

fn remove(by: u64, group: GroupId, user: u64) -> RequestBody {
    RequestBody::GroupRemove { by, group, user }
}

fn member(user: u64, role: GroupRole, read_seq: u64) -> GroupMember {
    GroupMember {
        user,
        role,
        read_seq,
    }
}

/// `user` joins `group` by invitation of `by`, cursor `read_seq`.
async fn add(s: &Service, by: u64, group: GroupId, user: u64, read_seq: u64) {
    done(s, invite(by, group, user)).await;
    done(s, answer_invite(user, group, true, read_seq)).await;
}

#[tokio::test]
async fn create_checks_owner_fields_and_user_groups_max() {
    let t = common::open(|c| c.limits.user_groups_max = 2);
    let s = &t.service;
    let ids = common::import(s, 2).await;
    let (a, b) = (ids[0], ids[1]);
    let v = version(s, a);
    let g = create(s, a, "team").await;
    assert_eq!(
        (g.group, g.name.as_str(), g.topic.as_str(), g.version),
        (G1, "team", "topic", 1)
    );
    assert_eq!(g.members, [member(a, GroupRole::Owner, 0)]);
    assert!(g.joins.is_empty());
    assert_eq!(get(s, G1).await, g, "GetGroup answers what create did");
    assert_eq!(version(s, a), v + 1, "the owner's group list changed");

    let with = |name: &[u8], topic: &[u8]| RequestBody::GroupCreate {
        owner: a,
        name: name.to_vec(),
        topic: topic.to_vec(),
    };
    for (body, want) in [
        (with(b"", b""), ErrorCode::InvalidField),
        (with(b"  ", b""), ErrorCode::InvalidField),
        (with(b"a\nb", b""), ErrorCode::InvalidField),
        (with(b"ok", b"a\x07"), ErrorCode::InvalidField),
        (with(b"\xff", b""), ErrorCode::InvalidUtf8),
        (with(b"ok", b"\xc3"), ErrorCode::InvalidUtf8),
        (with(&[b'n'; 65], b""), ErrorCode::FieldTooLong),
        (with(b"ok", &[b't'; 513]), ErrorCode::FieldTooLong),
        (
            RequestBody::GroupCreate {
                owner: 999,
                name: b"x".to_vec(),
                topic: vec![],
            },
            ErrorCode::NotFound,
        ),
    ] {
        assert_eq!(err(s, body.clone()).await, want, "{body:?}");
    }
    let long = String::from_utf8(vec![b'n'; 64]).unwrap();
    let g2 = create(s, a, &long).await;
    assert_eq!(g2.group, G1 + 1, "failures used no id");
    assert_eq!(
        err(s, with(b"third", b"")).await,
        ErrorCode::LimitReached,
        "user_groups_max = 2"
    );
    assert_eq!(s.store().group_count().unwrap(), 2, "nothing stored");
    assert_eq!(create(s, b, "b's").await.group, G1 + 2);
}

#[tokio::test]
async fn invitations_are_checked_idempotent_and_bounded() {
    let t = common::open(|c| c.limits.group_invites_pending_max = 2);
    let s = &t.service;
    let ids = common::import(s, 4).await;
    let (a, b, c, d) = (ids[0], ids[1], ids[2], ids[3]);
    let g = create(s, a, "one").await.group;
    let g2 = create(s, a, "two").await.group;
    let g3 = create(s, a, "three").await.group;

    assert_eq!(err(s, invite(b, g, c)).await, ErrorCode::NotMember);
    assert_eq!(err(s, invite(a, G1 + 99, c)).await, ErrorCode::NotFound);
    assert_eq!(err(s, invite(a, g, 999)).await, ErrorCode::NotFound);
    assert_eq!(err(s, invite(a, g, a)).await, ErrorCode::AlreadyMember);

    // An invitee who blocks the inviter looks unknown.
    let blocked = RequestBody::Block {
        user: d,
        blocked: a,
    };
    assert!(matches!(call(s, blocked).await, ResponseBody::Version(_)));
    let (refused, unknown) = match (
        call(s, invite(a, g, d)).await,
        call(s, invite(a, g, 999)).await,
    ) {
        (ResponseBody::Error(r), ResponseBody::Error(u)) => (r, u),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        (refused.code, unknown.code),
        (ErrorCode::NotFound, ErrorCode::NotFound)
    );
    assert_eq!(
        refused.message.replace(&d.to_string(), "N"),
        unknown.message.replace("999", "N")
    );

    let (vb, gv) = (version(s, b), get(s, g).await.version);
    done(s, invite(a, g, b)).await;
    assert_eq!(version(s, b), vb + 1, "the invitee's version");
    assert_eq!(get(s, g).await.version, gv, "not the group's");
    done(s, invite(a, g, b)).await;
    assert_eq!(version(s, b), vb + 1, "inviting again changes nothing");
    done(s, invite(a, g2, b)).await;
    assert_eq!(
        err(s, invite(a, g3, b)).await,
        ErrorCode::LimitReached,
        "group_invites_pending_max = 2"
    );
    assert_eq!(version(s, b), vb + 2);
    assert_eq!(
        groups_of(s, b).await,
        UserGroups {
            groups: vec![],
            invites: vec![
                GroupInvite {
                    group: g,
                    name: "one".into(),
                    by: a,
                },
                GroupInvite {
                    group: g2,
                    name: "two".into(),
                    by: a,
                },
            ],
        }
    );
    // Any member invites, not only managers.
    add(s, a, g, c, 0).await;
    done(s, invite(c, g, d)).await;
    assert_eq!(groups_of(s, d).await.invites[0].by, c);
}

#[tokio::test]
async fn answering_an_invitation_respects_the_limits_and_keeps_it_on_failure() {
    let t = common::open(|c| {
        c.limits.group_members_max = 2;
        c.limits.user_groups_max = 2;
    });
    let s = &t.service;
    let ids = common::import(s, 4).await;
    let (a, b, c, d) = (ids[0], ids[1], ids[2], ids[3]);
    let g = create(s, a, "g").await.group;
    assert_eq!(
        err(s, answer_invite(b, g, true, 0)).await,
        ErrorCode::NotMember,
        "no invitation"
    );
    done(s, invite(a, g, b)).await;
    done(s, invite(a, g, c)).await;
    done(s, join(b, g)).await;
    let gv = get(s, g).await.version;
    let vc = version(s, c);
    done(s, answer_invite(c, g, false, 0)).await;
    assert_eq!(version(s, c), vc + 1, "declining bumps the user");
    assert_eq!(get(s, g).await.version, gv, "and not the group");
    assert!(groups_of(s, c).await.invites.is_empty());
    assert_eq!(
        err(s, answer_invite(c, g, true, 0)).await,
        ErrorCode::NotMember
    );

    let vb = version(s, b);
    done(s, answer_invite(b, g, true, 7)).await;
    let info = get(s, g).await;
    assert_eq!(info.version, gv + 1);
    assert_eq!(
        info.members,
        [
            member(a, GroupRole::Owner, 0),
            member(b, GroupRole::Member, 7)
        ]
    );
    assert!(
        info.joins.is_empty(),
        "the join request went with the accept"
    );
    assert_eq!(version(s, b), vb + 1);
    assert_eq!(
        groups_of(s, b).await.groups,
        [GroupMembership {
            group: g,
            name: "g".into(),
            role: GroupRole::Member,
            read_seq: 7,
            members: 2,
        }]
    );

    // The group is full (group_members_max = 2): the invitation stays.
    done(s, invite(a, g, d)).await;
    let before = (get(s, g).await, groups_of(s, d).await, version(s, d));
    assert_eq!(
        err(s, answer_invite(d, g, true, 0)).await,
        ErrorCode::LimitReached
    );
    assert_eq!(
        (get(s, g).await, groups_of(s, d).await, version(s, d)),
        before
    );
    // d is in two groups already (user_groups_max = 2).
    done(s, remove(a, g, b)).await;
    create(s, d, "d1").await;
    create(s, d, "d2").await;
    assert_eq!(
        err(s, answer_invite(d, g, true, 0)).await,
        ErrorCode::LimitReached
    );
    assert_eq!(groups_of(s, d).await.invites.len(), 1, "still invited");
}

#[tokio::test]
async fn join_requests_are_answered_by_managers_only() {
    let t = common::open(|c| {
        c.limits.group_joins_pending_max = 2;
        c.limits.group_members_max = 3;
    });
    let s = &t.service;
    let ids = common::import(s, 6).await;
    let (a, b, c, d, e, f) = (ids[0], ids[1], ids[2], ids[3], ids[4], ids[5]);
    let g = create(s, a, "g").await.group;
    assert_eq!(err(s, join(b, G1 + 50)).await, ErrorCode::NotFound);
    assert_eq!(err(s, join(999, g)).await, ErrorCode::NotFound);
    assert_eq!(err(s, join(a, g)).await, ErrorCode::AlreadyMember);
    let v0 = get(s, g).await.version;
    let vd = version(s, d);
    done(s, join(d, g)).await;
    done(s, join(c, g)).await;
    done(s, join(c, g)).await;
    let info = get(s, g).await;
    assert_eq!(
        (info.version, info.joins),
        (v0 + 2, vec![c, d]),
        "sorted, once"
    );
    assert_eq!(version(s, d), vd, "asking changes only the group");
    assert_eq!(
        err(s, join(e, g)).await,
        ErrorCode::LimitReached,
        "group_joins_pending_max = 2"
    );

    add(s, a, g, b, 0).await;
    assert_eq!(
        err(s, answer_join(f, g, c, true, 0)).await,
        ErrorCode::NotMember
    );
    assert_eq!(
        err(s, answer_join(b, g, c, true, 0)).await,
        ErrorCode::NotPermitted
    );
    assert_eq!(
        err(s, answer_join(a, g, e, true, 0)).await,
        ErrorCode::NotMember
    );
    done(s, set_role(a, g, b, GroupRole::Admin)).await;

    let (gv, vd) = (get(s, g).await.version, version(s, d));
    done(s, answer_join(b, g, d, false, 0)).await;
    let info = get(s, g).await;
    assert_eq!((info.version, info.joins), (gv + 1, vec![c]), "refused");
    assert_eq!(version(s, d), vd, "a refusal leaves the user's version");

    let vc = version(s, c);
    done(s, answer_join(b, g, c, true, 5)).await;
    let info = get(s, g).await;
    assert_eq!(info.version, gv + 2);
    assert_eq!(info.member(c), Some(&member(c, GroupRole::Member, 5)));
    assert!(info.joins.is_empty());
    assert_eq!(version(s, c), vc + 1);

    // Full at 3 members: the request stays.
    done(s, join(e, g)).await;
    let before = get(s, g).await;
    assert_eq!(
        err(s, answer_join(a, g, e, true, 0)).await,
        ErrorCode::LimitReached
    );
    assert_eq!(get(s, g).await, before);
    done(s, answer_join(a, g, e, false, 0)).await;
}

#[tokio::test]
async fn leave_remove_set_role_and_transfer_follow_the_roles() {
    let t = common::open(|_| {});
    let s = &t.service;
    let ids = common::import(s, 5).await;
    let (o, ad, m, m2, x) = (ids[0], ids[1], ids[2], ids[3], ids[4]);
    let g = create(s, o, "g").await.group;
    for u in [ad, m, m2] {
        add(s, o, g, u, 0).await;
    }
    // SetRole: only the owner, never to or from Owner.
    assert_eq!(
        err(s, set_role(o, g, ad, GroupRole::Owner)).await,
        ErrorCode::InvalidField
    );
    assert_eq!(
        err(s, set_role(m, g, ad, GroupRole::Admin)).await,
        ErrorCode::NotPermitted
    );
    assert_eq!(
        err(s, set_role(x, g, ad, GroupRole::Admin)).await,
        ErrorCode::NotMember
    );
    assert_eq!(
        err(s, set_role(o, g, x, GroupRole::Admin)).await,
        ErrorCode::NotMember
    );
    assert_eq!(
        err(s, set_role(o, g, o, GroupRole::Admin)).await,
        ErrorCode::InvalidField
    );
    assert_eq!(
        err(s, set_role(o, G1 + 9, ad, GroupRole::Admin)).await,
        ErrorCode::NotFound
    );
    done(s, set_role(o, g, ad, GroupRole::Admin)).await;
    let v = get(s, g).await.version;
    done(s, set_role(o, g, ad, GroupRole::Admin)).await;
    assert_eq!(get(s, g).await.version, v, "no change, no bump");
    assert_eq!(
        err(s, set_role(ad, g, m, GroupRole::Admin)).await,
        ErrorCode::NotPermitted
    );

    // Leave.
    let leave = |user| RequestBody::GroupLeave { user, group: g };
    assert_eq!(err(s, leave(o)).await, ErrorCode::NotPermitted, "the owner");
    match call(s, leave(o)).await {
        ResponseBody::Error(e) => assert!(e.message.contains("transfer"), "{}", e.message),
        other => panic!("{other:?}"),
    }
    assert_eq!(err(s, leave(x)).await, ErrorCode::NotMember);

    // Remove.
    assert_eq!(
        err(s, remove(o, g, o)).await,
        ErrorCode::InvalidField,
        "oneself"
    );
    assert_eq!(err(s, remove(m, g, m)).await, ErrorCode::InvalidField);
    assert_eq!(
        err(s, remove(m, g, m2)).await,
        ErrorCode::NotPermitted,
        "a member"
    );
    assert_eq!(err(s, remove(x, g, m2)).await, ErrorCode::NotMember);
    assert_eq!(
        err(s, remove(ad, g, o)).await,
        ErrorCode::NotPermitted,
        "admin vs owner"
    );
    assert_eq!(
        err(s, remove(ad, g, x)).await,
        ErrorCode::NotMember,
        "not in"
    );
    let (gv, vm2) = (get(s, g).await.version, version(s, m2));
    done(s, remove(ad, g, m2)).await;
    assert_eq!((get(s, g).await.version, version(s, m2)), (gv + 1, vm2 + 1));
    assert!(groups_of(s, m2).await.groups.is_empty());
    done(s, set_role(o, g, m, GroupRole::Admin)).await;
    assert_eq!(
        err(s, remove(ad, g, m)).await,
        ErrorCode::NotPermitted,
        "admin vs admin"
    );
    done(s, remove(o, g, m)).await;

    // Transfer.
    let transfer = |by, to| RequestBody::GroupTransfer { by, group: g, to };
    assert_eq!(err(s, transfer(o, o)).await, ErrorCode::InvalidField);
    assert_eq!(err(s, transfer(ad, o)).await, ErrorCode::NotPermitted);
    assert_eq!(err(s, transfer(o, x)).await, ErrorCode::NotMember);
    assert_eq!(err(s, transfer(x, o)).await, ErrorCode::NotMember);
    let gv = get(s, g).await.version;
    done(s, transfer(o, ad)).await;
    let info = get(s, g).await;
    assert_eq!(info.version, gv + 1);
    assert_eq!(
        info.members,
        [
            member(o, GroupRole::Admin, 0),
            member(ad, GroupRole::Owner, 0)
        ]
    );
    done(s, leave(o)).await;
    assert_eq!(get(s, g).await.members, [member(ad, GroupRole::Owner, 0)]);
}

#[tokio::test]
async fn rename_checks_fields_roles_and_skips_no_ops() {
    let t = common::open(|_| {});
    let s = &t.service;
    let ids = common::import(s, 3).await;
    let (o, m, x) = (ids[0], ids[1], ids[2]);
    let g = create(s, o, "g").await.group;
    add(s, o, g, m, 0).await;
    let rename = |by, name: Option<&[u8]>, topic: Option<&[u8]>| RequestBody::GroupRename {
        by,
        group: g,
        name: name.map(<[u8]>::to_vec),
        topic: topic.map(<[u8]>::to_vec),
    };
    assert_eq!(
        err(s, rename(m, Some(b"n"), None)).await,
        ErrorCode::NotPermitted
    );
    assert_eq!(
        err(s, rename(x, Some(b"n"), None)).await,
        ErrorCode::NotMember
    );
    assert_eq!(
        err(s, rename(o, Some(b""), None)).await,
        ErrorCode::InvalidField
    );
    assert_eq!(
        err(s, rename(o, None, Some(&[b't'; 513]))).await,
        ErrorCode::FieldTooLong
    );
    assert_eq!(
        err(s, rename(o, Some(b"\xff"), None)).await,
        ErrorCode::InvalidUtf8
    );
    let v = get(s, g).await.version;
    for same in [rename(o, None, None), rename(o, Some(b"g"), Some(b"topic"))] {
        done(s, same).await;
    }
    assert_eq!(get(s, g).await.version, v, "no change, no bump");
    done(s, set_role(o, g, m, GroupRole::Admin)).await;
    done(s, rename(m, None, Some(b""))).await;
    done(s, rename(o, Some(b"new"), None)).await;
    let info = get(s, g).await;
    assert_eq!(
        (info.name.as_str(), info.topic.as_str(), info.version),
        ("new", "", v + 3)
    );
    assert_eq!(groups_of(s, m).await.groups[0].name, "new");
}

#[tokio::test]
async fn dissolve_removes_everything_and_the_id_is_never_reused() {
    let t = common::open(|_| {});
    let s = &t.service;
    let ids = common::import(s, 5).await;
    let (o, ad, m, inv, asker) = (ids[0], ids[1], ids[2], ids[3], ids[4]);
    let g = create(s, o, "g").await.group;
    let keep = create(s, m, "kept").await.group;
    add(s, o, g, ad, 3).await;
    add(s, o, g, m, 4).await;
    done(s, set_role(o, g, ad, GroupRole::Admin)).await;
    done(s, invite(o, g, inv)).await;
    done(s, invite(m, keep, inv)).await;
    done(s, join(asker, g)).await;
    let dissolve = |by| RequestBody::GroupDissolve { by, group: g };
    assert_eq!(err(s, dissolve(ad)).await, ErrorCode::NotPermitted);
    assert_eq!(err(s, dissolve(asker)).await, ErrorCode::NotMember);
    let before: Vec<u64> = ids.iter().map(|&u| version(s, u)).collect();
    let gv = get(s, g).await.version;
    let sub = s.hub().subscribe(1024);
    assert_eq!(events(&sub, 1).await, [Event::CacheReset]);

    done(s, dissolve(o)).await;
    assert_eq!(
        err(s, RequestBody::GetGroup { group: g }).await,
        ErrorCode::NotFound
    );
    let after: Vec<u64> = ids.iter().map(|&u| version(s, u)).collect();
    assert_eq!(
        after,
        [
            before[0] + 1,
            before[1] + 1,
            before[2] + 1,
            before[3] + 1,
            before[4]
        ],
        "members and invitees bumped, the asker not"
    );
    let inval = |i: usize| Event::Invalidate {
        user: ids[i],
        version: after[i],
    };
    assert_eq!(
        events(&sub, 5).await,
        [
            inval(0),
            inval(1),
            inval(2),
            inval(3),
            Event::GroupChanged {
                group: g,
                version: gv + 1
            }
        ]
    );
    for u in [o, ad] {
        assert_eq!(groups_of(s, u).await, UserGroups::default());
    }
    assert_eq!(
        groups_of(s, m).await.groups.len(),
        1,
        "m's other group stays"
    );
    assert_eq!(
        groups_of(s, inv).await.invites.len(),
        1,
        "and its invitation"
    );
    for body in [
        dissolve(o),
        join(asker, g),
        invite(o, g, asker),
        RequestBody::GroupRead {
            user: o,
            group: g,
            up_to_seq: 9,
        },
    ] {
        assert_eq!(err(s, body).await, ErrorCode::NotFound);
    }
    assert_eq!(
        err(s, answer_invite(inv, g, true, 0)).await,
        ErrorCode::NotMember,
        "the invitation is gone"
    );
    let sizes = s.store().group_table_sizes().unwrap();
    assert_eq!(
        sizes,
        [
            ("groups", 1),
            ("group_members", 1),
            ("user_groups", 1),
            ("group_invites", 1),
            ("group_invitees", 1),
            ("group_joins", 0),
            ("group_cursors", 1),
        ],
        "only `keep` remains"
    );
    assert_eq!(
        create(s, o, "next").await.group,
        keep + 1,
        "g's id is not reused"
    );
    done(s, RequestBody::GroupDissolve { by: m, group: keep }).await;
    assert_eq!(create(s, o, "after").await.group, keep + 2);
}

#[tokio::test]
async fn cursors_only_move_forward_and_the_lowest_is_tracked() {
    let t = common::open(|_| {});
    let s = &t.service;
    let ids = common::import(s, 4).await;
    let (a, b, c, x) = (ids[0], ids[1], ids[2], ids[3]);
    let g = create(s, a, "g").await.group;
    assert_eq!(read(s, a, g, 0).await, (0, 0));
    assert_eq!(read(s, a, g, 10).await, (10, 10));
    assert_eq!(read(s, a, g, 4).await, (10, 10), "never back");
    add(s, a, g, b, 6).await;
    assert_eq!(read(s, a, g, 0).await, (10, 6), "b joined at 6");
    add(s, a, g, c, 20).await;
    assert_eq!(read(s, c, g, 0).await, (20, 6));
    assert_eq!(read(s, b, g, 15).await, (15, 10), "a is lowest now");
    assert_eq!(read(s, a, g, 30).await, (30, 15));
    let v = get(s, g).await.version;
    assert_eq!(
        get(s, g)
            .await
            .members
            .iter()
            .map(|m| m.read_seq)
            .collect::<Vec<_>>(),
        [30, 15, 20]
    );
    done(s, remove(a, g, b)).await;
    assert_eq!(read(s, a, g, 0).await, (30, 20), "b's cursor left with it");
    done(s, RequestBody::GroupLeave { user: c, group: g }).await;
    assert_eq!(read(s, a, g, 0).await, (30, 30));
    assert_eq!(get(s, g).await.version, v + 2, "reads bump nothing");
    let body = |user| RequestBody::GroupRead {
        user,
        group: g,
        up_to_seq: 99,
    };
    assert_eq!(err(s, body(x)).await, ErrorCode::NotMember);
    assert_eq!(err(s, body(b)).await, ErrorCode::NotMember, "removed");
    assert_eq!(
        err(
            s,
            RequestBody::GroupRead {
                user: a,
                group: G1 + 7,
                up_to_seq: 1
            }
        )
        .await,
        ErrorCode::NotFound
    );
    // Equal cursors of several members: one leaving keeps the other's.
    add(s, a, g, b, 30).await;
    done(s, RequestBody::GroupLeave { user: b, group: g }).await;
    assert_eq!(read(s, a, g, 0).await, (30, 30));
    assert_eq!(
        s.store().group_table_sizes().unwrap()[6],
        ("group_cursors", 1),
        "one cursor per member"
    );
}

#[tokio::test]
async fn unknown_users_and_groups_are_not_found() {
    let t = common::open(|_| {});
    let s = &t.service;
    assert_eq!(
        err(s, RequestBody::GetUserGroups { user: 5 }).await,
        ErrorCode::NotFound
    );
    assert_eq!(
        err(s, RequestBody::GetGroup { group: G1 }).await,
        ErrorCode::NotFound
    );
    let ids = common::import(s, 1).await;
    assert_eq!(groups_of(s, ids[0]).await, UserGroups::default());
    assert!(Service::is_read(&RequestBody::GetGroup { group: G1 }));
    assert!(Service::is_read(&RequestBody::GetUserGroups { user: 1 }));
}

/// Exactly `n` events (failing instead of hanging).
async fn events(sub: &Subscription, n: usize) -> Vec<Event> {
    let mut got = Vec::new();
    while got.len() < n {
        let more = tokio::time::timeout(DEADLINE, sub.next_events())
            .await
            .expect("events in time");
        got.extend(more);
    }
    assert_eq!(got.len(), n, "{got:?}");
    got
}

#[tokio::test]
async fn group_changes_and_invalidations_are_pushed_in_commit_order() {
    let t = common::open(|_| {});
    let s = &t.service;
    let ids = common::import(s, 3).await;
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    let sub = s.hub().subscribe(1024);
    assert_eq!(events(&sub, 1).await, [Event::CacheReset]);
    let inv = |user| Event::Invalidate {
        user,
        version: version(s, user),
    };
    let changed = |version| Event::GroupChanged { group: G1, version };

    let g = create(s, a, "g").await.group;
    assert_eq!(events(&sub, 1).await, [inv(a)], "create: the owner's list");
    done(s, invite(a, g, b)).await;
    assert_eq!(events(&sub, 1).await, [inv(b)], "invite: the invitee only");
    done(s, invite(a, g, b)).await;
    done(s, answer_invite(b, g, true, 0)).await;
    assert_eq!(
        events(&sub, 2).await,
        [inv(b), changed(2)],
        "the repeated invite pushed nothing"
    );
    done(s, join(c, g)).await;
    assert_eq!(events(&sub, 1).await, [changed(3)]);
    done(s, answer_join(a, g, c, true, 0)).await;
    assert_eq!(events(&sub, 2).await, [inv(c), changed(4)]);
    read(s, c, g, 50).await;
    done(s, set_role(a, g, b, GroupRole::Member)).await;
    done(s, set_role(a, g, b, GroupRole::Admin)).await;
    assert_eq!(
        events(&sub, 1).await,
        [changed(5)],
        "reads and no-ops push nothing"
    );
    done(s, remove(b, g, c)).await;
    assert_eq!(events(&sub, 2).await, [inv(c), changed(6)]);
}

async fn next_event(rx: &mut tokio::sync::mpsc::Receiver<Event>) -> Event {
    tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .expect("an event in time")
        .expect("event channel open")
}

/// The client against an in-process daemon: one call per method, and
/// `GroupChanged` reaches a subscribed client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_speaks_every_group_request() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path());
    config.listen = "127.0.0.1:0".parse().unwrap();
    let d = daemon::start(config).await.unwrap();
    let addr = d.local_addr().to_string();
    let (client, mut rx) = ProfileClient::connect_subscribed(&addr, ClientConfig::default())
        .await
        .unwrap();
    assert_eq!(next_event(&mut rx).await, Event::CacheReset);
    let users = (0..3)
        .map(|i| proto::profile::ImportUser {
            username: format!("c{i}").into_bytes(),
            phc: common::phc(),
        })
        .collect();
    let ids: Vec<u64> = client
        .import_users(users)
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    let g = client
        .group_create(a, "club", "all about it")
        .await
        .unwrap();
    assert_eq!((g.group, g.version), (G1, 1));
    assert!(matches!(next_event(&mut rx).await, Event::Invalidate { user, .. } if user == a));
    let g = g.group;

    client.group_invite(a, g, b).await.unwrap();
    client.group_answer_invite(b, g, true, 3).await.unwrap();
    client.group_join_request(c, g).await.unwrap();
    client.group_answer_join(a, g, c, true, 1).await.unwrap();
    client
        .group_set_role(a, g, b, GroupRole::Admin)
        .await
        .unwrap();
    client
        .group_rename(b, g, Some("club 2"), None)
        .await
        .unwrap();
    assert_eq!(client.group_read(c, g, 5).await.unwrap(), (5, 0));
    let info = client.get_group(g).await.unwrap();
    assert_eq!((info.name.as_str(), info.version), ("club 2", 6));
    let mine = client.user_groups(b).await.unwrap();
    assert_eq!(
        (mine.groups[0].role, mine.groups[0].members),
        (GroupRole::Admin, 3)
    );
    client.group_transfer(a, g, b).await.unwrap();
    client.group_leave(a, g).await.unwrap();
    client.group_remove(b, g, c).await.unwrap();
    let e = client.group_remove(b, g, c).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotMember));
    client.group_dissolve(b, g).await.unwrap();
    let e = client.get_group(g).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound));

    let mut seen = Vec::new();
    while seen.last()
        != Some(&Event::GroupChanged {
            group: g,
            version: 10,
        })
    {
        seen.push(next_event(&mut rx).await);
    }
    let group_versions: Vec<u64> = seen
        .iter()
        .filter_map(|e| match *e {
            Event::GroupChanged { group, version } if group == g => Some(version),
            _ => None,
        })
        .collect();
    assert_eq!(
        group_versions,
        (2..=10).collect::<Vec<_>>(),
        "in commit order"
    );
    d.shutdown().await;
}

/// The example frames of docs/PROTOCOL.md §5.2 "Groups", byte for byte.
#[test]
fn group_frames_are_as_documented() {
    fn framed<T: serde::Serialize>(msg: &T) -> Vec<u8> {
        let mut out = Vec::new();
        frame::encode(msg, 1024, &mut out).unwrap();
        out
    }
    // GROUP_ID_BASE + 1 as a varint: 10 bytes.
    let g1 = [0x81, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01];
    let create = Request {
        id: 1,
        body: RequestBody::GroupCreate {
            owner: 7,
            name: b"ab".to_vec(),
            topic: vec![],
        },
    };
    assert_eq!(framed(&create), [7, 0, 0, 0, 1, 26, 7, 2, b'a', b'b', 0]);
    let created = ServerMessage::Response(Response {
        id: 1,
        body: ResponseBody::Group(GroupInfo {
            group: G1,
            name: "ab".into(),
            topic: String::new(),
            version: 1,
            created_ms: 300,
            members: vec![member(7, GroupRole::Owner, 0)],
            joins: vec![],
        }),
    });
    let body = [
        &[0, 1, 17][..],
        &g1,
        &[2, b'a', b'b', 0, 1, 0xac, 0x02, 1, 7, 0, 0, 0],
    ]
    .concat();
    assert_eq!(
        framed(&created),
        [&[body.len() as u8, 0, 0, 0][..], &body].concat()
    );
    assert_eq!(body.len(), 25);
    let read = Request {
        id: 5,
        body: RequestBody::GroupRead {
            user: 7,
            group: G1,
            up_to_seq: 300,
        },
    };
    let body = [&[5, 39, 7][..], &g1, &[0xac, 0x02]].concat();
    assert_eq!(framed(&read), [&[15, 0, 0, 0][..], &body].concat());
    let answer = ServerMessage::Response(Response {
        id: 5,
        body: ResponseBody::GroupRead {
            read_seq: 300,
            min_read_seq: 2,
        },
    });
    assert_eq!(framed(&answer), [6, 0, 0, 0, 0, 5, 19, 0xac, 0x02, 2]);
    let changed = ServerMessage::Event(Event::GroupChanged {
        group: G1,
        version: 3,
    });
    let body = [&[1, 2][..], &g1, &[3]].concat();
    assert_eq!(framed(&changed), [&[13, 0, 0, 0][..], &body].concat());
    let code = postcard::to_stdvec(&ErrorCode::NotPermitted).unwrap();
    assert_eq!(code, [16]);
}
