//! Commits of a run, recorded on their way to a store and replayed straight into another: a
//! store's share of a step measured without the engine's (no node run, no step applied, no value
//! encoded; the same rows, statements and round trips). `agentic-bench profile` sets the two side
//! by side.

use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use agentic_runtime::checkpoint::{
    Begun, CheckpointMeta, Checkpointer, GraphIdentity, Lease, LeaseRequest, ListFilter, PendingWrite, PutOutcome,
    StepCommit, StepRef, StoredCheckpoint, ThreadInfo,
};
use agentic_runtime::{Error, Result, SharedCheckpointer};
use async_trait::async_trait;

/// A store that keeps a copy of every commit it passes on, the admission a run's `begin`
/// offered first. A lazy commit is kept as a commit (a replay commits it durably: the chain it
/// records, on fresh threads, makes none).
pub struct Recorder {
    inner: SharedCheckpointer,
    commits: Mutex<Vec<StepCommit>>,
}

impl Recorder {
    /// Records what goes to `inner`.
    pub fn new(inner: SharedCheckpointer) -> Self {
        Self { inner, commits: Mutex::default() }
    }

    /// The commits recorded so far, in order, and none kept.
    pub fn take(&self) -> Vec<StepCommit> {
        std::mem::take(&mut *self.log())
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Vec<StepCommit>> {
        self.commits.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl Checkpointer for Recorder {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn acquire(&self, request: LeaseRequest<'_>) -> Result<Lease> {
        self.inner.acquire(request).await
    }

    async fn begin(&self, request: LeaseRequest<'_>, admission: Option<&StepCommit>) -> Result<Begun> {
        let begun = self.inner.begin(request, admission).await?;
        if let Some(admission) = admission.filter(|_| begun.admitted) {
            self.log().push(admission.clone());
        }
        Ok(begun)
    }

    async fn begin_new(&self, request: LeaseRequest<'_>, admission: &StepCommit) -> Result<Begun> {
        let begun = self.inner.begin_new(request, admission).await?;
        if begun.admitted {
            self.log().push(admission.clone());
        }
        Ok(begun)
    }

    async fn thread(&self, thread: &str) -> Result<Option<ThreadInfo>> {
        self.inner.thread(thread).await
    }

    async fn commit(&self, lease: &Lease, commit: &StepCommit) -> Result<()> {
        self.inner.commit(lease, commit).await?;
        self.log().push(commit.clone());
        Ok(())
    }

    async fn commit_lazy(&self, lease: &Lease, commit: &StepCommit) -> Result<()> {
        self.inner.commit_lazy(lease, commit).await?;
        self.log().push(commit.clone());
        Ok(())
    }

    async fn flush(&self, lease: &Lease) -> Result<()> {
        self.inner.flush(lease).await
    }

    async fn head(&self, thread: &str, ns: &str) -> Result<Option<u64>> {
        self.inner.head(thread, ns).await
    }

    async fn load(&self, thread: &str, ns: &str, id: Option<u64>) -> Result<Option<StoredCheckpoint>> {
        self.inner.load(thread, ns, id).await
    }

    async fn list(&self, thread: &str, ns: &str, filter: &ListFilter) -> Result<Vec<CheckpointMeta>> {
        self.inner.list(thread, ns, filter).await
    }

    async fn put_writes(&self, step: StepRef<'_>, writes: &[PendingWrite]) -> Result<PutOutcome> {
        self.inner.put_writes(step, writes).await
    }

    async fn pending_writes(&self, step: StepRef<'_>) -> Result<Vec<PendingWrite>> {
        self.inner.pending_writes(step).await
    }

    async fn delete_thread(&self, thread: &str) -> Result<()> {
        self.inner.delete_thread(thread).await
    }

    async fn prune(&self, thread: &str, keep: usize) -> Result<u64> {
        self.inner.prune(thread, keep).await
    }
}

/// What a [`Replay`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Runs replayed, each on a fresh thread.
    pub runs: u64,
    /// Step commits made (admissions not counted: they ride on `begin`).
    pub commits: u64,
}

/// One recorded run, replayed on fresh threads: its admission, then its step commits.
#[derive(Clone)]
pub struct Replay {
    /// The admission first; each replay renames the thread in place (no copy of the values).
    run: Vec<StepCommit>,
    graph: GraphIdentity,
}

impl Replay {
    /// A run recorded on a new thread (its admission first, as [`Recorder`] keeps it) by the
    /// graph `graph`.
    pub fn new(run: Vec<StepCommit>, graph: GraphIdentity) -> Result<Self> {
        match run.first() {
            Some(admission) if admission.checkpoint.id == 1 && admission.checkpoint.parent.is_none() => {
                Ok(Self { run, graph })
            }
            _ => Err(Error::InvalidState("a replay needs a run recorded on a new thread, admission first".into())),
        }
    }

    /// Replays the run on fresh threads `{prefix}-0`, `{prefix}-1`, ... until `deadline` (each
    /// run finished, at least one), as `owner`: `begin_new` with the admission (the threads are
    /// this replay's alone, as a minted thread is its run's), or with `named` `begin` (as a run
    /// on a thread its caller named), then every step's commit, one after the other.
    pub async fn until(
        &mut self,
        store: &dyn Checkpointer,
        prefix: &str,
        owner: &str,
        deadline: Instant,
        named: bool,
    ) -> Result<Replayed> {
        let mut done = Replayed::default();
        loop {
            let thread = format!("{prefix}-{}", done.runs);
            for commit in &mut self.run {
                commit.thread.clone_from(&thread);
            }
            let (admission, steps) = self.run.split_first().ok_or_else(|| Error::InvalidState("empty run".into()))?;
            let request = LeaseRequest { thread: &thread, owner, graph: &self.graph, allow_graph_change: false };
            let begun = if named {
                store.begin(request, Some(admission)).await?
            } else {
                store.begin_new(request, admission).await?
            };
            if !begun.admitted {
                return Err(Error::InvalidState(format!("replay: thread `{thread}` was not new")));
            }
            for step in steps {
                store.commit(&begun.lease, step).await?;
            }
            done.runs += 1;
            done.commits += steps.len() as u64;
            if Instant::now() >= deadline {
                return Ok(done);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use agentic_runtime::{Channel, END, GraphBuilder, Input, MemoryCheckpointer, RunConfig, START, Update, node_fn};
    use serde_json::json;

    use super::*;

    #[tokio::test]
    async fn a_replayed_run_stores_the_recorded_state_on_a_fresh_thread_and_only_there() -> anyhow::Result<()> {
        let graph = GraphBuilder::new("replayed")
            .channel("n", Channel::sum())
            .channel("log", Channel::append())
            .node("a", node_fn(|_, _| async { Ok(Update::new().set("n", 1).set("log", "a")) }))
            .node("b", node_fn(|_, _| async { Ok(Update::new().set("n", 2).set("log", "b")) }))
            .edge(START, "a")
            .edge("a", "b")
            .edge("b", END)
            .compile()?;
        let identity = graph.identity().clone();
        let recorder = Arc::new(Recorder::new(Arc::new(MemoryCheckpointer::new())));
        let recording = graph.with_checkpointer(Arc::clone(&recorder) as SharedCheckpointer);
        recording.invoke("original", Input::Start(Update::new().set("n", 10)), &RunConfig::default()).await?;
        let run = recorder.take();
        assert_eq!(run.len(), 3, "the admission and one commit per node");
        assert!(recorder.take().is_empty(), "taken once");

        let store = MemoryCheckpointer::new();
        let mut replay = Replay::new(run, identity)?;
        let done = replay.until(&store, "copy", "replayer", Instant::now(), false).await?;
        assert_eq!(done, Replayed { runs: 1, commits: 2 });
        let copy = store.load("copy-0", "", None).await?.expect("the replayed thread has a head");
        let original = recording.get_state("original").await?.expect("the recorded thread has a state");
        assert_eq!(copy.id, 3);
        assert_eq!(copy.values.get("n"), Some(&json!(13)));
        assert_eq!(copy.values.get("log"), Some(&json!(["a", "b"])));
        assert_eq!(original.values.value("n"), copy.values.get("n"));
        // A thread that exists is not replayed over.
        let again = replay.until(&store, "copy", "replayer", Instant::now(), true).await;
        assert!(matches!(again, Err(Error::InvalidState(message)) if message.contains("copy-0")));
        assert_eq!(store.load("copy-0", "", None).await?.map(|c| c.id), Some(3));
        Ok(())
    }

    #[test]
    fn a_replay_needs_a_run_that_starts_with_its_admission() {
        let identity = GraphIdentity { name: "g".into(), hash: "h".into() };
        assert!(Replay::new(Vec::new(), identity).is_err());
    }
}
