//! `imctl up`: the whole system on one machine, in this process: presence,
//! profile, two msgstore shards and a gateway, data under `./data`, demo
//! users on first start. Ctrl-C stops everything cleanly.

use crate::demo::{Demo, DemoUser, DATA_DIR_DEFAULT};
use anyhow::Context;
use clap::Args;
use embedded::{Embedded, EmbeddedConfig};
use rand::{distributions::Alphanumeric, Rng};
use std::{net::SocketAddr, path::PathBuf};

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Directory for all data (created if missing).
    #[arg(long, value_name = "DIR", default_value = DATA_DIR_DEFAULT)]
    data: PathBuf,
    /// UDP address of the gateway.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7100")]
    gateway: SocketAddr,
}

const DEMO_USERS: [&str; 2] = ["alice", "bob"];

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let signals = daemon::Signals::install()?;
    let mut config = EmbeddedConfig::standard(args.data.clone());
    config.gateway = Some(args.gateway);
    let cluster = Embedded::start(config)
        .await
        .context("cannot start the cluster (is another `imctl up` or daemon using its ports?)")?;
    let demo = match demo_users(&cluster, &args).await {
        Ok(demo) => demo,
        Err(e) => {
            cluster.shutdown().await;
            return Err(e);
        }
    };
    print_guide(&args, &demo);
    let signal = signals.wait().await;
    eprintln!("imctl up: {signal}: stopping");
    cluster.shutdown().await;
    eprintln!("imctl up: stopped cleanly");
    Ok(())
}

/// Create alice and bob (friends of each other) on first start; the demo
/// file either way.
async fn demo_users(cluster: &Embedded, args: &UpArgs) -> anyhow::Result<Demo> {
    let gateway = cluster.gateway.as_ref().expect("imctl up starts a gateway");
    let public_key = gateway::keys::to_hex(&gateway.public_key());
    if let Ok(mut demo) = Demo::load(&args.data) {
        demo.gateway = gateway.local_addr().to_string();
        demo.public_key = public_key;
        demo.save(&args.data)?;
        return Ok(demo);
    }
    let profile = profile::ProfileClient::connect(cluster.map.profile.clone()).await?;
    let mut users = Vec::new();
    let mut ids = Vec::new();
    for name in DEMO_USERS {
        let password: String = rand::thread_rng()
            .sample_iter(&Alphanumeric)
            .take(12)
            .map(char::from)
            .collect();
        let id = profile
            .create_user(name, password.as_bytes())
            .await
            .with_context(|| format!("cannot create demo user {name}"))?;
        profile
            .set_profile(id, Some(&capitalized(name)), Some("trying out im-server"))
            .await?;
        users.push(DemoUser {
            name: name.into(),
            password,
        });
        ids.push(id);
    }
    profile.friend_request(ids[0], ids[1], "Friends").await?;
    profile.friend_accept(ids[1], ids[0], "Friends").await?;
    let demo = Demo {
        gateway: gateway.local_addr().to_string(),
        public_key,
        users,
    };
    demo.save(&args.data)?;
    Ok(demo)
}

fn capitalized(name: &str) -> String {
    let mut c = name.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

fn print_guide(args: &UpArgs, demo: &Demo) {
    let data = args.data.display();
    println!(
        "im-server is up: gateway {} (UDP), data in {data}/",
        demo.gateway
    );
    println!("  gateway public key {}", demo.public_key);
    for u in &demo.users {
        println!("  demo user {:<6} password {}", u.name, u.password);
    }
    println!("Next, in another terminal:");
    println!("  imctl send --user alice --to bob hello     # alice -> bob");
    println!("  imctl inbox --user bob                     # bob reads his messages");
    println!("  imctl chat --user alice                    # chat interactively (/help)");
    println!("Settings and users are in {data}/demo.toml. Ctrl-C stops everything.");
}
