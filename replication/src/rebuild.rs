//! A replica whose Raft log is damaged rebuilds itself from its peers.
//!
//! Damage with valid entries after it (not a torn tail) means this
//! replica lost entries it may have acknowledged. It must not vote or
//! stand for election until it holds them again: a majority that counts
//! its vote could otherwise elect a leader without an acknowledged write.
//! So, at start ([`open_log`]):
//!
//! 1. If its group has no other member it knows of, it refuses to start
//!    with the damage (file, offset): a lone replica has nobody to copy
//!    from, and only the operator may cut its log.
//! 2. Otherwise it moves its log and its state (the directories the
//!    service names) into `damaged/<unix ms>/` in its data directory
//!    (keeping at most [`DAMAGED_COPIES_MAX`] such copies), writes a
//!    [`Marker`] file, and starts on an empty log that keeps its saved
//!    vote (a vote is a promise; it is never taken back).
//! 3. While the marker exists ([`run`]), elections are off and the
//!    replica grants no vote. In phase [`Phase::Leaving`] it also answers
//!    no Raft RPC (the leader's record of what it had is wrong now) and
//!    asks the leader to take it out of the group ([`AdminRequest::Leave`]).
//!    In phase [`Phase::Returning`] it asks the leader to add it back as a
//!    learner, wait until it has caught up (snapshot, then log), and make
//!    it a voter again ([`AdminRequest::Rejoin`]), as the operator's
//!    `imctl shard group remove-replica` / `add-replica` would. A replica
//!    that was only a learner (an operator's `add-replica` under way) is
//!    added back as a learner and stays one
//!    ([`AdminRequest::RejoinAsLearner`]): promoting it is the operator's
//!    step.
//! 4. Once its own membership names it what it was (voter or learner), it
//!    removes the marker and votes and stands for election again.
//!
//! A restart in the middle carries on from the marker's phase.

use crate::{
    log_store::{LogStore, LogStoreConfig, LogStoreError},
    metrics::metric_name,
    peer::{admin, AdminRequest, AdminResponse},
    GroupTypes, Replica, ReplicaId,
};
use openraft::Raft;
use serde::{Deserialize, Serialize};
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
    time::Duration,
};

/// The marker file, in the replica's data directory.
pub const MARKER_FILE: &str = "rebuilding";
/// Where damaged files are kept, in the replica's data directory.
pub const DAMAGED_DIR: &str = "damaged";
/// Copies of damaged files kept; the oldest goes when another is made.
pub const DAMAGED_COPIES_MAX: usize = 2;
/// Pause between two attempts to reach the leader.
pub const RETRY_MS: u64 = 500;
/// How long one `Leave` may take (a membership change).
pub const LEAVE_DEADLINE_MS: u64 = 10_000;
/// How long one `Rejoin` may take: the leader answers once this replica
/// caught up, which for a large state is a long snapshot transfer.
pub const REJOIN_DEADLINE_MS: u64 = 3_600_000;

/// Where a rebuild stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Asking the leader to take this replica out of the group.
    Leaving,
    /// Out of the group: asking to be added back and caught up.
    Returning,
}

/// The marker file's content: the phase and the group as this replica
/// knew it before the damage (where to look for a leader, and whether it
/// was a voter or only a learner).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub phase: Phase,
    pub members: BTreeMap<ReplicaId, Replica>,
    pub voter: bool,
}

/// A marker written before it recorded `voter` (every rebuild then came
/// back as a voter).
#[derive(Deserialize)]
struct MarkerWithoutRole {
    phase: Phase,
    members: BTreeMap<ReplicaId, Replica>,
}

impl Marker {
    /// The marker in `data`, if there is one.
    pub fn read(data: &Path) -> Result<Option<Marker>, LogStoreError> {
        match crate::log_store::read_meta_file(data, MARKER_FILE) {
            Ok(marker) => Ok(marker),
            Err(e) => {
                match crate::log_store::read_meta_file::<MarkerWithoutRole>(data, MARKER_FILE) {
                    Ok(old) => Ok(old.map(|m| Marker {
                        phase: m.phase,
                        members: m.members,
                        voter: true,
                    })),
                    Err(_) => Err(e),
                }
            }
        }
    }

    fn write(&self, data: &Path) -> Result<(), LogStoreError> {
        crate::log_store::write_meta_file(data, MARKER_FILE, self)
    }

    fn remove(data: &Path) -> Result<(), LogStoreError> {
        let path = data.join(MARKER_FILE);
        std::fs::remove_file(&path).map_err(|e| LogStoreError::io("remove", path, e))?;
        crate::log_store::sync_dir_of(data)
    }
}

/// Which Raft RPCs a replica answers (see the module's steps).
#[derive(Debug)]
pub struct Gate(AtomicU8);

const GATE_CLOSED: u8 = 0;
const GATE_NO_VOTES: u8 = 1;
const GATE_OPEN: u8 = 2;

impl Gate {
    /// A gate for a replica in `phase` of a rebuild (`None`: not rebuilding).
    pub fn new(phase: Option<Phase>) -> Arc<Gate> {
        let state = match phase {
            None => GATE_OPEN,
            Some(Phase::Leaving) => GATE_CLOSED,
            Some(Phase::Returning) => GATE_NO_VOTES,
        };
        Arc::new(Gate(AtomicU8::new(state)))
    }

    /// Whether to answer AppendEntries and InstallSnapshot.
    pub fn replicates(&self) -> bool {
        self.0.load(Ordering::Acquire) != GATE_CLOSED
    }

    /// Whether a vote may be granted.
    pub fn votes(&self) -> bool {
        self.0.load(Ordering::Acquire) == GATE_OPEN
    }

    fn set(&self, state: u8) {
        self.0.store(state, Ordering::Release);
    }
}

/// What [`open_log`] is told about the service.
pub struct Service<'a> {
    /// The replica's data directory (the log is in `raft/` under it).
    pub data: &'a Path,
    /// The directories under `data` holding the service's state, moved
    /// away with the log when it is damaged.
    pub state_dirs: &'a [&'a str],
    pub me: ReplicaId,
    /// Metric prefix (`msgstore`).
    pub prefix: &'static str,
}

/// The group as a replica's state last applied it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KnownGroup {
    pub members: BTreeMap<ReplicaId, Replica>,
    pub voters: BTreeSet<ReplicaId>,
}

impl KnownGroup {
    pub fn of(membership: &openraft::StoredMembership<ReplicaId, Replica>) -> KnownGroup {
        let m = membership.membership();
        KnownGroup {
            members: m.nodes().map(|(id, n)| (*id, n.clone())).collect(),
            voters: m.voter_ids().collect(),
        }
    }
}

/// Open the replica's Raft log; if it is damaged and the group has other
/// members (`known`, asked only then: the group the service's state last
/// applied), set the damage aside and start a rebuild. Returns the log and
/// the rebuild's marker (also one left by an earlier start).
pub async fn open_log<C>(
    service: &Service<'_>,
    config: LogStoreConfig,
    known: impl FnOnce() -> KnownGroup,
) -> Result<(LogStore<C>, Option<Marker>), LogStoreError>
where
    C: GroupTypes,
    C::Entry: Serialize + serde::de::DeserializeOwned + Clone,
{
    let raft_dir = service.data.join("raft");
    let marker = Marker::read(service.data)?;
    let damage = match LogStore::<C>::open(&raft_dir, config.clone()) {
        Ok(log) => return Ok((log, marker)),
        Err(e @ LogStoreError::Damaged { .. }) => e,
        Err(e) => return Err(e),
    };
    let (members, voter) = match marker {
        Some(m) => (m.members, m.voter),
        None => {
            let known = known();
            let voter = known.voters.contains(&service.me);
            (known.members, voter)
        }
    };
    if !members.keys().any(|id| *id != service.me) {
        tracing::error!(error = %damage, "the Raft log is damaged and this replica knows no peer to rebuild from");
        return Err(damage);
    }
    let vote = crate::log_store::read_vote::<C>(&raft_dir)?;
    let kept = set_aside(service)?;
    tracing::error!(
        error = %damage,
        kept = %kept.display(),
        "the Raft log is damaged: its files are set aside and this replica rebuilds from its peers"
    );
    metrics::counter!(metric_name(service.prefix, "raft_rebuilds_total")).increment(1);
    let marker = Marker {
        phase: Phase::Leaving,
        members,
        voter,
    };
    marker.write(service.data)?;
    let mut log = LogStore::<C>::open(&raft_dir, config)?;
    if let Some(vote) = vote {
        log.write_vote(&vote).await?;
    }
    Ok((log, Some(marker)))
}

/// Move `raft/` and the state directories into `damaged/<unix ms>/`,
/// dropping the oldest copies past [`DAMAGED_COPIES_MAX`].
fn set_aside(service: &Service<'_>) -> Result<PathBuf, LogStoreError> {
    let io = |op, path: &Path| {
        let path = path.to_path_buf();
        move |e| LogStoreError::io(op, path, e)
    };
    let root = service.data.join(DAMAGED_DIR);
    std::fs::create_dir_all(&root).map_err(io("create", &root))?;
    let mut copies: Vec<PathBuf> = std::fs::read_dir(&root)
        .map_err(io("list", &root))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    copies.sort();
    while copies.len() >= DAMAGED_COPIES_MAX {
        let oldest = copies.remove(0);
        std::fs::remove_dir_all(&oldest).map_err(io("remove", &oldest))?;
    }
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let kept = root.join(format!("{ms:020}"));
    std::fs::create_dir_all(&kept).map_err(io("create", &kept))?;
    for name in std::iter::once(&"raft").chain(service.state_dirs) {
        let from = service.data.join(name);
        if from.exists() {
            std::fs::rename(&from, kept.join(name)).map_err(io("move", &from))?;
        }
    }
    crate::log_store::sync_dir_of(service.data)?;
    Ok(kept)
}

/// Carry a rebuild to its end (see the module's steps): elections are off
/// until it ends. `me` must be among the marker's members (its addresses
/// are how the group reaches it).
pub async fn run<C: GroupTypes>(
    raft: Raft<C>,
    gate: Arc<Gate>,
    data: PathBuf,
    (me, mut marker): (ReplicaId, Marker),
    prefix: &'static str,
) {
    let rebuilding = metrics::gauge!(metric_name(prefix, "raft_rebuilding"));
    rebuilding.set(1.0);
    let Some(replica) = marker.members.get(&me).cloned() else {
        tracing::error!(
            me,
            "this replica is not among the members it knew; it cannot ask to rejoin \
             (add it with imctl shard group add-replica)"
        );
        return;
    };
    if marker.phase == Phase::Leaving {
        ask_leader(
            &marker,
            me,
            AdminRequest::Leave { id: me },
            LEAVE_DEADLINE_MS,
        )
        .await;
        marker.phase = Phase::Returning;
        if let Err(e) = marker.write(&data) {
            tracing::error!(error = %e, "cannot record the rebuild's phase");
            return;
        }
        gate.set(GATE_NO_VOTES);
        tracing::info!("out of the group; asking to be added back");
    }
    let (rejoin, role) = if marker.voter {
        (AdminRequest::Rejoin { id: me, replica }, "a voter")
    } else {
        (
            AdminRequest::RejoinAsLearner { id: me, replica },
            "a learner",
        )
    };
    ask_leader(&marker, me, rejoin, REJOIN_DEADLINE_MS).await;
    let voter = marker.voter;
    let back = raft
        .wait(None)
        .metrics(
            |m| {
                let membership = m.membership_config.membership();
                match voter {
                    true => membership.voter_ids().any(|v| v == me),
                    false => membership.learner_ids().any(|v| v == me),
                }
            },
            "back in the group",
        )
        .await;
    if let Err(e) = back {
        tracing::warn!(error = %e, role, "stopped before being back in the group");
        return;
    }
    if let Err(e) = Marker::remove(&data) {
        tracing::error!(error = %e, "cannot remove the rebuild marker");
        return;
    }
    gate.set(GATE_OPEN);
    raft.runtime_config().elect(true);
    rebuilding.set(0.0);
    tracing::info!(role, "rebuilt from the group: back as what it was");
}

/// Send `request` to the group's leader until it answers `Done`: try each
/// member the marker names (not this one, `me`), follow `NotLeader`, pause
/// [`RETRY_MS`] after a round that reached no leader.
async fn ask_leader(marker: &Marker, me: ReplicaId, request: AdminRequest, deadline_ms: u64) {
    let peers: Vec<String> = marker
        .members
        .iter()
        .filter(|(id, _)| **id != me)
        .map(|(_, r)| r.raft_addr.clone())
        .collect();
    let deadline = Duration::from_millis(deadline_ms);
    loop {
        for peer in &peers {
            let mut addr = peer.clone();
            for _redirect in 0..peers.len() + 1 {
                match admin(&addr, request.clone(), deadline).await {
                    Ok(AdminResponse::Done) => return,
                    Ok(AdminResponse::NotLeader { leader: Some(l) }) => addr = l,
                    Ok(other) => {
                        tracing::info!(peer = %addr, answer = ?other, "rebuild: not done yet");
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(peer = %addr, error = %e, "rebuild: peer unreachable");
                        break;
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(RETRY_MS)).await;
    }
}

/// The leader's side of [`AdminRequest::Leave`]: take `id` out of the
/// group (as voter and as learner). Done if it is not a member.
pub async fn leave<C: GroupTypes>(raft: &Raft<C>, id: ReplicaId) -> AdminResponse {
    use openraft::ChangeMembers;
    let membership = raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .clone();
    let change = if membership.voter_ids().any(|v| v == id) {
        if membership.voter_ids().count() <= 1 {
            return AdminResponse::Failed(format!("replica {id} is the group's only voter"));
        }
        ChangeMembers::RemoveVoters([id].into())
    } else if membership.get_node(&id).is_some() {
        ChangeMembers::RemoveNodes([id].into())
    } else {
        return crate::group::done_if_leader(raft);
    };
    tracing::warn!(
        id,
        "a replica with a damaged log leaves the group to rebuild"
    );
    match raft.change_membership(change, false).await {
        Ok(_) => AdminResponse::Done,
        Err(e) => crate::group::write_error(e),
    }
}

/// The leader's side of [`AdminRequest::Rejoin`] (`voter`) and of
/// [`AdminRequest::RejoinAsLearner`]: add `id` as a learner, wait until it
/// caught up, and make it a voter if it asks to be one. `Done` at once if
/// it already is what it asks to be (a learner: any member).
pub async fn rejoin<C: GroupTypes>(
    raft: &Raft<C>,
    id: ReplicaId,
    replica: Replica,
    voter: bool,
) -> AdminResponse {
    use openraft::ChangeMembers;
    let m = raft.metrics().borrow().membership_config.clone();
    let is_voter = m.membership().voter_ids().any(|v| v == id);
    let is_member = m.membership().nodes().any(|(n, _)| *n == id);
    if is_voter || (!voter && is_member) {
        return crate::group::done_if_leader(raft);
    }
    tracing::info!(id, voter, "a rebuilding replica comes back as a learner");
    if let Err(e) = raft.add_learner(id, replica, true).await {
        return crate::group::write_error(e);
    }
    if !voter {
        return AdminResponse::Done;
    }
    match raft
        .change_membership(ChangeMembers::AddVoterIds([id].into()), false)
        .await
    {
        Ok(_) => {
            tracing::info!(id, "a rebuilt replica votes again");
            AdminResponse::Done
        }
        Err(e) => crate::group::write_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_round_trips_and_a_damaged_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Marker::read(dir.path()).unwrap(), None);
        let marker = Marker {
            phase: Phase::Returning,
            members: [(
                2,
                Replica {
                    raft_addr: "127.0.0.1:1".into(),
                    client_addr: "127.0.0.1:2".into(),
                },
            )]
            .into(),
            voter: false,
        };
        marker.write(dir.path()).unwrap();
        assert_eq!(Marker::read(dir.path()).unwrap(), Some(marker.clone()));
        // One written before the marker recorded the role: a voter's.
        #[derive(Serialize)]
        struct WithoutRole {
            phase: Phase,
            members: BTreeMap<ReplicaId, Replica>,
        }
        let old = WithoutRole {
            phase: marker.phase,
            members: marker.members.clone(),
        };
        crate::log_store::write_meta_file(dir.path(), MARKER_FILE, &old).unwrap();
        let read = Marker::read(dir.path()).unwrap().unwrap();
        assert!(read.voter && read.members == marker.members);
        marker.write(dir.path()).unwrap();
        let path = dir.path().join(MARKER_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert!(matches!(
            Marker::read(dir.path()),
            Err(LogStoreError::Damaged { .. })
        ));
        Marker::remove(dir.path()).unwrap();
        assert_eq!(Marker::read(dir.path()).unwrap(), None);
    }

    #[test]
    fn the_gate_follows_the_phase() {
        let open = Gate::new(None);
        assert!(open.replicates() && open.votes());
        let leaving = Gate::new(Some(Phase::Leaving));
        assert!(!leaving.replicates() && !leaving.votes());
        let returning = Gate::new(Some(Phase::Returning));
        assert!(returning.replicates() && !returning.votes());
    }

    #[test]
    fn setting_aside_keeps_at_most_the_newest_copies() {
        let dir = tempfile::tempdir().unwrap();
        let service = Service {
            data: dir.path(),
            state_dirs: &["engine"],
            me: 1,
            prefix: "test",
        };
        for round in 0..DAMAGED_COPIES_MAX + 2 {
            std::fs::create_dir_all(dir.path().join("raft")).unwrap();
            std::fs::write(dir.path().join("raft/seg"), [round as u8]).unwrap();
            std::fs::create_dir_all(dir.path().join("engine")).unwrap();
            let kept = set_aside(&service).unwrap();
            assert_eq!(std::fs::read(kept.join("raft/seg")).unwrap(), [round as u8]);
            assert!(kept.join("engine").is_dir());
            assert!(!dir.path().join("raft").exists());
            std::thread::sleep(Duration::from_millis(2));
        }
        let copies = std::fs::read_dir(dir.path().join(DAMAGED_DIR))
            .unwrap()
            .count();
        assert_eq!(copies, DAMAGED_COPIES_MAX);
    }
}
