use super::*;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn msg(seq: u64, from: u64, msg_id: u128) -> Delivery {
    Delivery {
        from,
        msg_id,
        sent_at_ms: 0,
        body: vec![1; 10],
        seq,
    }
}

fn shown(inbox: &mut Inbox) -> Vec<u64> {
    std::iter::from_fn(|| inbox.poll_show())
        .map(|d| d.seq)
        .collect()
}

/// Answer the fetch in flight with `messages` (their last seq as the
/// page's).
fn page(inbox: &mut Inbox, now: Instant, messages: Vec<Delivery>, more: bool) {
    let last = messages.last().map_or(0, |d| d.seq);
    inbox.on_page(now, messages, last, more);
}

fn t0() -> Instant {
    Instant::now()
}

#[test]
fn in_order_pushes_are_shown_once_and_acknowledged_after_the_delay() {
    let now = t0();
    let mut inbox = Inbox::new(InboxConfig::default());
    inbox.on_login(now, 0, 0);
    assert!(
        matches!(
            inbox.poll_request(now),
            Some(InboxRequest::Fetch { after_seq: 0, .. })
        ),
        "one fetch after every login, the mailbox's figures 0/0 or not"
    );
    page(&mut inbox, now, Vec::new(), false);
    assert_eq!(inbox.poll_request(now), None, "an empty mailbox: no more");
    inbox.on_push(now, msg(1, 7, 1));
    inbox.on_push(now, msg(2, 7, 2));
    inbox.on_push(now, msg(2, 7, 2));
    assert_eq!(shown(&mut inbox), [1, 2]);
    assert_eq!(inbox.stats().duplicates, 1);
    assert_eq!(inbox.poll_request(now), None, "the ack waits for its delay");
    let due = inbox.poll_timeout().expect("an ack is due later");
    assert_eq!(due, now + InboxConfig::default().ack_delay);
    assert_eq!(
        inbox.poll_request(due),
        Some(InboxRequest::Ack { up_to_seq: 2 })
    );
    inbox.on_ack_done(due, 2);
    assert_eq!(inbox.unacked(), None);
    assert!(inbox.caught_up());
}

#[test]
fn many_shown_messages_are_acknowledged_at_once() {
    let now = t0();
    let config = InboxConfig {
        ack_every: 3,
        ..InboxConfig::default()
    };
    let mut inbox = Inbox::new(config);
    for seq in 1..=3 {
        inbox.on_push(now, msg(seq, 1, seq as u128));
    }
    assert_eq!(shown(&mut inbox), [1, 2, 3]);
    assert_eq!(
        inbox.poll_request(now),
        Some(InboxRequest::Ack { up_to_seq: 3 })
    );
}

#[test]
fn only_messages_taken_are_acknowledged() {
    let now = t0();
    let config = InboxConfig {
        ack_every: 3,
        ..InboxConfig::default()
    };
    let mut inbox = Inbox::new(config);
    inbox.on_login(now, 4, 4);
    assert!(inbox.poll_request(now).is_some(), "the login's fetch");
    page(
        &mut inbox,
        now,
        (1..=4).map(|s| msg(s, 1, s as u128)).collect(),
        false,
    );
    assert_eq!(inbox.waiting(), 4);
    assert_eq!(inbox.poll_request(now), None, "nothing taken: no ack");
    assert_eq!(inbox.poll_timeout(), None);
    assert!(inbox.all_acked());
    assert_eq!(inbox.poll_show().map(|d| d.seq), Some(1));
    let due = inbox.poll_timeout().expect("the ack's delay");
    assert_eq!(
        inbox.poll_request(due),
        Some(InboxRequest::Ack { up_to_seq: 1 }),
        "taken, not the 3 still waiting"
    );
    inbox.on_ack_done(due, 1);
    assert_eq!(shown(&mut inbox), [2, 3, 4]);
    assert_eq!(inbox.unacked(), Some(4));
    assert_eq!(
        inbox.poll_request(due),
        Some(InboxRequest::Ack { up_to_seq: 4 }),
        "ack_every reached"
    );
}

#[test]
fn a_close_acknowledges_what_was_taken_not_what_waits() {
    let now = t0();
    let mut inbox = Inbox::new(InboxConfig::default());
    inbox.on_push(now, msg(1, 1, 1));
    inbox.on_push(now, msg(2, 1, 2));
    assert_eq!(inbox.poll_show().map(|d| d.seq), Some(1));
    inbox.ack_now(now);
    assert_eq!(
        inbox.poll_request(now),
        Some(InboxRequest::Ack { up_to_seq: 1 })
    );
    inbox.on_ack_done(now, 1);
    // A client closing now leaves seq 2 in the mailbox for its next login.
    assert!(inbox.all_acked(), "the close may go ahead");
    assert_eq!(inbox.unacked(), None);
}

#[test]
fn a_push_past_a_gap_waits_for_the_gap_then_fetches_it() {
    let now = t0();
    let mut inbox = Inbox::new(InboxConfig::default());
    inbox.on_push(now, msg(2, 7, 2));
    assert_eq!(shown(&mut inbox), Vec::<u64>::new(), "held past the gap");
    assert_eq!(inbox.poll_request(now), None, "the gap may fill by itself");
    let wait = inbox.poll_timeout().expect("the gap's deadline");
    assert_eq!(wait, now + InboxConfig::default().gap_wait);
    let fetch = inbox.poll_request(wait);
    assert!(matches!(
        fetch,
        Some(InboxRequest::Fetch { after_seq: 0, .. })
    ));
    page(&mut inbox, wait, vec![msg(1, 8, 1), msg(2, 7, 2)], false);
    assert_eq!(shown(&mut inbox), [1, 2], "in seq order, each once");
    assert!(inbox.caught_up());
}

#[test]
fn reordered_pushes_are_shown_in_seq_order_without_a_fetch() {
    let now = t0();
    let mut inbox = Inbox::new(InboxConfig::default());
    inbox.on_push(now, msg(3, 1, 3));
    inbox.on_push(now, msg(2, 1, 2));
    assert!(shown(&mut inbox).is_empty());
    inbox.on_push(now, msg(1, 1, 1));
    assert_eq!(shown(&mut inbox), [1, 2, 3]);
    assert_eq!(inbox.stats().fetches, 0);
}

#[test]
fn a_login_with_stored_messages_fetches_page_by_page() {
    let now = t0();
    let mut inbox = Inbox::new(InboxConfig::default());
    inbox.on_login(now, 3, 10); // seqs 8, 9, 10 wait
    assert!(matches!(
        inbox.poll_request(now),
        Some(InboxRequest::Fetch { after_seq: 7, .. })
    ));
    assert_eq!(inbox.poll_request(now), None, "one fetch at a time");
    page(&mut inbox, now, vec![msg(8, 1, 8), msg(9, 1, 9)], true);
    assert_eq!(shown(&mut inbox), [8, 9]);
    assert!(matches!(
        inbox.poll_request(now),
        Some(InboxRequest::Fetch { after_seq: 9, .. })
    ));
    page(&mut inbox, now, vec![msg(10, 1, 10)], false);
    assert_eq!(shown(&mut inbox), [10]);
    assert!(inbox.caught_up());
}

#[test]
fn seqs_acknowledged_elsewhere_are_skipped_not_waited_for() {
    let now = t0();
    let mut inbox = Inbox::new(InboxConfig::default());
    inbox.on_push(now, msg(5, 1, 5));
    let later = now + InboxConfig::default().gap_wait;
    assert!(matches!(
        inbox.poll_request(later),
        Some(InboxRequest::Fetch { after_seq: 0, .. })
    ));
    // Another client of the user acknowledged 1..=3; 4 and 5 remain.
    page(&mut inbox, later, vec![msg(4, 1, 4), msg(5, 1, 5)], false);
    assert_eq!(shown(&mut inbox), [4, 5]);
    assert_eq!(inbox.stats().skipped, 3);
    assert!(inbox.caught_up());
}

#[test]
fn records_the_gateway_could_not_decode_are_moved_past() {
    let now = t0();
    let mut inbox = Inbox::new(InboxConfig::default());
    inbox.on_login(now, 4, 8); // 5..=8 wait
    assert!(matches!(
        inbox.poll_request(now),
        Some(InboxRequest::Fetch { after_seq: 4, .. })
    ));
    // 6 and 8 are unreadable: left out of the page, counted in last_seq.
    inbox.on_page(now, vec![msg(5, 1, 5), msg(7, 1, 7)], 8, false);
    assert_eq!(shown(&mut inbox), [5, 7]);
    assert_eq!(inbox.shown_seq(), 8);
    assert_eq!(inbox.stats().skipped, 2);
    assert!(inbox.caught_up());
    let mut empty = Inbox::new(InboxConfig::default());
    empty.on_login(now, 2, 2);
    assert!(empty.poll_request(now).is_some());
    empty.on_page(now, Vec::new(), 2, false); // nothing readable at all
    assert!(empty.caught_up(), "no fetch loop on an unreadable mailbox");
}

#[test]
fn a_message_stored_twice_is_shown_once() {
    let now = t0();
    let mut inbox = Inbox::new(InboxConfig::default());
    inbox.on_push(now, msg(1, 7, 42));
    inbox.on_push(now, msg(2, 7, 42)); // a sender's retry stored again
    inbox.on_push(now, msg(3, 8, 42)); // same id, another sender: new
    let ids: Vec<(u64, u64)> = std::iter::from_fn(|| inbox.poll_show())
        .map(|d| (d.seq, d.from))
        .collect();
    assert_eq!(ids, [(1, 7), (3, 8)]);
    assert_eq!(inbox.shown_seq(), 3, "the copy's seq counts as shown");
}

#[test]
fn pushes_beyond_the_held_limit_are_dropped_and_fetched_later() {
    let now = t0();
    let config = InboxConfig {
        held_bytes_max: 15,
        ..InboxConfig::default()
    };
    let mut inbox = Inbox::new(config);
    inbox.on_push(now, msg(2, 1, 2)); // 10 bytes held
    inbox.on_push(now, msg(3, 1, 3)); // would be 20: dropped
    assert_eq!(inbox.stats().held_dropped, 1);
    assert!(matches!(
        inbox.poll_request(now),
        Some(InboxRequest::Fetch { after_seq: 0, .. })
    ));
    page(
        &mut inbox,
        now,
        vec![msg(1, 1, 1), msg(2, 1, 2), msg(3, 1, 3)],
        false,
    );
    assert_eq!(shown(&mut inbox), [1, 2, 3]);
}

#[test]
fn a_mailbox_change_hint_fetches_and_a_failed_fetch_is_retried_later() {
    let now = t0();
    let mut inbox = Inbox::new(InboxConfig::default());
    inbox.on_mailbox_changed(2);
    assert!(matches!(
        inbox.poll_request(now),
        Some(InboxRequest::Fetch { after_seq: 0, .. })
    ));
    inbox.on_fetch_failed(now);
    assert_eq!(inbox.poll_request(now), None, "not at once");
    let retry = inbox.poll_timeout().expect("a retry time");
    assert!(matches!(
        inbox.poll_request(retry),
        Some(InboxRequest::Fetch { after_seq: 0, .. })
    ));
    page(&mut inbox, retry, vec![msg(1, 1, 1), msg(2, 1, 2)], false);
    assert_eq!(shown(&mut inbox), [1, 2]);
}

#[test]
fn a_new_session_voids_the_old_sessions_requests() {
    let now = t0();
    let mut inbox = Inbox::new(InboxConfig::default());
    inbox.on_login(now, 2, 2);
    assert!(inbox.poll_request(now).is_some());
    inbox.on_login(now, 3, 3); // reconnected before the answer
    assert!(matches!(
        inbox.poll_request(now),
        Some(InboxRequest::Fetch { after_seq: 0, .. })
    ));
}

/// Answer every request until no timer is left; each time `poll_timeout`
/// names must have a request due then, or its driver, woken at once again
/// and again with nothing to do, spins.
#[test]
fn group_requests_are_carried_by_the_group_calls() {
    let group = crate::groups::GROUP_ID_BASE | 7;
    let fetch = InboxRequest::Fetch {
        after_seq: 4,
        max_count: 200,
        max_bytes: 1000,
    };
    assert_eq!(
        fetch.group_call(group),
        Call::GroupFetch {
            group,
            after_seq: 4,
            max_count: 200,
            max_bytes: 1000,
        }
    );
    assert_eq!(
        InboxRequest::Ack { up_to_seq: 9 }.group_call(group),
        Call::GroupAck {
            group,
            up_to_seq: 9
        }
    );
    // The same requests, for the user's own mailbox.
    assert_eq!(
        fetch.call(),
        Call::Fetch {
            after_seq: 4,
            max_count: 200,
            max_bytes: 1000,
        }
    );
    assert_eq!(
        InboxRequest::Ack { up_to_seq: 9 }.call(),
        Call::Ack { up_to_seq: 9 }
    );
}

/// A group inbox starts at the member's cursor: `on_login(high - read_seq,
/// high)` takes every seq up to `read_seq` as acknowledged, so the first
/// fetch is after the cursor and nothing up to it is shown again.
#[test]
fn a_group_inbox_starts_at_the_member_s_cursor() {
    let now = t0();
    let (read_seq, high_seq) = (5, 8);
    let mut inbox = Inbox::new(InboxConfig::default());
    inbox.on_login(now, high_seq - read_seq, high_seq);
    inbox.on_push(now, msg(4, 1, 4));
    assert_eq!(
        inbox.poll_request(now),
        Some(InboxRequest::Fetch {
            after_seq: read_seq,
            max_count: FETCH_COUNT_MAX,
            max_bytes: FETCH_BYTES_MAX,
        })
    );
    page(
        &mut inbox,
        now,
        (6..=8).map(|s| msg(s, 1, s as u128)).collect(),
        false,
    );
    assert_eq!(shown(&mut inbox), [6, 7, 8]);
    assert_eq!(inbox.stats().duplicates, 1, "seq 4 was read already");
}

/// A new connection that goes on from what an earlier one showed (its
/// acknowledgement lost with it): the mailbox still holds 4..=8, the
/// earlier connection showed up to 6. Only 7 and 8 are shown; the
/// acknowledgement up to 6 goes again, then up to 8.
#[test]
fn a_resumed_inbox_never_shows_again_what_an_earlier_connection_showed() {
    let now = t0();
    let mut inbox = Inbox::resume(InboxConfig::default(), 6);
    inbox.on_login(now, 5, 8);
    assert_eq!(
        inbox.poll_request(now),
        Some(InboxRequest::Fetch {
            after_seq: 6,
            max_count: FETCH_COUNT_MAX,
            max_bytes: FETCH_BYTES_MAX,
        })
    );
    page(
        &mut inbox,
        now,
        (4..=8).map(|s| msg(s, 1, s as u128)).collect(),
        false,
    );
    inbox.on_push(now, msg(5, 1, 5));
    assert_eq!(shown(&mut inbox), [7, 8]);
    settle(&mut inbox, now);
    assert_eq!(inbox.unacked(), None, "acknowledged through 8");
    assert!(inbox.caught_up());
    // Without the mark, every stored message is shown again.
    let mut fresh = Inbox::new(InboxConfig::default());
    fresh.on_login(now, 5, 8);
    let _ = fresh.poll_request(now);
    page(
        &mut fresh,
        now,
        (4..=8).map(|s| msg(s, 1, s as u128)).collect(),
        false,
    );
    assert_eq!(shown(&mut fresh), [4, 5, 6, 7, 8]);
}

fn settle(inbox: &mut Inbox, mut now: Instant) {
    for _ in 0..10 {
        let Some(t) = inbox.poll_timeout() else {
            return;
        };
        now = now.max(t);
        match inbox.poll_request(now) {
            Some(InboxRequest::Ack { up_to_seq }) => inbox.on_ack_done(now, up_to_seq),
            Some(r) => panic!("unexpected {r:?}"),
            None => panic!("poll_timeout named {t:?} with nothing due"),
        }
    }
    panic!("timers without end");
}

#[test]
fn a_fetch_failed_after_its_gap_filled_leaves_no_timer_behind() {
    let now = t0();
    let mut inbox = Inbox::new(InboxConfig::default());
    inbox.on_push(now, msg(2, 7, 2));
    let wait = inbox.poll_timeout().expect("the gap's deadline");
    assert!(matches!(
        inbox.poll_request(wait),
        Some(InboxRequest::Fetch { after_seq: 0, .. })
    ));
    inbox.on_fetch_failed(wait);
    inbox.on_push(wait, msg(1, 7, 1)); // the gap filled by itself
    assert_eq!(shown(&mut inbox), [1, 2]);
    assert!(inbox.caught_up());
    settle(&mut inbox, wait);
}

#[test]
fn an_ack_lost_with_its_session_but_applied_leaves_no_timer_behind() {
    let now = t0();
    let mut inbox = Inbox::new(InboxConfig::default());
    inbox.on_login(now, 0, 0);
    assert!(inbox.poll_request(now).is_some(), "the login's fetch");
    page(&mut inbox, now, Vec::new(), false);
    inbox.on_push(now, msg(1, 7, 1));
    inbox.on_push(now, msg(2, 7, 2));
    assert_eq!(shown(&mut inbox), [1, 2]);
    let due = inbox.poll_timeout().expect("the ack's delay");
    assert_eq!(
        inbox.poll_request(due),
        Some(InboxRequest::Ack { up_to_seq: 2 })
    );
    inbox.on_ack_failed(due); // the session was lost before the answer
    inbox.on_login(due, 0, 2); // ... and the gateway had applied it
    assert_eq!(inbox.unacked(), None);
    settle(&mut inbox, due);
}

/// A mailbox as the shard keeps it, for the simulation.
struct Mailbox {
    records: Vec<Delivery>,
    acked: u64,
}

impl Mailbox {
    fn page(&self, after: u64, max: usize) -> (Vec<Delivery>, bool) {
        let live: Vec<&Delivery> = self
            .records
            .iter()
            .filter(|d| d.seq > after.max(self.acked))
            .collect();
        let page = live.iter().take(max).map(|d| (*d).clone()).collect();
        (page, live.len() > max)
    }
}

/// Messages stored (some twice under a new seq, as a sender's retry
/// does), pushed with loss, duplication and reordering, sessions lost and
/// re-established, fetches failing: the inbox shows every distinct message
/// exactly once, in seq order, and acknowledges no more than it showed.
fn simulate(seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let config = InboxConfig {
        fetch_count_max: rng.gen_range(1..5),
        held_bytes_max: rng.gen_range(10..100),
        ..InboxConfig::default()
    };
    let mut inbox = Inbox::new(config);
    let mut mailbox = Mailbox {
        records: Vec::new(),
        acked: 0,
    };
    let mut now = t0();
    let mut in_transit: Vec<Delivery> = Vec::new();
    let mut shown_ids: Vec<(u64, u128)> = Vec::new();
    let mut next_id = 0u128;
    // Requests with the page the mailbox held when each was sent: a page is
    // read when the fetch arrives and answered later, after pushes of
    // messages stored meanwhile may have come.
    let mut pending: Vec<Issued> = Vec::new();
    for _ in 0..400 {
        now += Duration::from_millis(rng.gen_range(0..60));
        match rng.gen_range(0..10) {
            0..=3 => {
                let seq = mailbox.records.len() as u64 + 1;
                let retry = next_id > 0 && rng.gen_bool(0.1);
                if !retry {
                    next_id += 1;
                }
                let d = msg(seq, 1 + (next_id % 3) as u64, next_id);
                mailbox.records.push(d.clone());
                if rng.gen_bool(0.8) {
                    in_transit.push(d.clone());
                }
                if rng.gen_bool(0.1) {
                    in_transit.push(d);
                }
            }
            4..=5 if !in_transit.is_empty() => {
                let i = rng.gen_range(0..in_transit.len());
                inbox.on_push(now, in_transit.swap_remove(i));
            }
            6 if !pending.is_empty() => {
                let (r, page) = pending.remove(0);
                answer(&mut inbox, &mut mailbox, now, r, page, rng.gen_bool(0.2));
            }
            7 if rng.gen_bool(0.1) => {
                // The session is lost: requests in flight and pushes in
                // transit with it; a new login reports the mailbox.
                pending.clear();
                in_transit.clear();
                let high = mailbox.records.len() as u64;
                inbox.on_login(now, high - mailbox.acked, high);
            }
            _ => {}
        }
        pending.extend(issue(&mut inbox, &mailbox, now));
        no_idle_timer(&inbox, now, seed);
        shown_ids.extend(std::iter::from_fn(|| inbox.poll_show()).map(|d| (d.from, d.msg_id)));
    }
    // Quiet network: everything answered until caught up.
    let high = mailbox.records.len() as u64;
    inbox.on_mailbox_changed(high);
    for _ in 0..10_000 {
        now += Duration::from_millis(50);
        pending.extend(issue(&mut inbox, &mailbox, now));
        no_idle_timer(&inbox, now, seed);
        for (r, page) in std::mem::take(&mut pending) {
            answer(&mut inbox, &mut mailbox, now, r, page, false);
        }
        shown_ids.extend(std::iter::from_fn(|| inbox.poll_show()).map(|d| (d.from, d.msg_id)));
        if inbox.caught_up() && inbox.unacked().is_none() && pending.is_empty() {
            break;
        }
    }
    assert!(inbox.caught_up(), "seed {seed}: caught up");
    let mut want = Vec::new();
    for d in &mailbox.records {
        if !want.contains(&(d.from, d.msg_id)) {
            want.push((d.from, d.msg_id));
        }
    }
    assert_eq!(shown_ids, want, "seed {seed}: once each, in seq order");
    assert_eq!(mailbox.acked, high, "seed {seed}: all acknowledged");
}

/// Once `poll_request(now)` has nothing more, `poll_timeout` names a later
/// time (or none): one at or before `now` would wake its driver at once,
/// again and again.
fn no_idle_timer(inbox: &Inbox, now: Instant, seed: u64) {
    if let Some(t) = inbox.poll_timeout() {
        assert!(t > now, "seed {seed}: a timer at {t:?} with nothing due");
    }
}

/// A request, and for a fetch the page (and `more`) read when it was sent.
type Issued = (InboxRequest, Option<(Vec<Delivery>, bool)>);

/// The inbox's new requests, each fetch with the page read now.
fn issue(inbox: &mut Inbox, mailbox: &Mailbox, now: Instant) -> Vec<Issued> {
    std::iter::from_fn(|| inbox.poll_request(now))
        .map(|r| match r {
            InboxRequest::Fetch {
                after_seq,
                max_count,
                ..
            } => (r, Some(mailbox.page(after_seq, max_count as usize))),
            InboxRequest::Ack { .. } => (r, None),
        })
        .collect()
}

fn answer(
    inbox: &mut Inbox,
    mailbox: &mut Mailbox,
    now: Instant,
    r: InboxRequest,
    page: Option<(Vec<Delivery>, bool)>,
    fail: bool,
) {
    match (r, fail) {
        (InboxRequest::Fetch { .. }, true) => inbox.on_fetch_failed(now),
        (InboxRequest::Ack { .. }, true) => inbox.on_ack_failed(now),
        (InboxRequest::Fetch { .. }, false) => {
            let (page, more) = page.expect("read when sent");
            let last = page.last().map_or(0, |d| d.seq);
            inbox.on_page(now, page, last, more);
        }
        (InboxRequest::Ack { up_to_seq }, false) => {
            assert!(up_to_seq <= inbox.shown_seq(), "acks only what it showed");
            mailbox.acked = mailbox.acked.max(up_to_seq);
            inbox.on_ack_done(now, up_to_seq);
        }
    }
}

#[test]
fn simulated_schedules_show_each_message_once_in_order() {
    for seed in 0..300 {
        simulate(seed);
    }
}

proptest! {
    #[test]
    fn any_schedule_shows_each_message_once_in_order(seed in any::<u64>()) {
        simulate(seed);
    }
}
