//! `imctl chat`: a line-based chat client for a person, on the client SDK.
//! Incoming messages and friends' comings and goings are printed above the
//! line being typed (rustyline's external printer), never through it.
//! Each typed line is handled before the next prompt is drawn, so the
//! prompt always names the current recipient.

use crate::session_cmd::LoginArgs;
use anyhow::Context;
use clap::Args;
use client::sdk::{Connection, ImEvent};
use proto::{
    app::{Delivery, GroupSummary},
    groups::{is_group, GroupInvite},
    presence::Status,
};
use rustyline::{error::ReadlineError, DefaultEditor, ExternalPrinter};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    login: LoginArgs,
    /// The friend to talk to first (username).
    #[arg(long)]
    to: Option<String>,
}

const HELP: &str = "\
type a message and Enter to send it to the current friend. Commands:
  /to NAME       talk to NAME (a friend)
  /friends       friends, who is online, friend requests
  /add NAME      ask NAME to be your friend
  /accept NAME   accept NAME's friend request
  /block NAME    refuse messages and requests from NAME; /unblock NAME
  /nick TEXT     set your nickname; /sig TEXT sets your signature
  /groups        your groups (unread counts) and invitations
  /group NAME    talk in group NAME (a name or an id)
  /gcreate NAME  create a group; /ginvite USER invites USER to the current group
  /gaccept NAME  accept an invitation; /gleave leaves the current group
  /gjoin ID      ask to join group ID; /gapprove NAME USER_ID lets USER_ID in
  /help          this text; /quit leaves";

struct Friend {
    username: String,
    nickname: String,
    signature: String,
    online: Option<Status>,
}

struct Chat {
    conn: Connection,
    friends: HashMap<u64, Friend>,
    /// Pending friend requests: username -> user id.
    requests: HashMap<String, u64>,
    /// The user's groups, by id.
    groups: HashMap<u64, GroupSummary>,
    /// Invitations waiting for the user, by group id.
    invites: HashMap<u64, GroupInvite>,
    /// Whether the group list was read once (groups new after that are
    /// news).
    groups_loaded: bool,
    /// Requests to join the groups the user manages, as last shown.
    joins: HashMap<u64, std::collections::BTreeSet<u64>>,
    /// Whom typed lines go to: a friend's user id or a group's id.
    peer: Option<u64>,
    prompt: Arc<Mutex<String>>,
}

impl Chat {
    fn name(&self, user: u64) -> String {
        if let Some(g) = self.groups.get(&user) {
            return format!("group {}", g.name);
        }
        if user == self.conn.user() {
            return "you".into();
        }
        self.friends
            .get(&user)
            .map_or_else(|| format!("user {user}"), |f| f.username.clone())
    }

    fn by_name(&self, name: &str) -> Option<u64> {
        self.friends
            .iter()
            .find(|(_, f)| f.username == name)
            .map(|(id, _)| *id)
    }

    fn friends_text(&self) -> String {
        let mut lines: Vec<String> = self
            .friends
            .values()
            .map(|f| {
                let status = f
                    .online
                    .map_or("offline".to_string(), |s| format!("{s:?}").to_lowercase());
                format!(
                    "  {:<12} {:<16} {:<8} {}",
                    f.username, f.nickname, status, f.signature
                )
            })
            .collect();
        lines.sort();
        let mut text = format!("friends ({}):\n{}", lines.len(), lines.join("\n"));
        for name in self.requests.keys() {
            text.push('\n');
            text.push_str(&request_line(name));
        }
        text
    }

    fn show(&self, d: &Delivery) -> String {
        format!(
            "{}: {}",
            self.name(d.from),
            String::from_utf8_lossy(&d.body)
        )
    }

    fn set_peer(&mut self, peer: Option<u64>) {
        self.peer = peer;
        let label = peer.map_or_else(|| "nobody".to_string(), |p| self.name(p));
        *self.prompt.lock().expect("prompt lock") = format!("to {label}> ");
    }

    /// Read the friend list and requests again; what changed, to print.
    async fn refresh(&mut self) -> anyhow::Result<Vec<String>> {
        let view = self.conn.login_view().await?;
        let online: HashMap<u64, Status> = view.online.into_iter().collect();
        let friends: HashMap<u64, Friend> = view
            .view
            .groups
            .iter()
            .flat_map(|g| g.friends.iter())
            .map(|p| {
                let friend = Friend {
                    username: p.username.clone(),
                    nickname: p.nickname.clone(),
                    signature: p.signature.clone(),
                    online: online.get(&p.user).copied(),
                };
                (p.user, friend)
            })
            .collect();
        let requests: HashMap<String, u64> = view
            .view
            .requests
            .iter()
            .map(|r| (r.username.clone(), r.from))
            .collect();
        let mut news = Vec::new();
        for (id, f) in &friends {
            if !self.friends.contains_key(id) {
                news.push(format!(
                    "* {} is now your friend (/to {} to talk)",
                    f.username, f.username
                ));
            }
        }
        for name in requests.keys() {
            if !self.requests.contains_key(name) {
                news.push(request_line(name));
            }
        }
        self.friends = friends;
        self.requests = requests;
        news.extend(self.refresh_groups().await?);
        Ok(news)
    }

    /// Read the group list and invitations again; what changed, to print.
    async fn refresh_groups(&mut self) -> anyhow::Result<Vec<String>> {
        let (groups, invites) = self.conn.groups().await?;
        let mut news = Vec::new();
        for g in &groups {
            if !self.groups.contains_key(&g.group) && self.groups_loaded {
                news.push(format!(
                    "* you are in group {} (/group {} to talk)",
                    g.name, g.name
                ));
            }
        }
        for i in &invites {
            if !self.invites.contains_key(&i.group) {
                news.push(format!(
                    "* {} invited you to group {}: /gaccept {}",
                    self.name(i.by),
                    i.name,
                    i.name
                ));
            }
        }
        self.groups = groups.into_iter().map(|g| (g.group, g)).collect();
        self.invites = invites.into_iter().map(|i| (i.group, i)).collect();
        self.groups_loaded = true;
        Ok(news)
    }

    /// What a group's change means to this user: groups joined or
    /// invitations (from the group list), and, for its owner and admins,
    /// new requests to join.
    async fn group_news(&mut self, group: u64) -> anyhow::Result<Vec<String>> {
        let mut news = self.refresh_groups().await?;
        let manages = self.groups.get(&group).is_some_and(|g| g.role.manages());
        if manages {
            let info = self.conn.group_info(group).await?;
            let known = self.joins.entry(group).or_default();
            for &user in &info.joins {
                if known.insert(user) {
                    news.push(format!(
                        "* user {user} asks to join group {}: /gapprove {} {user}",
                        info.name, info.name
                    ));
                }
            }
            known.retain(|u| info.joins.contains(u));
        }
        Ok(news)
    }

    fn groups_text(&self) -> String {
        let mut lines: Vec<String> = self
            .groups
            .values()
            .map(|g| {
                let unread = g.high_seq.saturating_sub(g.read_seq);
                format!(
                    "  {:<16} {:<7} {:>4} members  {unread} unread",
                    g.name,
                    g.role.name(),
                    g.members
                )
            })
            .collect();
        lines.sort();
        let mut text = format!("groups ({}):\n{}", lines.len(), lines.join("\n"));
        for i in self.invites.values() {
            text.push_str(&format!(
                "\n* invited to {} by {}: /gaccept {}",
                i.name,
                self.name(i.by),
                i.name
            ));
        }
        text
    }

    /// A group of the user (or, with `invited`, one it is invited to) by
    /// name or id.
    fn group_by_name(&self, name: &str, invited: bool) -> Option<u64> {
        if let Ok(id) = name.parse::<u64>() {
            return is_group(id).then_some(id);
        }
        if invited {
            return self
                .invites
                .values()
                .find(|i| i.name == name)
                .map(|i| i.group);
        }
        self.groups
            .values()
            .find(|g| g.name == name)
            .map(|g| g.group)
    }

    async fn group_command(&mut self, cmd: &str, rest: &str) -> anyhow::Result<String> {
        match cmd {
            "/groups" => {
                self.refresh_groups().await?;
                Ok(self.groups_text())
            }
            "/group" => {
                if self.group_by_name(rest, false).is_none() {
                    self.refresh_groups().await?;
                }
                let group = self
                    .group_by_name(rest, false)
                    .with_context(|| format!("you are in no group {rest} (see /groups)"))?;
                self.set_peer(Some(group));
                Ok(format!("talking in group {rest}"))
            }
            "/gcreate" => {
                let info = self.conn.group_create(rest, "").await?;
                self.refresh_groups().await?;
                self.set_peer(Some(info.group));
                Ok(format!(
                    "created group {} (id {}); talking in it",
                    info.name, info.group
                ))
            }
            "/ginvite" => {
                let group = self
                    .peer
                    .filter(|p| is_group(*p))
                    .context("no group chosen: /group NAME first")?;
                self.conn.group_invite(group, rest).await?;
                Ok(format!("invited {rest}"))
            }
            "/gaccept" => {
                self.refresh_groups().await?;
                let group = self
                    .group_by_name(rest, true)
                    .with_context(|| format!("no invitation to a group {rest}"))?;
                self.conn.group_answer_invite(group, true).await?;
                self.refresh_groups().await?;
                self.set_peer(Some(group));
                Ok(format!("you joined group {rest}; talking in it"))
            }
            "/gjoin" => {
                let group: u64 = rest.parse().context("/gjoin takes a group id")?;
                self.conn.group_join(group).await?;
                Ok(format!(
                    "asked to join group {group}; an owner or admin lets you in"
                ))
            }
            "/gapprove" => {
                let (name, user) = rest.rsplit_once(' ').context("/gapprove GROUP USER_ID")?;
                let group = self
                    .group_by_name(name, false)
                    .with_context(|| format!("you are in no group {name}"))?;
                let user: u64 = user.parse().context("/gapprove GROUP USER_ID")?;
                self.conn.group_answer_join(group, user, true).await?;
                Ok(format!("{} is in group {name} now", self.name(user)))
            }
            "/gleave" => {
                let group = self
                    .peer
                    .filter(|p| is_group(*p))
                    .context("no group chosen: /group NAME first")?;
                self.conn.group_leave(group).await?;
                self.refresh_groups().await?;
                self.set_peer(None);
                Ok("you left the group".into())
            }
            _ => Ok(format!("unknown command {cmd}\n{HELP}")),
        }
    }

    /// One typed line; the text to print, and whether to quit.
    async fn on_line(&mut self, line: &str) -> (String, bool) {
        let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
        let rest = rest.trim();
        let result: anyhow::Result<String> = match cmd {
            "/quit" => return (String::new(), true),
            "/help" => Ok(HELP.to_string()),
            "/friends" => self.refresh().await.map(|_| self.friends_text()),
            "/to" => self.talk_to(rest).await,
            "/nick" => self
                .conn
                .set_profile(Some(rest.to_string()), None)
                .await
                .map(|()| "nickname changed".into())
                .map_err(Into::into),
            "/sig" => self
                .conn
                .set_profile(None, Some(rest.to_string()))
                .await
                .map(|()| "signature changed".into())
                .map_err(Into::into),
            "/add" => self
                .conn
                .friend_request(rest, "Friends")
                .await
                .map(|()| format!("friend request sent to {rest}"))
                .map_err(Into::into),
            "/accept" => self.accept(rest).await,
            "/block" => self.block(rest, true).await,
            "/unblock" => self.block(rest, false).await,
            "/groups" | "/group" | "/gcreate" | "/ginvite" | "/gaccept" | "/gjoin"
            | "/gapprove" | "/gleave" => self.group_command(cmd, rest).await,
            _ if cmd.starts_with('/') => Ok(format!("unknown command {cmd}\n{HELP}")),
            _ => self.send(line).await,
        };
        (result.unwrap_or_else(|e| format!("error: {e:#}")), false)
    }

    /// A friend by name, reading the list again if it is not known (a
    /// friendship accepted a moment ago).
    async fn friend(&mut self, name: &str) -> anyhow::Result<Option<u64>> {
        if let Some(id) = self.by_name(name) {
            return Ok(Some(id));
        }
        self.refresh().await?;
        Ok(self.by_name(name))
    }

    async fn talk_to(&mut self, name: &str) -> anyhow::Result<String> {
        match self.friend(name).await? {
            Some(id) => {
                self.set_peer(Some(id));
                Ok(format!("talking to {name}"))
            }
            None => Ok(format!(
                "{name} is not a friend (see /friends, /add {name})"
            )),
        }
    }

    async fn accept(&mut self, name: &str) -> anyhow::Result<String> {
        self.refresh().await?;
        let from = *self
            .requests
            .get(name)
            .with_context(|| format!("no friend request from {name}"))?;
        self.conn.friend_accept(from, "Friends").await?;
        self.refresh().await?;
        Ok(format!("{name} is now a friend (/to {name} to talk)"))
    }

    async fn block(&mut self, name: &str, block: bool) -> anyhow::Result<String> {
        let id = match self.friend(name).await? {
            Some(id) => id,
            None => *self
                .requests
                .get(name)
                .with_context(|| format!("{name} is neither a friend nor asking to be one"))?,
        };
        if block {
            self.conn.block(id).await?;
            Ok(format!("{name} is blocked (/unblock {name} to undo)"))
        } else {
            self.conn.unblock(id).await?;
            Ok(format!("{name} is no longer blocked"))
        }
    }

    async fn send(&mut self, text: &str) -> anyhow::Result<String> {
        let peer = self.peer.context("no friend chosen: /to NAME first")?;
        if is_group(peer) {
            self.conn.group_send(peer, text.as_bytes().to_vec()).await?;
            return Ok("  (sent)".into());
        }
        self.conn.send(peer, text.as_bytes().to_vec()).await?;
        let online = self.friends.get(&peer).is_some_and(|f| f.online.is_some());
        Ok(if online {
            "  (sent)".into()
        } else {
            format!(
                "  (sent; {} is offline and will get it when back)",
                self.name(peer)
            )
        })
    }

    /// A pushed event; the text to print, and whether the chat is over.
    async fn on_event(&mut self, event: ImEvent) -> (String, bool) {
        match event {
            ImEvent::Message(d) => (self.show(&d), false),
            ImEvent::GroupMessage { group, delivery } => {
                let from = self.name(delivery.from);
                let text = String::from_utf8_lossy(&delivery.body);
                (format!("[{}] {from}: {text}", self.name(group)), false)
            }
            ImEvent::GroupDropped { group, count } => (
                format!(
                    "* {}: {count} older messages are no longer kept",
                    self.name(group)
                ),
                false,
            ),
            ImEvent::GroupChanged { group, .. } => match self.group_news(group).await {
                Ok(news) if news.is_empty() => (format!("* {} changed", self.name(group)), false),
                Ok(news) => (news.join("\n"), false),
                Err(e) => (format!("error: {e:#}"), false),
            },
            ImEvent::FriendStatus { user, status } => {
                if let Some(f) = self.friends.get_mut(&user) {
                    f.online = status;
                }
                let what = status.map_or("went offline".to_string(), |s| {
                    format!("is {s:?}").to_lowercase()
                });
                (format!("* {} {what}", self.name(user)), false)
            }
            // Own profile: friends or requests may have changed.
            ImEvent::ProfileChanged { user, .. } if user == self.conn.user() => {
                match self.refresh().await {
                    Ok(news) => (news.join("\n"), false),
                    Err(e) => (format!("error: {e:#}"), false),
                }
            }
            ImEvent::ProfileChanged { user, .. } => {
                let _ = self.refresh().await;
                (
                    format!("* {} changed their profile", self.name(user)),
                    false,
                )
            }
            // A new session: friends' status pushes start again only with
            // a new login view (and friends or requests may have changed).
            ImEvent::Reconnected { gateway, .. } => {
                let mut lines = vec![format!("* reconnected (gateway {gateway})")];
                match self.refresh().await {
                    Ok(news) => lines.extend(news),
                    Err(e) => lines.push(format!("error: {e:#}")),
                }
                (lines.join("\n"), false)
            }
            ImEvent::Kicked => ("* logged in elsewhere: this chat is over".into(), true),
            ImEvent::SessionLost { reason } => (format!("* connection lost: {reason}"), true),
        }
    }
}

fn request_line(name: &str) -> String {
    format!("* {name} asked to be your friend: /accept {name} (or /block {name})")
}

pub async fn run(args: ChatArgs) -> anyhow::Result<()> {
    let (conn, mut events) = args.login.connect().await?;
    let prompt = Arc::new(Mutex::new(String::new()));
    let mut chat = Chat {
        conn,
        friends: HashMap::new(),
        requests: HashMap::new(),
        groups: HashMap::new(),
        invites: HashMap::new(),
        groups_loaded: false,
        joins: HashMap::new(),
        peer: None,
        prompt: prompt.clone(),
    };
    chat.refresh().await?;
    println!(
        "logged in as {} (user {}). /help lists the commands.",
        args.login.user(),
        chat.conn.user()
    );
    println!("{}", chat.friends_text());
    let first = args.to.as_deref().and_then(|n| chat.by_name(n));
    chat.set_peer(first);
    let (lines_tx, mut lines) = mpsc::channel::<Line>(16);
    let mut print = start_input(prompt, lines_tx)?;
    loop {
        let (text, done, handled) = tokio::select! {
            line = lines.recv() => match line {
                Some(Line { text: Some(line), handled }) => {
                    let (text, done) = if line.trim().is_empty() {
                        (String::new(), false)
                    } else {
                        chat.on_line(line.trim()).await
                    };
                    (text, done, Some(handled))
                }
                Some(Line { text: None, .. }) | None => (String::new(), true, None),
            },
            event = events.recv() => {
                let (text, done) = match event {
                    Some(event) => chat.on_event(event).await,
                    None => ("* connection closed".into(), true),
                };
                (text, done, None)
            }
        };
        if !text.is_empty() {
            print(text);
        }
        // Only now may the reader draw the next prompt: the answer to a
        // line is printed above it, not where the prompt then goes. After
        // /quit it draws none (dropping `handled` ends it): a prompt would
        // put the terminal in raw mode again, and the chat would exit so.
        if let (Some(handled), false) = (handled, done) {
            let _ = handled.send(());
        }
        if done {
            break;
        }
    }
    chat.conn.logout().await.ok();
    Ok(())
}

/// A typed line (`None`: end of input), and who waits for it to be
/// handled before drawing the next prompt.
struct Line {
    text: Option<String>,
    handled: oneshot::Sender<()>,
}

/// Start reading lines on a thread of their own; how to print while
/// reading. On a terminal the line being typed is kept intact (rustyline);
/// otherwise (a script piping lines in) lines are read and printed plainly.
fn start_input(
    prompt: Arc<Mutex<String>>,
    lines: mpsc::Sender<Line>,
) -> anyhow::Result<Box<dyn FnMut(String)>> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() && std::io::stdout().is_terminal() {
        let mut editor = DefaultEditor::new().context("cannot open the terminal")?;
        let mut printer = editor
            .create_external_printer()
            .context("cannot print beside the input line")?;
        std::thread::spawn(move || read_lines(editor, prompt, lines));
        return Ok(Box::new(move |mut text| {
            // Between two prompts the printer writes the text as it is, so
            // it must end its line itself (else the next prompt is drawn
            // over it); while a prompt is up it adds no second newline.
            if !text.ends_with('\n') {
                text.push('\n');
            }
            let _ = printer.print(text);
        }));
    }
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if !hand_over(&lines, Some(line)) {
                return;
            }
        }
        hand_over(&lines, None);
    });
    Ok(Box::new(|text| println!("{text}")))
}

/// Give a line to the chat and wait until it was handled; false once the
/// chat is gone or reads no more (`/quit`).
fn hand_over(lines: &mpsc::Sender<Line>, text: Option<String>) -> bool {
    let (handled, done) = oneshot::channel();
    if lines.blocking_send(Line { text, handled }).is_err() {
        return false;
    }
    done.blocking_recv().is_ok()
}

/// The blocking line reader (a thread of its own); `None` at end of input
/// or Ctrl-C/Ctrl-D.
fn read_lines(mut editor: DefaultEditor, prompt: Arc<Mutex<String>>, lines: mpsc::Sender<Line>) {
    loop {
        let p = prompt.lock().expect("prompt lock").clone();
        match editor.readline(&p) {
            Ok(line) => {
                let _ = editor.add_history_entry(line.as_str());
                if !hand_over(&lines, Some(line)) {
                    return;
                }
            }
            Err(ReadlineError::Interrupted | ReadlineError::Eof) | Err(_) => {
                hand_over(&lines, None);
                return;
            }
        }
    }
}
