//! Agentic: the workspace's root package. It holds what spans crates: the examples, the
//! cross-crate tests (crash, outage, split-brain, workers) and the benchmarks, plus the
//! durability probe those tests drive as a real process.
//!
//! - [`probe`]: the graph the durability tests run and kill, and the checks on its result.
//! - [`replay`]: a run's commits recorded and replayed straight into a store (the benchmark's
//!   profile: the store's share of a step without the engine's).
//!
//! The README follows; its Rust example is compiled as a doctest.
#![doc = include_str!("../README.md")]

pub mod probe;
pub mod replay;

pub use agentic_runtime as runtime;
