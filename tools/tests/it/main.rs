//! The integration tests of `tools`, in one binary: each file a module
//! (one test binary builds and links once; tens of them took most of
//! CI's time). Run one file's tests with `cargo test -p tools --test it <file>::`.

mod common;

mod chat;
mod connection_memory;
mod imctl;
mod metrics_lint;
mod profile_cmds;
mod rebalance;
mod status;
mod up;
