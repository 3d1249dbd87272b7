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

/// This test binary again, to run only test `name` of the module `module`
/// (its `module_path!()`) as a child process (`--exact file::name`, its
/// output not captured, one thread).
pub fn child_test(module: &str, name: &str) -> std::process::Command {
    let file = module.split_once("::").map_or(module, |(_, file)| file);
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        &format!("{file}::{name}"),
        "--nocapture",
        "--test-threads=1",
    ]);
    cmd
}
