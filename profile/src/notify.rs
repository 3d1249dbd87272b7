//! Change notifications: every committed change of a user's profile,
//! friends, pending requests, block list or credentials is pushed as `Invalidate { user, version }` to every subscribed
//! connection.
//!
//! Each subscription has a bounded queue (`server.subscriber_events_max`).
//! A subscriber that falls behind that far loses its queued events, which
//! are replaced by one `CacheReset` (counted in
//! `profile_subscriber_resets_total`): its cache is dropped, never wrong.

use proto::profile::{Event, UserId};
use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, Weak},
};
use tokio::sync::Notify;

/// The events waiting for one subscribed connection.
pub struct Subscription {
    queue: Mutex<VecDeque<Event>>,
    max: usize,
    ready: Notify,
}

impl Subscription {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Event>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, event: Event) {
        let mut q = self.lock();
        if q.len() >= self.max {
            q.clear();
            q.push_back(Event::CacheReset);
            metrics::counter!("profile_subscriber_resets_total").increment(1);
        } else {
            q.push_back(event);
        }
        drop(q);
        self.ready.notify_one();
    }

    /// Take every queued event, waiting until there is one.
    pub async fn next_events(&self) -> Vec<Event> {
        loop {
            let taken: Vec<Event> = self.lock().drain(..).collect();
            if !taken.is_empty() {
                return taken;
            }
            self.ready.notified().await;
        }
    }
}

/// Every live subscription.
#[derive(Default)]
pub struct Hub {
    subs: Mutex<Vec<Weak<Subscription>>>,
}

impl Hub {
    /// A new subscription; its first event is `CacheReset`. Dropping the
    /// returned handle unsubscribes.
    pub fn subscribe(&self, max: usize) -> Arc<Subscription> {
        let sub = Arc::new(Subscription {
            queue: Mutex::new(VecDeque::from([Event::CacheReset])),
            max: max.max(1),
            ready: Notify::new(),
        });
        sub.ready.notify_one();
        let mut subs = self.subs.lock().unwrap_or_else(|p| p.into_inner());
        subs.retain(|w| w.strong_count() > 0);
        subs.push(Arc::downgrade(&sub));
        metrics::gauge!("profile_subscribers").set(subs.len() as f64);
        sub
    }

    /// Push one `Invalidate` per change to every subscriber.
    pub fn publish(&self, changes: &[(UserId, u64)]) {
        if changes.is_empty() {
            return;
        }
        let live: Vec<Arc<Subscription>> = {
            let mut subs = self.subs.lock().unwrap_or_else(|p| p.into_inner());
            subs.retain(|w| w.strong_count() > 0);
            subs.iter().filter_map(Weak::upgrade).collect()
        };
        for sub in &live {
            for &(user, version) in changes {
                sub.push(Event::Invalidate { user, version });
            }
        }
        let sent = (live.len() * changes.len()) as u64;
        metrics::counter!("profile_invalidations_sent_total").increment(sent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reset_first_then_invalidations_and_reset_on_overflow() {
        let hub = Hub::default();
        let sub = hub.subscribe(3);
        assert_eq!(sub.next_events().await, vec![Event::CacheReset]);
        hub.publish(&[(1, 2), (3, 4)]);
        assert_eq!(
            sub.next_events().await,
            vec![
                Event::Invalidate {
                    user: 1,
                    version: 2
                },
                Event::Invalidate {
                    user: 3,
                    version: 4
                }
            ]
        );
        hub.publish(&[(1, 3), (1, 4), (1, 5), (1, 6), (2, 9)]);
        assert_eq!(
            sub.next_events().await,
            vec![
                Event::CacheReset,
                Event::Invalidate {
                    user: 2,
                    version: 9
                }
            ],
            "past the limit the queue collapses into one reset"
        );
        drop(sub);
        hub.publish(&[(1, 7)]);
        assert!(
            hub.subs.lock().unwrap().is_empty(),
            "dropped subscriptions go"
        );
    }
}
