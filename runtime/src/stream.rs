//! What a run streams while it goes: state after each step, each task's writes, custom events
//! from nodes, checkpoints as they commit, interrupts.

use serde::Serialize;
use serde_json::Value;

use tokio::sync::mpsc;

use crate::error::Error;
use crate::pregel::Interrupt;

/// Where a run sends its events.
pub(crate) type EventSink = mpsc::UnboundedSender<Result<Event, Error>>;

/// One event of a run's stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The whole state after a super-step (or after the input was applied).
    Values {
        /// Super-steps completed.
        step: u64,
        /// Every channel's value.
        state: Value,
    },
    /// The writes one task made.
    Updates {
        /// The super-step.
        step: u64,
        /// The node.
        node: String,
        /// The task.
        task: String,
        /// Channel writes, in order.
        writes: Vec<(String, Value)>,
    },
    /// A value a node emitted with `Context::emit`.
    Custom {
        /// The node.
        node: String,
        /// The value.
        value: Value,
    },
    /// A checkpoint was committed.
    Checkpoint {
        /// Its id.
        id: u64,
        /// Super-steps completed.
        step: u64,
    },
    /// The run stopped for human input.
    Interrupted {
        /// The pending interrupts.
        interrupts: Vec<Interrupt>,
    },
}
