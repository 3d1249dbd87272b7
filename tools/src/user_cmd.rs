//! `imctl user`: accounts on the profile service.

use crate::{
    output::Output,
    profile_conn::{resolve, ProfileAddr},
};
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use profile::{passwords::Hasher, ProfileClient};
use proto::profile::{ImportUser, IMPORT_USERS_MAX};
use serde::Serialize;
use std::{collections::HashMap, io::BufRead, path::PathBuf};

#[derive(Debug, Args)]
pub struct UserArgs {
    #[command(flatten)]
    addr: ProfileAddr,
    #[command(subcommand)]
    command: UserCommand,
}

#[derive(Debug, Args)]
struct PasswordArg {
    /// The password (visible to other local users in the process list;
    /// prefer --password-stdin or IMCTL_PASSWORD).
    #[arg(long, env = "IMCTL_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Read the password from the first line of standard input.
    #[arg(long, conflicts_with = "password")]
    password_stdin: bool,
}

impl PasswordArg {
    fn get(&self) -> anyhow::Result<Vec<u8>> {
        if let Some(p) = &self.password {
            return Ok(p.clone().into_bytes());
        }
        if self.password_stdin {
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line)?;
            return Ok(line.trim_end_matches(['\r', '\n']).as_bytes().to_vec());
        }
        bail!("give the password with --password, --password-stdin or IMCTL_PASSWORD")
    }
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Create an account; prints its user id.
    Add {
        username: String,
        #[command(flatten)]
        password: PasswordArg,
    },
    /// Change USER's password (USER: username or id).
    Passwd {
        user: String,
        #[command(flatten)]
        password: PasswordArg,
    },
    /// Disable USER's account (logins are refused), or enable it again.
    Disable {
        user: String,
        #[arg(long)]
        enable: bool,
    },
    /// Show USER's account and profile.
    Show { user: String },
    /// Create many accounts from FILE, one `username,secret` per line.
    ///
    /// SECRET is either a plain password or a ready argon2id PHC string
    /// (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`, as argon2 tools print
    /// it; at least as strong as the service's parameters). Plain passwords
    /// are hashed here, in parallel on every core, with the service's
    /// parameters; PHC strings are stored as given, so a file of them loads
    /// at the speed of the database. Empty lines and lines starting with
    /// `#` are skipped. Accounts go to the service in batches of up to
    /// 1,000, each one transaction; a line that fails (taken name, bad
    /// field) is reported and does not stop the others.
    Import {
        file: PathBuf,
        /// For test fixtures only: lines with the same plain password share
        /// one hash (and salt), so 10,000 accounts with one password cost
        /// one argon2 run. Anyone who can read the database then sees which
        /// accounts share a password: never use it for real accounts.
        #[arg(long)]
        reuse_hash: bool,
    },
}

pub async fn run(args: UserArgs, out: &Output) -> anyhow::Result<()> {
    let client = args.addr.connect().await?;
    match args.command {
        UserCommand::Add { username, password } => {
            let user = client.create_user(&username, &password.get()?).await?;
            out.emit(
                &serde_json::json!({ "user": user, "username": username }),
                || format!("created user {user} ({username})"),
            )
        }
        UserCommand::Passwd { user, password } => {
            let id = resolve(&client, &user).await?;
            client.set_password(id, &password.get()?).await?;
            out.emit(&serde_json::json!({ "user": id }), || {
                format!("password of user {id} changed")
            })
        }
        UserCommand::Disable { user, enable } => {
            let id = resolve(&client, &user).await?;
            client.set_disabled(id, !enable).await?;
            let state = if enable { "enabled" } else { "disabled" };
            out.emit(
                &serde_json::json!({ "user": id, "disabled": !enable }),
                || format!("user {id} {state}"),
            )
        }
        UserCommand::Show { user } => show(&client, out, &user).await,
        UserCommand::Import { file, reuse_hash } => import(&client, out, &file, reuse_hash).await,
    }
}

async fn show(client: &ProfileClient, out: &Output, user: &str) -> anyhow::Result<()> {
    let id = resolve(client, user).await?;
    let account = client.account(id).await?;
    let profile = client.get_profile(id).await?;
    let avatar = profile.avatar.as_ref().map(profile::avatar::hex);
    let value = serde_json::json!({
        "user": id,
        "username": account.username,
        "disabled": account.disabled,
        "created_ms": account.created_ms,
        "nickname": profile.nickname,
        "signature": profile.signature,
        "avatar": avatar,
        "version": profile.version,
    });
    out.emit(&value, || {
        format!(
            "user:       {id}\nusername:   {}\ndisabled:   {}\nnickname:   {}\nsignature:  {}\navatar:     {}\nversion:    {}",
            account.username,
            account.disabled,
            profile.nickname,
            profile.signature,
            avatar.as_deref().unwrap_or("-"),
            profile.version
        )
    })
}

/// One line of an import file.
struct Line {
    number: usize,
    username: String,
    secret: String,
}

fn read_lines(file: &PathBuf) -> anyhow::Result<Vec<Line>> {
    let f = std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let mut lines = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("{}: line {}", file.display(), i + 1))?;
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((username, secret)) = line.split_once(',') else {
            bail!(
                "{}: line {}: expected `username,password`",
                file.display(),
                i + 1
            );
        };
        lines.push(Line {
            number: i + 1,
            username: username.trim().to_owned(),
            secret: secret.to_owned(),
        });
    }
    Ok(lines)
}

/// Hash every plain password on all cores; PHC strings pass through.
fn hash_all(lines: &[Line], hasher: &Hasher, reuse: bool) -> anyhow::Result<Vec<String>> {
    let is_phc = |s: &str| s.starts_with("$argon2");
    let mut shared: HashMap<&str, String> = HashMap::new();
    if reuse {
        for l in lines.iter().filter(|l| !is_phc(&l.secret)) {
            if !shared.contains_key(l.secret.as_str()) {
                shared.insert(&l.secret, hasher.hash(l.secret.as_bytes())?);
            }
        }
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = lines.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = lines
            .chunks(chunk)
            .map(|part| {
                let shared = &shared;
                scope.spawn(move || {
                    part.iter()
                        .map(|l| match shared.get(l.secret.as_str()) {
                            _ if is_phc(&l.secret) => Ok(l.secret.clone()),
                            Some(phc) => Ok(phc.clone()),
                            None => hasher.hash(l.secret.as_bytes()),
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(lines.len());
        for w in workers {
            all.extend(
                w.join()
                    .map_err(|_| anyhow::anyhow!("a hashing thread panicked"))??,
            );
        }
        Ok(all)
    })
}

#[derive(Serialize)]
struct Imported {
    created: usize,
    failed: usize,
    errors: Vec<String>,
}

/// Most failures listed one by one in the output.
const IMPORT_ERRORS_SHOWN_MAX: usize = 20;

async fn import(
    client: &ProfileClient,
    out: &Output,
    file: &PathBuf,
    reuse: bool,
) -> anyhow::Result<()> {
    let lines = read_lines(file)?;
    let info = client.info().await?;
    let hasher = Hasher::for_service(&info)?;
    // imctl's runtime has nothing else to do meanwhile: hash right here.
    let phcs = hash_all(&lines, &hasher, reuse)?;
    let mut batches = Vec::new();
    for (part, hashes) in lines
        .chunks(IMPORT_USERS_MAX)
        .zip(phcs.chunks(IMPORT_USERS_MAX))
    {
        let users = part
            .iter()
            .zip(hashes)
            .map(|(l, phc)| ImportUser {
                username: l.username.clone().into_bytes(),
                phc: phc.clone(),
            })
            .collect();
        let c = client.clone();
        batches.push(tokio::spawn(async move { c.import_users(users).await }));
    }
    let mut result = Imported {
        created: 0,
        failed: 0,
        errors: Vec::new(),
    };
    for (batch, part) in batches.into_iter().zip(lines.chunks(IMPORT_USERS_MAX)) {
        for (r, line) in batch.await??.into_iter().zip(part) {
            match r {
                Ok(_) => result.created += 1,
                Err(e) => {
                    result.failed += 1;
                    if result.errors.len() < IMPORT_ERRORS_SHOWN_MAX {
                        result.errors.push(format!(
                            "line {} ({}): {}",
                            line.number, line.username, e.message
                        ));
                    }
                }
            }
        }
    }
    out.emit(&result, || {
        let mut text = format!(
            "created {} users, {} failed\n",
            result.created, result.failed
        );
        for e in &result.errors {
            text.push_str(&format!("  {e}\n"));
        }
        text
    })?;
    if result.failed > 0 {
        bail!("{} lines failed", result.failed);
    }
    Ok(())
}
