//! SQLite checkpointer: the embedded default, one file per store.
//!
//! - The file runs in WAL mode with `synchronous=FULL`: a commit is durable once it returns, and
//!   readers don't wait for the writer. Every write is one `BEGIN IMMEDIATE` transaction.
//! - A SQLite file is local, so a lease is held by a live process: the thread row records its
//!   holder as `host:pid:process-start:nonce`. An acquire takes the thread when no one holds it,
//!   or when the holder is a process of this host that is gone (the start time read from
//!   `/proc` tells a reused pid apart), so a runner killed with SIGKILL never blocks its
//!   successor. Dropping the [`Lease`] releases it at once for this process, and clears the
//!   holder in the file soon after (best effort: a holder left behind by a dead process is free).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, Transaction};

use super::{
    ChannelRows, CheckpointMeta, CheckpointRow, Checkpointer, GraphIdentity, Lease, LeaseRequest, ListFilter, MetaRow,
    PendingWrite, PutOutcome, StepCommit, StepRef, StoredCheckpoint, ThreadInfo, ThreadRow, WriteRow, blob_heads,
    blobs_to_keep, materialize_rows, stale_task, store_error, unix_micros,
};
use crate::error::{Error, Result};

const BACKEND: &str = "sqlite";

/// The embedded migrations of the SQLite schema.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

/// Stores checkpoints in a SQLite file.
#[derive(Clone, Debug)]
pub struct SqliteCheckpointer {
    pool: SqlitePool,
}

/// `SQLITE_BUSY` and `SQLITE_LOCKED` (with their extended codes): another connection holds the lock.
fn transient_code(code: &str) -> bool {
    code.parse::<i32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6))
}

fn sqlite_error(operation: &str) -> impl Fn(sqlx::Error) -> Error + '_ {
    move |err| store_error(BACKEND, operation, &err, transient_code)
}

impl SqliteCheckpointer {
    /// Opens the store in the file at `path`, creating it if missing, and brings the schema up to
    /// date.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10));
        let pool =
            SqlitePoolOptions::new().max_connections(4).connect_with(options).await.map_err(sqlite_error("open"))?;
        Self::from_pool(pool).await
    }

    /// A private in-memory store (tests, ephemeral runs): one connection that lives as long as
    /// the store.
    pub async fn open_in_memory() -> Result<Self> {
        let options = SqliteConnectOptions::new().in_memory(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await
            .map_err(sqlite_error("open"))?;
        Self::from_pool(pool).await
    }

    async fn from_pool(pool: SqlitePool) -> Result<Self> {
        MIGRATOR.run(&pool).await.map_err(|e| sqlite_error("migrate")(e.into()))?;
        Ok(SqliteCheckpointer { pool })
    }

    /// The connection pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    async fn write_tx(&self, operation: &str) -> Result<Transaction<'static, Sqlite>> {
        self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(sqlite_error(operation))
    }

    /// In one transaction: checks the holder and the graph, bumps the epoch, records `holder`.
    async fn take_thread(&self, request: &LeaseRequest<'_>, holder: &str) -> Result<(u64, u64)> {
        let fail = sqlite_error("acquire");
        let mut tx = self.write_tx("acquire").await?;
        let current: Option<(String, String, Option<String>, Option<String>)> =
            sqlx::query_as("SELECT graph_name, graph_hash, owner, holder FROM threads WHERE thread_id = ?1")
                .bind(request.thread)
                .fetch_optional(&mut *tx)
                .await
                .map_err(&fail)?;
        if let Some((name, hash, owner, current_holder)) = current {
            let alive = match current_holder {
                // Reads /proc (or runs `kill -0`): blocking work.
                Some(holder) => tokio::task::spawn_blocking(move || holder_alive(&holder)).await.map_err(|e| {
                    Error::Checkpoint { backend: BACKEND, message: format!("acquire: {e}"), transient: false }
                })?,
                None => None,
            };
            if let Some(until) = alive {
                return Err(Error::LeaseHeld {
                    thread: request.thread.to_owned(),
                    owner: owner.unwrap_or_default(),
                    until,
                });
            }
            let stored = GraphIdentity { name, hash };
            if stored != *request.graph && !request.allow_graph_change {
                return Err(Error::GraphMismatch {
                    thread: request.thread.to_owned(),
                    stored: stored.to_string(),
                    requested: request.graph.to_string(),
                });
            }
        }
        let now = unix_micros(SystemTime::now());
        let (tid, epoch): (i64, i64) = sqlx::query_as(
            "INSERT INTO threads (thread_id, graph_name, graph_hash, owner, holder, epoch, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, ?6)
             ON CONFLICT (thread_id) DO UPDATE
             SET epoch = epoch + 1, owner = excluded.owner, holder = excluded.holder,
                 graph_name = excluded.graph_name, graph_hash = excluded.graph_hash, updated_at = excluded.updated_at
             RETURNING tid, epoch",
        )
        .bind(request.thread)
        .bind(&request.graph.name)
        .bind(&request.graph.hash)
        .bind(request.owner)
        .bind(holder)
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .map_err(&fail)?;
        let max_seq: i64 = sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM checkpoints WHERE tid = ?1")
            .bind(tid)
            .fetch_one(&mut *tx)
            .await
            .map_err(&fail)?;
        tx.commit().await.map_err(&fail)?;
        Ok((epoch as u64, max_seq as u64))
    }
}

#[async_trait]
impl Checkpointer for SqliteCheckpointer {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn acquire(&self, request: LeaseRequest<'_>) -> Result<Lease> {
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let holder = format!("{}:{}:{}:{}", ME.host, ME.pid, ME.start, nonce);
        // Live before it is written: another acquire of this process must see it held.
        live_leases().insert(nonce.clone());
        match self.take_thread(&request, &holder).await {
            Ok((epoch, max_seq)) => {
                let guard = ProcessLease { pool: self.pool.clone(), thread: request.thread.to_owned(), holder, nonce };
                Ok(Lease::new(request.thread, request.owner, epoch, max_seq, Some(Box::new(guard))))
            }
            Err(err) => {
                live_leases().remove(&nonce);
                Err(err)
            }
        }
    }

    async fn thread(&self, thread: &str) -> Result<Option<ThreadInfo>> {
        let row: Option<ThreadRow> =
            sqlx::query_as("SELECT graph_name, graph_hash, epoch, owner FROM threads WHERE thread_id = ?1")
                .bind(thread)
                .fetch_optional(&self.pool)
                .await
                .map_err(sqlite_error("read thread"))?;
        Ok(row.map(|row| row.into_info(thread)))
    }

    async fn commit(&self, lease: &Lease, commit: &StepCommit) -> Result<()> {
        let fail = sqlite_error("commit");
        let ckpt = &commit.checkpoint;
        let body = super::codec::encode_body(&ckpt.body)?;
        let metadata = super::codec::json_text(&*ckpt.metadata)?;
        let mut tx = self.write_tx("commit").await?;
        let thread: Option<(i64, i64)> = sqlx::query_as("SELECT tid, epoch FROM threads WHERE thread_id = ?1")
            .bind(&commit.thread)
            .fetch_optional(&mut *tx)
            .await
            .map_err(&fail)?;
        let Some((tid, epoch)) = thread else {
            return Err(Error::NotFound(format!("thread `{}`", commit.thread)));
        };
        if epoch as u64 != lease.epoch {
            return Err(Error::LeaseLost { thread: commit.thread.clone(), epoch: lease.epoch });
        }
        let head: Option<i64> = sqlx::query_scalar("SELECT head FROM heads WHERE tid = ?1 AND ns = ?2")
            .bind(tid)
            .bind(&commit.ns)
            .fetch_optional(&mut *tx)
            .await
            .map_err(&fail)?;
        let head = head.map(|h| h as u64);
        if head == Some(ckpt.id) {
            let stored: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM checkpoints WHERE tid = ?1 AND ns = ?2 AND id = ?3)")
                    .bind(tid)
                    .bind(&commit.ns)
                    .bind(ckpt.id as i64)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(&fail)?;
            if stored {
                return Ok(()); // a retry of a commit that went through
            }
        }
        if head != ckpt.expected_head {
            return Err(Error::HeadMoved {
                thread: commit.thread.clone(),
                ns: commit.ns.clone(),
                expected: ckpt.expected_head,
                found: head,
            });
        }
        for blob in &commit.blobs {
            sqlx::query(
                "INSERT INTO channel_values (tid, ns, channel, version, base, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (tid, ns, channel, version) DO UPDATE SET base = excluded.base, data = excluded.data",
            )
            .bind(tid)
            .bind(&commit.ns)
            .bind(&blob.channel)
            .bind(blob.version as i64)
            .bind(blob.base.map(|b| b as i64))
            .bind(&blob.data)
            .execute(&mut *tx)
            .await
            .map_err(&fail)?;
        }
        sqlx::query(
            "INSERT INTO checkpoints (tid, ns, id, parent, step, source, body, metadata, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT (tid, ns, id) DO UPDATE
             SET parent = excluded.parent, step = excluded.step, source = excluded.source, body = excluded.body,
                 metadata = excluded.metadata, created_at = excluded.created_at",
        )
        .bind(tid)
        .bind(&commit.ns)
        .bind(ckpt.id as i64)
        .bind(ckpt.parent.map(|p| p as i64))
        .bind(ckpt.step as i64)
        .bind(ckpt.source.as_str())
        .bind(body)
        .bind(metadata)
        .bind(unix_micros(SystemTime::now()))
        .execute(&mut *tx)
        .await
        .map_err(&fail)?;
        sqlx::query(
            "INSERT INTO heads (tid, ns, head) VALUES (?1, ?2, ?3)
             ON CONFLICT (tid, ns) DO UPDATE SET head = excluded.head",
        )
        .bind(tid)
        .bind(&commit.ns)
        .bind(ckpt.id as i64)
        .execute(&mut *tx)
        .await
        .map_err(&fail)?;
        if let Some(parent) = ckpt.parent {
            sqlx::query("DELETE FROM writes WHERE tid = ?1 AND ns = ?2 AND checkpoint = ?3")
                .bind(tid)
                .bind(&commit.ns)
                .bind(parent as i64)
                .execute(&mut *tx)
                .await
                .map_err(&fail)?;
        }
        tx.commit().await.map_err(&fail)
    }

    async fn flush(&self, _lease: &Lease) -> Result<()> {
        Ok(()) // every commit is durable
    }

    async fn head(&self, thread: &str, ns: &str) -> Result<Option<u64>> {
        let head: Option<i64> = sqlx::query_scalar(
            "SELECT h.head FROM threads t JOIN heads h ON h.tid = t.tid WHERE t.thread_id = ?1 AND h.ns = ?2",
        )
        .bind(thread)
        .bind(ns)
        .fetch_optional(&self.pool)
        .await
        .map_err(sqlite_error("read head"))?;
        Ok(head.map(|h| h as u64))
    }

    async fn load(&self, thread: &str, ns: &str, id: Option<u64>) -> Result<Option<StoredCheckpoint>> {
        let fail = sqlite_error("load");
        // A read transaction: the checkpoint and its blobs from one snapshot, whatever a
        // concurrent prune does.
        let mut tx = self.pool.begin().await.map_err(&fail)?;
        let row: Option<LoadRow> = sqlx::query_as(
            "SELECT t.tid, c.id, c.parent, c.step, c.source, c.body, c.metadata, c.created_at AS created_us
             FROM threads t
                LEFT JOIN heads h ON h.tid = t.tid AND h.ns = ?2
                JOIN checkpoints c ON c.tid = t.tid AND c.ns = ?2 AND c.id = coalesce(?3, h.head)
             WHERE t.thread_id = ?1",
        )
        .bind(thread)
        .bind(ns)
        .bind(id.map(|i| i as i64))
        .fetch_optional(&mut *tx)
        .await
        .map_err(&fail)?;
        let Some(LoadRow { tid, row }) = row else { return Ok(None) };
        let body = row.body()?;
        let mut rows: Vec<ChannelRows> = Vec::with_capacity(body.versions.len());
        for (channel, head) in blob_heads(&body) {
            // The chain from the head row through `base`, one key probe a row. CROSS JOIN keeps
            // the chain as the outer loop: with a plain join SQLite 3.51 scans the channel's rows
            // on every step of the recursion.
            let found: Vec<(i64, Option<i64>, Vec<u8>)> = sqlx::query_as(
                "WITH RECURSIVE chain(version, base, data) AS (
                    SELECT version, base, data FROM channel_values
                    WHERE tid = ?1 AND ns = ?2 AND channel = ?3 AND version = ?4
                    UNION ALL
                    SELECT v.version, v.base, v.data
                    FROM chain c CROSS JOIN channel_values v
                    WHERE v.tid = ?1 AND v.ns = ?2 AND v.channel = ?3 AND v.version = c.base AND v.version < c.version
                 )
                 SELECT version, base, data FROM chain",
            )
            .bind(tid)
            .bind(ns)
            .bind(channel)
            .bind(head as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(&fail)?;
            let mut run = ChannelRows {
                channel: channel.to_owned(),
                versions: Vec::with_capacity(found.len()),
                bases: Vec::with_capacity(found.len()),
                data: Vec::with_capacity(found.len()),
            };
            for (version, base, data) in found {
                run.versions.push(version);
                run.bases.push(base);
                run.data.push(data);
            }
            rows.push(run);
        }
        tx.commit().await.map_err(&fail)?;
        let values = materialize_rows(&body, rows)?;
        Ok(Some(row.into_stored(BACKEND, ns, body, values)?))
    }

    async fn list(&self, thread: &str, ns: &str, filter: &ListFilter) -> Result<Vec<CheckpointMeta>> {
        let rows: Vec<MetaRow> = sqlx::query_as(
            "SELECT c.id, c.parent, c.step, c.source, c.metadata
             FROM threads t JOIN checkpoints c ON c.tid = t.tid AND c.ns = ?2
             WHERE t.thread_id = ?1
               AND (?3 IS NULL OR c.id < ?3)
               AND (?4 IS NULL OR c.source = ?4)
             ORDER BY c.id DESC
             LIMIT ?5",
        )
        .bind(thread)
        .bind(ns)
        .bind(filter.before.map(|b| b as i64))
        .bind(filter.source.map(super::Source::as_str))
        // SQLite reads a negative limit as none.
        .bind(filter.limit.map_or(-1, |l| l.min(i64::MAX as usize) as i64))
        .fetch_all(&self.pool)
        .await
        .map_err(sqlite_error("list"))?;
        rows.into_iter().map(|r| r.into_meta(BACKEND, ns)).collect()
    }

    async fn put_writes(&self, step: StepRef<'_>, writes: &[PendingWrite]) -> Result<PutOutcome> {
        let fail = sqlite_error("put writes");
        let mut tx = self.write_tx("put writes").await?;
        // One writer at a time: a runner's write and another runner's take of the thread are
        // ordered, and the epoch tells a deposed runner's write apart.
        let found: Option<(i64, i64)> = sqlx::query_as(
            "SELECT t.tid, t.epoch FROM threads t JOIN heads h ON h.tid = t.tid
             WHERE t.thread_id = ?1 AND h.ns = ?2 AND h.head = ?3",
        )
        .bind(step.thread)
        .bind(step.ns)
        .bind(step.checkpoint as i64)
        .fetch_optional(&mut *tx)
        .await
        .map_err(&fail)?;
        let Some((tid, epoch)) = found else { return Err(stale_task(step, writes)) };
        if let Some(mine) = step.epoch.filter(|&e| e as i64 != epoch) {
            return Err(Error::LeaseLost { thread: step.thread.to_owned(), epoch: mine });
        }
        let mut outcome = PutOutcome::Accepted;
        for write in writes {
            let inserted = sqlx::query(
                "INSERT INTO writes (tid, ns, checkpoint, task, kind, key, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT DO NOTHING",
            )
            .bind(tid)
            .bind(step.ns)
            .bind(step.checkpoint as i64)
            .bind(&write.task)
            .bind(write.kind.as_str())
            .bind(&write.key)
            .bind(&write.data)
            .execute(&mut *tx)
            .await
            .map_err(&fail)?;
            if inserted.rows_affected() == 0 {
                outcome = PutOutcome::Duplicate;
            }
        }
        tx.commit().await.map_err(&fail)?;
        Ok(outcome)
    }

    async fn pending_writes(&self, step: StepRef<'_>) -> Result<Vec<PendingWrite>> {
        let rows: Vec<WriteRow> = sqlx::query_as(
            "SELECT w.task, w.kind, w.key, w.data
             FROM threads t JOIN writes w ON w.tid = t.tid
             WHERE t.thread_id = ?1 AND w.ns = ?2 AND w.checkpoint = ?3
             ORDER BY w.rowid",
        )
        .bind(step.thread)
        .bind(step.ns)
        .bind(step.checkpoint as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(sqlite_error("read pending writes"))?;
        rows.into_iter().map(|r| r.into_write(BACKEND)).collect()
    }

    async fn delete_thread(&self, thread: &str) -> Result<()> {
        let fail = sqlite_error("delete thread");
        let mut tx = self.write_tx("delete thread").await?;
        let tid: Option<i64> = sqlx::query_scalar("DELETE FROM threads WHERE thread_id = ?1 RETURNING tid")
            .bind(thread)
            .fetch_optional(&mut *tx)
            .await
            .map_err(&fail)?;
        if let Some(tid) = tid {
            for table in [
                "DELETE FROM heads WHERE tid = ?1",
                "DELETE FROM checkpoints WHERE tid = ?1",
                "DELETE FROM channel_values WHERE tid = ?1",
                "DELETE FROM writes WHERE tid = ?1",
            ] {
                sqlx::query(table).bind(tid).execute(&mut *tx).await.map_err(&fail)?;
            }
        }
        tx.commit().await.map_err(&fail)
    }

    async fn prune(&self, thread: &str, keep: usize) -> Result<u64> {
        let fail = sqlite_error("prune");
        let mut tx = self.write_tx("prune").await?;
        let tid: Option<i64> = sqlx::query_scalar("SELECT tid FROM threads WHERE thread_id = ?1")
            .bind(thread)
            .fetch_optional(&mut *tx)
            .await
            .map_err(&fail)?;
        let Some(tid) = tid else { return Ok(0) };
        let gone: Vec<(String, i64)> = sqlx::query_as(
            "DELETE FROM checkpoints
             WHERE tid = ?1 AND (ns, id) IN (
                SELECT ns, id FROM (
                    SELECT ns, id, row_number() OVER (PARTITION BY ns ORDER BY id DESC) AS rank
                    FROM checkpoints WHERE tid = ?1
                ) WHERE rank > ?2
             )
             RETURNING ns, id",
        )
        .bind(tid)
        .bind(keep.min(i64::MAX as usize) as i64)
        .fetch_all(&mut *tx)
        .await
        .map_err(&fail)?;
        for (ns, id) in &gone {
            sqlx::query("DELETE FROM writes WHERE tid = ?1 AND ns = ?2 AND checkpoint = ?3")
                .bind(tid)
                .bind(ns)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(&fail)?;
        }
        let kept: Vec<(String, Vec<u8>)> = sqlx::query_as("SELECT ns, body FROM checkpoints WHERE tid = ?1")
            .bind(tid)
            .fetch_all(&mut *tx)
            .await
            .map_err(&fail)?;
        let kept =
            kept.into_iter().map(|(ns, body)| Ok((ns, super::codec::decode(&body)?))).collect::<Result<Vec<_>>>()?;
        let stored: Vec<(String, String, i64, Option<i64>)> =
            sqlx::query_as("SELECT ns, channel, version, base FROM channel_values WHERE tid = ?1")
                .bind(tid)
                .fetch_all(&mut *tx)
                .await
                .map_err(&fail)?;
        let deltas: HashMap<(String, String, u64), u64> = stored
            .iter()
            .filter_map(|(ns, channel, v, base)| Some(((ns.clone(), channel.clone(), *v as u64), (*base)? as u64)))
            .collect();
        let used: HashSet<(String, String, u64)> = blobs_to_keep(&kept, &deltas).into_iter().collect();
        for (ns, channel, v, _) in stored {
            if !used.contains(&(ns.clone(), channel.clone(), v as u64)) {
                sqlx::query("DELETE FROM channel_values WHERE tid = ?1 AND ns = ?2 AND channel = ?3 AND version = ?4")
                    .bind(tid)
                    .bind(ns)
                    .bind(channel)
                    .bind(v)
                    .execute(&mut *tx)
                    .await
                    .map_err(&fail)?;
            }
        }
        tx.commit().await.map_err(&fail)?;
        Ok(gone.len() as u64)
    }
}

#[derive(sqlx::FromRow)]
struct LoadRow {
    tid: i64,
    #[sqlx(flatten)]
    row: CheckpointRow,
}

/// This process, as lease holders name it.
struct Process {
    host: String,
    pid: u32,
    start: String,
}

static ME: LazyLock<Process> = LazyLock::new(|| {
    let pid = std::process::id();
    Process { host: hostname(), pid, start: process_start(pid).unwrap_or_else(|| "0".to_owned()) }
});

/// Nonces of the leases this process holds. A holder naming this process is live only while
/// its nonce is here, so a dropped lease is free at once even before the file says so.
static LIVE: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(Mutex::default);

fn live_leases() -> std::sync::MutexGuard<'static, HashSet<String>> {
    // The set stays consistent whatever panicked while holding it (single inserts and removes).
    LIVE.lock().unwrap_or_else(PoisonError::into_inner)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "localhost".to_owned())
}

/// The boot this host is in: a start time is only meaningful within one boot.
static BOOT: LazyLock<String> = LazyLock::new(|| {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().chars().take(8).collect())
        .unwrap_or_default()
});

/// A running process's start time (clock ticks since boot, with the boot), from `/proc`.
/// `None` if there is no such process, or it is a zombie: it has exited.
fn process_start(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain anything: count from the
    // last `)`. Field 3 is the state, field 22 the start time.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    if matches!(fields.first(), Some(&("Z" | "X" | "x"))) {
        return None;
    }
    Some(format!("{}@{}", fields.get(19)?, *BOOT))
}

/// Whether a recorded holder still holds its lease: `Some(until)` (for [`Error::LeaseHeld`])
/// if it does.
fn holder_alive(holder: &str) -> Option<String> {
    let mut parts = holder.rsplitn(4, ':');
    let (Some(nonce), Some(start), Some(pid), Some(host)) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        tracing::warn!(holder, "unrecognised SQLite lease holder: taking the thread");
        return None;
    };
    let Ok(pid) = pid.parse::<u32>() else {
        tracing::warn!(holder, "unrecognised SQLite lease holder: taking the thread");
        return None;
    };
    if host != ME.host {
        // Another host's processes can't be checked: the file is shared, the holder counts.
        return Some(format!("held while process {pid} on host `{host}` lives"));
    }
    let alive = if pid == ME.pid && start == ME.start {
        live_leases().contains(nonce)
    } else if ME.start == "0" {
        // No /proc here: ask whether the pid exists (a reused pid is taken for the holder).
        std::process::Command::new("kill")
            .args(["-0", &pid.to_string()])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    } else {
        process_start(pid).is_some_and(|s| s == start)
    };
    alive.then(|| format!("held while process {pid} lives"))
}

/// The lease's hold on the thread row: dropping it releases the lease.
struct ProcessLease {
    pool: SqlitePool,
    thread: String,
    holder: String,
    nonce: String,
}

impl Drop for ProcessLease {
    fn drop(&mut self) {
        live_leases().remove(&self.nonce);
        let pool = self.pool.clone();
        let thread = std::mem::take(&mut self.thread);
        let holder = std::mem::take(&mut self.holder);
        let release = async move {
            // Only this holder's mark: the thread may have been taken since.
            let _ = sqlx::query("UPDATE threads SET holder = NULL WHERE thread_id = ?1 AND holder = ?2")
                .bind(thread)
                .bind(holder)
                .execute(&pool)
                .await;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(release);
        } else {
            std::thread::spawn(move || {
                if let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    runtime.block_on(release);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_file_is_opened_in_wal_mode_with_full_sync() {
        let dir = std::env::temp_dir().join(format!("agentic-sqlite-pragmas-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = SqliteCheckpointer::open(dir.join("p.db")).await.unwrap();
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(store.pool()).await.unwrap();
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous").fetch_one(store.pool()).await.unwrap();
        assert_eq!(mode.to_lowercase(), "wal");
        assert_eq!(sync, 2, "synchronous=FULL");
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn moving_channel_values_to_a_rowid_table_keeps_the_rows_and_the_key() {
        let dir = std::env::temp_dir().join(format!("agentic-sqlite-migrate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.db");
        // A file at the first migration, with one stored value.
        {
            let options = SqliteConnectOptions::new().filename(&path).create_if_missing(true);
            let pool = SqlitePool::connect_with(options).await.unwrap();
            let first = sqlx::migrate::Migrator {
                migrations: std::borrow::Cow::Owned(vec![MIGRATOR.migrations[0].clone()]),
                ..sqlx::migrate::Migrator::DEFAULT
            };
            first.run(&pool).await.unwrap();
            sqlx::query("INSERT INTO channel_values (tid, ns, channel, version, base, data) VALUES (1, '', 'c', 7, NULL, x'01')")
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        }
        let store = SqliteCheckpointer::open(&path).await.unwrap();
        let rows: Vec<(i64, Vec<u8>)> =
            sqlx::query_as("SELECT version, data FROM channel_values").fetch_all(store.pool()).await.unwrap();
        assert_eq!(rows, vec![(7, vec![1])]);
        let table: String = sqlx::query_scalar("SELECT sql FROM sqlite_master WHERE name = 'channel_values'")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert!(!table.to_uppercase().contains("WITHOUT ROWID"), "{table}");
        // The key still decides conflicts.
        sqlx::query(
            "INSERT INTO channel_values (tid, ns, channel, version, base, data) VALUES (1, '', 'c', 7, NULL, x'02')
             ON CONFLICT (tid, ns, channel, version) DO UPDATE SET data = excluded.data",
        )
        .execute(store.pool())
        .await
        .unwrap();
        let data: Vec<u8> =
            sqlx::query_scalar("SELECT data FROM channel_values").fetch_one(store.pool()).await.unwrap();
        assert_eq!(data, vec![2]);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn this_process_is_alive_only_while_its_lease_is_held() {
        let holder = format!("{}:{}:{}:{}", ME.host, ME.pid, ME.start, "n-unit-1");
        assert_eq!(holder_alive(&holder), None);
        live_leases().insert("n-unit-1".to_owned());
        assert_eq!(holder_alive(&holder), Some(format!("held while process {} lives", ME.pid)));
        live_leases().remove("n-unit-1");
        assert_eq!(holder_alive(&holder), None);
    }

    #[test]
    fn a_reused_pid_does_not_hold_the_lease() {
        // pid 1 is alive, but it did not start at tick 0 of another boot.
        assert_eq!(holder_alive(&format!("{}:1:0@00000000:n", ME.host)), None);
    }

    #[test]
    fn a_live_process_of_this_host_holds_the_lease() {
        let start = process_start(1);
        assert!(start.is_some(), "pid 1 runs");
        let holder = format!("{}:1:{}:n", ME.host, start.unwrap_or_default());
        assert_eq!(holder_alive(&holder), Some("held while process 1 lives".to_owned()));
    }

    #[test]
    fn another_hosts_holder_counts_as_alive() {
        assert_eq!(
            holder_alive("elsewhere:12:34@x:n"),
            Some("held while process 12 on host `elsewhere` lives".to_owned())
        );
    }

    #[test]
    fn busy_and_locked_are_transient() {
        assert!(transient_code("5"));
        assert!(transient_code("517"));
        assert!(transient_code("6"));
        assert!(!transient_code("19"));
        assert!(!transient_code("2067"));
    }
}
