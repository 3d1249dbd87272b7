//! The integration tests of `gateway`, in one binary: each file a module
//! (one test binary builds and links once; tens of them took most of
//! CI's time). Run one file's tests with `cargo test -p gateway --test it <file>::`.

mod sim;
mod support;

mod e2e;
mod edge;
mod failover;
mod faults;
mod groups_e2e;
mod peer_port;
mod presence_replicas;
mod promises;
mod rebalance;
mod rebalance_live;
mod router_faults;
mod router_groups;
mod router_rules;
mod shard_router;
