//! The checkpoint store: one trait, three backends (PostgreSQL, SQLite, memory).
//!
//! A thread is a sequence of checkpoints per namespace (the root graph is namespace `""`,
//! subgraphs get their own). Each checkpoint names the version of every channel; a channel's
//! value is stored once per version, and append channels store only their new items, so a
//! thread's storage grows linearly with its steps. Checkpoint ids are a per-thread sequence
//! allocated by the lease holder, so a retried commit is recognisable and chains never fork.
//!
//! Single writer per thread: [`Checkpointer::acquire`] hands out a [`Lease`] with an epoch, and
//! every commit is fenced by it inside the committing transaction. Workers that run tasks of the
//! current step need no lease: their writes are fenced by the checkpoint id instead.

pub mod codec;
pub mod memory;
pub mod postgres;
pub mod sqlite;

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

pub use memory::MemoryCheckpointer;
pub use postgres::PostgresCheckpointer;
pub use sqlite::SqliteCheckpointer;

/// A graph's identity, recorded with each thread so a thread is not resumed by another graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphIdentity {
    /// The graph's name.
    pub name: String,
    /// Hash of the graph's structure (nodes, edges, channels).
    pub hash: String,
}

impl fmt::Display for GraphIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.hash)
    }
}

/// What a runner asks for when it takes a thread.
#[derive(Debug, Clone)]
pub struct LeaseRequest<'a> {
    /// The thread.
    pub thread: &'a str,
    /// Who asks (shown to a runner that is refused).
    pub owner: &'a str,
    /// The graph that will run the thread.
    pub graph: &'a GraphIdentity,
    /// Take the thread even if another graph created it.
    pub allow_graph_change: bool,
}

/// The right to commit checkpoints on one thread, with its fencing epoch.
///
/// Dropping it releases it (backends bind it to a database session or a process).
pub struct Lease {
    /// The thread.
    pub thread: String,
    /// The owner name given when acquiring.
    pub owner: String,
    /// The fencing token: commits carrying an older epoch are refused.
    pub epoch: u64,
    /// The backend's own key for the thread (PostgreSQL: its row id), if it has one: lets a
    /// commit skip looking the thread up by name.
    pub(crate) handle: Option<i64>,
    /// Whether the thread had no checkpoint when the lease was taken.
    fresh: bool,
    next_seq: AtomicU64,
    guard: Option<Box<dyn Any + Send + Sync>>,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("thread", &self.thread)
            .field("owner", &self.owner)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// Builds a lease; `max_seq` is the highest checkpoint id the thread has.
    pub fn new(thread: &str, owner: &str, epoch: u64, max_seq: u64, guard: Option<Box<dyn Any + Send + Sync>>) -> Self {
        Lease {
            thread: thread.to_owned(),
            owner: owner.to_owned(),
            epoch,
            handle: None,
            fresh: max_seq == 0,
            next_seq: AtomicU64::new(max_seq + 1),
            guard,
        }
    }

    /// Records the backend's own key for the thread.
    pub(crate) fn with_handle(mut self, handle: Option<i64>) -> Self {
        self.handle = handle;
        self
    }

    /// Whether the thread had no checkpoint at all when the lease was taken: a run on it has no
    /// head to load.
    pub fn is_fresh(&self) -> bool {
        self.fresh
    }

    /// A copy carrying only the fencing token (thread, owner, epoch), for a commit queued to
    /// another task; dropping it releases nothing.
    pub(crate) fn fencing_copy(&self) -> Lease {
        Lease::new(&self.thread, &self.owner, self.epoch, 0, None).with_handle(self.handle)
    }

    /// The backend's guard, if it is a `T`.
    pub(crate) fn guard<T: Any>(&self) -> Option<&T> {
        self.guard.as_ref()?.downcast_ref()
    }

    /// Allocates the id of the next checkpoint on this thread.
    pub fn next_checkpoint_id(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }
}

/// Where a checkpoint came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The run's input was applied (the run's admission).
    Input,
    /// A super-step of the loop.
    Loop,
    /// `update_state` wrote to it from outside.
    Update,
    /// A copy of another checkpoint, made to branch from it.
    Fork,
}

impl Source {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Input => "input",
            Source::Loop => "loop",
            Source::Update => "update",
            Source::Fork => "fork",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "input" => Source::Input,
            "loop" => Source::Loop,
            "update" => Source::Update,
            "fork" => Source::Fork,
            _ => return None,
        })
    }
}

/// A channel's stored version, named in a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelVersion {
    /// The id of the checkpoint that wrote this version.
    pub v: u64,
    /// Whether the stored row is a delta on an earlier version (append channels).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub d: bool,
    /// A small whole value (at most [`INLINE_MAX`] bytes encoded) kept in the checkpoint itself:
    /// no row of its own, so no row header and index entry of several times its size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub i: Option<Value>,
    /// For a delta: the version its chain's open segment starts at (the whole value, or the last
    /// segment row); `None` for a delta stored before segments existed.
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    pub segment: Option<u64>,
    /// For a delta: the rows stored since `segment`, this one included.
    #[serde(rename = "t", default, skip_serializing_if = "is_zero")]
    pub rows: u32,
    /// For a delta: the items appended since `segment`.
    #[serde(rename = "m", default, skip_serializing_if = "is_zero")]
    pub items: u64,
}

impl ChannelVersion {
    /// A whole value stored in a row of its own.
    pub fn whole(v: u64) -> Self {
        ChannelVersion { v, d: false, i: None, segment: None, rows: 0, items: 0 }
    }

    /// A whole value kept inline.
    pub fn inline(v: u64, value: Value) -> Self {
        ChannelVersion { i: Some(value), ..Self::whole(v) }
    }

    /// A delta row: `items` appended since the segment that starts at `segment`, in `rows` rows.
    pub fn delta(v: u64, segment: u64, rows: u32, items: u64) -> Self {
        ChannelVersion { v, d: true, i: None, segment: Some(segment), rows, items }
    }
}

fn is_zero<T: Default + PartialEq>(n: &T) -> bool {
    *n == T::default()
}

/// How many rows a delta chain's open segment holds before it is closed: that step's row holds
/// every item appended since the segment started and is based on the segment's start, so the
/// chain that rebuilds a value skips the segment's deltas. A chain is at most
/// `SEGMENT_ROWS - 1` deltas plus one row per closed segment, each item stored at most twice.
pub const SEGMENT_ROWS: u32 = 32;

/// The largest encoded value a checkpoint keeps inline (see [`ChannelVersion::i`]).
pub const INLINE_MAX: usize = 32;

/// A task scheduled for the next super-step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum PendingTask {
    /// Run `node` on the state.
    Pull {
        /// The node.
        node: String,
    },
    /// Run `node` with its own payload (a Send packet).
    Push {
        /// The node.
        node: String,
        /// The payload.
        arg: Value,
    },
}

/// The engine's part of a checkpoint, stored as one document.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckpointBody {
    /// Version of every channel that has a value.
    pub versions: BTreeMap<String, ChannelVersion>,
    /// Tasks of the next super-step; empty once the run reached END.
    pub next: Vec<PendingTask>,
    /// Join barriers: for each waiting node, the predecessors that have finished.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub barriers: BTreeMap<String, Vec<String>>,
    /// Ephemeral channels written by the step that made this checkpoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fresh: Vec<String>,
}

/// One stored version of one channel: a whole value, or the items appended since `base`.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelBlob {
    /// The channel.
    pub channel: String,
    /// The version (id of the checkpoint that wrote it).
    pub version: u64,
    /// For a delta, the version it extends.
    pub base: Option<u64>,
    /// JSON bytes: the value, or for a delta the list of new items.
    pub data: Vec<u8>,
}

/// A checkpoint as committed.
#[derive(Debug, Clone)]
pub struct NewCheckpoint {
    /// Its id (from [`Lease::next_checkpoint_id`]).
    pub id: u64,
    /// The checkpoint it follows, if any.
    pub parent: Option<u64>,
    /// The head the committer built on; the commit fails if the head moved.
    pub expected_head: Option<u64>,
    /// Super-steps completed in this namespace.
    pub step: u64,
    /// Where it came from.
    pub source: Source,
    /// Channel versions, next tasks, barriers (shared: the loop keeps it as its current state).
    pub body: Arc<CheckpointBody>,
    /// Free-form metadata (JSON object): tasks that ran, the writer, user tags.
    pub metadata: Arc<Metadata>,
}

/// A new checkpoint's metadata, stored as a JSON object. A loop step's is typed (the writer and
/// the tasks whose writes it applied): it is written on every step, and a JSON map would cost a
/// tree of owned keys to build, encode and free each time. It reads back as JSON.
#[derive(Debug, Clone, PartialEq)]
pub enum Metadata {
    /// What a loop step writes.
    Step(StepMetadata),
    /// Any other metadata: a JSON object.
    Json(Value),
}

/// A loop step's metadata: `{"owner": .., "tasks": [{"id": .., "node": ..}], "interrupt_after": true}`
/// (the last only when a static interrupt stops the run after this step).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepMetadata {
    /// The runner that wrote the step.
    pub owner: String,
    /// The tasks whose writes the step applied, in task-path order.
    pub tasks: Vec<TaskRef>,
    /// A static `interrupt_after` stops the run at this checkpoint.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub interrupt_after: bool,
}

/// A task as a step's metadata names it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskRef {
    /// The task's id.
    pub id: String,
    /// Its node.
    pub node: String,
}

impl From<Value> for Metadata {
    fn from(value: Value) -> Self {
        Metadata::Json(value)
    }
}

impl Serialize for Metadata {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Metadata::Step(step) => step.serialize(serializer),
            Metadata::Json(value) => value.serialize(serializer),
        }
    }
}

/// One super-step's commit: the checkpoint and the channel values it changed.
#[derive(Debug, Clone)]
pub struct StepCommit {
    /// The thread.
    pub thread: String,
    /// The checkpoint namespace (`""` for the root graph).
    pub ns: String,
    /// The new checkpoint.
    pub checkpoint: NewCheckpoint,
    /// Channel versions written by this step.
    pub blobs: Vec<ChannelBlob>,
}

/// A checkpoint read back, its channel values materialised.
#[derive(Debug, Clone)]
pub struct StoredCheckpoint {
    /// Its id.
    pub id: u64,
    /// The namespace.
    pub ns: String,
    /// The checkpoint it follows.
    pub parent: Option<u64>,
    /// Super-steps completed.
    pub step: u64,
    /// Where it came from.
    pub source: Source,
    /// Versions, next tasks, barriers.
    pub body: CheckpointBody,
    /// Channel values.
    pub values: BTreeMap<String, Value>,
    /// Metadata.
    pub metadata: Value,
    /// When it was committed.
    pub created_at: SystemTime,
}

/// A checkpoint's summary, as listed.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointMeta {
    /// Its id.
    pub id: u64,
    /// The namespace.
    pub ns: String,
    /// The checkpoint it follows.
    pub parent: Option<u64>,
    /// Super-steps completed.
    pub step: u64,
    /// Where it came from.
    pub source: Source,
    /// Metadata.
    pub metadata: Value,
}

/// Which checkpoints to list (newest first).
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only checkpoints older than this id.
    pub before: Option<u64>,
    /// At most this many.
    pub limit: Option<usize>,
    /// Only checkpoints of this source.
    pub source: Option<Source>,
}

impl ListFilter {
    pub(crate) fn admits(&self, id: u64, source: Source) -> bool {
        self.before.is_none_or(|b| id < b) && self.source.is_none_or(|s| s == source)
    }
}

/// What a pending write records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteKind {
    /// The task's finished output (its writes and where it routes).
    Output,
    /// The recorded result of a journaled call inside the task.
    Journal,
    /// An interrupt raised by the task, waiting for a resume value.
    Interrupt,
    /// A resume value for one of the task's interrupts.
    Resume,
    /// The task failed for good.
    Error,
}

impl WriteKind {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            WriteKind::Output => "output",
            WriteKind::Journal => "journal",
            WriteKind::Interrupt => "interrupt",
            WriteKind::Resume => "resume",
            WriteKind::Error => "error",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "output" => WriteKind::Output,
            "journal" => WriteKind::Journal,
            "interrupt" => WriteKind::Interrupt,
            "resume" => WriteKind::Resume,
            "error" => WriteKind::Error,
            _ => return None,
        })
    }
}

/// A write recorded against a task of the current step before the step commits.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingWrite {
    /// The task's id.
    pub task: String,
    /// What it records.
    pub kind: WriteKind,
    /// Distinguishes several writes of one kind (journal key, interrupt id); `""` otherwise.
    pub key: String,
    /// JSON bytes.
    pub data: Vec<u8>,
}

/// Which step a pending write belongs to.
#[derive(Debug, Clone, Copy)]
pub struct StepRef<'a> {
    /// The thread.
    pub thread: &'a str,
    /// The namespace.
    pub ns: &'a str,
    /// The checkpoint the step started from; writes are refused once the head moved past it.
    pub checkpoint: u64,
    /// The lease epoch of a runner writing for its own step: its writes are refused once another
    /// runner took the thread, and a runner taking the thread waits for writes in flight, so the
    /// writes it reads are all there are (a write of a killed runner cannot land after them).
    /// `None` for writers without a lease (workers, resume values, reads).
    pub epoch: Option<u64>,
}

/// What happened to pending writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// All were recorded.
    Accepted,
    /// Some were recorded already (the first write of a task/kind/key wins); the rest were.
    Duplicate,
}

/// A thread's record.
#[derive(Debug, Clone, PartialEq)]
pub struct ThreadInfo {
    /// The thread.
    pub thread: String,
    /// The graph that owns it.
    pub graph: GraphIdentity,
    /// The current lease epoch.
    pub epoch: u64,
    /// The last lease holder.
    pub owner: Option<String>,
}

/// A run's start on a thread (see [`Checkpointer::begin`]).
#[derive(Debug)]
pub struct Begun {
    /// The thread's lease.
    pub lease: Lease,
    /// Whether the offered admission was stored: the thread was new.
    pub admitted: bool,
    /// The root namespace's head with its values, if the thread has checkpoints.
    pub head: Option<StoredCheckpoint>,
}

/// Whether a commit can be `thread`'s first checkpoint: id 1 in the root namespace of that
/// thread, no parent, no expected head.
pub(crate) fn is_first(commit: &StepCommit, thread: &str) -> bool {
    let ckpt = &commit.checkpoint;
    ckpt.id == 1
        && ckpt.parent.is_none()
        && ckpt.expected_head.is_none()
        && commit.ns.is_empty()
        && commit.thread == thread
}

/// The checkpoint store.
#[async_trait]
pub trait Checkpointer: Send + Sync + 'static {
    /// The backend's name (`postgres`, `sqlite`, `memory`).
    fn backend(&self) -> &'static str;

    /// Takes a thread's lease, creating the thread if it is new. Fails with [`Error::LeaseHeld`]
    /// while another live runner holds it, and [`Error::GraphMismatch`] if another graph owns it.
    async fn acquire(&self, request: LeaseRequest<'_>) -> Result<Lease>;

    /// Starts a run on a thread: [`Checkpointer::acquire`], then on a new thread
    /// [`Checkpointer::commit`] of `admission` if one is offered (a run's first checkpoint,
    /// built before the thread was known to be new: id 1, no parent, no expected head), on an
    /// existing one [`Checkpointer::load`] of the root namespace's head. PostgreSQL needs a
    /// round trip less either way. If the admission was stored, the lease has allocated its id;
    /// if not, nothing of it is stored and the caller admits its run as usual.
    async fn begin(&self, request: LeaseRequest<'_>, admission: Option<&StepCommit>) -> Result<Begun> {
        let lease = self.acquire(request).await?;
        if !lease.is_fresh() {
            let head = self.load(&lease.thread, "", None).await?;
            return Ok(Begun { lease, admitted: false, head });
        }
        let Some(admission) = admission.filter(|commit| is_first(commit, &lease.thread)) else {
            return Ok(Begun { lease, admitted: false, head: None });
        };
        self.commit(&lease, admission).await?;
        lease.next_checkpoint_id();
        Ok(Begun { lease, admitted: true, head: None })
    }

    /// Starts a run on a thread nobody else can name yet: its id was minted for this run
    /// ([`crate::Graph::new_thread`]) and is told to no one before the run reports it, so no
    /// other runner can contend for it. `admission` is the run's first checkpoint (as for
    /// [`Checkpointer::begin`]). A store may defer taking the lease and storing the admission
    /// until the run first needs them stored: its first step commit (which then stores all three
    /// at once: PostgreSQL saves the take's round trip), a pending write, or the run's flush.
    /// The answer is [`Checkpointer::begin`]'s; `admitted` is false only if a thread of that
    /// id exists.
    async fn begin_new(&self, request: LeaseRequest<'_>, admission: &StepCommit) -> Result<Begun> {
        self.begin(request, Some(admission)).await
    }

    /// The thread's record, if it exists.
    async fn thread(&self, thread: &str) -> Result<Option<ThreadInfo>>;

    /// Commits one super-step atomically: refused with [`Error::LeaseLost`] if the lease epoch is
    /// stale, with [`Error::HeadMoved`] if the head is not `expected_head`. A retried commit whose
    /// checkpoint is already stored succeeds.
    async fn commit(&self, lease: &Lease, commit: &StepCommit) -> Result<()>;

    /// [`Checkpointer::commit`] that may answer before the commit is durable against a crash of
    /// the store's server: stored, visible to every reader and kept if this process dies, but
    /// made durable only by a later durable commit (a server writes its log in order, so any
    /// durable commit after it covers it) or by [`Checkpointer::flush`]. PostgreSQL saves the
    /// wait for one WAL flush; the other backends commit durably. A run's admission on an
    /// existing thread uses it: the run's first step commit makes both durable at once.
    async fn commit_lazy(&self, lease: &Lease, commit: &StepCommit) -> Result<()> {
        self.commit(lease, commit).await
    }

    /// Makes what the lease stored durable, if no durable commit has done it since: its lazy
    /// commits and, on PostgreSQL, its take (see [`Checkpointer::commit_lazy`]). A run calls it
    /// as it ends. A store that wraps another forwards it (the lease is the inner store's).
    async fn flush(&self, lease: &Lease) -> Result<()>;

    /// The head of a namespace.
    async fn head(&self, thread: &str, ns: &str) -> Result<Option<u64>>;

    /// A checkpoint (`None`: the head), with its values materialised.
    async fn load(&self, thread: &str, ns: &str, id: Option<u64>) -> Result<Option<StoredCheckpoint>>;

    /// Checkpoints of a namespace, newest first.
    async fn list(&self, thread: &str, ns: &str, filter: &ListFilter) -> Result<Vec<CheckpointMeta>>;

    /// Records writes of tasks of the current step. Refused with [`Error::StaleTask`] once the
    /// namespace's head is no longer `step.checkpoint`. The first write of a (task, kind, key) wins.
    async fn put_writes(&self, step: StepRef<'_>, writes: &[PendingWrite]) -> Result<PutOutcome>;

    /// The pending writes of a checkpoint's step.
    async fn pending_writes(&self, step: StepRef<'_>) -> Result<Vec<PendingWrite>>;

    /// Deletes a thread and everything stored for it.
    async fn delete_thread(&self, thread: &str) -> Result<()>;

    /// Deletes all but the newest `keep` checkpoints of each namespace (and the channel versions
    /// only they used). Returns how many checkpoints were deleted.
    async fn prune(&self, thread: &str, keep: usize) -> Result<u64>;
}

/// Rebuilds channel values from the blobs a checkpoint names, following delta chains.
///
/// `fetch` returns the stored blob of (channel, version).
pub(crate) fn materialize(
    body: &CheckpointBody,
    mut fetch: impl FnMut(&str, u64) -> Option<(Option<u64>, Vec<u8>)>,
) -> Result<BTreeMap<String, Value>> {
    let mut values = BTreeMap::new();
    for (channel, version) in &body.versions {
        if let Some(inline) = &version.i {
            values.insert(channel.clone(), inline.clone());
            continue;
        }
        let mut chain = Vec::new();
        let mut at = Some(version.v);
        while let Some(v) = at {
            let (base, data) = fetch(channel, v).ok_or_else(|| corrupt(channel, v))?;
            chain.push(data);
            at = base;
            if !version.d {
                break;
            }
        }
        let mut value: Option<Value> = None;
        for data in chain.into_iter().rev() {
            let part: Value = codec::decode(&data)?;
            value = Some(match (value, part) {
                (Some(Value::Array(mut list)), Value::Array(items)) if version.d => {
                    list.extend(items);
                    Value::Array(list)
                }
                (_, part) => part,
            });
        }
        values.insert(channel.clone(), value.unwrap_or(Value::Null));
    }
    Ok(values)
}

fn corrupt(channel: &str, version: u64) -> Error {
    Error::Checkpoint {
        backend: "store",
        message: format!("channel `{channel}` version {version} is named by a checkpoint but not stored"),
        transient: false,
    }
}

/// Blob keys still needed by the kept checkpoints: every version they name, and the bases of deltas.
pub(crate) fn blobs_in_use<'a>(
    kept: impl IntoIterator<Item = &'a CheckpointBody>,
    base_of: impl Fn(&str, u64) -> Option<u64>,
) -> std::collections::BTreeSet<(String, u64)> {
    let mut used = std::collections::BTreeSet::new();
    for body in kept {
        for (channel, version) in body.versions.iter().filter(|(_, version)| version.i.is_none()) {
            let mut at = Some(version.v);
            while let Some(v) = at {
                if !used.insert((channel.clone(), v)) {
                    break;
                }
                at = if version.d { base_of(channel, v) } else { None };
            }
        }
    }
    used
}

/// A shared handle to any checkpointer.
pub type SharedCheckpointer = Arc<dyn Checkpointer>;

/// The error for writes that arrive after their step moved on.
pub(crate) fn stale_task(step: StepRef<'_>, writes: &[PendingWrite]) -> Error {
    let task = writes
        .iter()
        .find(|w| w.kind == WriteKind::Output)
        .or(writes.first())
        .map(|w| w.task.clone())
        .unwrap_or_default();
    Error::StaleTask { thread: step.thread.to_owned(), task, checkpoint: step.checkpoint }
}

/// Opens the checkpoint store a URL names.
///
/// - `postgres://...` or `postgresql://...`: [`PostgresCheckpointer`] (a pool; migrations run).
/// - `memory:`: [`MemoryCheckpointer`].
/// - `sqlite://path`, `sqlite:path` or a bare path: [`SqliteCheckpointer`] on that file, created
///   if missing (`sqlite::memory:` or `:memory:`: a private in-memory database).
///
/// Errors never repeat the URL (it may carry a password).
pub async fn connect(url: &str) -> Result<SharedCheckpointer> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Arc::new(PostgresCheckpointer::connect(url).await?));
    }
    if url == "memory:" {
        return Ok(Arc::new(MemoryCheckpointer::new()));
    }
    let path = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")).unwrap_or(url);
    if path == ":memory:" {
        return Ok(Arc::new(SqliteCheckpointer::open_in_memory().await?));
    }
    if path.is_empty() || (path == url && url.contains("://")) {
        let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
        return Err(Error::Checkpoint {
            backend: "store",
            message: format!(
                "unsupported checkpoint store URL (scheme `{scheme}`): use postgres://, sqlite:<path> or memory:"
            ),
            transient: false,
        });
    }
    Ok(Arc::new(SqliteCheckpointer::open(path).await?))
}

/// Microseconds since the Unix epoch, as stored by the SQL backends.
pub(crate) fn unix_micros(at: SystemTime) -> i64 {
    at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

/// The inverse of [`unix_micros`].
pub(crate) fn from_unix_micros(micros: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(micros.max(0) as u64)
}

/// The error for a stored row the runtime cannot read back.
pub(crate) fn corrupt_row(backend: &'static str, what: &str) -> Error {
    Error::Checkpoint { backend, message: format!("stored {what} cannot be read"), transient: false }
}

/// Maps a sqlx error to [`Error::Checkpoint`], saying which operation failed.
///
/// `transient_code` tells, from the database's error code, whether retrying may help. The
/// message is built from the error's parts, never from connection settings, so it carries no
/// URL or password.
pub(crate) fn store_error(
    backend: &'static str,
    operation: &str,
    err: &sqlx::Error,
    transient_code: fn(&str) -> bool,
) -> Error {
    let (detail, transient) = match err {
        sqlx::Error::Database(db) => {
            let code = db.code().map(std::borrow::Cow::into_owned).unwrap_or_default();
            (format!("{} (code {code})", db.message()), transient_code(&code))
        }
        sqlx::Error::Io(io) => (format!("connection lost: {io}"), true),
        sqlx::Error::PoolTimedOut => ("timed out waiting for a database connection".to_owned(), true),
        sqlx::Error::PoolClosed => ("the connection pool is closed".to_owned(), true),
        sqlx::Error::WorkerCrashed => ("the database worker thread crashed".to_owned(), true),
        sqlx::Error::Tls(tls) => (format!("TLS: {tls}"), false),
        // Parse errors of connection settings may quote them: say only what kind of error it is.
        sqlx::Error::Configuration(_) => ("invalid connection settings".to_owned(), false),
        sqlx::Error::Migrate(migrate) => match &**migrate {
            sqlx::migrate::MigrateError::Execute(inner) => {
                return store_error(backend, &format!("{operation}: migration"), inner, transient_code);
            }
            other => (format!("migration: {other}"), false),
        },
        other => (other.to_string(), false),
    };
    Error::Checkpoint { backend, message: format!("{operation}: {detail}"), transient }
}

/// A `threads` row as both SQL backends select it: `graph_name, graph_hash, epoch, owner`.
#[derive(sqlx::FromRow)]
pub(crate) struct ThreadRow {
    pub graph_name: String,
    pub graph_hash: String,
    pub epoch: i64,
    pub owner: Option<String>,
}

impl ThreadRow {
    pub(crate) fn into_info(self, thread: &str) -> ThreadInfo {
        ThreadInfo {
            thread: thread.to_owned(),
            graph: GraphIdentity { name: self.graph_name, hash: self.graph_hash },
            epoch: self.epoch as u64,
            owner: self.owner,
        }
    }
}

/// A checkpoint row as both SQL backends select it.
#[derive(sqlx::FromRow)]
pub(crate) struct CheckpointRow {
    pub id: i64,
    pub parent: Option<i64>,
    pub step: i64,
    pub source: String,
    pub body: Vec<u8>,
    pub metadata: String,
    pub created_us: i64,
}

impl CheckpointRow {
    pub(crate) fn body(&self) -> Result<CheckpointBody> {
        codec::decode(&self.body)
    }

    pub(crate) fn into_stored(
        self,
        backend: &'static str,
        ns: &str,
        body: CheckpointBody,
        values: BTreeMap<String, Value>,
    ) -> Result<StoredCheckpoint> {
        Ok(StoredCheckpoint {
            id: self.id as u64,
            ns: ns.to_owned(),
            parent: self.parent.map(|p| p as u64),
            step: self.step as u64,
            source: Source::parse(&self.source).ok_or_else(|| corrupt_row(backend, "checkpoint source"))?,
            body,
            values,
            metadata: serde_json::from_str(&self.metadata)?,
            created_at: from_unix_micros(self.created_us),
        })
    }
}

/// A listed checkpoint row.
#[derive(sqlx::FromRow)]
pub(crate) struct MetaRow {
    pub id: i64,
    pub parent: Option<i64>,
    pub step: i64,
    pub source: String,
    pub metadata: String,
}

impl MetaRow {
    pub(crate) fn into_meta(self, backend: &'static str, ns: &str) -> Result<CheckpointMeta> {
        Ok(CheckpointMeta {
            id: self.id as u64,
            ns: ns.to_owned(),
            parent: self.parent.map(|p| p as u64),
            step: self.step as u64,
            source: Source::parse(&self.source).ok_or_else(|| corrupt_row(backend, "checkpoint source"))?,
            metadata: serde_json::from_str(&self.metadata)?,
        })
    }
}

/// A pending write row.
#[derive(sqlx::FromRow)]
pub(crate) struct WriteRow {
    pub task: String,
    pub kind: String,
    pub key: String,
    pub data: Vec<u8>,
}

impl WriteRow {
    pub(crate) fn into_write(self, backend: &'static str) -> Result<PendingWrite> {
        Ok(PendingWrite {
            kind: WriteKind::parse(&self.kind).ok_or_else(|| corrupt_row(backend, "pending write kind"))?,
            task: self.task,
            key: self.key,
            data: self.data,
        })
    }
}

/// The stored versions of one channel, as the SQL backends read them for a load.
#[derive(sqlx::FromRow)]
pub(crate) struct ChannelRows {
    pub channel: String,
    pub versions: Vec<i64>,
    pub bases: Vec<Option<i64>>,
    pub data: Vec<Vec<u8>>,
}

/// The row each stored channel version of a checkpoint starts from (inline values have none):
/// a whole value is that row; a delta's chain goes on through each row's `base`, which the SQL
/// backends follow in one recursive query.
pub(crate) fn blob_heads(body: &CheckpointBody) -> impl Iterator<Item = (&str, u64)> {
    body.versions
        .iter()
        .filter(|(_, version)| version.i.is_none())
        .map(|(channel, version)| (channel.as_str(), version.v))
}

/// [`materialize`] over the rows read from [`blob_heads`].
pub(crate) fn materialize_rows(body: &CheckpointBody, rows: Vec<ChannelRows>) -> Result<BTreeMap<String, Value>> {
    /// A channel's stored versions: version -> (base, data).
    type Versions = std::collections::HashMap<u64, (Option<u64>, Vec<u8>)>;
    let mut blobs: std::collections::HashMap<String, Versions> = std::collections::HashMap::with_capacity(rows.len());
    for row in rows {
        let versions = row.versions.into_iter().zip(row.bases).zip(row.data);
        blobs.insert(
            row.channel,
            versions.map(|((v, base), data)| (v as u64, (base.map(|b| b as u64), data))).collect(),
        );
    }
    // Each (channel, version) is visited once (a chain's versions strictly decrease), so the
    // blobs can be moved out instead of copied.
    materialize(body, |channel, v| blobs.get_mut(channel)?.remove(&v))
}

/// For [`Checkpointer::prune`] in SQL: the (namespace, channel, version) blobs the kept
/// checkpoints need, given their bodies and the base of every stored delta.
pub(crate) fn blobs_to_keep(
    kept: &[(String, CheckpointBody)],
    deltas: &std::collections::HashMap<(String, String, u64), u64>,
) -> Vec<(String, String, u64)> {
    let mut by_ns: BTreeMap<&str, Vec<&CheckpointBody>> = BTreeMap::new();
    for (ns, body) in kept {
        by_ns.entry(ns.as_str()).or_default().push(body);
    }
    let mut keep = Vec::new();
    for (ns, bodies) in by_ns {
        let used = blobs_in_use(bodies, |channel, v| deltas.get(&(ns.to_owned(), channel.to_owned(), v)).copied());
        keep.extend(used.into_iter().map(|(channel, v)| (ns.to_owned(), channel, v)));
    }
    keep
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn step_metadata_is_stored_as_the_json_object_it_stands_for() {
        let task = TaskRef { id: "t1".into(), node: "n0".into() };
        let step = StepMetadata { owner: "me".into(), tasks: vec![task], interrupt_after: false };
        let json = serde_json::to_value(Metadata::Step(step.clone())).unwrap();
        assert_eq!(json, json!({"owner": "me", "tasks": [{"id": "t1", "node": "n0"}]}));
        let stopped = Metadata::Step(StepMetadata { interrupt_after: true, ..step });
        assert_eq!(serde_json::to_value(&stopped).unwrap()["interrupt_after"], json!(true));
        // The memory store keeps MessagePack: it reads back as the same JSON.
        let back: Value = codec::decode(&codec::encode(&stopped).unwrap()).unwrap();
        assert_eq!(back, serde_json::to_value(&stopped).unwrap());
        let other = Metadata::from(json!({"as_node": "n1"}));
        assert_eq!(serde_json::to_value(other).unwrap(), json!({"as_node": "n1"}));
    }
}
