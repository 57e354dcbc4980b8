//! Agentic's durable graph engine.
//!
//! - [`channel`]: state channels and their reducers.
//! - [`checkpoint`]: the checkpoint store trait and its PostgreSQL, SQLite and memory backends.
//! - [`error`]: the runtime's error type.

pub mod channel;
pub mod checkpoint;
pub mod error;

pub use channel::{Channel, ChannelKind, CustomReducer, reducer_fn};
pub use checkpoint::{Checkpointer, MemoryCheckpointer, PostgresCheckpointer, SqliteCheckpointer};
pub use error::{Error, Result};
