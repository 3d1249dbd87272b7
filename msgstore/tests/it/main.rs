//! The integration tests of `msgstore`, in one binary: each file a module
//! (one test binary builds and links once; tens of them took most of
//! CI's time). Run one file's tests with `cargo test -p msgstore --test it <file>::`.

mod damage;

mod corruption;
mod crash;
mod daemon;
mod engine;
mod log_damage;
mod model;
mod read_damage;
mod replica_group;
mod replica_partition;
mod replica_rebuild;
mod storage_full;

/// The full name of test `name` in the module `module` (its
/// `module_path!()`), as `--exact` wants it when a test runs this binary
/// again as a child: `file::name`.
pub fn test_name(module: &str, name: &str) -> String {
    let file = module.split_once("::").map_or(module, |(_, file)| file);
    format!("{file}::{name}")
}
