//! The receiving half of a session's reliability: the bounded reorder
//! buffer, in-order reassembly of fragmented messages, duplicate drops and
//! when and what to acknowledge.

use super::{
    config::{MAX_ACK_DELAY, MESSAGE_BYTES_MAX, RECV_WINDOW_FRAGMENTS},
    send_side::fragments_of,
    Event,
};
use std::{collections::VecDeque, time::Instant};

/// Fragments of the largest message.
pub const MESSAGE_FRAGMENTS_MAX: u32 = fragments_of(MESSAGE_BYTES_MAX);

/// The authenticated peer broke the fragment rules (a message longer than
/// the limit, or a fragment chain out of order).
#[derive(Debug, PartialEq, Eq)]
pub struct BadFragments;

/// What happened to one received fragment.
#[derive(Debug, PartialEq, Eq)]
pub enum FragOutcome {
    Buffered,
    Duplicate,
    /// Beyond the receive window: dropped (the sender retransmits).
    OutOfWindow,
}

#[derive(Default)]
pub struct RecvSide {
    /// Index i holds fragment `next + i` if received.
    buf: VecDeque<Option<(u8, Vec<u8>)>>,
    assembling: Vec<u8>,
    /// `rest` the next fragment of the message being assembled must carry.
    expect_rest: Option<u8>,
    ack_pending: bool,
    ack_now: bool,
    eliciting: u8,
    first_unacked_at: Option<Instant>,
}

impl RecvSide {
    pub fn is_idle(&self) -> bool {
        self.buf.is_empty() && self.assembling.is_empty() && !self.ack_pending
    }

    /// Take fragment `sn`; `next` is the first sequence number not yet
    /// delivered and advances as messages complete.
    pub fn on_frag(
        &mut self,
        next: &mut u32,
        sn: u32,
        rest: u8,
        data: &[u8],
        events: &mut VecDeque<Event>,
    ) -> Result<FragOutcome, BadFragments> {
        if sn < *next {
            self.ack_now = true;
            return Ok(FragOutcome::Duplicate);
        }
        let offset = (sn - *next) as usize;
        if offset >= RECV_WINDOW_FRAGMENTS as usize {
            self.ack_now = true;
            return Ok(FragOutcome::OutOfWindow);
        }
        if offset > 0 {
            self.ack_now = true; // out of order: tell the sender at once
        }
        if self.buf.len() <= offset {
            self.buf.resize(offset + 1, None);
        }
        if self.buf[offset].is_some() {
            return Ok(FragOutcome::Duplicate);
        }
        self.buf[offset] = Some((rest, data.to_vec()));
        self.deliver(next, events)?;
        Ok(FragOutcome::Buffered)
    }

    fn deliver(
        &mut self,
        next: &mut u32,
        events: &mut VecDeque<Event>,
    ) -> Result<(), BadFragments> {
        while let Some(Some(_)) = self.buf.front() {
            let (rest, data) = self.buf.pop_front().flatten().expect("checked");
            *next += 1;
            match self.expect_rest {
                Some(expected) if expected != rest => return Err(BadFragments),
                None if rest as u32 >= MESSAGE_FRAGMENTS_MAX => return Err(BadFragments),
                _ => {}
            }
            if self.assembling.len() + data.len() > MESSAGE_BYTES_MAX {
                return Err(BadFragments);
            }
            if rest == 0 {
                let message = if self.assembling.is_empty() {
                    data
                } else {
                    self.assembling.extend_from_slice(&data);
                    std::mem::take(&mut self.assembling)
                };
                self.expect_rest = None;
                // A whole message arrived: its sender may be waiting on
                // the ack (a gateway answers "delivered" only then), so
                // acknowledge with the next transmit instead of after
                // MAX_ACK_DELAY. A reply queued meanwhile carries it.
                self.ack_now = true;
                events.push_back(Event::Message(message));
            } else {
                self.assembling.extend_from_slice(&data);
                self.expect_rest = Some(rest - 1);
            }
        }
        Ok(())
    }

    /// An ack-eliciting datagram arrived: acknowledge at the second one or
    /// after MAX_ACK_DELAY.
    pub fn on_ack_eliciting(&mut self, now: Instant) {
        self.ack_pending = true;
        self.eliciting = self.eliciting.saturating_add(1);
        self.first_unacked_at.get_or_insert(now);
        if self.eliciting >= 2 {
            self.ack_now = true;
        }
    }

    /// Whether an ACK must go out now (without waiting for data to carry it).
    pub fn ack_due(&self) -> bool {
        self.ack_pending && self.ack_now
    }

    pub fn ack_deadline(&self) -> Option<Instant> {
        (self.ack_pending && !self.ack_now)
            .then(|| self.first_unacked_at.map(|t| t + MAX_ACK_DELAY))
            .flatten()
    }

    pub fn on_timeout(&mut self, now: Instant) {
        if self.ack_deadline().is_some_and(|t| t <= now) {
            self.ack_now = true;
        }
    }

    /// The ACK frame to send (una, sack, delay in µs), if any is pending;
    /// resets the pending state.
    pub fn take_ack(&mut self, next: u32, now: Instant) -> Option<(u32, u64, u32)> {
        if !self.ack_pending {
            return None;
        }
        let mut sack = 0u64;
        for (i, slot) in self.buf.iter().enumerate().skip(1).take(64) {
            if slot.is_some() {
                sack |= 1u64 << (i - 1);
            }
        }
        let delay = self
            .first_unacked_at
            .map(|t| {
                now.saturating_duration_since(t)
                    .as_micros()
                    .min(u32::MAX as u128) as u32
            })
            .unwrap_or(0);
        self.ack_pending = false;
        self.ack_now = false;
        self.eliciting = 0;
        self.first_unacked_at = None;
        Some((next, sack, delay))
    }
}

const _: () = assert!(MESSAGE_FRAGMENTS_MAX < RECV_WINDOW_FRAGMENTS);
