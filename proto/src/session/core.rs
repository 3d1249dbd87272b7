//! One established session, the part both sides share: transport
//! encryption with the explicit counter, the replay window, reliability
//! (send and receive halves), keepalive and idle expiry, and close.
//!
//! The unresponsive-peer rule (`SessionConfig::unresponsive_timeouts`, the
//! client's): while an ack-eliciting datagram is unanswered (nothing
//! authentic received since it went out), PING probes go out, the first
//! `clamp(rto, after / 16, after / 8)` after the last ack-eliciting
//! datagram, the next ones every `after / 16`; once `unresponsive_timeouts`
//! retransmission or probe timeouts have fired in a row and
//! `unresponsive_after` has passed since the wait began, the session closes
//! (`CloseReason::TimedOut`, CLOSE reason 1).
//!
//! An idle session keeps only what it must (keys, counters, the replay
//! window, RTT estimate, two timestamps); queues and buffers live in a box
//! that exists only while something is queued, in flight, buffered or
//! waiting to be acknowledged.

use super::{
    config::{SessionConfig, COUNTER_LIMIT, MESSAGE_BYTES_MAX},
    crypto::TransportKeys,
    recv_side::{FragOutcome, RecvSide},
    replay::ReplayWindow,
    rtt::RttEstimator,
    send_side::{fragments_of, SendSide, MESSAGE_OVERHEAD_BYTES},
    wire::{self, Frame, FrameWriter, Transport, PLAINTEXT_BYTES_MAX, TRANSPORT_HEADER_BYTES},
    CloseReason, DropReason, Event, MsgId, SendError,
};
use std::{collections::VecDeque, time::Duration, time::Instant};

/// CLOSE frame reason codes.
pub const CLOSE_NORMAL: u8 = 0;
pub const CLOSE_TIMED_OUT: u8 = 1;
pub const CLOSE_PROTOCOL_ERROR: u8 = 2;
pub const CLOSE_COUNTER_EXHAUSTED: u8 = 3;

#[derive(Default)]
struct Active {
    send: SendSide,
    recv: RecvSide,
    ping: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// A CLOSE frame with this code goes out with the next transmit.
    Closing(u8, CloseReason),
    Closed,
}

pub struct Core {
    id: u64,
    keys: TransportKeys,
    send_counter: u64,
    replay: ReplayWindow,
    rtt: RttEstimator,
    next_sn: u32,
    recv_next: u32,
    next_msg: MsgId,
    last_recv: Instant,
    last_send: Instant,
    state: State,
    active: Option<Box<Active>>,
    /// The unresponsive-peer rule: when the oldest ack-eliciting datagram
    /// sent since the last authentic receipt went out.
    awaiting_since: Option<Instant>,
    /// Retransmission and probe timeouts since the last authentic receipt.
    timeouts_in_row: u8,
    /// When the next PING probe goes out (while awaiting an answer).
    next_probe: Option<Instant>,
}

impl Core {
    pub fn new(id: u64, keys: TransportKeys, now: Instant) -> Core {
        Core {
            id,
            keys,
            send_counter: 0,
            replay: ReplayWindow::default(),
            rtt: RttEstimator::default(),
            next_sn: 0,
            recv_next: 0,
            next_msg: 0,
            last_recv: now,
            last_send: now,
            state: State::Open,
            active: None,
            awaiting_since: None,
            timeouts_in_row: 0,
            next_probe: None,
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    pub fn rtt(&self) -> &RttEstimator {
        &self.rtt
    }

    /// Whether nothing is queued, in flight, buffered or awaiting an ack
    /// (the queues and buffers are then freed).
    pub fn is_idle(&self) -> bool {
        self.active.is_none()
    }

    fn active(&mut self) -> &mut Active {
        let una = self.next_sn;
        self.active.get_or_insert_with(|| {
            Box::new(Active {
                send: SendSide::new(una),
                ..Active::default()
            })
        })
    }

    /// Free the queues and buffers once nothing is left in them.
    fn shrink(&mut self) {
        if self
            .active
            .as_ref()
            .is_some_and(|a| a.send.is_idle() && a.recv.is_idle() && !a.ping)
        {
            self.active = None;
        }
    }

    pub fn send(&mut self, data: Vec<u8>, config: &SessionConfig) -> Result<MsgId, SendError> {
        if self.state != State::Open {
            return Err(SendError::Closed);
        }
        if data.is_empty() {
            return Err(SendError::Empty);
        }
        if data.len() > MESSAGE_BYTES_MAX {
            return Err(SendError::TooLarge { len: data.len() });
        }
        let queued = self.active.as_ref().map_or(0, |a| a.send.queued_bytes());
        if queued + data.len() + MESSAGE_OVERHEAD_BYTES > config.send_queue_bytes_max {
            return Err(SendError::QueueFull);
        }
        let count = fragments_of(data.len());
        let Some(end) = self.next_sn.checked_add(count) else {
            return Err(SendError::Closed);
        };
        let id = self.next_msg;
        self.next_msg += 1;
        let first_sn = self.next_sn;
        self.active().send.push(id, first_sn, data);
        self.next_sn = end;
        Ok(id)
    }

    /// Start a clean close: a CLOSE frame goes out with the next transmit;
    /// unacknowledged messages are reported given up.
    pub fn close(&mut self, events: &mut VecDeque<Event>) {
        if self.state == State::Open {
            self.begin_close(CLOSE_NORMAL, CloseReason::Local, events);
        }
    }

    fn begin_close(&mut self, code: u8, reason: CloseReason, events: &mut VecDeque<Event>) {
        if let Some(a) = self.active.as_mut() {
            a.send.give_up(events);
        }
        self.active = None;
        self.state = State::Closing(code, reason);
    }

    /// The peer sent an authentic RESET: close at once, sending nothing.
    pub fn reset(&mut self, events: &mut VecDeque<Event>) {
        if self.state != State::Closed {
            self.finish(CloseReason::Reset, events);
        }
    }

    /// Close at once without telling the peer (it is gone or broken).
    fn finish(&mut self, reason: CloseReason, events: &mut VecDeque<Event>) {
        if let Some(a) = self.active.as_mut() {
            a.send.give_up(events);
        }
        self.active = None;
        self.state = State::Closed;
        events.push_back(Event::Closed(reason));
    }

    /// Take one transport datagram addressed to this session. Returns
    /// whether it carried the newest counter so far (the caller may then
    /// follow the peer to a new address), or why it was dropped; a dropped
    /// datagram changes nothing.
    pub fn handle(
        &mut self,
        now: Instant,
        t: &Transport<'_>,
        config: &SessionConfig,
        events: &mut VecDeque<Event>,
    ) -> Result<bool, DropReason> {
        if self.state == State::Closed {
            return Err(DropReason::Closed);
        }
        let mut plain = [0u8; PLAINTEXT_BYTES_MAX + wire::TAG_BYTES];
        let len = self
            .keys
            .open(t.counter, t.sealed, &mut plain)
            .ok_or(DropReason::Unauthentic)?;
        if !self.replay.check(t.counter) {
            return Err(DropReason::Replayed);
        }
        if !wire::frames_valid(&plain[..len]) {
            return Err(DropReason::Malformed);
        }
        let newest = self.replay.accept(t.counter);
        self.last_recv = now;
        self.awaiting_since = None;
        self.timeouts_in_row = 0;
        self.next_probe = None;
        self.apply(now, &plain[..len], config, events);
        self.shrink();
        Ok(newest)
    }

    fn apply(
        &mut self,
        now: Instant,
        plain: &[u8],
        config: &SessionConfig,
        events: &mut VecDeque<Event>,
    ) {
        let mut eliciting = false;
        for frame in wire::frames(plain).flatten() {
            if self.state == State::Closed {
                return;
            }
            eliciting |= frame.is_ack_eliciting();
            match frame {
                Frame::Ack {
                    una,
                    sack,
                    ack_delay_us,
                } => self.on_ack(now, una, sack, ack_delay_us, config, events),
                Frame::Frag { sn, rest, data } => self.on_frag(sn, rest, data, events),
                Frame::Ping => {}
                Frame::Close { reason } => self.finish(CloseReason::Peer(reason), events),
            }
        }
        if eliciting && self.state == State::Open {
            self.active().recv.on_ack_eliciting(now);
        }
    }

    fn on_ack(
        &mut self,
        now: Instant,
        una: u32,
        sack: u64,
        delay_us: u32,
        config: &SessionConfig,
        events: &mut VecDeque<Event>,
    ) {
        let Some(a) = self.active.as_mut() else {
            // Nothing in flight: only a stale or bogus ack can arrive.
            if una > self.next_sn {
                self.begin_close(CLOSE_PROTOCOL_ERROR, CloseReason::ProtocolError, events);
            }
            return;
        };
        let delay = Duration::from_micros(delay_us as u64);
        match a
            .send
            .on_ack(now, una, sack, delay, &mut self.rtt, config, events)
        {
            Err(_bogus) => {
                self.begin_close(CLOSE_PROTOCOL_ERROR, CloseReason::ProtocolError, events)
            }
            Ok(Err(_exhausted)) => self.begin_close(CLOSE_TIMED_OUT, CloseReason::TimedOut, events),
            Ok(Ok(())) => {}
        }
    }

    fn on_frag(&mut self, sn: u32, rest: u8, data: &[u8], events: &mut VecDeque<Event>) {
        let mut next = self.recv_next;
        let outcome = self
            .active()
            .recv
            .on_frag(&mut next, sn, rest, data, events);
        self.recv_next = next;
        match outcome {
            Ok(FragOutcome::Buffered | FragOutcome::Duplicate | FragOutcome::OutOfWindow) => {}
            Err(_) => self.begin_close(CLOSE_PROTOCOL_ERROR, CloseReason::ProtocolError, events),
        }
    }

    /// Whether a datagram should go out now.
    pub fn wants_transmit(&self, config: &SessionConfig) -> bool {
        match self.state {
            State::Closed => false,
            State::Closing(..) => true,
            State::Open => self.active.as_ref().is_some_and(|a| {
                a.ping || a.recv.ack_due() || a.send.next_to_send(config).is_some()
            }),
        }
    }

    /// Write the next datagram into `buf` (at least DATAGRAM_BYTES_MAX
    /// long); its length, or `None` if there is nothing to send.
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        buf: &mut [u8],
        config: &SessionConfig,
        events: &mut VecDeque<Event>,
    ) -> Option<usize> {
        if !self.wants_transmit(config) {
            return None;
        }
        if self.send_counter >= COUNTER_LIMIT && self.state == State::Open {
            self.begin_close(
                CLOSE_COUNTER_EXHAUSTED,
                CloseReason::CounterExhausted,
                events,
            );
        }
        let plain_at = TRANSPORT_HEADER_BYTES;
        let mut w = FrameWriter::new(&mut buf[plain_at..plain_at + PLAINTEXT_BYTES_MAX]);
        let recv_next = self.recv_next;
        match self.state {
            State::Closing(code, reason) => {
                w.close(code);
                self.state = State::Closed;
                events.push_back(Event::Closed(reason));
            }
            State::Open => {
                let a = self.active.as_mut().expect("wants_transmit saw it");
                if write_frames(a, &mut w, now, recv_next, config)
                    && config.unresponsive_timeouts > 0
                {
                    self.awaiting_since.get_or_insert(now);
                    self.next_probe = Some(now + self.probe_interval(config));
                }
            }
            State::Closed => return None,
        }
        let len = w.len();
        debug_assert!(len > 0);
        wire::write_transport_header(buf, self.id, self.send_counter);
        let sealed = self.keys.seal(self.send_counter, &mut buf[plain_at..], len);
        self.send_counter += 1;
        self.last_send = now;
        self.shrink();
        Some(plain_at + sealed)
    }

    /// The earliest instant `handle_timeout` has something to do.
    pub fn next_timeout(&self, config: &SessionConfig) -> Option<Instant> {
        if self.state == State::Closed {
            return None;
        }
        let mut t = self.last_recv + config.idle_timeout;
        if !config.keepalive.is_zero() {
            t = t.min(self.last_send + config.keepalive);
        }
        if let Some(a) = &self.active {
            let others = [a.recv.ack_deadline(), a.send.deadline(&self.rtt)];
            t = others.into_iter().flatten().fold(t, Instant::min);
        }
        if let Some(p) = self.next_probe {
            t = t.min(p);
        }
        if let Some(dead_at) = self.unresponsive_at(config) {
            t = t.min(dead_at);
        }
        Some(t)
    }

    /// The wait before the next PING probe of the unresponsive-peer rule:
    /// `clamp(rto, after / 16, after / 8)` while no timeout has fired since
    /// the last receipt, then `after / 16`, so that a false verdict needs
    /// about 15 lost round trips in a row whatever the RTT estimate says.
    fn probe_interval(&self, config: &SessionConfig) -> Duration {
        let after = config.unresponsive_after;
        let floor = (after / 16).max(super::config::GRANULARITY);
        if self.timeouts_in_row > 0 {
            return floor;
        }
        self.rtt.rto(0).clamp(floor, (after / 8).max(floor))
    }

    /// When the unresponsive-peer rule closes the session, if enough
    /// timeouts have fired in a row.
    fn unresponsive_at(&self, config: &SessionConfig) -> Option<Instant> {
        let n = config.unresponsive_timeouts;
        if n == 0 || self.timeouts_in_row < n {
            return None;
        }
        self.awaiting_since.map(|t| t + config.unresponsive_after)
    }

    pub fn handle_timeout(
        &mut self,
        now: Instant,
        config: &SessionConfig,
        events: &mut VecDeque<Event>,
    ) {
        if self.state == State::Closed {
            return;
        }
        if now >= self.last_recv + config.idle_timeout {
            self.finish(CloseReason::Expired, events);
            return;
        }
        if !config.keepalive.is_zero() && now >= self.last_send + config.keepalive {
            self.active().ping = true;
        }
        let rtt = self.rtt.clone();
        if let Some(a) = self.active.as_mut() {
            a.recv.on_timeout(now);
            let backoff = a.send.backoff();
            let result = a.send.on_timeout(now, &rtt, config);
            if a.send.backoff() > backoff {
                self.timeouts_in_row = self.timeouts_in_row.saturating_add(1);
            }
            if result.is_err() {
                self.begin_close(CLOSE_TIMED_OUT, CloseReason::TimedOut, events);
            }
        }
        if self.state == State::Open && config.unresponsive_timeouts > 0 {
            self.check_unresponsive(now, config, events);
        }
        self.shrink();
    }

    /// Fire a due PING probe (one more timeout in a row), and close the
    /// session if the peer has been unresponsive long enough.
    fn check_unresponsive(
        &mut self,
        now: Instant,
        config: &SessionConfig,
        events: &mut VecDeque<Event>,
    ) {
        if self.next_probe.is_some_and(|t| t <= now) {
            self.next_probe = None;
            self.timeouts_in_row = self.timeouts_in_row.saturating_add(1);
            self.active().ping = true;
        }
        if self.unresponsive_at(config).is_some_and(|t| t <= now) {
            self.begin_close(CLOSE_TIMED_OUT, CloseReason::TimedOut, events);
        }
    }
}

/// Fill one datagram: the ACK (if one is pending), then lost and new
/// fragments while they fit, then a PING if one is due and nothing else is
/// ack-eliciting. Whether the datagram is ack-eliciting.
fn write_frames(
    a: &mut Active,
    w: &mut FrameWriter<'_>,
    now: Instant,
    recv_next: u32,
    config: &SessionConfig,
) -> bool {
    if let Some((una, sack, delay)) = a.recv.take_ack(recv_next, now) {
        w.ack(una, sack, delay);
    }
    let mut eliciting = false;
    while let Some((index, sn)) = a.send.next_to_send(config) {
        let (rest, data) = a.send.fragment(sn);
        if !w.frag(sn, rest, data) {
            break;
        }
        a.send.on_sent(index, now);
        eliciting = true;
    }
    if a.ping && (eliciting || w.ping()) {
        a.ping = false;
        eliciting = true;
    }
    eliciting
}
