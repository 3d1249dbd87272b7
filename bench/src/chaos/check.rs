//! `imbench chaos`'s checker: everything sent and acknowledged against
//! everything each recipient was shown (docs/PROTOCOL.md §6.4, §6.7: a
//! message answered `Sent{seq}` is shown once, in order, at its
//! recipient, or at every member of its group, the sender included).
//!
//! A message is known by its stamp (sender, counter). What a user was
//! shown is every `Message`/`GroupMessage` event of all its connections,
//! in order: the user's screen over the whole run.

use super::users::{Conv, Sent, Shown};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};

/// Examples of each kind kept for the report at most.
const EXAMPLES_MAX: usize = 20;

#[derive(Debug, Default, Clone, Serialize)]
pub struct Verdict {
    /// Sends made (every final answer).
    pub sent: u64,
    /// Answered `Sent{seq}`.
    pub acked: u64,
    pub acked_direct: u64,
    pub acked_group: u64,
    /// Ended with an error (not acknowledged), by error.
    pub failed: BTreeMap<String, u64>,
    /// (acknowledged message, recipient) pairs: a group message counts
    /// once per member.
    pub expected_deliveries: u64,
    /// Message events over every user and connection.
    pub shown: u64,
    /// ... counting each (recipient, message) once.
    pub shown_unique: u64,
    /// Acknowledged and never shown at a recipient (per recipient).
    pub acked_lost: u64,
    /// Shown again at a recipient (each further showing counts).
    pub duplicated: u64,
    /// ... of which on the same connection as the first showing (the
    /// SDK's own promise) ...
    pub duplicated_same_connection: u64,
    /// ... and of which with the same seq as the first showing (a copy
    /// not stored twice: shown again, e.g. after an acknowledgement
    /// that did not get through before a logout).
    pub duplicated_same_seq: u64,
    /// Shown before a message of the same conversation sent earlier (1:1:
    /// per sender -> recipient; group: per group, by seq, and per sender
    /// in the group).
    pub out_of_order: u64,
    /// Shown to a user it was not for, or unknown to every sender.
    pub misdelivered: u64,
    /// Shown, though its send ended with an error or had no answer: the
    /// store happened but its answer was lost (allowed).
    pub shown_unacked: u64,
    /// First shown at the drain's fresh login: a connection that was up
    /// and synced did not know of it (pushed nowhere, no fetch).
    pub shown_only_after_relogin: u64,
    /// First shown under another seq than the sender was answered: the
    /// message was stored twice (a retry) and the first copy shown.
    pub seq_differs: u64,
    /// The duplicates grouped by user, mailbox and the two connections.
    pub duplicate_runs: Vec<DupRun>,
    /// Some of each problem, described.
    pub examples: Vec<String>,
}

/// Messages of one mailbox a user was shown on one connection and again
/// on another (or the same).
#[derive(Debug, Clone, Serialize)]
pub struct DupRun {
    pub user: u64,
    /// `Direct`, or `Group(id)`.
    pub conv: String,
    pub first_conn: u32,
    pub again_conn: u32,
    /// Whether the second showing had the first one's seq (else the
    /// message was stored twice).
    pub same_seq: bool,
    pub count: u64,
    pub seq_min: u64,
    pub seq_max: u64,
    /// When the first of them was shown the first time, and again.
    pub first_shown_ms: f64,
    pub again_shown_ms: f64,
}

impl Verdict {
    pub fn clean(&self) -> bool {
        self.acked_lost == 0
            && self.duplicated == 0
            && self.out_of_order == 0
            && self.misdelivered == 0
    }

    fn example(&mut self, what: String) {
        if self.examples.len() < EXAMPLES_MAX {
            self.examples.push(what);
        }
    }
}

/// Where a message went: a user or a group, and the seq the sender was
/// answered (if it was).
struct Sending {
    to: u64,
    acked_seq: Option<u64>,
    at_ms: f64,
}

/// Check every user's screen (`shown`, by user id) against every send
/// (`sent`); `groups`: group id -> member user ids.
pub fn check(
    sent: &[Sent],
    shown: &BTreeMap<u64, Vec<Shown>>,
    groups: &HashMap<u64, Vec<u64>>,
) -> Verdict {
    let mut v = Verdict::default();
    let mut sendings: HashMap<(u64, u64), Sending> = HashMap::new();
    for s in sent {
        v.sent += 1;
        match &s.result {
            Ok(_) if groups.contains_key(&s.to) => v.acked_group += 1,
            Ok(_) => v.acked_direct += 1,
            Err(e) => *v.failed.entry(e.clone()).or_default() += 1,
        }
        sendings.insert(
            (s.sender, s.counter),
            Sending {
                to: s.to,
                acked_seq: s.result.as_ref().ok().copied(),
                at_ms: s.at_ms,
            },
        );
    }
    v.acked = v.acked_direct + v.acked_group;
    // Per recipient: the first showing of each message.
    let mut first: HashMap<(u64, (u64, u64)), Shown> = HashMap::new();
    let mut runs: BTreeMap<(u64, String, u32, u32, bool), DupRun> = BTreeMap::new();
    for (&user, screen) in shown {
        // Order state: 1:1 newest counter per sender; group newest seq
        // per group and newest counter per (group, sender).
        let mut direct_last: HashMap<u64, u64> = HashMap::new();
        let mut group_seq: HashMap<u64, u64> = HashMap::new();
        let mut group_last: HashMap<(u64, u64), u64> = HashMap::new();
        for s in screen {
            v.shown += 1;
            let key = (s.sender, s.counter);
            let intended = sendings.get(&key).is_some_and(|x| match s.conv {
                Conv::Direct => x.to == user && s.from == s.sender,
                Conv::Group(g) => {
                    x.to == g
                        && s.from == s.sender
                        && groups.get(&g).is_some_and(|m| m.contains(&user))
                }
            });
            if !intended {
                v.misdelivered += 1;
                v.example(format!(
                    "misdelivered: user {user} shown {:?} from {} stamped ({}, #{}) seq {}",
                    s.conv, s.from, s.sender, s.counter, s.seq
                ));
                continue;
            }
            if let Some(f) = first.get(&(user, key)) {
                v.duplicated += 1;
                if f.conn == s.conn {
                    v.duplicated_same_connection += 1;
                }
                if f.seq == s.seq {
                    v.duplicated_same_seq += 1;
                }
                let conv = format!("{:?}", s.conv);
                let run = runs
                    .entry((user, conv.clone(), f.conn, s.conn, f.seq == s.seq))
                    .or_insert(DupRun {
                        user,
                        conv,
                        first_conn: f.conn,
                        again_conn: s.conn,
                        same_seq: f.seq == s.seq,
                        count: 0,
                        seq_min: s.seq,
                        seq_max: s.seq,
                        first_shown_ms: f.at_ms,
                        again_shown_ms: s.at_ms,
                    });
                run.count += 1;
                run.seq_min = run.seq_min.min(s.seq);
                run.seq_max = run.seq_max.max(s.seq);
                run.first_shown_ms = run.first_shown_ms.min(f.at_ms);
                run.again_shown_ms = run.again_shown_ms.min(s.at_ms);
                v.example(format!(
                    "duplicated: user {user} shown {:?} message ({}, #{}) again: first seq {} on \
                     connection {} at {:.0} ms, again seq {} on connection {} at {:.0} ms",
                    s.conv, s.sender, s.counter, f.seq, f.conn, f.at_ms, s.seq, s.conn, s.at_ms
                ));
                continue;
            }
            first.insert((user, key), s.clone());
            v.shown_unique += 1;
            let sending = &sendings[&key];
            match sending.acked_seq {
                None => v.shown_unacked += 1,
                Some(seq) if seq != s.seq => v.seq_differs += 1,
                Some(_) => {}
            }
            if s.relogin {
                v.shown_only_after_relogin += 1;
            }
            let in_order = match s.conv {
                Conv::Direct => {
                    let last = direct_last.insert(s.sender, s.counter);
                    last.is_none_or(|c| c < s.counter)
                }
                Conv::Group(g) => {
                    let seq_ok = group_seq.insert(g, s.seq).is_none_or(|q| q < s.seq);
                    let last = group_last.insert((g, s.sender), s.counter);
                    seq_ok && last.is_none_or(|c| c < s.counter)
                }
            };
            if !in_order {
                v.out_of_order += 1;
                v.example(format!(
                    "out of order: user {user} shown {:?} message ({}, #{}) seq {} on connection \
                     {} at {:.0} ms after a later one",
                    s.conv, s.sender, s.counter, s.seq, s.conn, s.at_ms
                ));
            }
        }
    }
    // Every acknowledged message at every recipient.
    let mut lost_keys: Vec<(u64, u64, u64)> = Vec::new();
    for s in sent {
        let Ok(seq) = s.result else { continue };
        let recipients: Vec<u64> = match groups.get(&s.to) {
            Some(members) => members.clone(),
            None => vec![s.to],
        };
        for r in recipients {
            v.expected_deliveries += 1;
            if !first.contains_key(&(r, (s.sender, s.counter))) {
                v.acked_lost += 1;
                lost_keys.push((r, s.sender, s.counter));
                let kind = if groups.contains_key(&s.to) {
                    format!("group {}", s.to)
                } else {
                    "1:1".to_string()
                };
                let at = sendings[&(s.sender, s.counter)].at_ms;
                v.example(format!(
                    "lost: {kind} message ({}, #{}) acknowledged seq {seq} (sent at {at:.0} ms, \
                     answered at {:.0} ms) never shown to user {r}",
                    s.sender, s.counter, s.answered_ms
                ));
            }
        }
    }
    v.duplicate_runs = runs.into_values().collect();
    let distinct: HashSet<(u64, u64)> = lost_keys.iter().map(|&(_, s, c)| (s, c)).collect();
    if !distinct.is_empty() {
        v.example(format!(
            "{} distinct acknowledged messages lost at {} recipients",
            distinct.len(),
            lost_keys.len()
        ));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: u64 = 1;
    const B: u64 = 2;
    const C: u64 = 3;
    const G: u64 = (1 << 63) + 1;

    fn sent(sender: u64, counter: u64, to: u64, seq: Option<u64>) -> Sent {
        Sent {
            sender,
            counter,
            to,
            result: seq.ok_or_else(|| "gave up".to_string()),
            at_ms: 0.0,
            answered_ms: 0.0,
        }
    }

    fn shown(conv: Conv, sender: u64, counter: u64, seq: u64, conn: u32) -> Shown {
        Shown {
            conv,
            from: sender,
            sender,
            counter,
            seq,
            conn,
            relogin: false,
            at_ms: 0.0,
        }
    }

    fn groups() -> HashMap<u64, Vec<u64>> {
        [(G, vec![A, B, C])].into_iter().collect()
    }

    #[test]
    fn everything_shown_once_in_order_is_clean() {
        let s = vec![
            sent(A, 0, B, Some(1)),
            sent(A, 1, G, Some(1)),
            sent(A, 2, B, Some(2)),
            sent(B, 0, G, Some(2)),
        ];
        let g = |u| {
            vec![
                shown(Conv::Group(G), A, 1, 1, 1),
                shown(Conv::Group(G), B, 0, 2, u),
            ]
        };
        let mut b = g(1);
        b.insert(0, shown(Conv::Direct, A, 0, 1, 1));
        b.push(shown(Conv::Direct, A, 2, 2, 2));
        let screens: BTreeMap<u64, Vec<Shown>> = [(A, g(1)), (B, b), (C, g(3))].into();
        let v = check(&s, &screens, &groups());
        assert!(v.clean(), "{v:?}");
        assert_eq!((v.acked, v.expected_deliveries, v.shown_unique), (4, 8, 8));
    }

    #[test]
    fn lost_duplicated_and_reordered_messages_are_counted() {
        let s = vec![
            sent(A, 0, B, Some(1)),
            sent(A, 1, B, Some(2)),
            sent(A, 2, B, Some(3)),
            sent(A, 3, G, Some(1)),
            sent(C, 0, B, None),
        ];
        let b = vec![
            shown(Conv::Direct, A, 1, 2, 1),
            shown(Conv::Direct, A, 0, 1, 1), // out of order
            shown(Conv::Direct, A, 1, 2, 2), // again, next connection
            shown(Conv::Direct, A, 1, 5, 2), // stored twice
            shown(Conv::Direct, C, 0, 4, 2), // its answer was lost
            shown(Conv::Group(G), A, 3, 1, 2),
        ];
        let screens: BTreeMap<u64, Vec<Shown>> = [
            (A, vec![shown(Conv::Group(G), A, 3, 1, 1)]),
            (B, b),
            (C, vec![shown(Conv::Direct, A, 2, 3, 1)]), // not for C
        ]
        .into();
        let v = check(&s, &screens, &groups());
        // (A, #2) never reached B; the group message never reached C.
        assert_eq!(v.acked_lost, 2);
        assert_eq!(v.duplicated, 2);
        assert_eq!(v.duplicated_same_connection, 0);
        assert_eq!(v.duplicated_same_seq, 1);
        assert_eq!(v.duplicate_runs.len(), 2, "{:?}", v.duplicate_runs);
        assert!(v
            .duplicate_runs
            .iter()
            .all(|r| (r.first_conn, r.again_conn, r.count) == (1, 2, 1)));
        assert_eq!(v.out_of_order, 1);
        assert_eq!(v.misdelivered, 1);
        assert_eq!(v.shown_unacked, 1);
        assert!(!v.clean());
    }

    #[test]
    fn a_group_shown_out_of_seq_order_is_out_of_order() {
        let s = vec![sent(A, 0, G, Some(1)), sent(B, 0, G, Some(2))];
        let screens: BTreeMap<u64, Vec<Shown>> = [(
            C,
            vec![
                shown(Conv::Group(G), B, 0, 2, 1),
                shown(Conv::Group(G), A, 0, 1, 1),
            ],
        )]
        .into();
        let v = check(&s, &screens, &groups());
        assert_eq!(v.out_of_order, 1);
        assert_eq!(v.acked_lost, 4, "A and B never showed either");
    }
}
