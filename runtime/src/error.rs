//! The runtime's one error type: what failed, named by the part that failed.

use std::time::SystemTime;

/// Result with the runtime's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the runtime can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The graph is not well formed; found when it is compiled.
    #[error("graph `{graph}`: {message}")]
    Graph {
        /// The graph's name.
        graph: String,
        /// What is wrong, naming the node or edge.
        message: String,
    },
    /// A write does not fit its channel (unknown channel, wrong type, two values for a last-value channel...).
    #[error("channel `{channel}`: {message}")]
    Channel {
        /// The channel written.
        channel: String,
        /// What is wrong.
        message: String,
    },
    /// A node failed after its retries.
    #[error("node `{node}` failed after {attempts} attempt(s): {message}")]
    Node {
        /// The node.
        node: String,
        /// How many times it ran.
        attempts: u32,
        /// The node's last error.
        message: String,
    },
    /// A task's update was refused before commit (not serializable, too large).
    #[error("node `{node}`: invalid update: {message}")]
    InvalidUpdate {
        /// The node whose update was refused.
        node: String,
        /// Why.
        message: String,
    },
    /// The run took more super-steps than its recursion limit allows.
    #[error(
        "recursion limit of {limit} super-steps reached without hitting END (set RunConfig::recursion_limit to allow more)"
    )]
    RecursionLimit {
        /// The limit in force.
        limit: u64,
    },
    /// Another runner holds this thread's lease.
    #[error("thread `{thread}` is leased by `{owner}` ({until})")]
    LeaseHeld {
        /// The thread.
        thread: String,
        /// The runner holding it.
        owner: String,
        /// Until when, in words (a session-bound lease lasts while its database session lives).
        until: String,
    },
    /// This runner's lease was taken over; it may not commit anything more.
    #[error("thread `{thread}`: lease lost (epoch {epoch} was superseded); this runner may not commit")]
    LeaseLost {
        /// The thread.
        thread: String,
        /// The epoch this runner held.
        epoch: u64,
    },
    /// The thread's head moved under this runner (a checkpoint chain never forks silently).
    #[error("thread `{thread}` namespace `{ns}`: head moved (expected checkpoint {expected:?}, found {found:?})")]
    HeadMoved {
        /// The thread.
        thread: String,
        /// The checkpoint namespace.
        ns: String,
        /// The head this runner built on.
        expected: Option<u64>,
        /// The head in the store.
        found: Option<u64>,
    },
    /// A worker reported a task of a step that is no longer current.
    #[error("thread `{thread}`: task {task} belongs to checkpoint {checkpoint}, which is no longer the current step")]
    StaleTask {
        /// The thread.
        thread: String,
        /// The task id.
        task: String,
        /// The checkpoint the task was computed from.
        checkpoint: u64,
    },
    /// The thread was created by another graph.
    #[error(
        "thread `{thread}` belongs to graph `{stored}`, not `{requested}`; pass RunConfig::allow_graph_change to run it anyway"
    )]
    GraphMismatch {
        /// The thread.
        thread: String,
        /// Graph identity stored with the thread (name@hash).
        stored: String,
        /// Graph identity of the caller (name@hash).
        requested: String,
    },
    /// The thread or checkpoint asked for does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The call does not fit the thread's state (for example resuming a thread that is not interrupted).
    #[error("{0}")]
    InvalidState(String),
    /// The run failed earlier and stays failed.
    #[error("thread `{thread}` failed: {message}")]
    RunFailed {
        /// The thread.
        thread: String,
        /// The stored failure.
        message: String,
    },
    /// The checkpoint store failed. The message never carries credentials.
    #[error("checkpoint store ({backend}): {message}")]
    Checkpoint {
        /// `postgres`, `sqlite` or `memory`.
        backend: &'static str,
        /// What failed.
        message: String,
        /// Whether retrying may help (connection lost, server restarting).
        transient: bool,
    },
    /// A stored payload could not be encoded or decoded.
    #[error("stored payload encoding: {0}")]
    Encoding(String),
    /// JSON (de)serialization of state failed.
    #[error("serialization: {0}")]
    Serde(#[from] serde_json::Error),
}

impl Error {
    /// Whether the operation may succeed if retried (a lost connection, a restarting server).
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Checkpoint { transient: true, .. })
    }

    pub(crate) fn graph(graph: &str, message: impl Into<String>) -> Self {
        Error::Graph { graph: graph.to_owned(), message: message.into() }
    }

    pub(crate) fn channel(channel: &str, message: impl Into<String>) -> Self {
        Error::Channel { channel: channel.to_owned(), message: message.into() }
    }
}

/// Formats a lease expiry for [`Error::LeaseHeld`].
pub(crate) fn until_words(expires: Option<SystemTime>) -> String {
    match expires {
        None => "held while its database session lives".to_owned(),
        Some(t) => match t.duration_since(SystemTime::now()) {
            Ok(left) => format!("expires in {:.1}s", left.as_secs_f64()),
            Err(_) => "expired".to_owned(),
        },
    }
}
