//! The store against an in-memory model: random appends, truncations,
//! purges, votes, committed ids and reopens; after every step the log
//! state, every entry, the vote and the committed id must match.

use super::{append, config, entry, log_id, open, runtime, LogStoreConfig, Store, TestConfig};
use crate::FsyncPolicy;
use openraft::{Entry, LogId, Vote};
use proptest::{prelude::*, sample::Index};
use std::{collections::BTreeMap, io, path::Path};
use tokio::sync::oneshot;

#[derive(Debug, Clone)]
enum Op {
    /// `n` entries after the last; `bump`: a new term first.
    Append {
        n: usize,
        bump: bool,
        pad: usize,
    },
    /// Truncate at an index from the first entry to one past the last
    /// (never at or below the committed id).
    Truncate(Index),
    /// Purge up to an index from the first entry to two past the last.
    Purge(Index),
    Vote(u64, u64, bool),
    /// Save an existing entry's id as committed (or None).
    Committed(Option<Index>),
    /// Wait for every callback, close, open again.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1usize..6, any::<bool>(), 0usize..40)
            .prop_map(|(n, bump, pad)| Op::Append { n, bump, pad }),
        2 => any::<Index>().prop_map(Op::Truncate),
        2 => any::<Index>().prop_map(Op::Purge),
        1 => (0u64..5, 0u64..3, any::<bool>()).prop_map(|(t, n, c)| Op::Vote(t, n, c)),
        1 => proptest::option::of(any::<Index>()).prop_map(Op::Committed),
        1 => Just(Op::Reopen),
    ]
}

fn store_config() -> impl Strategy<Value = LogStoreConfig> {
    let fsync = prop_oneof![
        Just(FsyncPolicy::Always),
        Just(FsyncPolicy::IntervalMs(2)),
        Just(FsyncPolicy::Never)
    ];
    let segment = prop_oneof![Just(64u64), Just(300), Just(1 << 20)];
    let cache = prop_oneof![Just(0u64), Just(150), Just(1 << 20)];
    (fsync, segment, cache).prop_map(|(f, s, c)| config(f, s, c))
}

/// What the log should hold.
#[derive(Default)]
struct Model {
    entries: BTreeMap<u64, Entry<TestConfig>>,
    purged: Option<LogId<u64>>,
    vote: Option<Vote<u64>>,
    committed: Option<LogId<u64>>,
    term: u64,
}

impl Model {
    fn last_log_id(&self) -> Option<LogId<u64>> {
        let last = self.entries.values().next_back().map(|e| e.log_id);
        last.or(self.purged)
    }

    fn next_index(&self) -> u64 {
        self.last_log_id().map_or(1, |id| id.index + 1)
    }

    fn first_index(&self) -> u64 {
        let first = self.entries.keys().next().copied();
        first.unwrap_or_else(|| self.next_index())
    }
}

/// The store under test, with the callbacks not yet awaited.
struct Run {
    store: Option<Store>,
    model: Model,
    pending: Vec<oneshot::Receiver<io::Result<()>>>,
}

impl Run {
    fn store(&mut self) -> &mut Store {
        self.store.as_mut().unwrap()
    }

    async fn step(&mut self, op: Op, dir: &Path, config: &LogStoreConfig) {
        match op {
            Op::Append { n, bump, pad } => self.append(n, bump, pad).await,
            Op::Truncate(at) => self.truncate(at).await,
            Op::Purge(at) => self.purge(at).await,
            Op::Vote(term, node, committed) => {
                let mut vote = Vote::new(term, node);
                vote.committed = committed;
                self.store().write_vote(&vote).await.unwrap();
                self.model.vote = Some(vote);
            }
            Op::Committed(at) => self.committed(at).await,
            Op::Reopen => self.reopen(dir, config).await,
        }
    }

    async fn append(&mut self, n: usize, bump: bool, pad: usize) {
        self.model.term += u64::from(bump);
        let first = self.model.next_index();
        let entries: Vec<_> = (0..n as u64)
            .map(|k| entry(self.model.term, first + k, pad))
            .collect();
        for e in &entries {
            self.model.entries.insert(e.log_id.index, e.clone());
        }
        let rx = append(self.store(), entries).await;
        self.pending.push(rx);
    }

    async fn truncate(&mut self, at: Index) {
        let lo = self.model.first_index();
        let span = self.model.next_index() - lo + 1;
        let mut index = lo + at.index(span as usize) as u64;
        if let Some(c) = self.model.committed {
            index = index.max(c.index + 1);
        }
        self.store().truncate_from(index).await.unwrap();
        self.model.entries.split_off(&index);
    }

    async fn purge(&mut self, at: Index) {
        let lo = self.model.first_index();
        let span = self.model.next_index() - lo + 2;
        let index = lo + at.index(span as usize) as u64;
        let id = match self.model.entries.get(&index) {
            Some(e) => e.log_id,
            None => log_id(self.model.term, index),
        };
        self.store().purge_upto(id).await.unwrap();
        if self.model.purged.is_none_or(|p| p.index < index) {
            self.model.purged = Some(id);
            self.model.entries = self.model.entries.split_off(&(index + 1));
        }
    }

    async fn committed(&mut self, at: Option<Index>) {
        let ids: Vec<_> = self.model.entries.values().map(|e| e.log_id).collect();
        let id = at
            .filter(|_| !ids.is_empty())
            .map(|i| ids[i.index(ids.len())]);
        self.store().write_committed(id).await.unwrap();
        self.model.committed = id;
    }

    async fn flush(&mut self) {
        for rx in self.pending.drain(..) {
            rx.await.unwrap().unwrap();
        }
    }

    async fn reopen(&mut self, dir: &Path, config: &LogStoreConfig) {
        self.flush().await;
        self.store.take().unwrap().close().await;
        let store = open(dir, config);
        assert_eq!(
            store.torn_tails_total(),
            0,
            "a clean close leaves no torn tail"
        );
        self.store = Some(store);
    }

    /// The store says what the model says.
    fn check(&mut self) {
        let store = self.store.as_ref().unwrap();
        let state = store.log_state();
        assert_eq!(state.last_purged_log_id, self.model.purged, "purged");
        assert_eq!(state.last_log_id, self.model.last_log_id(), "last log id");
        let want: Vec<_> = self.model.entries.values().cloned().collect();
        assert_eq!(store.read(..).unwrap(), want, "entries");
        let reader = store.reader();
        let mid = self.model.first_index() + want.len() as u64 / 2;
        let tail: Vec<_> = self
            .model
            .entries
            .range(mid..)
            .map(|(_, e)| e.clone())
            .collect();
        assert_eq!(reader.read(mid..).unwrap(), tail, "entries from {mid}");
        assert_eq!(
            store.read(..self.model.first_index()).unwrap(),
            vec![],
            "purged entries"
        );
        assert_eq!(store.vote(), self.model.vote, "vote");
        assert_eq!(store.committed(), self.model.committed, "committed");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn the_store_matches_the_model(config in store_config(),
                                   ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        runtime().block_on(async {
            let mut run = Run {
                store: Some(open(dir.path(), &config)),
                model: Model::default(),
                pending: Vec::new(),
            };
            for op in ops {
                run.step(op, dir.path(), &config).await;
                run.check();
            }
            run.reopen(dir.path(), &config).await;
            run.check();
        });
    }
}
