//! Round-trip time estimation and the retransmission timeout, as RFC 9002
//! section 5 and 6.2 compute them (smoothed RTT, variance, minimum RTT,
//! ack delay adjustment, exponential backoff). Times are kept in
//! microseconds as u32 to keep idle sessions small.

use super::config::{GRANULARITY, INITIAL_RTT, MAX_ACK_DELAY, RTO_MAX};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct RttEstimator {
    smoothed_us: u32,
    var_us: u32,
    min_us: u32,
    /// Whether a first sample has been taken.
    sampled: bool,
}

impl Default for RttEstimator {
    fn default() -> Self {
        let initial = INITIAL_RTT.as_micros() as u32;
        RttEstimator {
            smoothed_us: initial,
            var_us: initial / 2,
            min_us: u32::MAX,
            sampled: false,
        }
    }
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u32::MAX as u128) as u32
}

impl RttEstimator {
    pub fn smoothed(&self) -> Duration {
        Duration::from_micros(self.smoothed_us as u64)
    }

    #[cfg(test)]
    pub fn min(&self) -> Option<Duration> {
        self.sampled
            .then(|| Duration::from_micros(self.min_us as u64))
    }

    /// Feed one sample (`latest`: send to ack) with the peer's ack delay.
    pub fn update(&mut self, latest: Duration, ack_delay: Duration) {
        let latest_us = micros(latest).max(1);
        self.min_us = self.min_us.min(latest_us);
        let ack_delay_us = micros(ack_delay.min(MAX_ACK_DELAY));
        // RFC 9002 5.3: subtract the ack delay unless that would go below min_rtt.
        let adjusted = if latest_us >= self.min_us.saturating_add(ack_delay_us) {
            latest_us - ack_delay_us
        } else {
            latest_us
        };
        if !self.sampled {
            self.sampled = true;
            self.smoothed_us = latest_us;
            self.var_us = latest_us / 2;
            return;
        }
        let diff = self.smoothed_us.abs_diff(adjusted);
        self.var_us = ((3 * self.var_us as u64 + diff as u64) / 4) as u32;
        self.smoothed_us = ((7 * self.smoothed_us as u64 + adjusted as u64) / 8) as u32;
    }

    /// The retransmission timeout after `backoff` consecutive timeouts:
    /// (srtt + max(4 rttvar, granularity) + max_ack_delay) * 2^backoff,
    /// at most RTO_MAX.
    pub fn rto(&self, backoff: u8) -> Duration {
        let base = self.smoothed()
            + Duration::from_micros(4 * self.var_us as u64).max(GRANULARITY)
            + MAX_ACK_DELAY;
        base.saturating_mul(1u32 << backoff.min(16)).min(RTO_MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_sample_sets_srtt_and_later_ones_smooth() {
        let mut r = RttEstimator::default();
        assert_eq!(r.smoothed(), INITIAL_RTT);
        r.update(Duration::from_millis(100), Duration::ZERO);
        assert_eq!(r.smoothed(), Duration::from_millis(100));
        assert_eq!(r.min(), Some(Duration::from_millis(100)));
        r.update(Duration::from_millis(200), Duration::ZERO);
        assert_eq!(r.smoothed(), Duration::from_micros(112_500));
        // The ack delay is subtracted when it keeps the sample above min_rtt.
        let mut s = r.clone();
        s.update(Duration::from_millis(200), Duration::from_millis(20));
        assert!(
            s.smoothed() < {
                let mut t = r.clone();
                t.update(Duration::from_millis(200), Duration::ZERO);
                t.smoothed()
            }
        );
    }

    #[test]
    fn rto_backs_off_exponentially_up_to_the_cap() {
        let mut r = RttEstimator::default();
        r.update(Duration::from_millis(10), Duration::ZERO);
        let base = r.rto(0);
        assert_eq!(base, Duration::from_millis(10 + 20 + 25));
        assert_eq!(r.rto(1), base * 2);
        assert_eq!(r.rto(3), base * 8);
        assert_eq!(r.rto(40), RTO_MAX);
    }
}
