//! The receiving side of the user's chat groups: one `proto::inbox::Inbox`
//! per group (the seq rules of docs/PROTOCOL.md §6.4, applied to the
//! group's mailbox, with the member's read cursor as its acknowledgement),
//! at most `groups_max` of them. Sans-IO like the inbox: the connection's
//! task feeds pushes and answers in and sends the requests it hands out.
//!
//! **Where a group's inbox starts.** A group's messages are all in its
//! mailbox; what this member has read is its cursor (`read_seq`), known
//! only from the user's group list (`Call::Groups`). So an inbox starts
//! only from a list read in the current session: `on_login(high_seq -
//! read_seq, high_seq)` (every seq up to the cursor counts as
//! acknowledged, the first fetch is after it). After every login the list
//! is read again and each inbox restarted from it; until then the inboxes
//! of the previous session keep taking pushes (by their own `shown`) but
//! send nothing, so a restart never meets an answer to one of their
//! requests. Groups no longer listed lose their inbox.
//!
//! **A push of a group with no inbox** (just joined, or the list not read
//! yet) is not shown at once: its cursor is unknown, and guessing it (say
//! `seq - 1`) would acknowledge past messages never shown whenever the
//! member had unread messages (pushes during the login's list read) or the
//! first push seen was not the lowest new seq (pushes of different senders
//! overtake each other; a push the gateway could not queue is skipped). The
//! push waits here (bounded) and the list is read again; a list read after
//! the push names the group (its store came after the membership) with its
//! cursor, the inbox starts there and the push goes in. A group such a
//! list does not name is not the user's: its pushes are dropped. Pushes
//! beyond the room are dropped too: the group's first fetch after its
//! cursor finds them.

use super::shown::{Mailbox, ShownMarks};
use proto::{
    app::{Delivery, GroupSummary},
    groups::is_group,
    inbox::{Inbox, InboxConfig, InboxRequest, InboxStats},
};
use std::{
    collections::{btree_map, BTreeMap, BTreeSet},
    ops::Bound,
    time::Instant,
};

/// Messages of one group ready to hand out and not yet taken at most
/// (`InboxConfig::ready_max`; also bounded by the connection's
/// `events_max`). While a group is this far ahead of the application its
/// inbox stops fetching and drops pushes (fetched later).
pub const GROUP_READY_MAX: usize = 64;
/// How long a group push past a gap waits for the missing seqs before the
/// gap is fetched: longer than a mailbox's 100 ms, because a group's
/// messages reach a member by two roads (the accepting gateway's push, or a
/// forward from another gateway after a presence lookup) that overtake each
/// other by more, and each needless fetch reads a page from the shard for
/// one member. A push that is really lost costs this much delay (one the
/// gateway could not queue is followed by `GroupMailboxChanged` at once).
pub const GROUP_GAP_WAIT: std::time::Duration = std::time::Duration::from_millis(500);
/// Bytes of one group's message bodies held past a gap at most.
pub const GROUP_HELD_BYTES_MAX: usize = 64 * 1024;
/// `(sender, msg_id)` pairs one group remembers to drop a message stored
/// twice (a sender's retry comes within seconds: a window of thousands of
/// messages is plenty, and 500 groups of 65,536 would be megabytes each).
pub const GROUP_DEDUPE_IDS_MAX: usize = 4096;
/// Bytes of pushes of groups with no inbox yet, waiting for the group
/// list (bodies, each counted with [`PUSH_OVERHEAD_BYTES`]).
pub const UNLISTED_BYTES_MAX: usize = 256 * 1024;
/// What a waiting push counts for besides its body.
pub const PUSH_OVERHEAD_BYTES: usize = 64;

/// Counters of the group inboxes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GroupStats {
    /// Summed over every group inbox, also those since dropped: messages
    /// handed out (`shown`), copies dropped (`duplicates`), seqs skipped
    /// as gone, fetches answered.
    pub inbox: InboxStats,
    /// Group seqs the gateway said are gone (past the group's retention)
    /// that the application was told of (`ImEvent::GroupDropped`).
    pub dropped_told: u64,
    /// Pushes of groups listed beyond `groups_max`, dropped.
    pub over_limit: u64,
    /// Pushes of groups with no inbox dropped: not the user's (a list read
    /// after them did not name the group), or no room while waiting for
    /// the list (fetched once the inbox starts).
    pub unlisted: u64,
    /// Group lists read by the connection itself (`Call::Groups`).
    pub lists: u64,
    /// Groups followed now.
    pub groups: u64,
}

/// Which inbox a request came from: a group's inbox dropped and started
/// again (left and joined again) ignores the answers of the old one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GroupTag {
    pub(crate) group: u64,
    instance: u64,
}

struct Member {
    inbox: Inbox,
    instance: u64,
    /// Started from a list read in this session: may send requests.
    live: bool,
    /// The `after_seq` of its fetch in flight.
    fetch_after: Option<u64>,
}

/// Pushes of a group with no inbox, waiting for the list.
#[derive(Default)]
struct Unlisted {
    pushes: Vec<Delivery>,
    /// The first this many arrived before the list in flight was asked
    /// for: a list that does not name the group drops them.
    covered: usize,
}

/// The user's group list (`Call::Groups`), read by the connection itself.
#[derive(Debug, Default)]
struct List {
    /// To be read (again): after a login, a `GroupChanged`, a push of a
    /// group with no inbox, a group request refused for good.
    wanted: bool,
    in_flight: bool,
    /// After a failed read, not before this.
    retry_at: Option<Instant>,
    /// Read (or refused for good) in this session.
    read: bool,
}

pub(crate) struct GroupInboxes {
    config: InboxConfig,
    max: usize,
    requests_max: usize,
    inboxes: BTreeMap<u64, Member>,
    next_instance: u64,
    unlisted: BTreeMap<u64, Unlisted>,
    unlisted_bytes: usize,
    /// Groups the last list named beyond `max`: followed by nobody.
    over_limit: BTreeSet<u64>,
    list: List,
    requests_in_flight: usize,
    /// Round-robin positions: the group last handed out from, and the one
    /// that last sent a request.
    shown_last: Option<u64>,
    request_last: Option<u64>,
    /// Counters of inboxes dropped.
    retired: InboxStats,
    stats: GroupStats,
    /// What this client's connections showed, per group.
    shown: ShownMarks,
}

impl GroupInboxes {
    /// Start every group's inbox after what `shown` says this client's
    /// earlier connections showed, and record what is shown there.
    pub(crate) fn with_shown(mut self, shown: ShownMarks) -> Self {
        self.shown = shown;
        self
    }

    /// `config` is each group inbox's; at most `groups_max` groups are
    /// followed and `requests_max` of their requests are in flight (so 500
    /// groups starting after a login do not overrun the gateway's
    /// requests per session: the rest wait their turn).
    pub(crate) fn new(config: InboxConfig, groups_max: usize, requests_max: usize) -> Self {
        GroupInboxes {
            config,
            max: groups_max,
            requests_max: requests_max.max(1),
            inboxes: BTreeMap::new(),
            next_instance: 0,
            unlisted: BTreeMap::new(),
            unlisted_bytes: 0,
            over_limit: BTreeSet::new(),
            list: List::default(),
            requests_in_flight: 0,
            shown_last: None,
            request_last: None,
            retired: InboxStats::default(),
            stats: GroupStats::default(),
            shown: ShownMarks::new(),
        }
    }

    /// A (new) session is up. Requests of the previous one are void (the
    /// task failed them); the list is read again and every inbox waits for
    /// it before sending anything.
    pub(crate) fn on_login(&mut self) {
        for m in self.inboxes.values_mut() {
            m.live = false;
            m.fetch_after = None;
        }
        for u in self.unlisted.values_mut() {
            u.covered = 0;
        }
        self.list = List {
            wanted: true,
            ..List::default()
        };
        self.requests_in_flight = 0;
    }

    /// Read the group list now? (At most one read in flight; pushes that
    /// arrived before it are covered by it.)
    pub(crate) fn poll_list(&mut self, now: Instant) -> bool {
        let due = self.list.retry_at.is_none_or(|t| t <= now);
        if !self.list.wanted || self.list.in_flight || !due {
            return false;
        }
        self.list.wanted = false;
        self.list.in_flight = true;
        self.list.retry_at = None;
        for u in self.unlisted.values_mut() {
            u.covered = u.pushes.len();
        }
        self.stats.lists += 1;
        true
    }

    /// Read the list again (a group changed, or refused a request).
    pub(crate) fn want_list(&mut self) {
        self.list.wanted = true;
    }

    /// The answer to the list read: every group the user is in, with its
    /// cursor (`read_seq`) and newest seq.
    pub(crate) fn on_list(&mut self, now: Instant, mut groups: Vec<GroupSummary>) {
        self.list.in_flight = false;
        self.list.read = true;
        groups.retain(|g| is_group(g.group));
        groups.sort_unstable_by_key(|g| g.group);
        groups.dedup_by_key(|g| g.group);
        let beyond = groups.split_off(groups.len().min(self.max));
        self.over_limit = beyond.iter().map(|g| g.group).collect();
        let listed: BTreeSet<u64> = groups.iter().map(|g| g.group).collect();
        let gone: Vec<u64> = (self.inboxes.keys())
            .filter(|g| !listed.contains(g))
            .copied()
            .collect();
        for group in gone {
            let member = self.inboxes.remove(&group).expect("listed above");
            add(&mut self.retired, member.inbox.stats());
        }
        for summary in groups {
            // The cursor is a seq that exists, whatever the shard said.
            let high = summary.high_seq.max(summary.read_seq);
            let member = match self.inboxes.entry(summary.group) {
                btree_map::Entry::Occupied(e) => e.into_mut(),
                btree_map::Entry::Vacant(e) => {
                    let instance = self.next_instance;
                    self.next_instance += 1;
                    let shown = self.shown.get(Mailbox::Group(summary.group));
                    e.insert(Member {
                        inbox: Inbox::resume(self.config.clone(), shown),
                        instance,
                        live: false,
                        fetch_after: None,
                    })
                }
            };
            if member.live {
                // Its requests may be in flight: only a hint.
                member.inbox.on_mailbox_changed(summary.high_seq);
            } else {
                member.inbox.on_login(now, high - summary.read_seq, high);
                member.live = true;
            }
        }
        self.settle_unlisted(now, true);
    }

    /// The list read failed: `for_good` if retrying cannot help (a gateway
    /// without groups: then every inbox goes on from what it showed
    /// itself), else it is read again after the retry delay.
    pub(crate) fn on_list_failed(&mut self, now: Instant, for_good: bool) {
        self.list.in_flight = false;
        if !for_good {
            self.list.wanted = true;
            self.list.retry_at = Some(now + self.config.retry_delay);
            return;
        }
        self.list.read = true;
        for m in self.inboxes.values_mut().filter(|m| !m.live) {
            m.inbox.on_login(now, 0, 0);
            m.live = true;
        }
        self.settle_unlisted(now, false);
    }

    /// After a list read: the waiting pushes of groups that now have an
    /// inbox go in; those the read covered are dropped.
    fn settle_unlisted(&mut self, now: Instant, listed: bool) {
        for (group, mut waiting) in std::mem::take(&mut self.unlisted) {
            if let Some(m) = self.inboxes.get_mut(&group) {
                for d in waiting.pushes {
                    m.inbox.on_push(now, d);
                }
                continue;
            }
            let dropped = if listed && self.over_limit.contains(&group) {
                self.stats.over_limit += waiting.pushes.len() as u64;
                waiting.pushes.len()
            } else {
                self.stats.unlisted += waiting.covered as u64;
                waiting.covered
            };
            let rest = waiting.pushes.split_off(dropped);
            if !rest.is_empty() {
                // Arrived while the list was read: the next read decides.
                self.list.wanted = true;
                let kept = Unlisted {
                    pushes: rest,
                    covered: 0,
                };
                self.unlisted.insert(group, kept);
            }
        }
        self.unlisted_bytes = (self.unlisted.values())
            .flat_map(|u| &u.pushes)
            .map(push_cost)
            .sum();
    }

    /// `GatewayMessage::GroupDeliver`.
    pub(crate) fn on_push(&mut self, now: Instant, group: u64, delivery: Delivery) {
        if let Some(m) = self.inboxes.get_mut(&group) {
            return m.inbox.on_push(now, delivery);
        }
        if self.over_limit.contains(&group) {
            self.stats.over_limit += 1;
            return;
        }
        if !is_group(group) {
            self.stats.unlisted += 1;
            return;
        }
        self.list.wanted = true;
        let cost = push_cost(&delivery);
        let room = self.unlisted_bytes + cost <= UNLISTED_BYTES_MAX
            && (self.unlisted.contains_key(&group) || self.unlisted.len() < self.max);
        if !room {
            // Fetched once the list starts the group's inbox.
            self.stats.unlisted += 1;
            return;
        }
        self.unlisted_bytes += cost;
        self.unlisted
            .entry(group)
            .or_default()
            .pushes
            .push(delivery);
    }

    /// `GatewayMessage::GroupMailboxChanged`: fetch what was not pushed.
    pub(crate) fn on_mailbox_changed(&mut self, group: u64, high_seq: u64) {
        match self.inboxes.get_mut(&group) {
            Some(m) => m.inbox.on_mailbox_changed(high_seq),
            // The inbox's first fetch, once the list starts it, finds it.
            None if !self.over_limit.contains(&group) => self.list.wanted = true,
            None => {}
        }
    }

    /// The next request to send: the inboxes take turns, at most
    /// `requests_max` in flight, none before the list started them.
    pub(crate) fn poll_request(&mut self, now: Instant) -> Option<(GroupTag, InboxRequest)> {
        if self.requests_in_flight >= self.requests_max {
            return None;
        }
        let order: Vec<u64> = turns(&self.inboxes, self.request_last).collect();
        for group in order {
            let m = self.inboxes.get_mut(&group).expect("a key");
            if !m.live {
                continue;
            }
            let Some(request) = m.inbox.poll_request(now) else {
                continue;
            };
            if let InboxRequest::Fetch { after_seq, .. } = request {
                m.fetch_after = Some(after_seq);
            }
            self.request_last = Some(group);
            self.requests_in_flight += 1;
            let tag = GroupTag {
                group,
                instance: m.instance,
            };
            return Some((tag, request));
        }
        None
    }

    /// The answer to a fetch (`Reply::GroupMailbox`); how many seqs the
    /// gateway said are gone, to tell the application (0 if none, or if
    /// the answer was not this inbox's).
    pub(crate) fn on_page(
        &mut self,
        now: Instant,
        tag: GroupTag,
        messages: Vec<Delivery>,
        last_seq: u64,
        more: bool,
        dropped: u64,
    ) -> u64 {
        let Some(m) = self.answered(tag) else {
            return 0;
        };
        let after_seq = m.fetch_after.take();
        // An empty last page names no seq, but its `dropped` says every seq
        // up to `after_seq + dropped` is gone: the inbox skips them (and a
        // later fetch does not tell them again).
        let last_seq = match after_seq {
            Some(after) if messages.is_empty() && !more => {
                last_seq.max(after.saturating_add(dropped))
            }
            _ => last_seq,
        };
        let fetches = m.inbox.stats().fetches;
        m.inbox.on_page(now, messages, last_seq, more);
        let taken = m.inbox.stats().fetches > fetches;
        if !taken || dropped == 0 {
            return 0;
        }
        self.stats.dropped_told += dropped;
        dropped
    }

    pub(crate) fn on_fetch_failed(&mut self, now: Instant, tag: GroupTag) {
        if let Some(m) = self.answered(tag) {
            m.fetch_after = None;
            m.inbox.on_fetch_failed(now);
        }
    }

    pub(crate) fn on_ack_done(&mut self, now: Instant, tag: GroupTag, up_to_seq: u64) {
        if let Some(m) = self.answered(tag) {
            m.inbox.on_ack_done(now, up_to_seq);
        }
    }

    pub(crate) fn on_ack_failed(&mut self, now: Instant, tag: GroupTag) {
        if let Some(m) = self.answered(tag) {
            m.inbox.on_ack_failed(now);
        }
    }

    /// A request of `tag` ended: its slot is free; its inbox, if it is
    /// still the one that asked.
    fn answered(&mut self, tag: GroupTag) -> Option<&mut Member> {
        self.requests_in_flight = self.requests_in_flight.saturating_sub(1);
        self.inboxes
            .get_mut(&tag.group)
            .filter(|m| m.instance == tag.instance)
    }

    /// The next message to show: the groups take turns, one message each.
    pub(crate) fn poll_show(&mut self) -> Option<(u64, Delivery)> {
        let group =
            turns(&self.inboxes, self.shown_last).find(|g| self.inboxes[g].inbox.waiting() > 0)?;
        self.shown_last = Some(group);
        let delivery = self.inboxes.get_mut(&group)?.inbox.poll_show()?;
        self.shown.record(Mailbox::Group(group), delivery.seq);
        Some((group, delivery))
    }

    /// Messages ready to show and not yet taken.
    pub(crate) fn waiting(&self) -> usize {
        self.inboxes.values().map(|m| m.inbox.waiting()).sum()
    }

    /// When [`GroupInboxes::poll_request`] or [`GroupInboxes::poll_list`]
    /// may have something new without other input (never while the
    /// requests in flight are at their maximum: an answer frees a slot).
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let list = self
            .list
            .retry_at
            .filter(|_| self.list.wanted && !self.list.in_flight);
        let inboxes = (self.requests_in_flight < self.requests_max)
            .then(|| {
                (self.inboxes.values())
                    .filter(|m| m.live)
                    .filter_map(|m| m.inbox.poll_timeout())
                    .min()
            })
            .flatten();
        list.into_iter().chain(inboxes).min()
    }

    /// Acknowledge what was taken without waiting (before a close).
    pub(crate) fn ack_now(&mut self, now: Instant) {
        for m in self.inboxes.values_mut() {
            m.inbox.ack_now(now);
        }
    }

    /// Everything taken from every group was acknowledged.
    pub(crate) fn all_acked(&self) -> bool {
        self.inboxes.values().all(|m| m.inbox.all_acked())
    }

    /// The list was read in this session with nothing waiting for another
    /// read, and every group inbox caught up and acknowledged.
    pub(crate) fn synced(&self) -> bool {
        self.list.read
            && !self.list.wanted
            && !self.list.in_flight
            && self.unlisted.is_empty()
            && (self.inboxes.values()).all(|m| m.live && m.inbox.caught_up() && m.inbox.all_acked())
    }

    pub(crate) fn stats(&self) -> GroupStats {
        let mut stats = self.stats;
        stats.inbox = self.retired;
        for m in self.inboxes.values() {
            add(&mut stats.inbox, m.inbox.stats());
        }
        stats.groups = self.inboxes.len() as u64;
        stats
    }
}

/// The keys of `map` in turn: those after `last`, then from the start.
fn turns<V>(map: &BTreeMap<u64, V>, last: Option<u64>) -> impl Iterator<Item = u64> + '_ {
    let (after, until) = match last {
        Some(last) => (Bound::Excluded(last), Bound::Included(last)),
        None => (Bound::Unbounded, Bound::Excluded(0)),
    };
    let later = map.range((after, Bound::Unbounded));
    let earlier = map.range((Bound::Unbounded, until));
    later.chain(earlier).map(|(k, _)| *k)
}

fn push_cost(d: &Delivery) -> usize {
    d.body.len() + PUSH_OVERHEAD_BYTES
}

fn add(sum: &mut InboxStats, s: InboxStats) {
    sum.shown += s.shown;
    sum.duplicates += s.duplicates;
    sum.held_dropped += s.held_dropped;
    sum.skipped += s.skipped;
    sum.fetches += s.fetches;
}

#[cfg(test)]
mod tests;
