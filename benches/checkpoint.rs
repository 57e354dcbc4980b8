//! Criterion: checkpoint put (one super-step's commit) and get (loading the head with its
//! values) per backend, for states of 100 B, 10 KiB and 1 MiB.
//!
//! Backends: memory, SQLite (a file in a temporary directory) and PostgreSQL at
//! `BENCH_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/bench_agentic`, created if
//! missing); PostgreSQL is skipped with a note when it cannot be reached. Each put commits a new
//! version of one channel holding the whole state; old checkpoints are pruned outside the timing.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentic_runtime::SharedCheckpointer;
use agentic_runtime::checkpoint::{
    ChannelBlob, ChannelVersion, CheckpointBody, GraphIdentity, Lease, LeaseRequest, MemoryCheckpointer, NewCheckpoint,
    PostgresCheckpointer, Source, SqliteCheckpointer, StepCommit,
};
use criterion::{BenchmarkId, Criterion, Throughput};
use serde_json::{Value, json};
use sqlx::{ConnectOptions, Connection};

const SIZES: [(&str, usize); 3] = [("100B", 100), ("10KiB", 10 * 1024), ("1MiB", 1024 * 1024)];
const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/bench_agentic";
/// Puts between two (untimed) prunes of the benchmark thread.
const PRUNE_EVERY: u64 = 16;

fn fail<T, E: std::fmt::Display>(result: Result<T, E>) -> T {
    match result {
        Ok(value) => value,
        Err(e) => panic!("benchmark setup failed: {e}"),
    }
}

/// The JSON encoding of a string of hex digits: `size` bytes in all, barely compressible.
fn state_bytes(size: usize) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut raw = vec![0u8; size.saturating_sub(2).div_ceil(2)];
    blake3::Hasher::new().update(&size.to_le_bytes()).finalize_xof().fill(&mut raw);
    let mut hex: String =
        raw.iter().flat_map(|b| [HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]).map(char::from).collect();
    hex.truncate(size.saturating_sub(2));
    fail(agentic_runtime::checkpoint::codec::encode(&Value::String(hex)))
}

/// Connects to PostgreSQL, creating the database if it is missing; `None` (with a note) when the
/// server cannot be reached.
async fn postgres() -> Option<PostgresCheckpointer> {
    let url = std::env::var("BENCH_DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
    let options = match sqlx::postgres::PgConnectOptions::from_str(&url) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("note: skipping PostgreSQL benchmarks: bad BENCH_DATABASE_URL ({e})");
            return None;
        }
    };
    match options.connect().await {
        Ok(conn) => {
            let _ = conn.close().await;
        }
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {
            let name = options.get_database().unwrap_or_default().replace('"', "\"\"");
            let created = async {
                let mut server = options.clone().database("postgres").connect().await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\""))).execute(&mut server).await?;
                server.close().await
            };
            if let Err(e) = created.await {
                eprintln!("note: skipping PostgreSQL benchmarks: cannot create the database ({e})");
                return None;
            }
        }
        Err(e) => {
            eprintln!("note: skipping PostgreSQL benchmarks: PostgreSQL not reachable ({e})");
            return None;
        }
    }
    match PostgresCheckpointer::connect(&url).await {
        Ok(store) => Some(store),
        Err(e) => {
            eprintln!("note: skipping PostgreSQL benchmarks: {e}");
            None
        }
    }
}

/// A thread the benchmark writes to, with its lease and head.
struct Writer {
    store: SharedCheckpointer,
    lease: Lease,
    thread: String,
    head: Option<u64>,
    step: u64,
}

impl Writer {
    async fn open(store: SharedCheckpointer, thread: String) -> agentic_runtime::Result<Self> {
        let identity = GraphIdentity { name: "bench-checkpoint".to_owned(), hash: "0".to_owned() };
        // Leftovers of an earlier run on the same thread id are removed first.
        store.delete_thread(&thread).await?;
        let request = LeaseRequest { thread: &thread, owner: "bench", graph: &identity, allow_graph_change: true };
        let lease = store.acquire(request).await?;
        Ok(Writer { store, lease, thread, head: None, step: 0 })
    }

    /// The next step's commit: a new version of the `state` channel.
    fn next(&mut self, data: &[u8]) -> StepCommit {
        let id = self.lease.next_checkpoint_id();
        let versions = BTreeMap::from([("state".to_owned(), ChannelVersion::whole(id))]);
        self.step += 1;
        StepCommit {
            thread: self.thread.clone(),
            ns: String::new(),
            checkpoint: NewCheckpoint {
                id,
                parent: self.head,
                expected_head: self.head,
                step: self.step,
                source: Source::Loop,
                body: std::sync::Arc::new(CheckpointBody { versions, ..CheckpointBody::default() }),
                metadata: std::sync::Arc::new(json!({"source": "loop", "step": self.step}).into()),
            },
            blobs: vec![ChannelBlob { channel: "state".to_owned(), version: id, base: None, data: data.to_vec() }],
        }
    }

    async fn put(&mut self, commit: &StepCommit) -> agentic_runtime::Result<()> {
        self.store.commit(&self.lease, commit).await?;
        self.head = Some(commit.checkpoint.id);
        Ok(())
    }
}

fn bench_backend(c: &mut Criterion, rt: &tokio::runtime::Runtime, backend: &str, store: &SharedCheckpointer) {
    let mut put = c.benchmark_group(format!("checkpoint_put/{backend}"));
    put.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    for (label, size) in SIZES {
        let data = state_bytes(size);
        let mut writer =
            fail(rt.block_on(Writer::open(Arc::clone(store), format!("bench-put-{label}-{}", std::process::id()))));
        put.throughput(Throughput::Bytes(size as u64));
        put.bench_with_input(BenchmarkId::from_parameter(label), &size, |b, _| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for i in 0..iters {
                        let commit = writer.next(&data);
                        let t = Instant::now();
                        fail(writer.put(&commit).await);
                        total += t.elapsed();
                        if i % PRUNE_EVERY == PRUNE_EVERY - 1 {
                            fail(store.prune(&writer.thread, 1).await);
                        }
                    }
                    total
                })
            });
        });
        fail(rt.block_on(store.delete_thread(&writer.thread)));
    }
    put.finish();

    let mut get = c.benchmark_group(format!("checkpoint_get/{backend}"));
    get.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    for (label, size) in SIZES {
        let data = state_bytes(size);
        let mut writer =
            fail(rt.block_on(Writer::open(Arc::clone(store), format!("bench-get-{label}-{}", std::process::id()))));
        let commit = writer.next(&data);
        fail(rt.block_on(writer.put(&commit)));
        get.throughput(Throughput::Bytes(size as u64));
        get.bench_with_input(BenchmarkId::from_parameter(label), &size, |b, _| {
            b.to_async(rt).iter(|| async {
                let loaded = fail(store.load(&writer.thread, "", None).await);
                std::hint::black_box(loaded)
            });
        });
        fail(rt.block_on(store.delete_thread(&writer.thread)));
    }
    get.finish();
}

fn main() {
    let rt = fail(tokio::runtime::Builder::new_multi_thread().enable_all().build());
    let scratch = std::env::temp_dir().join(format!("agentic-checkpoint-bench-{}", std::process::id()));
    fail(std::fs::create_dir_all(&scratch));
    let mut backends: Vec<(&str, SharedCheckpointer)> = vec![
        ("memory", Arc::new(MemoryCheckpointer::new())),
        ("sqlite", Arc::new(fail(rt.block_on(SqliteCheckpointer::open(scratch.join("bench.db")))))),
    ];
    if let Some(store) = rt.block_on(postgres()) {
        backends.push(("postgres", Arc::new(store)));
    }
    let mut c = Criterion::default().configure_from_args();
    for (backend, store) in &backends {
        bench_backend(&mut c, &rt, backend, store);
    }
    c.final_summary();
    drop(backends);
    let _ = std::fs::remove_dir_all(&scratch);
}
