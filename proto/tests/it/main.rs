//! The integration tests of `proto`, in one binary: each file a module
//! (one test binary builds and links once; tens of them took most of
//! CI's time). Run one file's tests with `cargo test -p proto --test it <file>::`.

mod support;

mod session_edge;
mod session_security;
mod session_sim;
