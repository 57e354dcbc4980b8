//! Fixtures for the checkpointer tests: graph identities, a chain of commits that tracks its
//! channel versions, pending writes, and temporary SQLite files.

use std::collections::BTreeMap;
use std::path::PathBuf;

use agentic_runtime::checkpoint::{
    ChannelBlob, ChannelVersion, Checkpointer, GraphIdentity, Lease, LeaseRequest, NewCheckpoint, PendingTask,
    PendingWrite, Source, StepCommit, StepRef, WriteKind,
};
use agentic_runtime::{Error, Result};
use serde_json::{Value, json};

/// The graph most tests run.
pub fn graph() -> GraphIdentity {
    GraphIdentity { name: "support-bot".to_owned(), hash: "h1".to_owned() }
}

/// Another graph.
pub fn other_graph() -> GraphIdentity {
    GraphIdentity { name: "billing-bot".to_owned(), hash: "h2".to_owned() }
}

/// Takes a thread for `owner` with [`graph`]; panics if refused.
pub async fn lease(store: &dyn Checkpointer, thread: &str, owner: &str) -> Lease {
    try_lease(store, thread, owner).await.unwrap_or_else(|e| panic!("acquire `{thread}` for {owner}: {e}"))
}

/// Asks for a thread for `owner` with [`graph`].
pub async fn try_lease(store: &dyn Checkpointer, thread: &str, owner: &str) -> Result<Lease> {
    let graph = graph();
    store.acquire(LeaseRequest { thread, owner, graph: &graph, allow_graph_change: false }).await
}

/// A commit being built: by default the first checkpoint of the root namespace.
#[derive(Debug, Clone)]
pub struct Commit(StepCommit);

impl Commit {
    /// Checkpoint `id` of `thread`, namespace `""`, no parent, expecting no head.
    pub fn new(thread: &str, id: u64) -> Self {
        Commit(StepCommit {
            thread: thread.to_owned(),
            ns: String::new(),
            checkpoint: NewCheckpoint {
                id,
                parent: None,
                expected_head: None,
                step: 0,
                source: Source::Input,
                body: std::sync::Arc::default(),
                metadata: std::sync::Arc::new(json!({}).into()),
            },
            blobs: Vec::new(),
        })
    }

    /// In namespace `ns`.
    pub fn ns(mut self, ns: &str) -> Self {
        ns.clone_into(&mut self.0.ns);
        self
    }

    /// Following `parent` (and expecting it as the head).
    pub fn after(self, parent: u64) -> Self {
        self.parent(Some(parent)).expecting(Some(parent))
    }

    /// With this parent.
    pub fn parent(mut self, parent: Option<u64>) -> Self {
        self.0.checkpoint.parent = parent;
        self
    }

    /// Expecting this head.
    pub fn expecting(mut self, head: Option<u64>) -> Self {
        self.0.checkpoint.expected_head = head;
        self
    }

    /// At this step.
    pub fn step(mut self, step: u64) -> Self {
        self.0.checkpoint.step = step;
        self
    }

    /// From this source.
    pub fn source(mut self, source: Source) -> Self {
        self.0.checkpoint.source = source;
        self
    }

    /// With this metadata.
    pub fn meta(mut self, metadata: Value) -> Self {
        self.0.checkpoint.metadata = std::sync::Arc::new(metadata.into());
        self
    }

    /// Scheduling `node` next.
    pub fn then(mut self, node: &str) -> Self {
        std::sync::Arc::make_mut(&mut self.0.checkpoint.body).next.push(PendingTask::Pull { node: node.to_owned() });
        self
    }

    /// Naming versions of channels written earlier.
    pub fn versions(mut self, versions: &BTreeMap<String, ChannelVersion>) -> Self {
        std::sync::Arc::make_mut(&mut self.0.checkpoint.body).versions.extend(versions.clone());
        self
    }

    /// Writing `channel` whole.
    pub fn set(mut self, channel: &str, value: &Value) -> Self {
        let id = self.0.checkpoint.id;
        std::sync::Arc::make_mut(&mut self.0.checkpoint.body)
            .versions
            .insert(channel.to_owned(), ChannelVersion::whole(id));
        self.0.blobs.push(ChannelBlob { channel: channel.to_owned(), version: id, base: None, data: bytes(value) });
        self
    }

    /// Writing `channel` whole, inside the checkpoint (no row of its own).
    pub fn inline(mut self, channel: &str, value: &Value) -> Self {
        let id = self.0.checkpoint.id;
        std::sync::Arc::make_mut(&mut self.0.checkpoint.body)
            .versions
            .insert(channel.to_owned(), ChannelVersion::inline(id, value.clone()));
        self
    }

    /// Appending `items` to `channel` as a delta on version `base` (a whole list if `None`).
    pub fn append(mut self, channel: &str, base: Option<u64>, items: &Value) -> Self {
        let id = self.0.checkpoint.id;
        std::sync::Arc::make_mut(&mut self.0.checkpoint.body)
            .versions
            .insert(channel.to_owned(), appended(id, base, items));
        self.0.blobs.push(ChannelBlob { channel: channel.to_owned(), version: id, base, data: bytes(items) });
        self
    }

    /// The commit.
    pub fn build(self) -> StepCommit {
        self.0
    }
}

/// The version of `items` appended on `base`: a delta opening a segment right after `base`, or a
/// whole list.
fn appended(id: u64, base: Option<u64>, items: &Value) -> ChannelVersion {
    match base {
        Some(base) => ChannelVersion::delta(id, base, 1, items.as_array().map_or(1, Vec::len) as u64),
        None => ChannelVersion::whole(id),
    }
}

/// A line of commits on one namespace, each on the previous head, carrying channel versions
/// forward the way the engine does.
#[derive(Debug)]
pub struct Chain {
    thread: String,
    ns: String,
    /// The last checkpoint committed.
    pub head: Option<u64>,
    step: u64,
    versions: BTreeMap<String, ChannelVersion>,
}

impl Chain {
    /// An empty chain of `thread`'s namespace `ns`.
    pub fn new(thread: &str, ns: &str) -> Self {
        Chain { thread: thread.to_owned(), ns: ns.to_owned(), head: None, step: 0, versions: BTreeMap::new() }
    }

    /// The next commit: on the head, with the current versions, the lease's next id.
    pub fn next(&self, lease: &Lease) -> Commit {
        let source = if self.head.is_none() { Source::Input } else { Source::Loop };
        Commit::new(&self.thread, lease.next_checkpoint_id())
            .ns(&self.ns)
            .parent(self.head)
            .expecting(self.head)
            .step(self.step)
            .source(source)
            .versions(&self.versions)
    }

    /// Commits and, on success, makes it the head.
    pub async fn commit(&mut self, store: &dyn Checkpointer, lease: &Lease, commit: Commit) -> Result<u64> {
        let commit = commit.build();
        store.commit(lease, &commit).await?;
        self.head = Some(commit.checkpoint.id);
        self.step = commit.checkpoint.step + 1;
        self.versions = commit.checkpoint.body.versions.clone();
        Ok(commit.checkpoint.id)
    }

    /// Commits `set` of one channel; panics if refused.
    pub async fn set(&mut self, store: &dyn Checkpointer, lease: &Lease, channel: &str, value: &Value) -> u64 {
        let commit = self.next(lease).set(channel, value);
        self.commit(store, lease, commit).await.unwrap_or_else(|e| panic!("commit: {e}"))
    }

    /// Commits an append of `items` to `channel` (a delta on its current version, if any).
    pub async fn append(&mut self, store: &dyn Checkpointer, lease: &Lease, channel: &str, items: &Value) -> u64 {
        let base = self.versions.get(channel).map(|v| v.v);
        let commit = self.next(lease).append(channel, base, items);
        self.commit(store, lease, commit).await.unwrap_or_else(|e| panic!("commit: {e}"))
    }
}

/// JSON bytes of a value.
pub fn bytes(value: &Value) -> Vec<u8> {
    agentic_runtime::checkpoint::codec::encode(value).unwrap_or_default()
}

/// A pending write with a JSON payload.
pub fn write(task: &str, kind: WriteKind, key: &str, data: &Value) -> PendingWrite {
    PendingWrite { task: task.to_owned(), kind, key: key.to_owned(), data: bytes(data) }
}

/// The step of checkpoint `checkpoint` of `thread`'s root namespace.
pub fn step(thread: &str, checkpoint: u64) -> StepRef<'_> {
    StepRef { thread, ns: "", checkpoint, epoch: None }
}

/// A shorthand for the values map of a checkpoint.
pub fn values(pairs: &[(&str, Value)]) -> BTreeMap<String, Value> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()
}

/// Panics unless `result` is the error `matches` accepts; returns the error.
pub fn refused<T: std::fmt::Debug>(result: Result<T>, what: &str, matches: impl Fn(&Error) -> bool) -> Error {
    match result {
        Err(err) if matches(&err) => err,
        other => panic!("expected {what}, got {other:?}"),
    }
}

/// A directory that is removed with everything in it when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh directory under the system's temporary directory.
    pub fn new(label: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("agentic-{label}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        TempDir(dir)
    }

    /// A path inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
