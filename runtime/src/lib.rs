//! Agentic's durable graph engine: LangGraph's semantics, checkpointed every super-step.
//!
//! - [`channel`]: state channels and their reducers (last value, append, merge, sum, ephemeral, custom).
//! - [`state`]: the state snapshot nodes read and the updates they return.
//! - [`node`]: the node trait, the context a task runs with (interrupts, journal), retry policies.
//! - [`graph`]: building a graph and checking it when compiled.
//! - `algo`: the pure step algorithm (which tasks run, how writes apply).
//! - `runner`: one task's execution: retries, timeouts, panics.
//! - [`pregel`]: the run loop that owns the lease and all checkpoint I/O.
//! - [`history`]: a thread's state, its history, updates from outside.
//! - [`worker`]: running one task of a thread's current step from another process.
//! - [`stream`]: the events a run streams.
//! - [`checkpoint`]: the store trait and its PostgreSQL, SQLite and memory backends.
//! - [`error`]: the runtime's error type.

mod algo;
pub mod channel;
pub mod checkpoint;
pub mod error;
pub mod graph;
pub mod history;
pub mod node;
pub mod pregel;
mod retry;
mod runner;
pub mod state;
pub mod stream;
pub mod worker;

pub use channel::{Channel, ChannelKind, CustomReducer, reducer_fn};
pub use checkpoint::{Checkpointer, MemoryCheckpointer, PostgresCheckpointer, SharedCheckpointer, SqliteCheckpointer};
pub use error::{Error, Result};
pub use graph::{END, Graph, GraphBuilder, START};
pub use history::StateSnapshot;
pub use node::{Context, Node, NodeError, RetryPolicy, node_fn};
pub use pregel::{Durability, Input, Interrupt, InterruptKind, NewThread, Resume, RunConfig, RunOutcome};
pub use state::{Goto, State, Update};
pub use stream::Event;
pub use worker::TaskReport;

/// A hash map for the engine's own keys (task ids, thread ids, channel names): `foldhash` instead
/// of `SipHash`, a few times fewer instructions per lookup on the step loop. Seeded per process;
/// the keys come from graphs and the runtime, not from untrusted input.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
