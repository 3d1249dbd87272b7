use super::*;
use proto::{
    app::{Call, FETCH_BYTES_MAX, FETCH_COUNT_MAX},
    groups::{GroupRole, GROUP_ID_BASE},
};
use std::time::Duration;

const G1: u64 = GROUP_ID_BASE | 1;
const G2: u64 = GROUP_ID_BASE | 2;
const G3: u64 = GROUP_ID_BASE | 3;

fn msg(seq: u64, from: u64) -> Delivery {
    Delivery {
        from,
        msg_id: (from as u128) << 64 | seq as u128,
        sent_at_ms: 0,
        body: vec![1; 10],
        seq,
    }
}

fn summary(group: u64, read_seq: u64, high_seq: u64) -> GroupSummary {
    GroupSummary {
        group,
        name: format!("g{}", group & !GROUP_ID_BASE),
        role: GroupRole::Member,
        members: 3,
        read_seq,
        high_seq,
    }
}

fn inboxes(groups_max: usize, requests_max: usize) -> GroupInboxes {
    let config = InboxConfig {
        ready_max: GROUP_READY_MAX,
        held_bytes_max: GROUP_HELD_BYTES_MAX,
        dedupe_ids_max: GROUP_DEDUPE_IDS_MAX,
        ..InboxConfig::default()
    };
    let mut g = GroupInboxes::new(config, groups_max, requests_max);
    g.on_login();
    g
}

/// A session up with `groups` listed (the list read once, as after a
/// login).
fn listed(now: Instant, groups: Vec<GroupSummary>) -> GroupInboxes {
    let mut g = inboxes(500, 8);
    assert!(g.poll_list(now), "the list is read after every login");
    assert!(!g.poll_list(now), "one read at a time");
    g.on_list(now, groups);
    g
}

/// Every request due now, with its call.
fn requests(g: &mut GroupInboxes, now: Instant) -> Vec<(GroupTag, InboxRequest)> {
    std::iter::from_fn(|| g.poll_request(now)).collect()
}

/// Every message ready, as (group, seq).
fn shown(g: &mut GroupInboxes) -> Vec<(u64, u64)> {
    std::iter::from_fn(|| g.poll_show())
        .map(|(group, d)| (group, d.seq))
        .collect()
}

/// Answer the one fetch in flight of `group` with `seqs` (nothing gone).
fn answer_fetch(
    g: &mut GroupInboxes,
    now: Instant,
    fetch: (GroupTag, InboxRequest),
    seqs: std::ops::RangeInclusive<u64>,
) -> u64 {
    let (tag, InboxRequest::Fetch { after_seq, .. }) = fetch else {
        panic!("not a fetch: {fetch:?}");
    };
    let messages: Vec<Delivery> = seqs.clone().map(|s| msg(s, 7)).collect();
    let last = messages.last().map_or(0, |d| d.seq);
    assert!(messages.first().is_none_or(|d| d.seq > after_seq));
    g.on_page(now, tag, messages, last, false, 0)
}

/// Answer every request in flight until none is due (acks applied, pages
/// empty).
fn settle(g: &mut GroupInboxes, mut now: Instant) {
    for _ in 0..100 {
        for (tag, r) in requests(g, now) {
            match r {
                InboxRequest::Fetch { .. } => {
                    g.on_page(now, tag, Vec::new(), 0, false, 0);
                }
                InboxRequest::Ack { up_to_seq } => g.on_ack_done(now, tag, up_to_seq),
            }
        }
        match g.poll_timeout() {
            Some(t) => now = now.max(t),
            None => return,
        }
    }
    panic!("requests never settled");
}

#[test]
fn a_group_starts_at_the_member_s_cursor_and_is_acknowledged_by_group_calls() {
    let now = Instant::now();
    let mut g = listed(now, vec![summary(G1, 4, 6)]);
    let fetch = g.poll_request(now).expect("one fetch after the list");
    assert_eq!(
        fetch.1.group_call(fetch.0.group),
        Call::GroupFetch {
            group: G1,
            after_seq: 4,
            max_count: FETCH_COUNT_MAX,
            max_bytes: FETCH_BYTES_MAX,
        },
        "after the cursor: what was read is not shown again"
    );
    assert_eq!(answer_fetch(&mut g, now, fetch, 5..=6), 0);
    assert_eq!(shown(&mut g), [(G1, 5), (G1, 6)]);
    let due = g.poll_timeout().expect("the ack's delay");
    let [(tag, ack)] = requests(&mut g, due)[..] else {
        panic!("one ack");
    };
    assert_eq!(
        ack.group_call(tag.group),
        Call::GroupAck {
            group: G1,
            up_to_seq: 6
        }
    );
    assert!(!g.all_acked());
    g.on_ack_done(due, tag, 6);
    assert!(g.all_acked());
    assert!(g.synced());
    assert_eq!(g.stats().inbox.shown, 2);
    assert_eq!(g.stats().groups, 1);
}

#[test]
fn pushes_out_of_order_are_shown_in_seq_order_and_duplicates_once() {
    let now = Instant::now();
    let mut g = listed(now, vec![summary(G1, 0, 0)]);
    let (tag, _) = g.poll_request(now).unwrap();
    g.on_page(now, tag, Vec::new(), 0, false, 0);
    for seq in [3, 1, 3, 2, 1] {
        g.on_push(now, G1, msg(seq, 7));
    }
    assert_eq!(shown(&mut g), [(G1, 1), (G1, 2), (G1, 3)]);
    assert_eq!(g.stats().inbox.duplicates, 2);
    assert_eq!(g.stats().inbox.shown, 3);
    assert!(g.poll_request(now).is_none(), "no gap left: no fetch");
}

#[test]
fn a_page_with_dropped_seqs_is_told_once_and_moved_past() {
    let now = Instant::now();
    let mut g = listed(now, vec![summary(G1, 0, 10), summary(G2, 2, 0)]);
    let fetches = requests(&mut g, now);
    assert_eq!(fetches.len(), 2);
    // G1: seqs 1..=7 were trimmed before this member read them.
    let (tag, _) = fetches[0];
    assert_eq!(tag.group, G1);
    let page: Vec<Delivery> = (8..=10).map(|s| msg(s, 7)).collect();
    assert_eq!(g.on_page(now, tag, page, 10, false, 7), 7, "tell 7");
    // G2: the shard did not answer the list's read (high 0); the empty
    // last page says seqs 3..=5 are gone.
    let (tag, _) = fetches[1];
    assert_eq!(g.on_page(now, tag, Vec::new(), 0, false, 3), 3);
    assert_eq!(shown(&mut g), [(G1, 8), (G1, 9), (G1, 10)]);
    assert_eq!(g.stats().dropped_told, 10);
    assert_eq!(g.stats().inbox.skipped, 10);
    // The next push of G2 follows the skipped seqs: shown at once, with no
    // fetch that would tell the same gap again.
    g.on_push(now, G2, msg(6, 7));
    assert_eq!(shown(&mut g), [(G2, 6)]);
    settle(&mut g, now);
    assert_eq!(g.stats().dropped_told, 10);
    assert!(g.synced());
}

#[test]
fn an_answer_not_in_turn_is_not_told() {
    let now = Instant::now();
    let mut g = listed(now, vec![summary(G1, 0, 3)]);
    let (tag, _) = g.poll_request(now).unwrap();
    g.on_fetch_failed(now, tag);
    // A late page for the failed fetch: not the inbox's, not told.
    assert_eq!(g.on_page(now, tag, Vec::new(), 0, false, 3), 0);
    assert_eq!(g.stats().dropped_told, 0);
}

#[test]
fn an_unknown_group_s_first_push_waits_for_the_list_then_starts_at_the_cursor() {
    let now = Instant::now();
    let mut g = listed(now, vec![summary(G1, 0, 0)]);
    settle(&mut g, now);
    assert!(g.synced());
    // Joined G2 meanwhile; its cursor is 4 and seq 5 was not pushed (or
    // is still on its way): the first push seen is 6.
    g.on_push(now, G2, msg(6, 7));
    assert_eq!(shown(&mut g), [], "the cursor is not known yet");
    assert!(!g.synced());
    assert!(g.poll_list(now), "the push asks for the list again");
    g.on_list(now, vec![summary(G1, 0, 0), summary(G2, 4, 6)]);
    let fetch = g.poll_request(now).expect("G2's first fetch");
    assert!(matches!(
        fetch,
        (tag, InboxRequest::Fetch { after_seq: 4, .. }) if tag.group == G2
    ));
    answer_fetch(&mut g, now, fetch, 5..=6);
    assert_eq!(shown(&mut g), [(G2, 5), (G2, 6)], "5 is not skipped");
    settle(&mut g, now);
    assert!(g.synced());
    assert_eq!(g.stats().unlisted, 0);
}

#[test]
fn pushes_of_a_group_a_later_list_does_not_name_are_dropped() {
    let now = Instant::now();
    let mut g = listed(now, vec![]);
    g.on_push(now, G3, msg(1, 7));
    assert!(g.poll_list(now));
    // Arrives while the list is read: that read may predate the join.
    g.on_push(now, G3, msg(2, 7));
    g.on_list(now, vec![]);
    assert_eq!(g.stats().unlisted, 1, "the push the read covered");
    assert!(!g.synced());
    assert!(g.poll_list(now), "the other one asks again");
    g.on_list(now, vec![]);
    assert_eq!(g.stats().unlisted, 2);
    assert!(g.synced());
    assert_eq!(shown(&mut g), []);
    // A push naming a user id, not a group, is dropped at once.
    g.on_push(now, 5, msg(1, 7));
    assert_eq!(g.stats().unlisted, 3);
    assert!(!g.poll_list(now));
}

#[test]
fn groups_beyond_the_maximum_are_not_followed_and_their_pushes_dropped() {
    let now = Instant::now();
    let mut g = inboxes(2, 8);
    g.on_push(now, G3, msg(1, 7));
    assert!(g.poll_list(now));
    g.on_list(
        now,
        vec![summary(G3, 0, 1), summary(G1, 0, 0), summary(G2, 0, 0)],
    );
    assert_eq!(g.stats().groups, 2, "the first groups_max by id");
    assert_eq!(g.stats().over_limit, 1, "G3's push that waited");
    g.on_push(now, G3, msg(2, 7));
    g.on_mailbox_changed(G3, 2);
    assert_eq!(g.stats().over_limit, 2);
    assert!(!g.poll_list(now), "a group not followed asks nothing");
    let fetched: Vec<u64> = requests(&mut g, now).iter().map(|(t, _)| t.group).collect();
    assert_eq!(fetched, [G1, G2]);
}

#[test]
fn groups_take_turns_to_show_and_to_send_requests() {
    let now = Instant::now();
    let groups = vec![summary(G1, 0, 3), summary(G2, 0, 3), summary(G3, 0, 3)];
    let mut g = inboxes(500, 2);
    assert!(g.poll_list(now));
    g.on_list(now, groups);
    let first = requests(&mut g, now);
    let groups_of =
        |r: &[(GroupTag, InboxRequest)]| r.iter().map(|(t, _)| t.group).collect::<Vec<_>>();
    assert_eq!(groups_of(&first), [G1, G2], "two in flight at most");
    assert_eq!(g.poll_timeout(), None, "full: an answer wakes the task");
    let mut pending = first.into_iter();
    answer_fetch(&mut g, now, pending.next().unwrap(), 1..=3);
    let third = requests(&mut g, now);
    assert_eq!(groups_of(&third), [G3]);
    answer_fetch(&mut g, now, pending.next().unwrap(), 1..=3);
    answer_fetch(&mut g, now, third[0], 1..=3);
    let order = shown(&mut g);
    assert_eq!(
        order,
        [
            (G1, 1),
            (G2, 1),
            (G3, 1),
            (G1, 2),
            (G2, 2),
            (G3, 2),
            (G1, 3),
            (G2, 3),
            (G3, 3)
        ],
        "one message per group in turn"
    );
}

#[test]
fn after_a_login_inboxes_send_nothing_until_the_list_restarts_them() {
    let now = Instant::now();
    let mut g = listed(now, vec![summary(G1, 0, 0)]);
    settle(&mut g, now);
    g.on_push(now, G1, msg(1, 7));
    assert_eq!(shown(&mut g), [(G1, 1)]);
    // The session is lost before the ack went out; a new one starts.
    g.on_login();
    let later = now + Duration::from_secs(1);
    g.on_push(later, G1, msg(3, 7));
    g.on_push(later, G1, msg(2, 7));
    assert_eq!(shown(&mut g), [(G1, 2), (G1, 3)], "pushes still go in");
    assert!(requests(&mut g, later + Duration::from_secs(5)).is_empty());
    assert_eq!(g.poll_timeout(), None, "only the list is due");
    assert!(!g.synced());
    assert!(g.poll_list(later));
    // The cursor is still 0 (the ack was lost): the inbox goes on from
    // what it showed, fetches after it and acknowledges it again.
    g.on_list(later, vec![summary(G1, 0, 3)]);
    let r = requests(&mut g, later);
    let [(fetch, InboxRequest::Fetch { after_seq: 3, .. }), (ack, InboxRequest::Ack { up_to_seq: 3 })] =
        r[..]
    else {
        panic!("a fetch after what was shown and its ack: {r:?}");
    };
    g.on_page(later, fetch, Vec::new(), 0, false, 0);
    assert!(!g.synced(), "the ack is not confirmed");
    g.on_ack_done(later, ack, 3);
    assert!(g.synced());
    assert_eq!(g.stats().inbox.shown, 3);
}

#[test]
fn a_group_no_longer_listed_is_dropped_and_its_late_answers_ignored() {
    let now = Instant::now();
    let mut g = listed(now, vec![summary(G1, 0, 2)]);
    let old = g.poll_request(now).unwrap();
    g.want_list(); // GroupChanged: left the group
    assert!(g.poll_list(now));
    g.on_list(now, vec![]);
    assert_eq!(g.stats().groups, 0);
    // Joined again, at a new cursor, before the old fetch was answered.
    g.want_list();
    assert!(g.poll_list(now));
    g.on_list(now, vec![summary(G1, 5, 6)]);
    let new = g.poll_request(now).expect("the new inbox's fetch");
    assert_ne!(new.0, old.0);
    assert_eq!(answer_fetch(&mut g, now, old, 1..=2), 0);
    assert_eq!(
        shown(&mut g),
        [],
        "the old inbox's page is not the new one's"
    );
    answer_fetch(&mut g, now, new, 6..=6);
    assert_eq!(shown(&mut g), [(G1, 6)]);
}

#[test]
fn a_failed_list_is_read_again_and_one_refused_for_good_lets_inboxes_go_on() {
    let now = Instant::now();
    let mut g = listed(now, vec![summary(G1, 0, 0)]);
    settle(&mut g, now);
    g.on_login();
    assert!(g.poll_list(now));
    g.on_list_failed(now, false);
    assert!(!g.poll_list(now), "not before the retry delay");
    let retry = g.poll_timeout().expect("the retry");
    assert!(g.poll_list(retry));
    g.on_list_failed(retry, true); // a gateway without groups
    assert!(!g.poll_list(retry), "not read again");
    let r = requests(&mut g, retry);
    assert!(
        matches!(r[..], [(_, InboxRequest::Fetch { after_seq: 0, .. })]),
        "G1 goes on after what it showed: {r:?}"
    );
    g.on_page(retry, r[0].0, vec![msg(1, 7)], 1, false, 0);
    assert_eq!(shown(&mut g), [(G1, 1)]);
    settle(&mut g, retry);
    assert!(g.synced(), "{:?}", g.stats());
}

#[test]
fn acks_before_a_close_cover_every_group() {
    let now = Instant::now();
    let mut g = listed(now, vec![summary(G1, 0, 0), summary(G2, 0, 0)]);
    settle(&mut g, now);
    g.on_push(now, G1, msg(1, 7));
    g.on_push(now, G2, msg(1, 7));
    g.on_push(now, G2, msg(2, 7));
    assert_eq!(g.waiting(), 3);
    assert_eq!(
        g.poll_show().map(|(group, d)| (group, d.seq)),
        Some((G1, 1))
    );
    assert_eq!(
        g.poll_show().map(|(group, d)| (group, d.seq)),
        Some((G2, 1))
    );
    g.ack_now(now);
    let acks = requests(&mut g, now);
    assert_eq!(acks.len(), 2, "what was taken, in both groups");
    for (tag, r) in acks {
        let InboxRequest::Ack { up_to_seq } = r else {
            panic!("an ack");
        };
        assert_eq!(up_to_seq, 1, "not seq 2 of G2, still waiting");
        g.on_ack_done(now, tag, up_to_seq);
    }
    assert!(g.all_acked());
    assert!(!g.synced(), "G2's seq 2 was not taken");
}
