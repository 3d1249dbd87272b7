//! Model tests of the presence state: random sequences of online, offline,
//! replace, watch, unwatch, sync and gateway expiry, checked against a
//! plain model after every step (lookups, answers and the exact events).

use presence::{
    state::{GatewayIndex, Outgoing, State},
    table::SHARDS,
    Limits,
};
use proptest::prelude::*;
use proto::presence::{Entry, ErrorCode, Event, SessionInfo, Status};
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::{Duration, Instant},
};

const GATEWAYS: u32 = 3;
const USERS: u64 = 12;
const GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
enum Op {
    Online(u32, u64, u64, Status),
    Offline(u32, u64, u64),
    Watch(u32, u64, Vec<u64>),
    Unwatch(u32, u64, Vec<u64>),
    /// The gateway's connection drops and its grace runs out; it registers
    /// again afterwards.
    Expire(u32),
    /// The gateway sends a complete session list.
    Resync(u32, Vec<(u64, u64)>),
}

fn status() -> impl Strategy<Value = Status> {
    prop_oneof![Just(Status::Online), Just(Status::Away), Just(Status::Busy)]
}

fn op() -> impl Strategy<Value = Op> {
    let g = 1..=GATEWAYS;
    let users = proptest::collection::vec(0..USERS, 0..4);
    prop_oneof![
        4 => (g.clone(), 0..USERS, 0u64..4, status()).prop_map(|(g, u, s, st)| Op::Online(g, u, s, st)),
        2 => (g.clone(), 0..USERS, 0u64..4).prop_map(|(g, u, s)| Op::Offline(g, u, s)),
        2 => (g.clone(), 0u64..4, users.clone()).prop_map(|(g, s, u)| Op::Watch(g, s, u)),
        1 => (g.clone(), 0u64..4, users).prop_map(|(g, s, u)| Op::Unwatch(g, s, u)),
        1 => g.clone().prop_map(Op::Expire),
        1 => (g, proptest::collection::vec((0..USERS, 0u64..4), 0..5)).prop_map(|(g, l)| Op::Resync(g, l)),
    ]
}

/// What the state should hold.
#[derive(Default)]
struct Model {
    /// user -> (gateway id, entry)
    online: BTreeMap<u64, Entry>,
    /// (gateway id, session) -> watched users
    watches: BTreeMap<(u32, u64), BTreeSet<u64>>,
    events: Vec<(u32, Event)>,
}

impl Model {
    fn end_session(&mut self, gateway: u32, session: u64) {
        self.watches.remove(&(gateway, session));
    }

    fn notify(&mut self, user: u64, entry: Option<Entry>) {
        let mut by_gateway: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for ((g, s), users) in &self.watches {
            if users.contains(&user) {
                by_gateway.entry(*g).or_default().push(*s);
            }
        }
        for (g, sessions) in by_gateway {
            self.events.push((
                g,
                Event::StatusChanged {
                    user,
                    entry,
                    sessions,
                },
            ));
        }
    }

    fn remove(&mut self, user: u64) {
        let old = self.online.remove(&user).expect("present");
        self.end_session(old.gateway, old.session);
        self.notify(user, None);
    }

    /// Write `entry` for `user`, kicking a different session.
    fn put(&mut self, user: u64, entry: Entry) {
        let previous = self.online.get(&user).copied();
        if let Some(p) = previous {
            if (p.gateway, p.session) != (entry.gateway, entry.session) {
                self.end_session(p.gateway, p.session);
                self.events.push((
                    p.gateway,
                    Event::Kicked {
                        user,
                        session: p.session,
                    },
                ));
            }
        }
        self.online.insert(user, entry);
        if previous != Some(entry) {
            self.notify(user, Some(entry));
        }
    }

    fn online(&mut self, g: u32, user: u64, session: u64, status: Status, now_s: u32) {
        let since_s = match self.online.get(&user) {
            Some(p) if (p.gateway, p.session) == (g, session) => p.since_s,
            _ => now_s,
        };
        let entry = Entry {
            gateway: g,
            session,
            since_s,
            status,
        };
        self.put(user, entry);
    }
}

struct Harness {
    state: State,
    index: HashMap<u32, GatewayIndex>,
    next_conn: u64,
}

impl Harness {
    fn register(&mut self, g: u32) {
        self.next_conn += 1;
        let r = self
            .state
            .register(g, format!("gw{g}"), self.next_conn)
            .unwrap();
        self.index.insert(g, r.index);
    }

    /// Events as (gateway id, event with sorted sessions), sorted.
    fn events(&mut self, skip: Option<u32>) -> Vec<(u32, Event)> {
        let by_index: HashMap<GatewayIndex, u32> =
            self.index.iter().map(|(g, i)| (*i, *g)).collect();
        let events: Vec<Outgoing> = self.state.take_events();
        let mut out: Vec<(u32, Event)> = events
            .into_iter()
            .filter_map(|o| by_index.get(&o.gateway).map(|g| (*g, o.event)))
            .filter(|(g, _)| Some(*g) != skip)
            .collect();
        normalise(&mut out);
        out
    }
}

fn normalise(events: &mut [(u32, Event)]) {
    for (_, e) in events.iter_mut() {
        if let Event::StatusChanged { sessions, .. } = e {
            sessions.sort_unstable();
        }
    }
    events.sort_by_key(|e| format!("{e:?}"));
}

/// Drop the sessions in `removed` from StatusChanged events (and events
/// left without sessions).
fn without_sessions(events: &mut Vec<(u32, Event)>, removed: &[(u32, u64)]) {
    for (g, e) in events.iter_mut() {
        if let Event::StatusChanged { sessions, .. } = e {
            sessions.retain(|s| !removed.contains(&(*g, *s)));
        }
    }
    events.retain(
        |(_, e)| !matches!(e, Event::StatusChanged { sessions, .. } if sessions.is_empty()),
    );
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut h = Harness {
        state: State::new(Limits::default(), GRACE),
        index: HashMap::new(),
        next_conn: 0,
    };
    for g in 1..=GATEWAYS {
        h.register(g);
    }
    let mut m = Model::default();
    let t0 = Instant::now();
    for (step, op) in ops.into_iter().enumerate() {
        let now_s = step as u32;
        let mut skip = None;
        let mut removed_sessions: Vec<(u32, u64)> = Vec::new();
        match op {
            Op::Online(g, u, s, st) => {
                let replaced = h.state.online(h.index[&g], u, s, st, now_s).unwrap();
                let expected = m
                    .online
                    .get(&u)
                    .filter(|p| (p.gateway, p.session) != (g, s))
                    .copied();
                prop_assert_eq!(replaced, expected);
                m.online(g, u, s, st, now_s);
            }
            Op::Offline(g, u, s) => {
                let removed = h.state.offline(h.index[&g], u, s);
                let current = m
                    .online
                    .get(&u)
                    .is_some_and(|p| (p.gateway, p.session) == (g, s));
                prop_assert_eq!(removed, current);
                if current {
                    m.remove(u);
                } else {
                    m.end_session(g, s);
                }
            }
            Op::Watch(g, s, users) => {
                let entries = h.state.watch(h.index[&g], s, &users).unwrap();
                let expected: Vec<Option<Entry>> =
                    users.iter().map(|u| m.online.get(u).copied()).collect();
                prop_assert_eq!(entries, expected);
                m.watches.entry((g, s)).or_default().extend(users);
            }
            Op::Unwatch(g, s, users) => {
                let removed = h.state.unwatch(h.index[&g], s, &users).unwrap();
                let set = m.watches.entry((g, s)).or_default();
                let before = set.len();
                set.retain(|u| !users.contains(u));
                prop_assert_eq!(removed as usize, before - set.len());
                if set.is_empty() {
                    m.watches.remove(&(g, s));
                }
            }
            Op::Expire(g) => {
                let index = h.index[&g];
                h.state.disconnected(index, h.next_conn_of(g), t0);
                let due = h.state.start_expiries(t0 + GRACE);
                prop_assert_eq!(&due, &vec![index]);
                for shard in 0..SHARDS {
                    h.state.remove_gateway_slots(index, shard, None);
                }
                h.state.finish_expiry(index);
                skip = Some(g);
                let users: Vec<u64> = m
                    .online
                    .iter()
                    .filter(|(_, e)| e.gateway == g)
                    .map(|(u, _)| *u)
                    .collect();
                for u in users {
                    m.remove(u);
                }
                m.watches.retain(|(wg, _), _| *wg != g);
                m.events.retain(|(eg, _)| *eg != g);
            }
            Op::Resync(g, list) => {
                let index = h.index[&g];
                h.state.sync_begin(index);
                let mut listed = BTreeMap::new();
                for (u, s) in list {
                    listed.insert(u, s);
                }
                let infos: Vec<SessionInfo> = listed
                    .iter()
                    .map(|(&user, &session)| SessionInfo {
                        user,
                        session,
                        since_s: 1,
                        status: Status::Online,
                    })
                    .collect();
                h.state.sync_sessions(index, &infos).unwrap();
                let mark = h.state.sync_end(index).unwrap();
                for shard in 0..SHARDS {
                    h.state.remove_gateway_slots(index, shard, Some(mark));
                }
                for info in &infos {
                    match m.online.get(&info.user) {
                        Some(p) if p.gateway != g => {
                            // The refused session is told to close: its
                            // watches end.
                            m.end_session(g, info.session);
                            m.events.push((
                                g,
                                Event::Kicked {
                                    user: info.user,
                                    session: info.session,
                                },
                            ))
                        }
                        _ => m.put(
                            info.user,
                            Entry {
                                gateway: g,
                                session: info.session,
                                since_s: 1,
                                status: Status::Online,
                            },
                        ),
                    }
                }
                let stale: Vec<u64> = m
                    .online
                    .iter()
                    .filter(|(u, e)| e.gateway == g && !listed.contains_key(u))
                    .map(|(u, _)| *u)
                    .collect();
                // The removals run in table order: whether a removed
                // session hears of another removed user first depends on
                // it, so events to removed sessions are left out below.
                for u in stale {
                    removed_sessions.push((g, m.online[&u].session));
                    m.remove(u);
                }
            }
        }
        let mut actual = h.events(skip);
        let mut expected = std::mem::take(&mut m.events);
        normalise(&mut expected);
        without_sessions(&mut actual, &removed_sessions);
        without_sessions(&mut expected, &removed_sessions);
        prop_assert_eq!(actual, expected);
        if let Some(g) = skip {
            h.register(g);
        }
        h.state.check_invariants();
        let users: Vec<u64> = (0..USERS).collect();
        let looked = h.state.lookup(&users).unwrap();
        let expected: Vec<Option<Entry>> = users.iter().map(|u| m.online.get(u).copied()).collect();
        prop_assert_eq!(looked, expected);
        let stats = h.state.stats();
        prop_assert_eq!(stats.users_online, m.online.len() as u64);
        let watches: usize = m.watches.values().map(BTreeSet::len).sum();
        prop_assert_eq!(stats.watches, watches as u64);
    }
    Ok(())
}

impl Harness {
    /// The connection id the gateway registered with last.
    fn next_conn_of(&self, g: u32) -> u64 {
        self.state
            .connection_of(self.index[&g])
            .expect("a registered gateway has a connection")
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
    #[test]
    fn state_agrees_with_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops)?;
    }
}

fn code<T: std::fmt::Debug>(r: Result<T, proto::presence::PresenceError>) -> ErrorCode {
    r.unwrap_err().code
}

#[test]
fn limits_answer_typed_errors() {
    let limits = Limits {
        users_max: 2,
        watchers_per_user_max: 1,
        watches_per_session_max: 2,
        watches_max: 3,
        batch_users_max: 3,
        gateways_max: 1,
    };
    let mut state = State::new(limits, GRACE);
    let g = state.register(1, String::new(), 1).unwrap().index;
    assert_eq!(
        code(state.register(2, String::new(), 2)),
        ErrorCode::GatewaysFull
    );
    assert_eq!(
        code(state.register(1, "x".repeat(300), 2)),
        ErrorCode::BadRequest
    );
    state.online(g, 1, 1, Status::Online, 0).unwrap();
    state.online(g, 2, 2, Status::Online, 0).unwrap();
    assert_eq!(
        code(state.online(g, 3, 3, Status::Online, 0)),
        ErrorCode::TableFull
    );
    // A user already online may still change.
    state.online(g, 2, 2, Status::Away, 0).unwrap();
    assert_eq!(code(state.lookup(&[1, 2, 3, 4])), ErrorCode::BatchTooLarge);
    assert_eq!(code(state.watch(g, 9, &[5, 6, 7])), ErrorCode::WatchesFull);
    state.watch(g, 9, &[5, 6]).unwrap();
    assert_eq!(code(state.watch(g, 10, &[5])), ErrorCode::WatchersFull);
    state.watch(g, 10, &[7]).unwrap();
    assert_eq!(
        code(state.watch(g, 11, &[8])),
        ErrorCode::WatchesFull,
        "three watches in all"
    );
    assert_eq!(
        code(state.sync_sessions(g, &[])),
        ErrorCode::BadRequest,
        "SyncSessions without SyncBegin"
    );
    state.check_invariants();
}

#[test]
fn a_gateway_that_registers_again_in_time_keeps_its_users() {
    let mut state = State::new(Limits::default(), GRACE);
    let g = state.register(1, String::new(), 1).unwrap().index;
    state.online(g, 5, 50, Status::Online, 0).unwrap();
    let t0 = Instant::now();
    state.disconnected(g, 1, t0);
    let again = state.register(1, String::new(), 2).unwrap();
    assert_eq!(again.index, g);
    assert_eq!(again.replaced_connection, None);
    assert!(state.start_expiries(t0 + GRACE * 2).is_empty());
    assert!(state.lookup(&[5]).unwrap()[0].is_some());
}
