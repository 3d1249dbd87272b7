//! Model-based property test of chat groups: random sequences of create,
//! invite, answer, join, answer-join, leave, remove, set-role, transfer,
//! rename, dissolve and read by a handful of users, against a model made
//! of BTreeMaps. After every step, the answer (or error code) and every
//! group's `GetGroup` and every user's `GetUserGroups` equal the model's.
//! Small limits make `LimitReached` (with nothing changed) common.

use crate::common;

use proptest::prelude::*;
use proto::{
    groups::{
        GroupId, GroupInfo, GroupInvite, GroupMember, GroupMembership, GroupRole, UserGroups,
        GROUP_ID_BASE,
    },
    profile::{ErrorCode, RequestBody, ResponseBody},
};
use std::collections::{BTreeMap, BTreeSet};

const USERS: usize = 5;
const MEMBERS_MAX: usize = 3;
const USER_GROUPS_MAX: usize = 2;
const INVITES_MAX: usize = 2;
const JOINS_MAX: usize = 2;
const NAMES: [&str; 2] = ["a", "b"];

/// One step, with users as indices into the test's users and groups as
/// slots: slot `k` is the `k`-th group created (id `GROUP_ID_BASE + 1 +
/// k`); a step may name a slot not created yet.
#[derive(Debug, Clone)]
enum Op {
    Create(usize, usize),
    Invite(usize, usize, usize),
    AnswerInvite(usize, usize, bool, u64),
    Join(usize, usize),
    AnswerJoin(usize, usize, usize, bool, u64),
    Leave(usize, usize),
    Remove(usize, usize, usize),
    SetRole(usize, usize, usize, GroupRole),
    Transfer(usize, usize, usize),
    Rename(usize, usize, usize),
    Dissolve(usize, usize),
    Read(usize, usize, u64),
}

/// Picks a user (or an invitation, or a join request) from a pool the
/// model names at the time: `mode` 0 prefers the group's owner and admins
/// for the one acting and the others for the one acted on, 1 any member,
/// 0 and 1 the pending invitations or join requests, 2 anyone; an empty
/// pool falls back to anyone.
/// Uniform picks would mostly be steps by strangers to unknown groups;
/// these make most steps meaningful while still trying the wrong ones.
#[derive(Debug, Clone, Copy)]
struct Sel {
    mode: u8,
    i: usize,
}

/// A group slot: a live group's when `live` and one exists, else any slot
/// up to the next one to be created.
#[derive(Debug, Clone, Copy)]
struct Slot {
    live: bool,
    i: usize,
}

/// A step as generated, resolved against the model before it runs.
#[derive(Debug, Clone)]
enum Plan {
    Create(Sel, usize),
    Invite(Slot, Sel, Sel),
    AnswerInvite(Sel, Slot, bool, u64),
    Join(Slot, Sel),
    AnswerJoin(Sel, Slot, Sel, bool, u64),
    Leave(Slot, Sel),
    Remove(Slot, Sel, Sel),
    SetRole(Slot, Sel, Sel, GroupRole),
    Transfer(Slot, Sel, Sel),
    Rename(Slot, Sel, usize),
    Dissolve(Slot, Sel),
    Read(Slot, Sel, u64),
}

fn sel() -> impl Strategy<Value = Sel> {
    let mode = prop_oneof![6 => Just(0u8), 3 => Just(1u8), 1 => Just(2u8)];
    (mode, 0..16usize).prop_map(|(mode, i)| Sel { mode, i })
}

fn slot() -> impl Strategy<Value = Slot> {
    (prop::bool::weighted(0.85), 0..16usize).prop_map(|(live, i)| Slot { live, i })
}

fn plan() -> impl Strategy<Value = Plan> {
    let seq = || 0u64..20;
    let role = prop_oneof![
        Just(GroupRole::Owner),
        Just(GroupRole::Admin),
        Just(GroupRole::Member)
    ];
    prop_oneof![
        1 => (sel(), 0..NAMES.len()).prop_map(|(a, n)| Plan::Create(a, n)),
        4 => (slot(), sel(), sel()).prop_map(|(g, a, b)| Plan::Invite(g, a, b)),
        4 => (sel(), slot(), prop::bool::weighted(0.75), seq())
            .prop_map(|(a, g, y, s)| Plan::AnswerInvite(a, g, y, s)),
        2 => (slot(), sel()).prop_map(|(g, a)| Plan::Join(g, a)),
        3 => (sel(), slot(), sel(), prop::bool::weighted(0.75), seq())
            .prop_map(|(j, g, a, y, s)| Plan::AnswerJoin(j, g, a, y, s)),
        1 => (slot(), sel()).prop_map(|(g, a)| Plan::Leave(g, a)),
        1 => (slot(), sel(), sel()).prop_map(|(g, a, b)| Plan::Remove(g, a, b)),
        2 => (slot(), sel(), sel(), role).prop_map(|(g, a, b, r)| Plan::SetRole(g, a, b, r)),
        1 => (slot(), sel(), sel()).prop_map(|(g, a, b)| Plan::Transfer(g, a, b)),
        1 => (slot(), sel(), 0..NAMES.len()).prop_map(|(g, a, n)| Plan::Rename(g, a, n)),
        1 => (slot(), sel()).prop_map(|(g, a)| Plan::Dissolve(g, a)),
        4 => (slot(), sel(), seq()).prop_map(|(g, a, s)| Plan::Read(g, a, s)),
    ]
}

/// The `sel.i`-th of `pool` (cycling), if any.
fn pick<T: Copy>(sel: Sel, pool: &[T]) -> Option<T> {
    (!pool.is_empty()).then(|| pool[sel.i % pool.len()])
}

#[derive(Debug, Clone)]
struct Group {
    name: &'static str,
    version: u64,
    /// user -> (role, cursor)
    members: BTreeMap<usize, (GroupRole, u64)>,
    joins: BTreeSet<usize>,
}

/// What the service should hold.
#[derive(Default)]
struct Model {
    /// Live groups by slot (a dissolved one is gone).
    groups: BTreeMap<usize, Group>,
    /// (invitee, slot) -> inviter.
    invites: BTreeMap<(usize, usize), usize>,
    /// Slots used so far (ids are never reused).
    created: usize,
}

type Answer = Result<Option<(u64, u64)>, ErrorCode>;

impl Model {
    fn user_groups(&self, user: usize) -> usize {
        self.groups
            .values()
            .filter(|g| g.members.contains_key(&user))
            .count()
    }

    fn group(&self, slot: usize) -> Result<&Group, ErrorCode> {
        self.groups.get(&slot).ok_or(ErrorCode::NotFound)
    }

    fn role(&self, slot: usize, user: usize) -> Result<GroupRole, ErrorCode> {
        let g = self.group(slot)?;
        g.members
            .get(&user)
            .map(|m| m.0)
            .ok_or(ErrorCode::NotMember)
    }

    fn manager(&self, slot: usize, user: usize) -> Result<GroupRole, ErrorCode> {
        match self.role(slot, user)? {
            GroupRole::Member => Err(ErrorCode::NotPermitted),
            role => Ok(role),
        }
    }

    fn owner(&self, slot: usize, user: usize) -> Result<(), ErrorCode> {
        match self.role(slot, user)? {
            GroupRole::Owner => Ok(()),
            _ => Err(ErrorCode::NotPermitted),
        }
    }

    /// The checks of admitting `user` to `slot` as a member.
    fn room(&self, slot: usize, user: usize) -> Result<(), ErrorCode> {
        let g = self.group(slot)?;
        if g.members.contains_key(&user) {
            return Err(ErrorCode::AlreadyMember);
        }
        if g.members.len() >= MEMBERS_MAX || self.user_groups(user) >= USER_GROUPS_MAX {
            return Err(ErrorCode::LimitReached);
        }
        Ok(())
    }

    fn admit(&mut self, slot: usize, user: usize, seq: u64) {
        self.invites.remove(&(user, slot));
        let g = self.groups.get_mut(&slot).expect("checked");
        g.joins.remove(&user);
        g.members.insert(user, (GroupRole::Member, seq));
    }

    fn bump(&mut self, slot: usize) -> Answer {
        self.groups.get_mut(&slot).expect("checked").version += 1;
        Ok(None)
    }

    fn slot(&self, s: Slot) -> usize {
        let live: Vec<usize> = self.groups.keys().copied().collect();
        if s.live && !live.is_empty() {
            live[s.i % live.len()]
        } else {
            s.i % (self.created + 1)
        }
    }

    /// Members of `slot` with a role among `roles`, by user.
    fn with_roles(&self, slot: usize, roles: &[GroupRole]) -> Vec<usize> {
        let Some(g) = self.groups.get(&slot) else {
            return Vec::new();
        };
        let chosen = g.members.iter().filter(|(_, m)| roles.contains(&m.0));
        chosen.map(|(&u, _)| u).collect()
    }

    /// The one acting on `slot`.
    fn by(&self, slot: usize, s: Sel) -> usize {
        use GroupRole::*;
        let pool = match s.mode {
            0 => self.with_roles(slot, &[Owner, Admin]),
            1 => self.with_roles(slot, &[Owner, Admin, Member]),
            _ => Vec::new(),
        };
        pick(s, &pool).unwrap_or(s.i % USERS)
    }

    /// The one acted on in `slot`.
    fn target(&self, slot: usize, s: Sel) -> usize {
        use GroupRole::*;
        let pool = match s.mode {
            0 => self.with_roles(slot, &[Admin, Member]),
            1 => self.with_roles(slot, &[Owner, Admin, Member]),
            _ => Vec::new(),
        };
        pick(s, &pool).unwrap_or(s.i % USERS)
    }

    /// A pending invitation (invitee, slot), or anyone and `g`.
    fn invitation(&self, s: Sel, g: Slot) -> (usize, usize) {
        let pool: Vec<(usize, usize)> = self.invites.keys().copied().collect();
        match pick(s, &pool).filter(|_| s.mode < 2) {
            Some(pair) => pair,
            None => (s.i % USERS, self.slot(g)),
        }
    }

    /// A pending join request (slot, user), or `g` and anyone.
    fn join_request(&self, s: Sel, g: Slot) -> (usize, usize) {
        let pool: Vec<(usize, usize)> = self
            .groups
            .iter()
            .flat_map(|(&slot, g)| g.joins.iter().map(move |&u| (slot, u)))
            .collect();
        match pick(s, &pool).filter(|_| s.mode < 2) {
            Some(pair) => pair,
            None => (self.slot(g), s.i % USERS),
        }
    }

    /// The step `plan` names in the model's state now.
    fn resolve(&self, plan: &Plan) -> Op {
        let anyone = |s: Sel| s.i % USERS;
        match *plan {
            Plan::Create(a, n) => Op::Create(anyone(a), n),
            Plan::Invite(g, a, b) => {
                let g = self.slot(g);
                Op::Invite(self.by(g, a), g, anyone(b))
            }
            Plan::AnswerInvite(i, g, y, s) => {
                let (user, g) = self.invitation(i, g);
                Op::AnswerInvite(user, g, y, s)
            }
            Plan::Join(g, a) => Op::Join(anyone(a), self.slot(g)),
            Plan::AnswerJoin(j, g, a, y, s) => {
                let (g, user) = self.join_request(j, g);
                Op::AnswerJoin(self.by(g, a), g, user, y, s)
            }
            Plan::Leave(g, a) => {
                let g = self.slot(g);
                Op::Leave(self.target(g, a), g)
            }
            Plan::Remove(g, a, b) => {
                let g = self.slot(g);
                Op::Remove(self.by(g, a), g, self.target(g, b))
            }
            Plan::SetRole(g, a, b, r) => {
                let g = self.slot(g);
                Op::SetRole(self.by(g, a), g, self.target(g, b), r)
            }
            Plan::Transfer(g, a, b) => {
                let g = self.slot(g);
                Op::Transfer(self.by(g, a), g, self.target(g, b))
            }
            Plan::Rename(g, a, n) => {
                let g = self.slot(g);
                Op::Rename(self.by(g, a), g, n)
            }
            Plan::Dissolve(g, a) => {
                let g = self.slot(g);
                Op::Dissolve(self.by(g, a), g)
            }
            Plan::Read(g, a, s) => {
                let g = self.slot(g);
                Op::Read(self.target(g, a), g, s)
            }
        }
    }

    /// The answer the service should give; applies the op if it succeeds.
    fn apply(&mut self, op: &Op) -> Answer {
        match *op {
            Op::Create(owner, name) => {
                if self.user_groups(owner) >= USER_GROUPS_MAX {
                    return Err(ErrorCode::LimitReached);
                }
                let group = Group {
                    name: NAMES[name],
                    version: 1,
                    members: BTreeMap::from([(owner, (GroupRole::Owner, 0))]),
                    joins: BTreeSet::new(),
                };
                self.groups.insert(self.created, group);
                self.created += 1;
                Ok(None)
            }
            Op::Invite(by, slot, invitee) => {
                self.role(slot, by)?;
                if self.group(slot)?.members.contains_key(&invitee) {
                    return Err(ErrorCode::AlreadyMember);
                }
                if self.invites.contains_key(&(invitee, slot)) {
                    return Ok(None);
                }
                if self.invites.keys().filter(|k| k.0 == invitee).count() >= INVITES_MAX {
                    return Err(ErrorCode::LimitReached);
                }
                self.invites.insert((invitee, slot), by);
                Ok(None)
            }
            Op::AnswerInvite(user, slot, accept, seq) => {
                if !self.invites.contains_key(&(user, slot)) {
                    return Err(ErrorCode::NotMember);
                }
                if !accept {
                    self.invites.remove(&(user, slot));
                    return Ok(None);
                }
                self.room(slot, user)?;
                self.admit(slot, user, seq);
                self.bump(slot)
            }
            Op::Join(user, slot) => {
                let g = self.group(slot)?;
                if g.members.contains_key(&user) {
                    return Err(ErrorCode::AlreadyMember);
                }
                if g.joins.contains(&user) {
                    return Ok(None);
                }
                if g.joins.len() >= JOINS_MAX {
                    return Err(ErrorCode::LimitReached);
                }
                self.groups.get_mut(&slot).unwrap().joins.insert(user);
                self.bump(slot)
            }
            Op::AnswerJoin(by, slot, user, accept, seq) => {
                self.manager(slot, by)?;
                if !self.group(slot)?.joins.contains(&user) {
                    return Err(ErrorCode::NotMember);
                }
                if accept {
                    self.room(slot, user)?;
                    self.admit(slot, user, seq);
                } else {
                    self.groups.get_mut(&slot).unwrap().joins.remove(&user);
                }
                self.bump(slot)
            }
            Op::Leave(user, slot) => {
                if self.role(slot, user)? == GroupRole::Owner {
                    return Err(ErrorCode::NotPermitted);
                }
                self.groups.get_mut(&slot).unwrap().members.remove(&user);
                self.bump(slot)
            }
            Op::Remove(by, slot, user) => {
                if by == user {
                    return Err(ErrorCode::InvalidField);
                }
                let by_role = self.manager(slot, by)?;
                let role = self.role(slot, user)?;
                if by_role == GroupRole::Admin && role != GroupRole::Member {
                    return Err(ErrorCode::NotPermitted);
                }
                self.groups.get_mut(&slot).unwrap().members.remove(&user);
                self.bump(slot)
            }
            Op::SetRole(by, slot, user, role) => {
                if role == GroupRole::Owner {
                    return Err(ErrorCode::InvalidField);
                }
                self.owner(slot, by)?;
                let old = self.role(slot, user)?;
                if old == GroupRole::Owner {
                    return Err(ErrorCode::InvalidField);
                }
                if old == role {
                    return Ok(None);
                }
                let g = self.groups.get_mut(&slot).unwrap();
                g.members.get_mut(&user).unwrap().0 = role;
                self.bump(slot)
            }
            Op::Transfer(by, slot, to) => {
                if by == to {
                    return Err(ErrorCode::InvalidField);
                }
                self.owner(slot, by)?;
                self.role(slot, to)?;
                let g = self.groups.get_mut(&slot).unwrap();
                g.members.get_mut(&by).unwrap().0 = GroupRole::Admin;
                g.members.get_mut(&to).unwrap().0 = GroupRole::Owner;
                self.bump(slot)
            }
            Op::Rename(by, slot, name) => {
                self.manager(slot, by)?;
                let g = self.groups.get_mut(&slot).unwrap();
                if g.name == NAMES[name] {
                    return Ok(None);
                }
                g.name = NAMES[name];
                self.bump(slot)
            }
            Op::Dissolve(by, slot) => {
                self.owner(slot, by)?;
                self.groups.remove(&slot);
                self.invites.retain(|k, _| k.1 != slot);
                Ok(None)
            }
            Op::Read(user, slot, seq) => {
                self.role(slot, user)?;
                let g = self.groups.get_mut(&slot).unwrap();
                let cursor = &mut g.members.get_mut(&user).unwrap().1;
                *cursor = (*cursor).max(seq);
                let read_seq = *cursor;
                let min = g.members.values().map(|m| m.1).min().unwrap();
                Ok(Some((read_seq, min)))
            }
        }
    }

    /// `GetGroup` as the model sees it (`created_ms` taken from `got`).
    fn info(&self, slot: usize, ids: &[u64], got: &GroupInfo) -> GroupInfo {
        let g = &self.groups[&slot];
        GroupInfo {
            group: id(slot),
            name: g.name.into(),
            topic: String::new(),
            version: g.version,
            created_ms: got.created_ms,
            members: g
                .members
                .iter()
                .map(|(&u, &(role, read_seq))| GroupMember {
                    user: ids[u],
                    role,
                    read_seq,
                })
                .collect(),
            joins: g.joins.iter().map(|&u| ids[u]).collect(),
        }
    }

    fn user_view(&self, user: usize, ids: &[u64]) -> UserGroups {
        let groups = self
            .groups
            .iter()
            .filter_map(|(&slot, g)| {
                let &(role, read_seq) = g.members.get(&user)?;
                Some(GroupMembership {
                    group: id(slot),
                    name: g.name.into(),
                    role,
                    read_seq,
                    members: g.members.len() as u32,
                })
            })
            .collect();
        let invites = self
            .invites
            .iter()
            .filter(|(k, _)| k.0 == user)
            .map(|(&(_, slot), &by)| GroupInvite {
                group: id(slot),
                name: self.groups[&slot].name.into(),
                by: ids[by],
            })
            .collect();
        UserGroups { groups, invites }
    }
}

fn id(slot: usize) -> GroupId {
    GROUP_ID_BASE + 1 + slot as u64
}

fn request(op: &Op, ids: &[u64]) -> RequestBody {
    match *op {
        Op::Create(owner, name) => RequestBody::GroupCreate {
            owner: ids[owner],
            name: NAMES[name].as_bytes().to_vec(),
            topic: vec![],
        },
        Op::Invite(by, g, invitee) => RequestBody::GroupInvite {
            by: ids[by],
            group: id(g),
            invitee: ids[invitee],
        },
        Op::AnswerInvite(user, g, accept, read_seq) => RequestBody::GroupAnswerInvite {
            user: ids[user],
            group: id(g),
            accept,
            read_seq,
        },
        Op::Join(user, g) => RequestBody::GroupJoinRequest {
            user: ids[user],
            group: id(g),
        },
        Op::AnswerJoin(by, g, user, accept, read_seq) => RequestBody::GroupAnswerJoin {
            by: ids[by],
            group: id(g),
            user: ids[user],
            accept,
            read_seq,
        },
        Op::Leave(user, g) => RequestBody::GroupLeave {
            user: ids[user],
            group: id(g),
        },
        Op::Remove(by, g, user) => RequestBody::GroupRemove {
            by: ids[by],
            group: id(g),
            user: ids[user],
        },
        Op::SetRole(by, g, user, role) => RequestBody::GroupSetRole {
            by: ids[by],
            group: id(g),
            user: ids[user],
            role,
        },
        Op::Transfer(by, g, to) => RequestBody::GroupTransfer {
            by: ids[by],
            group: id(g),
            to: ids[to],
        },
        Op::Rename(by, g, name) => RequestBody::GroupRename {
            by: ids[by],
            group: id(g),
            name: Some(NAMES[name].as_bytes().to_vec()),
            topic: None,
        },
        Op::Dissolve(by, g) => RequestBody::GroupDissolve {
            by: ids[by],
            group: id(g),
        },
        Op::Read(user, g, up_to_seq) => RequestBody::GroupRead {
            user: ids[user],
            group: id(g),
            up_to_seq,
        },
    }
}

/// The service's answer in the model's terms.
fn answer(got: ResponseBody) -> Answer {
    match got {
        ResponseBody::Done | ResponseBody::Group(_) => Ok(None),
        ResponseBody::GroupRead {
            read_seq,
            min_read_seq,
        } => Ok(Some((read_seq, min_read_seq))),
        ResponseBody::Error(e) => Err(e.code),
        other => panic!("unexpected answer {other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn groups_match_the_model(plans in proptest::collection::vec(plan(), 1..60)) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let t = common::open(|c| {
                c.limits.group_members_max = MEMBERS_MAX;
                c.limits.user_groups_max = USER_GROUPS_MAX;
                c.limits.group_invites_pending_max = INVITES_MAX;
                c.limits.group_joins_pending_max = JOINS_MAX;
            });
            let s = &t.service;
            let ids = common::import(s, USERS).await;
            let mut model = Model::default();
            // Two groups to start with, so that most steps find one.
            let first = (0..2).map(|i| Plan::Create(Sel { mode: 2, i }, i));
            for (step, plan) in first.chain(plans).enumerate() {
                let op = &model.resolve(&plan);
                let want = model.apply(op);
                let got = answer(s.handle(request(op, &ids)).await);
                prop_assert_eq!(got, want, "step {}: {:?}", step, op);
                for slot in 0..=model.created {
                    match s.handle(RequestBody::GetGroup { group: id(slot) }).await {
                        ResponseBody::Group(got) => {
                            prop_assert!(model.groups.contains_key(&slot), "step {}: slot {} exists", step, slot);
                            prop_assert_eq!(&got, &model.info(slot, &ids, &got), "step {}", step);
                        }
                        ResponseBody::Error(e) => {
                            prop_assert_eq!(e.code, ErrorCode::NotFound);
                            prop_assert!(!model.groups.contains_key(&slot), "step {}: slot {} missing", step, slot);
                        }
                        other => panic!("{other:?}"),
                    }
                }
                for user in 0..USERS {
                    let got = s.handle(RequestBody::GetUserGroups { user: ids[user] }).await;
                    prop_assert_eq!(got, ResponseBody::UserGroups(model.user_view(user, &ids)), "step {}", step);
                }
            }
            // What is stored is exactly what the model holds: nothing left over.
            let members: usize = model.groups.values().map(|g| g.members.len()).sum();
            let joins: usize = model.groups.values().map(|g| g.joins.len()).sum();
            let sizes = s.store().group_table_sizes().unwrap();
            let want = [
                ("groups", model.groups.len()),
                ("group_members", members),
                ("user_groups", members),
                ("group_invites", model.invites.len()),
                ("group_invitees", model.invites.len()),
                ("group_joins", joins),
                ("group_cursors", members),
            ].map(|(n, c)| (n, c as u64));
            prop_assert_eq!(sizes, want.to_vec());
            Ok(())
        })?;
    }
}
