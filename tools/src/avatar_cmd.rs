//! `imctl avatar`: avatar images.

use crate::{
    output::Output,
    profile_conn::{resolve, ProfileAddr},
};
use anyhow::Context;
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct AvatarArgs {
    #[command(flatten)]
    addr: ProfileAddr,
    #[command(subcommand)]
    command: AvatarCommand,
}

#[derive(Debug, Subcommand)]
enum AvatarCommand {
    /// Make FILE (PNG, JPEG or WebP, at most 256 KiB) USER's avatar.
    Set { user: String, file: PathBuf },
}

pub async fn run(args: AvatarArgs, out: &Output) -> anyhow::Result<()> {
    let client = args.addr.connect().await?;
    match args.command {
        AvatarCommand::Set { user, file } => {
            let id = resolve(&client, &user).await?;
            let image =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let bytes = image.len();
            let (hash, version) = client.set_avatar(id, image).await?;
            let hash = profile::avatar::hex(&hash);
            out.emit(&serde_json::json!({ "user": id, "hash": hash, "bytes": bytes, "version": version }), || {
                format!("avatar of user {id} set: {hash} ({bytes} bytes)")
            })
        }
    }
}
