//! PostgreSQL checkpointer: the production store, shared by every runner of a deployment.
//!
//! - Tables live in the schema `agentic`, named in every statement (no `search_path` needed);
//!   the migrations are `migrations/postgres/`.
//! - A lease is a session-level advisory lock, held on the checkpointer's one lease session: a
//!   runner killed with SIGKILL loses its connections, the server ends the session and the locks
//!   with it, and a restarted runner takes the thread at once. The epoch bumped on each acquire
//!   fences the commits of a runner that lost its session but has not noticed yet.
//! - A commit is one SQL statement (one round trip). Alone, it runs on the lease session itself:
//!   the advisory lock that session holds is the fence (no other runner can hold the thread while
//!   the statement runs), so the statement is the insert of one row (the checkpoint with the
//!   channel versions it wrote) behind a head check, and the fold of the parent's pending writes.
//!   Otherwise, or once the lease's session is gone, the fenced statement: the thread row locked
//!   FOR SHARE with the lease's epoch, the same head check, the rows. That statement takes a
//!   batch of commits of different threads ([`PostgresCheckpointer::commit_batch`]); when every
//!   lease in it knows its head and that no pending write is stored, it is the fence and the
//!   insert alone ([`COMMIT_LEAN_SQL`]).
//! - A new thread minted for its run ([`Checkpointer::begin_new`]) is taken by its first step's
//!   commit: one durable statement takes the lock, makes the thread row and stores the admission
//!   and the step ([`Deferred`]). Nobody else can name that thread, so nothing contends for it
//!   while its first step runs. Takes that wait for the lease session go together, in one
//!   statement ([`TAKE_NEW_BATCH_SQL`]).
//! - A lazy commit (a run's admission on an existing thread) runs on the lease session without
//!   waiting for its WAL flush, as the take does; the lease's next durable commit, or its flush
//!   as the run ends, makes both durable.
//! - A namespace's head is its newest checkpoint: ids only grow within a thread.
//! - A load is at most two round trips: the checkpoint, then every blob it needs (a delta chain
//!   in one range scan).

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Arguments as _, ConnectOptions, Connection, PgConnection, Row as _};
use tokio::sync::{mpsc, oneshot};

use super::{
    Begun, ChannelRows, CheckpointMeta, CheckpointRow, Checkpointer, GraphIdentity, Lease, LeaseRequest, ListFilter,
    MetaRow, NewCheckpoint, PendingWrite, PutOutcome, StepCommit, StepRef, StoredCheckpoint, ThreadInfo, ThreadRow,
    WriteRow, blob_heads, blobs_to_keep, is_first, materialize_rows, stale_task, store_error,
};
use crate::error::{Error, Result, until_words};

const BACKEND: &str = "postgres";

/// The embedded migrations of the PostgreSQL schema.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// Stores checkpoints in PostgreSQL.
#[derive(Clone)]
pub struct PostgresCheckpointer {
    pool: PgPool,
    /// The session that holds this checkpointer's leases.
    leases: Arc<LeaseSession>,
    /// The group committer's queue; `None` inside the committer itself.
    committer: Option<mpsc::UnboundedSender<CommitJob>>,
    /// Commit statements in flight, direct or batched.
    in_flight: Arc<AtomicUsize>,
    /// Pending writes stored (or tried) and read through this checkpointer, counted: a lease
    /// skips a commit's fold while the count has not moved since its namespace was clean (see
    /// [`KnownHeads`]).
    writes_seen: Arc<AtomicU64>,
    /// Idle connections kept for commit statements (see [`CommitConnections`]).
    commit_conns: Arc<CommitConnections>,
}

/// Connections of the commit statement, kept out of the pool: sqlx pings every pooled connection
/// when it is returned (a round trip, and server work, per statement), which the hot path of a
/// step should not pay. A connection goes back only after a statement that completed; any error
/// drops it, so a broken or interrupted session is never reused.
#[derive(Default)]
struct CommitConnections {
    idle: Mutex<Vec<PgConnection>>,
}

/// More idle commit connections than this are closed: commit statements in flight are at most
/// the committers and one direct commit, unless callers use `commit_batch` themselves.
const IDLE_COMMIT_CONNECTIONS: usize = COMMITTERS + 2;

impl CommitConnections {
    async fn take(&self, pool: &PgPool) -> Result<PgConnection> {
        let idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop();
        match idle {
            Some(conn) => Ok(conn),
            None => pool.connect_options().connect().await.map_err(pg_error("commit")),
        }
    }

    fn give_back(&self, conn: PgConnection) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < IDLE_COMMIT_CONNECTIONS {
            idle.push(conn);
        }
    }
}

/// Counts a commit statement in flight while it lives.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// Counts one more.
    fn enter(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(counter))
    }

    /// Counts one if none is in flight.
    fn enter_alone(counter: &Arc<AtomicUsize>) -> Option<Self> {
        counter.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire).ok()?;
        Some(InFlight(Arc::clone(counter)))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How long [`Checkpointer::delete_thread`] waits for a runner holding the thread to let it go.
const DELETE_WAIT: Duration = Duration::from_secs(2);

/// How many batches may be in flight at once: while one waits for its WAL flush, the next
/// gathers the commits that arrive meanwhile.
const COMMITTERS: usize = 2;
/// Largest number of commits one statement carries.
const MAX_BATCH: usize = 256;

/// A commit waiting for the group committer.
struct CommitJob {
    lease: Lease,
    commit: StepCommit,
    /// Whether it may go in [`COMMIT_LEAN_SQL`] (see [`lean`]).
    lean: bool,
    reply: oneshot::Sender<Result<()>>,
}

/// Group commit: commits from every runner of this checkpointer queue here, and each committer
/// takes all that are waiting into one statement (one round trip, one WAL flush for all). A
/// runner still learns that its step is done only once its commit is durable. A commit that finds
/// no statement in flight skips the queue and runs its own.
async fn group_commits(
    store: PostgresCheckpointer,
    queue: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<CommitJob>>>,
) {
    loop {
        let mut jobs = Vec::new();
        {
            let mut queue = queue.lock().await;
            match queue.recv().await {
                Some(job) => jobs.push(job),
                None => return,
            }
            while jobs.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
        }
        let batch: Vec<(&Lease, &StepCommit)> = jobs.iter().map(|j| (&j.lease, &j.commit)).collect();
        let lean: Vec<bool> = jobs.iter().map(|j| j.lean).collect();
        let counted = InFlight::enter(&store.in_flight);
        let results = store.batch(&batch, &lean).await;
        drop((counted, batch));
        for (job, result) in jobs.into_iter().zip(results) {
            let _ = job.reply.send(result);
        }
    }
}

impl std::fmt::Debug for PostgresCheckpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No connection settings: they may hold a password.
        f.debug_struct("PostgresCheckpointer").finish_non_exhaustive()
    }
}

/// Classifies SQLSTATEs: connection failures, server shutdown, too many connections,
/// serialization failures and deadlocks are worth retrying.
fn transient_sqlstate(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01")
}

/// Whether an error means the session is gone: a connection failure, or the server ending the
/// session (SQLSTATE class 08, 57P).
fn session_gone(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| code.starts_with("08") || code.starts_with("57P")),
        _ => true,
    }
}

fn pg_error(operation: &str) -> impl Fn(sqlx::Error) -> Error + '_ {
    move |err| store_error(BACKEND, operation, &err, transient_sqlstate)
}

fn i64s(values: impl IntoIterator<Item = u64>) -> Vec<i64> {
    values.into_iter().map(|v| v as i64).collect()
}

/// The advisory lock key of a thread's lease.
fn lease_key(thread: &str) -> i64 {
    let hash = blake3::hash(format!("agentic/lease/{thread}").as_bytes());
    let mut key = [0u8; 8];
    key.copy_from_slice(&hash.as_bytes()[..8]);
    i64::from_le_bytes(key)
}

/// The one database session that holds this checkpointer's leases as session advisory locks.
/// Locks die with the session, so a killed process's leases free at once; one session for all
/// leases keeps connections few however many threads run (a connection per lease exhausted
/// `max_connections` at 64 threads).
struct LeaseSession {
    options: PgConnectOptions,
    /// The session and its generation (bumped on every reconnect: locks of an older session are gone).
    conn: tokio::sync::Mutex<(u64, Option<PgConnection>)>,
    /// Keys held by live leases of this checkpointer, with the session generation that holds
    /// them. Session locks are re-entrant, so a second runner of this process on the same thread
    /// is refused here, while the session that holds the lock lives.
    held: Mutex<HashMap<i64, u64>>,
    /// Locks of dropped leases not unlocked yet (key, session generation): the next statement
    /// that takes a lease unlocks them (a new thread's take one of them), or the flush at most
    /// [`UNLOCK_DELAY`] after the drop.
    unlocks: Mutex<Vec<(i64, u64)>>,
    /// Whether a flush of [`Self::unlocks`] is scheduled: drops meanwhile leave their keys to it.
    flush_armed: AtomicBool,
    /// Leases of new threads whose take waits for their first need of the thread (see
    /// [`Deferred`]), by thread: a pending write names only the thread.
    deferred: Mutex<HashMap<String, Weak<HeldLock>>>,
    /// New threads' takes sent alone, waiting for the session: whoever gets it next sends them
    /// all in one statement (see [`PostgresCheckpointer::take_together`]).
    takes: Mutex<Vec<TakeJob>>,
    /// Statements that carried several takes.
    #[cfg(test)]
    take_batches: AtomicU64,
    /// Flushes of [`Self::unlocks`] scheduled.
    #[cfg(test)]
    flushes: AtomicU64,
}

/// How long a dropped lease's lock may wait for a lease statement to carry its unlock before it
/// is sent alone: a runner that takes its next thread at once saves a round trip per run. One
/// flush serves every drop until it fires, so a runner busy with runs shorter than this arms a
/// timer (a wake-up of another worker thread each way) once per delay, not once per run.
const UNLOCK_DELAY: Duration = Duration::from_millis(10);

impl LeaseSession {
    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<i64, u64>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens the session anew (a new generation: the old one's locks are gone) if it is gone.
    async fn connect_if_gone(&self, session: &mut (u64, Option<PgConnection>)) -> std::result::Result<(), sqlx::Error> {
        if session.1.is_none() {
            let conn = self.options.connect().await?;
            session.0 += 1;
            session.1 = Some(conn);
        }
        Ok(())
    }

    fn takes(&self) -> std::sync::MutexGuard<'_, Vec<TakeJob>> {
        self.takes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The lease of a new thread whose take was deferred and not sent yet.
    fn deferred_for(&self, thread: &str) -> Option<Arc<HeldLock>> {
        let deferred = self.deferred.lock().unwrap_or_else(PoisonError::into_inner);
        if deferred.is_empty() {
            return None;
        }
        deferred.get(thread)?.upgrade()
    }

    /// Takes the keys waiting to be unlocked on the session of `generation` (those of an older
    /// session went with it).
    fn take_unlocks(&self, generation: u64) -> Vec<i64> {
        let mut unlocks = self.unlocks.lock().unwrap_or_else(PoisonError::into_inner);
        let keys = unlocks.iter().filter(|(_, g)| *g == generation).map(|(key, _)| *key).collect();
        unlocks.clear();
        keys
    }

    /// Takes one key waiting to be unlocked on the session of `generation`, for a statement that
    /// carries a single unlock; the others wait for the next lease statement or the flush a drop
    /// schedules ([`UNLOCK_DELAY`]). Keys of an older session are dropped: they went with it.
    fn take_unlock(&self, generation: u64) -> Option<i64> {
        let mut unlocks = self.unlocks.lock().unwrap_or_else(PoisonError::into_inner);
        unlocks.retain(|(_, g)| *g == generation);
        unlocks.pop().map(|(key, _)| key)
    }

    /// Queues a dropped lease's unlock for the next lease statement, and makes sure a flush will
    /// send it within [`UNLOCK_DELAY`] if none does.
    fn unlock_later(self: &Arc<Self>, key: i64, generation: u64) {
        self.unlocks.lock().unwrap_or_else(PoisonError::into_inner).push((key, generation));
        if self.flush_armed.swap(true, Ordering::SeqCst) {
            return; // the flush scheduled takes this key too
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to wait in: the next lease statement carries the key.
            self.flush_armed.store(false, Ordering::SeqCst);
            return;
        };
        let armed = ArmedFlush(Arc::clone(self));
        #[cfg(test)]
        self.flushes.fetch_add(1, Ordering::Relaxed);
        runtime.spawn(async move {
            tokio::time::sleep(UNLOCK_DELAY).await;
            let session = Arc::clone(&armed.0);
            // Disarmed before the keys are taken: a drop from now on schedules a flush of its own.
            drop(armed);
            session.flush_unlocks().await;
        });
    }

    /// Unlocks the keys of dropped leases that no lease statement carried.
    async fn flush_unlocks(&self) {
        // Usually a lease statement carried them already: then the session is not touched (its
        // lock is held by every commit in flight on it, and waiting for it costs wake-ups).
        if self.unlocks.lock().unwrap_or_else(PoisonError::into_inner).is_empty() {
            return;
        }
        let mut guard = self.conn.lock().await;
        let keys = self.take_unlocks(guard.0);
        if keys.is_empty() {
            return;
        }
        if let Some(conn) = guard.1.as_mut() {
            let unlocked =
                sqlx::query("SELECT pg_advisory_unlock(k) FROM unnest($1::int8[]) AS k").bind(keys).execute(conn).await;
            if unlocked.is_err() {
                guard.1 = None; // a broken session: its locks are gone with it
            }
        }
    }
}

/// A scheduled flush of a lease session's unlocks ([`LeaseSession::unlock_later`]): dropped when
/// it fires, or with its runtime, it disarms the flush.
struct ArmedFlush(Arc<LeaseSession>);

impl Drop for ArmedFlush {
    fn drop(&mut self) {
        self.0.flush_armed.store(false, Ordering::SeqCst);
    }
}

/// A lease's lock: dropping it releases the advisory lock.
struct HeldLock {
    session: Arc<LeaseSession>,
    key: i64,
    /// The lease session's generation that holds the lock; 0 while a deferred take is not sent.
    generation: AtomicU64,
    /// The thread's row id, if the lease learnt it after it was made (a deferred take's).
    tid: OnceLock<i64>,
    /// A new thread's take, deferred (see [`Checkpointer::begin_new`]).
    deferred: Option<Deferred>,
    /// The heads this lease knows: while it holds the lock no other runner commits to the thread,
    /// so each head it committed or read stays the head until its next commit.
    heads: Mutex<KnownHeads>,
    /// Whether something this lease stored may not be durable yet: its take, or a lazy commit
    /// ([`Checkpointer::commit_lazy`]), with no durable commit since.
    unflushed: AtomicBool,
}

/// A new thread's take and admission, not sent yet: they go with the run's first step commit
/// ([`TAKE_NEW_STEP_SQL`]), or alone ([`TAKE_NEW_SQL`]) when something else needs the thread
/// stored first (a pending write, a commit that cannot go with them, the run's flush).
///
/// Safe to run the first step before the take because nobody else can name the thread: its id
/// was minted for this run ([`crate::Graph::new_thread`]). A runner that took the thread
/// meanwhile (someone was told the id after all) holds its lock: the take is refused.
struct Deferred {
    thread: String,
    graph: GraphIdentity,
    owner: String,
    admission: StepCommit,
    /// Held while the take is sent: one sender at a time.
    sending: tokio::sync::Mutex<()>,
    /// Whether the take went through.
    taken: AtomicBool,
}

/// A run's first step commit that goes with a new thread's take ([`TAKE_NEW_STEP_SQL`]), its
/// blobs in its row, and the row's body and metadata encoded.
type FirstStep<'c> = (&'c StepCommit, InlineBlobs<'c>, (Vec<u8>, String));

impl Deferred {
    /// `first` as it goes with the take, if it can: a commit in the thread's root namespace on
    /// the admission, whose blobs all fit in its row.
    fn first_step<'c>(&self, first: Option<&'c StepCommit>) -> Result<Option<FirstStep<'c>>> {
        let Some(commit) = first else { return Ok(None) };
        let fits = commit.ns.is_empty()
            && commit.thread == self.thread
            && commit.checkpoint.expected_head == Some(self.admission.checkpoint.id);
        let Some(blobs) = inline_blobs(commit).filter(|_| fits) else { return Ok(None) };
        Ok(Some((commit, blobs, encode_row(&commit.checkpoint)?)))
    }

    /// What its take binds, encoded, about: the thread's names and the admission's row (whose
    /// body and metadata are given encoded).
    fn encoded_bytes(&self, body: &[u8], metadata: &str) -> usize {
        self.thread.len()
            + self.graph.name.len()
            + self.graph.hash.len()
            + self.owner.len()
            + row_bytes(body, metadata, &self.admission)
    }
}

/// Heads of a thread known to its lease holder, and where no pending write is stored.
///
/// A commit folds its parent's pending writes (deletes them, and older ones). When none can be
/// stored, the delete is left out of the statement. Writes are counted by the checkpointer
/// ([`PostgresCheckpointer::writes_seen`]: each one stored or read through it): a namespace is
/// clean if nothing was counted since its last commit, which folded all there were then. A
/// worker of another process may still store a write for a checkpoint this runner made; the
/// runner never reads those (it ran the step's tasks itself), and a later folding commit, a
/// prune or the thread's deletion removes them.
#[derive(Default)]
struct KnownHeads {
    /// The write count when this lease created the thread (`None`: it did not, or a refused
    /// commit left the heads unknown): a namespace not in `heads` has no checkpoint, and no
    /// pending write while the count is still this.
    born: Option<u64>,
    /// Namespace -> what is known of it.
    heads: HashMap<String, Known>,
}

/// A namespace's head (`None`: no checkpoint), and the write count at which it was known to
/// hold no pending write (`None`: not known).
#[derive(Clone, Copy)]
struct Known {
    head: Option<u64>,
    clean_at: Option<u64>,
}

/// The lease's lock, if the lease is one of PostgreSQL's.
fn held_lock(lease: &Lease) -> Option<&HeldLock> {
    lease.guard::<Arc<HeldLock>>().map(|held| &**held)
}

/// The thread's row id, if the lease knows it.
fn tid_of(lease: &Lease) -> Option<i64> {
    lease.handle.or_else(|| held_lock(lease)?.tid.get().copied())
}

impl HeldLock {
    /// Whether the lease is a new thread's whose take was not sent yet.
    fn is_deferred(&self) -> bool {
        self.deferred.as_ref().is_some_and(|deferred| !deferred.taken.load(Ordering::Acquire))
    }

    fn heads(&self) -> std::sync::MutexGuard<'_, KnownHeads> {
        self.heads.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `expected` is known to be the head of `ns`, and whether a commit there must fold
    /// pending writes, the checkpointer's write count being `seen`.
    fn knows_head(&self, ns: &str, expected: Option<u64>, seen: u64) -> (bool, bool) {
        let heads = self.heads();
        match heads.heads.get(ns) {
            Some(known) => (known.head == expected, known.clean_at != Some(seen)),
            None => (heads.born.is_some() && expected.is_none(), heads.born != Some(seen)),
        }
    }

    /// Records the outcome of a commit: its checkpoint is the head, and (`clean_at`, the write
    /// count read before the statement) nothing was stored there since a fold; or (`None`) the
    /// head is unknown until a commit checks it.
    fn settle(&self, ns: &str, head: Option<u64>, clean_at: Option<u64>) {
        let mut heads = self.heads();
        if let Some(id) = head {
            heads.heads.insert(ns.to_owned(), Known { head: Some(id), clean_at });
        } else {
            heads.born = None;
            heads.heads.remove(ns);
        }
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        if let Some(deferred) = &self.deferred {
            let mut waiting = self.session.deferred.lock().unwrap_or_else(PoisonError::into_inner);
            if waiting.get(&deferred.thread).is_some_and(|w| w.strong_count() == 0) {
                waiting.remove(&deferred.thread);
            }
        }
        let generation = *self.generation.get_mut();
        if generation == 0 {
            return; // never taken: no lock to release
        }
        {
            let mut held = self.session.held();
            if held.get(&self.key) == Some(&generation) {
                held.remove(&self.key);
            }
        }
        self.session.unlock_later(self.key, generation);
    }
}

#[derive(sqlx::FromRow)]
struct Verdict {
    n: i64,
    epoch: Option<i64>,
    head: Option<i64>,
    stored: bool,
}

/// One commit, as bound into the commit statement.
struct Batch {
    thread: Vec<String>,
    handle: Vec<Option<i64>>,
    ns: Vec<String>,
    epoch: Vec<i64>,
    id: Vec<i64>,
    parent: Vec<Option<i64>>,
    expected: Vec<Option<i64>>,
    step: Vec<i64>,
    source: Vec<&'static str>,
    body: Vec<Vec<u8>>,
    metadata: Vec<String>,
    /// Each commit's own blobs (versions of its checkpoint) are `own_*[lo..=hi]` (1-based;
    /// `hi < lo`: none), stored in its row.
    own_lo: Vec<i32>,
    own_hi: Vec<i32>,
    own_channel: Vec<String>,
    own_base: Vec<Option<i64>>,
    own_data: Vec<Vec<u8>>,
    /// Other blobs, each with its commit's position, stored in `channel_values`.
    blob_n: Vec<i64>,
    blob_channel: Vec<String>,
    blob_version: Vec<i64>,
    blob_base: Vec<Option<i64>>,
    blob_data: Vec<Vec<u8>>,
}

/// A PostgreSQL statement with its arguments bound.
type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, PgArguments>;

impl Batch {
    /// Binds what both batch statements take last: each commit's slice of its own blobs (`lo`,
    /// `hi`, 1-based) and the flat arrays the slices cut (channel, base, bytes).
    fn bind_own<'q>(&'q self, query: PgQuery<'q>) -> PgQuery<'q> {
        query.bind(&self.own_lo).bind(&self.own_hi).bind(&self.own_channel).bind(&self.own_base).bind(&self.own_data)
    }

    /// What its arrays take encoded, about: the variable-length values, plus 12 bytes (a length
    /// prefix and an 8-byte value) per element of each array: 13 arrays with an element per
    /// commit, 3 per own blob and 5 per other blob.
    fn encoded_bytes(&self) -> usize {
        let strings = |v: &[String]| v.iter().map(String::len).sum::<usize>();
        let bytes = |v: &[Vec<u8>]| v.iter().map(Vec::len).sum::<usize>();
        strings(&self.thread)
            + strings(&self.ns)
            + strings(&self.metadata)
            + strings(&self.own_channel)
            + strings(&self.blob_channel)
            + bytes(&self.body)
            + bytes(&self.own_data)
            + bytes(&self.blob_data)
            + 12 * (13 * self.thread.len() + 3 * self.own_data.len() + 5 * self.blob_data.len())
    }

    fn new(commits: &[(&Lease, &StepCommit)]) -> Result<Self> {
        let blobs = commits.iter().map(|(_, c)| c.blobs.len()).sum();
        let mut batch = Batch {
            thread: Vec::with_capacity(commits.len()),
            handle: Vec::with_capacity(commits.len()),
            ns: Vec::with_capacity(commits.len()),
            epoch: Vec::with_capacity(commits.len()),
            id: Vec::with_capacity(commits.len()),
            parent: Vec::with_capacity(commits.len()),
            expected: Vec::with_capacity(commits.len()),
            step: Vec::with_capacity(commits.len()),
            source: Vec::with_capacity(commits.len()),
            body: Vec::with_capacity(commits.len()),
            metadata: Vec::with_capacity(commits.len()),
            own_lo: Vec::with_capacity(commits.len()),
            own_hi: Vec::with_capacity(commits.len()),
            own_channel: Vec::with_capacity(blobs),
            own_base: Vec::with_capacity(blobs),
            own_data: Vec::with_capacity(blobs),
            blob_n: Vec::new(),
            blob_channel: Vec::new(),
            blob_version: Vec::new(),
            blob_base: Vec::new(),
            blob_data: Vec::new(),
        };
        for (n, (lease, commit)) in commits.iter().enumerate() {
            let ckpt = &commit.checkpoint;
            batch.thread.push(commit.thread.clone());
            batch.handle.push(tid_of(lease));
            batch.ns.push(commit.ns.clone());
            batch.epoch.push(lease.epoch as i64);
            batch.id.push(ckpt.id as i64);
            batch.parent.push(ckpt.parent.map(|p| p as i64));
            batch.expected.push(ckpt.expected_head.map(|h| h as i64));
            batch.step.push(ckpt.step as i64);
            batch.source.push(ckpt.source.as_str());
            let (body, metadata) = encode_row(ckpt)?;
            batch.body.push(body);
            batch.metadata.push(metadata);
            batch.own_lo.push(batch.own_channel.len() as i32 + 1);
            for blob in commit.blobs.iter().filter(|b| b.version == ckpt.id) {
                batch.own_channel.push(blob.channel.clone());
                batch.own_base.push(blob.base.map(|b| b as i64));
                batch.own_data.push(blob.data.clone());
            }
            batch.own_hi.push(batch.own_channel.len() as i32);
            for blob in commit.blobs.iter().filter(|b| b.version != ckpt.id) {
                batch.blob_n.push(n as i64 + 1);
                batch.blob_channel.push(blob.channel.clone());
                batch.blob_version.push(blob.version as i64);
                batch.blob_base.push(blob.base.map(|b| b as i64));
                batch.blob_data.push(blob.data.clone());
            }
        }
        Ok(batch)
    }
}

/// Commits a batch: one row of arrays per commit (`n` is its 1-based position), blobs flattened
/// with the position of their commit. Returns the positions of the commits that went through.
///
/// Under READ COMMITTED:
/// - `fenced` locks each thread row FOR SHARE and keeps the commits whose epoch is current. The
///   row is found by the lease's `tid` (by name only for a lease built by hand), in a lateral
///   primary-key probe per commit: a join would let the generic plan, made while `threads` was
///   small, hash it with a sequential scan for as long as the connection lives. An acquire's
///   epoch bump (an UPDATE) waits for this statement, and this statement waits for a
///   bump in flight, then re-checks the epoch on the bumped row.
/// - `won` keeps the commits that build on their namespace's head (its newest checkpoint, none
///   for a namespace's first). Only the lease's holder commits to a thread, one commit at a time,
///   so nothing moves the head between this check and the insert.
/// - Checkpoints and blobs are inserted only for the commits that won (replacing rows of the
///   same key, as the memory backend does). A commit's own blobs (versions of its checkpoint)
///   go in its row: a slice `lo..hi` of flat arrays (arrays of arrays must be rectangular).
///   Others (a durability "exit" flush also writes versions of the steps it held back) go to
///   `channel_values`.
/// - `folded` deletes the pending writes of the parent and older checkpoints of the namespace,
///   now folded into the new checkpoint. The older ones are writes that raced the previous
///   commit: a `put_writes` that checked the head before that commit landed, and stored after it.
const COMMIT_SQL: &str = r"
WITH input AS (
    SELECT *
    FROM unnest($1::text[], $2::int8[], $3::text[], $4::int8[], $5::int8[], $6::int8[], $7::int8[], $8::int8[],
                $9::text[], $10::bytea[], $11::text[], $17::int4[], $18::int4[])
        WITH ORDINALITY AS c(thread_id, handle, ns, epoch, id, parent, expected, step, source, body, metadata, lo, hi, n)
),
fenced AS (
    SELECT c.*, t.tid
    FROM input c
        CROSS JOIN LATERAL (
            SELECT t.tid FROM agentic.threads t
            WHERE t.tid = coalesce(c.handle, (SELECT u.tid FROM agentic.threads u WHERE u.thread_id = c.thread_id))
                AND t.epoch = c.epoch
            FOR SHARE
        ) t
),
won AS (
    SELECT f.* FROM fenced f
    WHERE (SELECT max(k.id) FROM agentic.checkpoints k WHERE k.tid = f.tid AND k.ns = f.ns) IS NOT DISTINCT FROM f.expected
),
saved AS (
    INSERT INTO agentic.checkpoints (tid, ns, id, parent, step, source, body, metadata, channels, bases, data)
    SELECT w.tid, w.ns, w.id, w.parent, w.step, w.source, w.body, w.metadata::jsonb,
           CASE WHEN w.hi >= w.lo THEN ($19::text[])[w.lo:w.hi] END,
           CASE WHEN w.hi >= w.lo THEN ($20::int8[])[w.lo:w.hi] END,
           CASE WHEN w.hi >= w.lo THEN ($21::bytea[])[w.lo:w.hi] END
    FROM won w
    ON CONFLICT (tid, ns, id) DO UPDATE
    SET parent = excluded.parent, step = excluded.step, source = excluded.source, body = excluded.body,
        metadata = excluded.metadata, created_at = excluded.created_at,
        channels = excluded.channels, bases = excluded.bases, data = excluded.data
),
blobs AS (
    INSERT INTO agentic.channel_values (tid, ns, channel, version, base, data)
    SELECT w.tid, w.ns, b.channel, b.version, b.base, b.data
    FROM unnest($12::int8[], $13::text[], $14::int8[], $15::int8[], $16::bytea[])
            AS b(n, channel, version, base, data)
        JOIN won w USING (n)
    ON CONFLICT (tid, ns, channel, version) DO UPDATE SET base = excluded.base, data = excluded.data
),
folded AS (
    DELETE FROM agentic.writes x
    USING won w
    WHERE x.tid = w.tid AND x.ns = w.ns AND x.checkpoint <= w.parent
)
SELECT n FROM won
";

/// [`COMMIT_SQL`] for a batch whose every commit may go lean (see [`lean`]): the fence, then the insert of
/// the rows, no more. No head check (each lease knows its head), no fold (none has a pending
/// write), no `channel_values` (every blob is in its row), no `ON CONFLICT` (a row of the same
/// key would be a head the lease does not know: the statement fails, and the batch is committed
/// one by one through [`SOLO_COMMIT_SQL`], which explains it). Each commit's `tid` is its lease's
/// (`$1`). Returns `(tid, ns)` per row stored; a commit not among them was fenced out.
///
/// At 64 threads this is nearly every commit: the three CTEs it leaves out cost each statement
/// their executor set-up and each row a head probe, a speculative insertion and a delete probe.
const COMMIT_LEAN_SQL: &str = r"
INSERT INTO agentic.checkpoints (tid, ns, id, parent, step, source, body, metadata, channels, bases, data)
SELECT t.tid, c.ns, c.id, c.parent, c.step, c.source, c.body, c.metadata::jsonb,
       CASE WHEN c.hi >= c.lo THEN ($12::text[])[c.lo:c.hi] END,
       CASE WHEN c.hi >= c.lo THEN ($13::int8[])[c.lo:c.hi] END,
       CASE WHEN c.hi >= c.lo THEN ($14::bytea[])[c.lo:c.hi] END
FROM unnest($1::int8[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $6::int8[], $7::text[], $8::bytea[],
            $9::text[], $10::int4[], $11::int4[])
        AS c(handle, ns, epoch, id, parent, step, source, body, metadata, lo, hi)
    CROSS JOIN LATERAL (
        SELECT t.tid FROM agentic.threads t WHERE t.tid = c.handle AND t.epoch = c.epoch FOR SHARE
    ) t
RETURNING tid, ns
";

/// [`COMMIT_SQL`] for one commit (the lease's session gone, or a lease built by hand) whose
/// blobs are all versions of its own checkpoint: scalars instead of arrays, and the blobs in the
/// checkpoint row (`$5`..`$13`, as [`bind_row`] binds them). The same fence, head check (`$14`)
/// and fold; the count is 1 if it went through.
const SOLO_COMMIT_SQL: &str = r"
WITH fenced AS (
    SELECT t.tid FROM agentic.threads t
    WHERE t.tid = coalesce($2, (SELECT u.tid FROM agentic.threads u WHERE u.thread_id = $1)) AND t.epoch = $4
    FOR SHARE
),
won AS (
    SELECT f.tid FROM fenced f
    WHERE (SELECT max(k.id) FROM agentic.checkpoints k WHERE k.tid = f.tid AND k.ns = $3) IS NOT DISTINCT FROM $14
),
saved AS (
    INSERT INTO agentic.checkpoints (tid, ns, id, parent, step, source, body, metadata, channels, bases, data)
    SELECT w.tid, $3, $5, $6, $7, $8, $9, $10::jsonb, $11, $12, $13 FROM won w
    ON CONFLICT (tid, ns, id) DO UPDATE
    SET parent = excluded.parent, step = excluded.step, source = excluded.source, body = excluded.body,
        metadata = excluded.metadata, created_at = excluded.created_at,
        channels = excluded.channels, bases = excluded.bases, data = excluded.data
),
folded AS (
    DELETE FROM agentic.writes x
    USING won w
    WHERE x.tid = w.tid AND x.ns = $3 AND x.checkpoint <= $6
)
SELECT count(*) FROM won
";

/// A commit on the lease session, which holds the thread's advisory lock: no other runner holds
/// the thread while this statement runs (a lock dies only with its session, after the session's
/// statement), so the lock is the fence and no row is locked. What is left of a commit is one
/// insert, of the checkpoint with its blobs (`$9`..`$11`), if the thread still exists and the
/// head is still the one the step built on (`$12`; `max` is a backward probe of the primary key),
/// and the fold of the parent's pending writes (and of older ones that raced the previous
/// commit). The count is 1 if the commit went through.
const LEASED_COMMIT_SQL: &str = r"
WITH saved AS (
    INSERT INTO agentic.checkpoints (tid, ns, id, parent, step, source, body, metadata, channels, bases, data)
    SELECT t.tid, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10, $11
    FROM agentic.threads t
    WHERE t.tid = $1
        AND (SELECT max(k.id) FROM agentic.checkpoints k WHERE k.tid = $1 AND k.ns = $2) IS NOT DISTINCT FROM $12
    RETURNING tid
),
folded AS (
    DELETE FROM agentic.writes x USING saved s WHERE x.tid = s.tid AND x.ns = $2 AND x.checkpoint <= $4
)
SELECT count(*) FROM saved
";

/// The insert of [`LEASED_APPEND_SQL`] and [`LEASED_INSERT_SQL`].
macro_rules! leased_insert {
    () => {
        r"INSERT INTO agentic.checkpoints (tid, ns, id, parent, step, source, body, metadata, channels, bases, data)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10, $11)"
    };
}

/// [`LEASED_COMMIT_SQL`] when the lease knows the head is the one the step built on (see
/// [`KnownHeads`]): nothing to check, so the insert of the row and the fold are all there is.
const LEASED_APPEND_SQL: &str = concat!(
    r"WITH folded AS (
    DELETE FROM agentic.writes x WHERE x.tid = $1 AND x.ns = $2 AND x.checkpoint <= $4
)
",
    leased_insert!()
);

/// [`LEASED_APPEND_SQL`] when the lease also knows no pending write is stored in the namespace
/// (see [`KnownHeads`]): the insert alone. The delete of nothing cost a step a tenth of its
/// commit statement.
const LEASED_INSERT_SQL: &str = leased_insert!();

/// The insert of [`LEASED_APPEND_LAZY_SQL`] and [`LEASED_INSERT_LAZY_SQL`]: [`leased_insert!`]'s
/// row, selected from the `lazy` CTE so that it runs, which switches `synchronous_commit` off
/// for this transaction only.
macro_rules! leased_insert_lazy {
    () => {
        r"lazy AS (
    SELECT set_config('synchronous_commit', 'off', true)
)
INSERT INTO agentic.checkpoints (tid, ns, id, parent, step, source, body, metadata, channels, bases, data)
SELECT $1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10, $11 FROM lazy"
    };
}

/// [`LEASED_APPEND_SQL`] committed without waiting for the WAL flush
/// ([`Checkpointer::commit_lazy`]).
const LEASED_APPEND_LAZY_SQL: &str = concat!(
    r"WITH folded AS (
    DELETE FROM agentic.writes x WHERE x.tid = $1 AND x.ns = $2 AND x.checkpoint <= $4
),
",
    leased_insert_lazy!()
);

/// [`LEASED_INSERT_SQL`] committed without waiting for the WAL flush
/// ([`Checkpointer::commit_lazy`]).
const LEASED_INSERT_LAZY_SQL: &str = concat!("WITH ", leased_insert_lazy!());

/// Makes everything committed before it durable: a transaction that writes commits durably
/// (`synchronous_commit` on), and its WAL flush covers every commit logged before it. One that
/// writes nothing would not wait for a flush.
const FLUSH_SQL: &str = "UPDATE agentic.threads SET updated_at = now() WHERE tid = $1";

/// The blobs of a commit as the checkpoint row's arrays (channels, bases, bytes; `None` if there
/// are none), if every one is a version of that checkpoint: a commit flushing several held
/// steps (durability "exit") also writes versions of the steps before.
fn inline_blobs(commit: &StepCommit) -> Option<InlineBlobs<'_>> {
    let id = commit.checkpoint.id;
    if commit.blobs.iter().any(|b| b.version != id) {
        return None;
    }
    if commit.blobs.is_empty() {
        return Some((None, None, None));
    }
    Some((
        Some(commit.blobs.iter().map(|b| b.channel.as_str()).collect()),
        Some(commit.blobs.iter().map(|b| b.base.map(|v| v as i64)).collect()),
        Some(commit.blobs.iter().map(|b| b.data.as_slice()).collect()),
    ))
}

/// A checkpoint's body and metadata as stored: MessagePack bytes, and JSON text for the `jsonb`
/// column.
fn encode_row(ckpt: &NewCheckpoint) -> Result<(Vec<u8>, String)> {
    Ok((super::codec::encode_body(&ckpt.body)?, super::codec::json_text(&*ckpt.metadata)?))
}

/// Arguments for a statement of `params` parameters whose values take about `bytes` once
/// encoded. Values bound into empty arguments grow their buffers several times a statement: with
/// the room reserved, a PostgreSQL node-step of the benchmark's chain takes 46.0k client
/// instructions instead of 48.4k (callgrind).
fn arguments(params: usize, bytes: usize) -> PgArguments {
    let mut arguments = PgArguments::default();
    // Each value adds a 4-byte length; an array, a header and a length per element.
    arguments.reserve(params, bytes + params * 32);
    arguments
}

/// What a checkpoint row's payloads take encoded: its body, its metadata and its values.
fn row_bytes(body: &[u8], metadata: &str, commit: &StepCommit) -> usize {
    body.len() + metadata.len() + commit.blobs.iter().map(|b| b.data.len() + b.channel.len() + 16).sum::<usize>()
}

/// The arrays [`inline_blobs`] binds.
type InlineBlobs<'a> = (Option<Vec<&'a str>>, Option<Vec<Option<i64>>>, Option<Vec<&'a [u8]>>);

/// Binds a checkpoint row with its blobs in the order the one-commit statements take them: id,
/// parent, step, source, body, metadata, channels, bases, data.
fn bind_row<'q>(
    query: PgQuery<'q>,
    ckpt: &NewCheckpoint,
    body: &[u8],
    metadata: &str,
    (channels, bases, data): InlineBlobs<'q>,
) -> PgQuery<'q> {
    query
        .bind(ckpt.id as i64)
        .bind(ckpt.parent.map(|p| p as i64))
        .bind(ckpt.step as i64)
        .bind(ckpt.source.as_str())
        .bind(body)
        .bind(metadata)
        .bind(channels)
        .bind(bases)
        .bind(data)
}

/// The lock and the thread upsert of [`TAKE_SQL`] and [`TAKE_ADMIT_SQL`].
macro_rules! take_ctes {
    () => {
        r"
WITH lock AS (
    SELECT pg_try_advisory_lock($6) AS locked, set_config('synchronous_commit', 'off', true) AS async
),
unlocked AS (
    SELECT count(pg_advisory_unlock(k)) AS n FROM unnest($7::int8[]) AS k
),
bumped AS (
    INSERT INTO agentic.threads (thread_id, graph_name, graph_hash, owner, epoch)
    SELECT $1, $2, $3, $4, 1 FROM lock WHERE locked
    ON CONFLICT (thread_id) DO UPDATE
    SET epoch = threads.epoch + 1, owner = excluded.owner, updated_at = now(),
        graph_name = excluded.graph_name, graph_hash = excluded.graph_hash
    WHERE $5 OR (threads.graph_name = excluded.graph_name AND threads.graph_hash = excluded.graph_hash)
    RETURNING tid, epoch
)"
    };
}

/// Takes a thread's lock (`$6`) and, if it got it, the thread: creates it or bumps its epoch,
/// unless another graph owns it and no change is allowed (`$5`). One round trip, which also
/// unlocks the locks of this session's dropped leases (`$7`; session locks count, so a key
/// locked again here stays held).
///
/// Committed without waiting for the WAL flush (`synchronous_commit` off for this transaction
/// only): a bump or admission lost in a server crash takes with it every later commit of its
/// holder (the WAL is flushed in order, so the holder's first durable commit makes it durable
/// too), and that holder's next commits are refused as fenced. No step is reported done before
/// one of its own commits is durable, and a run that ends before any flushes
/// ([`Checkpointer::flush`]). Safe, and one fsync less per acquire. The upsert
/// works on the newest thread row (it waits for a commit holding it FOR SHARE); the highest
/// checkpoint id is read by the next statement, whose snapshot sees that commit.
const TAKE_SQL: &str = concat!(
    take_ctes!(),
    "\nSELECT lock.locked, bumped.tid, bumped.epoch FROM lock CROSS JOIN unlocked LEFT JOIN bumped ON true"
);

/// [`TAKE_SQL`] that also stores a run's first checkpoint (`$8`..`$15`: id, step, source, body,
/// metadata, and its values' channels, bases and bytes) if the thread row was just
/// inserted (epoch 1: a new `tid`, so no checkpoint of it can exist): a new thread's lease and
/// admission in one round trip and one WAL flush. Nothing is stored for a thread that already
/// existed.
const TAKE_ADMIT_SQL: &str = concat!(
    take_ctes!(),
    r",
fresh AS (
    SELECT tid FROM bumped WHERE epoch = 1
),
saved AS (
    INSERT INTO agentic.checkpoints (tid, ns, id, parent, step, source, body, metadata, channels, bases, data)
    SELECT tid, '', $8, NULL, $9, $10, $11, $12::jsonb, $13, $14, $15 FROM fresh
)
SELECT lock.locked, bumped.tid, bumped.epoch FROM lock CROSS JOIN unlocked LEFT JOIN bumped ON true"
);

/// A new thread's take ([`TAKE_NEW_SQL`], [`TAKE_NEW_STEP_SQL`]): the lock (`$5`), the unlock of
/// one dropped lease of this session (`$6`, or null), the thread row (`$1`..`$4`, epoch 1) unless
/// a thread of that id exists, and with it the admission (`$7`..`$15`: id, parent, step, source,
/// body, metadata, and its values' channels, bases and bytes), and `$rows` more rows. It returns
/// the new `tid` once per row stored, nothing if it made no thread; whether it got the lock and
/// which thread of that id existed are read only then ([`FOUND_NEW_SQL`]).
///
/// The insert of the checkpoints is the statement itself, not a CTE under a final select: every
/// plan node costs each execution its set-up (`ExecInitNode`), and a join of the lock with the
/// thread row and an aggregate over an array of unlocks cost a new thread's take 20 to 60 µs of
/// server CPU (both shapes replayed by pgbench; see `benches/LEVERS.md`).
macro_rules! take_new {
    ($lock:literal, $rows:literal) => {
        concat!(
            "WITH lock AS (\n    SELECT pg_try_advisory_lock($5) AS locked, pg_advisory_unlock($6) AS unlocked",
            $lock,
            r"
),
made AS (
    INSERT INTO agentic.threads (thread_id, graph_name, graph_hash, owner, epoch)
    SELECT $1, $2, $3, $4, 1 FROM lock WHERE locked
    ON CONFLICT (thread_id) DO NOTHING
    RETURNING tid
)
INSERT INTO agentic.checkpoints (tid, ns, id, parent, step, source, body, metadata, channels, bases, data)
SELECT made.tid, '', r.* FROM made, (VALUES ($7, $8, $9, $10, $11, $12::jsonb, $13, $14, $15)",
            $rows,
            r") AS r
RETURNING tid"
        )
    };
}

/// A new thread's deferred take (see [`Deferred`]) alone: its lock, its row and its admission,
/// committed without waiting for the WAL flush as [`TAKE_SQL`] is.
const TAKE_NEW_SQL: &str = take_new!(", set_config('synchronous_commit', 'off', true) AS async", "");

/// [`TAKE_NEW_SQL`] with the run's first step commit (`$16`..`$24`, as `$7`..`$15`), in the same
/// insert, durably: a new thread's run starts with no round trip of its own.
const TAKE_NEW_STEP_SQL: &str = take_new!("", ", ($16, $17, $18, $19, $20, $21::jsonb, $22, $23, $24)");

/// [`TAKE_NEW_SQL`] for several new threads (see [`PostgresCheckpointer::take_together`]): one
/// row of arrays per take (`n`, its 1-based position: the thread's names, its lock's key and its
/// admission, whose values are a slice `lo..hi` of `$14`..`$16`), the unlocks of dropped leases
/// of this session (`$17`), committed without waiting for the WAL flush. Each lock is tried once
/// (`lock` holds a volatile function: it is computed once, not inlined). Returns every take's
/// position, whether it got its lock, and the new `tid` if it made the thread.
const TAKE_NEW_BATCH_SQL: &str = r"
WITH input AS (
    SELECT *
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[], $7::int8[], $8::int8[],
                $9::text[], $10::bytea[], $11::text[], $12::int4[], $13::int4[])
        WITH ORDINALITY AS r(thread_id, graph_name, graph_hash, owner, key, id, parent, step, source, body, metadata, lo, hi, n)
),
lock AS (
    SELECT r.*, pg_try_advisory_lock(r.key) AS locked FROM input r
),
once AS (
    SELECT count(pg_advisory_unlock(k)) AS unlocked, set_config('synchronous_commit', 'off', true) AS async
    FROM unnest($17::int8[]) AS k
),
made AS (
    INSERT INTO agentic.threads (thread_id, graph_name, graph_hash, owner, epoch)
    SELECT l.thread_id, l.graph_name, l.graph_hash, l.owner, 1 FROM lock l WHERE l.locked
    ON CONFLICT (thread_id) DO NOTHING
    RETURNING tid, thread_id
),
saved AS (
    INSERT INTO agentic.checkpoints (tid, ns, id, parent, step, source, body, metadata, channels, bases, data)
    SELECT m.tid, '', l.id, l.parent, l.step, l.source, l.body, l.metadata::jsonb,
           CASE WHEN l.hi >= l.lo THEN ($14::text[])[l.lo:l.hi] END,
           CASE WHEN l.hi >= l.lo THEN ($15::int8[])[l.lo:l.hi] END,
           CASE WHEN l.hi >= l.lo THEN ($16::bytea[])[l.lo:l.hi] END
    FROM made m JOIN lock l USING (thread_id)
)
SELECT l.n, l.locked, m.tid FROM lock l LEFT JOIN made m USING (thread_id) CROSS JOIN once
";

/// The lease session while a statement of several takes is in flight: dropped before it is
/// marked done (`.1`), it closes the session (see [`PostgresCheckpointer::take_together`]).
struct CloseUnlessDone<'s>(&'s mut (u64, Option<PgConnection>), bool);

impl Drop for CloseUnlessDone<'_> {
    fn drop(&mut self) {
        if !self.1 {
            self.0.1 = None;
        }
    }
}

/// A new thread's take sent alone, waiting in [`LeaseSession::takes`] for a statement: what
/// [`TAKE_NEW_BATCH_SQL`] binds for it, owned, and where its answer goes (the new `tid` and the
/// session generation that holds its lock, if that statement made the thread).
struct TakeJob {
    thread: String,
    graph: GraphIdentity,
    owner: String,
    key: i64,
    id: i64,
    parent: Option<i64>,
    step: i64,
    source: &'static str,
    body: Vec<u8>,
    metadata: String,
    channels: Vec<String>,
    bases: Vec<Option<i64>>,
    data: Vec<Vec<u8>>,
    reply: oneshot::Sender<Option<(i64, u64)>>,
}

/// After a new thread's take made no row: whether this session holds the lease's lock (`$5`, an
/// advisory lock on a bigint key: its high and low halves as `classid` and `objid`, `objsubid`
/// 1), and the thread of that id (`$1`) if there is one: whether its first checkpoint is this very
/// admission (`ours`: id `$2`, metadata `$3`, which holds the take's random mark) and holds the
/// first step's checkpoint (`stepped`: id `$4`), i.e. whether it is the take's earlier try, whose
/// answer was lost.
const FOUND_NEW_SQL: &str = r"
SELECT EXISTS (SELECT 1 FROM pg_locks l
               WHERE l.locktype = 'advisory' AND l.pid = pg_backend_pid() AND l.granted AND l.objsubid = 1
                   AND l.classid = (($5 >> 32) & 4294967295)::oid AND l.objid = ($5 & 4294967295)::oid) AS locked,
    t.tid, t.epoch,
    EXISTS (SELECT 1 FROM agentic.checkpoints k
            WHERE k.tid = t.tid AND k.ns = '' AND k.id = $2 AND k.metadata = $3::jsonb) AS ours,
    EXISTS (SELECT 1 FROM agentic.checkpoints k WHERE k.tid = t.tid AND k.ns = '' AND k.id = $4) AS stepped
FROM (SELECT 1) AS one LEFT JOIN agentic.threads t ON t.thread_id = $1";

/// What [`FOUND_NEW_SQL`] read: the lock, and the thread that existed.
#[derive(sqlx::FromRow)]
struct FoundNew {
    locked: bool,
    tid: Option<i64>,
    epoch: Option<i64>,
    ours: bool,
    stepped: bool,
}

impl FoundNew {
    async fn read(
        conn: &mut PgConnection,
        thread: &str,
        admission: u64,
        metadata: &str,
        first: Option<u64>,
        key: i64,
    ) -> std::result::Result<Self, sqlx::Error> {
        sqlx::query_as(FOUND_NEW_SQL)
            .bind(thread)
            .bind(admission as i64)
            .bind(metadata)
            .bind(first.map(|id| id as i64))
            .bind(key)
            .fetch_one(conn)
            .await
    }
}

/// What [`PostgresCheckpointer::take`] got: the statement's answer, the highest checkpoint id,
/// the lease session's generation, and an existing thread's root head row.
struct Took {
    taken: Taken,
    max_seq: u64,
    generation: u64,
    head: Option<CheckpointRow>,
}

/// [`PostgresCheckpointer::max_seq_and_head`]'s row: the head's columns are null if there is none.
#[derive(sqlx::FromRow)]
struct SeqAndHead {
    max_seq: i64,
    id: Option<i64>,
    parent: Option<i64>,
    step: Option<i64>,
    source: Option<String>,
    body: Option<Vec<u8>>,
    metadata: Option<String>,
    created_us: Option<i64>,
}

/// What [`TAKE_SQL`] did: no `tid` with `locked` means another graph owns the thread.
#[derive(sqlx::FromRow)]
struct Taken {
    locked: bool,
    tid: Option<i64>,
    epoch: Option<i64>,
}

/// Why commits were refused: each one's thread epoch, head, and whether its checkpoint exists.
const VERDICT_SQL: &str = r"
SELECT c.n, t.epoch,
       (SELECT max(k.id) FROM agentic.checkpoints k WHERE k.tid = t.tid AND k.ns = c.ns) AS head,
       EXISTS (SELECT 1 FROM agentic.checkpoints k WHERE k.tid = t.tid AND k.ns = c.ns AND k.id = c.id) AS stored
FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[]) WITH ORDINALITY AS c(thread_id, ns, id, handle, n)
    LEFT JOIN agentic.threads t
        ON t.tid = coalesce(c.handle, (SELECT u.tid FROM agentic.threads u WHERE u.thread_id = c.thread_id))
";

/// What a refused commit turned out to be.
enum Refusal {
    /// Refused for good.
    Final(Error),
    /// A retry of a commit that went through.
    AlreadyDone,
    /// Nothing explains the refusal any more (the state changed since): try again.
    Retry,
}

impl PostgresCheckpointer {
    /// Connects a pool to `url` and brings the schema up to date.
    ///
    /// Errors never repeat the URL or its password.
    pub async fn connect(url: &str) -> Result<Self> {
        // Every statement of the runtime is a key probe or a key-range scan, whatever its
        // parameters. Generic plans: planning the commit statement anew for each step (the
        // server's default once array parameters change its row estimates) cost more than running
        // it. No sequential scans: a generic plan made while a table was nearly empty (a new
        // deployment) would otherwise scan it whole on every commit as it grows.
        let options = PgConnectOptions::from_str(url)
            .map_err(pg_error("connect"))?
            .options([("plan_cache_mode", "force_generic_plan"), ("enable_seqscan", "off")]);
        // One connection first: it fails at once with the cause (refused, authentication...),
        // where the pool would retry until its timeout and report only that.
        let probe = options.connect().await.map_err(pg_error("connect"))?;
        let _ = probe.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            // No ping before each use: it is a round trip of its own before every statement. A
            // connection that died while idle fails its statement with a connection error, which
            // is transient: the call is retried (`retry::store_call`) on a fresh connection.
            .test_before_acquire(false)
            .connect_lazy_with(options);
        Self::from_pool(pool).await
    }

    /// Uses an existing pool (for example the one `#[sqlx::test]` gives), bringing the schema up
    /// to date. Lease connections are opened with the pool's connection settings.
    ///
    /// [`PostgresCheckpointer::connect`] also sets `plan_cache_mode=force_generic_plan` and
    /// `enable_seqscan=off` on its connections (see there); a pool of your own commits faster with
    /// the same options.
    pub async fn from_pool(pool: PgPool) -> Result<Self> {
        MIGRATOR.run(&pool).await.map_err(|e| pg_error("migrate")(e.into()))?;
        let leases = Arc::new(LeaseSession {
            options: PgConnectOptions::clone(&pool.connect_options()),
            conn: tokio::sync::Mutex::new((0, None)),
            held: Mutex::default(),
            unlocks: Mutex::default(),
            flush_armed: AtomicBool::new(false),
            deferred: Mutex::default(),
            takes: Mutex::default(),
            #[cfg(test)]
            take_batches: AtomicU64::new(0),
            #[cfg(test)]
            flushes: AtomicU64::new(0),
        });
        let direct = PostgresCheckpointer {
            pool,
            leases,
            committer: None,
            in_flight: Arc::default(),
            writes_seen: Arc::default(),
            commit_conns: Arc::default(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let queue = Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..COMMITTERS {
            tokio::spawn(group_commits(direct.clone(), Arc::clone(&queue)));
        }
        Ok(PostgresCheckpointer { committer: Some(tx), ..direct })
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// [`Checkpointer::commit`], or with `lazy` [`Checkpointer::commit_lazy`]: lazy only on the
    /// lease's session, alone; anywhere else the commit is durable.
    async fn commit_with(&self, lease: &Lease, commit: &StepCommit, lazy: bool) -> Result<()> {
        if let Some(held) = held_lock(lease)
            && held.is_deferred()
        {
            // The commit goes with the take if it can go on the lease session (no other lease
            // there: see `leased_commit`); otherwise the take goes first, then the commit.
            let alone = !lazy && self.leases.held().is_empty();
            if self.send_deferred(held, Some(commit).filter(|_| alone)).await? {
                return Ok(());
            }
        }
        // The write count before the commit is sent: what its fold leaves known clean.
        let seen = self.writes_seen.load(Ordering::Acquire);
        if let Some(committer) = &self.committer {
            // No statement in flight: no other commit to share one with, so commit here rather
            // than hand over to a committer task (a wake-up of another worker thread each way).
            if let Some(_counted) = InFlight::enter_alone(&self.in_flight) {
                if let Some(result) = self.leased_commit(lease, commit, lazy).await {
                    return result;
                }
                let result = self.commit_batch(&[(lease, commit)]).await.pop().unwrap_or_else(|| Err(unanswered()));
                return settled(lease, commit, result, seen);
            }
            let (reply, answer) = oneshot::channel();
            let lean = lean(lease, commit, seen);
            // A minted thread's lease learnt its row id after it was made: the copy carries it.
            let lease_copy = lease.fencing_copy().with_handle(tid_of(lease));
            let job = CommitJob { lease: lease_copy, commit: commit.clone(), lean, reply };
            if committer.send(job).is_ok()
                && let Ok(result) = answer.await
            {
                return settled(lease, commit, result, seen);
            }
            // The committer is gone (its runtime shut down): commit directly.
        }
        let result = self.commit_batch(&[(lease, commit)]).await.pop().unwrap_or_else(|| Err(unanswered()));
        settled(lease, commit, result, seen)
    }

    /// Commits several super-steps, each as [`Checkpointer::commit`] would, in as few statements
    /// as possible: commits of different threads (or namespaces) share one statement, one round
    /// trip. Commits of the same namespace go in order, one per statement. Returns one result
    /// per commit, in order.
    pub async fn commit_batch(&self, commits: &[(&Lease, &StepCommit)]) -> Vec<Result<()>> {
        self.batch(commits, &[]).await
    }

    /// [`PostgresCheckpointer::commit_batch`], with what the leases know of each commit (`lean`,
    /// by position, see [`lean`]; missing: not lean).
    async fn batch(&self, commits: &[(&Lease, &StepCommit)], lean: &[bool]) -> Vec<Result<()>> {
        let mut results: Vec<Option<Result<()>>> = commits.iter().map(|_| None).collect();
        for round in rounds(commits) {
            let group: Vec<(&Lease, &StepCommit)> = round.iter().map(|&i| commits[i]).collect();
            let all_lean = round.iter().all(|&i| lean.get(i) == Some(&true));
            let outcomes = self.commit_round(&group, all_lean).await;
            for (i, outcome) in round.into_iter().zip(outcomes) {
                results[i] = Some(outcome);
            }
        }
        results.into_iter().map(|r| r.unwrap_or_else(|| Err(unanswered()))).collect()
    }

    /// Commits a group with at most one commit per (thread, namespace); its first statement is
    /// [`COMMIT_LEAN_SQL`] if `lean` (every commit may go lean), the others [`COMMIT_SQL`].
    async fn commit_round(&self, group: &[(&Lease, &StepCommit)], lean: bool) -> Vec<Result<()>> {
        let mut results: Vec<Option<Result<()>>> = group.iter().map(|_| None).collect();
        let mut pending: Vec<usize> = (0..group.len()).collect();
        // A refusal that the follow-up query cannot explain means the state changed between the
        // two; a few attempts settle it.
        for attempt in 0..3 {
            if pending.is_empty() {
                break;
            }
            let todo: Vec<(&Lease, &StepCommit)> = pending.iter().map(|&i| group[i]).collect();
            match self.run_commit(&todo, lean && attempt == 0).await {
                Ok(outcomes) => {
                    let mut retry = Vec::new();
                    for (&i, outcome) in pending.iter().zip(outcomes) {
                        match outcome {
                            Some(result) => results[i] = Some(result),
                            None => retry.push(i),
                        }
                    }
                    pending = retry;
                }
                Err(err) if todo.len() > 1 && !err.is_transient() => {
                    // One bad commit (say, an id stored twice) fails the whole statement: commit
                    // one by one so only it fails.
                    for &i in &pending {
                        let one = Box::pin(self.commit_round(&group[i..=i], false)).await;
                        results[i] = one.into_iter().next();
                    }
                    pending.clear();
                }
                Err(err) => {
                    for &i in &pending {
                        results[i] = Some(Err(clone_error(&err)));
                    }
                    pending.clear();
                }
            }
        }
        for i in pending {
            let (_, commit) = group[i];
            results[i] = Some(Err(Error::Checkpoint {
                backend: BACKEND,
                message: format!("commit of checkpoint {} refused without a cause", commit.checkpoint.id),
                transient: true,
            }));
        }
        results.into_iter().map(|r| r.unwrap_or_else(|| Err(unanswered()))).collect()
    }

    /// Runs the commit statement, then explains the refusals. `None`: try again.
    async fn run_commit(&self, todo: &[(&Lease, &StepCommit)], lean: bool) -> Result<Vec<Option<Result<()>>>> {
        if let [(lease, commit)] = todo
            && let Some(blobs) = inline_blobs(commit)
        {
            return self.run_solo_commit(lease, commit, blobs).await;
        }
        let b = Batch::new(todo)?;
        if lean {
            return self.run_lean_commit(todo, &b).await;
        }
        let query = sqlx::query_with(COMMIT_SQL, arguments(21, b.encoded_bytes()))
            .bind(&b.thread)
            .bind(&b.handle)
            .bind(&b.ns)
            .bind(&b.epoch)
            .bind(&b.id)
            .bind(&b.parent)
            .bind(&b.expected)
            .bind(&b.step)
            .bind(&b.source)
            .bind(&b.body)
            .bind(&b.metadata)
            .bind(&b.blob_n)
            .bind(&b.blob_channel)
            .bind(&b.blob_version)
            .bind(&b.blob_base)
            .bind(&b.blob_data);
        let rows = self.run_batch(b.bind_own(query)).await?;
        let won: Vec<i64> =
            rows.iter().map(|row| row.try_get(0)).collect::<Result<_, _>>().map_err(pg_error("commit"))?;
        let won: HashSet<usize> = won.into_iter().map(|n| n as usize - 1).collect();
        let mut outcomes: Vec<Option<Result<()>>> =
            (0..todo.len()).map(|i| won.contains(&i).then_some(Ok(()))).collect();
        if won.len() == todo.len() {
            return Ok(outcomes);
        }
        let refused: Vec<usize> = (0..todo.len()).filter(|i| !won.contains(i)).collect();
        self.explain_refusals(todo, &refused, &mut outcomes).await?;
        Ok(outcomes)
    }

    /// Runs a batch statement on a commit connection, given back to the idle ones after it.
    async fn run_batch(&self, query: PgQuery<'_>) -> Result<Vec<PgRow>> {
        let mut conn = self.commit_conns.take(&self.pool).await?;
        let rows = query.fetch_all(&mut conn).await.map_err(pg_error("commit"))?;
        self.commit_conns.give_back(conn);
        Ok(rows)
    }

    /// [`COMMIT_LEAN_SQL`] for a batch of commits that may go lean (each with its thread's row id
    /// and only blobs of its own checkpoint, so `b.blob_*` is empty), then the refusals explained.
    async fn run_lean_commit(&self, todo: &[(&Lease, &StepCommit)], b: &Batch) -> Result<Vec<Option<Result<()>>>> {
        let query = sqlx::query_with(COMMIT_LEAN_SQL, arguments(14, b.encoded_bytes()))
            .bind(&b.handle)
            .bind(&b.ns)
            .bind(&b.epoch)
            .bind(&b.id)
            .bind(&b.parent)
            .bind(&b.step)
            .bind(&b.source)
            .bind(&b.body)
            .bind(&b.metadata);
        let rows = self.run_batch(b.bind_own(query)).await?;
        let stored: Vec<(i64, String)> = rows
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(pg_error("commit"))?;
        // One commit per (thread, namespace) in a round: the pair names the commit.
        let stored: HashSet<(i64, &str)> = stored.iter().map(|(tid, ns)| (*tid, ns.as_str())).collect();
        let mut outcomes: Vec<Option<Result<()>>> = (0..todo.len())
            .map(|i| b.handle[i].is_some_and(|tid| stored.contains(&(tid, b.ns[i].as_str()))).then_some(Ok(())))
            .collect();
        let refused: Vec<usize> = (0..todo.len()).filter(|&i| outcomes[i].is_none()).collect();
        if !refused.is_empty() {
            self.explain_refusals(todo, &refused, &mut outcomes).await?;
        }
        Ok(outcomes)
    }

    /// [`SOLO_COMMIT_SQL`]: one fenced commit, its blobs in its row.
    async fn run_solo_commit(
        &self,
        lease: &Lease,
        commit: &StepCommit,
        blobs: InlineBlobs<'_>,
    ) -> Result<Vec<Option<Result<()>>>> {
        let ckpt = &commit.checkpoint;
        let (body, metadata) = encode_row(ckpt)?;
        let mut conn = self.commit_conns.take(&self.pool).await?;
        let size = row_bytes(&body, &metadata, commit) + commit.thread.len() + commit.ns.len();
        let query = sqlx::query_with(SOLO_COMMIT_SQL, arguments(14, size))
            .bind(&commit.thread)
            .bind(tid_of(lease))
            .bind(&commit.ns)
            .bind(lease.epoch as i64);
        let won: i64 = bind_row(query, ckpt, &body, &metadata, blobs)
            .bind(ckpt.expected_head.map(|h| h as i64))
            .fetch_one(&mut conn)
            .await
            .and_then(|row| sqlx::Row::try_get(&row, 0))
            .map_err(pg_error("commit"))?;
        self.commit_conns.give_back(conn);
        let mut outcomes = vec![(won == 1).then_some(Ok(()))];
        if won != 1 {
            self.explain_refusals(&[(lease, commit)], &[0], &mut outcomes).await?;
        }
        Ok(outcomes)
    }

    /// A commit on the session that holds the lease's lock: [`LEASED_APPEND_SQL`] when the lease
    /// knows the head the step built on is current, [`LEASED_COMMIT_SQL`] otherwise. `None` if it
    /// cannot go there: the lease is not one of this checkpointer's, its session is gone (the
    /// lock with it: the fenced statement decides), or its blobs do not fit in its row.
    async fn leased_commit(&self, lease: &Lease, commit: &StepCommit, lazy: bool) -> Option<Result<()>> {
        let held = held_lock(lease)?;
        let tid = tid_of(lease)?;
        // Only for a lone runner: the session also takes and releases every lease, which would
        // wait for this commit's WAL flush while other runners come and go.
        if !Arc::ptr_eq(&held.session, &self.leases) || self.leases.held().len() > 1 {
            return None;
        }
        let blobs = inline_blobs(commit)?;
        let ckpt = &commit.checkpoint;
        let (body, metadata) = match encode_row(ckpt) {
            Ok(encoded) => encoded,
            Err(err) => return Some(Err(err)),
        };
        let seen = self.writes_seen.load(Ordering::Acquire);
        let (known, fold) = held.knows_head(&commit.ns, ckpt.expected_head, seen);
        let mut guard = self.leases.conn.lock().await;
        if guard.0 != held.generation.load(Ordering::Acquire) {
            return None;
        }
        let conn = guard.1.as_mut()?;
        // Lazy only where the head is known: the others are a lease's first commits after a
        // refusal, durable as any commit may be.
        let sql = match (known, fold, lazy) {
            (true, false, false) => LEASED_INSERT_SQL,
            (true, false, true) => LEASED_INSERT_LAZY_SQL,
            (true, true, false) => LEASED_APPEND_SQL,
            (true, true, true) => LEASED_APPEND_LAZY_SQL,
            (false, _, _) => LEASED_COMMIT_SQL,
        };
        let size = row_bytes(&body, &metadata, commit) + commit.ns.len();
        let query = sqlx::query_with(sql, arguments(12, size)).bind(tid).bind(&commit.ns);
        let query = bind_row(query, ckpt, &body, &metadata, blobs);
        let won = if known {
            query.execute(conn).await.map(|done| done.rows_affected() == 1)
        } else {
            let query = query.bind(ckpt.expected_head.map(|h| h as i64));
            query.fetch_one(conn).await.and_then(|row| sqlx::Row::try_get::<i64, _>(&row, 0)).map(|n| n == 1)
        };
        let won = match won {
            Ok(won) => won,
            Err(err) if session_gone(&err) => {
                // The lease's lock went with the session: the fenced statement commits, or
                // finds that this one landed (its verdict: stored, and the head).
                guard.1 = None;
                held.settle(&commit.ns, None, None);
                return None;
            }
            Err(err) => {
                held.settle(&commit.ns, None, None);
                return Some(Err(pg_error("commit")(err)));
            }
        };
        drop(guard);
        if won {
            held.settle(&commit.ns, Some(ckpt.id), Some(seen));
            held.unflushed.store(lazy && known, Ordering::Release);
            return Some(Ok(()));
        }
        held.settle(&commit.ns, None, None);
        let mut outcomes = vec![None];
        if let Err(err) = self.explain_refusals(&[(lease, commit)], &[0], &mut outcomes).await {
            return Some(Err(err));
        }
        // Refused with nothing to explain it: the fenced statement tries again.
        outcomes.pop().flatten()
    }

    /// Fills in the outcome of each refused commit (positions in `todo`) from the database's
    /// verdict: refused for good, already done, or `None` (try again).
    async fn explain_refusals(
        &self,
        todo: &[(&Lease, &StepCommit)],
        refused: &[usize],
        outcomes: &mut [Option<Result<()>>],
    ) -> Result<()> {
        let verdicts: Vec<Verdict> = sqlx::query_as(VERDICT_SQL)
            .bind(refused.iter().map(|&i| todo[i].1.thread.as_str()).collect::<Vec<_>>())
            .bind(refused.iter().map(|&i| todo[i].1.ns.as_str()).collect::<Vec<_>>())
            .bind(i64s(refused.iter().map(|&i| todo[i].1.checkpoint.id)))
            .bind(refused.iter().map(|&i| tid_of(todo[i].0)).collect::<Vec<_>>())
            .fetch_all(&self.pool)
            .await
            .map_err(pg_error("commit"))?;
        for verdict in verdicts {
            let i = refused[verdict.n as usize - 1];
            let (lease, commit) = todo[i];
            outcomes[i] = match judge(lease, commit, &verdict) {
                Refusal::Final(err) => Some(Err(err)),
                Refusal::AlreadyDone => Some(Ok(())),
                Refusal::Retry => None,
            };
        }
        Ok(())
    }

    /// Takes the advisory lock on the lease session and, holding it, the thread: the epoch bumped,
    /// the graph checked, the highest checkpoint id read. `Ok(None)`: another runner holds it.
    /// Takes the lease (see [`TAKE_SQL`]); with `admission`, stores it too if the thread is new
    /// (see [`TAKE_ADMIT_SQL`]). Returns what the statement did, the highest checkpoint id (the
    /// admission's if it was stored), the lease session's generation and an existing thread's
    /// root head row; `None` if the lock is held.
    async fn take(&self, request: &LeaseRequest<'_>, key: i64, admission: Option<&StepCommit>) -> Result<Option<Took>> {
        let fail = pg_error("acquire");
        let encoded = match admission {
            Some(commit) => Some((
                encode_row(&commit.checkpoint)?,
                inline_blobs(commit)
                    .ok_or_else(|| Error::InvalidState("an admission writes versions of its own".into()))?,
            )),
            None => None,
        };
        let mut guard = self.leases.conn.lock().await;
        let held_here = self.leases.held().get(&key) == Some(&guard.0);
        if held_here {
            // Held by a live lease of this process, if the session that holds it still lives.
            let alive = match guard.1.as_mut() {
                Some(conn) => sqlx::query("SELECT 1").execute(conn).await.is_ok(),
                None => false,
            };
            if alive {
                return Ok(None);
            }
            guard.1 = None; // the session died and its locks with it
        }
        for attempt in 0..2 {
            self.leases.connect_if_gone(&mut guard).await.map_err(&fail)?;
            let generation = guard.0;
            let Some(conn) = guard.1.as_mut() else { continue };
            let mut query = sqlx::query_as(if admission.is_some() { TAKE_ADMIT_SQL } else { TAKE_SQL })
                .bind(request.thread)
                .bind(&request.graph.name)
                .bind(&request.graph.hash)
                .bind(request.owner)
                .bind(request.allow_graph_change)
                .bind(key)
                .bind(self.leases.take_unlocks(generation));
            if let (Some(commit), Some(((body, metadata), blobs))) = (admission, &encoded) {
                let ckpt = &commit.checkpoint;
                query = query
                    .bind(ckpt.id as i64)
                    .bind(ckpt.step as i64)
                    .bind(ckpt.source.as_str())
                    .bind(body.as_slice())
                    .bind(metadata.as_str())
                    .bind(blobs.0.clone())
                    .bind(blobs.1.clone())
                    .bind(blobs.2.clone());
            }
            let taken: std::result::Result<Taken, sqlx::Error> = query.fetch_one(&mut *conn).await;
            match taken {
                Ok(taken) if !taken.locked => return Ok(None),
                Ok(taken) => {
                    let outcome = match (taken.tid, taken.epoch) {
                        // Epoch 1: the row was just inserted, under a new tid: no checkpoint yet
                        // but the admission, if the statement stored one.
                        (Some(_), Some(1)) => Ok((admission.map_or(0, |commit| commit.checkpoint.id), None)),
                        (Some(tid), Some(_)) => Self::max_seq_and_head(conn, tid).await,
                        _ => Err(Self::graph_mismatch(conn, request).await.unwrap_or_else(|err| err)),
                    };
                    return match outcome {
                        Ok((max_seq, head)) => {
                            self.leases.held().insert(key, generation);
                            Ok(Some(Took { taken, max_seq, generation, head }))
                        }
                        Err(err) => {
                            let unlocked =
                                sqlx::query("SELECT pg_advisory_unlock($1)").bind(key).execute(&mut *conn).await;
                            if unlocked.is_err() {
                                guard.1 = None;
                            }
                            Err(err)
                        }
                    };
                }
                // The session may have died (server restart, terminated): one more try on a new one.
                Err(err)
                    if attempt == 0 && store_error(BACKEND, "acquire", &err, transient_sqlstate).is_transient() =>
                {
                    guard.1 = None;
                }
                Err(err) => {
                    guard.1 = None;
                    return Err(fail(err));
                }
            }
        }
        Err(Error::Checkpoint { backend: BACKEND, message: "acquire: no lease session".to_owned(), transient: true })
    }

    /// Takes a lease, storing `admission` with it on a new thread; returns whether it did, and
    /// the root head's row of an existing thread.
    async fn take_lease(
        &self,
        request: &LeaseRequest<'_>,
        admission: Option<&StepCommit>,
    ) -> Result<(Lease, bool, Option<CheckpointRow>)> {
        let key = lease_key(request.thread);
        let seen = self.writes_seen.load(Ordering::Acquire);
        let Some(Took { taken, max_seq, generation, head }) = self.take(request, key, admission).await? else {
            return Err(self.lease_held(request.thread).await);
        };
        let epoch = taken.epoch.unwrap_or_default() as u64;
        let admitted = admission.is_some() && epoch == 1;
        // Epoch 1: the thread row was just made, so no checkpoint of it exists but the admission.
        let born = (epoch == 1).then_some(seen);
        let mut known = KnownHeads { born, heads: HashMap::new() };
        let root = match admission {
            Some(commit) if admitted => Some(commit.checkpoint.id),
            _ => head.as_ref().map(|row| row.id as u64),
        };
        // An existing thread may hold pending writes (of its head, or left by a killed runner).
        known.heads.insert(String::new(), Known { head: root, clean_at: born });
        // The take committed without waiting for the WAL flush (see [`TAKE_SQL`]).
        let guard = HeldLock {
            session: Arc::clone(&self.leases),
            key,
            generation: AtomicU64::new(generation),
            tid: OnceLock::new(),
            deferred: None,
            heads: Mutex::new(known),
            unflushed: AtomicBool::new(true),
        };
        let lease = Lease::new(request.thread, request.owner, epoch, max_seq, Some(Box::new(Arc::new(guard))));
        Ok((lease.with_handle(taken.tid), admitted, head))
    }

    /// [`Error::LeaseHeld`] for a thread whose lock another runner holds, naming its owner.
    async fn lease_held(&self, thread: &str) -> Error {
        let owner: std::result::Result<Option<Option<String>>, _> =
            sqlx::query_scalar("SELECT owner FROM agentic.threads WHERE thread_id = $1")
                .bind(thread)
                .fetch_optional(&self.pool)
                .await;
        match owner {
            Ok(owner) => Error::LeaseHeld {
                thread: thread.to_owned(),
                owner: owner.flatten().unwrap_or_default(),
                until: until_words(None),
            },
            Err(err) => pg_error("acquire")(err),
        }
    }

    /// A new thread's lease whose take waits for the run's first need of the thread (see
    /// [`Deferred`]): nothing is sent.
    fn defer_take(&self, request: &LeaseRequest<'_>, admission: &StepCommit) -> Lease {
        let seen = self.writes_seen.load(Ordering::Acquire);
        let id = admission.checkpoint.id;
        // No checkpoint but the admission, and no pending write, until the take is sent.
        let mut known = KnownHeads { born: Some(seen), heads: HashMap::new() };
        known.heads.insert(String::new(), Known { head: Some(id), clean_at: Some(seen) });
        let held = Arc::new(HeldLock {
            session: Arc::clone(&self.leases),
            key: lease_key(request.thread),
            generation: AtomicU64::new(0),
            tid: OnceLock::new(),
            deferred: Some(Deferred {
                thread: request.thread.to_owned(),
                graph: request.graph.clone(),
                owner: request.owner.to_owned(),
                admission: admission.clone(),
                sending: tokio::sync::Mutex::new(()),
                taken: AtomicBool::new(false),
            }),
            heads: Mutex::new(known),
            unflushed: AtomicBool::new(true),
        });
        {
            let mut waiting = self.leases.deferred.lock().unwrap_or_else(PoisonError::into_inner);
            waiting.insert(request.thread.to_owned(), Arc::downgrade(&held));
        }
        Lease::new(request.thread, request.owner, 1, id, Some(Box::new(held)))
    }

    /// Sends a deferred take (see [`Deferred`]) if it was not sent, with `first` if that is the
    /// commit of the run's first step on the admission and fits in its row: then that commit is
    /// made with the take, durably, and the answer is `true`. Alone, the take commits without
    /// waiting for the WAL flush, as every take does (see [`TAKE_SQL`]).
    ///
    /// A take whose answer was lost is sent again: finding the thread made with this very
    /// admission (and epoch 1: nobody took it since), it adopts it, and its commit if that
    /// landed too.
    async fn send_deferred(&self, held: &HeldLock, first: Option<&StepCommit>) -> Result<bool> {
        let Some(deferred) = &held.deferred else { return Ok(false) };
        if deferred.taken.load(Ordering::Acquire) {
            return Ok(false);
        }
        let _sending = deferred.sending.lock().await;
        if deferred.taken.load(Ordering::Acquire) {
            return Ok(false); // sent meanwhile by the caller that held the lock
        }
        let admission = &deferred.admission;
        let admitted_id = admission.checkpoint.id;
        let first = deferred.first_step(first)?;
        let admission_blobs = inline_blobs(admission)
            .ok_or_else(|| Error::InvalidState("an admission writes versions of its own".into()))?;
        let (body, metadata) = encode_row(&admission.checkpoint)?;
        let size = deferred.encoded_bytes(&body, &metadata)
            + first.as_ref().map_or(0, |(commit, _, (body, metadata))| row_bytes(body, metadata, commit));
        let seen = self.writes_seen.load(Ordering::Acquire);
        if first.is_none() && self.take_together(held, deferred, (&body, &metadata, &admission_blobs), seen).await {
            return Ok(false);
        }
        let fail = pg_error("acquire");
        let mut guard = self.leases.conn.lock().await;
        for attempt in 0..2 {
            self.leases.connect_if_gone(&mut guard).await.map_err(&fail)?;
            let generation = guard.0;
            let Some(conn) = guard.1.as_mut() else { continue };
            let sql = if first.is_some() { TAKE_NEW_STEP_SQL } else { TAKE_NEW_SQL };
            let query = sqlx::query_with(sql, arguments(24, size))
                .bind(&deferred.thread)
                .bind(&deferred.graph.name)
                .bind(&deferred.graph.hash)
                .bind(&deferred.owner)
                .bind(held.key)
                .bind(self.leases.take_unlock(generation));
            let mut query = bind_row(query, &admission.checkpoint, &body, &metadata, admission_blobs.clone());
            if let Some((commit, blobs, (body, metadata))) = &first {
                query = bind_row(query, &commit.checkpoint, body, metadata, blobs.clone());
            }
            let answer = async {
                // One row per checkpoint stored, each with the new thread's tid.
                let made: Option<i64> = match query.fetch_optional(&mut *conn).await? {
                    Some(row) => Some(row.try_get(0)?),
                    None => None,
                };
                if made.is_some() {
                    return Ok((made, None));
                }
                let first_id = first.as_ref().map(|(commit, ..)| commit.checkpoint.id);
                let found = FoundNew::read(conn, &deferred.thread, admitted_id, &metadata, first_id, held.key).await?;
                Ok((None, Some(found)))
            }
            .await;
            let (made, found) = match answer {
                Ok(answer) => answer,
                // The session may have died (server restart, terminated): one more try on a new
                // one, which adopts what this one stored if it landed.
                Err(err)
                    if attempt == 0 && store_error(BACKEND, "acquire", &err, transient_sqlstate).is_transient() =>
                {
                    guard.1 = None;
                    continue;
                }
                Err(err) => {
                    guard.1 = None;
                    return Err(fail(err));
                }
            };
            if found.as_ref().is_some_and(|found| !found.locked) {
                drop(guard);
                return Err(self.lease_held(&deferred.thread).await);
            }
            let stepped = found.as_ref().is_some_and(|found| found.stepped);
            // Made now, or by this take's earlier try (epoch 1: nobody took it since).
            let ((Some(tid), _) | (None, Some(FoundNew { tid: Some(tid), epoch: Some(1), ours: true, .. }))) =
                (made, found)
            else {
                // Another run's thread: its lock is given back at once (the lease holds nothing,
                // and a try again refused again takes and gives back again).
                let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)").bind(held.key).execute(&mut *conn).await;
                if unlocked.is_err() {
                    guard.1 = None;
                }
                return Err(Error::InvalidState(format!(
                    "new thread `{}` exists already: its id was used by another run",
                    deferred.thread
                )));
            };
            drop(guard);
            self.taken(held, deferred, tid, generation);
            let stored = first.is_some() && (made.is_some() || stepped);
            if let Some((commit, ..)) = first.filter(|_| stored) {
                held.settle(&commit.ns, Some(commit.checkpoint.id), Some(seen));
                held.unflushed.store(false, Ordering::Release);
            } else if made.is_some() {
                // The take alone made the thread: its admission is the head, with no write.
                held.settle(&admission.ns, Some(admitted_id), Some(seen));
            } else {
                // Adopted: an earlier try may have stored more than this one knows of (its step):
                // the next commit checks the head.
                held.settle("", None, None);
            }
            return Ok(stored);
        }
        Err(Error::Checkpoint { backend: BACKEND, message: "acquire: no lease session".to_owned(), transient: true })
    }

    /// Records a deferred take that went through: thread `tid`, whose lock the lease session of
    /// `generation` holds (the lease releases it when dropped).
    fn taken(&self, held: &HeldLock, deferred: &Deferred, tid: i64, generation: u64) {
        held.generation.store(generation, Ordering::Release);
        self.leases.held().insert(held.key, generation);
        let _ = held.tid.set(tid);
        deferred.taken.store(true, Ordering::Release);
        self.leases.deferred.lock().unwrap_or_else(PoisonError::into_inner).remove(&deferred.thread);
    }

    /// A new thread's take sent alone (its admission's row `body`, `metadata` and `blobs`), with
    /// the others waiting for the lease session: whoever gets the session sends every take
    /// queued in one statement ([`TAKE_NEW_BATCH_SQL`]). At many threads each run's take goes
    /// alone (its first step commits through the group committer), and the one lease session
    /// carried one statement, with its executor set-up and commit, per run.
    ///
    /// `true` if such a statement made the thread and took its lock: the lease records it (with
    /// the write count `seen` read before). `false` if the take is to be sent alone, as before: no
    /// other take waited, or the statement did not make this thread (its lock held elsewhere, a
    /// thread of that id, the statement failed), whose outcome the take alone finds and explains.
    /// A lock the statement got for a thread it did not make is given back first, so the lone
    /// take finds the lock as it was.
    async fn take_together(
        &self,
        held: &HeldLock,
        deferred: &Deferred,
        row: (&[u8], &str, &InlineBlobs<'_>),
        seen: u64,
    ) -> bool {
        let Some((tid, generation)) = self.send_together(held, deferred, row).await else { return false };
        self.taken(held, deferred, tid, generation);
        // The take made the thread: its admission is the head, with no write.
        held.settle(&deferred.admission.ns, Some(deferred.admission.checkpoint.id), Some(seen));
        true
    }

    /// [`PostgresCheckpointer::take_together`]'s queue: the new `tid` and the session generation
    /// that holds its lock, if the statement that carried this take made the thread.
    async fn send_together(
        &self,
        held: &HeldLock,
        deferred: &Deferred,
        (body, metadata, (channels, bases, data)): (&[u8], &str, &InlineBlobs<'_>),
    ) -> Option<(i64, u64)> {
        let admission = &deferred.admission.checkpoint;
        let (reply, mut answer) = oneshot::channel();
        self.leases.takes().push(TakeJob {
            thread: deferred.thread.clone(),
            graph: deferred.graph.clone(),
            owner: deferred.owner.clone(),
            key: held.key,
            id: admission.id as i64,
            parent: admission.parent.map(|p| p as i64),
            step: admission.step as i64,
            source: admission.source.as_str(),
            body: body.to_vec(),
            metadata: metadata.to_owned(),
            channels: channels.iter().flatten().map(|c| (*c).to_owned()).collect(),
            bases: bases.clone().unwrap_or_default(),
            data: data.iter().flatten().map(|d| d.to_vec()).collect(),
            reply,
        });
        let mut guard = self.leases.conn.lock().await;
        match answer.try_recv() {
            Ok(made) => return made,
            Err(oneshot::error::TryRecvError::Closed) => return None,
            Err(oneshot::error::TryRecvError::Empty) => {}
        }
        let mut jobs = std::mem::take(&mut *self.leases.takes());
        if jobs.len() < 2 {
            return None; // alone: this job, dropped with `jobs`
        }
        // One take per lock in a statement; a second one (the same thread twice) goes alone.
        let mut keys = HashSet::with_capacity(jobs.len());
        let mut batch = Vec::with_capacity(jobs.len());
        for job in jobs.drain(..) {
            if keys.insert(job.key) {
                batch.push(job);
            } else {
                let _ = job.reply.send(None);
            }
        }
        let made = match self.leases.connect_if_gone(&mut guard).await {
            Ok(()) => {
                // Dropped while its statement is in flight (its caller gave up), this holder
                // leaves the session's locks unknown: the session is closed, as after a failed
                // statement, and each take it carried, answered by nobody, goes alone on a new one.
                let mut sending = CloseUnlessDone(&mut guard, false);
                let made = self.send_takes(sending.0, &batch).await;
                sending.1 = true;
                made
            }
            Err(_) => None, // each take alone reports it
        };
        let generation = guard.0;
        let made = made.unwrap_or_default();
        for (n, job) in batch.into_iter().enumerate() {
            let made = made.get(n).copied().flatten().map(|tid| (tid, generation));
            if job.reply.send(made).is_err() && made.is_some() {
                // Its caller is gone: nobody will hold that lock. It is let go as a dropped
                // lease's is: by the next lease statement, or by the flush.
                self.leases.unlock_later(job.key, generation);
            }
        }
        drop(guard);
        answer.try_recv().ok().flatten()
    }

    /// Sends `takes` in one [`TAKE_NEW_BATCH_SQL`] on the lease session: per take, in order, the
    /// thread it made (its lock held), if it did; `None` if it failed (the session is dropped,
    /// its locks with it, as a lone take does on failure).
    async fn send_takes(&self, guard: &mut (u64, Option<PgConnection>), takes: &[TakeJob]) -> Option<Vec<Option<i64>>> {
        let generation = guard.0;
        let conn = guard.1.as_mut()?;
        let (mut lo, mut hi) = (Vec::with_capacity(takes.len()), Vec::with_capacity(takes.len()));
        let mut next = 1;
        for take in takes {
            lo.push(next);
            next += take.channels.len() as i32;
            hi.push(next - 1);
        }
        let size: usize = takes
            .iter()
            .map(|t| t.body.len() + t.metadata.len() + t.data.iter().map(Vec::len).sum::<usize>() + 96)
            .sum();
        let rows: std::result::Result<Vec<(i64, bool, Option<i64>)>, _> =
            sqlx::query_as_with(TAKE_NEW_BATCH_SQL, arguments(17, size))
                .bind(takes.iter().map(|t| t.thread.as_str()).collect::<Vec<_>>())
                .bind(takes.iter().map(|t| t.graph.name.as_str()).collect::<Vec<_>>())
                .bind(takes.iter().map(|t| t.graph.hash.as_str()).collect::<Vec<_>>())
                .bind(takes.iter().map(|t| t.owner.as_str()).collect::<Vec<_>>())
                .bind(takes.iter().map(|t| t.key).collect::<Vec<_>>())
                .bind(takes.iter().map(|t| t.id).collect::<Vec<_>>())
                .bind(takes.iter().map(|t| t.parent).collect::<Vec<_>>())
                .bind(takes.iter().map(|t| t.step).collect::<Vec<_>>())
                .bind(takes.iter().map(|t| t.source).collect::<Vec<_>>())
                .bind(takes.iter().map(|t| t.body.as_slice()).collect::<Vec<_>>())
                .bind(takes.iter().map(|t| t.metadata.as_str()).collect::<Vec<_>>())
                .bind(lo)
                .bind(hi)
                .bind(takes.iter().flat_map(|t| t.channels.iter().map(String::as_str)).collect::<Vec<_>>())
                .bind(takes.iter().flat_map(|t| t.bases.iter().copied()).collect::<Vec<_>>())
                .bind(takes.iter().flat_map(|t| t.data.iter().map(Vec::as_slice)).collect::<Vec<_>>())
                .bind(self.leases.take_unlocks(generation))
                .fetch_all(&mut *conn)
                .await;
        #[cfg(test)]
        self.leases.take_batches.fetch_add(1, Ordering::Relaxed);
        let Ok(rows) = rows else {
            guard.1 = None;
            return None;
        };
        let mut made = vec![None; takes.len()];
        let mut stray = Vec::new();
        for (n, locked, tid) in rows {
            let Some(i) = usize::try_from(n - 1).ok().filter(|&i| i < takes.len()) else { continue };
            made[i] = tid;
            if tid.is_none() && locked {
                stray.push(takes[i].key);
            }
        }
        if !stray.is_empty() {
            let unlocked = sqlx::query("SELECT pg_advisory_unlock(k) FROM unnest($1::int8[]) AS k")
                .bind(stray)
                .execute(&mut *conn)
                .await;
            if unlocked.is_err() {
                guard.1 = None;
                return None;
            }
        }
        Some(made)
    }

    /// The highest checkpoint id of a thread, across its namespaces, and the root namespace's
    /// head checkpoint row.
    ///
    /// A statement of its own, after the epoch bump: a commit of the previous holder that the
    /// bump waited for is visible to it (a statement's snapshot predates its waits).
    async fn max_seq_and_head(conn: &mut PgConnection, tid: i64) -> Result<(u64, Option<CheckpointRow>)> {
        let row: SeqAndHead = sqlx::query_as(
            // The namespaces are walked one primary-key probe each (a loose index scan), and
            // each one's newest id read by a backward probe: no scan of the thread's history.
            "WITH RECURSIVE spaces AS (
                (SELECT k.ns FROM agentic.checkpoints k WHERE k.tid = $1 ORDER BY k.ns LIMIT 1)
                UNION ALL
                SELECT (SELECT k.ns FROM agentic.checkpoints k WHERE k.tid = $1 AND k.ns > s.ns ORDER BY k.ns LIMIT 1)
                FROM spaces s WHERE s.ns IS NOT NULL
             ),
             m AS (
                SELECT coalesce(max((SELECT max(k.id) FROM agentic.checkpoints k WHERE k.tid = $1 AND k.ns = s.ns)), 0)::int8
                    AS max_seq
                FROM spaces s WHERE s.ns IS NOT NULL
             )
             SELECT m.max_seq, c.id, c.parent, c.step, c.source, c.body, c.metadata::text AS metadata,
                    (extract(epoch FROM c.created_at) * 1000000)::int8 AS created_us
             FROM m LEFT JOIN agentic.checkpoints c
                ON c.tid = $1 AND c.ns = '' AND c.id = (SELECT max(k.id) FROM agentic.checkpoints k WHERE k.tid = $1 AND k.ns = '')",
        )
        .bind(tid)
        .fetch_one(conn)
        .await
        .map_err(pg_error("acquire"))?;
        let head = match row {
            SeqAndHead {
                id: Some(id),
                step: Some(step),
                source: Some(source),
                body: Some(body),
                metadata: Some(metadata),
                created_us: Some(created_us),
                parent,
                ..
            } => Some(CheckpointRow { id, parent, step, source, body, metadata, created_us }),
            _ => None,
        };
        Ok((row.max_seq as u64, head))
    }

    async fn graph_mismatch(conn: &mut PgConnection, request: &LeaseRequest<'_>) -> Result<Error> {
        let stored: Option<(String, String)> =
            sqlx::query_as("SELECT graph_name, graph_hash FROM agentic.threads WHERE thread_id = $1")
                .bind(request.thread)
                .fetch_optional(conn)
                .await
                .map_err(pg_error("acquire"))?;
        let stored = stored.map(|(name, hash)| GraphIdentity { name, hash }.to_string()).unwrap_or_default();
        Ok(Error::GraphMismatch { thread: request.thread.to_owned(), stored, requested: request.graph.to_string() })
    }
}

impl PostgresCheckpointer {
    async fn load_once(&self, thread: &str, ns: &str, id: Option<u64>) -> Result<Option<StoredCheckpoint>> {
        let row: Option<LoadRow> = sqlx::query_as(
            // The target is computed first so the checkpoint is one primary-key probe, whatever
            // the planner's statistics say.
            "WITH target AS (
                SELECT t.tid, coalesce($3, (SELECT max(k.id) FROM agentic.checkpoints k WHERE k.tid = t.tid AND k.ns = $2)) AS id
                FROM agentic.threads t WHERE t.thread_id = $1
             )
             SELECT c.tid, c.id, c.parent, c.step, c.source, c.body, c.metadata::text AS metadata,
                    (extract(epoch FROM c.created_at) * 1000000)::int8 AS created_us
             FROM target JOIN agentic.checkpoints c ON c.tid = target.tid AND c.ns = $2 AND c.id = target.id",
        )
        .bind(thread)
        .bind(ns)
        .bind(id.map(|i| i as i64))
        .fetch_optional(&self.pool)
        .await
        .map_err(pg_error("load"))?;
        let Some(LoadRow { tid, row }) = row else { return Ok(None) };
        self.with_values(tid, ns, row).await.map(Some)
    }

    /// A checkpoint row with its channel values, read in one statement.
    async fn with_values(&self, tid: i64, ns: &str, row: CheckpointRow) -> Result<StoredCheckpoint> {
        let body = row.body()?;
        let (channels, heads): (Vec<&str>, Vec<i64>) = blob_heads(&body).map(|(c, v)| (c, v as i64)).unzip();
        let rows: Vec<ChannelRows> = if channels.is_empty() {
            Vec::new()
        } else {
            // Each channel's chain from its head version through `base`, aggregated into one row
            // of arrays per channel (at most SEGMENT_ROWS - 1 deltas plus one per closed segment).
            // A version is in the row of the checkpoint that wrote it (its id is the version) or
            // in `channel_values`: one primary-key probe each. Every probe is a LIMIT 1 subquery
            // so the planner cannot flatten it into a join that scans the thread's rows on each
            // step of the recursion (which it does when its statistics predate the rows).
            sqlx::query_as(
                "WITH RECURSIVE chain AS (
                    SELECT k.channel, k.version, v.base, v.data
                    FROM unnest($3::text[], $4::int8[]) AS k(channel, version)
                        CROSS JOIN LATERAL (
                            (SELECT x.base, x.data
                             FROM agentic.checkpoints r, unnest(r.channels, r.bases, r.data) AS x(channel, base, data)
                             WHERE r.tid = $1 AND r.ns = $2 AND r.id = k.version AND x.channel = k.channel
                             LIMIT 1)
                            UNION ALL
                            (SELECT v.base, v.data FROM agentic.channel_values v
                             WHERE v.tid = $1 AND v.ns = $2 AND v.channel = k.channel AND v.version = k.version
                             LIMIT 1)
                            LIMIT 1
                        ) v
                    UNION ALL
                    SELECT c.channel, c.base, v.base, v.data
                    FROM chain c
                        CROSS JOIN LATERAL (
                            (SELECT x.base, x.data
                             FROM agentic.checkpoints r, unnest(r.channels, r.bases, r.data) AS x(channel, base, data)
                             WHERE r.tid = $1 AND r.ns = $2 AND r.id = c.base AND r.id < c.version AND x.channel = c.channel
                             LIMIT 1)
                            UNION ALL
                            (SELECT v.base, v.data FROM agentic.channel_values v
                             WHERE v.tid = $1 AND v.ns = $2 AND v.channel = c.channel AND v.version = c.base
                                AND v.version < c.version
                             LIMIT 1)
                            LIMIT 1
                        ) v
                 )
                 SELECT channel, array_agg(version) AS versions, array_agg(base) AS bases, array_agg(data) AS data
                 FROM chain GROUP BY channel",
            )
            .bind(tid)
            .bind(ns)
            .bind(channels)
            .bind(heads)
            .fetch_all(&self.pool)
            .await
            .map_err(pg_error("load"))?
        };
        let values = materialize_rows(&body, rows)?;
        row.into_stored(BACKEND, ns, body, values)
    }
}

/// Splits a batch into rounds with at most one commit per (thread, namespace), keeping the order
/// of commits of the same namespace.
fn rounds(commits: &[(&Lease, &StepCommit)]) -> Vec<Vec<usize>> {
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    let mut next: HashMap<(&str, &str), usize> = HashMap::new();
    for (i, (_, commit)) in commits.iter().enumerate() {
        let slot = next.entry((commit.thread.as_str(), commit.ns.as_str())).or_insert(0);
        if rounds.len() <= *slot {
            rounds.push(Vec::new());
        }
        rounds[*slot].push(i);
        *slot += 1;
    }
    rounds
}

/// Explains a refused commit, in the order the memory backend checks.
fn judge(lease: &Lease, commit: &StepCommit, verdict: &Verdict) -> Refusal {
    let ckpt = &commit.checkpoint;
    let Some(epoch) = verdict.epoch else {
        return Refusal::Final(Error::NotFound(format!("thread `{}`", commit.thread)));
    };
    if epoch as u64 != lease.epoch {
        return Refusal::Final(Error::LeaseLost { thread: commit.thread.clone(), epoch: lease.epoch });
    }
    let head = verdict.head.map(|h| h as u64);
    if verdict.stored && head == Some(ckpt.id) {
        return Refusal::AlreadyDone;
    }
    if head != ckpt.expected_head {
        return Refusal::Final(Error::HeadMoved {
            thread: commit.thread.clone(),
            ns: commit.ns.clone(),
            expected: ckpt.expected_head,
            found: head,
        });
    }
    Refusal::Retry
}

/// Whether a fenced commit may go in [`COMMIT_LEAN_SQL`], skipping what [`COMMIT_SQL`] checks
/// beyond the fence, the checkpointer's write count being `seen`: its lease knows the
/// namespace's head is the one the commit builds on and that no pending write is stored there
/// ([`KnownHeads`], as for [`LEASED_INSERT_SQL`]), knows the thread's row id, and the commit's
/// blobs are all versions of its own checkpoint. Only the fence is left: the lease's holder is
/// the only one that commits to its thread, one commit at a time, and while the epoch it locks
/// FOR SHARE is current nobody else holds the thread.
fn lean(lease: &Lease, commit: &StepCommit, seen: u64) -> bool {
    let Some(held) = held_lock(lease) else { return false };
    let (known, fold) = held.knows_head(&commit.ns, commit.checkpoint.expected_head, seen);
    let own = commit.blobs.iter().all(|b| b.version == commit.checkpoint.id);
    known && !fold && own && tid_of(lease).is_some()
}

/// Records a fenced commit's outcome in the heads its lease knows; `seen`: the checkpointer's
/// write count read before the commit was sent (the statement folded every pending write stored
/// by then; one counted since leaves the namespace not known clean).
fn settled(lease: &Lease, commit: &StepCommit, result: Result<()>, seen: u64) -> Result<()> {
    if let Some(held) = held_lock(lease) {
        let head = result.is_ok().then_some(commit.checkpoint.id);
        held.settle(&commit.ns, head, head.map(|_| seen));
        if result.is_ok() {
            held.unflushed.store(false, Ordering::Release); // a durable commit: WAL flushed up to it
        }
    }
    result
}

/// A commit the batch left without an outcome (never expected: every commit gets one).
fn unanswered() -> Error {
    Error::Checkpoint { backend: BACKEND, message: "commit left without an outcome".to_owned(), transient: true }
}

/// Errors are not `Clone`; a failed batch statement fails each of its commits alike.
fn clone_error(err: &Error) -> Error {
    match err {
        Error::Checkpoint { backend, message, transient } => {
            Error::Checkpoint { backend, message: message.clone(), transient: *transient }
        }
        other => Error::Checkpoint { backend: BACKEND, message: other.to_string(), transient: false },
    }
}

#[async_trait]
impl Checkpointer for PostgresCheckpointer {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn acquire(&self, request: LeaseRequest<'_>) -> Result<Lease> {
        Ok(self.take_lease(&request, None).await?.0)
    }

    async fn begin(&self, request: LeaseRequest<'_>, admission: Option<&StepCommit>) -> Result<Begun> {
        let admission = admission.filter(|commit| is_first(commit, request.thread) && inline_blobs(commit).is_some());
        let (lease, admitted, head) = self.take_lease(&request, admission).await?;
        let head = match (head, lease.handle) {
            (Some(row), Some(tid)) => match self.with_values(tid, "", row).await {
                // Two snapshots again (see `load`): read the head anew.
                Err(Error::Checkpoint { transient: false, .. }) => self.load(request.thread, "", None).await?,
                other => Some(other?),
            },
            _ => None,
        };
        Ok(Begun { lease, admitted, head })
    }

    async fn begin_new(&self, request: LeaseRequest<'_>, admission: &StepCommit) -> Result<Begun> {
        if !is_first(admission, request.thread) || inline_blobs(admission).is_none() {
            return self.begin(request, Some(admission)).await;
        }
        Ok(Begun { lease: self.defer_take(&request, admission), admitted: true, head: None })
    }

    async fn thread(&self, thread: &str) -> Result<Option<ThreadInfo>> {
        let row: Option<ThreadRow> =
            sqlx::query_as("SELECT graph_name, graph_hash, epoch, owner FROM agentic.threads WHERE thread_id = $1")
                .bind(thread)
                .fetch_optional(&self.pool)
                .await
                .map_err(pg_error("read thread"))?;
        Ok(row.map(|row| row.into_info(thread)))
    }

    async fn commit(&self, lease: &Lease, commit: &StepCommit) -> Result<()> {
        self.commit_with(lease, commit, false).await
    }

    async fn commit_lazy(&self, lease: &Lease, commit: &StepCommit) -> Result<()> {
        self.commit_with(lease, commit, true).await
    }

    async fn flush(&self, lease: &Lease) -> Result<()> {
        let Some(held) = held_lock(lease) else { return Ok(()) };
        // A run that ends before anything stored its new thread stores it now (an interrupt
        // before the first node, a failed first step): it is reported, so it must exist.
        self.send_deferred(held, None).await?;
        let Some(tid) = tid_of(lease) else { return Ok(()) };
        if !held.unflushed.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let flushed = sqlx::query(FLUSH_SQL).bind(tid).execute(&self.pool).await;
        if let Err(err) = flushed {
            held.unflushed.store(true, Ordering::Release);
            return Err(pg_error("flush")(err));
        }
        Ok(())
    }

    async fn head(&self, thread: &str, ns: &str) -> Result<Option<u64>> {
        let head: Option<Option<i64>> = sqlx::query_scalar(
            "SELECT (SELECT max(k.id) FROM agentic.checkpoints k WHERE k.tid = t.tid AND k.ns = $2)
             FROM agentic.threads t WHERE t.thread_id = $1",
        )
        .bind(thread)
        .bind(ns)
        .fetch_optional(&self.pool)
        .await
        .map_err(pg_error("read head"))?;
        Ok(head.flatten().map(|h| h as u64))
    }

    async fn load(&self, thread: &str, ns: &str, id: Option<u64>) -> Result<Option<StoredCheckpoint>> {
        match self.load_once(thread, ns, id).await {
            // The two reads are two snapshots: a prune between them may have taken the
            // checkpoint and its blobs. Read again: it is gone now, or it loads.
            Err(Error::Checkpoint { transient: false, .. }) => self.load_once(thread, ns, id).await,
            other => other,
        }
    }

    async fn list(&self, thread: &str, ns: &str, filter: &ListFilter) -> Result<Vec<CheckpointMeta>> {
        let rows: Vec<MetaRow> = sqlx::query_as(
            "SELECT c.id, c.parent, c.step, c.source, c.metadata::text AS metadata
             FROM agentic.threads t JOIN agentic.checkpoints c ON c.tid = t.tid AND c.ns = $2
             WHERE t.thread_id = $1
               AND ($3::int8 IS NULL OR c.id < $3)
               AND ($4::text IS NULL OR c.source = $4)
             ORDER BY c.id DESC
             LIMIT $5",
        )
        .bind(thread)
        .bind(ns)
        .bind(filter.before.map(|b| b as i64))
        .bind(filter.source.map(super::Source::as_str))
        .bind(filter.limit.map(|l| l.min(i64::MAX as usize) as i64))
        .fetch_all(&self.pool)
        .await
        .map_err(pg_error("list"))?;
        rows.into_iter().map(|r| r.into_meta(BACKEND, ns)).collect()
    }

    async fn put_writes(&self, step: StepRef<'_>, writes: &[PendingWrite]) -> Result<PutOutcome> {
        // A write against a new thread's admission needs the thread stored (see [`Deferred`]).
        if let Some(held) = self.leases.deferred_for(step.thread) {
            self.send_deferred(&held, None).await?;
        }
        // Stored only while the checkpoint is its namespace's head. Writes that checked the head
        // before a commit moving it landed, and were stored after, are deleted by the next commit
        // that folds (it folds every checkpoint up to its parent; see `KnownHeads`). The first
        // write of a (task, kind, key) wins.
        // The thread row is held FOR SHARE to the end: a runner taking the thread (its take
        // updates the row) waits for writes in flight, so the pending writes it reads next are
        // all there are; a write of the runner it deposed that reaches the row after the take
        // finds another epoch ($8) and is refused (a killed runner's last write, committed while
        // the new runner had already read, would have its task run twice).
        let stored: std::result::Result<(i64, i64, Option<i64>), _> = sqlx::query_as(
            "WITH thread AS (
                SELECT t.tid, t.epoch FROM agentic.threads t WHERE t.thread_id = $1 FOR SHARE
             ),
             step AS (
                SELECT t.tid FROM thread t
                WHERE ($8::int8 IS NULL OR t.epoch = $8)
                    AND (SELECT max(k.id) FROM agentic.checkpoints k WHERE k.tid = t.tid AND k.ns = $2) = $3
             ),
             saved AS (
                INSERT INTO agentic.writes (tid, ns, checkpoint, task, kind, key, data)
                SELECT s.tid, $2, $3, w.task, w.kind, w.key, w.data
                FROM step s,
                     unnest($4::text[], $5::text[], $6::text[], $7::bytea[]) WITH ORDINALITY AS w(task, kind, key, data, i)
                ORDER BY w.i
                ON CONFLICT DO NOTHING
                RETURNING 1
             )
             SELECT (SELECT count(*) FROM step), (SELECT count(*) FROM saved), (SELECT epoch FROM thread)",
        )
        .bind(step.thread)
        .bind(step.ns)
        .bind(step.checkpoint as i64)
        .bind(writes.iter().map(|w| w.task.as_str()).collect::<Vec<_>>())
        .bind(writes.iter().map(|w| w.kind.as_str()).collect::<Vec<_>>())
        .bind(writes.iter().map(|w| w.key.as_str()).collect::<Vec<_>>())
        .bind(writes.iter().map(|w| w.data.as_slice()).collect::<Vec<_>>())
        .bind(step.epoch.map(|e| e as i64))
        .fetch_one(&self.pool)
        .await;
        // Counted once the statement is over, stored or not: a commit that read the count
        // before cannot leave this write out of its fold's reckoning.
        self.writes_seen.fetch_add(1, Ordering::AcqRel);
        let (current, saved, epoch) = stored.map_err(pg_error("put writes"))?;
        if let Some(mine) = step.epoch.filter(|&e| epoch.is_some_and(|found| found != e as i64)) {
            return Err(Error::LeaseLost { thread: step.thread.to_owned(), epoch: mine });
        }
        if current == 0 {
            return Err(stale_task(step, writes));
        }
        Ok(if saved as usize == writes.len() { PutOutcome::Accepted } else { PutOutcome::Duplicate })
    }

    async fn pending_writes(&self, step: StepRef<'_>) -> Result<Vec<PendingWrite>> {
        let rows: Vec<WriteRow> = sqlx::query_as(
            "SELECT w.task, w.kind, w.key, w.data
             FROM agentic.threads t JOIN agentic.writes w ON w.tid = t.tid
             WHERE t.thread_id = $1 AND w.ns = $2 AND w.checkpoint = $3
             ORDER BY w.seq",
        )
        .bind(step.thread)
        .bind(step.ns)
        .bind(step.checkpoint as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(pg_error("read pending writes"))?;
        if !rows.is_empty() {
            // A runner reading them will fold them into its next commit.
            self.writes_seen.fetch_add(1, Ordering::AcqRel);
        }
        rows.into_iter().map(|r| r.into_write(BACKEND)).collect()
    }

    async fn delete_thread(&self, thread: &str) -> Result<()> {
        let fail = pg_error("delete thread");
        let mut tx = self.pool.begin().await.map_err(&fail)?;
        // A runner holding the thread commits on its lease session without looking at the
        // thread row: the deletion waits for its lease (the advisory lock, held to the end of
        // this transaction) and is refused if it is not released within DELETE_WAIT.
        sqlx::query("SELECT set_config('lock_timeout', $1, true)")
            .bind(format!("{}ms", DELETE_WAIT.as_millis()))
            .execute(&mut *tx)
            .await
            .map_err(&fail)?;
        let locked =
            match sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(lease_key(thread)).execute(&mut *tx).await {
                Ok(_) => true,
                Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("55P03") => false,
                Err(err) => return Err(fail(err)),
            };
        if !locked {
            let owner: Option<Option<String>> =
                sqlx::query_scalar("SELECT owner FROM agentic.threads WHERE thread_id = $1")
                    .bind(thread)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(&fail)?;
            return Err(Error::LeaseHeld {
                thread: thread.to_owned(),
                owner: owner.flatten().unwrap_or_default(),
                until: until_words(None),
            });
        }
        // Deleting the thread row first makes fenced commits in flight finish (they hold it FOR
        // SHARE) and later ones find no thread; the next statement's snapshot then sees every row.
        let tid: Option<i64> = sqlx::query_scalar("DELETE FROM agentic.threads WHERE thread_id = $1 RETURNING tid")
            .bind(thread)
            .fetch_optional(&mut *tx)
            .await
            .map_err(&fail)?;
        if let Some(tid) = tid {
            sqlx::query(
                "WITH c AS (DELETE FROM agentic.checkpoints WHERE tid = $1),
                      v AS (DELETE FROM agentic.channel_values WHERE tid = $1)
                 DELETE FROM agentic.writes WHERE tid = $1",
            )
            .bind(tid)
            .execute(&mut *tx)
            .await
            .map_err(&fail)?;
        }
        tx.commit().await.map_err(&fail)
    }

    async fn prune(&self, thread: &str, keep: usize) -> Result<u64> {
        let fail = pg_error("prune");
        let mut tx = self.pool.begin().await.map_err(&fail)?;
        // FOR UPDATE keeps fenced commits out (they hold the row FOR SHARE). A commit on a lease
        // session may still land meanwhile: it only adds a checkpoint newer than every one read
        // here, its blobs in its own row, built on the head, which is kept with every version it
        // names. What this prune deletes is fixed by the ids it reads first.
        let tid: Option<i64> = sqlx::query_scalar("SELECT tid FROM agentic.threads WHERE thread_id = $1 FOR UPDATE")
            .bind(thread)
            .fetch_optional(&mut *tx)
            .await
            .map_err(&fail)?;
        let Some(tid) = tid else { return Ok(0) };
        // Every checkpoint, with the body of the newest `keep` of each namespace.
        let ranked: Vec<(String, i64, Option<Vec<u8>>)> = sqlx::query_as(
            "SELECT ns, id, CASE WHEN rank <= $2 THEN body END
             FROM (SELECT ns, id, body, row_number() OVER (PARTITION BY ns ORDER BY id DESC) AS rank
                   FROM agentic.checkpoints WHERE tid = $1) r",
        )
        .bind(tid)
        .bind(keep.min(i64::MAX as usize) as i64)
        .fetch_all(&mut *tx)
        .await
        .map_err(&fail)?;
        let mut kept = Vec::new();
        let mut doomed = Vec::new();
        for (ns, id, body) in ranked {
            match body {
                Some(body) => kept.push((ns, super::codec::decode(&body)?)),
                None => doomed.push((ns, id)),
            }
        }
        let deltas: Vec<(String, String, i64, i64)> = sqlx::query_as(
            "SELECT ns, channel, version, base FROM agentic.channel_values WHERE tid = $1 AND base IS NOT NULL
             UNION ALL
             SELECT c.ns, x.channel, c.id, x.base
             FROM agentic.checkpoints c, unnest(c.channels, c.bases) AS x(channel, base)
             WHERE c.tid = $1 AND x.base IS NOT NULL",
        )
        .bind(tid)
        .fetch_all(&mut *tx)
        .await
        .map_err(&fail)?;
        let deltas = deltas.into_iter().map(|(ns, channel, v, base)| ((ns, channel, v as u64), base as u64)).collect();
        let used = blobs_to_keep(&kept, &deltas);
        // The versions still in use that live in a doomed checkpoint's row move to
        // `channel_values` first; every statement of the CTE sees the same snapshot, so the
        // moved rows are not among the unused ones deleted beside them.
        let deleted: i64 = sqlx::query_scalar(
            "WITH doomed AS (
                SELECT * FROM unnest($2::text[], $3::int8[]) AS d(ns, id)
             ),
             used AS (
                SELECT * FROM unnest($4::text[], $5::text[], $6::int8[]) AS u(ns, channel, version)
             ),
             moved AS (
                INSERT INTO agentic.channel_values (tid, ns, channel, version, base, data)
                SELECT c.tid, c.ns, x.channel, c.id, x.base, x.data
                FROM doomed d
                    JOIN agentic.checkpoints c ON c.tid = $1 AND c.ns = d.ns AND c.id = d.id
                    CROSS JOIN LATERAL unnest(c.channels, c.bases, c.data) AS x(channel, base, data)
                WHERE (c.ns, x.channel, c.id) IN (SELECT * FROM used)
                ON CONFLICT DO NOTHING
             ),
             gone AS (
                DELETE FROM agentic.checkpoints c USING doomed d
                WHERE c.tid = $1 AND c.ns = d.ns AND c.id = d.id
                RETURNING c.ns, c.id
             ),
             writes_gone AS (
                DELETE FROM agentic.writes w USING gone g WHERE w.tid = $1 AND w.ns = g.ns AND w.checkpoint = g.id
             ),
             values_gone AS (
                DELETE FROM agentic.channel_values v
                WHERE v.tid = $1 AND (v.ns, v.channel, v.version) NOT IN (SELECT * FROM used)
             )
             SELECT count(*) FROM gone",
        )
        .bind(tid)
        .bind(doomed.iter().map(|(ns, _)| ns.as_str()).collect::<Vec<_>>())
        .bind(doomed.iter().map(|(_, id)| *id).collect::<Vec<_>>())
        .bind(used.iter().map(|(ns, _, _)| ns.as_str()).collect::<Vec<_>>())
        .bind(used.iter().map(|(_, channel, _)| channel.as_str()).collect::<Vec<_>>())
        .bind(i64s(used.iter().map(|(_, _, v)| *v)))
        .fetch_one(&mut *tx)
        .await
        .map_err(&fail)?;
        tx.commit().await.map_err(&fail)?;
        Ok(deleted as u64)
    }
}

#[derive(sqlx::FromRow)]
struct LoadRow {
    tid: i64,
    #[sqlx(flatten)]
    row: CheckpointRow,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_sqlstates_are_connection_and_contention_failures() {
        for code in ["08006", "08001", "57P01", "57P03", "53300", "40001", "40P01"] {
            assert!(transient_sqlstate(code), "{code}");
        }
        for code in ["23505", "42P01", "22P02"] {
            assert!(!transient_sqlstate(code), "{code}");
        }
    }

    #[test]
    fn lease_keys_differ_per_thread_and_are_stable() {
        assert_eq!(lease_key("a"), lease_key("a"));
        assert_ne!(lease_key("a"), lease_key("b"));
    }

    /// Checkpoint `id` of thread `t`, on `parent`, with `metadata`.
    fn commit(id: u64, parent: Option<u64>, metadata: serde_json::Value) -> StepCommit {
        StepCommit {
            thread: "t".to_owned(),
            ns: String::new(),
            checkpoint: NewCheckpoint {
                id,
                parent,
                expected_head: parent,
                step: id - 1,
                source: if parent.is_none() { super::super::Source::Input } else { super::super::Source::Loop },
                body: Arc::default(),
                metadata: Arc::new(metadata.into()),
            },
            blobs: Vec::new(),
        }
    }

    /// Checkpoint `id` of `thread` on `parent`, setting channel `x` to `value`: a version of its
    /// own, stored in its row.
    fn step(thread: &str, id: u64, parent: Option<u64>, value: i64) -> StepCommit {
        let mut step = commit(id, parent, serde_json::json!({}));
        step.thread = thread.to_owned();
        let data = super::super::codec::encode(&value).unwrap();
        step.blobs = vec![super::super::ChannelBlob { channel: "x".to_owned(), version: id, base: None, data }];
        step
    }

    /// A stored checkpoint row: thread, id, and the row's channels and values.
    type StoredRow = (String, i64, Vec<String>, Vec<Vec<u8>>);

    async fn take(store: &PostgresCheckpointer, thread: &str) -> Lease {
        let graph = GraphIdentity { name: "g".to_owned(), hash: "h".to_owned() };
        store.acquire(LeaseRequest { thread, owner: "me", graph: &graph, allow_graph_change: false }).await.unwrap()
    }

    /// A batch whose leases all know their heads goes in [`COMMIT_LEAN_SQL`]: each row gets its
    /// own values, and the fence still refuses a lease whose thread was taken since, however
    /// sure it is of its head. A row already there (a head a lease did not know) fails the lean
    /// statement; the batch is then committed one by one, and that commit is found done.
    #[sqlx::test(migrations = false)]
    async fn a_lean_batch_is_fenced_and_falls_back_when_a_row_is_there(pool: PgPool) {
        let store = PostgresCheckpointer::from_pool(pool.clone()).await.unwrap();
        let (a, b, c_old) = (take(&store, "a").await, take(&store, "b").await, take(&store, "c").await);
        let mut firsts = Vec::new();
        for (lease, thread) in [(&a, "a"), (&b, "b"), (&c_old, "c")] {
            let first = step(thread, lease.next_checkpoint_id(), None, 1);
            store.commit(lease, &first).await.unwrap();
            firsts.push(first.checkpoint.id);
        }
        // Another runner took `c` after this one's lease session was lost: the epoch it bumped
        // is all the fence sees (this session's lock is moot once the session is gone).
        sqlx::query("UPDATE agentic.threads SET epoch = epoch + 1 WHERE thread_id = 'c'").execute(&pool).await.unwrap();

        let a2 = step("a", a.next_checkpoint_id(), Some(firsts[0]), 2);
        let b2 = step("b", b.next_checkpoint_id(), Some(firsts[1]), 2);
        let c2 = step("c", c_old.next_checkpoint_id(), Some(firsts[2]), 2);
        let commits = [(&a, &a2), (&b, &b2), (&c_old, &c2)];
        let seen = store.writes_seen.load(Ordering::Acquire);
        let lean: Vec<bool> = commits.iter().map(|(lease, commit)| lean(lease, commit, seen)).collect();
        assert_eq!(lean, [true; 3], "every lease knows its head and no write");
        let results = store.batch(&commits, &lean).await;
        assert!(results[0].is_ok() && results[1].is_ok(), "{results:?}");
        assert!(matches!(&results[2], Err(Error::LeaseLost { epoch, .. }) if *epoch == c_old.epoch), "{results:?}");
        let rows: Vec<StoredRow> = sqlx::query_as(
            "SELECT t.thread_id, c.id, c.channels, c.data FROM agentic.checkpoints c JOIN agentic.threads t USING (tid)
             ORDER BY 1, 2",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let two = super::super::codec::encode(&2).unwrap();
        let stored: Vec<(&str, i64)> = rows.iter().map(|(t, id, ..)| (t.as_str(), *id)).collect();
        assert_eq!(stored, [("a", 1), ("a", 2), ("b", 1), ("b", 2), ("c", 1)]);
        for (_, id, channels, data) in rows.iter().filter(|row| row.1 == 2) {
            assert_eq!((channels.as_slice(), data.as_slice()), (&["x".to_owned()][..], &[two.clone()][..]), "{id}");
        }

        // `a2` again: its row is there, so the lean statement fails; one by one, `a2` is found
        // done and `b3` commits.
        let b3 = step("b", b.next_checkpoint_id(), Some(b2.checkpoint.id), 3);
        let results = store.batch(&[(&a, &a2), (&b, &b3)], &[true, true]).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(store.head("a", "").await.unwrap(), Some(a2.checkpoint.id));
        assert_eq!(store.head("b", "").await.unwrap(), Some(b3.checkpoint.id));
    }

    /// A deferred take sent again after its answer was lost (the session died after the commit)
    /// finds the thread it made, with its admission and first step: it adopts both, and the
    /// lease commits on. A take that finds the thread made by another admission is refused.
    #[sqlx::test(migrations = false)]
    async fn a_deferred_take_sent_again_adopts_what_it_stored(pool: PgPool) {
        let store = PostgresCheckpointer::from_pool(pool.clone()).await.unwrap();
        let graph = GraphIdentity { name: "g".to_owned(), hash: "h".to_owned() };
        let request = LeaseRequest { thread: "t", owner: "me", graph: &graph, allow_graph_change: false };
        let admission = commit(1, None, serde_json::json!({"admit": "a1"}));
        let first = commit(2, Some(1), serde_json::json!({}));

        let lease = store.defer_take(&request, &admission);
        let held = held_lock(&lease).unwrap();
        assert!(held.is_deferred());
        assert!(store.send_deferred(held, Some(&first)).await.unwrap(), "the first step went with the take");
        assert!(!held.is_deferred());
        let tid = tid_of(&lease).unwrap();
        // The answer was lost: the lease does not know the take went through.
        let deferred = held.deferred.as_ref().unwrap();
        let lose_answer = || async {
            deferred.taken.store(false, Ordering::Release);
            held.settle("", Some(1), Some(store.writes_seen.load(Ordering::Acquire)));
        };
        lose_answer().await;
        assert!(store.send_deferred(held, Some(&first)).await.unwrap(), "adopted with its first step");
        assert_eq!(tid_of(&lease), Some(tid));
        let stored: Vec<i64> = sqlx::query_scalar("SELECT id FROM agentic.checkpoints WHERE tid = $1 ORDER BY id")
            .bind(tid)
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(stored, [1, 2], "stored once");
        // Lost again, and sent again alone (without the step): adopted; the step's commit, tried
        // again, finds itself stored.
        lose_answer().await;
        assert!(!store.send_deferred(held, None).await.unwrap(), "adopted, its step not sent");
        store.commit(&lease, &first).await.unwrap();
        store.commit(&lease, &commit(3, Some(2), serde_json::json!({}))).await.unwrap();
        assert_eq!(store.head("t", "").await.unwrap(), Some(3));
        drop(lease);

        // Another admission under the same id: not this take's, so not adopted.
        let other = commit(1, None, serde_json::json!({"admit": "a2"}));
        let lease = store.defer_take(&request, &other);
        let refused = store.send_deferred(held_lock(&lease).unwrap(), None).await;
        assert!(matches!(&refused, Err(Error::InvalidState(m)) if m.contains("exists already")), "{refused:?}");
        assert_eq!(store.head("t", "").await.unwrap(), Some(3), "nothing of it stored");
    }
    /// Deferred leases of new threads `threads`, each admitted by checkpoint 1.
    fn deferred_leases(store: &PostgresCheckpointer, threads: &[&str]) -> Vec<Lease> {
        let graph = GraphIdentity { name: "g".to_owned(), hash: "h".to_owned() };
        threads
            .iter()
            .map(|thread| {
                let mut admission = commit(1, None, serde_json::json!({"admit": thread}));
                admission.thread = (*thread).to_owned();
                let request = LeaseRequest { thread, owner: "me", graph: &graph, allow_graph_change: false };
                store.defer_take(&request, &admission)
            })
            .collect()
    }

    /// Sends the takes of `leases` alone, all queued while the lease session is `busy`, then
    /// frees it: the first to get it sends them all.
    async fn send_queued(
        store: &PostgresCheckpointer,
        leases: &[Lease],
        busy: tokio::sync::MutexGuard<'_, (u64, Option<PgConnection>)>,
    ) -> Vec<Result<bool>> {
        let sends = leases.iter().map(|lease| store.send_deferred(held_lock(lease).unwrap(), None));
        let free = async {
            while store.leases.takes().len() < leases.len() {
                tokio::task::yield_now().await;
            }
            drop(busy);
        };
        tokio::join!(futures::future::join_all(sends), free).0
    }

    /// The stored checkpoints: thread and id.
    async fn admitted(pool: &PgPool) -> Vec<(String, i64)> {
        sqlx::query_as(
            "SELECT t.thread_id, c.id FROM agentic.checkpoints c JOIN agentic.threads t USING (tid) ORDER BY 1",
        )
        .fetch_all(pool)
        .await
        .unwrap()
    }

    /// New threads' takes that wait for the lease session go in one statement: the threads it
    /// makes are taken, each with its admission, and their leases commit on. A take it does not
    /// make is sent again alone, which reports why: its lock is held by another session, or a
    /// thread of that id exists (the lock the statement got for it is given back, so the lock is
    /// free once more when the take is refused).
    #[sqlx::test(migrations = false)]
    async fn takes_waiting_for_the_lease_session_go_in_one_statement(pool: PgPool) {
        let store = PostgresCheckpointer::from_pool(pool.clone()).await.unwrap();
        let elsewhere = PostgresCheckpointer::from_pool(pool.clone()).await.unwrap();
        let held_elsewhere = take(&elsewhere, "held").await;
        drop(take(&elsewhere, "exists").await);
        elsewhere.leases.flush_unlocks().await; // `exists` is free, not held
        let threads = ["a", "held", "b", "exists", "c"];
        let leases = deferred_leases(&store, &threads);
        let results = send_queued(&store, &leases, store.leases.conn.lock().await).await;
        assert_eq!(store.leases.take_batches.load(Ordering::Relaxed), 1, "one statement for all");
        for (thread, result) in threads.iter().zip(&results) {
            match *thread {
                "held" => assert!(matches!(result, Err(Error::LeaseHeld { .. })), "{thread}: {result:?}"),
                "exists" => {
                    assert!(
                        matches!(result, Err(Error::InvalidState(m)) if m.contains("exists already")),
                        "{result:?}"
                    );
                }
                _ => assert!(matches!(result, Ok(false)), "{thread}: {result:?}"),
            }
        }
        assert_eq!(admitted(&pool).await, [("a".to_owned(), 1), ("b".to_owned(), 1), ("c".to_owned(), 1)]);
        // This session holds the made threads' locks; the refused take left `exists` free.
        let free: Vec<bool> = sqlx::query_scalar("SELECT pg_try_advisory_lock(k) FROM unnest($1::int8[]) AS k")
            .bind(["a", "exists"].map(lease_key).to_vec())
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(free, [false, true]);
        for (lease, thread) in leases.iter().zip(threads).filter(|(_, t)| ["a", "b", "c"].contains(t)) {
            assert!(!held_lock(lease).unwrap().is_deferred(), "{thread}");
            store.commit(lease, &step(thread, 2, Some(1), 1)).await.unwrap();
            assert_eq!(store.head(thread, "").await.unwrap(), Some(2), "{thread}");
        }
        drop(held_elsewhere);
    }

    /// A statement of several takes that fails (here its session was terminated while the takes
    /// waited for it) leaves each take to be sent again alone, on a new session: every thread is
    /// made once, with its admission.
    #[sqlx::test(migrations = false)]
    async fn takes_sent_together_on_a_dead_session_are_sent_again_alone(pool: PgPool) {
        let store = PostgresCheckpointer::from_pool(pool.clone()).await.unwrap();
        let first = take(&store, "first").await; // opens the lease session
        let threads = ["a", "b", "c"];
        let leases = deferred_leases(&store, &threads);
        let busy = store.leases.conn.lock().await;
        let killed: bool = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_locks
             WHERE locktype = 'advisory' AND granted AND objid = ($1 & 4294967295)::oid
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .bind(lease_key("first"))
        .fetch_one(&pool)
        .await
        .unwrap();
        assert!(killed, "the lease session was found and terminated");
        let results = send_queued(&store, &leases, busy).await;
        assert_eq!(store.leases.take_batches.load(Ordering::Relaxed), 1, "sent together once");
        assert!(results.iter().all(|r| matches!(r, Ok(false))), "{results:?}");
        assert_eq!(store.leases.conn.lock().await.0, 2, "the takes alone opened a new session");
        assert_eq!(admitted(&pool).await, [("a".to_owned(), 1), ("b".to_owned(), 1), ("c".to_owned(), 1)]);
        for (lease, thread) in leases.iter().zip(threads) {
            store.commit(lease, &step(thread, 2, Some(1), 1)).await.unwrap();
        }
        drop(first);
    }
    /// A holder dropped while its statement of several takes is in flight (its caller gave up)
    /// closes the lease session rather than keep a session whose locks it no longer knows: the
    /// take it carried for another caller goes alone on a new session at once (made, or refused
    /// while the old backend still holds its lock), and the locks of the abandoned statement go
    /// when its backend does. Here the statement waits for another transaction inserting `a`.
    #[sqlx::test(migrations = false)]
    async fn a_holder_dropped_mid_statement_closes_the_lease_session(pool: PgPool) {
        let store = PostgresCheckpointer::from_pool(pool.clone()).await.unwrap();
        let leases = deferred_leases(&store, &["a", "b"]);
        let mut blocker = pool.begin().await.unwrap();
        sqlx::query("INSERT INTO agentic.threads (thread_id, graph_name, graph_hash, epoch) VALUES ('a', 'g', 'h', 1)")
            .execute(&mut *blocker)
            .await
            .unwrap();
        let busy = store.leases.conn.lock().await;
        let mut holder = Box::pin(store.send_deferred(held_lock(&leases[0]).unwrap(), None));
        let mut other = Box::pin(store.send_deferred(held_lock(&leases[1]).unwrap(), None));
        assert!(futures::poll!(&mut holder).is_pending() && futures::poll!(&mut other).is_pending());
        drop(busy);
        let waiting = async {
            loop {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                         AND wait_event_type = 'Lock' AND query LIKE '%WITH ORDINALITY AS r(thread_id%'",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                if waiting > 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::select! {
            done = &mut holder => panic!("the statement should wait for `a`: {done:?}"),
            () = waiting => {}
        }
        drop(holder);
        let other = tokio::time::timeout(Duration::from_secs(10), other).await.expect("not stuck behind the statement");
        assert!(matches!(other, Ok(false) | Err(Error::LeaseHeld { .. })), "{other:?}");
        assert_eq!(store.leases.conn.lock().await.0, 2, "the session was closed and opened anew");
        blocker.rollback().await.unwrap();
        // The old backend finishes its statement, cannot answer, and exits: `a` is free.
        let free = async {
            loop {
                let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(lease_key("a"))
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                if free {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), free).await.expect("the abandoned statement's lock was released");
    }

    /// Advisory locks granted in this test's database.
    async fn advisory_locks(pool: &PgPool) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(pool)
        .await
        .unwrap()
    }

    /// Waits until no advisory lock is held in this test's database.
    async fn all_unlocked(pool: &PgPool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while advisory_locks(pool).await > 0 {
            assert!(tokio::time::Instant::now() < deadline, "dropped leases still locked after 5 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[sqlx::test(migrations = false)]
    async fn leases_dropped_while_a_flush_is_armed_go_with_it(pool: PgPool) {
        let store = PostgresCheckpointer::from_pool(pool.clone()).await.unwrap();
        let leases = vec![take(&store, "a").await, take(&store, "b").await, take(&store, "c").await];
        assert_eq!(advisory_locks(&pool).await, 3);
        // Dropped with no await between them on this test's one-thread runtime: the flush the
        // first drop schedules cannot fire before the last.
        drop(leases);
        assert_eq!(store.leases.flushes.load(Ordering::Relaxed), 1);
        // No lease statement comes to carry the unlocks: that one flush sends all three.
        all_unlocked(&pool).await;
        assert_eq!(store.leases.flushes.load(Ordering::Relaxed), 1);

        // Once it has fired, the next drop schedules a flush of its own.
        drop(take(&store, "d").await);
        assert_eq!(store.leases.flushes.load(Ordering::Relaxed), 2);
        all_unlocked(&pool).await;
    }

    /// A take whose caller gave up while it waited for the lease session, made by another
    /// caller's statement, holds a lock no lease will release: it is unlocked as a dropped
    /// lease's is, by the flush, with no other statement to carry it.
    #[sqlx::test(migrations = false)]
    async fn a_take_made_for_a_caller_gone_is_unlocked_by_the_flush(pool: PgPool) {
        let store = PostgresCheckpointer::from_pool(pool.clone()).await.unwrap();
        let mut leases = deferred_leases(&store, &["gone", "kept"]);
        let busy = store.leases.conn.lock().await;
        let mut gone = Box::pin(store.send_deferred(held_lock(&leases[0]).unwrap(), None));
        assert!(futures::poll!(&mut gone).is_pending());
        assert_eq!(store.leases.takes().len(), 1, "the take waits in the queue");
        drop(gone);
        drop(leases.remove(0));
        let results = send_queued(&store, &leases, busy).await;
        assert!(matches!(results[..], [Ok(false)]), "{results:?}");
        assert_eq!(store.leases.take_batches.load(Ordering::Relaxed), 1, "both in one statement");
        assert_eq!(admitted(&pool).await, [("gone".to_owned(), 1), ("kept".to_owned(), 1)]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while advisory_locks(&pool).await > 1 {
            assert!(tokio::time::Instant::now() < deadline, "the abandoned take's lock is still held after 5 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let free: Vec<bool> = sqlx::query_scalar("SELECT pg_try_advisory_lock(k) FROM unnest($1::int8[]) AS k")
            .bind(["gone", "kept"].map(lease_key).to_vec())
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(free, [true, false], "`gone` free, `kept` still held by its lease");
    }
}
