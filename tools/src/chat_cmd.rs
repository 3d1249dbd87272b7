//! `imctl chat`: a line-based chat client for a person, on the client SDK.
//! Incoming messages and friends' comings and goings are printed above the
//! line being typed (rustyline's external printer), never through it.

use crate::session_cmd::LoginArgs;
use anyhow::Context;
use clap::Args;
use client::sdk::{Connection, ImEvent};
use proto::{app::Delivery, presence::Status};
use rustyline::{error::ReadlineError, DefaultEditor, ExternalPrinter};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};
use tokio::sync::mpsc;

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    login: LoginArgs,
    /// The friend to talk to first (username).
    #[arg(long)]
    to: Option<String>,
}

const HELP: &str = "type a message and Enter to send it to the current friend; commands: \
/to NAME (talk to NAME), /friends, /nick TEXT, /sig TEXT, /add USER (friend request), \
/accept USER, /quit";

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
    peer: Option<u64>,
    prompt: Arc<Mutex<String>>,
}

impl Chat {
    fn name(&self, user: u64) -> String {
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
            text.push_str(&format!("\n  friend request from {name} (/accept {name})"));
        }
        text
    }

    fn show(&self, d: &Delivery) -> String {
        let tag = if d.seq.is_some() {
            " (while you were away)"
        } else {
            ""
        };
        format!(
            "{}{tag}: {}",
            self.name(d.from),
            String::from_utf8_lossy(&d.body)
        )
    }

    fn set_peer(&mut self, peer: Option<u64>) {
        self.peer = peer;
        let label = peer.map_or_else(|| "nobody".to_string(), |p| self.name(p));
        *self.prompt.lock().expect("prompt lock") = format!("to {label}> ");
    }

    async fn refresh(&mut self) -> anyhow::Result<()> {
        let view = self.conn.login_view().await?;
        let online: HashMap<u64, Status> = view.online.into_iter().collect();
        self.friends = view
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
        self.requests = view
            .view
            .requests
            .iter()
            .map(|r| (r.username.clone(), r.from))
            .collect();
        Ok(())
    }

    /// One typed line; the text to print, and whether to quit.
    async fn on_line(&mut self, line: &str) -> (String, bool) {
        let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
        let rest = rest.trim();
        let result: anyhow::Result<String> = match cmd {
            "/quit" => return (String::new(), true),
            "/help" => Ok(HELP.to_string()),
            "/friends" => self.refresh().await.map(|()| self.friends_text()),
            "/to" => match self.by_name(rest) {
                Some(id) => {
                    self.set_peer(Some(id));
                    Ok(format!("talking to {rest}"))
                }
                None => Ok(format!("{rest} is not a friend (see /friends)")),
            },
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
            _ if cmd.starts_with('/') => Ok(format!("unknown command {cmd}; {HELP}")),
            _ => self.send(line).await,
        };
        (result.unwrap_or_else(|e| format!("error: {e:#}")), false)
    }

    async fn accept(&mut self, name: &str) -> anyhow::Result<String> {
        self.refresh().await?;
        let from = *self
            .requests
            .get(name)
            .with_context(|| format!("no friend request from {name}"))?;
        self.conn.friend_accept(from, "Friends").await?;
        self.refresh().await?;
        Ok(format!("{name} is now a friend"))
    }

    async fn send(&mut self, text: &str) -> anyhow::Result<String> {
        let peer = self.peer.context("no friend chosen: /to NAME first")?;
        let outcome = match self.conn.send(peer, text.as_bytes().to_vec()).await? {
            proto::app::SendOutcome::Delivered => "delivered",
            proto::app::SendOutcome::Stored { .. } => "stored: they will get it when they are back",
        };
        Ok(format!("  ({outcome})"))
    }

    /// A pushed event; the text to print, and whether the chat is over.
    fn on_event(&mut self, event: ImEvent) -> (String, bool) {
        match event {
            ImEvent::Message(d) => (self.show(&d), false),
            ImEvent::FriendStatus { user, status } => {
                if let Some(f) = self.friends.get_mut(&user) {
                    f.online = status;
                }
                let what = status.map_or("went offline".to_string(), |s| {
                    format!("is {s:?}").to_lowercase()
                });
                (format!("* {} {what}", self.name(user)), false)
            }
            ImEvent::ProfileChanged { user, .. } => {
                (format!("* profile of {} changed", self.name(user)), false)
            }
            ImEvent::Reconnected { gateway, .. } => {
                (format!("* reconnected (gateway {gateway})"), false)
            }
            ImEvent::Kicked => ("* logged in elsewhere: this chat is over".into(), true),
            ImEvent::SessionLost { reason } => (format!("* connection lost: {reason}"), true),
        }
    }
}

pub async fn run(args: ChatArgs) -> anyhow::Result<()> {
    let (conn, mut events) = args.login.connect().await?;
    let prompt = Arc::new(Mutex::new(String::new()));
    let mut chat = Chat {
        conn,
        friends: HashMap::new(),
        requests: HashMap::new(),
        peer: None,
        prompt: prompt.clone(),
    };
    chat.refresh().await?;
    println!(
        "logged in as {} (user {}). {HELP}",
        args.login.user(),
        chat.conn.user()
    );
    println!("{}", chat.friends_text());
    for d in chat.conn.drain_mailbox().await? {
        println!("{}", chat.show(&d));
    }
    let first = args.to.as_deref().and_then(|n| chat.by_name(n));
    chat.set_peer(first);
    let (lines_tx, mut lines) = mpsc::channel::<Option<String>>(16);
    let mut print = start_input(prompt, lines_tx)?;
    loop {
        let (text, done) = tokio::select! {
            line = lines.recv() => match line.flatten() {
                Some(line) if line.trim().is_empty() => continue,
                Some(line) => chat.on_line(line.trim()).await,
                None => (String::new(), true),
            },
            event = events.recv() => match event {
                Some(event) => chat.on_event(event),
                None => ("* connection closed".into(), true),
            },
        };
        if !text.is_empty() {
            print(text);
        }
        if done {
            break;
        }
    }
    chat.conn.logout().await.ok();
    Ok(())
}

/// Start reading lines on a thread of their own; how to print while
/// reading. On a terminal the line being typed is kept intact (rustyline);
/// otherwise (a script piping lines in) lines are read and printed plainly.
fn start_input(
    prompt: Arc<Mutex<String>>,
    lines: mpsc::Sender<Option<String>>,
) -> anyhow::Result<Box<dyn FnMut(String)>> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() && std::io::stdout().is_terminal() {
        let mut editor = DefaultEditor::new().context("cannot open the terminal")?;
        let mut printer = editor
            .create_external_printer()
            .context("cannot print beside the input line")?;
        std::thread::spawn(move || read_lines(editor, prompt, lines));
        return Ok(Box::new(move |text| {
            let _ = printer.print(text);
        }));
    }
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if lines.blocking_send(Some(line)).is_err() {
                return;
            }
        }
        let _ = lines.blocking_send(None);
    });
    Ok(Box::new(|text| println!("{text}")))
}

/// The blocking line reader (a thread of its own); `None` at end of input
/// or Ctrl-C/Ctrl-D.
fn read_lines(
    mut editor: DefaultEditor,
    prompt: Arc<Mutex<String>>,
    lines: mpsc::Sender<Option<String>>,
) {
    loop {
        let p = prompt.lock().expect("prompt lock").clone();
        match editor.readline(&p) {
            Ok(line) => {
                let _ = editor.add_history_entry(line.as_str());
                if lines.blocking_send(Some(line)).is_err() {
                    return;
                }
            }
            Err(ReadlineError::Interrupted | ReadlineError::Eof) | Err(_) => {
                let _ = lines.blocking_send(None);
                return;
            }
        }
    }
}
