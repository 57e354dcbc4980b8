//! The run loop: owns the lease and all checkpoint I/O. It admits the input, then runs
//! super-steps (tasks concurrently, writes applied in task-path order), persists each task's
//! writes as it finishes and each step in one commit, and stops at interrupts.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::future::{BoxFuture, Shared};
use futures::stream::{FuturesUnordered, StreamExt};
use futures::{FutureExt, Stream};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::FastMap;
use crate::algo::{self, Task, TaskOutput};
use crate::checkpoint::{
    Begun, ChannelBlob, ChannelVersion, CheckpointBody, Lease, LeaseRequest, Metadata, NewCheckpoint, PendingWrite,
    SharedCheckpointer, Source, StepCommit, StepMetadata, StepRef, StoredCheckpoint, TaskRef, WriteKind, codec,
};
use crate::error::{Error, Result};
use crate::graph::{Graph, START};
use crate::node::{Context, ContextInner, Persist};
use crate::retry::store_call;
use crate::runner::{self, TaskResult};
use crate::state::{State, Update, Values};
use crate::stream::{Event, EventSink};

/// How often a step's owner looks for the writes of tasks run by workers.
const REMOTE_POLL: Duration = Duration::from_millis(20);

/// When a step's checkpoint is made durable (LangGraph's durability modes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Each step's checkpoint commits before the next step starts (the default).
    #[default]
    Sync,
    /// Each step's checkpoint commits while the next step runs; the next step's writes wait for it.
    Async,
    /// Only the run's last checkpoint is committed (when it ends, interrupts or fails): fastest,
    /// but a crash loses the steps since the last durable checkpoint.
    Exit,
}

/// How a run is carried out.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Largest number of super-steps in this invocation.
    pub recursion_limit: u64,
    /// When checkpoints become durable.
    pub durability: Durability,
    /// The runner's name, shown to other runners refused the thread's lease.
    pub owner: String,
    /// Run a thread created by another graph (or another version of this one).
    pub allow_graph_change: bool,
    /// Run from this older checkpoint: a fork is made and becomes the head; the old branch stays.
    pub checkpoint: Option<u64>,
    /// How long to wait for tasks run by workers.
    pub remote_task_timeout: Duration,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            recursion_limit: 25,
            durability: Durability::Sync,
            owner: default_owner(),
            allow_graph_change: false,
            checkpoint: None,
            remote_task_timeout: Duration::from_mins(10),
        }
    }
}

/// `host:pid` of this process, the default owner name.
pub fn default_owner() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
    format!("{}:{}", if host.is_empty() { "localhost" } else { &host }, std::process::id())
}

/// What a run is given.
#[derive(Debug, Clone)]
pub enum Input {
    /// Start a run with these writes (on a new thread, or one whose last run finished).
    Start(Update),
    /// Carry on a run that was stopped (a crash, a lost lease, a recursion limit).
    Continue,
    /// Resume a run stopped by interrupts.
    Resume(Resume),
}

/// Values for pending interrupts.
#[derive(Debug, Clone)]
pub enum Resume {
    /// The value for the single pending interrupt (or the go-ahead after a static interrupt).
    Value(Value),
    /// A value per interrupt id, when several are pending.
    ById(BTreeMap<String, Value>),
}

/// Whether an interrupt came from a node or from the graph's static lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InterruptKind {
    /// `Context::interrupt` inside the node.
    Node,
    /// `interrupt_before`: the node has not run yet.
    Before,
    /// `interrupt_after`: the node ran and its step committed.
    After,
}

/// A pending request for human input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interrupt {
    /// Resume with this id when several are pending.
    pub id: String,
    /// The node.
    pub node: String,
    /// The payload given to `interrupt` (null for static interrupts).
    pub value: Value,
    /// Where it came from.
    pub kind: InterruptKind,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub enum RunOutcome {
    /// The run reached END; the final state.
    Done(State),
    /// The run waits for human input.
    Interrupted(Vec<Interrupt>),
}

impl RunOutcome {
    /// The final state, if the run finished.
    pub fn state(&self) -> Option<&State> {
        match self {
            RunOutcome::Done(state) => Some(state),
            RunOutcome::Interrupted(_) => None,
        }
    }
    /// The pending interrupts, if the run stopped for input.
    pub fn interrupts(&self) -> &[Interrupt] {
        match self {
            RunOutcome::Done(_) => &[],
            RunOutcome::Interrupted(list) => list,
        }
    }
}

/// A commit still in flight (durability async), awaited before anything else is written.
pub(crate) type CommitInFlight = Shared<BoxFuture<'static, Result<(), Arc<Error>>>>;

#[derive(Serialize, Deserialize)]
struct InterruptRecord {
    node: String,
    index: usize,
    value: Value,
}

#[derive(Serialize, Deserialize)]
struct ErrorRecord {
    node: String,
    message: String,
}

/// The checkpoint the loop stands on.
struct Current {
    id: u64,
    step: u64,
    body: Arc<CheckpointBody>,
    /// Shared with the snapshot the step's nodes read, which is gone by the time the step applies.
    values: Arc<Values>,
    /// A static `interrupt_after` stopped the run at this checkpoint.
    interrupt_after: bool,
}

impl Current {
    fn from_stored(stored: StoredCheckpoint) -> Self {
        Current {
            id: stored.id,
            step: stored.step,
            body: Arc::new(stored.body),
            values: Arc::new(stored.values.into_iter().map(|(k, v)| (k, Arc::new(v))).collect()),
            interrupt_after: stored.metadata.get("interrupt_after").and_then(Value::as_bool).unwrap_or(false),
        }
    }
}

/// What the pending writes of a step say.
#[derive(Default)]
pub(crate) struct Pending {
    pub(crate) outputs: FastMap<String, TaskOutput>,
    errors: Vec<ErrorRecord>,
    interrupts: BTreeMap<String, (String, InterruptRecord)>,
    resumes: BTreeMap<String, Value>,
    journal: FastMap<String, HashMap<String, Vec<u8>>>,
}

impl Pending {
    pub(crate) fn parse(writes: Vec<PendingWrite>) -> Result<Self> {
        let mut pending = Pending::default();
        for w in writes {
            match w.kind {
                WriteKind::Output => {
                    pending.outputs.insert(w.task, codec::decode(&w.data)?);
                }
                WriteKind::Error => pending.errors.push(codec::decode(&w.data)?),
                WriteKind::Interrupt => {
                    pending.interrupts.insert(w.key, (w.task, codec::decode(&w.data)?));
                }
                WriteKind::Resume => {
                    pending.resumes.insert(w.key, codec::decode(&w.data)?);
                }
                WriteKind::Journal => {
                    pending.journal.entry(w.task).or_default().insert(w.key, w.data);
                }
            }
        }
        Ok(pending)
    }

    pub(crate) fn open_interrupts(&self) -> Vec<Interrupt> {
        self.interrupts
            .iter()
            .filter(|(id, _)| !self.resumes.contains_key(*id))
            .map(|(id, (_, rec))| Interrupt {
                id: id.clone(),
                node: rec.node.clone(),
                value: rec.value.clone(),
                kind: InterruptKind::Node,
            })
            .collect()
    }

    /// Resume values of one task, by interrupt id (a subgraph's interrupts keep their own ids).
    fn subgraph_resumes(&self, task: &str) -> BTreeMap<String, Value> {
        self.interrupts
            .iter()
            .filter(|(_, (t, _))| t == task)
            .filter_map(|(id, _)| self.resumes.get(id).map(|v| (id.clone(), v.clone())))
            .collect()
    }

    /// Resume values of one task, by interrupt index.
    fn resumes_of(&self, task: &str) -> BTreeMap<usize, Value> {
        self.interrupts
            .iter()
            .filter(|(_, (t, _))| t == task)
            .filter_map(|(id, (_, rec))| self.resumes.get(id).map(|v| (rec.index, v.clone())))
            .collect()
    }

    /// The context a task runs with: its resume values and recorded journal come from here.
    pub(crate) fn context(&self, scope: &TaskScope<'_>, task: &Task) -> Context {
        Context::new(ContextInner {
            thread: scope.thread.to_owned(),
            ns: scope.ns.to_owned(),
            checkpoint: scope.checkpoint,
            epoch: scope.epoch,
            step: scope.step,
            task_id: task.id.clone(),
            node: task.node.clone(),
            arg: task.arg.clone(),
            attempt: 0.into(),
            resumes: self.resumes_of(&task.id),
            journal: std::sync::Mutex::new(self.journal.get(&task.id).cloned().unwrap_or_default()),
            journal_seen: std::sync::Mutex::default(),
            interrupts: 0.into(),
            store: Arc::clone(scope.store),
            events: scope.events.clone(),
            persist: scope.persist.clone(),
        })
    }
}

/// Where the tasks of one step run: thread, namespace, step, store, events, persistence.
pub(crate) struct TaskScope<'a> {
    pub(crate) thread: &'a str,
    pub(crate) ns: &'a str,
    pub(crate) checkpoint: u64,
    /// The runner's lease epoch; `None` for a worker (see [`StepRef::epoch`]).
    pub(crate) epoch: Option<u64>,
    pub(crate) step: u64,
    pub(crate) store: &'a SharedCheckpointer,
    pub(crate) events: Option<EventSink>,
    pub(crate) persist: Persist,
}

/// The id of a task's `index`-th interrupt.
pub(crate) fn interrupt_id(task: &str, index: usize) -> String {
    let mut h = blake3::Hasher::new();
    h.update(task.as_bytes());
    h.update(&(index as u64).to_le_bytes());
    h.finalize().to_hex()[..16].to_owned()
}

/// Steps held back by durability "exit": the newest checkpoint and the channel versions since
/// the last durable one, deltas folded together.
#[derive(Default)]
struct ExitBuffer {
    checkpoint: Option<NewCheckpoint>,
    channels: BTreeMap<String, Buffered>,
}

struct Buffered {
    version: u64,
    /// The durable version the buffered deltas extend; `None` once a whole value was written.
    base: Option<u64>,
    items: Vec<Value>,
}

/// The id of a thread that does not exist yet, minted for one run ([`Graph::invoke_new`]): a
/// UUID v7 (time-ordered, so new threads land at the end of the store's thread index). Nothing
/// is stored until that run stores its first checkpoint.
#[derive(Debug)]
pub struct NewThread {
    id: String,
}

impl NewThread {
    /// The thread's id: keep it to read or resume the thread after the run. Until
    /// [`Graph::invoke_new`] returns, only that run may use it.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl Graph {
    /// Runs the graph on a thread until it ends or interrupts.
    pub async fn invoke(&self, thread: &str, input: Input, config: &RunConfig) -> Result<RunOutcome> {
        self.execute(thread, input, config, None, false).await
    }

    /// A new thread for [`Graph::invoke_new`].
    pub fn new_thread(&self) -> NewThread {
        NewThread { id: uuid::Uuid::now_v7().to_string() }
    }

    /// Runs the graph from `input` on a new thread, until it ends or interrupts: as
    /// [`Graph::invoke`], with one store round trip less. No other runner can know the thread,
    /// so its run needs no lease before its first step: the store takes the lease and stores
    /// the admission with the first step's commit (PostgreSQL; the others take it first). Its
    /// first step may run before anything is stored: if the process dies in it, the thread does
    /// not exist (nothing to resume; run it anew). Once it returns, `thread.id()` is an ordinary
    /// thread. Refused if `config` names a checkpoint to fork from.
    pub async fn invoke_new(&self, thread: NewThread, input: Update, config: &RunConfig) -> Result<RunOutcome> {
        self.execute(&thread.id, Input::Start(input), config, None, true).await
    }

    /// Runs the graph on a thread, streaming its events. The stream ends after an
    /// `Interrupted` event, after the last step, or with an error.
    pub fn stream(&self, thread: &str, input: Input, config: &RunConfig) -> impl Stream<Item = Result<Event>> + use<> {
        let (tx, rx) = mpsc::unbounded_channel();
        let graph = self.clone();
        let thread = thread.to_owned();
        let config = config.clone();
        tokio::spawn(async move {
            if let Err(e) = graph.execute(&thread, input, &config, Some(tx.clone()), false).await {
                let _ = tx.send(Err(e));
            }
        });
        tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
    }

    async fn execute(
        &self,
        thread: &str,
        input: Input,
        config: &RunConfig,
        events: Option<EventSink>,
        new: bool,
    ) -> Result<RunOutcome> {
        let request = LeaseRequest {
            thread,
            owner: &config.owner,
            graph: &self.inner.identity,
            allow_graph_change: config.allow_graph_change,
        };
        // The lease comes with the thread's head, or on a new thread with the run's admission:
        // built as if the thread were new and stored with the lease (one round trip on
        // PostgreSQL). An input that does not apply to an empty state is left to the usual
        // admission, which applies it to the thread's state and reports what is wrong.
        // A new thread (`new`) has nothing to apply its input to but an empty state.
        let first = match (&input, config.checkpoint) {
            (Input::Start(update), None) => {
                match FirstAdmission::new(&self.inner, thread, &config.owner, update.clone()) {
                    Ok(first) => Some(first),
                    Err(err) if new => return Err(err),
                    Err(_) => None,
                }
            }
            _ if new => return Err(Error::InvalidState("a new thread has no checkpoint to fork from".into())),
            _ => None,
        };
        let admission = first.as_ref().map(|first| &first.commit);
        let Begun { lease, admitted, head } = match admission {
            Some(admission) if new => store_call(|| self.store.begin_new(request.clone(), admission)).await?,
            _ => store_call(|| self.store.begin(request.clone(), admission)).await?,
        };
        // The head is this run's own admission if an earlier try of the call above stored it but
        // its answer was lost: the run goes on from it instead of applying the input twice.
        let adopted = matches!((&first, &head), (Some(first), Some(head)) if first.is(head));
        if new && !admitted && !adopted {
            return Err(Error::InvalidState(format!("new thread `{thread}` exists already")));
        }
        let mut run = Loop::new(self, Arc::new(lease), thread, String::new(), config, events, head);
        match first {
            Some(first) if admitted => run.admitted(first),
            // Not made here: another runner may have written against it since (its pending
            // writes are read before the first step).
            Some(_) if adopted => run.emit_head(),
            _ => {
                if let Some(id) = config.checkpoint {
                    run.fork_from(id).await?;
                }
                run.admit(input).await?;
            }
        }
        let outcome = run.run().await;
        run.settle().await?;
        // Whatever ended the run, what it reports stands on durable checkpoints.
        let flushed = run.flush().await;
        let outcome = outcome?;
        flushed?;
        if let RunOutcome::Interrupted(interrupts) = &outcome {
            run.emit(Event::Interrupted { interrupts: interrupts.clone() });
        }
        Ok(outcome)
    }
}

/// A run's admission as the first checkpoint of a new thread, built before the lease says
/// whether the thread is new. Its metadata carries a random `admit` mark that tells it apart
/// from any other run's admission.
struct FirstAdmission {
    commit: StepCommit,
    current: Current,
    mark: String,
}

impl FirstAdmission {
    fn new(graph: &crate::graph::GraphInner, thread: &str, owner: &str, update: Update) -> Result<Self> {
        let mark = format!("{:016x}", rand::random::<u64>());
        let metadata = json!({"owner": owner, "admit": mark});
        let (checkpoint, blobs, current) = admission(graph, None, None, 1, update, metadata)?;
        let commit = StepCommit { thread: thread.to_owned(), ns: String::new(), checkpoint, blobs };
        Ok(FirstAdmission { commit, current, mark })
    }

    /// Whether `head` is this admission, stored.
    fn is(&self, head: &StoredCheckpoint) -> bool {
        head.id == self.commit.checkpoint.id && head.metadata.get("admit").and_then(Value::as_str) == Some(&self.mark)
    }
}

/// A run's admission: `update` (the run's input) applied on `prev` (the head standing at
/// `parent`; `None` on a new thread) as checkpoint `id`.
fn admission(
    graph: &crate::graph::GraphInner,
    prev: Option<Current>,
    parent: Option<u64>,
    id: u64,
    update: Update,
    metadata: Value,
) -> Result<(NewCheckpoint, Vec<ChannelBlob>, Current)> {
    let (prev_body, mut values, step) = match prev {
        Some(cur) => (cur.body, cur.values, cur.step),
        None => (Arc::default(), Arc::default(), 0),
    };
    let output = algo::input_output(graph, &State::shared(&values), update)?;
    let applied = algo::apply_step(
        graph,
        Cow::Borrowed(&*prev_body),
        Arc::make_mut(&mut values),
        vec![(START, output)],
        id,
        true,
    )?;
    let body = Arc::new(applied.body);
    let checkpoint = NewCheckpoint {
        id,
        parent,
        expected_head: parent,
        step,
        source: Source::Input,
        body: Arc::clone(&body),
        metadata: Arc::new(metadata.into()),
    };
    Ok((checkpoint, applied.blobs, Current { id, step, body, values, interrupt_after: false }))
}

struct Loop<'a> {
    graph: &'a Graph,
    lease: Arc<Lease>,
    thread: String,
    ns: String,
    config: &'a RunConfig,
    events: Option<EventSink>,
    /// The durable head.
    head: Option<u64>,
    current: Option<Current>,
    skip_static: bool,
    /// Whether `current` was made by this loop (so nothing else has written against it).
    made_here: bool,
    in_flight: Option<CommitInFlight>,
    exit: ExitBuffer,
}

impl<'a> Loop<'a> {
    /// A loop standing on `head` (the namespace's durable head, if any).
    fn new(
        graph: &'a Graph,
        lease: Arc<Lease>,
        thread: &str,
        ns: String,
        config: &'a RunConfig,
        events: Option<EventSink>,
        head: Option<StoredCheckpoint>,
    ) -> Self {
        Loop {
            graph,
            lease,
            thread: thread.to_owned(),
            ns,
            config,
            events,
            head: head.as_ref().map(|h| h.id),
            current: head.map(Current::from_stored),
            skip_static: false,
            made_here: false,
            in_flight: None,
            exit: ExitBuffer::default(),
        }
    }

    fn emit(&self, event: Event) {
        if let Some(events) = &self.events {
            let _ = events.send(Ok(event));
        }
    }

    fn step_ref(&self, checkpoint: u64) -> StepRef<'_> {
        StepRef { thread: &self.thread, ns: &self.ns, checkpoint, epoch: Some(self.lease.epoch) }
    }

    /// Makes the fork of an older checkpoint the head.
    async fn fork_from(&mut self, id: u64) -> Result<()> {
        if self.head == Some(id) {
            return Ok(());
        }
        let old = store_call(|| self.graph.store.load(&self.thread, &self.ns, Some(id)))
            .await?
            .ok_or_else(|| Error::NotFound(format!("checkpoint {id} of thread `{}`", self.thread)))?;
        let new_id = self.lease.next_checkpoint_id();
        let checkpoint = NewCheckpoint {
            id: new_id,
            parent: Some(id),
            expected_head: self.head,
            step: old.step,
            source: Source::Fork,
            body: Arc::new(old.body.clone()),
            metadata: Arc::new(json!({"forked_from": id, "owner": self.lease.owner}).into()),
        };
        self.commit_now(checkpoint, Vec::new(), false).await?;
        let mut current = Current::from_stored(old);
        current.id = new_id;
        current.interrupt_after = false;
        self.current = Some(current);
        Ok(())
    }

    /// Applies the input (a new run's admission, or resume values).
    async fn admit(&mut self, input: Input) -> Result<()> {
        match input {
            Input::Start(update) => {
                if let Some(cur) = &self.current
                    && !cur.body.next.is_empty()
                {
                    let nodes: Vec<String> =
                        algo::tasks_for("", cur.id, &cur.body).into_iter().map(|t| t.node).collect();
                    return Err(Error::InvalidState(format!(
                        "thread `{}` has a run in progress at step {} (next: {}); continue or resume it, or use another thread",
                        self.thread,
                        cur.step,
                        nodes.join(", ")
                    )));
                }
                let id = self.lease.next_checkpoint_id();
                let metadata = json!({"owner": self.lease.owner});
                let (checkpoint, blobs, current) =
                    admission(&self.graph.inner, self.current.take(), self.head, id, update, metadata)?;
                // Admission: stored before the first node runs, whatever the durability mode, and
                // kept if this process dies; durable against a crash of the store's server with
                // the run's first durable commit (one log flush for both), or when the run ends.
                self.commit_now(checkpoint, blobs, true).await?;
                self.current = Some(current);
                self.made_here = true;
                self.emit_values();
                Ok(())
            }
            Input::Continue => {
                if self.current.is_none() {
                    return Err(Error::NotFound(format!(
                        "thread `{}` has no checkpoint to continue from",
                        self.thread
                    )));
                }
                Ok(())
            }
            Input::Resume(resume) => {
                let cur = self.current.as_ref().ok_or_else(|| Error::NotFound(format!("thread `{}`", self.thread)))?;
                let id = cur.id;
                let pending = Pending::parse(store_call(|| self.graph.store.pending_writes(self.step_ref(id))).await?)?;
                let open = pending.open_interrupts();
                if open.is_empty() {
                    if self.static_interrupt_pending(cur) {
                        self.skip_static = true;
                        return Ok(());
                    }
                    return Err(Error::InvalidState(format!(
                        "thread `{}` is not interrupted; nothing to resume",
                        self.thread
                    )));
                }
                let values: Vec<(String, Value)> = match resume {
                    Resume::Value(value) if open.len() == 1 => vec![(open[0].id.clone(), value)],
                    Resume::Value(_) => {
                        let ids: Vec<&str> = open.iter().map(|i| i.id.as_str()).collect();
                        return Err(Error::InvalidState(format!(
                            "{} interrupts are pending ({}); resume them by id",
                            open.len(),
                            ids.join(", ")
                        )));
                    }
                    Resume::ById(map) => {
                        for key in map.keys() {
                            if !open.iter().any(|i| &i.id == key) {
                                return Err(Error::InvalidState(format!("no pending interrupt has id `{key}`")));
                            }
                        }
                        map.into_iter().collect()
                    }
                };
                let writes = values
                    .into_iter()
                    .map(|(key, value)| {
                        let task = pending.interrupts[&key].0.clone();
                        Ok(PendingWrite { task, kind: WriteKind::Resume, key, data: codec::encode(&value)? })
                    })
                    .collect::<Result<Vec<_>>>()?;
                store_call(|| self.graph.store.put_writes(self.step_ref(id), &writes)).await?;
                Ok(())
            }
        }
    }

    /// Stands on a new thread's admission, stored with the lease.
    fn admitted(&mut self, first: FirstAdmission) {
        self.head = Some(first.commit.checkpoint.id);
        self.current = Some(first.current);
        self.made_here = true;
        self.emit_head();
    }

    /// Reports the checkpoint the run stands on as if this loop had just committed it.
    fn emit_head(&self) {
        if let Some(cur) = &self.current {
            self.emit(Event::Checkpoint { id: cur.id, step: cur.step });
        }
        self.emit_values();
    }

    fn static_interrupt_pending(&self, cur: &Current) -> bool {
        let g = &self.graph.inner;
        cur.interrupt_after
            || algo::tasks_for(&self.ns, cur.id, &cur.body).iter().any(|t| g.interrupt_before.contains(&t.node))
    }

    fn emit_values(&self) {
        if self.events.is_some()
            && let Some(cur) = &self.current
        {
            let state = State::shared(&cur.values).to_json();
            self.emit(Event::Values { step: cur.step, state });
        }
    }

    fn persist_mode(&self) -> Persist {
        match (self.config.durability, &self.in_flight) {
            (Durability::Exit, _) => Persist::Never,
            (Durability::Async, Some(commit)) => Persist::After(commit.clone()),
            _ => Persist::Now,
        }
    }

    async fn run(&mut self) -> Result<RunOutcome> {
        let g = Arc::clone(&self.graph.inner);
        let mut steps = 0u64;
        loop {
            let cur = self.current.as_ref().ok_or_else(|| Error::NotFound(format!("thread `{}`", self.thread)))?;
            if cur.body.next.is_empty() {
                let state = State::shared(&cur.values);
                self.flush_exit().await?;
                return Ok(RunOutcome::Done(state));
            }
            if steps >= self.config.recursion_limit {
                self.flush_exit().await?;
                return Err(Error::RecursionLimit { limit: self.config.recursion_limit });
            }
            steps += 1;
            let tasks = algo::tasks_for(&self.ns, cur.id, &cur.body);
            if !std::mem::take(&mut self.skip_static) {
                let before: Vec<Interrupt> = tasks
                    .iter()
                    .filter(|t| g.interrupt_before.contains(&t.node))
                    .map(|t| Interrupt {
                        id: t.id.clone(),
                        node: t.node.clone(),
                        value: Value::Null,
                        kind: InterruptKind::Before,
                    })
                    .collect();
                if !before.is_empty() {
                    self.flush_exit().await?;
                    return Ok(RunOutcome::Interrupted(before));
                }
            }
            let (id, step) = (cur.id, cur.step);
            // A checkpoint this loop just made has no pending writes yet: skip the round trip.
            let pending = if self.head == Some(id) && !self.made_here {
                self.settle().await?;
                Pending::parse(store_call(|| self.graph.store.pending_writes(self.step_ref(id))).await?)?
            } else {
                Pending::default()
            };
            if let Some(failure) = pending.errors.first() {
                return Err(Error::RunFailed {
                    thread: self.thread.clone(),
                    message: format!("node `{}`: {}", failure.node, failure.message),
                });
            }
            let open = pending.open_interrupts();
            if !open.is_empty() {
                return Ok(RunOutcome::Interrupted(open));
            }
            let results = self.run_tasks(&tasks, &pending).await?;
            if let Some(outcome) = self.settle_step(&tasks, &results, &pending).await? {
                return Ok(outcome);
            }
            let after = self.apply_and_commit(&g, &tasks, results, pending, (id, step)).await?;
            if after {
                let cur = self.current.as_ref().ok_or_else(|| Error::NotFound(self.thread.clone()))?;
                let interrupts = algo::tasks_for(&self.ns, cur.id, &cur.body)
                    .into_iter()
                    .map(|t| Interrupt { id: t.id, node: t.node, value: Value::Null, kind: InterruptKind::After })
                    .collect();
                self.flush_exit().await?;
                return Ok(RunOutcome::Interrupted(interrupts));
            }
        }
    }

    /// Applies a finished step's outputs in task-path order and commits the next checkpoint.
    /// Returns whether a static `interrupt_after` stops the run here.
    async fn apply_and_commit(
        &mut self,
        g: &crate::graph::GraphInner,
        tasks: &[Task],
        mut results: FastMap<String, TaskResult>,
        mut pending: Pending,
        (id, step): (u64, u64),
    ) -> Result<bool> {
        // Owned: the written values move into the channels. Source and step have columns of
        // their own; the metadata lists the tasks.
        let mut by_node: Vec<(&str, TaskOutput)> = Vec::with_capacity(tasks.len());
        let mut refs = Vec::with_capacity(tasks.len());
        let mut stops_after = false;
        for task in tasks {
            let output = pending.outputs.remove(&task.id).or_else(|| match results.remove(&task.id) {
                Some(TaskResult::Done(output)) => Some(output),
                _ => None,
            });
            let Some(output) = output else { continue };
            if self.events.is_some() {
                self.emit(Event::Updates {
                    step,
                    node: task.node.clone(),
                    task: task.id.clone(),
                    writes: output.writes.clone(),
                });
            }
            refs.push(TaskRef { id: task.id.clone(), node: task.node.clone() });
            stops_after |= g.interrupt_after.contains(&task.node);
            by_node.push((task.node.as_str(), output));
        }
        let new_id = self.lease.next_checkpoint_id();
        let cur = self.current.as_mut().ok_or_else(|| Error::NotFound(self.thread.clone()))?;
        // Held-back steps (durability exit) are written as one delta; its segment closes at the flush.
        let close_segments = self.config.durability != Durability::Exit;
        // The committed step let go of the body (unless a commit in flight or held back still
        // has it): the new body takes over its version map.
        let prev = match Arc::try_unwrap(std::mem::take(&mut cur.body)) {
            Ok(body) => Cow::Owned(body),
            Err(shared) => {
                cur.body = shared;
                Cow::Borrowed(&*cur.body)
            }
        };
        let applied = algo::apply_step(g, prev, Arc::make_mut(&mut cur.values), by_node, new_id, close_segments)?;
        let after = stops_after && !applied.body.next.is_empty();
        let metadata = StepMetadata { owner: self.lease.owner.clone(), tasks: refs, interrupt_after: after };
        let body = Arc::new(applied.body);
        let checkpoint = NewCheckpoint {
            id: new_id,
            parent: Some(id),
            expected_head: Some(id),
            step: step + 1,
            source: Source::Loop,
            body: Arc::clone(&body),
            metadata: Arc::new(Metadata::Step(metadata)),
        };
        cur.id = new_id;
        cur.step = step + 1;
        self.made_here = true;
        cur.body = body;
        cur.interrupt_after = after;
        self.commit(checkpoint, applied.blobs).await?;
        self.emit_values();
        Ok(after)
    }

    /// Runs a subgraph node: its own loop in the namespace `node:task`, under this loop's lease.
    fn run_subgraph<'s>(
        &'s self,
        child: &'s Graph,
        task: &'s Task,
        state: State,
        resumes: BTreeMap<String, Value>,
    ) -> BoxFuture<'s, TaskResult> {
        let ns = if self.ns.is_empty() {
            format!("{}:{}", task.node, task.id)
        } else {
            format!("{}|{}:{}", self.ns, task.node, task.id)
        };
        Box::pin(async move {
            // The subgraph checkpoints into the parent's store, whatever store it was built with.
            let child = child.clone().with_checkpointer(Arc::clone(&self.graph.store));
            let result: Result<TaskResult> = async {
                let head = store_call(|| child.store.load(&self.thread, &ns, None)).await?;
                let input = match &head {
                    None => {
                        let mut update = Update::new();
                        for channel in child.inner.channels.keys() {
                            if let Some(value) = state.value(channel) {
                                update = update.set(channel.clone(), value.clone());
                            }
                        }
                        Input::Start(update)
                    }
                    Some(_) if !resumes.is_empty() => Input::Resume(Resume::ById(resumes)),
                    Some(_) => Input::Continue,
                };
                let mut inner =
                    Loop::new(&child, Arc::clone(&self.lease), &self.thread, ns.clone(), self.config, None, head);
                inner.admit(input).await?;
                let outcome = inner.run().await;
                inner.settle().await?;
                Ok(match outcome? {
                    RunOutcome::Done(after) => {
                        let update = algo::subgraph_update(&self.graph.inner, &state, &after);
                        match algo::finish_task(&self.graph.inner, &task.node, &state, update) {
                            Ok(output) => TaskResult::Done(output),
                            Err(e) => TaskResult::Failed(e),
                        }
                    }
                    RunOutcome::Interrupted(list) => TaskResult::Suspended(list),
                })
            }
            .await;
            result.unwrap_or_else(|e| match e {
                Error::Node { .. } | Error::InvalidUpdate { .. } => TaskResult::Failed(e),
                other => {
                    TaskResult::Failed(Error::Node { node: task.node.clone(), attempts: 1, message: other.to_string() })
                }
            })
        })
    }

    /// Runs the tasks that have no output yet: local ones here, remote ones by waiting for workers.
    async fn run_tasks(&self, tasks: &[Task], pending: &Pending) -> Result<FastMap<String, TaskResult>> {
        let g = &self.graph.inner;
        let cur = self.current.as_ref().ok_or_else(|| Error::NotFound(self.thread.clone()))?;
        let state = State::shared(&cur.values);
        let persist_each = tasks.len() > 1 && self.config.durability != Durability::Exit;
        let persist = self.persist_mode();
        let scope = TaskScope {
            thread: &self.thread,
            ns: &self.ns,
            checkpoint: cur.id,
            epoch: Some(self.lease.epoch),
            step: cur.step,
            store: &self.graph.store,
            events: self.events.clone(),
            persist: persist.clone(),
        };
        // A task alone in its step is awaited right here: no set of futures to build and poll.
        let mut running = None;
        let mut results = FastMap::default();
        let mut remote = Vec::new();
        let todo: Vec<&Task> = tasks.iter().filter(|t| !pending.outputs.contains_key(&t.id)).collect();
        let alone = todo.len() == 1;
        for task in todo {
            let spec = g
                .nodes
                .get(&task.node)
                .ok_or_else(|| Error::graph(&g.name, format!("checkpoint schedules unknown node `{}`", task.node)))?;
            if spec.remote {
                remote.push(task);
                continue;
            }
            let ctx = pending.context(&scope, task);
            let state = state.clone();
            let step = self.step_ref(cur.id);
            let persist = persist.clone();
            let subgraph_resumes = pending.subgraph_resumes(&task.id);
            let run = async move {
                let result = match &spec.subgraph {
                    Some(child) => self.run_subgraph(child, task, state, subgraph_resumes).await,
                    None => runner::run_task(g, spec, task, state, ctx, alone).await,
                };
                // In "exit" mode nothing is written here: settle_step records interrupts and
                // failures once the step's checkpoint is durable.
                if !matches!(persist, Persist::Never) {
                    let writes = result_writes(task, &result, persist_each)?;
                    if !writes.is_empty() {
                        if let Persist::After(commit) = &persist {
                            commit.clone().await.map_err(|e| Error::InvalidState(format!("commit failed: {e}")))?;
                        }
                        store_call(|| self.graph.store.put_writes(step, &writes)).await?;
                    }
                }
                Ok::<_, Error>((task.id.clone(), result))
            };
            if alone {
                let (id, result) = run.await?;
                results.insert(id, result);
            } else {
                running.get_or_insert_with(FuturesUnordered::new).push(run);
            }
        }
        if let Some(mut running) = running {
            while let Some(done) = running.next().await {
                let (id, result) = done?;
                results.insert(id, result);
            }
        }
        if !remote.is_empty() {
            self.wait_remote(&remote, cur.id, &mut results).await?;
        }
        Ok(results)
    }

    /// Waits until workers have reported every remote task of the step.
    async fn wait_remote(
        &self,
        remote: &[&Task],
        checkpoint: u64,
        results: &mut FastMap<String, TaskResult>,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.config.remote_task_timeout;
        loop {
            let pending =
                Pending::parse(store_call(|| self.graph.store.pending_writes(self.step_ref(checkpoint))).await?)?;
            let mut missing = 0;
            for task in remote {
                if let Some(output) = pending.outputs.get(&task.id) {
                    results.insert(task.id.clone(), TaskResult::Done(output.clone()));
                } else if let Some((id, (_, rec))) = pending.interrupts.iter().find(|(_, (t, _))| t == &task.id) {
                    if pending.resumes.contains_key(id) {
                        missing += 1;
                    } else {
                        results.insert(
                            task.id.clone(),
                            TaskResult::Interrupted { index: rec.index, value: rec.value.clone() },
                        );
                    }
                } else {
                    missing += 1;
                }
            }
            if let Some(failure) = pending.errors.first() {
                return Err(Error::Node { node: failure.node.clone(), attempts: 1, message: failure.message.clone() });
            }
            if missing == 0 {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::InvalidState(format!(
                    "{missing} remote task(s) of thread `{}` were not reported within {:?}",
                    self.thread, self.config.remote_task_timeout
                )));
            }
            tokio::time::sleep(REMOTE_POLL).await;
        }
    }

    /// Decides whether the step can commit: a failure fails the run, interrupts stop it.
    async fn settle_step(
        &mut self,
        tasks: &[Task],
        results: &FastMap<String, TaskResult>,
        pending: &Pending,
    ) -> Result<Option<RunOutcome>> {
        let failed = tasks.iter().find_map(|t| match results.get(&t.id) {
            Some(TaskResult::Failed(e)) => Some((t, e)),
            _ => None,
        });
        let interrupted: Vec<Interrupt> = tasks
            .iter()
            .filter_map(|t| match results.get(&t.id) {
                Some(TaskResult::Interrupted { index, value }) => Some(vec![Interrupt {
                    id: interrupt_id(&t.id, *index),
                    node: t.node.clone(),
                    value: value.clone(),
                    kind: InterruptKind::Node,
                }]),
                Some(TaskResult::Suspended(list)) => Some(list.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        if failed.is_none() && interrupted.is_empty() {
            return Ok(None);
        }
        if self.config.durability == Durability::Exit {
            // Make the step's checkpoint durable, then record what stopped it against it.
            self.flush_exit().await?;
            let id = self.current.as_ref().map_or(0, |c| c.id);
            let mut writes = Vec::new();
            for t in tasks {
                if let Some(result) = results.get(&t.id) {
                    writes.extend(result_writes(t, result, true)?);
                }
            }
            store_call(|| self.graph.store.put_writes(self.step_ref(id), &writes)).await?;
        }
        if let Some((_, error)) = failed {
            return Err(match error {
                Error::Node { node, attempts, message } => {
                    Error::Node { node: node.clone(), attempts: *attempts, message: message.clone() }
                }
                Error::InvalidUpdate { node, message } => {
                    Error::InvalidUpdate { node: node.clone(), message: message.clone() }
                }
                other => Error::InvalidState(other.to_string()),
            });
        }
        let mut all = pending.open_interrupts();
        all.extend(interrupted);
        Ok(Some(RunOutcome::Interrupted(all)))
    }

    /// Commits a step as the durability mode says.
    async fn commit(&mut self, checkpoint: NewCheckpoint, blobs: Vec<ChannelBlob>) -> Result<()> {
        match self.config.durability {
            Durability::Sync => self.commit_now(checkpoint, blobs, false).await,
            Durability::Async => {
                self.settle().await?;
                let commit = StepCommit { thread: self.thread.clone(), ns: self.ns.clone(), checkpoint, blobs };
                let store = Arc::clone(&self.graph.store);
                let lease = Arc::clone(&self.lease);
                self.head = Some(commit.checkpoint.id);
                let id = commit.checkpoint.id;
                let step = commit.checkpoint.step;
                let future: BoxFuture<'static, Result<(), Arc<Error>>> =
                    async move { store_call(|| store.commit(&lease, &commit)).await.map_err(Arc::new) }.boxed();
                let shared = future.shared();
                // Drive it now, so it lands even while the next step has nothing to await.
                tokio::spawn(shared.clone());
                self.in_flight = Some(shared);
                self.emit(Event::Checkpoint { id, step });
                Ok(())
            }
            Durability::Exit => {
                self.buffer(checkpoint, blobs)?;
                Ok(())
            }
        }
    }

    /// Commits a checkpoint now. `lazy`: with [`crate::checkpoint::Checkpointer::commit_lazy`],
    /// made durable by the next durable commit or by [`Loop::flush`].
    async fn commit_now(&mut self, checkpoint: NewCheckpoint, blobs: Vec<ChannelBlob>, lazy: bool) -> Result<()> {
        self.settle().await?;
        let (id, step) = (checkpoint.id, checkpoint.step);
        let commit = StepCommit { thread: self.thread.clone(), ns: self.ns.clone(), checkpoint, blobs };
        let store = &self.graph.store;
        if lazy {
            store_call(|| store.commit_lazy(&self.lease, &commit)).await?;
        } else {
            store_call(|| store.commit(&self.lease, &commit)).await?;
        }
        self.head = Some(id);
        self.emit(Event::Checkpoint { id, step });
        Ok(())
    }

    /// Makes what the lease stored durable, if no durable commit did since (a run that ends after
    /// its admission, say at an interrupt before its first node).
    async fn flush(&self) -> Result<()> {
        store_call(|| self.graph.store.flush(&self.lease)).await
    }

    /// Waits for a commit in flight (durability async).
    async fn settle(&mut self) -> Result<()> {
        if let Some(commit) = self.in_flight.take() {
            commit.await.map_err(|e| match Arc::try_unwrap(e) {
                Ok(e) => e,
                Err(shared) => Error::InvalidState(format!("checkpoint commit failed: {shared}")),
            })?;
        }
        Ok(())
    }

    fn buffer(&mut self, mut checkpoint: NewCheckpoint, blobs: Vec<ChannelBlob>) -> Result<()> {
        if let Some(previous) = self.exit.checkpoint.take() {
            checkpoint.parent = previous.parent;
            checkpoint.expected_head = previous.expected_head;
        }
        for blob in blobs {
            let items: Vec<Value> = if blob.base.is_some() { codec::decode(&blob.data)? } else { Vec::new() };
            let entry = self.exit.channels.remove(&blob.channel);
            let buffered = match (entry, blob.base) {
                (Some(mut held), Some(_)) => {
                    held.items.extend(items);
                    held.version = blob.version;
                    held
                }
                (None, Some(base)) => Buffered { version: blob.version, base: Some(base), items },
                (_, None) => Buffered { version: blob.version, base: None, items: Vec::new() },
            };
            self.exit.channels.insert(blob.channel, buffered);
        }
        // A channel now inline needs no row: forget the one an earlier step left to write.
        for (channel, version) in &checkpoint.body.versions {
            if version.i.is_some() {
                self.exit.channels.remove(channel);
            }
        }
        self.exit.checkpoint = Some(checkpoint);
        Ok(())
    }

    /// Commits the newest held-back checkpoint (durability exit).
    async fn flush_exit(&mut self) -> Result<()> {
        let Some(mut checkpoint) = self.exit.checkpoint.take() else { return Ok(()) };
        let channels = std::mem::take(&mut self.exit.channels);
        let cur = self.current.as_ref().ok_or_else(|| Error::NotFound(self.thread.clone()))?;
        let mut blobs = Vec::with_capacity(channels.len());
        for (channel, held) in channels {
            let Some(version) = std::sync::Arc::make_mut(&mut checkpoint.body).versions.get_mut(&channel) else {
                continue;
            };
            let value = cur.values.get(&channel).map_or(&Value::Null, AsRef::as_ref);
            // A delta's version, as the steps left it, counts the items since its segment's start
            // (its rows are overcounted: each held step counted one): the held items go in one
            // delta on the durable version, or in the segment's row if it is full.
            let (base, data) = if let Some(base) = held.base {
                let segment = algo::close_segment(version, value)?;
                segment.map_or_else(|| codec::encode(&held.items).map(|data| (base, data)), Ok)?
            } else {
                *version = ChannelVersion::whole(held.version);
                blobs.push(ChannelBlob { channel, version: held.version, base: None, data: codec::encode(value)? });
                continue;
            };
            blobs.push(ChannelBlob { channel, version: held.version, base: Some(base), data });
        }
        self.commit_now(checkpoint, blobs, false).await
    }
}

/// The pending writes that record how a task ended: its output (when `output` is asked for:
/// steps of several tasks), its interrupts, or its failure.
pub(crate) fn result_writes(task: &Task, result: &TaskResult, output: bool) -> Result<Vec<PendingWrite>> {
    Ok(match result {
        TaskResult::Done(out) if output => vec![encode(task, WriteKind::Output, "", out)?],
        TaskResult::Done(_) => Vec::new(),
        TaskResult::Interrupted { index, value } => vec![encode(
            task,
            WriteKind::Interrupt,
            &interrupt_id(&task.id, *index),
            &InterruptRecord { node: task.node.clone(), index: *index, value: value.clone() },
        )?],
        TaskResult::Suspended(list) => list
            .iter()
            .enumerate()
            .map(|(index, i)| {
                let record = InterruptRecord { node: i.node.clone(), index, value: i.value.clone() };
                encode(task, WriteKind::Interrupt, &i.id, &record)
            })
            .collect::<Result<_>>()?,
        TaskResult::Failed(e) => {
            vec![encode(task, WriteKind::Error, "", &ErrorRecord { node: task.node.clone(), message: e.to_string() })?]
        }
    })
}

fn encode<T: Serialize>(task: &Task, kind: WriteKind, key: &str, value: &T) -> Result<PendingWrite> {
    Ok(PendingWrite { task: task.id.clone(), kind, key: key.to_owned(), data: codec::encode(value)? })
}
