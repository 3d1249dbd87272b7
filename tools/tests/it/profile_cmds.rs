//! `imctl user`, `friend` (requests, lists, blocks) and `avatar` against a
//! real profile daemon (run in-process on port 0).

use crate::common;

fn imctl(addr: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--addr", addr]);
    common::run(&all, stdin)
}

fn json(addr: &str, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--addr", addr]);
    common::json(&all)
}

#[test]
fn users_friends_and_avatars() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut config = profile::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data: dir.path().join("profile"),
        ..profile::Config::default()
    };
    config.store.map_bytes = 64 << 20;
    let running = runtime
        .block_on(profile::daemon::start(config))
        .expect("start");
    let addr = running.local_addr().to_string();

    let alice = json(&addr, &["user", "add", "alice", "--password", "a-pw"]);
    let alice_id = alice["user"].as_u64().unwrap();
    let (ok, stdout, stderr) = imctl(
        &addr,
        &["user", "add", "bob", "--password-stdin"],
        Some("b-pw\n"),
    );
    assert!(ok && stdout.contains("created user"), "{stdout} {stderr}");
    let (ok, _, stderr) = imctl(&addr, &["user", "add", "alice", "--password", "x"], None);
    assert!(!ok && stderr.contains("UsernameTaken"), "{stderr}");

    // Import: plain passwords, a ready hash, a comment, a bad line.
    let phc = profile::passwords::Hasher::new(&profile::Config::default().passwords)
        .unwrap()
        .hash(b"c-pw")
        .unwrap();
    let file = dir.path().join("users.csv");
    std::fs::write(
        &file,
        format!("# fixture\ncarol,{phc}\ndave,d-pw\nerin,d-pw\n\nBAD NAME,x\n"),
    )
    .unwrap();
    let (ok, stdout, stderr) = imctl(
        &addr,
        &["user", "import", file.to_str().unwrap(), "--reuse-hash"],
        None,
    );
    assert!(!ok, "a failed line fails the command: {stdout}");
    assert!(
        stdout.contains("created 3 users, 1 failed") && stdout.contains("line 6"),
        "{stdout} {stderr}"
    );

    let client = runtime
        .block_on(profile::ProfileClient::connect(addr.clone()))
        .unwrap();
    let check = |u: &str, p: &[u8]| runtime.block_on(client.check_password(u, p));
    assert!(check("carol", b"c-pw").is_ok());
    assert!(check("dave", b"d-pw").is_ok() && check("erin", b"d-pw").is_ok());
    assert!(check("alice", b"a-pw").is_ok() && check("bob", b"b-pw").is_ok());

    json(&addr, &["user", "passwd", "alice", "--password", "new"]);
    assert!(check("alice", b"a-pw").is_err() && check("alice", b"new").is_ok());
    assert_eq!(json(&addr, &["user", "disable", "alice"])["disabled"], true);
    let shown = json(&addr, &["user", "show", "alice"]);
    assert_eq!(
        (shown["user"].as_u64(), shown["disabled"].as_bool()),
        (Some(alice_id), Some(true))
    );
    assert!(check("alice", b"new").is_err());
    let (ok, stdout, _) = imctl(&addr, &["user", "show", &alice_id.to_string()], None);
    assert!(ok && stdout.contains("username:   alice"), "{stdout}");

    json(&addr, &["friend", "add", "alice", "bob", "--group", "Work"]);
    let pending = json(&addr, &["friend", "list", "bob"]);
    assert_eq!(pending["requests"][0]["username"], "alice");
    json(&addr, &["friend", "accept", "bob", "alice"]);
    let list = json(&addr, &["friend", "list", "alice"]);
    assert_eq!(list["groups"][0]["name"], "Work");
    assert_eq!(list["groups"][0]["friends"][0]["username"], "bob");
    let (ok, stdout, _) = imctl(&addr, &["friend", "list", "bob"], None);
    assert!(
        ok && stdout.contains("Friends (1)") && stdout.contains("alice"),
        "{stdout}"
    );

    // Block lists: by username, a repeated block changes nothing, listed
    // with names (sorted by id), a blocked user's friend request refused.
    let id = |name: &str| json(&addr, &["user", "show", name])["user"].as_u64();
    let (bob_id, carol_id, dave_id) = (id("bob"), id("carol"), id("dave"));
    let first = json(&addr, &["friend", "block", "bob", "dave"]);
    assert_eq!(
        (first["user"].as_u64(), first["blocked"].as_u64()),
        (bob_id, dave_id)
    );
    let second = json(&addr, &["friend", "block", "bob", "carol"]);
    assert!(second["version"].as_u64() > first["version"].as_u64());
    let again = json(&addr, &["friend", "block", "bob", "carol"]);
    assert_eq!(again["version"], second["version"], "no change");
    let blocked = json(&addr, &["friend", "blocked", "bob"]);
    assert_eq!(
        blocked,
        serde_json::json!({ "user": bob_id, "blocked": [
            { "user": carol_id, "username": "carol" },
            { "user": dave_id, "username": "dave" },
        ] })
    );
    let (ok, stdout, _) = imctl(&addr, &["friend", "blocked", "bob"], None);
    assert!(
        ok && stdout.contains("carol") && stdout.contains("dave"),
        "{stdout}"
    );
    let (ok, _, stderr) = imctl(&addr, &["friend", "add", "carol", "bob"], None);
    assert!(!ok && stderr.contains("NotFound"), "{stderr}");
    let (ok, _, stderr) = imctl(&addr, &["friend", "block", "bob", "bob"], None);
    assert!(!ok && stderr.contains("InvalidField"), "{stderr}");
    let (ok, stdout, _) = imctl(&addr, &["friend", "unblock", "bob", "dave"], None);
    assert!(ok && stdout.contains("no longer blocks"), "{stdout}");
    let unblocked = json(&addr, &["friend", "unblock", "bob", "carol"]);
    assert_eq!(unblocked["unblocked"].as_u64(), carol_id);
    let (ok, stdout, _) = imctl(&addr, &["friend", "blocked", "bob"], None);
    assert!(ok && stdout.contains("blocks nobody"), "{stdout}");
    json(&addr, &["friend", "add", "carol", "bob"]);

    let png = profile::avatar::samples::png(48, 48, 3000);
    let image = dir.path().join("a.png");
    std::fs::write(&image, &png).unwrap();
    let set = json(&addr, &["avatar", "set", "bob", image.to_str().unwrap()]);
    let hash = profile::avatar::hash(&png);
    assert_eq!(set["hash"], profile::avatar::hex(&hash));
    assert_eq!(runtime.block_on(client.avatar(hash)).unwrap(), png);
    std::fs::write(&image, b"not an image").unwrap();
    let (ok, _, stderr) = imctl(
        &addr,
        &["avatar", "set", "bob", image.to_str().unwrap()],
        None,
    );
    assert!(!ok && stderr.contains("BadImage"), "{stderr}");

    drop(client);
    runtime.block_on(running.shutdown());
}
