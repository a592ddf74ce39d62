//! Shared training machinery of mimlab: the pipeline stages every objective uses.
//!
//! data -> (objective, in its own crate) -> optim -> trainer -> log
pub mod alloc;
pub mod bench;
pub mod config;
pub mod data;
pub mod device;
pub mod dist;
pub mod fsutil;
pub mod init;
pub mod log;
pub mod optim;
pub mod picture;
pub mod rng;
pub mod run_dir;
pub mod simd;
pub mod stats;
pub mod trainer;
