//! The writer thread: a failed sync poisons the store, truncation is
//! ordered after queued appends, and the relaxed fsync policies.

use super::{append, append_flushed, config, entry, open, runtime};
use crate::{log_store::LogStoreError, FsyncPolicy};
use std::{
    sync::{atomic::Ordering, mpsc},
    time::Duration,
};

#[test]
fn a_failed_sync_is_reported_and_every_later_write_refused() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let mut store = open(dir.path(), &config(FsyncPolicy::Always, 1 << 20, 0));
        append_flushed(&mut store, vec![entry(1, 1, 4)]).await;
        store.shared().fail_syncs.store(true, Ordering::Relaxed);
        let result = append(&mut store, vec![entry(1, 2, 4)])
            .await
            .await
            .unwrap();
        assert!(result.is_err(), "the callback reports the failed sync");
        store.shared().fail_syncs.store(false, Ordering::Relaxed);
        let refused = store.append_with(vec![entry(1, 3, 4)], |_| {}).await;
        assert!(
            matches!(refused, Err(LogStoreError::Poisoned(_))),
            "{refused:?}"
        );
        let refused = store.truncate_from(1).await;
        assert!(
            matches!(refused, Err(LogStoreError::Poisoned(_))),
            "{refused:?}"
        );
        let refused = store.write_vote(&openraft::Vote::new(2, 1)).await;
        assert!(
            matches!(refused, Err(LogStoreError::Poisoned(_))),
            "{refused:?}"
        );
        store.close().await;
    });
}

#[test]
fn a_truncation_is_carried_out_after_the_appends_queued_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(FsyncPolicy::Always, 100, 0);
    runtime().block_on(async {
        let mut store = open(dir.path(), &config);
        // Hold the writer from another thread for a while.
        let shared = store.shared();
        let (locked_tx, locked_rx) = mpsc::channel();
        let holder = std::thread::spawn(move || {
            let _gate = shared.gate.lock().unwrap();
            locked_tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(200));
        });
        locked_rx.recv().unwrap();
        let queued = append(&mut store, (1..=10).map(|i| entry(1, i, 4)).collect()).await;
        // Entries 5..=10 are still queued: the truncation waits for them.
        store.truncate_from(5).await.unwrap();
        queued.await.unwrap().unwrap();
        holder.join().unwrap();
        append_flushed(&mut store, (5..=7).map(|i| entry(2, i, 30)).collect()).await;
        store.close().await;
    });
    let store = open(dir.path(), &config);
    let want: Vec<_> = (1..=4)
        .map(|i| entry(1, i, 4))
        .chain((5..=7).map(|i| entry(2, i, 30)))
        .collect();
    assert_eq!(store.read(..).unwrap(), want);
}

#[test]
fn under_interval_callbacks_come_before_the_sync_which_follows() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let mut store = open(
            dir.path(),
            &config(FsyncPolicy::IntervalMs(300), 1 << 20, 0),
        );
        append_flushed(&mut store, vec![entry(1, 1, 4)]).await;
        assert_eq!(store.syncs_total(), 0, "acknowledged before any sync");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while store.syncs_total() == 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(store.syncs_total(), 1, "synced once the interval passed");
        store.close().await;
    });
}

#[test]
fn under_never_nothing_is_synced() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let mut store = open(dir.path(), &config(FsyncPolicy::Never, 64, 0));
        for i in 1..=20 {
            append_flushed(&mut store, vec![entry(1, i, 4)]).await;
        }
        store.truncate_from(10).await.unwrap();
        assert_eq!(store.syncs_total(), 0);
        store.close().await;
    });
}
