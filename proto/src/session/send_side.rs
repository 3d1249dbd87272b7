//! The sending half of a session's reliability: messages split into
//! fragments with sequence numbers, the bounded window of fragments in
//! flight, acknowledgement processing (cumulative + selective), RFC 9002
//! RTT samples, timeout and fast retransmission, and the retry budget.

use super::{
    config::{SessionConfig, FAST_RETRANSMIT_ACKS, RECV_WINDOW_FRAGMENTS},
    rtt::RttEstimator,
    wire::FRAG_DATA_MAX,
    Event, MsgId,
};
use std::{collections::VecDeque, time::Duration, time::Instant};

/// Bytes charged per queued message on top of its payload, so that many
/// tiny messages cannot escape `send_queue_bytes_max`.
pub const MESSAGE_OVERHEAD_BYTES: usize = 64;

struct OutMsg {
    id: MsgId,
    first_sn: u32,
    count: u32,
    acked: u32,
    data: Vec<u8>,
}

#[derive(Default, Clone, Copy)]
struct OutFrag {
    sent_at: Option<Instant>,
    transmissions: u8,
    acked: bool,
    lost: bool,
    fast_acks: u8,
}

/// The authenticated peer acknowledged something this side never sent.
#[derive(Debug, PartialEq, Eq)]
pub struct BogusAck;

/// A fragment's budget of transmissions is spent.
#[derive(Debug, PartialEq, Eq)]
pub struct BudgetExhausted;

#[derive(Default)]
pub struct SendSide {
    /// Sequence number of `frags[0]`: every fragment below it is acked.
    una: u32,
    msgs: VecDeque<OutMsg>,
    /// Fragments `una ..`, sent or not.
    frags: VecDeque<OutFrag>,
    /// Index in `frags` of the first fragment never sent.
    unsent: usize,
    bytes: usize,
    backoff: u8,
}

pub const fn fragments_of(len: usize) -> u32 {
    len.div_ceil(FRAG_DATA_MAX) as u32
}

impl SendSide {
    pub fn new(una: u32) -> Self {
        SendSide {
            una,
            ..SendSide::default()
        }
    }

    pub fn is_idle(&self) -> bool {
        self.msgs.is_empty()
    }

    /// Retransmission timeouts in a row (reset by any new ack).
    pub fn backoff(&self) -> u8 {
        self.backoff
    }

    pub fn queued_bytes(&self) -> usize {
        self.bytes
    }

    /// Queue a message whose fragments take sequence numbers from `first_sn`.
    pub fn push(&mut self, id: MsgId, first_sn: u32, data: Vec<u8>) {
        let count = fragments_of(data.len());
        debug_assert_eq!(first_sn, self.una + self.frags.len() as u32);
        self.bytes += data.len() + MESSAGE_OVERHEAD_BYTES;
        self.frags
            .extend(std::iter::repeat_n(OutFrag::default(), count as usize));
        self.msgs.push_back(OutMsg {
            id,
            first_sn,
            count,
            acked: 0,
            data,
        });
    }

    fn window(config: &SessionConfig) -> usize {
        config.send_window_fragments.min(RECV_WINDOW_FRAGMENTS) as usize
    }

    /// The next fragment to (re)send, if any: lost ones first, then new ones
    /// inside the window. Returns (index, sn).
    pub fn next_to_send(&self, config: &SessionConfig) -> Option<(usize, u32)> {
        let window = Self::window(config).min(self.frags.len());
        let lost = self
            .frags
            .iter()
            .take(self.unsent.min(window))
            .position(|f| f.lost && !f.acked);
        let index = lost.or((self.unsent < window).then_some(self.unsent))?;
        Some((index, self.una + index as u32))
    }

    /// The payload and `rest` of fragment `sn`.
    pub fn fragment(&self, sn: u32) -> (u8, &[u8]) {
        let m = self.msg_of(sn);
        let k = (sn - self.msgs[m].first_sn) as usize;
        let msg = &self.msgs[m];
        let start = k * FRAG_DATA_MAX;
        let end = (start + FRAG_DATA_MAX).min(msg.data.len());
        ((msg.count as usize - 1 - k) as u8, &msg.data[start..end])
    }

    fn msg_of(&self, sn: u32) -> usize {
        match self.msgs.binary_search_by(|m| m.first_sn.cmp(&sn)) {
            Ok(i) => i,
            Err(i) => i - 1,
        }
    }

    pub fn on_sent(&mut self, index: usize, now: Instant) {
        let f = &mut self.frags[index];
        f.sent_at = Some(now);
        f.transmissions = f.transmissions.saturating_add(1);
        f.lost = false;
        f.fast_acks = 0;
        if index == self.unsent {
            self.unsent += 1;
        }
    }

    /// When the earliest unacknowledged fragment in flight times out.
    pub fn deadline(&self, rtt: &RttEstimator) -> Option<Instant> {
        let rto = rtt.rto(self.backoff);
        self.in_flight()
            .filter_map(|f| f.sent_at)
            .min()
            .map(|t| t + rto)
    }

    fn in_flight(&self) -> impl Iterator<Item = &OutFrag> {
        self.frags
            .iter()
            .take(self.unsent)
            .filter(|f| !f.acked && !f.lost)
    }

    /// Mark every fragment whose timeout passed as lost and back off.
    pub fn on_timeout(
        &mut self,
        now: Instant,
        rtt: &RttEstimator,
        config: &SessionConfig,
    ) -> Result<(), BudgetExhausted> {
        let rto = rtt.rto(self.backoff);
        let mut any = false;
        for f in self.frags.iter_mut().take(self.unsent) {
            if !f.acked && !f.lost && f.sent_at.is_some_and(|t| t + rto <= now) {
                f.lost = true;
                any = true;
            }
        }
        if any {
            self.backoff = self.backoff.saturating_add(1);
        }
        self.check_budget(config)
    }

    fn check_budget(&self, config: &SessionConfig) -> Result<(), BudgetExhausted> {
        let spent = self
            .frags
            .iter()
            .any(|f| f.lost && !f.acked && f.transmissions >= config.transmissions_max);
        if spent {
            Err(BudgetExhausted)
        } else {
            Ok(())
        }
    }

    /// Apply an ACK frame. Emits `Acked` for every message completed by it.
    #[allow(clippy::too_many_arguments)]
    pub fn on_ack(
        &mut self,
        now: Instant,
        una: u32,
        sack: u64,
        ack_delay: Duration,
        rtt: &mut RttEstimator,
        config: &SessionConfig,
        events: &mut VecDeque<Event>,
    ) -> Result<Result<(), BudgetExhausted>, BogusAck> {
        let sent_end = self.una.wrapping_add(self.unsent as u32);
        if una > sent_end {
            return Err(BogusAck);
        }
        let mut newly: Vec<usize> = Vec::new();
        let cumulative = una.saturating_sub(self.una) as usize;
        for i in 0..cumulative {
            if !self.frags[i].acked {
                newly.push(i);
            }
        }
        for bit in 0..64u32 {
            if sack & (1u64 << bit) == 0 {
                continue;
            }
            let sn = una as u64 + 1 + bit as u64;
            if sn >= sent_end as u64 {
                return Err(BogusAck);
            }
            if sn < self.una as u64 {
                continue; // a stale ack of something already acknowledged
            }
            let i = (sn - self.una as u64) as usize;
            if !self.frags[i].acked && !newly.contains(&i) {
                newly.push(i);
            }
        }
        if newly.is_empty() {
            return Ok(Ok(()));
        }
        newly.sort_unstable();
        self.sample_rtt(now, &newly, ack_delay, rtt);
        self.count_fast_acks(&newly);
        for &i in &newly {
            self.frags[i].acked = true;
            self.complete_fragment(self.una + i as u32, events);
        }
        self.backoff = 0;
        self.advance();
        Ok(self.check_budget(config))
    }

    fn sample_rtt(
        &self,
        now: Instant,
        newly: &[usize],
        ack_delay: Duration,
        rtt: &mut RttEstimator,
    ) {
        let latest = newly
            .iter()
            .map(|&i| self.frags[i])
            .filter(|f| f.transmissions == 1)
            .filter_map(|f| f.sent_at)
            .max();
        if let Some(sent_at) = latest {
            rtt.update(now.saturating_duration_since(sent_at), ack_delay);
        }
    }

    /// A fragment still unacknowledged while fragments sent after it are
    /// acknowledged counts those acks; at FAST_RETRANSMIT_ACKS it is lost.
    fn count_fast_acks(&mut self, newly: &[usize]) {
        for i in 0..self.unsent {
            let f = self.frags[i];
            let Some(sent_at) = f.sent_at else { continue };
            if f.acked || f.lost || newly.contains(&i) {
                continue;
            }
            let later = newly
                .iter()
                .filter(|&&j| j > i && self.frags[j].sent_at.is_some_and(|t| t >= sent_at))
                .count();
            let f = &mut self.frags[i];
            f.fast_acks = f.fast_acks.saturating_add(later.min(255) as u8);
            if f.fast_acks >= FAST_RETRANSMIT_ACKS {
                f.lost = true;
            }
        }
    }

    fn complete_fragment(&mut self, sn: u32, events: &mut VecDeque<Event>) {
        let m = self.msg_of(sn);
        let msg = &mut self.msgs[m];
        msg.acked += 1;
        debug_assert!(msg.acked <= msg.count);
        if msg.acked == msg.count {
            events.push_back(Event::Acked(msg.id));
        }
    }

    /// Drop acknowledged fragments and completed messages from the front.
    fn advance(&mut self) {
        while self.frags.front().is_some_and(|f| f.acked) {
            self.frags.pop_front();
            self.una += 1;
            self.unsent -= 1;
        }
        while self.msgs.front().is_some_and(|m| m.acked == m.count) {
            let m = self.msgs.pop_front().expect("front exists");
            self.bytes -= m.data.len() + MESSAGE_OVERHEAD_BYTES;
        }
    }

    /// Report every message not completely acknowledged as given up and
    /// forget everything.
    pub fn give_up(&mut self, events: &mut VecDeque<Event>) {
        for m in self.msgs.drain(..) {
            if m.acked < m.count {
                events.push_back(Event::GivenUp {
                    id: m.id,
                    data: m.data,
                });
            }
        }
        self.una += self.frags.len() as u32;
        self.frags.clear();
        self.unsent = 0;
        self.bytes = 0;
    }
}
