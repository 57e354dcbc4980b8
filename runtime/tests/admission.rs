//! A run's admission: a new thread's lease and admission in one call (`Checkpointer::begin`;
//! one statement on PostgreSQL) never admits a run twice: when the answer of a call that went
//! through is lost and the call is tried again, the run goes on from the admission it stored.
//! (What the call stores is checked on every backend in the conformance suite.) On PostgreSQL
//! the take and an existing thread's admission commit without waiting for the WAL flush: the
//! run's first step commit flushes them, and a run that ends before one flushes as it ends.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly on unexpected errors")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use agentic_runtime::checkpoint::{
    Begun, CheckpointMeta, Checkpointer, Lease, LeaseRequest, ListFilter, PendingWrite, PutOutcome, StepCommit,
    StepRef, StoredCheckpoint, ThreadInfo,
};
use agentic_runtime::{
    Channel, END, Error, Graph, GraphBuilder, Input, MemoryCheckpointer, Node, PostgresCheckpointer, Result, RunConfig,
    START, Update, node_fn,
};
use async_trait::async_trait;
use serde_json::json;

/// A store whose first `begin` that stores an admission answers with a connection
/// error instead: the call went through, its answer was lost.
struct LostAnswer {
    inner: Arc<dyn Checkpointer>,
    lost: AtomicBool,
}

#[async_trait]
impl Checkpointer for LostAnswer {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn acquire(&self, request: LeaseRequest<'_>) -> Result<Lease> {
        self.inner.acquire(request).await
    }
    async fn begin(&self, request: LeaseRequest<'_>, admission: Option<&StepCommit>) -> Result<Begun> {
        let begun = self.inner.begin(request, admission).await?;
        if begun.admitted && !self.lost.swap(true, Ordering::SeqCst) {
            drop(begun);
            tokio::time::sleep(std::time::Duration::from_millis(50)).await; // PostgreSQL unlocks on a task
            return Err(Error::Checkpoint { backend: "test", message: "connection reset".into(), transient: true });
        }
        Ok(begun)
    }
    async fn thread(&self, thread: &str) -> Result<Option<ThreadInfo>> {
        self.inner.thread(thread).await
    }
    async fn commit(&self, lease: &Lease, commit: &StepCommit) -> Result<()> {
        self.inner.commit(lease, commit).await
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

/// Input `n` is added to `total` and `log` gets it appended; one node adds 1 more.
fn adder(store: Arc<dyn Checkpointer>) -> Graph {
    adder_with(store, node_fn(|_, _| async { Ok(Update::new().set("total", 1).set("log", "one")) }))
}

/// [`adder`]'s graph with another node `one`.
fn adder_with(store: Arc<dyn Checkpointer>, one: impl Node) -> Graph {
    GraphBuilder::new("adder")
        .channel("total", Channel::sum())
        .channel("log", Channel::append())
        .node("one", one)
        .edge(START, "one")
        .edge("one", END)
        .compile()
        .unwrap()
        .with_checkpointer(store)
}

/// The run goes on from its own admission, stored by the call whose answer was lost: the input
/// applies once, and a second run on the thread is admitted as usual.
async fn a_lost_answer_does_not_admit_the_input_twice(inner: Arc<dyn Checkpointer>) {
    let store = Arc::new(LostAnswer { inner, lost: AtomicBool::new(false) });
    let graph = adder(store.clone());
    let input = || Input::Start(Update::new().set("total", 10).set("log", "input"));
    let state = graph.invoke("t", input(), &RunConfig::default()).await.unwrap();
    assert!(store.lost.load(Ordering::SeqCst), "the answer was lost once");
    let state = state.state().unwrap().to_json();
    assert_eq!((state["total"].clone(), state["log"].clone()), (json!(11), json!(["input", "one"])));
    let history = graph.history("t", &ListFilter::default()).await.unwrap();
    assert_eq!(history.len(), 2, "one admission and one step: {history:?}");
    let state = graph.invoke("t", input(), &RunConfig::default()).await.unwrap().state().unwrap().to_json();
    assert_eq!(state["total"], json!(22));
    assert_eq!(state["log"], json!(["input", "one", "input", "one"]));
}

#[tokio::test]
async fn memory_never_admits_twice() {
    a_lost_answer_does_not_admit_the_input_twice(Arc::new(MemoryCheckpointer::new())).await;
}

#[sqlx::test(migrations = false)]
async fn postgres_never_admits_twice(pool: sqlx::PgPool) {
    a_lost_answer_does_not_admit_the_input_twice(Arc::new(PostgresCheckpointer::from_pool(pool).await.unwrap())).await;
}

/// Whether thread `t`'s row was written after its newest admission committed. The take writes
/// the row before (or with) the admission; only a flush writes it after.
async fn flushed_after_admission(pool: &sqlx::PgPool) -> bool {
    sqlx::query_scalar(
        "SELECT t.updated_at > c.created_at
         FROM agentic.threads t
            JOIN agentic.checkpoints c ON c.tid = t.tid AND c.ns = '' AND c.source = 'input'
         WHERE t.thread_id = 't'
         ORDER BY c.id DESC LIMIT 1",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// A run that stops before its first node (an interrupt) ends flushed, on a new thread and on an
/// existing one; a run whose first step commits does not flush again (that commit did).
#[sqlx::test(migrations = false)]
async fn postgres_runs_end_durable_with_one_flush_at_most(pool: sqlx::PgPool) {
    let store: Arc<dyn Checkpointer> = Arc::new(PostgresCheckpointer::from_pool(pool.clone()).await.unwrap());
    let reviewed = GraphBuilder::new("adder")
        .channel("total", Channel::sum())
        .channel("log", Channel::append())
        .node("one", node_fn(|_, _| async { Ok(Update::new().set("total", 1).set("log", "one")) }))
        .edge(START, "one")
        .edge("one", END)
        .interrupt_before(["one"])
        .compile()
        .unwrap()
        .with_checkpointer(Arc::clone(&store));
    let input = || Input::Start(Update::new().set("total", 10).set("log", "input"));
    let config = RunConfig::default();

    let stopped = reviewed.invoke("t", input(), &config).await.unwrap();
    assert_eq!(stopped.interrupts().len(), 1, "stopped before `one`");
    assert!(flushed_after_admission(&pool).await, "a new thread's run that stopped at once was flushed");
    let resumed = reviewed.invoke("t", Input::Resume(agentic_runtime::Resume::Value(json!(null))), &config).await;
    assert_eq!(resumed.unwrap().state().unwrap().to_json()["total"], json!(11));

    let stopped = reviewed.invoke("t", input(), &config).await.unwrap();
    assert_eq!(stopped.interrupts().len(), 1, "stopped before `one` again");
    assert!(flushed_after_admission(&pool).await, "an existing thread's lazy admission was flushed");

    let straight = adder(Arc::clone(&store));
    let config = RunConfig { allow_graph_change: true, ..RunConfig::default() };
    let done = straight.invoke("t", Input::Continue, &config).await.unwrap();
    assert_eq!(done.state().unwrap().to_json()["total"], json!(22));
    let done = straight.invoke("t", input(), &config).await.unwrap();
    assert_eq!(done.state().unwrap().to_json()["total"], json!(33));
    assert!(!flushed_after_admission(&pool).await, "no flush after the step commit that made the admission durable");
}

/// A run on a new thread (`invoke_new`) stores what a run on a named new thread stores, and the
/// thread is an ordinary one after it. A thread of the same id made by another run meanwhile is
/// not run on: the new thread's run is refused and stores nothing.
async fn new_threads_are_ordinary_threads_once_run(store: Arc<dyn Checkpointer>) {
    let graph = adder(Arc::clone(&store));
    let input = || Update::new().set("total", 10).set("log", "input");
    let config = RunConfig::default();
    let thread = graph.new_thread();
    let id = thread.id().to_owned();
    assert_eq!(store.thread(&id).await.unwrap(), None, "nothing stored before the run");
    let done = graph.invoke_new(thread, input(), &config).await.unwrap();
    let state = done.state().unwrap().to_json();
    assert_eq!((state["total"].clone(), state["log"].clone()), (json!(11), json!(["input", "one"])));
    let history = graph.history(&id, &ListFilter::default()).await.unwrap();
    assert_eq!(history.len(), 2, "its admission and its step: {history:?}");
    assert_eq!(store.thread(&id).await.unwrap().unwrap().graph.name, "adder");
    let again = graph.invoke(&id, Input::Start(input()), &config).await.unwrap();
    assert_eq!(again.state().unwrap().to_json()["total"], json!(22));

    // Refused before anything is stored: a fork (a new thread has no checkpoint), an input that
    // does not apply (an unknown channel).
    let thread = graph.new_thread();
    let forked = thread.id().to_owned();
    let fork = RunConfig { checkpoint: Some(1), ..RunConfig::default() };
    let refused = graph.invoke_new(thread, input(), &fork).await;
    assert!(matches!(&refused, Err(Error::InvalidState(m)) if m.contains("fork")), "{refused:?}");
    let thread = graph.new_thread();
    let unknown = thread.id().to_owned();
    let refused = graph.invoke_new(thread, Update::new().set("nope", 1), &config).await;
    assert!(refused.is_err(), "an unknown channel is refused: {refused:?}");
    for id in [forked, unknown] {
        assert_eq!(store.thread(&id).await.unwrap(), None, "nothing stored for a refused run");
    }

    let thread = graph.new_thread();
    let taken = thread.id().to_owned();
    graph.invoke(&taken, Input::Start(input()), &config).await.unwrap();
    let refused = graph.invoke_new(thread, input(), &config).await;
    assert!(matches!(&refused, Err(Error::InvalidState(m)) if m.contains("exists already")), "{refused:?}");
    assert_eq!(graph.history(&taken, &ListFilter::default()).await.unwrap().len(), 2, "nothing of it stored");
}

#[tokio::test]
async fn memory_new_threads_are_ordinary_threads_once_run() {
    new_threads_are_ordinary_threads_once_run(Arc::new(MemoryCheckpointer::new())).await;
}

#[sqlx::test(migrations = false)]
async fn postgres_new_threads_are_ordinary_threads_once_run(pool: sqlx::PgPool) {
    new_threads_are_ordinary_threads_once_run(Arc::new(PostgresCheckpointer::from_pool(pool).await.unwrap())).await;
}

/// A new thread whose lease another runner holds (its id was given to that runner while the new
/// thread's run was in its first node) is refused when its first step commits: the take finds
/// the lock held, stores nothing, and the other runner's run goes on and finishes.
#[sqlx::test(migrations = false)]
async fn postgres_new_thread_held_by_another_runner_is_refused(pool: sqlx::PgPool) {
    let mine: Arc<dyn Checkpointer> = Arc::new(PostgresCheckpointer::from_pool(pool.clone()).await.unwrap());
    let theirs: Arc<dyn Checkpointer> = Arc::new(PostgresCheckpointer::from_pool(pool.clone()).await.unwrap());
    let input = || Update::new().set("total", 10).set("log", "input");
    let graph = adder(mine);
    let thread = graph.new_thread();
    let id = thread.id().to_owned();

    // Their run holds the thread's lease while its node waits.
    let (started, started_rx) = tokio::sync::oneshot::channel::<()>();
    let release = Arc::new(tokio::sync::Notify::new());
    let started = Arc::new(std::sync::Mutex::new(Some(started)));
    let (wait, signal) = (Arc::clone(&release), Arc::clone(&started));
    let blocking = adder_with(
        theirs,
        node_fn(move |_, _| {
            let (wait, signal) = (Arc::clone(&wait), Arc::clone(&signal));
            async move {
                if let Some(started) = signal.lock().unwrap().take() {
                    let _ = started.send(());
                }
                wait.notified().await;
                Ok(Update::new().set("total", 1).set("log", "theirs"))
            }
        }),
    );
    let their_id = id.clone();
    let their_run =
        tokio::spawn(async move { blocking.invoke(&their_id, Input::Start(input()), &RunConfig::default()).await });
    started_rx.await.unwrap();

    let refused = graph.invoke_new(thread, input(), &RunConfig::default()).await;
    assert!(matches!(&refused, Err(Error::LeaseHeld { .. })), "{refused:?}");
    release.notify_one();
    let done = their_run.await.unwrap().unwrap();
    assert_eq!(done.state().unwrap().to_json()["log"], json!(["input", "theirs"]));
    let history = graph.history(&id, &ListFilter::default()).await.unwrap();
    assert_eq!(history.len(), 2, "their admission and step, nothing of the refused run: {history:?}");
}

/// Whether the thread row, its admission and its first step's checkpoint were written by one
/// transaction (one statement: the row versions' `xmin`).
async fn made_with_first_step(pool: &sqlx::PgPool, thread: &str) -> bool {
    sqlx::query_scalar(
        "SELECT t.xmin::text = a.xmin::text AND a.xmin::text = s.xmin::text
         FROM agentic.threads t
            JOIN agentic.checkpoints a ON a.tid = t.tid AND a.ns = '' AND a.id = 1
            JOIN agentic.checkpoints s ON s.tid = t.tid AND s.ns = '' AND s.id = 2
         WHERE t.thread_id = $1",
    )
    .bind(thread)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// On PostgreSQL a new thread's lease and admission go with its first step's commit, durably
/// (no flush after it); a named new thread's take is a statement of its own.
#[sqlx::test(migrations = false)]
async fn postgres_new_threads_are_made_by_their_first_step_commit(pool: sqlx::PgPool) {
    let store: Arc<dyn Checkpointer> = Arc::new(PostgresCheckpointer::from_pool(pool.clone()).await.unwrap());
    let graph = adder(store);
    let input = || Update::new().set("total", 10).set("log", "input");
    let thread = graph.new_thread();
    let id = thread.id().to_owned();
    graph.invoke_new(thread, input(), &RunConfig::default()).await.unwrap();
    assert!(made_with_first_step(&pool, &id).await, "made by its first step's commit");
    let flushed: bool =
        sqlx::query_scalar("SELECT t.updated_at > t.created_at FROM agentic.threads t WHERE t.thread_id = $1")
            .bind(&id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(!flushed, "no flush after the durable first commit");

    graph.invoke("named", Input::Start(input()), &RunConfig::default()).await.unwrap();
    assert!(!made_with_first_step(&pool, "named").await, "a named thread's take goes first");
}

/// A new thread's run that needs the thread stored before its first step commits stores it
/// then: its first node's journaled call (a pending write), and the run's end at an interrupt
/// (flushed). The run resumes by the thread's id, and the call is not made again.
#[sqlx::test(migrations = false)]
async fn postgres_new_threads_are_stored_when_their_first_step_needs_them(pool: sqlx::PgPool) {
    let store: Arc<dyn Checkpointer> = Arc::new(PostgresCheckpointer::from_pool(pool.clone()).await.unwrap());
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let graph = GraphBuilder::new("reviewed")
        .channel("answer", Channel::last_value())
        .channel("approved", Channel::last_value())
        .node(
            "llm",
            node_fn(move |_, ctx| {
                let counter = Arc::clone(&counter);
                async move {
                    let answer: String = ctx
                        .journal("completion", async {
                            counter.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, agentic_runtime::NodeError>("42".to_owned())
                        })
                        .await?;
                    let approved = ctx.interrupt(json!({"answer": answer}))?;
                    Ok(Update::new().set("answer", answer).set("approved", approved))
                }
            }),
        )
        .edge(START, "llm")
        .edge("llm", END)
        .compile()
        .unwrap()
        .with_checkpointer(Arc::clone(&store));
    let thread = graph.new_thread();
    let id = thread.id().to_owned();
    let stopped = graph.invoke_new(thread, Update::new(), &RunConfig::default()).await.unwrap();
    assert_eq!(stopped.interrupts().len(), 1, "stopped for review");
    let head: (i64, String, bool) = sqlx::query_as(
        "SELECT c.id, c.source, t.updated_at > c.created_at
         FROM agentic.threads t JOIN agentic.checkpoints c ON c.tid = t.tid AND c.ns = ''
         WHERE t.thread_id = $1 ORDER BY c.id DESC LIMIT 1",
    )
    .bind(&id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((head.0, head.1.as_str(), head.2), (1, "input", true), "the admission, stored and flushed");

    let resume = Input::Resume(agentic_runtime::Resume::Value(json!(true)));
    let state = graph.invoke(&id, resume, &RunConfig::default()).await.unwrap().state().unwrap().to_json();
    assert_eq!((state["answer"].clone(), state["approved"].clone()), (json!("42"), json!(true)));
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the journaled call ran once");
}
