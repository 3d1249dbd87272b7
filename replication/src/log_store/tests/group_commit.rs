//! Group commit: appends queued while the writer is busy share one sync.

use super::{append, config, entry, open, runtime};
use crate::FsyncPolicy;

#[test]
#[allow(clippy::await_holding_lock)] // the gate is meant to stop the writer across the appends
fn queued_appends_share_syncs_and_every_callback_fires_ok() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let mut store = open(dir.path(), &config(FsyncPolicy::Always, 1 << 20, 0));
        let mut callbacks = Vec::new();
        {
            // Hold the writer back so all ten appends are queued at once
            // (it takes the first, then waits here before draining).
            let shared = store.shared();
            let _gate = shared.gate.lock().unwrap();
            for call in 0..10u64 {
                let batch = (1..=100).map(|i| entry(1, call * 100 + i, 8)).collect();
                callbacks.push(append(&mut store, batch).await);
            }
            // Readable before any of them was written, with no cache budget.
            assert_eq!(store.read(..).unwrap().len(), 1000);
            assert_eq!(store.syncs_total(), 0, "nothing synced while held");
        }
        for rx in callbacks {
            rx.await.unwrap().unwrap();
        }
        let syncs = store.syncs_total();
        assert!((1..10).contains(&syncs), "{syncs} syncs for 10 appends");
        store.close().await;
    });
    let store = runtime().block_on(async { open(dir.path(), &super::LogStoreConfig::default()) });
    let entries = store.read(..).unwrap();
    assert_eq!(entries.len(), 1000);
    assert!(entries
        .iter()
        .enumerate()
        .all(|(i, e)| e.log_id.index == i as u64 + 1));
}

#[test]
fn without_a_held_writer_every_append_is_still_acknowledged_after_its_sync() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let mut store = open(dir.path(), &config(FsyncPolicy::Always, 1 << 20, 1 << 20));
        let mut callbacks = Vec::new();
        for i in 1..=50 {
            callbacks.push(append(&mut store, vec![entry(1, i, 8)]).await);
        }
        for rx in callbacks {
            rx.await.unwrap().unwrap();
        }
        let syncs = store.syncs_total();
        assert!((1..=50).contains(&syncs), "{syncs} syncs");
        store.close().await;
    });
}
