//! Property test of the friend graph: any sequence of requests, accepts,
//! rejects, removes and moves keeps every friendship mutual, every friend
//! in exactly one group, and matches a simple model.

use crate::common;

use proptest::prelude::*;
use proto::profile::{RequestBody, ResponseBody};
use std::collections::{BTreeMap, BTreeSet};

const USERS: usize = 5;

#[derive(Debug, Clone)]
enum Op {
    Request(usize, usize, u8),
    Accept(usize, usize, u8),
    Reject(usize, usize),
    Remove(usize, usize),
    Move(usize, usize, u8),
}

fn op() -> impl Strategy<Value = Op> {
    let u = 0..USERS;
    let g = 0u8..3;
    prop_oneof![
        (u.clone(), u.clone(), g.clone()).prop_map(|(a, b, g)| Op::Request(a, b, g)),
        (u.clone(), u.clone(), g.clone()).prop_map(|(a, b, g)| Op::Accept(a, b, g)),
        (u.clone(), u.clone()).prop_map(|(a, b)| Op::Reject(a, b)),
        (u.clone(), u.clone()).prop_map(|(a, b)| Op::Remove(a, b)),
        (u.clone(), u, g).prop_map(|(a, b, g)| Op::Move(a, b, g)),
    ]
}

/// What the service should hold: friendships and pending requests.
#[derive(Default)]
struct Model {
    friends: BTreeSet<(usize, usize)>,
    /// (to, from)
    requests: BTreeSet<(usize, usize)>,
}

impl Model {
    fn pair(a: usize, b: usize) -> (usize, usize) {
        (a.min(b), a.max(b))
    }

    /// Whether the op should succeed; applies it if so.
    fn apply(&mut self, op: &Op) -> bool {
        match *op {
            Op::Request(a, b, _) => {
                let ok = a != b && !self.friends.contains(&Self::pair(a, b));
                if ok {
                    self.requests.insert((b, a));
                }
                ok
            }
            Op::Accept(a, b, _) => {
                let ok =
                    self.requests.contains(&(a, b)) && !self.friends.contains(&Self::pair(a, b));
                if ok {
                    self.requests.remove(&(a, b));
                    self.requests.remove(&(b, a));
                    self.friends.insert(Self::pair(a, b));
                }
                ok
            }
            Op::Reject(a, b) => self.requests.remove(&(a, b)),
            Op::Remove(a, b) => a != b && self.friends.remove(&Self::pair(a, b)),
            Op::Move(a, b, _) => a != b && self.friends.contains(&Self::pair(a, b)),
        }
    }
}

fn request(op: &Op, ids: &[u64]) -> RequestBody {
    let group = |g: u8| format!("group {g}").into_bytes();
    match *op {
        Op::Request(a, b, g) => RequestBody::FriendRequest {
            from: ids[a],
            to: ids[b],
            group: group(g),
        },
        Op::Accept(a, b, g) => RequestBody::FriendAccept {
            user: ids[a],
            from: ids[b],
            group: group(g),
        },
        Op::Reject(a, b) => RequestBody::FriendReject {
            user: ids[a],
            from: ids[b],
        },
        Op::Remove(a, b) => RequestBody::FriendRemove {
            user: ids[a],
            friend: ids[b],
        },
        Op::Move(a, b, g) => RequestBody::FriendMove {
            user: ids[a],
            friend: ids[b],
            group: group(g),
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn friendships_stay_mutual(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let t = common::open(|_| {});
            let ids = common::import(&t.service, USERS).await;
            let index: BTreeMap<u64, usize> = ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
            let mut model = Model::default();
            for op in &ops {
                let expected = model.apply(op);
                let got = t.service.handle(request(op, &ids)).await;
                let ok = !matches!(got, ResponseBody::Error(_));
                prop_assert_eq!(ok, expected, "{:?} -> {:?}", op, got);
            }
            let store = t.service.store();
            let mut seen = BTreeSet::new();
            for (user, list) in store.friend_lists().unwrap() {
                let mut members = BTreeSet::new();
                for g in &list.groups {
                    for m in &g.members {
                        prop_assert!(members.insert(*m), "friend {} of {} in two groups", m, user);
                        let other = store.friend_lists().unwrap().into_iter()
                            .find(|(u, _)| u == m).map(|(_, l)| l).unwrap_or_default();
                        prop_assert!(other.contains(user), "{} lists {} but not back", user, m);
                        seen.insert(Model::pair(index[&user], index[m]));
                    }
                }
            }
            prop_assert_eq!(&seen, &model.friends);
            let pending: BTreeSet<(usize, usize)> = store.pending_requests().unwrap().into_iter()
                .map(|(to, from)| (index[&to], index[&from])).collect();
            prop_assert_eq!(&pending, &model.requests);
            Ok(())
        })?;
    }
}
