//! `imctl up`: the whole system on one machine, in this process: presence,
//! profile, msgstore shards and a gateway, data under `./data`, demo users
//! on first start, and one Prometheus listener for the metrics of all of
//! them. Every address has a flag; a taken one is named with its flag.
//! Ctrl-C stops everything cleanly.

use crate::demo::{Demo, DemoUser, DATA_DIR_DEFAULT};
use anyhow::{anyhow, Context};
use clap::Args;
use embedded::{Component, Embedded, EmbeddedConfig, EmbeddedError};
use rand::{distributions::Alphanumeric, Rng};
use std::{net::SocketAddr, path::PathBuf};

/// Where `imctl up` serves `/metrics` unless told otherwise.
pub const METRICS_ADDR_DEFAULT: &str = "127.0.0.1:9100";

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Directory for all data (created if missing).
    #[arg(long, value_name = "DIR", default_value = DATA_DIR_DEFAULT)]
    data: PathBuf,
    /// UDP address of the gateway (where clients log in).
    #[arg(long, value_name = "ADDR", default_value = embedded::GATEWAY_ADDR_DEFAULT)]
    gateway: SocketAddr,
    /// TCP address of the gateway's peer listener (other gateways, map
    /// pushes by `imctl rebalance`); the cluster map names it as given.
    #[arg(long, value_name = "ADDR", default_value = embedded::GATEWAY_PEER_ADDR_DEFAULT)]
    gateway_peer: SocketAddr,
    /// TCP address of presence.
    #[arg(long, value_name = "ADDR", default_value = embedded::PRESENCE_ADDR_DEFAULT)]
    presence: SocketAddr,
    /// TCP address of the profile service.
    #[arg(long, value_name = "ADDR", default_value = embedded::PROFILE_ADDR_DEFAULT)]
    profile: SocketAddr,
    /// TCP address of a msgstore shard, one per shard (repeat the flag or
    /// separate with commas).
    #[arg(
        long = "shard",
        value_name = "ADDR",
        value_delimiter = ',',
        default_values = embedded::SHARD_ADDRS_DEFAULT
    )]
    shards: Vec<SocketAddr>,
    /// Run every shard and the profile service as a replicated group of
    /// this many replicas (1, 3, 5 or 7), all in this process: replica R
    /// of the shard or profile at port P serves on P + 10(R-1) and
    /// replicates on that port + 1000.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = replicas)]
    replicas: usize,
    /// HTTP address serving the Prometheus metrics of every component at
    /// /metrics.
    #[arg(long, value_name = "ADDR", default_value = METRICS_ADDR_DEFAULT)]
    metrics: SocketAddr,
}

const DEMO_USERS: [&str; 2] = ["alice", "bob"];

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let signals = daemon::Signals::install()?;
    // Before the components: they record from their start on, and a taken
    // metrics port then stops nothing that was running. The components
    // record through the process's global recorder, so this one listener
    // serves them all.
    let metrics = daemon::install_metrics(args.metrics).map_err(|e| {
        if e.is_addr_in_use() {
            in_use(args.metrics, "metrics", "--metrics")
        } else {
            e.into()
        }
    })?;
    let config = EmbeddedConfig {
        presence: args.presence,
        profile: args.profile,
        shards: args.shards.clone(),
        replicas: args.replicas,
        gateway: Some(args.gateway),
        gateway_peer: args.gateway_peer,
        ..EmbeddedConfig::standard(args.data.clone())
    };
    let cluster = Embedded::start(config).await.map_err(explain)?;
    let demo = match demo_users(&cluster, &args).await {
        Ok(demo) => demo,
        Err(e) => {
            cluster.shutdown().await;
            return Err(e);
        }
    };
    print_guide(&args, &cluster, &demo, metrics);
    let signal = signals.wait().await;
    eprintln!("imctl up: {signal}: stopping");
    cluster.shutdown().await;
    eprintln!("imctl up: stopped cleanly");
    Ok(())
}

/// A taken address is named with what wanted it and the flag that moves
/// it; any other failure as it is.
fn explain(e: EmbeddedError) -> anyhow::Error {
    let flag = match e.component {
        Component::Presence => "--presence",
        Component::Profile => "--profile",
        Component::Shard(_) => "--shard",
        Component::Gateway => "--gateway",
        Component::GatewayPeer => "--gateway-peer",
        Component::DataDir | Component::ClusterKey | Component::ClusterMap => return e.into(),
    };
    match e.addr_in_use {
        Some(addr) => in_use(addr, &e.component.to_string(), flag),
        None => e.into(),
    }
}

fn replicas(text: &str) -> Result<usize, String> {
    match text.parse() {
        Ok(n @ (1 | 3 | 5 | 7)) => Ok(n),
        _ => Err("a group has 1, 3, 5 or 7 replicas".into()),
    }
}

fn in_use(addr: SocketAddr, what: &str, flag: &str) -> anyhow::Error {
    anyhow!("{addr} is already in use ({what}; pick another with {flag} ADDR)")
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

fn print_guide(args: &UpArgs, cluster: &Embedded, demo: &Demo, metrics: SocketAddr) {
    let data = args.data.display();
    println!(
        "im-server is up: gateway {} (UDP), data in {data}/",
        demo.gateway
    );
    println!("  gateway public key {}", demo.public_key);
    for u in &demo.users {
        println!("  demo user {:<6} password {}", u.name, u.password);
    }
    let shards: Vec<String> = cluster
        .shards
        .iter()
        .map(|s| s.local_addr().to_string())
        .collect();
    println!(
        "  presence {}, profile {}, shards {}",
        cluster.presence.local_addr(),
        cluster.map.profile,
        shards.join(", ")
    );
    println!("  metrics of every component: http://{metrics}/metrics");
    println!("Next, in another terminal:");
    println!("  imctl send --user alice --to bob hello     # alice -> bob");
    println!("  imctl inbox --user bob                     # bob reads his messages");
    println!("  imctl chat --user alice                    # chat interactively (/help)");
    println!("Settings and users are in {data}/demo.toml. Ctrl-C stops everything.");
}
