//! A deterministic world for the gateway's router, in the style of
//! quinn-proto's `tests/util.rs`: virtual time, one or more routers (each
//! behind a fake session endpoint), model services (a shard's mailboxes,
//! profile's relations, presence) with scripted latencies and faults, and
//! model clients that follow docs/PROTOCOL.md §6.4 (an outbox re-sent in
//! order with the same ids; `proto::inbox::Inbox` to show what arrives).
//! Chat groups (§6.7): the model profile keeps groups (members, their read
//! cursors, a version) that a test changes mid-run, pushing `GroupChanged`
//! to every router after a scripted delay; a group's mailbox is a mailbox
//! keyed by the group id; group forwards go to the router presence names,
//! one per router, counted; model clients keep one `Inbox` per group.
//! The model shard answers a store with a re-sent item as `AppendBatchOnce`
//! does (§1.3: a live record of the item's msg_id stored within
//! `GROUP_RESEND_WINDOW_MS` is answered, not stored again), and a group's
//! mailbox keeps what every member read for that window, as the gateway's
//! `Expire` does (§6.7).
//! Nothing here reads a clock or touches a socket: a seed replays a run
//! exactly.
#![allow(dead_code)]

use gateway::{
    router::{
        Action, Answer, CallEffects, LoginOk, LoginOutcome, Now, Router, RouterConfig, Sessions,
        StoreItem,
    },
    services::GROUP_RESEND_WINDOW_MS,
};
use proto::{
    app::{
        self, AppError, AppErrorCode, Call, ClientMessage, Delivery, GatewayMessage, GroupSummary,
        Login, LoginAccepted, LoginAnswer, LoginError, LoginMethod, Reply, StoredEnvelope,
        FETCH_COUNT_MAX,
    },
    groups::{is_group, GroupInfo, GroupMember, GroupRole, GROUP_ID_BASE},
    inbox::{Inbox, InboxConfig, InboxRequest},
    peer::{Forward, GroupForward},
    profile::Relations,
    session::{CloseReason, Event, MsgId, PendingId, SendError, ServerEvent},
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    time::{Duration, Instant},
};

pub const MS: Duration = Duration::from_millis(1);
/// A client gives up on a request's reply after this long (sends are
/// re-sent with the same id, other requests fail).
pub const CLIENT_REQUEST_TIMEOUT: Duration = Duration::from_secs(8);
/// A client re-sends a send refused with a retryable error after this long.
pub const CLIENT_RETRY_DELAY: Duration = Duration::from_millis(300);
/// Sends a client keeps on the wire at most.
pub const CLIENT_SENDS_IN_FLIGHT: usize = 16;
/// The driver's bound on every service call (`timers.service_timeout_ms`).
pub const SERVICE_TIMEOUT: Duration = Duration::from_secs(3);
/// Bytes one fake session queues for its client at most (the session
/// layer's `send_queue_bytes_max`, small here to reach it).
pub const SESSION_QUEUE_BYTES: usize = 8192;
/// The page a model client asks for (well below the session queue, as the
/// real 48 KiB page is below the real 1 MiB queue).
pub const FETCH_BYTES: u32 = 2048;
/// How late past `send_answer` a reply may be: the world's step.
pub const ANSWER_SLACK: Duration = Duration::from_millis(10);
/// A client silent this long loses its session (the retry budget).
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(6);

pub fn config() -> RouterConfig {
    RouterConfig {
        sessions_max: 1000,
        pending_logins_max: 100,
        requests_in_flight_per_session_max: 64,
        messages_per_user_per_s: 1000,
        messages_burst: 1000,
        dedupe_entries_max: 100_000,
        relations_cache_bytes_max: 1 << 20,
        group_cache_bytes_max: 1 << 20,
        allow_strangers: false,
        send_answer: Duration::from_secs(2),
        retry_hold: Duration::from_secs(10),
        store_batch_items_max: 8,
        store_batch_bytes_max: 64 * 1024,
    }
}

// ---- the fake endpoint ------------------------------------------------------

/// A session as the router sees it: what it sent, not yet read by the
/// client.
pub struct FakeSession {
    pub user: u64,
    /// (message, bytes, when it was queued).
    pub to_client: VecDeque<(MsgId, Vec<u8>, Instant)>,
    queued_bytes: usize,
    next_mid: MsgId,
    /// When each request (by id) reached the router, for the answer bound.
    arrived: BTreeMap<u32, Instant>,
}

/// Sessions of one gateway, and what the router did to them.
pub struct FakeEndpoint {
    pub sessions: BTreeMap<u64, FakeSession>,
    next_session: u64,
    /// Decided logins: pending -> Some(session) accepted, None rejected
    /// with the answer.
    pub decided: Vec<(PendingId, Option<u64>, Vec<u8>)>,
    /// Sessions the router closed.
    pub closed: Vec<u64>,
    /// Closed, the router not yet told.
    closed_pending: Vec<u64>,
    /// Sends answered later than the bound: (session, id, how late).
    pub late_answers: Vec<(u64, u32, Duration)>,
    pub now: Instant,
    pub send_answer: Duration,
    /// Pending logins still undecided.
    pub pending: BTreeSet<PendingId>,
}

impl FakeEndpoint {
    fn new(first_session: u64, now: Instant, send_answer: Duration) -> FakeEndpoint {
        FakeEndpoint {
            sessions: BTreeMap::new(),
            next_session: first_session,
            decided: Vec::new(),
            closed: Vec::new(),
            closed_pending: Vec::new(),
            late_answers: Vec::new(),
            now,
            send_answer,
            pending: BTreeSet::new(),
        }
    }
}

impl Sessions for FakeEndpoint {
    fn fresh_session_id(&mut self) -> u64 {
        self.next_session += 1;
        self.next_session
    }

    fn accept(&mut self, _now: Instant, pending: PendingId, session: u64, answer: &[u8]) -> bool {
        if !self.pending.remove(&pending) {
            return false;
        }
        let Ok(LoginAnswer::Accepted(a)) = app::decode::<LoginAnswer>(answer) else {
            panic!("accepted with a refusal");
        };
        self.sessions.insert(
            session,
            FakeSession {
                user: a.user,
                to_client: VecDeque::new(),
                queued_bytes: 0,
                next_mid: 0,
                arrived: BTreeMap::new(),
            },
        );
        self.decided.push((pending, Some(session), answer.to_vec()));
        true
    }

    fn reject(&mut self, pending: PendingId, answer: &[u8]) {
        if self.pending.remove(&pending) {
            self.decided.push((pending, None, answer.to_vec()));
        }
    }

    fn send(&mut self, session: u64, bytes: Vec<u8>) -> Result<MsgId, SendError> {
        let Some(s) = self.sessions.get_mut(&session) else {
            return Err(SendError::UnknownSession);
        };
        if s.queued_bytes + bytes.len() > SESSION_QUEUE_BYTES {
            return Err(SendError::QueueFull);
        }
        if let Ok(GatewayMessage::Reply { id, .. }) = app::decode::<GatewayMessage>(&bytes) {
            if let Some(at) = s.arrived.remove(&id) {
                let took = self.now - at;
                // One step of the world's clock is the timer's granularity.
                if took > self.send_answer + ANSWER_SLACK {
                    self.late_answers
                        .push((session, id, took - self.send_answer));
                }
            }
        }
        let mid = s.next_mid;
        s.next_mid += 1;
        s.queued_bytes += bytes.len();
        s.to_client.push_back((mid, bytes, self.now));
        Ok(mid)
    }

    fn close(&mut self, session: u64) {
        if self.sessions.remove(&session).is_some() {
            self.closed.push(session);
            self.closed_pending.push(session);
        }
    }
}

// ---- model services ----------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Record {
    pub seq: u64,
    pub msg_id: u128,
    pub envelope: StoredEnvelope,
    /// The gateway whose store appended it.
    pub by: usize,
    /// When the shard applied it.
    pub at: Instant,
    /// When the router asked for the store (`Action::Store`).
    pub issued: Instant,
    /// The connection it came on: (gateway, its generation).
    pub link: (usize, u64),
    /// Its store was an `AppendBatchOnce` (an item of it was re-sent).
    pub once: bool,
    /// An earlier record of the mailbox has its msg_id: why the shard
    /// stored it again.
    pub copy: Option<Repeat>,
}

/// Why the model shard stored a record whose msg_id an earlier record of
/// the mailbox has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repeat {
    /// An `AppendBatchOnce` found no live record of it stored within
    /// `GROUP_RESEND_WINDOW_MS` (the first copy was deleted, or is older).
    PastWindow,
    /// A plain `AppendBatch` (no item of it re-sent): the shard does not
    /// look.
    Plain,
}

#[derive(Debug, Default)]
pub struct MailboxModel {
    pub records: Vec<Record>,
    pub acked: u64,
}

impl MailboxModel {
    pub fn last_seq(&self) -> u64 {
        self.records.last().map_or(0, |r| r.seq)
    }

    fn live(&self) -> impl Iterator<Item = &Record> {
        let acked = self.acked;
        self.records.iter().filter(move |r| r.seq > acked)
    }

    /// The shard's `Expire{before, up_to_seq}`: delete the leading run of
    /// live records stored before `before` with a seq at most `up_to`.
    fn expire(&mut self, before: Instant, up_to: u64) {
        let acked = self.acked;
        if let Some(last) = self
            .live()
            .take_while(|r| r.at < before && r.seq <= up_to)
            .last()
        {
            self.acked = acked.max(last.seq);
        }
    }

    /// Records that repeat an earlier record's (from, msg_id), in seq
    /// order: (the first copy, the repeat).
    pub fn second_copies(&self) -> Vec<(&Record, &Record)> {
        let mut first: BTreeMap<(u64, u128), &Record> = BTreeMap::new();
        let mut out = Vec::new();
        for r in &self.records {
            match first.get(&(r.envelope.from, r.msg_id)) {
                Some(f) => out.push((*f, r)),
                None => {
                    first.insert((r.envelope.from, r.msg_id), r);
                }
            }
        }
        out
    }
}

/// How a service behaves right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Up,
    /// Refuses at once (a dead shard: connection refused).
    Down,
    /// Takes every request and answers none (a paused process): the
    /// driver gives up after `SERVICE_TIMEOUT`; the work is done later,
    /// when it is up again, or never.
    Hung,
}

/// Faults the world injects; all off by default.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Chance that a store is applied but its answer lost (the driver then
    /// answers `Unavailable` at its timeout, `SERVICE_TIMEOUT` after it
    /// asked).
    pub store_answer_lost: f64,
    /// Chance that a fetch or ack fails.
    pub read_failure: f64,
    /// Chance that a relations read fails.
    pub relations_failure: f64,
    /// Chance that a group read (`LoadGroup`) fails.
    pub group_failure: f64,
    /// Service latency range (ms).
    pub latency_ms: (u64, u64),
}

struct InFlight {
    due: Instant,
    gateway: usize,
    generation: u64,
    work: Work,
}

enum Work {
    /// Answer this at `due`.
    Answer(Answer),
    /// A store to apply at `due` (then answer; if `lose_answer`,
    /// `Unavailable` at the driver's timeout instead).
    Store {
        batch: u64,
        to: u64,
        items: Vec<StoreItem>,
        lose_answer: bool,
        asked: StoreAsked,
    },
    /// A hung store: applied when the shard is up again (if ever), with
    /// every other one, in the order asked ([`World::shard_resumed`]).
    HungStore {
        to: u64,
        items: Vec<StoreItem>,
        asked: StoreAsked,
    },
    Notify {
        to: u64,
        deliveries: Vec<Delivery>,
    },
    /// A group message for members without a session on the gateway that
    /// stored it: presence is asked, one forward per other gateway.
    GroupNotify {
        forward: GroupForward,
    },
    /// Profile's push reaches the gateway.
    ProfileEvent(proto::profile::Event),
}

/// How and when the router asked for a store.
#[derive(Debug, Clone, Copy)]
struct StoreAsked {
    at: Instant,
    /// (gateway, generation): one connection to the shard.
    link: (usize, u64),
    /// Stores asked of the shard before this one.
    order: u64,
    /// `AppendBatchOnce`'s `since_ms` (the driver's: an item is re-sent),
    /// as wall-clock ms.
    once_since_ms: Option<u64>,
}

// ---- the model profile's groups --------------------------------------------

/// A group as the model profile service keeps it.
#[derive(Debug, Clone, Default)]
pub struct GroupModel {
    /// Bumped by every membership change.
    pub version: u64,
    /// Member -> read cursor (every group seq up to it was read).
    pub members: BTreeMap<u64, u64>,
    /// Member -> its cursor when it joined (0 for a founding member): it
    /// reads what is stored after.
    pub joined_at: BTreeMap<u64, u64>,
    /// Users removed (or who left) at some point.
    pub removed: BTreeSet<u64>,
}

// ---- model clients -----------------------------------------------------------

#[derive(Debug, Clone)]
pub struct OutMsg {
    pub to: u64,
    pub msg_id: u128,
    pub body: Vec<u8>,
    request: Option<u32>,
    retry_at: Option<Instant>,
    /// Put on the wire before (a group send says so: `resend`).
    sent_before: bool,
}

#[derive(Debug, Clone, Copy)]
enum ReqKind {
    Send(u128),
    Fetch,
    Ack(u64),
    Other,
    /// `Call::Groups`: (re)start the group inboxes.
    Groups,
    GroupFetch(u64),
    /// (group, up_to_seq).
    GroupAck(u64, u64),
    /// A call a test made itself: the reply is kept in `replies`.
    Raw,
}

/// The receiving side of one group, as a client keeps it (§6.7): an
/// `Inbox` started at each login from `Groups` (`shown = read_seq`), fed by
/// `GroupDeliver` and `GroupFetch` pages, acknowledged with `GroupAck`.
#[derive(Debug)]
pub struct GroupInbox {
    pub inbox: Inbox,
    /// Started in this session (the `Groups` reply listed it).
    pub started: bool,
    /// Pushes that came before the inbox was started, fed to it then.
    early: Vec<Delivery>,
    /// What the client showed of the group, in order.
    pub shown: Vec<Delivery>,
    /// Seqs a page said were gone (`dropped`).
    pub dropped: u64,
}

impl GroupInbox {
    fn new() -> GroupInbox {
        GroupInbox {
            inbox: new_inbox(),
            started: false,
            early: Vec::new(),
            shown: Vec::new(),
            dropped: 0,
        }
    }
}

fn new_inbox() -> Inbox {
    Inbox::new(InboxConfig {
        fetch_bytes_max: FETCH_BYTES,
        ..InboxConfig::default()
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    Offline,
    LoggingIn(PendingId, usize),
    Online(u64, usize),
}

pub struct ClientModel {
    pub user: u64,
    pub state: ClientState,
    /// Where it logs in next.
    pub gateway: usize,
    pub paused: bool,
    /// Silent since (paused or offline): a session silent for
    /// `SESSION_TIMEOUT` is lost.
    silent_since: Option<Instant>,
    pub want_online: bool,
    outbox: BTreeMap<u64, OutMsg>,
    next_out: u64,
    next_req: u32,
    requests: BTreeMap<u32, (ReqKind, Instant)>,
    pub inbox: Inbox,
    /// What the client showed, in order.
    pub shown: Vec<Delivery>,
    /// Sends answered `Sent`: msg_id -> seq.
    pub sent: BTreeMap<u128, u64>,
    /// Sends answered with a final error: msg_id -> code.
    pub refused: BTreeMap<u128, AppErrorCode>,
    /// What the application sent, in order: (to, msg_id).
    pub app_sends: Vec<(u64, u128)>,
    /// Every push other than a delivery or a reply.
    pub pushes: Vec<GatewayMessage>,
    pub kicked: bool,
    pub logins_refused: Vec<LoginError>,
    /// One inbox per group this client heard of.
    pub groups: BTreeMap<u64, GroupInbox>,
    /// `Groups` must be read (after a login, a `GroupChanged`, a refusal).
    groups_wanted: bool,
    groups_retry_at: Option<Instant>,
    /// Every `GroupDeliver` that reached the client: (group, delivery,
    /// when), shown or not.
    pub group_received: Vec<(u64, Delivery, Instant)>,
    /// Replies to the calls a test made itself ([`World::call`]), by id.
    pub replies: BTreeMap<u32, Result<Reply, AppError>>,
    /// A group message put on the wire again says `resend` (as the SDK
    /// does); `false`: a client that does not.
    pub says_resend: bool,
}

impl ClientModel {
    fn new(user: u64, gateway: usize) -> ClientModel {
        ClientModel {
            user,
            state: ClientState::Offline,
            gateway,
            paused: false,
            silent_since: None,
            want_online: true,
            outbox: BTreeMap::new(),
            next_out: 0,
            next_req: 0,
            requests: BTreeMap::new(),
            inbox: new_inbox(),
            shown: Vec::new(),
            sent: BTreeMap::new(),
            refused: BTreeMap::new(),
            app_sends: Vec::new(),
            pushes: Vec::new(),
            kicked: false,
            logins_refused: Vec::new(),
            groups: BTreeMap::new(),
            groups_wanted: false,
            groups_retry_at: None,
            group_received: Vec::new(),
            replies: BTreeMap::new(),
            says_resend: true,
        }
    }

    /// What the client showed of `group`: (from, msg_id), in order.
    pub fn group_shown(&self, group: u64) -> Vec<(u64, u128)> {
        self.groups.get(&group).map_or(Vec::new(), |g| {
            g.shown.iter().map(|d| (d.from, d.msg_id)).collect()
        })
    }

    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    pub fn session(&self) -> Option<(u64, usize)> {
        match self.state {
            ClientState::Online(s, g) => Some((s, g)),
            _ => None,
        }
    }
}

// ---- the world -----------------------------------------------------------------

pub struct Gateway {
    pub router: Router,
    pub endpoint: FakeEndpoint,
    /// Bumped when the gateway dies: its in-flight work is forgotten.
    generation: u64,
}

pub struct World {
    pub now: Instant,
    start_wall_ms: u64,
    start: Instant,
    pub rng: ChaCha8Rng,
    pub gateways: Vec<Gateway>,
    pub mailboxes: BTreeMap<u64, MailboxModel>,
    pub relations: BTreeMap<u64, Relations>,
    pub passwords_ok: bool,
    /// user -> (gateway, session).
    pub presence: BTreeMap<u64, (usize, u64)>,
    pub clients: BTreeMap<u64, ClientModel>,
    inflight: Vec<InFlight>,
    pub shard: Health,
    pub profile: Health,
    pub faults: Faults,
    pub config: RouterConfig,
    /// One-way delay between clients and gateways (both directions).
    pub link_delay: Duration,
    /// Client messages on their way to a gateway: (due, gateway, session,
    /// bytes), in order.
    uplink: VecDeque<(Instant, usize, u64, Vec<u8>)>,
    /// Actions the routers asked for, by kind (for "no round trip per
    /// message" checks).
    pub action_counts: BTreeMap<&'static str, u64>,
    next_pending: u64,
    next_msg_id: u128,
    /// Sends on their way: (gateway, session, request id).
    pending_sends: BTreeMap<(usize, u64, u32), ()>,
    /// The model profile's groups, by id.
    pub groups: BTreeMap<u64, GroupModel>,
    /// How long profile's `GroupChanged` takes to reach each gateway.
    pub group_event_delay: Duration,
    /// Each `GroupChanged` a router processed: (gateway, group, version,
    /// when).
    pub group_events_seen: Vec<(usize, u64, u64, Instant)>,
    /// Group forwards made: (group, seq, receiving gateway) -> how many.
    pub group_forwards: BTreeMap<(u64, u64, usize), u32>,
    /// When each message (by msg_id) first reached a gateway, and which.
    pub send_arrivals: BTreeMap<u128, (usize, Instant)>,
    /// Items of `AppendBatchOnce` stores answered with the seq of a record
    /// the mailbox held already (a re-send not stored again): (mailbox,
    /// seq) -> how many.
    pub stored_once: BTreeMap<(u64, u64), u32>,
    stores_asked: u64,
}

impl World {
    /// One random fault, or a repair (the schedules of `router_faults` and
    /// `router_groups`).
    pub fn random_fault(&mut self, users: u64) {
        let user = self.rng.gen_range(1..=users);
        match self.rng.gen_range(0..20) {
            0..=2 => {
                let c = self.client(user);
                c.paused = !c.paused;
            }
            3 => self.logout(user),
            4 => self.client(user).want_online = true,
            5 => {
                let c = self.client(user);
                c.gateway = 1 - c.gateway;
                self.logout(user);
                self.client(user).want_online = true;
            }
            6 if self.rng.gen_bool(0.2) => {
                let g = self.rng.gen_range(0..2);
                self.kill_gateway(g);
            }
            7 => self.shard = Health::Down,
            8 if self.rng.gen_bool(0.3) => self.shard = Health::Hung,
            9..=11 => self.shard = Health::Up,
            12 if self.rng.gen_bool(0.3) => self.profile = Health::Hung,
            13..=14 => self.profile = Health::Up,
            _ => {}
        }
    }

    pub fn new(seed: u64, gateways: usize) -> World {
        World::with_config(seed, gateways, config())
    }

    pub fn with_config(seed: u64, gateways: usize, config: RouterConfig) -> World {
        let now = Instant::now();
        let gateways = (0..gateways)
            .map(|i| Gateway {
                router: Router::new(config.clone(), now),
                endpoint: FakeEndpoint::new(i as u64 * 1_000_000, now, config.send_answer),
                generation: 0,
            })
            .collect();
        World {
            now,
            start: now,
            start_wall_ms: 1_700_000_000_000,
            rng: ChaCha8Rng::seed_from_u64(seed),
            gateways,
            mailboxes: BTreeMap::new(),
            relations: BTreeMap::new(),
            passwords_ok: true,
            presence: BTreeMap::new(),
            clients: BTreeMap::new(),
            inflight: Vec::new(),
            shard: Health::Up,
            profile: Health::Up,
            faults: Faults {
                latency_ms: (0, 3),
                ..Faults::default()
            },
            config,
            link_delay: Duration::ZERO,
            uplink: VecDeque::new(),
            action_counts: BTreeMap::new(),
            next_pending: 0,
            next_msg_id: 0,
            pending_sends: BTreeMap::new(),
            groups: BTreeMap::new(),
            group_event_delay: Duration::ZERO,
            group_events_seen: Vec::new(),
            group_forwards: BTreeMap::new(),
            send_arrivals: BTreeMap::new(),
            stored_once: BTreeMap::new(),
            stores_asked: 0,
        }
    }

    fn now_at(&self) -> Now {
        Now {
            at: self.now,
            wall_ms: self.wall_ms(self.now),
        }
    }

    /// The wall clock (ms since the Unix epoch) at `at`, as the shard and
    /// the driver read it.
    pub fn wall_ms(&self, at: Instant) -> u64 {
        self.start_wall_ms + (at - self.start).as_millis() as u64
    }

    /// What a gateway's tidy of `group`'s mailbox deletes (§6.7): what
    /// every member has read, once older than `GROUP_RESEND_WINDOW_MS`.
    /// (The model tidies at every store, page and ack of the group; a
    /// gateway does at most once a minute, so it keeps more, never less.)
    fn tidy_group(&mut self, group: u64) {
        let Some(g) = self.groups.get(&group) else {
            return;
        };
        let read_by_all = g.members.values().copied().min().unwrap_or(0);
        let window = Duration::from_millis(GROUP_RESEND_WINDOW_MS);
        let Some(before) = self.now.checked_sub(window) else {
            return; // nothing is that old
        };
        if let Some(mb) = self.mailboxes.get_mut(&group) {
            mb.expire(before, read_by_all);
        }
    }

    /// A user with an account, on `gateway` when it logs in.
    pub fn user(&mut self, user: u64, gateway: usize) {
        self.relations.insert(
            user,
            Relations {
                user,
                disabled: false,
                credential_epoch: 0,
                version: 1,
                friends: Vec::new(),
                blocked: Vec::new(),
            },
        );
        self.clients.insert(user, ClientModel::new(user, gateway));
    }

    pub fn befriend(&mut self, a: u64, b: u64) {
        for (x, y) in [(a, b), (b, a)] {
            let r = self.relations.get_mut(&x).expect("a user");
            r.friends.push(y);
            r.friends.sort_unstable();
            r.version += 1;
        }
    }

    /// Change `user`'s relations at profile and push the invalidation to
    /// every gateway.
    pub fn change_relations(&mut self, user: u64, change: impl FnOnce(&mut Relations)) {
        let r = self.relations.get_mut(&user).expect("a user");
        change(r);
        r.friends.sort_unstable();
        r.blocked.sort_unstable();
        r.version += 1;
        let event = proto::profile::Event::Invalidate {
            user,
            version: r.version,
        };
        for g in &mut self.gateways {
            g.router.profile_event(event, &mut g.endpoint);
        }
        self.collect_actions();
    }

    pub fn client(&mut self, user: u64) -> &mut ClientModel {
        self.clients.get_mut(&user).expect("a client")
    }

    // ---- groups at the model profile -------------------------------------------

    /// A new group of `members` (cursors 0); its id.
    pub fn group(&mut self, members: &[u64]) -> u64 {
        let id = GROUP_ID_BASE + 1 + self.groups.len() as u64;
        let g = GroupModel {
            version: 1,
            members: members.iter().map(|&u| (u, 0)).collect(),
            joined_at: members.iter().map(|&u| (u, 0)).collect(),
            removed: BTreeSet::new(),
        };
        self.groups.insert(id, g);
        id
    }

    /// Change `group` at profile (its version moves on) and push
    /// `GroupChanged` to every gateway after `group_event_delay`.
    pub fn change_group(&mut self, group: u64, change: impl FnOnce(&mut GroupModel)) {
        let delays = vec![self.group_event_delay; self.gateways.len()];
        self.change_group_with_delays(group, change, &delays);
    }

    /// As [`World::change_group`], the push reaching gateway `i` after
    /// `delays[i]`.
    pub fn change_group_with_delays(
        &mut self,
        group: u64,
        change: impl FnOnce(&mut GroupModel),
        delays: &[Duration],
    ) {
        let g = self.groups.get_mut(&group).expect("a group");
        change(g);
        g.version += 1;
        let version = g.version;
        self.trace(|| format!("group {group} changed: version {version}"));
        let event = proto::profile::Event::GroupChanged { group, version };
        for (i, d) in delays.iter().enumerate() {
            self.schedule(i, self.now + *d, Work::ProfileEvent(event));
        }
    }

    /// `user` joins `group` (its cursor: the group's newest seq now, so it
    /// reads what is stored from now on).
    pub fn group_add(&mut self, group: u64, user: u64) {
        let start = self.mailboxes.get(&group).map_or(0, |m| m.last_seq());
        self.change_group(group, |g| {
            g.members.insert(user, start);
            g.joined_at.insert(user, start);
        });
    }

    /// `user` is removed from `group`.
    pub fn group_remove(&mut self, group: u64, user: u64) {
        self.change_group(group, |g| {
            g.members.remove(&user);
            g.removed.insert(user);
        });
    }

    /// When gateway `g` processed the `GroupChanged` of `group` at
    /// `version` (or a later one).
    pub fn group_change_seen(&self, g: usize, group: u64, version: u64) -> Option<Instant> {
        self.group_events_seen
            .iter()
            .find(|(gg, gr, v, _)| *gg == g && *gr == group && *v >= version)
            .map(|e| e.3)
    }

    /// Group forwards beyond one per store that answered the message to
    /// a router: ((group, seq, receiving gateway), forwards). A re-send the
    /// shard answered with the seq it had stored is pushed and forwarded
    /// again by the router it came to, which cannot tell whether the first
    /// attempt's were (its router may have died before making them).
    pub fn forwards_beyond_stores(&self) -> Vec<((u64, u64, usize), u32)> {
        self.group_forwards
            .iter()
            .filter(|((group, seq, _), n)| {
                **n > 1 + self.stored_once.get(&(*group, *seq)).copied().unwrap_or(0)
            })
            .map(|(k, n)| (*k, *n))
            .collect()
    }

    /// Re-sends the shard answered with a record it held, into `mailbox`.
    pub fn stored_once_into(&self, mailbox: u64) -> u32 {
        self.stored_once
            .iter()
            .filter(|((m, _), _)| *m == mailbox)
            .map(|(_, n)| n)
            .sum()
    }

    fn group_info(&self, group: u64) -> Option<GroupInfo> {
        let g = self.groups.get(&group)?;
        let members = g
            .members
            .iter()
            .map(|(&user, &read_seq)| GroupMember {
                user,
                role: GroupRole::Member,
                read_seq,
            })
            .collect();
        Some(GroupInfo {
            group,
            name: format!("g{}", group - GROUP_ID_BASE),
            topic: String::new(),
            version: g.version,
            created_ms: self.start_wall_ms,
            members,
            joins: Vec::new(),
        })
    }

    /// A call made by the test itself (not the client's own logic); its
    /// reply lands in the client's `replies` under the returned id.
    pub fn call(&mut self, user: u64, call: Call) -> Option<u32> {
        self.request(user, call, ReqKind::Raw)
    }

    /// The application of `from` sends a message to `to`; its msg_id.
    pub fn send(&mut self, from: u64, to: u64, body: &[u8]) -> u128 {
        self.next_msg_id += 1;
        let msg_id = self.next_msg_id;
        let c = self.client(from);
        c.app_sends.push((to, msg_id));
        let key = c.next_out;
        c.next_out += 1;
        c.outbox.insert(
            key,
            OutMsg {
                to,
                msg_id,
                body: body.to_vec(),
                request: None,
                retry_at: None,
                sent_before: false,
            },
        );
        self.client_pump(from);
        msg_id
    }

    /// Run for `d` of virtual time in steps of `step`.
    pub fn run_for(&mut self, d: Duration, step: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.now += step;
            self.tick();
        }
    }

    /// Run until `done` holds (checked every step), at most `limit`.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&World) -> bool) -> bool {
        let end = self.now + limit;
        while self.now < end {
            if done(self) {
                return true;
            }
            self.now += 5 * MS;
            self.tick();
        }
        done(self)
    }

    /// Heal everything and run until every client is online, has sent its
    /// outbox and shown everything in its mailbox.
    pub fn settle(&mut self) {
        self.shard = Health::Up;
        self.profile = Health::Up;
        self.faults = Faults {
            latency_ms: (0, 3),
            ..Faults::default()
        };
        let users: Vec<u64> = self.clients.keys().copied().collect();
        for u in &users {
            let c = self.client(*u);
            c.paused = false;
            c.want_online = true;
            c.kicked = false;
        }
        let settled = self.run_until(Duration::from_secs(120), |w| w.quiet());
        assert!(settled, "the world settled: {}", self.describe());
        // A store a hung shard applied after the gateway gave up on it is
        // pushed to nobody (its sender's retry was stored and pushed
        // instead); the recipient's next login fetches it (a duplicate,
        // dropped). Log everyone in again and check every mailbox drains.
        for u in &users {
            self.logout(*u);
            self.client(*u).want_online = true;
        }
        let drained = self.run_until(Duration::from_secs(120), |w| {
            w.quiet()
                && w.clients.values().all(|c| {
                    w.mailboxes.get(&c.user).is_none_or(|m| {
                        c.inbox.shown_seq() >= m.last_seq() && m.acked >= m.last_seq()
                    })
                })
                && w.groups_drained()
        });
        assert!(drained, "every mailbox drained: {}", self.describe());
    }

    /// Nothing in flight, every client online with its outbox sent and its
    /// inbox caught up and acknowledged (its group inboxes too, one started
    /// for every group it is in).
    fn quiet(&self) -> bool {
        self.inflight.is_empty()
            && self.uplink.is_empty()
            && self.clients.values().all(|c| {
                c.session().is_some()
                    && c.outbox.is_empty()
                    && c.inbox.caught_up()
                    && c.inbox.unacked().is_none()
                    && c.requests.is_empty()
                    && !c.groups_wanted
                    && c.groups.values().filter(|g| g.started).all(|g| {
                        g.inbox.caught_up() && g.inbox.unacked().is_none() && g.early.is_empty()
                    })
                    && self
                        .groups
                        .iter()
                        .filter(|(_, g)| g.members.contains_key(&c.user))
                        .all(|(id, _)| c.groups.get(id).is_some_and(|g| g.started))
            })
    }

    /// Every member of every group showed and acknowledged (its cursor at
    /// profile) everything in the group's mailbox.
    fn groups_drained(&self) -> bool {
        self.groups.iter().all(|(id, g)| {
            let last = self.mailboxes.get(id).map_or(0, |m| m.last_seq());
            g.members.iter().all(|(u, &cursor)| {
                cursor >= last
                    && self.clients[u]
                        .groups
                        .get(id)
                        .is_some_and(|gi| gi.inbox.shown_seq() >= last)
            })
        })
    }

    pub fn describe(&self) -> String {
        let mut out = format!(
            "t={:?} inflight={}\n",
            self.now - self.start,
            self.inflight.len()
        );
        for c in self.clients.values() {
            out += &format!(
                "  user {}: {:?} paused={} outbox={} requests={} shown={} inbox_shown_seq={} caught_up={} mailbox_last={}\n",
                c.user,
                c.state,
                c.paused,
                c.outbox.len(),
                c.requests.len(),
                c.shown.len(),
                c.inbox.shown_seq(),
                c.inbox.caught_up(),
                self.mailboxes.get(&c.user).map_or(0, |m| m.last_seq()),
            );
            for (id, g) in &c.groups {
                out += &format!(
                    "    group {}: started={} shown={} inbox_shown_seq={} caught_up={} early={} mailbox_last={} cursor={:?}\n",
                    id - GROUP_ID_BASE,
                    g.started,
                    g.shown.len(),
                    g.inbox.shown_seq(),
                    g.inbox.caught_up(),
                    g.early.len(),
                    self.mailboxes.get(id).map_or(0, |m| m.last_seq()),
                    self.groups.get(id).and_then(|m| m.members.get(&c.user)),
                );
            }
        }
        out
    }

    /// One step of virtual time.
    pub fn tick(&mut self) {
        self.shard_resumed();
        self.deliver_uplink();
        self.complete_due_work();
        let users: Vec<u64> = self.clients.keys().copied().collect();
        for u in &users {
            self.client_step(*u);
        }
        for g in 0..self.gateways.len() {
            let now = self.now_at();
            let gw = &mut self.gateways[g];
            gw.endpoint.now = self.now;
            if gw.router.poll_timeout() <= self.now {
                gw.router.handle_timeout(now, &mut gw.endpoint);
            }
        }
        self.collect_actions();
    }

    // ---- gateways -------------------------------------------------------------

    /// Gateway `g` dies (SIGKILL) and a fresh one starts in its place: its
    /// sessions and work in flight are gone (a store may have been applied
    /// already); presence forgets its users.
    pub fn kill_gateway(&mut self, g: usize) {
        self.trace(|| format!("kill gw{g}"));
        let now = self.now;
        let gw = &mut self.gateways[g];
        gw.generation += 1;
        gw.router = Router::new(self.config.clone(), self.now);
        let first = gw.endpoint.next_session + 1_000;
        gw.endpoint = FakeEndpoint::new(first, self.now, self.config.send_answer);
        self.presence.retain(|_, (gg, _)| *gg != g);
        for c in self.clients.values_mut() {
            if matches!(c.state, ClientState::Online(_, gg) | ClientState::LoggingIn(_, gg) if gg == g)
            {
                c.state = ClientState::Offline;
                lose_requests(c, now);
            }
        }
    }

    fn feed_event(&mut self, g: usize, event: ServerEvent) {
        let now = self.now_at();
        let gw = &mut self.gateways[g];
        gw.endpoint.now = self.now;
        gw.router.handle_event(now, event, &mut gw.endpoint);
        self.collect_actions();
    }

    /// Take the routers' actions into the world's work in flight.
    fn collect_actions(&mut self) {
        loop {
            let mut progressed = false;
            for g in 0..self.gateways.len() {
                while let Some(session) = self.gateways[g].endpoint.closed_pending.pop() {
                    let now = self.now_at();
                    let gw = &mut self.gateways[g];
                    let event = Event::Closed(CloseReason::Local);
                    gw.router.handle_event(
                        now,
                        ServerEvent::Session { session, event },
                        &mut gw.endpoint,
                    );
                    progressed = true;
                }
                while let Some(action) = self.gateways[g].router.poll_action() {
                    self.take_action(g, action);
                    progressed = true;
                }
            }
            if !progressed {
                return;
            }
        }
    }

    fn latency(&mut self) -> Duration {
        let (lo, hi) = self.faults.latency_ms;
        MS * self.rng.gen_range(lo..=hi.max(lo)) as u32
    }

    fn schedule(&mut self, gateway: usize, due: Instant, work: Work) {
        let generation = self.gateways[gateway].generation;
        self.inflight.push(InFlight {
            due,
            gateway,
            generation,
            work,
        });
    }

    fn trace(&self, what: impl FnOnce() -> String) {
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!("{:>8?} {}", self.now - self.start, what());
        }
    }

    fn take_action(&mut self, g: usize, action: Action) {
        // What it asks of the shard comes after what the shard kept while
        // hung.
        self.shard_resumed();
        if let Action::Store { batch, to, items } = &action {
            self.trace(|| {
                let ids: Vec<u128> = items.iter().map(|i| i.msg_id).collect();
                format!(
                    "gw{g} store batch {batch} to {to}: {ids:?} shard {:?}",
                    self.shard
                )
            });
        }
        let kind = match &action {
            Action::Login { .. } => "login",
            Action::Call { .. } => "call",
            Action::Store { .. } => "store",
            Action::Notify { .. } => "notify",
            Action::LoadRelations { .. } => "relations",
            Action::LoadGroup { .. } => "load_group",
            Action::GroupNotify { .. } => "group_notify",
            Action::Offline { .. } => "offline",
        };
        *self.action_counts.entry(kind).or_default() += 1;
        let due = self.now + self.latency();
        match action {
            Action::Store { batch, to, items } => {
                self.take_store(g, due, batch, to, items);
            }
            Action::Notify { to, deliveries } => {
                self.schedule(g, due, Work::Notify { to, deliveries })
            }
            Action::GroupNotify { forward } => {
                self.schedule(g, due, Work::GroupNotify { forward });
            }
            Action::Offline { user, session } => {
                if self.presence.get(&user) == Some(&(g, session)) {
                    self.presence.remove(&user);
                }
            }
            other => {
                let (due, answer) = self.serve(g, due, other);
                self.schedule(g, due, Work::Answer(answer));
            }
        }
    }

    /// A store the router asked for, to the shard as it is now. Like the
    /// driver, an `AppendBatchOnce` looking back `GROUP_RESEND_WINDOW_MS`
    /// when an item is re-sent.
    fn take_store(&mut self, g: usize, due: Instant, batch: u64, to: u64, items: Vec<StoreItem>) {
        let once = items.iter().any(|i| i.resent);
        let since = self
            .wall_ms(self.now)
            .saturating_sub(GROUP_RESEND_WINDOW_MS);
        let asked = StoreAsked {
            at: self.now,
            link: (g, self.gateways[g].generation),
            order: self.stores_asked,
            once_since_ms: once.then_some(since),
        };
        self.stores_asked += 1;
        match self.shard {
            Health::Up => {
                let lose_answer = self.rng.gen_bool(self.faults.store_answer_lost);
                let work = Work::Store {
                    batch,
                    to,
                    items,
                    lose_answer,
                    asked,
                };
                self.schedule(g, due, work);
            }
            Health::Down => {
                let e = unavailable("shard down");
                let answer = Answer::Stored {
                    batch,
                    result: Err(e),
                };
                self.schedule(g, due, Work::Answer(answer));
            }
            Health::Hung => {
                self.schedule(g, self.now, Work::HungStore { to, items, asked });
                let e = unavailable("no answer in time");
                let answer = Answer::Stored {
                    batch,
                    result: Err(e),
                };
                self.schedule(g, self.now + SERVICE_TIMEOUT, Work::Answer(answer));
            }
        }
    }

    /// The answer of a login, call or relations read, and when it comes.
    fn serve(&mut self, g: usize, due: Instant, action: Action) -> (Instant, Answer) {
        let late = self.now + SERVICE_TIMEOUT;
        match action {
            Action::Login {
                pending,
                session,
                payload,
            } => {
                let login: Login = app::decode(&payload).expect("a login");
                let LoginMethod::Password { username, .. } = login.method else {
                    panic!("the sim logs in with passwords");
                };
                let user: u64 = username[1..].parse().expect("u<id>");
                let outcome = match (self.relations.get(&user), self.profile) {
                    (_, Health::Down | Health::Hung) => {
                        LoginOutcome::Refused(refusal(LoginError::Unavailable))
                    }
                    (None, _) => LoginOutcome::Refused(refusal(LoginError::WrongCredentials)),
                    (Some(r), _) if r.disabled => {
                        LoginOutcome::Refused(refusal(LoginError::AccountDisabled))
                    }
                    (Some(r), _) => {
                        // Presence learns of the session before the answer,
                        // and tells another gateway holding the user's
                        // session that it was replaced.
                        if let Some((old_g, old)) = self.presence.insert(user, (g, session)) {
                            if old_g != g {
                                let gw = &mut self.gateways[old_g];
                                gw.router.presence_kicked(old, &mut gw.endpoint);
                            }
                        }
                        let mb = self.mailboxes.entry(user).or_default();
                        let high = mb.last_seq();
                        let answer = LoginAnswer::Accepted(LoginAccepted {
                            user,
                            resume_token: vec![1; 72],
                            mailbox_count: high - mb.acked.min(high),
                            mailbox_high_seq: high,
                            heartbeat_s: 30,
                        });
                        LoginOutcome::Accepted(LoginOk {
                            user,
                            answer: app::encode(&answer),
                            relations: r.clone(),
                        })
                    }
                };
                (
                    due,
                    Answer::Login {
                        pending,
                        session,
                        outcome,
                    },
                )
            }
            Action::Call {
                session,
                id,
                user,
                call,
            } => {
                let (due, result, effects) = self.serve_call(due, user, call);
                let answer = Answer::Call {
                    session,
                    id,
                    result,
                    effects,
                };
                (due, answer)
            }
            Action::LoadRelations { users } => {
                let fail =
                    self.profile != Health::Up || self.rng.gen_bool(self.faults.relations_failure);
                let result = if fail {
                    Err(unavailable("profile unavailable"))
                } else {
                    Ok(users
                        .iter()
                        .filter_map(|u| self.relations.get(u).cloned())
                        .collect())
                };
                let due = if self.profile == Health::Hung {
                    late
                } else {
                    due
                };
                (due, Answer::Relations { users, result })
            }
            Action::LoadGroup { group } => {
                let fail =
                    self.profile != Health::Up || self.rng.gen_bool(self.faults.group_failure);
                let result = if fail {
                    Err(unavailable("profile unavailable"))
                } else {
                    Ok(self.group_info(group))
                };
                let due = if self.profile == Health::Hung {
                    late
                } else {
                    due
                };
                (due, Answer::Group { group, result })
            }
            other => unreachable!("{other:?} is served elsewhere"),
        }
    }

    fn serve_call(
        &mut self,
        due: Instant,
        user: u64,
        call: Call,
    ) -> (Instant, Result<Reply, AppError>, CallEffects) {
        let late = self.now + SERVICE_TIMEOUT;
        let mut effects = CallEffects::default();
        let shard_fails = self.shard != Health::Up || self.rng.gen_bool(self.faults.read_failure);
        let due_shard = if self.shard == Health::Hung {
            late
        } else {
            due
        };
        let due_profile = if self.profile == Health::Hung {
            late
        } else {
            due
        };
        let result = match call {
            Call::Fetch {
                after_seq,
                max_count,
                max_bytes,
            } => {
                if shard_fails {
                    return (due_shard, Err(unavailable("shard")), effects);
                }
                let mb = self.mailboxes.entry(user).or_default();
                let (messages, last_seq, more) = page(mb, after_seq, max_count, max_bytes);
                Ok(Reply::Mailbox {
                    messages,
                    last_seq,
                    more,
                })
            }
            Call::Ack { up_to_seq } => {
                if shard_fails {
                    return (due_shard, Err(unavailable("shard")), effects);
                }
                let mb = self.mailboxes.entry(user).or_default();
                let up_to = up_to_seq.min(mb.last_seq());
                let removed = up_to.saturating_sub(mb.acked);
                mb.acked = mb.acked.max(up_to);
                Ok(Reply::Acked { removed })
            }
            Call::LoginView => {
                let friends = self
                    .relations
                    .get(&user)
                    .map(|r| r.friends.clone())
                    .unwrap_or_default();
                effects.watching = Some(friends);
                Ok(Reply::Done)
            }
            Call::Block { user: other } => {
                let r = self.relations.get_mut(&user).expect("a user");
                if !r.blocked.contains(&other) {
                    r.blocked.push(other);
                    r.blocked.sort_unstable();
                    r.version += 1;
                }
                effects.changed = vec![user];
                Ok(Reply::Done)
            }
            // ---- groups (the router checked membership first) ----
            Call::GroupFetch {
                group,
                after_seq,
                max_count,
                max_bytes,
            } => {
                if shard_fails {
                    return (due_shard, Err(unavailable("shard")), effects);
                }
                let count = max_count.clamp(1, FETCH_COUNT_MAX);
                self.tidy_group(group);
                let mb = self.mailboxes.entry(group).or_default();
                let (messages, last_seq, more) = page(mb, after_seq, count, max_bytes);
                // Seqs after `after_seq` that are gone before the page (or,
                // for an empty last page, up to the newest).
                let dropped = match messages.first() {
                    Some(first) => first.seq.saturating_sub(after_seq + 1),
                    None if !more => mb.last_seq().saturating_sub(after_seq),
                    None => 0,
                };
                Ok(Reply::GroupMailbox {
                    messages,
                    last_seq,
                    more,
                    dropped,
                })
            }
            Call::GroupAck { group, up_to_seq } => {
                if self.profile != Health::Up || shard_fails {
                    return (due_profile, Err(unavailable("profile")), effects);
                }
                match self.groups.get_mut(&group) {
                    Some(g) if g.members.contains_key(&user) => {
                        let cursor = g.members.get_mut(&user).expect("a member");
                        *cursor = (*cursor).max(up_to_seq);
                        // The lowest cursor bounds what the group keeps,
                        // once the resend window is over.
                        self.tidy_group(group);
                        Ok(Reply::Done)
                    }
                    _ => Err(AppError {
                        code: AppErrorCode::NotAllowed,
                        message: "not a member".into(),
                    }),
                }
            }
            Call::GroupInfo { group } => {
                if self.profile != Health::Up {
                    return (due_profile, Err(unavailable("profile")), effects);
                }
                match self.group_info(group) {
                    Some(info) => Ok(Reply::Group(info)),
                    None => Err(AppError {
                        code: AppErrorCode::UnknownUser,
                        message: "no such group".into(),
                    }),
                }
            }
            Call::Groups => {
                if self.profile != Health::Up {
                    return (due_profile, Err(unavailable("profile")), effects);
                }
                let groups = self
                    .groups
                    .iter()
                    .filter_map(|(&id, g)| {
                        let read_seq = *g.members.get(&user)?;
                        let high_seq = match self.shard {
                            Health::Up => self.mailboxes.get(&id).map_or(0, |m| m.last_seq()),
                            _ => 0,
                        };
                        Some(GroupSummary {
                            group: id,
                            name: format!("g{}", id - GROUP_ID_BASE),
                            role: GroupRole::Member,
                            members: g.members.len() as u32,
                            read_seq,
                            high_seq,
                        })
                    })
                    .collect();
                Ok(Reply::Groups {
                    groups,
                    invites: Vec::new(),
                })
            }
            Call::GroupLeave { group } => {
                if self.profile != Health::Up {
                    return (due_profile, Err(unavailable("profile")), effects);
                }
                if !self
                    .groups
                    .get(&group)
                    .is_some_and(|g| g.members.contains_key(&user))
                {
                    return (
                        due,
                        Err(AppError {
                            code: AppErrorCode::NotAllowed,
                            message: "not a member".into(),
                        }),
                        effects,
                    );
                }
                self.group_remove(group, user);
                effects.groups_changed = vec![group];
                Ok(Reply::Done)
            }
            _ => Ok(Reply::Done),
        };
        (due, result, effects)
    }

    fn complete_due_work(&mut self) {
        loop {
            let Some(i) = (0..self.inflight.len()).find(|&i| self.inflight[i].due <= self.now)
            else {
                return;
            };
            let f = self.inflight.swap_remove(i);
            let alive = self.gateways[f.gateway].generation == f.generation;
            match f.work {
                Work::Answer(answer) if alive => {
                    let now = self.now_at();
                    let gw = &mut self.gateways[f.gateway];
                    gw.endpoint.now = self.now;
                    gw.router.handle_answer(now, answer, &mut gw.endpoint);
                }
                Work::Answer(_) => {}
                Work::Store {
                    batch,
                    to,
                    items,
                    lose_answer,
                    asked,
                } => {
                    let result = Ok(self.apply_store(f.gateway, to, items, asked));
                    if alive && !lose_answer {
                        let now = self.now_at();
                        let gw = &mut self.gateways[f.gateway];
                        gw.router.handle_answer(
                            now,
                            Answer::Stored { batch, result },
                            &mut gw.endpoint,
                        );
                    } else if alive {
                        // Applied, the answer lost: the driver gives up at
                        // its timeout.
                        let e = unavailable("no answer in time");
                        let answer = Answer::Stored {
                            batch,
                            result: Err(e),
                        };
                        let due = asked.at + SERVICE_TIMEOUT;
                        let work = Work::Answer(answer);
                        self.inflight.push(InFlight { due, work, ..f });
                    }
                }
                Work::HungStore { to, items, asked } => {
                    // Applied once the shard runs again, if it does.
                    if self.shard == Health::Up {
                        let work = Work::HungStore { to, items, asked };
                        self.inflight.push(InFlight { work, ..f });
                        self.shard_resumed();
                    } else if self.shard == Health::Hung {
                        let due = self.now + 50 * MS;
                        let work = Work::HungStore { to, items, asked };
                        self.inflight.push(InFlight { due, work, ..f });
                        continue;
                    }
                }
                Work::Notify { to, deliveries } => {
                    if let Some(&(g, _)) = self.presence.get(&to) {
                        if g != f.gateway {
                            let gw = &mut self.gateways[g];
                            for delivery in deliveries {
                                let forward = Forward::new(to, delivery);
                                gw.router.peer_forward(forward, &mut gw.endpoint);
                            }
                        }
                    }
                }
                Work::GroupNotify { forward } if alive => {
                    // One presence lookup, then one forward per other
                    // gateway naming its members.
                    let mut by_gateway: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
                    for &user in &forward.members {
                        if let Some(&(g, _)) = self.presence.get(&user) {
                            if g != f.gateway {
                                by_gateway.entry(g).or_default().push(user);
                            }
                        }
                    }
                    for (g, members) in by_gateway {
                        let key = (forward.group, forward.delivery.seq, g);
                        *self.group_forwards.entry(key).or_default() += 1;
                        let one = GroupForward {
                            group: forward.group,
                            members,
                            delivery: forward.delivery.clone(),
                        };
                        self.trace(|| {
                            format!(
                                "gw{} forwards group seq {} to gw{g}: {:?}",
                                f.gateway, one.delivery.seq, one.members
                            )
                        });
                        let now = self.now;
                        let gw = &mut self.gateways[g];
                        gw.endpoint.now = now;
                        gw.router.peer_group_forward(one, &mut gw.endpoint);
                    }
                }
                Work::GroupNotify { .. } => {}
                Work::ProfileEvent(event) if alive => {
                    if let proto::profile::Event::GroupChanged { group, version } = event {
                        self.group_events_seen
                            .push((f.gateway, group, version, self.now));
                        self.trace(|| {
                            format!("gw{} got GroupChanged {group} v{version}", f.gateway)
                        });
                    }
                    let now = self.now;
                    let gw = &mut self.gateways[f.gateway];
                    gw.endpoint.now = now;
                    gw.router.profile_event(event, &mut gw.endpoint);
                }
                Work::ProfileEvent(_) => {}
            }
            self.collect_actions();
        }
    }

    /// The shard runs (again): it applies the stores it took while hung,
    /// all of them, in the order they were asked (one connection per
    /// gateway and shard, read in order), before anything asked after.
    fn shard_resumed(&mut self) {
        if self.shard != Health::Up {
            return;
        }
        let mut hung = Vec::new();
        let mut i = 0;
        while i < self.inflight.len() {
            if matches!(self.inflight[i].work, Work::HungStore { .. }) {
                hung.push(self.inflight.remove(i));
            } else {
                i += 1;
            }
        }
        let mut hung: Vec<(usize, u64, Vec<StoreItem>, StoreAsked)> = hung
            .into_iter()
            .map(|f| match f.work {
                Work::HungStore { to, items, asked } => (f.gateway, to, items, asked),
                _ => unreachable!("picked"),
            })
            .collect();
        hung.sort_by_key(|h| h.3.order);
        for (by, to, items, asked) in hung {
            self.apply_store(by, to, items, asked);
        }
    }

    /// The shard applies a store: `AppendBatch`, or `AppendBatchOnce`
    /// (an item whose msg_id a live record stored since `since_ms` has is
    /// answered with that record's seq; items of the batch see each other).
    fn apply_store(
        &mut self,
        by: usize,
        to: u64,
        items: Vec<StoreItem>,
        asked: StoreAsked,
    ) -> Vec<Result<u64, AppError>> {
        self.trace(|| {
            let ids: Vec<u128> = items.iter().map(|i| i.msg_id).collect();
            let once = asked.once_since_ms.is_some();
            format!("applied to {to}: {ids:?} once {once}")
        });
        let at = self.now;
        let (start, start_wall_ms) = (self.start, self.start_wall_ms);
        let wall_ms = |t: Instant| start_wall_ms + (t - start).as_millis() as u64;
        let mb = self.mailboxes.entry(to).or_default();
        let mut found = Vec::new();
        let results = items
            .into_iter()
            .map(|i| {
                if let Some(since_ms) = asked.once_since_ms {
                    let first = mb
                        .live()
                        .find(|r| r.msg_id == i.msg_id && wall_ms(r.at) >= since_ms);
                    if let Some(r) = first {
                        found.push(r.seq);
                        return Ok(r.seq);
                    }
                }
                let copy = mb.records.iter().any(|r| r.msg_id == i.msg_id).then_some(
                    match asked.once_since_ms {
                        Some(_) => Repeat::PastWindow,
                        None => Repeat::Plain,
                    },
                );
                let seq = mb.last_seq() + 1;
                mb.records.push(Record {
                    seq,
                    msg_id: i.msg_id,
                    envelope: i.envelope,
                    by,
                    at,
                    issued: asked.at,
                    link: asked.link,
                    once: asked.once_since_ms.is_some(),
                    copy,
                });
                Ok(seq)
            })
            .collect();
        for seq in found {
            *self.stored_once.entry((to, seq)).or_default() += 1;
        }
        if is_group(to) {
            self.tidy_group(to);
        }
        results
    }

    // ---- clients -----------------------------------------------------------------

    /// Start a login of `user` at its gateway.
    pub fn login(&mut self, user: u64) {
        self.next_pending += 1;
        let pending = PendingId::from_raw(self.next_pending);
        let c = self.client(user);
        let g = c.gateway;
        c.state = ClientState::LoggingIn(pending, g);
        c.silent_since = None;
        let method = LoginMethod::Password {
            username: format!("u{user}"),
            password: "pw".into(),
        };
        let payload = app::encode(&Login::new(method, self.next_pending));
        self.gateways[g].endpoint.pending.insert(pending);
        let from = "127.0.0.1:1".parse().expect("an address");
        self.feed_event(
            g,
            ServerEvent::HandshakeRequest {
                pending,
                from,
                payload,
            },
        );
    }

    /// The client ends its session (Logout, then the session closes).
    pub fn logout(&mut self, user: u64) {
        let now = self.now;
        let c = self.client(user);
        c.want_online = false;
        if let ClientState::Online(session, g) = c.state {
            c.state = ClientState::Offline;
            lose_requests(c, now);
            self.request_raw(user, session, g, Call::Logout);
            self.close_session(g, session, CloseReason::Local);
        }
    }

    /// A session ends from the gateway's side too (timeout, close).
    fn close_session(&mut self, g: usize, session: u64, reason: CloseReason) {
        let now = self.now_at();
        let gw = &mut self.gateways[g];
        let Some(s) = gw.endpoint.sessions.remove(&session) else {
            return;
        };
        for (mid, data, _) in s.to_client {
            let event = Event::GivenUp { id: mid, data };
            gw.router.handle_event(
                now,
                ServerEvent::Session { session, event },
                &mut gw.endpoint,
            );
        }
        let event = Event::Closed(reason);
        gw.router.handle_event(
            now,
            ServerEvent::Session { session, event },
            &mut gw.endpoint,
        );
        self.collect_actions();
    }

    fn request_raw(&mut self, user: u64, session: u64, g: usize, call: Call) -> Option<u32> {
        let is_send = matches!(call, Call::Send { .. } | Call::GroupSend { .. });
        let c = self.client(user);
        let id = c.next_req;
        c.next_req += 1;
        let bytes = app::encode(&ClientMessage { id, call });
        if !self.gateways[g].endpoint.sessions.contains_key(&session) {
            return None;
        }
        let due = self.now + self.link_delay;
        self.uplink.push_back((due, g, session, bytes));
        if is_send {
            self.pending_sends.insert((g, session, id), ());
        }
        self.deliver_uplink();
        Some(id)
    }

    /// Client messages whose delay is over reach their gateway, in order.
    fn deliver_uplink(&mut self) {
        while let Some(&(due, g, session, _)) = self.uplink.front() {
            if due > self.now {
                return;
            }
            let (_, _, _, bytes) = self.uplink.pop_front().expect("looked at it");
            let Some(s) = self.gateways[g].endpoint.sessions.get_mut(&session) else {
                continue; // the session ended on the way
            };
            let msg = app::decode::<ClientMessage>(&bytes).expect("ours");
            let id = msg.id;
            if let Call::Send { to, msg_id, .. }
            | Call::GroupSend {
                group: to, msg_id, ..
            } = &msg.call
            {
                let user = s.user;
                self.trace(|| format!("gw{g} <- user {user} send {msg_id} to {to} (req {id})"));
                self.send_arrivals.entry(*msg_id).or_insert((g, self.now));
            }
            let Some(s) = self.gateways[g].endpoint.sessions.get_mut(&session) else {
                continue;
            };
            if self.pending_sends.remove(&(g, session, id)).is_some() {
                s.arrived.insert(id, self.now);
            }
            let event = Event::Message(bytes);
            self.feed_event(g, ServerEvent::Session { session, event });
        }
    }

    fn request(&mut self, user: u64, call: Call, kind: ReqKind) -> Option<u32> {
        let (session, g) = self.client(user).session()?;
        let id = self.request_raw(user, session, g, call)?;
        let deadline = self.now + CLIENT_REQUEST_TIMEOUT;
        self.client(user).requests.insert(id, (kind, deadline));
        Some(id)
    }

    /// Put outbox entries on the wire, oldest first, none overtaking one
    /// held back for a retry.
    fn client_pump(&mut self, user: u64) {
        let now = self.now;
        let c = self.client(user);
        if c.paused || c.session().is_none() {
            return;
        }
        let on_wire = c.outbox.values().filter(|m| m.request.is_some()).count();
        let ready: Vec<u64> = c
            .outbox
            .iter()
            .filter(|(_, m)| m.request.is_none())
            .take_while(|(_, m)| m.retry_at.is_none_or(|t| t <= now))
            .take(CLIENT_SENDS_IN_FLIGHT.saturating_sub(on_wire))
            .map(|(k, _)| *k)
            .collect();
        let says_resend = self.client(user).says_resend;
        for key in ready {
            let m = self.client(user).outbox[&key].clone();
            let call = if is_group(m.to) {
                Call::GroupSend {
                    group: m.to,
                    msg_id: m.msg_id,
                    body: m.body.clone(),
                    resend: m.sent_before && says_resend,
                }
            } else {
                Call::Send {
                    to: m.to,
                    msg_id: m.msg_id,
                    body: m.body.clone(),
                }
            };
            if let Some(id) = self.request(user, call, ReqKind::Send(m.msg_id)) {
                let m = self.client(user).outbox.get_mut(&key).expect("kept");
                m.request = Some(id);
                m.retry_at = None;
                m.sent_before = true;
            }
        }
        while let Some(r) = self.client(user).inbox.poll_request(now) {
            let kind = match r {
                InboxRequest::Fetch { .. } => ReqKind::Fetch,
                InboxRequest::Ack { up_to_seq } => ReqKind::Ack(up_to_seq),
            };
            if self.request(user, r.call(), kind).is_none() {
                let inbox = &mut self.client(user).inbox;
                match r {
                    InboxRequest::Fetch { .. } => inbox.on_fetch_failed(now),
                    InboxRequest::Ack { .. } => inbox.on_ack_failed(now),
                }
            }
        }
        let c = self.client(user);
        while let Some(d) = c.inbox.poll_show() {
            c.shown.push(d);
        }
        self.client_pump_groups(user);
    }

    /// The group side of a client: read `Groups` when it must, drive each
    /// started group inbox.
    fn client_pump_groups(&mut self, user: u64) {
        let now = self.now;
        let c = self.client(user);
        let asking = c
            .requests
            .values()
            .any(|(k, _)| matches!(k, ReqKind::Groups));
        if c.groups_wanted && !asking && c.groups_retry_at.is_none_or(|t| t <= now) {
            c.groups_wanted = false;
            c.groups_retry_at = None;
            if self.request(user, Call::Groups, ReqKind::Groups).is_none() {
                self.client(user).groups_wanted = true;
            }
        }
        let started: Vec<u64> = self
            .client(user)
            .groups
            .iter()
            .filter(|(_, g)| g.started)
            .map(|(id, _)| *id)
            .collect();
        for group in started {
            loop {
                let gi = self.client(user).groups.get_mut(&group).expect("listed");
                let Some(r) = gi.inbox.poll_request(now) else {
                    break;
                };
                let (call, kind) = match r {
                    InboxRequest::Fetch {
                        after_seq,
                        max_count,
                        max_bytes,
                    } => (
                        Call::GroupFetch {
                            group,
                            after_seq,
                            max_count,
                            max_bytes,
                        },
                        ReqKind::GroupFetch(group),
                    ),
                    InboxRequest::Ack { up_to_seq } => (
                        Call::GroupAck { group, up_to_seq },
                        ReqKind::GroupAck(group, up_to_seq),
                    ),
                };
                if self.request(user, call, kind).is_none() {
                    let inbox = &mut self
                        .client(user)
                        .groups
                        .get_mut(&group)
                        .expect("listed")
                        .inbox;
                    match r {
                        InboxRequest::Fetch { .. } => inbox.on_fetch_failed(now),
                        InboxRequest::Ack { .. } => inbox.on_ack_failed(now),
                    }
                    break;
                }
            }
            let gi = self.client(user).groups.get_mut(&group).expect("listed");
            while let Some(d) = gi.inbox.poll_show() {
                gi.shown.push(d);
            }
        }
    }

    fn client_step(&mut self, user: u64) {
        let now = self.now;
        let c = self.client(user);
        // A session whose client stayed silent too long is lost.
        if let ClientState::Online(session, g) = c.state {
            if c.paused && c.silent_since.is_some_and(|t| now - t >= SESSION_TIMEOUT) {
                self.close_session(g, session, CloseReason::TimedOut);
            }
        }
        let c = self.client(user);
        if c.paused {
            if c.silent_since.is_none() {
                c.silent_since = Some(now);
            }
            return;
        }
        c.silent_since = None;
        // The client notices a session that ended (closed by the gateway,
        // timed out, or the gateway died).
        if let ClientState::Online(session, g) = c.state {
            if !self.gateways[g].endpoint.sessions.contains_key(&session) {
                let now = self.now;
                let c = self.client(user);
                c.state = ClientState::Offline;
                lose_requests(c, now);
            }
        }
        if let ClientState::LoggingIn(pending, g) = self.client(user).state {
            self.finish_login(user, pending, g);
        }
        let c = self.client(user);
        if c.state == ClientState::Offline && c.want_online && !c.kicked {
            self.login(user);
            return;
        }
        self.client_read(user);
        self.client_timers(user);
        self.client_pump(user);
    }

    fn finish_login(&mut self, user: u64, pending: PendingId, g: usize) {
        let decided = &mut self.gateways[g].endpoint.decided;
        let Some(i) = decided.iter().position(|(p, _, _)| *p == pending) else {
            return;
        };
        let (_, session, answer) = decided.remove(i);
        let answer: LoginAnswer = app::decode(&answer).expect("an answer");
        let now = self.now;
        let has_groups = !self.groups.is_empty();
        let c = self.client(user);
        match (session, answer) {
            (Some(session), LoginAnswer::Accepted(a)) => {
                c.state = ClientState::Online(session, g);
                c.inbox.on_login(now, a.mailbox_count, a.mailbox_high_seq);
                for m in c.outbox.values_mut() {
                    m.request = None;
                }
                // Group inboxes start again from `Groups` (only in worlds
                // with groups: the others' runs stay as they were).
                for gi in c.groups.values_mut() {
                    gi.started = false;
                }
                c.groups_wanted = has_groups;
                c.groups_retry_at = None;
                let _ = self.request(user, Call::LoginView, ReqKind::Other);
            }
            (_, LoginAnswer::Refused { code, .. }) => {
                c.state = ClientState::Offline;
                c.logins_refused.push(code);
                if matches!(
                    code,
                    LoginError::AccountDisabled | LoginError::WrongCredentials
                ) {
                    c.want_online = false;
                }
            }
            other => panic!("login decided oddly: {other:?}"),
        }
    }

    fn client_read(&mut self, user: u64) {
        let Some((session, g)) = self.client(user).session() else {
            return;
        };
        loop {
            let gw = &mut self.gateways[g];
            let Some(s) = gw.endpoint.sessions.get_mut(&session) else {
                return;
            };
            let delay = self.link_delay;
            match s.to_client.front() {
                Some((_, _, queued)) if *queued + delay <= self.now => {}
                _ => return,
            }
            let (mid, bytes, _) = s.to_client.pop_front().expect("looked at it");
            s.queued_bytes -= bytes.len();
            let event = Event::Acked(mid);
            self.feed_event(g, ServerEvent::Session { session, event });
            let msg: GatewayMessage = app::decode(&bytes).expect("a gateway message");
            self.client_message(user, msg);
        }
    }

    fn client_message(&mut self, user: u64, msg: GatewayMessage) {
        let now = self.now;
        let c = self.client(user);
        match msg {
            GatewayMessage::Reply { id, result } => {
                let Some((kind, _)) = c.requests.remove(&id) else {
                    return; // timed out already
                };
                match kind {
                    ReqKind::Send(msg_id) => c.send_answered(msg_id, result, now),
                    ReqKind::Fetch => match result {
                        Ok(Reply::Mailbox {
                            messages,
                            last_seq,
                            more,
                        }) => {
                            if std::env::var_os("SIM_TRACE").is_some() {
                                let seqs: Vec<u64> = messages.iter().map(|d| d.seq).collect();
                                eprintln!("          user {user} page {seqs:?} last {last_seq} more {more} (shown {})", c.inbox.shown_seq());
                            }
                            c.inbox.on_page(now, messages, last_seq, more)
                        }
                        _ => c.inbox.on_fetch_failed(now),
                    },
                    ReqKind::Ack(up_to) => match result {
                        Ok(Reply::Acked { .. }) => c.inbox.on_ack_done(now, up_to),
                        _ => c.inbox.on_ack_failed(now),
                    },
                    ReqKind::Other => {}
                    ReqKind::Raw => {
                        c.replies.insert(id, result);
                    }
                    ReqKind::Groups => c.groups_listed(now, result),
                    ReqKind::GroupFetch(group) => {
                        let refused =
                            matches!(&result, Err(e) if e.code == AppErrorCode::NotAllowed);
                        let Some(gi) = c.groups.get_mut(&group).filter(|g| g.started) else {
                            return; // stopped meanwhile
                        };
                        match result {
                            Ok(Reply::GroupMailbox {
                                messages,
                                last_seq,
                                more,
                                dropped,
                            }) => {
                                if std::env::var_os("SIM_TRACE").is_some() {
                                    let seqs: Vec<u64> = messages.iter().map(|d| d.seq).collect();
                                    eprintln!("          user {user} group page {seqs:?} last {last_seq} more {more} dropped {dropped} (shown {})", gi.inbox.shown_seq());
                                }
                                gi.dropped += dropped;
                                gi.inbox.on_page(now, messages, last_seq, more);
                            }
                            _ => gi.inbox.on_fetch_failed(now),
                        }
                        if refused {
                            c.groups_wanted = true; // not a member any more?
                        }
                    }
                    ReqKind::GroupAck(group, up_to) => {
                        let refused =
                            matches!(&result, Err(e) if e.code == AppErrorCode::NotAllowed);
                        let Some(gi) = c.groups.get_mut(&group).filter(|g| g.started) else {
                            return;
                        };
                        match result {
                            Ok(Reply::Done) => gi.inbox.on_ack_done(now, up_to),
                            _ => gi.inbox.on_ack_failed(now),
                        }
                        if refused {
                            c.groups_wanted = true;
                        }
                    }
                }
            }
            GatewayMessage::Deliver(d) => {
                if std::env::var_os("SIM_TRACE").is_some() {
                    eprintln!(
                        "          user {user} push seq {} id {} (shown {})",
                        d.seq,
                        d.msg_id,
                        c.inbox.shown_seq()
                    );
                }
                c.inbox.on_push(now, d)
            }
            GatewayMessage::MailboxChanged { high_seq } => c.inbox.on_mailbox_changed(high_seq),
            GatewayMessage::GroupDeliver { group, delivery } => {
                if std::env::var_os("SIM_TRACE").is_some() {
                    eprintln!(
                        "          user {user} group push seq {} id {}",
                        delivery.seq, delivery.msg_id
                    );
                }
                c.group_received.push((group, delivery.clone(), now));
                let gi = c.groups.entry(group).or_insert_with(GroupInbox::new);
                if gi.started {
                    gi.inbox.on_push(now, delivery);
                } else {
                    gi.early.push(delivery);
                }
            }
            GatewayMessage::GroupMailboxChanged { group, high_seq } => {
                // Not started: the fetch that follows the start finds it.
                if let Some(gi) = c.groups.get_mut(&group).filter(|g| g.started) {
                    gi.inbox.on_mailbox_changed(high_seq);
                }
                c.pushes.push(msg);
            }
            GatewayMessage::GroupChanged { .. } => {
                c.groups_wanted = true;
                c.pushes.push(msg);
            }
            GatewayMessage::Kicked => {
                c.kicked = true;
                c.pushes.push(GatewayMessage::Kicked);
            }
            other => c.pushes.push(other),
        }
    }

    fn client_timers(&mut self, user: u64) {
        let now = self.now;
        let c = self.client(user);
        let expired: Vec<u32> = c
            .requests
            .iter()
            .filter(|(_, (_, at))| *at <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let (kind, _) = c.requests.remove(&id).expect("listed");
            match kind {
                ReqKind::Send(msg_id) => {
                    if let Some(m) = c.outbox.values_mut().find(|m| m.msg_id == msg_id) {
                        m.request = None;
                    }
                }
                ReqKind::Fetch => c.inbox.on_fetch_failed(now),
                ReqKind::Ack(_) => c.inbox.on_ack_failed(now),
                ReqKind::Other | ReqKind::Raw => {}
                kind => c.group_request_lost(kind, now),
            }
        }
    }

    // ---- checks ------------------------------------------------------------------

    /// The delivery invariants, after `settle`: every message answered
    /// `Sent` is shown to its recipient exactly once; nothing is shown
    /// twice; each recipient shows each sender's messages in the order the
    /// sender's application sent them; every send was answered within the
    /// bound.
    pub fn check_invariants(&self) {
        for gw in &self.gateways {
            assert!(
                gw.endpoint.late_answers.is_empty(),
                "sends answered late: {:?}",
                gw.endpoint.late_answers
            );
        }
        let mut shown_by: BTreeMap<u64, Vec<(u64, u128)>> = BTreeMap::new();
        for c in self.clients.values() {
            let ids: Vec<(u64, u128)> = c.shown.iter().map(|d| (d.from, d.msg_id)).collect();
            let distinct: BTreeSet<_> = ids.iter().collect();
            assert_eq!(
                distinct.len(),
                ids.len(),
                "user {} showed a message twice: {ids:?}",
                c.user
            );
            shown_by.insert(c.user, ids);
        }
        for c in self.clients.values() {
            for &msg_id in c.sent.keys() {
                let to = c
                    .app_sends
                    .iter()
                    .find(|(_, m)| *m == msg_id)
                    .expect("sent by the app")
                    .0;
                if is_group(to) {
                    continue; // check_group_invariants
                }
                assert!(
                    shown_by[&to].contains(&(c.user, msg_id)),
                    "message {msg_id} from {} to {to} was answered Sent but never shown",
                    c.user
                );
            }
            for &to in c.app_sends.iter().map(|(t, _)| t).collect::<BTreeSet<_>>() {
                if is_group(to) {
                    continue;
                }
                let sent_order: Vec<u128> = c
                    .app_sends
                    .iter()
                    .filter(|(t, m)| *t == to && !c.refused.contains_key(m))
                    .map(|(_, m)| *m)
                    .collect();
                let shown_order: Vec<u128> = shown_by
                    .get(&to)
                    .map(|s| {
                        s.iter()
                            .filter(|(f, _)| *f == c.user)
                            .map(|(_, m)| *m)
                            .collect()
                    })
                    .unwrap_or_default();
                assert_eq!(
                    shown_order, sent_order,
                    "{} -> {to}: shown in the order sent",
                    c.user
                );
            }
        }
        self.check_group_invariants();
    }

    /// The group promises (§6.7 with §6.4's), after `settle`, for every
    /// group of the model profile:
    /// * a send answered `Sent{seq}` is in the group's mailbox at that seq;
    ///   every send was answered `Sent` or refused;
    /// * each sender's messages were first stored in the order its
    ///   application sent them;
    /// * no client shows a message twice, and each shows in seq order only
    ///   what the mailbox holds at that seq;
    /// * every member that was never removed shows exactly the messages
    ///   stored after it joined, each once, in seq order, and was never
    ///   told a seq was gone;
    /// * stored once: the mailbox never holds two records of one
    ///   (from, msg_id), except where the shard could not tell
    ///   ([`legit_repeat`]).
    pub fn check_group_invariants(&self) {
        for (&id, g) in &self.groups {
            let gname = id - GROUP_ID_BASE;
            let empty = MailboxModel::default();
            let mb = self.mailboxes.get(&id).unwrap_or(&empty);
            let by_seq: BTreeMap<u64, &Record> = mb.records.iter().map(|r| (r.seq, r)).collect();
            for (first, again) in mb.second_copies() {
                assert!(
                    legit_repeat(first, again).is_some(),
                    "group {gname}: user {}'s message {} stored twice, at seq {} (asked at {:?} \
                     on {:?}, once {}) and seq {} (asked at {:?} on {:?}, once {})",
                    again.envelope.from,
                    again.msg_id,
                    first.seq,
                    first.issued - self.start,
                    first.link,
                    first.once,
                    again.seq,
                    again.issued - self.start,
                    again.link,
                    again.once,
                );
            }
            for c in self.clients.values() {
                let to_group: Vec<u128> = c
                    .app_sends
                    .iter()
                    .filter(|(t, _)| *t == id)
                    .map(|(_, m)| *m)
                    .collect();
                for m in &to_group {
                    match (c.sent.get(m), c.refused.get(m)) {
                        (Some(&seq), None) => {
                            let r = by_seq.get(&seq).unwrap_or_else(|| {
                                panic!("group {gname}: {m} answered Sent at {seq}, not stored")
                            });
                            assert_eq!(
                                (r.envelope.from, r.msg_id),
                                (c.user, *m),
                                "group {gname}: seq {seq} holds what was answered"
                            );
                        }
                        (None, Some(_)) => {}
                        other => panic!(
                            "group {gname}: user {}'s message {m} ended as {other:?}",
                            c.user
                        ),
                    }
                }
                // First copies in the mailbox, in the sender's order.
                let mut first_seen = BTreeSet::new();
                let stored_order: Vec<usize> = mb
                    .records
                    .iter()
                    .filter(|r| r.envelope.from == c.user && first_seen.insert(r.msg_id))
                    .map(|r| {
                        to_group
                            .iter()
                            .position(|m| *m == r.msg_id)
                            .expect("stored what the app sent")
                    })
                    .collect();
                assert!(
                    stored_order.windows(2).all(|w| w[0] < w[1]),
                    "group {gname}: user {}'s messages stored in the order sent: {stored_order:?}",
                    c.user
                );
                let Some(gi) = c.groups.get(&id) else {
                    continue;
                };
                let ids: Vec<(u64, u128)> = gi.shown.iter().map(|d| (d.from, d.msg_id)).collect();
                let distinct: BTreeSet<_> = ids.iter().collect();
                assert_eq!(
                    distinct.len(),
                    ids.len(),
                    "group {gname}: user {} showed a message twice: {ids:?}",
                    c.user
                );
                assert!(
                    gi.shown.windows(2).all(|w| w[0].seq < w[1].seq),
                    "group {gname}: user {} showed out of seq order",
                    c.user
                );
                for d in &gi.shown {
                    let r = by_seq.get(&d.seq).expect("shown what is stored");
                    assert_eq!((r.envelope.from, r.msg_id), (d.from, d.msg_id));
                }
            }
            for (&u, _) in g.members.iter().filter(|(u, _)| !g.removed.contains(u)) {
                let start = g.joined_at[&u];
                let mut seen = BTreeSet::new();
                let expected: Vec<(u64, u128)> = mb
                    .records
                    .iter()
                    .filter(|r| r.seq > start)
                    .map(|r| (r.envelope.from, r.msg_id))
                    .filter(|k| seen.insert(*k))
                    .collect();
                let c = &self.clients[&u];
                assert_eq!(
                    c.group_shown(id),
                    expected,
                    "group {gname}: member {u} shows every message after {start} once, in seq order"
                );
                let dropped = c.groups.get(&id).map_or(0, |gi| gi.dropped);
                assert_eq!(
                    dropped, 0,
                    "group {gname}: member {u} was told seqs were gone"
                );
            }
        }
    }
}

impl ClientModel {
    /// The `Groups` reply: start the inbox of every group listed that is
    /// not started in this session (`shown` = the cursor), stop those no
    /// longer listed.
    fn groups_listed(&mut self, now: Instant, result: Result<Reply, AppError>) {
        let Ok(Reply::Groups { groups, .. }) = result else {
            self.groups_wanted = true;
            self.groups_retry_at = Some(now + CLIENT_RETRY_DELAY);
            return;
        };
        let listed: BTreeSet<u64> = groups.iter().map(|g| g.group).collect();
        for (id, gi) in self.groups.iter_mut() {
            if !listed.contains(id) {
                gi.started = false;
                gi.early.clear();
            }
        }
        for g in groups {
            let gi = self.groups.entry(g.group).or_insert_with(GroupInbox::new);
            if gi.started {
                continue;
            }
            let high = g.high_seq.max(g.read_seq);
            gi.inbox.on_login(now, high - g.read_seq, high);
            gi.started = true;
            for d in std::mem::take(&mut gi.early) {
                gi.inbox.on_push(now, d);
            }
        }
    }

    /// A group request whose answer will not come (timed out, session lost).
    fn group_request_lost(&mut self, kind: ReqKind, now: Instant) {
        match kind {
            ReqKind::Groups => self.groups_wanted = true,
            ReqKind::GroupFetch(group) => {
                if let Some(gi) = self.groups.get_mut(&group) {
                    gi.inbox.on_fetch_failed(now);
                }
            }
            ReqKind::GroupAck(group, _) => {
                if let Some(gi) = self.groups.get_mut(&group) {
                    gi.inbox.on_ack_failed(now);
                }
            }
            _ => {}
        }
    }

    fn send_answered(&mut self, msg_id: u128, result: Result<Reply, AppError>, now: Instant) {
        if std::env::var_os("SIM_TRACE").is_some() {
            eprintln!("          user {} answer {msg_id}: {result:?}", self.user);
        }
        let Some((&key, _)) = self.outbox.iter().find(|(_, m)| m.msg_id == msg_id) else {
            return;
        };
        match result {
            Ok(Reply::Sent(outcome)) => {
                self.outbox.remove(&key);
                self.sent.insert(msg_id, outcome.seq);
            }
            Err(e) if e.code.is_retryable() => {
                let m = self.outbox.get_mut(&key).expect("found");
                m.request = None;
                m.retry_at = Some(now + CLIENT_RETRY_DELAY);
            }
            Err(e) => {
                self.outbox.remove(&key);
                self.refused.insert(msg_id, e.code);
            }
            Ok(other) => panic!("a send answered {other:?}"),
        }
    }
}

/// Why a group's mailbox may hold `again`, a later record of `first`'s
/// (from, msg_id), without breaking "stored once" (§6.7); `None`: it may
/// not.
/// * [`Repeat::PastWindow`]: a re-send (`AppendBatchOnce`) after the first
///   copy was deleted or left the `GROUP_RESEND_WINDOW_MS` look-back;
/// * [`Repeat::Plain`], asked for before (or as) `first`, a re-send's
///   copy, on another connection (another gateway, or a dead one's): the
///   earlier attempt reached the shard after its re-send, which found
///   nothing.
///   Nothing orders two connections' requests (in the model, their
///   latencies). A plain store asked for after is a re-send the router
///   did not store with `AppendBatchOnce`; one on the same connection
///   cannot overtake (the model shard, like a real one, applies a store
///   whose answer is lost when it arrives, and what it kept while hung,
///   in order, before anything asked after it runs again), and a router
///   never has two stores of one message in flight.
pub fn legit_repeat(first: &Record, again: &Record) -> Option<Repeat> {
    match again.copy? {
        Repeat::PastWindow => Some(Repeat::PastWindow),
        Repeat::Plain if first.once && again.issued <= first.issued && again.link != first.link => {
            Some(Repeat::Plain)
        }
        Repeat::Plain => None,
    }
}

/// The session is gone: requests on it are lost (sends stay in the
/// outbox and go out again after the next login).
fn lose_requests(c: &mut ClientModel, now: Instant) {
    for (_, (kind, _)) in std::mem::take(&mut c.requests) {
        match kind {
            ReqKind::Fetch => c.inbox.on_fetch_failed(now),
            ReqKind::Ack(_) => c.inbox.on_ack_failed(now),
            kind => c.group_request_lost(kind, now),
        }
    }
    for m in c.outbox.values_mut() {
        m.request = None;
    }
}

/// A page of `mb` after `after_seq`, by the shard's page rule: the first
/// record always, then while the bodies stay within `max_bytes`. (messages,
/// last_seq, more).
fn page(
    mb: &MailboxModel,
    after_seq: u64,
    max_count: u32,
    max_bytes: u32,
) -> (Vec<Delivery>, u64, bool) {
    let live: Vec<&Record> = mb.live().filter(|r| r.seq > after_seq).collect();
    let mut bytes = 0;
    let fits = live
        .iter()
        .take(max_count as usize)
        .take_while(|r| {
            bytes += r.envelope.body.len();
            bytes == r.envelope.body.len() || bytes <= max_bytes as usize
        })
        .count();
    let page: Vec<Delivery> = live
        .iter()
        .take(fits)
        .map(|r| Delivery {
            from: r.envelope.from,
            msg_id: r.msg_id,
            sent_at_ms: r.envelope.sent_at_ms,
            body: r.envelope.body.clone(),
            seq: r.seq,
        })
        .collect();
    let more = live.len() > page.len();
    let last_seq = page.last().map_or(0, |d| d.seq);
    (page, last_seq, more)
}

fn unavailable(why: &str) -> AppError {
    AppError {
        code: AppErrorCode::Unavailable,
        message: why.into(),
    }
}

fn refusal(code: LoginError) -> Vec<u8> {
    app::encode(&LoginAnswer::Refused {
        code,
        message: String::new(),
    })
}

/// The seeds a schedule test runs: `ROUTER_SEEDS` of them (default
/// `default`) from `ROUTER_SEED_FIRST` (default 0).
pub fn seeds(default: u64) -> std::ops::Range<u64> {
    let var = |name: &str| std::env::var(name).ok().and_then(|s| s.parse().ok());
    let first = var("ROUTER_SEED_FIRST").unwrap_or(0);
    first..first + var("ROUTER_SEEDS").unwrap_or(default)
}
