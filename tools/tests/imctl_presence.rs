//! `imctl presence` against a real presence server (run in-process on
//! port 0) with one gateway online.

use presence::{
    daemon::{self, DaemonConfig},
    ClientConfig, PresenceClient, Status,
};
use std::process::Command;

fn imctl(addr: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_imctl"))
        .args(["presence", "--addr", addr])
        .args(args)
        .output()
        .expect("run imctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn presence_stats_lookup_and_gateways() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let config = DaemonConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..DaemonConfig::default()
    };
    let running = daemon::start(config).expect("start presence");
    let addr = running.local_addr().to_string();
    let (gw, _events) = runtime
        .block_on(PresenceClient::connect(
            addr.as_str(),
            4,
            ClientConfig::default(),
        ))
        .expect("connect a gateway");
    runtime
        .block_on(gw.online(42, 4200, Status::Away))
        .expect("online");

    let (ok, stdout, stderr) = imctl(&addr, &["--json", "lookup", "42", "43"]);
    assert!(ok, "{stderr}");
    let rows: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(rows[0]["user"], 42);
    assert_eq!(rows[0]["entry"]["gateway"], 4);
    assert_eq!(rows[0]["entry"]["session"], 4200);
    assert_eq!(rows[0]["entry"]["status"], "Away");
    assert!(rows[1]["entry"].is_null());

    let (ok, stdout, stderr) = imctl(&addr, &["lookup", "42", "43"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("42: Away on gateway 4 session 4200"),
        "{stdout}"
    );
    assert!(stdout.contains("43: offline"), "{stdout}");

    let (ok, stdout, stderr) = imctl(&addr, &["--json", "stats"]);
    assert!(ok, "{stderr}");
    let stats: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(stats["users_online"], 1);
    assert_eq!(stats["gateways_connected"], 1);

    let (ok, stdout, stderr) = imctl(&addr, &["gateways"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("gateway 4"), "{stdout}");
    assert!(stdout.contains("connected, 1 users"), "{stdout}");

    let (ok, _, stderr) = imctl("127.0.0.1:1", &["stats"]);
    assert!(!ok, "no server at port 1");
    assert!(stderr.contains("presence server"), "{stderr}");
    drop(gw);
    runtime.block_on(running.shutdown()).expect("shutdown");
}
