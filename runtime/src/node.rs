//! Nodes and what they can do while running: the [`Node`] trait, the [`Context`] a task gets
//! (interrupts, journaled calls, custom events, its Send payload), errors and retry policies.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::checkpoint::{PendingWrite, SharedCheckpointer, StepRef, WriteKind, codec};
use crate::state::{Goto, State, Update};
use crate::stream::{Event, EventSink};

/// A boxed future returned by nodes.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a node did not return an update.
pub enum NodeError {
    /// The node called [`Context::interrupt`] and waits for a resume value.
    Interrupt {
        /// Which interrupt of the task (0 for the first call).
        index: usize,
        /// The payload shown to the human.
        value: Value,
    },
    /// The node failed.
    Failed {
        /// The cause.
        source: Box<dyn std::error::Error + Send + Sync>,
        /// `Some(false)` never retries; `None` leaves it to the retry policy.
        retryable: Option<bool>,
    },
}

impl NodeError {
    /// A failure that is never retried.
    pub fn fatal(message: impl Into<String>) -> Self {
        NodeError::Failed { source: message.into().into(), retryable: Some(false) }
    }
    /// A failure the retry policy may retry.
    pub fn retryable(message: impl Into<String>) -> Self {
        NodeError::Failed { source: message.into().into(), retryable: Some(true) }
    }
    pub(crate) fn message(&self) -> String {
        match self {
            NodeError::Interrupt { .. } => "interrupted".to_owned(),
            NodeError::Failed { source, .. } => source.to_string(),
        }
    }
}

impl fmt::Debug for NodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeError::Interrupt { index, value } => write!(f, "Interrupt({index}, {value})"),
            NodeError::Failed { source, retryable } => write!(f, "Failed({source}, retryable: {retryable:?})"),
        }
    }
}

impl fmt::Display for NodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message())
    }
}

impl<E: Into<Box<dyn std::error::Error + Send + Sync>>> From<E> for NodeError {
    fn from(error: E) -> Self {
        NodeError::Failed { source: error.into(), retryable: None }
    }
}

/// A node: an async function from a state snapshot to an update.
pub trait Node: Send + Sync + 'static {
    /// Runs the node once.
    fn run(&self, state: State, ctx: Context) -> BoxFuture<'static, Result<Update, NodeError>>;
}

struct FnNode<F>(F);

impl<F, Fut> Node for FnNode<F>
where
    F: Fn(State, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Update, NodeError>> + Send + 'static,
{
    fn run(&self, state: State, ctx: Context) -> BoxFuture<'static, Result<Update, NodeError>> {
        Box::pin((self.0)(state, ctx))
    }
}

/// A node from an async closure: `node_fn(|state, ctx| async move { Ok(Update::new()) })`.
pub fn node_fn<F, Fut>(f: F) -> impl Node
where
    F: Fn(State, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Update, NodeError>> + Send + 'static,
{
    FnNode(f)
}

/// A conditional edge's router: reads the state (with the node's own writes applied) and says
/// where to go. Return node names, END, or Send packets.
pub type Router = Arc<dyn Fn(&State) -> Result<Vec<Goto>, NodeError> + Send + Sync>;

/// Which errors a retry policy retries.
pub type RetryPredicate = Arc<dyn Fn(&NodeError) -> bool + Send + Sync>;

/// How a node is retried: attempts, exponential backoff with jitter, which errors retry.
#[derive(Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1: no retry).
    pub max_attempts: u32,
    /// Delay before the first retry.
    pub initial_interval: Duration,
    /// Factor applied to the delay after each retry.
    pub backoff_factor: f32,
    /// Largest delay.
    pub max_interval: Duration,
    /// Randomise delays so retries of many tasks spread out.
    pub jitter: bool,
    /// Which failures retry; by default every failure not marked fatal.
    pub retry_on: RetryPredicate,
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("max_attempts", &self.max_attempts)
            .field("initial_interval", &self.initial_interval)
            .field("backoff_factor", &self.backoff_factor)
            .field("max_interval", &self.max_interval)
            .field("jitter", &self.jitter)
            .finish_non_exhaustive()
    }
}

impl Default for RetryPolicy {
    /// Three attempts, 500 ms doubling up to 30 s, with jitter (LangGraph's defaults).
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            initial_interval: Duration::from_millis(500),
            backoff_factor: 2.0,
            max_interval: Duration::from_secs(30),
            jitter: true,
            retry_on: Arc::new(|e| !matches!(e, NodeError::Failed { retryable: Some(false), .. })),
        }
    }
}

impl RetryPolicy {
    /// No retry.
    pub fn none() -> Self {
        RetryPolicy { max_attempts: 1, ..Self::default() }
    }
    /// `attempts` in all with the default backoff.
    pub fn attempts(attempts: u32) -> Self {
        RetryPolicy { max_attempts: attempts.max(1), ..Self::default() }
    }
    /// Sets the first delay.
    pub fn initial_interval(mut self, delay: Duration) -> Self {
        self.initial_interval = delay;
        self
    }
    /// Sets which errors retry.
    pub fn retry_on(mut self, predicate: impl Fn(&NodeError) -> bool + Send + Sync + 'static) -> Self {
        self.retry_on = Arc::new(predicate);
        self
    }
    pub(crate) fn should_retry(&self, error: &NodeError) -> bool {
        match error {
            NodeError::Interrupt { .. } | NodeError::Failed { retryable: Some(false), .. } => false,
            NodeError::Failed { retryable: Some(true), .. } => true,
            NodeError::Failed { .. } => (self.retry_on)(error),
        }
    }
}

/// What a running task can reach: its identity, its Send payload, interrupts, the journal, events.
#[derive(Clone)]
pub struct Context {
    inner: Arc<ContextInner>,
}

pub(crate) struct ContextInner {
    pub(crate) thread: String,
    pub(crate) ns: String,
    pub(crate) checkpoint: u64,
    /// The lease epoch of the runner running this task (see [`StepRef::epoch`]).
    pub(crate) epoch: Option<u64>,
    pub(crate) step: u64,
    pub(crate) task_id: String,
    pub(crate) node: String,
    pub(crate) arg: Option<Value>,
    pub(crate) attempt: AtomicUsize,
    pub(crate) resumes: BTreeMap<usize, Value>,
    pub(crate) journal: Mutex<HashMap<String, Vec<u8>>>,
    pub(crate) journal_seen: Mutex<HashMap<String, usize>>,
    pub(crate) interrupts: AtomicUsize,
    pub(crate) store: SharedCheckpointer,
    pub(crate) events: Option<EventSink>,
    pub(crate) persist: Persist,
}

impl Context {
    pub(crate) fn new(inner: ContextInner) -> Self {
        Context { inner: Arc::new(inner) }
    }

    pub(crate) fn start_attempt(&self, attempt: usize) {
        self.inner.attempt.store(attempt, Ordering::Relaxed);
        self.inner.interrupts.store(0, Ordering::Relaxed);
        if let Ok(mut seen) = self.inner.journal_seen.lock() {
            seen.clear();
        }
    }

    /// The thread this task belongs to.
    pub fn thread_id(&self) -> &str {
        &self.inner.thread
    }
    /// The task's id: stable across re-executions of the same task.
    pub fn task_id(&self) -> &str {
        &self.inner.task_id
    }
    /// The node's name.
    pub fn node(&self) -> &str {
        &self.inner.node
    }
    /// The super-step (0 for the first).
    pub fn step(&self) -> u64 {
        self.inner.step
    }
    /// The current attempt, 1 for the first.
    pub fn attempt(&self) -> usize {
        self.inner.attempt.load(Ordering::Relaxed)
    }
    /// The payload of the Send packet that started this task.
    pub fn arg(&self) -> Option<&Value> {
        self.inner.arg.as_ref()
    }
    /// A key for an external side effect that is the same each time this task runs again
    /// (pass it as an idempotency key to APIs that take one).
    pub fn idempotency_key(&self, name: &str) -> String {
        format!("{}:{}:{name}", self.inner.thread, self.inner.task_id)
    }

    /// Stops the run for human input. The first time, returns `Err` (propagate it with `?`):
    /// the run is persisted and returns the payload. When the run is resumed, the node runs
    /// again from the start and this call returns the resume value.
    pub fn interrupt(&self, value: impl Into<Value>) -> Result<Value, NodeError> {
        let index = self.inner.interrupts.fetch_add(1, Ordering::Relaxed);
        match self.inner.resumes.get(&index) {
            Some(resume) => Ok(resume.clone()),
            None => Err(NodeError::Interrupt { index, value: value.into() }),
        }
    }

    /// Emits a custom event into the run's stream.
    pub fn emit(&self, value: impl Into<Value>) {
        if let Some(events) = &self.inner.events {
            let _ = events.send(Ok(Event::Custom { node: self.inner.node.clone(), value: value.into() }));
        }
    }

    /// Runs a side-effecting call as a journaled step: its result is stored at once in the
    /// task's journal, and when the task runs again (after a crash or a retry) the recorded
    /// result is returned without calling again. Several calls with one name are told apart by
    /// their order. A failed call is not recorded.
    pub async fn journal<T, E, F>(&self, name: &str, call: F) -> Result<T, NodeError>
    where
        T: Serialize + DeserializeOwned,
        E: Into<NodeError>,
        F: Future<Output = Result<T, E>>,
    {
        let key = {
            let mut seen = self.inner.journal_seen.lock().map_err(|_| NodeError::fatal("journal lock poisoned"))?;
            let n = seen.entry(name.to_owned()).or_insert(0);
            *n += 1;
            format!("{name}#{n}")
        };
        let recorded = self.inner.journal.lock().ok().and_then(|j| j.get(&key).cloned());
        if let Some(data) = recorded {
            return codec::decode(&data).map_err(|e| NodeError::fatal(format!("journal `{key}`: {e}")));
        }
        let value = call.await.map_err(Into::into)?;
        let data = codec::encode(&value).map_err(|e| NodeError::fatal(format!("journal `{key}`: {e}")))?;
        let write = PendingWrite { task: self.inner.task_id.clone(), kind: WriteKind::Journal, key: key.clone(), data };
        if let Persist::Never = self.inner.persist {
            return Ok(value); // durability "exit": nothing is persisted before the run ends
        }
        if let Persist::After(commit) = &self.inner.persist {
            commit.clone().await.map_err(|e| NodeError::fatal(format!("previous step's commit failed: {e}")))?;
        }
        let step = StepRef {
            thread: &self.inner.thread,
            ns: &self.inner.ns,
            checkpoint: self.inner.checkpoint,
            epoch: self.inner.epoch,
        };
        crate::retry::store_call(|| self.inner.store.put_writes(step, std::slice::from_ref(&write)))
            .await
            .map_err(|e| NodeError::Failed { source: Box::new(e), retryable: Some(false) })?;
        if let Ok(mut journal) = self.inner.journal.lock() {
            journal.insert(key, write.data);
        }
        Ok(value)
    }
}

/// When a task may persist its writes.
#[derive(Clone)]
pub(crate) enum Persist {
    /// At once (durability sync).
    Now,
    /// Once the previous step's commit, still in flight, has landed (durability async).
    After(crate::pregel::CommitInFlight),
    /// Never before the run ends (durability exit).
    Never,
}
