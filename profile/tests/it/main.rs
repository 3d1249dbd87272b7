//! The integration tests of `profile`, in one binary: each file a module
//! (one test binary builds and links once; tens of them took most of
//! CI's time). Run one file's tests with `cargo test -p profile --test it <file>::`.

mod common;

mod bad_input;
mod daemon;
mod friend_graph;
mod group_model;
mod groups;
mod logins;
mod relations;
mod replica_group;
mod server_limits;
