//! What the `user`, `friend` and `avatar` groups share: the profile
//! service's address and naming a user by username or id.

use anyhow::Context;
use clap::Args;
use profile::ProfileClient;
use proto::profile::UserId;

#[derive(Debug, Args)]
pub struct ProfileAddr {
    /// Address of the profile service (HOST:PORT).
    #[arg(
        long = "addr",
        global = true,
        value_name = "HOST:PORT",
        env = "IMCTL_PROFILE_ADDR",
        default_value = "127.0.0.1:7500"
    )]
    pub addr: String,
}

impl ProfileAddr {
    pub async fn connect(&self) -> anyhow::Result<ProfileClient> {
        ProfileClient::connect(self.addr.as_str())
            .await
            .with_context(|| format!("cannot connect to the profile service at {}", self.addr))
    }
}

/// A USER argument: a number is a user id, anything else a username
/// (usernames start with a letter, so the two never collide).
pub async fn resolve(client: &ProfileClient, user: &str) -> anyhow::Result<UserId> {
    match user.parse::<UserId>() {
        Ok(id) => Ok(id),
        Err(_) => client
            .lookup(user)
            .await
            .with_context(|| format!("no user named {user:?}")),
    }
}
