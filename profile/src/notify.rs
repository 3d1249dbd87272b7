//! Change notifications: every committed change of a user's profile,
//! friends, pending requests, block list, credentials or chat group list
//! is pushed as `Invalidate { user, version }`, and every committed change
//! of a chat group (name, topic, members, roles, join requests, dissolve)
//! as `GroupChanged { group, version }`, to every subscribed connection,
//! in commit order.
//!
//! Each subscription has a bounded queue (`server.subscriber_events_max`).
//! A subscriber that falls behind that far loses its queued events, which
//! are replaced by one `CacheReset` (counted in
//! `profile_subscriber_resets_total`): its cache is dropped, never wrong.

use proto::profile::Event;
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

    /// Push the events of committed changes, in order, to every
    /// subscriber.
    pub fn publish(&self, changes: &[Event]) {
        if changes.is_empty() {
            return;
        }
        let live: Vec<Arc<Subscription>> = {
            let mut subs = self.subs.lock().unwrap_or_else(|p| p.into_inner());
            subs.retain(|w| w.strong_count() > 0);
            subs.iter().filter_map(Weak::upgrade).collect()
        };
        for sub in &live {
            for &event in changes {
                sub.push(event);
            }
        }
        let groups = changes
            .iter()
            .filter(|e| matches!(e, Event::GroupChanged { .. }))
            .count();
        let users = changes.len() - groups;
        metrics::counter!("profile_invalidations_sent_total")
            .increment((live.len() * users) as u64);
        metrics::counter!("profile_group_events_sent_total")
            .increment((live.len() * groups) as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv(changes: &[(u64, u64)]) -> Vec<Event> {
        changes
            .iter()
            .map(|&(user, version)| Event::Invalidate { user, version })
            .collect()
    }

    #[tokio::test]
    async fn reset_first_then_invalidations_and_reset_on_overflow() {
        let hub = Hub::default();
        let sub = hub.subscribe(3);
        assert_eq!(sub.next_events().await, vec![Event::CacheReset]);
        hub.publish(&inv(&[(1, 2), (3, 4)]));
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
        hub.publish(&inv(&[(1, 3), (1, 4), (1, 5), (1, 6), (2, 9)]));
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
        let group = proto::groups::GROUP_ID_BASE + 1;
        let changed = Event::GroupChanged { group, version: 2 };
        hub.publish(&[inv(&[(4, 1)])[0], changed]);
        assert_eq!(
            sub.next_events().await,
            [inv(&[(4, 1)])[0], changed],
            "group events in between, in order"
        );
        drop(sub);
        hub.publish(&inv(&[(1, 7)]));
        assert!(
            hub.subs.lock().unwrap().is_empty(),
            "dropped subscriptions go"
        );
    }
}
