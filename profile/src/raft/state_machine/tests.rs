//! The profile state machine against itself: replicas applying the same
//! entries hold the same bytes, what was applied survives a reopen, and a
//! snapshot installed on a replica replaces everything it held.

use super::*;
use crate::store::{groups::GroupOp, ops::WriteOp};
use openraft::{CommittedLeaderId, Membership};
use proto::profile::ErrorCode;
use std::collections::{BTreeMap, BTreeSet};

const MAP_BYTES: u64 = 64 << 20;

struct Replica {
    sm: StateMachine,
    store: Arc<Store>,
    _dir: tempfile::TempDir,
}

/// The state machine over the store in `dir`.
fn open(dir: &std::path::Path) -> (StateMachine, Arc<Store>) {
    let store = Arc::new(Store::open(&dir.join("store"), MAP_BYTES, Limits::default()).unwrap());
    let hub = Arc::new(Hub::default());
    let shared = Shared::new(store.clone(), hub, dir.join("snapshots"), MAP_BYTES).unwrap();
    (StateMachine { shared }, store)
}

fn replica() -> Replica {
    let dir = tempfile::tempdir().unwrap();
    let (sm, store) = open(dir.path());
    Replica {
        sm,
        store,
        _dir: dir,
    }
}

fn log_id(index: u64) -> LogId<ReplicaId> {
    LogId::new(CommittedLeaderId::new(1, 1), index)
}

fn membership(index: u64) -> Entry<TypeConfig> {
    let nodes: BTreeMap<ReplicaId, super::Replica> =
        (1..=3).map(|id| (id, super::Replica::default())).collect();
    let voters: BTreeSet<ReplicaId> = nodes.keys().copied().collect();
    Entry {
        log_id: log_id(index),
        payload: EntryPayload::Membership(Membership::new(vec![voters], nodes)),
    }
}

fn batch(index: u64, now_ms: u64, ops: Vec<WriteOp>) -> Entry<TypeConfig> {
    Entry {
        log_id: log_id(index),
        payload: EntryPayload::Normal(Batch { now_ms, ops }),
    }
}

fn create(name: &str) -> WriteOp {
    WriteOp::CreateUser {
        username: name.into(),
        phc: format!("phc-of-{name}"),
    }
}

/// Membership, two users, a refused duplicate, a profile and a group.
fn history() -> Vec<Entry<TypeConfig>> {
    vec![
        membership(1),
        batch(2, 1_000, vec![create("alice"), create("bob")]),
        batch(
            3,
            2_000,
            vec![
                create("alice"),
                WriteOp::SetProfile {
                    user: 1,
                    nickname: Some("Al".into()),
                    signature: None,
                },
                WriteOp::Group(GroupOp::Create {
                    owner: 2,
                    name: "book club".into(),
                    topic: String::new(),
                }),
            ],
        ),
    ]
}

/// Every key and value of every database.
fn contents(store: &Store) -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
    let rtxn = store.env.read_txn().unwrap();
    let mut all = Vec::new();
    for (name, db) in store.every_database() {
        for pair in db.iter(&rtxn).unwrap() {
            let (k, v) = pair.unwrap();
            all.push((name, k.to_vec(), v.to_vec()));
        }
    }
    all
}

#[tokio::test]
async fn replicas_applying_the_same_entries_hold_the_same_bytes() {
    let (mut a, mut b) = (replica(), replica());
    let answers_a = a.sm.apply(history()).await.unwrap();
    let answers_b = b.sm.apply(history()).await.unwrap();
    assert_eq!(answers_a, answers_b);
    assert_eq!(answers_a.len(), 3);
    let refused = &answers_a[2].0[0];
    assert_eq!(
        refused.as_ref().unwrap_err().code,
        ErrorCode::UsernameTaken,
        "{refused:?}"
    );
    assert!(
        answers_a[2].0[1..].iter().all(Result::is_ok),
        "{answers_a:?}"
    );
    // The leader's clock, not the replica's, is what was stored.
    assert_eq!(a.store.account(1).unwrap().created_ms, 1_000);
    assert_eq!(contents(&a.store), contents(&b.store));
    let (applied, members) = a.sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(3)));
    assert_eq!(members.log_id(), &Some(log_id(1)));
}

#[tokio::test]
async fn what_was_applied_survives_reopening_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let (mut sm, store) = open(dir.path());
    sm.apply(history()).await.unwrap();
    let before = contents(&store);
    let closing = store.env.clone().prepare_for_closing();
    drop((sm, store));
    closing.wait();
    let (mut sm, store) = open(dir.path());
    let (applied, members) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(3)));
    assert_eq!(members.membership().voter_ids().count(), 3);
    assert_eq!(contents(&store), before);
}

#[tokio::test]
async fn an_installed_snapshot_replaces_everything_the_replica_held() {
    let (mut a, mut b) = (replica(), replica());
    a.sm.apply(history()).await.unwrap();
    // B holds something A never had.
    b.sm.apply(vec![batch(1, 5, vec![create("mallory")])])
        .await
        .unwrap();
    let built =
        a.sm.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
    assert_eq!(built.meta.last_log_id, Some(log_id(3)));
    let mut sent = built.snapshot;
    let mut received = b.sm.begin_receiving_snapshot().await.unwrap();
    tokio::io::copy(&mut sent, &mut *received).await.unwrap();
    b.sm.install_snapshot(&built.meta, received).await.unwrap();
    assert_eq!(contents(&b.store), contents(&a.store));
    assert!(b.store.lookup("mallory").is_err());
    assert_eq!(b.store.lookup("alice").unwrap(), 1);
    let (applied, _) = b.sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(3)));
    let current = b.sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta, built.meta);
    // Entries after the snapshot apply on top of it, the same on both.
    let next = || vec![batch(4, 3_000, vec![create("carol")])];
    let (on_a, on_b) = (
        a.sm.apply(next()).await.unwrap(),
        b.sm.apply(next()).await.unwrap(),
    );
    assert_eq!(on_a, on_b);
    assert_eq!(contents(&b.store), contents(&a.store));
}
