//! The profile service: turns one request into one response, with the
//! store (reads in place, writes through the writer thread) and the
//! password pool. The TCP server and in-process tests both call it.

use crate::{
    avatar,
    config::{Config, Limits},
    error::Error,
    fields,
    notify::Hub,
    passwords::PasswordPool,
    raft::node::Replica,
    store::{
        groups::GroupOp,
        ops::{Outcome, WriteOp},
        writer::Writer,
        Store,
    },
    writes::Writes,
    Result,
};
use proto::{
    groups::GroupId,
    profile::{
        ImportUser, ProfileStats, RequestBody, ResponseBody, ServiceInfo, UserId,
        AVATAR_RANGE_BYTES_MAX, GET_PROFILES_MAX, IMPORT_FRIENDSHIPS_MAX, IMPORT_USERS_MAX,
    },
    shard::ShardRole,
};
use std::{path::Path, sync::Arc, thread::JoinHandle};

pub struct Service {
    store: Arc<Store>,
    writes: Writes,
    passwords: PasswordPool,
    hub: Arc<Hub>,
    info: ServiceInfo,
}

impl Service {
    /// Open the store in `dir` (the caller holds its lock) and start the
    /// writer thread and the password pool. The join handle is the writer
    /// thread's: it ends once every [`Service`] clone is dropped.
    pub fn open(dir: &Path, config: &Config) -> Result<(Arc<Service>, JoinHandle<()>)> {
        let (store, hub) = Self::open_store(dir, config)?;
        let (writer, handle) = Writer::start(
            store.clone(),
            hub.clone(),
            config.store.write_queue_max,
            config.store.write_batch_max,
        )?;
        let service = Self::with_writes(store, hub, Writes::Local(writer), config)?;
        Ok((service, handle))
    }

    /// Open the store in `dir` (the caller holds its lock) as a replica of
    /// a profile group (`raft`): writes go through the group's leader,
    /// reads wait for a read index. The [`Replica`] runs Raft and the
    /// replication port until shut down.
    pub async fn open_replica(
        dir: &Path,
        config: &Config,
        raft: &replication::group::RaftConfig,
    ) -> Result<(Arc<Service>, Replica)> {
        let (store, hub) = Self::open_store(dir, config)?;
        let parts = (store.clone(), hub.clone());
        let replica = Replica::start(dir, parts, raft, config.store.map_bytes).await?;
        let writes = Writes::Replicated(replica.replicated.clone());
        let service = Self::with_writes(store, hub, writes, config)?;
        Ok((service, replica))
    }

    fn open_store(dir: &Path, config: &Config) -> Result<(Arc<Store>, Arc<Hub>)> {
        let store = Arc::new(Store::open(
            dir,
            config.store.map_bytes,
            config.limits.clone(),
        )?);
        Ok((store, Arc::new(Hub::default())))
    }

    fn with_writes(
        store: Arc<Store>,
        hub: Arc<Hub>,
        writes: Writes,
        config: &Config,
    ) -> Result<Arc<Service>> {
        let passwords = PasswordPool::start(&config.passwords, config.password_threads())?;
        let p = &config.passwords;
        let info = ServiceInfo {
            argon2_m_kib: p.argon2_m_kib,
            argon2_t: p.argon2_t,
            argon2_p: p.argon2_p,
        };
        metrics::gauge!("profile_groups").set(store.group_count()? as f64);
        Ok(Arc::new(Service {
            store,
            writes,
            passwords,
            hub,
            info,
        }))
    }

    /// This process's place in its group.
    pub async fn stats(&self) -> ProfileStats {
        match &self.writes {
            Writes::Local(_) => ProfileStats {
                role: ShardRole::Standalone,
                leader: None,
                raft: None,
            },
            Writes::Replicated(replica) => {
                let report = replication::group::report(&replica.raft).await;
                ProfileStats {
                    role: report.role,
                    leader: report.leader_addr,
                    raft: Some(report.raft),
                }
            }
        }
    }

    /// Whether reads must be answered through [`Service::handle`] (a
    /// replica: they wait for a read index), not [`Service::read`] at once.
    pub fn reads_wait(&self) -> bool {
        self.writes.is_replicated()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    fn limits(&self) -> &Limits {
        &self.store.limits
    }

    /// Requests answered from a read transaction at once, without waiting
    /// for a thread (cheap enough for the event loop).
    pub fn is_read(body: &RequestBody) -> bool {
        matches!(
            body,
            RequestBody::LookupUser { .. }
                | RequestBody::GetAccount { .. }
                | RequestBody::GetProfile { .. }
                | RequestBody::GetProfiles { .. }
                | RequestBody::LoginView { .. }
                | RequestBody::GetRelations { .. }
                | RequestBody::GetGroup { .. }
                | RequestBody::GetUserGroups { .. }
                | RequestBody::AvatarRange { .. }
                | RequestBody::Info
                | RequestBody::Ping
        )
    }

    /// Answer a read request (see [`Service::is_read`]).
    pub fn read(&self, body: RequestBody) -> ResponseBody {
        self.read_inner(body)
            .unwrap_or_else(|e| ResponseBody::Error(e.to_wire()))
    }

    fn read_inner(&self, body: RequestBody) -> Result<ResponseBody> {
        let s = &self.store;
        Ok(match body {
            RequestBody::LookupUser { username } => {
                let name = fields::username(&username, self.limits())?;
                ResponseBody::User(s.lookup(&name)?)
            }
            RequestBody::GetAccount { user } => ResponseBody::Account(s.account(user)?),
            RequestBody::GetProfile { user } => ResponseBody::Profile(s.profile(user)?),
            RequestBody::GetProfiles { users } => {
                if users.len() > GET_PROFILES_MAX {
                    return Err(too_many("users", users.len(), GET_PROFILES_MAX));
                }
                ResponseBody::Profiles(s.profiles(&users)?)
            }
            RequestBody::LoginView { user } => ResponseBody::LoginView(s.login_view(user)?),
            RequestBody::GetRelations { users } => {
                if users.len() > GET_PROFILES_MAX {
                    return Err(too_many("users", users.len(), GET_PROFILES_MAX));
                }
                ResponseBody::Relations(s.relations(&users)?)
            }
            RequestBody::AvatarRange { hash, offset, len } => {
                let (total_len, bytes) =
                    s.avatar_range(&hash, offset, len, AVATAR_RANGE_BYTES_MAX)?;
                ResponseBody::AvatarBytes { total_len, bytes }
            }
            RequestBody::GetGroup { group } => ResponseBody::Group(s.group(group)?),
            RequestBody::GetUserGroups { user } => ResponseBody::UserGroups(s.user_groups(user)?),
            RequestBody::Info => ResponseBody::Info(self.info),
            RequestBody::Ping => ResponseBody::Pong,
            other => {
                return Err(Error::BadRequest(format!(
                    "not a read: {}",
                    op_name(&other)
                )))
            }
        })
    }

    /// Answer any request except `Subscribe` (which needs a connection).
    pub async fn handle(&self, body: RequestBody) -> ResponseBody {
        if matches!(body, RequestBody::Stats) {
            return ResponseBody::Stats(self.stats().await);
        }
        if Self::is_read(&body) && !matches!(body, RequestBody::Ping | RequestBody::Info) {
            if let Err(e) = self.writes.before_read().await {
                return e.into_response();
            }
            return self.read(body);
        }
        self.handle_inner(body)
            .await
            .unwrap_or_else(Error::into_response)
    }

    async fn handle_inner(&self, body: RequestBody) -> Result<ResponseBody> {
        let l = self.limits();
        let op = match body {
            RequestBody::CheckPassword { username, password } => {
                return self
                    .check_password(&username, password)
                    .await
                    .map(ResponseBody::User)
            }
            RequestBody::CreateUser { username, password } => {
                let username = fields::username(&username, l)?;
                fields::password(&password)?;
                let phc = self.passwords.hash(password).await?;
                WriteOp::CreateUser { username, phc }
            }
            RequestBody::ImportUsers { users } => return self.import_users(users).await,
            RequestBody::SetPassword { user, password } => {
                fields::password(&password)?;
                let phc = self.passwords.hash(password).await?;
                WriteOp::SetPassword { user, phc }
            }
            RequestBody::SetDisabled { user, disabled } => WriteOp::SetDisabled { user, disabled },
            RequestBody::SetProfile {
                user,
                nickname,
                signature,
            } => WriteOp::SetProfile {
                user,
                nickname: nickname
                    .map(|n| fields::text("nickname", &n, l.nickname_bytes_max))
                    .transpose()?,
                signature: signature
                    .map(|s| fields::text("signature", &s, l.signature_bytes_max))
                    .transpose()?,
            },
            RequestBody::SetAvatar { user, image } => {
                let hash = avatar::check(&image, l)?;
                return match self
                    .writes
                    .write(WriteOp::SetAvatar { user, hash, image })
                    .await?
                {
                    Outcome::Version(version) => Ok(ResponseBody::Avatar { hash, version }),
                    other => Err(unexpected(other)),
                };
            }
            RequestBody::FriendRequest { from, to, group } => WriteOp::FriendRequest {
                from,
                to,
                group: fields::group_name(&group, l)?,
            },
            RequestBody::FriendAccept { user, from, group } => WriteOp::FriendAccept {
                user,
                from,
                group: fields::group_name(&group, l)?,
            },
            RequestBody::FriendReject { user, from } => WriteOp::FriendReject { user, from },
            RequestBody::FriendRemove { user, friend } => WriteOp::FriendRemove { user, friend },
            RequestBody::FriendMove {
                user,
                friend,
                group,
            } => WriteOp::FriendMove {
                user,
                friend,
                group: fields::group_name(&group, l)?,
            },
            RequestBody::ImportFriendships { group, pairs } => {
                if pairs.len() > IMPORT_FRIENDSHIPS_MAX {
                    return Err(too_many("pairs", pairs.len(), IMPORT_FRIENDSHIPS_MAX));
                }
                WriteOp::ImportFriendships {
                    group: fields::group_name(&group, l)?,
                    pairs,
                }
            }
            RequestBody::Block { user, blocked } => WriteOp::Block { user, blocked },
            RequestBody::Unblock { user, blocked } => WriteOp::Unblock { user, blocked },
            RequestBody::ClaimLogin { user, login_ns } => {
                return self
                    .claim_login(WriteOp::ClaimLogin { user, login_ns }, user)
                    .await
            }
            RequestBody::ClaimLoginOnce {
                user,
                login_ns,
                claim,
            } => {
                let op = WriteOp::ClaimLoginOnce {
                    user,
                    login_ns,
                    claim,
                };
                return self.claim_login(op, user).await;
            }
            RequestBody::Subscribe => {
                return Err(Error::BadRequest("Subscribe needs a connection".into()))
            }
            RequestBody::GroupRead {
                user,
                group,
                up_to_seq,
            } => return self.group_read(user, group, up_to_seq).await,
            read if Self::is_read(&read) => return Ok(self.read(read)),
            group => WriteOp::Group(self.group_op(group)?),
        };
        let counts = matches!(
            op,
            WriteOp::Group(GroupOp::Create { .. } | GroupOp::Dissolve { .. })
        );
        let outcome = self.writes.write(op).await?;
        if counts {
            // A gauge only: its read failing does not undo the write.
            if let Ok(n) = self.store.group_count() {
                metrics::gauge!("profile_groups").set(n as f64);
            }
        }
        Ok(match outcome {
            Outcome::User(user) => ResponseBody::User(user),
            Outcome::Version(v) => ResponseBody::Version(v),
            Outcome::Done => ResponseBody::Done,
            Outcome::Stale(last_ns) => ResponseBody::StaleLogin { last_ns },
            Outcome::Group(info) => ResponseBody::Group(*info),
            Outcome::Read {
                read_seq,
                min_read_seq,
            } => ResponseBody::GroupRead {
                read_seq,
                min_read_seq,
            },
        })
    }

    /// The write op of a group request, its text fields checked.
    fn group_op(&self, body: RequestBody) -> Result<GroupOp> {
        let l = self.limits();
        Ok(match body {
            RequestBody::GroupCreate { owner, name, topic } => GroupOp::Create {
                owner,
                name: fields::chat_group_name(&name, l)?,
                topic: fields::group_topic(&topic, l)?,
            },
            RequestBody::GroupInvite { by, group, invitee } => {
                GroupOp::Invite { by, group, invitee }
            }
            RequestBody::GroupAnswerInvite {
                user,
                group,
                accept,
                read_seq,
            } => GroupOp::AnswerInvite {
                user,
                group,
                accept,
                read_seq,
            },
            RequestBody::GroupJoinRequest { user, group } => GroupOp::JoinRequest { user, group },
            RequestBody::GroupAnswerJoin {
                by,
                group,
                user,
                accept,
                read_seq,
            } => GroupOp::AnswerJoin {
                by,
                group,
                user,
                accept,
                read_seq,
            },
            RequestBody::GroupLeave { user, group } => GroupOp::Leave { user, group },
            RequestBody::GroupRemove { by, group, user } => GroupOp::Remove { by, group, user },
            RequestBody::GroupSetRole {
                by,
                group,
                user,
                role,
            } => GroupOp::SetRole {
                by,
                group,
                user,
                role,
            },
            RequestBody::GroupTransfer { by, group, to } => GroupOp::Transfer { by, group, to },
            RequestBody::GroupRename {
                by,
                group,
                name,
                topic,
            } => GroupOp::Rename {
                by,
                group,
                name: name.map(|n| fields::chat_group_name(&n, l)).transpose()?,
                topic: topic.map(|t| fields::group_topic(&t, l)).transpose()?,
            },
            RequestBody::GroupDissolve { by, group } => GroupOp::Dissolve { by, group },
            other => {
                return Err(Error::BadRequest(format!(
                    "not a group write: {}",
                    op_name(&other)
                )))
            }
        })
    }

    /// A read that does not move the cursor is answered from a read
    /// transaction (cursors never move back, so the answer is as fresh as
    /// the writer's would be); one that moves it goes to the writer.
    async fn group_read(
        &self,
        user: UserId,
        group: GroupId,
        up_to_seq: u64,
    ) -> Result<ResponseBody> {
        let (read_seq, min_read_seq) = match self.store.group_cursor(user, group)? {
            Some((read_seq, min)) if up_to_seq <= read_seq => (read_seq, min),
            _ => {
                let op = WriteOp::Group(GroupOp::Read {
                    user,
                    group,
                    up_to_seq,
                });
                match self.writes.write(op).await? {
                    Outcome::Read {
                        read_seq,
                        min_read_seq,
                    } => (read_seq, min_read_seq),
                    other => return Err(unexpected(other)),
                }
            }
        };
        Ok(ResponseBody::GroupRead {
            read_seq,
            min_read_seq,
        })
    }

    /// Record a login if it is newer than the user's last one (durably:
    /// the answer comes after the commit), then answer with the user's
    /// relations as they are after it.
    async fn claim_login(&self, op: WriteOp, user: UserId) -> Result<ResponseBody> {
        match self.writes.write(op).await? {
            Outcome::Stale(last_ns) => Ok(ResponseBody::StaleLogin { last_ns }),
            _ => {
                let relations = self.store.relations(&[user])?.pop();
                let relations = relations.ok_or_else(|| Error::not_found_user(user))?;
                Ok(ResponseBody::LoginClaimed(relations))
            }
        }
    }

    /// The user id if `password` is right and the account enabled. Unknown
    /// users cost one argon2 check too, and get the same error as a wrong
    /// password.
    pub async fn check_password(&self, username: &[u8], password: Vec<u8>) -> Result<u64> {
        let name =
            fields::username(username, self.limits()).map_err(|_| Error::WrongCredentials)?;
        fields::password(&password).map_err(|_| Error::WrongCredentials)?;
        self.writes.before_read().await?;
        let account = self.store.credentials(&name)?;
        let phc = account.as_ref().map(|(_, a)| a.phc.clone());
        if !self.passwords.verify(phc, password).await? {
            return Err(Error::WrongCredentials);
        }
        let (user, account) = account.ok_or(Error::WrongCredentials)?;
        if account.disabled {
            return Err(Error::AccountDisabled(user));
        }
        Ok(user)
    }

    async fn import_users(&self, users: Vec<ImportUser>) -> Result<ResponseBody> {
        if users.len() > IMPORT_USERS_MAX {
            return Err(too_many("users", users.len(), IMPORT_USERS_MAX));
        }
        let hasher = self.passwords.hasher();
        let checked: Vec<Result<WriteOp>> = users
            .into_iter()
            .map(|u| {
                let username = fields::username(&u.username, self.limits())?;
                hasher.check_imported(&u.phc)?;
                Ok(WriteOp::CreateUser {
                    username,
                    phc: u.phc,
                })
            })
            .collect();
        let ops: Vec<WriteOp> = checked
            .iter()
            .filter_map(|r| r.as_ref().ok().cloned())
            .collect();
        let mut written = self.writes.write_many(ops).await?.into_iter();
        let results = checked
            .into_iter()
            .map(|c| match c {
                Err(e) => Err(e.to_wire()),
                Ok(_) => match written.next() {
                    Some(Ok(Outcome::User(u))) => Ok(u),
                    Some(Ok(other)) => Err(unexpected(other).to_wire()),
                    Some(Err(e)) => Err(e.to_wire()),
                    None => Err(Error::Closed.to_wire()),
                },
            })
            .collect();
        Ok(ResponseBody::Imported(results))
    }
}

fn too_many(what: &str, len: usize, max: usize) -> Error {
    Error::BadRequest(format!("{len} {what} in one request; at most {max}"))
}

fn unexpected(outcome: Outcome) -> Error {
    Error::Corrupt(format!("unexpected write outcome {outcome:?}"))
}

/// The metrics label of a request.
pub fn op_name(body: &RequestBody) -> &'static str {
    match body {
        RequestBody::CheckPassword { .. } => "check_password",
        RequestBody::CreateUser { .. } => "create_user",
        RequestBody::ImportUsers { .. } => "import_users",
        RequestBody::SetPassword { .. } => "set_password",
        RequestBody::SetDisabled { .. } => "set_disabled",
        RequestBody::LookupUser { .. } => "lookup_user",
        RequestBody::GetAccount { .. } => "get_account",
        RequestBody::GetProfile { .. } => "get_profile",
        RequestBody::GetProfiles { .. } => "get_profiles",
        RequestBody::LoginView { .. } => "login_view",
        RequestBody::SetProfile { .. } => "set_profile",
        RequestBody::SetAvatar { .. } => "set_avatar",
        RequestBody::AvatarRange { .. } => "avatar_range",
        RequestBody::FriendRequest { .. } => "friend_request",
        RequestBody::FriendAccept { .. } => "friend_accept",
        RequestBody::FriendReject { .. } => "friend_reject",
        RequestBody::FriendRemove { .. } => "friend_remove",
        RequestBody::FriendMove { .. } => "friend_move",
        RequestBody::ImportFriendships { .. } => "import_friendships",
        RequestBody::Subscribe => "subscribe",
        RequestBody::Info => "info",
        RequestBody::Ping => "ping",
        RequestBody::Block { .. } => "block",
        RequestBody::Unblock { .. } => "unblock",
        RequestBody::GetRelations { .. } => "get_relations",
        RequestBody::ClaimLogin { .. } | RequestBody::ClaimLoginOnce { .. } => "claim_login",
        RequestBody::GroupCreate { .. } => "group_create",
        RequestBody::GroupInvite { .. } => "group_invite",
        RequestBody::GroupAnswerInvite { .. } => "group_answer_invite",
        RequestBody::GroupJoinRequest { .. } => "group_join_request",
        RequestBody::GroupAnswerJoin { .. } => "group_answer_join",
        RequestBody::GroupLeave { .. } => "group_leave",
        RequestBody::GroupRemove { .. } => "group_remove",
        RequestBody::GroupSetRole { .. } => "group_set_role",
        RequestBody::GroupTransfer { .. } => "group_transfer",
        RequestBody::GroupRename { .. } => "group_rename",
        RequestBody::GroupDissolve { .. } => "group_dissolve",
        RequestBody::GetGroup { .. } => "get_group",
        RequestBody::GetUserGroups { .. } => "get_user_groups",
        RequestBody::GroupRead { .. } => "group_read",
        RequestBody::Stats => "stats",
    }
}
