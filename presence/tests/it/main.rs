//! The integration tests of `presence`, in one binary: each file a module
//! (one test binary builds and links once; tens of them took most of
//! CI's time). Run one file's tests with `cargo test -p presence --test it <file>::`.

mod daemon;
mod model;
