//! Shared by the integration tests: an in-process service on a temp dir.

#![allow(dead_code)]

use profile::{passwords::Hasher, service::Service, Config};
use proto::profile::{ImportUser, RequestBody, ResponseBody, UserId};
use std::sync::{Arc, OnceLock};

pub struct TestService {
    pub service: Arc<Service>,
    _dir: tempfile::TempDir,
}

pub fn config(dir: &std::path::Path) -> Config {
    let mut config = Config {
        data: dir.to_owned(),
        ..Config::default()
    };
    config.store.map_bytes = 64 << 20;
    config.passwords.threads = 2;
    config
}

pub fn open(adjust: impl FnOnce(&mut Config)) -> TestService {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    adjust(&mut config);
    let (service, _writer) = Service::open(dir.path(), &config).unwrap();
    TestService { service, _dir: dir }
}

/// One PHC hash of "pw" with the default parameters, computed once.
pub fn phc() -> String {
    static PHC: OnceLock<String> = OnceLock::new();
    PHC.get_or_init(|| {
        Hasher::new(&Config::default().passwords)
            .unwrap()
            .hash(b"pw")
            .unwrap()
    })
    .clone()
}

/// Create users `u0..u{n-1}` (password "pw"); their ids in order.
pub async fn import(service: &Service, n: usize) -> Vec<UserId> {
    let users = (0..n)
        .map(|i| ImportUser {
            username: format!("u{i}").into_bytes(),
            phc: phc(),
        })
        .collect();
    match service.handle(RequestBody::ImportUsers { users }).await {
        ResponseBody::Imported(r) => r.into_iter().map(|r| r.unwrap()).collect(),
        other => panic!("{other:?}"),
    }
}
