//! `agentic-bench`: the checkpoint benchmark harness. It runs the workloads of LangGraph's
//! checkpoint benchmark (`benches/langgraph_bench.py`) on the runtime and prints one JSON line
//! per measurement on stdout (progress goes to stderr), so `benches/compare.sh` can set the
//! figures beside LangGraph's and pgbench's taken in the same run.
//!
//! Cases:
//! - `chain`: START -> n0 .. n9 -> END; state `counter` (sum), `messages` (append, one message
//!   per node), `blob` (last value, a fresh 1 KiB string every node). Every invoke uses a fresh
//!   thread id; `--threads` tokio tasks loop invokes against ONE checkpointer.
//! - `fan`: `fan` -> 8 Send("worker") tasks appending to `results` -> `join` -> END.
//! - `resume`: builds a thread with 1,000 node-steps of history (100 chain invokes on one
//!   thread), then times loading it and continuing it by one step.
//! - `storage`: bytes stored for a thread of 1,000 appending steps, against the raw payload.
//! - `rss`: resident memory idle after setup and at its peak during a 64-thread run.
//! - `profile`: where a step's time goes: client CPU, PostgreSQL CPU, WAL fsyncs, the same
//!   commits replayed straight into the store without the engine, and the statements (round
//!   trips) per step, counted from sqlx's statement log.
//!
//! On PostgreSQL every throughput figure carries the WAL fsync count and time of its own
//! repetition (`pg_stat_wal`, with `track_wal_io_timing` on): the disk's fsync latency on these
//! machines switches between two regimes, and figures are only comparable within one.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use agentic::replay::{Recorder, Replay};
use agentic_runtime::checkpoint::{ListFilter, MemoryCheckpointer, PostgresCheckpointer, SqliteCheckpointer};
use agentic_runtime::{
    Channel, Durability, END, Goto, Graph, GraphBuilder, Input, NodeError, RunConfig, START, SharedCheckpointer,
    Update, node_fn,
};
use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Nodes of the chain workload.
const CHAIN_NODES: usize = 10;
/// Send packets of the fan workload.
const FAN_WIDTH: usize = 8;
/// Random bytes behind each fresh blob (hex-encoded: 1 KiB of text).
const BLOB_BYTES: usize = 512;
/// A repetition's fsync statistics are read once every session of the run has ended (a backend
/// flushes its statistics when it exits) and this much later, as the LangGraph script does.
const STATS_SETTLE: Duration = Duration::from_millis(600);

const STEP_LATENCY_METHOD: &str = "interval between the starts of consecutive super-steps inside one invoke \
     (first node start of step k to first node start of step k+1: the node, the step's apply and its commit); \
     the run's start before the first node and its last step are start_latency and end_latency";

const START_LATENCY_METHOD: &str = "from the call to invoke to the start of its first node: building the \
     admission, and on a thread the caller named (--named-threads) the run's lease (a round trip: lock, thread row, \
     admission); a thread the runtime minted (invoke_new) takes its lease with the first step's commit";

const END_LATENCY_METHOD: &str = "from the start of the last super-step's first node to the return of invoke: \
     that step's nodes, its apply and commit, and the run's end (flush, lease release, the outcome)";

/// mimalloc: a step allocates and frees many small values (keys, JSON, encoded payloads), and
/// glibc's malloc and free were about a quarter of the memory backend's instructions per step.
/// Built without transparent huge pages (`no_thp`: no `MADV_HUGEPAGE` on its regions, as
/// `CPython`'s allocator does not ask for them either): the memory store grows by ~1.5 KB per step,
/// and on these VMs the kernel zeroing a fresh 2 MiB page at each fault took 21 to 41% of the
/// memory chain's time, against ~9% in 4 KiB pages.
#[global_allocator]
static ALLOCATOR: Mimalloc = Mimalloc;

/// mimalloc through its plain `mi_malloc` whenever the layout's alignment is one every block
/// already has (as glibc's and jemalloc's Rust shims do). The `mimalloc` crate always calls
/// `mi_malloc_aligned`, whose fast path covers only blocks of up to 1 KiB with a free block at
/// hand: every larger allocation (an encoded 1 KiB payload, a grown buffer) took the generic
/// aligned path, which over-allocates.
#[allow(unsafe_code)]
struct Mimalloc;

/// The alignment every mimalloc block of at least this many bytes has.
const MI_MIN_ALIGN: usize = 16;

// SAFETY: each method forwards to the mimalloc function of the same contract; a layout whose
// alignment mimalloc does not guarantee for its size goes to the aligned variants.
#[allow(unsafe_code)]
unsafe impl std::alloc::GlobalAlloc for Mimalloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.align() <= MI_MIN_ALIGN && layout.align() <= layout.size() {
            // SAFETY: any size is valid for mi_malloc.
            unsafe { libmimalloc_sys::mi_malloc(layout.size()).cast() }
        } else {
            // SAFETY: Layout guarantees a power-of-two alignment.
            unsafe { libmimalloc_sys::mi_malloc_aligned(layout.size(), layout.align()).cast() }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.align() <= MI_MIN_ALIGN && layout.align() <= layout.size() {
            // SAFETY: as in alloc.
            unsafe { libmimalloc_sys::mi_zalloc(layout.size()).cast() }
        } else {
            // SAFETY: as in alloc.
            unsafe { libmimalloc_sys::mi_zalloc_aligned(layout.size(), layout.align()).cast() }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        // SAFETY: ptr came from this allocator; mi_free takes aligned blocks too.
        unsafe { libmimalloc_sys::mi_free(ptr.cast()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= MI_MIN_ALIGN && layout.align() <= new_size {
            // SAFETY: ptr came from this allocator with this layout.
            unsafe { libmimalloc_sys::mi_realloc(ptr.cast(), new_size).cast() }
        } else {
            // SAFETY: as above.
            unsafe { libmimalloc_sys::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast() }
        }
    }
}

#[derive(Parser)]
#[command(
    name = "agentic-bench",
    about = "Checkpoint benchmark harness: LangGraph's benchmark workloads on the Agentic runtime",
    long_about = "Runs the workloads of LangGraph's checkpoint benchmark on the Agentic runtime and prints one \
                  JSON line per measurement on stdout (progress on stderr). On PostgreSQL each figure carries the \
                  WAL fsync count and time of its own repetition (pg_stat_wal; track_wal_io_timing is switched on \
                  for the run if it is off). The database is created if missing; runtime tables in a database \
                  whose name starts with `bench` are truncated before each repetition."
)]
struct Cli {
    #[command(subcommand)]
    case: Case,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Clone)]
struct Common {
    /// Checkpoint store.
    #[arg(long, value_enum, default_value_t = Backend::Postgres, global = true)]
    backend: Backend,
    /// PostgreSQL URL (`--backend postgres`); the database is created if missing.
    #[arg(
        long,
        env = "BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/bench_agentic",
        global = true
    )]
    database: String,
    /// When checkpoints become durable.
    #[arg(long, value_enum, default_value_t = DurabilityArg::Sync, global = true)]
    durability: DurabilityArg,
    /// Tiny durations and sizes: checks the harness end to end in seconds (CI).
    #[arg(long, global = true)]
    quick: bool,
    /// KEY=VALUE copied into every JSON line under `tags` (compare.sh marks rounds with it).
    #[arg(long = "tag", value_parser = parse_tag, global = true)]
    tags: Vec<(String, String)>,
}

#[derive(Subcommand)]
enum Case {
    /// 10-node chain (counter, appended message, fresh 1 KiB blob per node); fresh thread per invoke.
    Chain(LoadArgs),
    /// Fan-out: `fan` -> 8 Send("worker") appending to a list -> `join`; fresh thread per invoke.
    Fan(LoadArgs),
    /// Load and continue by one step a thread with 1,000 node-steps of history.
    Resume(HistoryArgs),
    /// Bytes stored after 1,000 appending steps on one thread, against the raw payload.
    Storage(HistoryArgs),
    /// Resident memory: idle after setup, and the peak during a run of many threads.
    Rss(RssArgs),
    /// Where a chain step's time goes: CPU (client, PostgreSQL), WAL fsyncs, statements per step.
    Profile(LoadArgs),
}

#[derive(Args, Clone, Copy)]
struct LoadArgs {
    /// Concurrent threads: tokio tasks, each looping invokes on new threads, sharing one checkpointer.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Seconds per repetition.
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// Repetitions.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Seconds of unreported warm-up before the repetitions (allocator, pool, prepared statements).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Name each invoke's thread (`invoke` on an id the caller chose: the run takes its lease
    /// before its first node) instead of running on a thread the runtime minted (`invoke_new`:
    /// the lease goes with the first step's commit).
    #[arg(long)]
    named_threads: bool,
}

#[derive(Args, Clone, Copy)]
struct HistoryArgs {
    /// Chain invokes on the one thread (10 node-steps each).
    #[arg(long, default_value_t = 100)]
    invokes: usize,
    /// Timings per measured operation (`resume`).
    #[arg(long, default_value_t = 30)]
    timings: usize,
}

#[derive(Args, Clone, Copy)]
struct RssArgs {
    /// Concurrent threads during the measured run.
    #[arg(long, default_value_t = 64)]
    threads: usize,
    /// Seconds of the measured run.
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Backend {
    Memory,
    Sqlite,
    Postgres,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum DurabilityArg {
    Sync,
    Async,
    Exit,
}

impl DurabilityArg {
    fn mode(self) -> Durability {
        match self {
            DurabilityArg::Sync => Durability::Sync,
            DurabilityArg::Async => Durability::Async,
            DurabilityArg::Exit => Durability::Exit,
        }
    }
    fn name(self) -> &'static str {
        match self {
            DurabilityArg::Sync => "sync",
            DurabilityArg::Async => "async",
            DurabilityArg::Exit => "exit",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Chain,
    Fan,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Chain => "chain",
            Shape::Fan => "fan",
        }
    }
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).ok_or_else(|| format!("`{s}` is not KEY=VALUE"))
}

/// mimalloc's `mi_option_purge_delay` (`mimalloc.h`, v2 and v3 alike; `libmimalloc-sys` names
/// no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps the pages mimalloc frees instead of returning them to the kernel 10 ms later (its
/// default purge): a run's store only grows, so a purged page was soon faulted back in and
/// zeroed again (the `madvise` calls and 15 to 18% of the page faults of a memory chain run;
/// 6 interleaved 4 s pairs: 3.47 to 3.61 µs per node-step before, 3.33 to 3.39 after).
#[allow(unsafe_code)]
fn keep_freed_pages() {
    // SAFETY: sets a plain option value; mimalloc reads options on each purge decision.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    keep_freed_pages();
    let cli = Cli::parse();
    install_tracing(matches!(cli.case, Case::Profile(_)));
    let mut bench = Bench::open(cli.common.clone()).await?;
    let outcome = match cli.case {
        Case::Chain(args) => bench.load(Shape::Chain, args.quick(cli.common.quick)).await,
        Case::Fan(args) => bench.load(Shape::Fan, args.quick(cli.common.quick)).await,
        Case::Resume(args) => bench.resume(args.quick(cli.common.quick)).await,
        Case::Storage(args) => bench.storage(args.quick(cli.common.quick)).await,
        Case::Rss(args) => bench.rss(args.quick(cli.common.quick)).await,
        Case::Profile(args) => bench.profile(args.quick(cli.common.quick)).await,
    };
    bench.close().await;
    outcome
}

impl LoadArgs {
    fn quick(self, quick: bool) -> Self {
        if quick { LoadArgs { secs: self.secs.min(1.0), reps: 1, ..self } } else { self }
    }
}

impl HistoryArgs {
    fn quick(self, quick: bool) -> Self {
        if quick { HistoryArgs { invokes: self.invokes.min(10), timings: self.timings.min(5) } } else { self }
    }
}

impl RssArgs {
    fn quick(self, quick: bool) -> Self {
        if quick { RssArgs { secs: self.secs.min(1.0), ..self } } else { self }
    }
}

// ---------------------------------------------------------------------------------------------
// Workloads
// ---------------------------------------------------------------------------------------------

/// What the benchmark's nodes report besides their writes.
#[derive(Clone, Default)]
struct Hooks {
    /// Super-step timestamps of the current invoke (throughput runs).
    clock: Option<Arc<StepClock>>,
    /// Running total of the JSON bytes of every value written (`storage`).
    payload: Option<Arc<AtomicU64>>,
}

impl Hooks {
    fn mark(&self, step: u64) {
        if let Some(clock) = &self.clock {
            clock.mark(step);
        }
    }

    fn count(&self, update: &Update) {
        if let Some(payload) = &self.payload {
            payload.fetch_add(json_bytes(update), Ordering::Relaxed);
        }
    }
}

/// The JSON bytes of the values an update writes.
fn json_bytes(update: &Update) -> u64 {
    update.writes().iter().map(|(_, v)| serde_json::to_vec(v).map_or(0, |b| b.len() as u64)).sum()
}

/// Per-invoke super-step timestamps, kept by one worker (its fan-out tasks may run on other
/// runtime threads, hence the mutex: uncontended, a few tens of nanoseconds).
#[derive(Default)]
struct StepClock {
    inner: Mutex<ClockInner>,
}

#[derive(Default)]
struct ClockInner {
    current: Option<(u64, Instant)>,
    intervals_ns: Vec<u64>,
    nodes: u64,
    /// When the invoke in progress started, until its first node starts.
    invoked: Option<Instant>,
    starts_ns: Vec<u64>,
    ends_ns: Vec<u64>,
}

impl StepClock {
    fn lock(&self) -> std::sync::MutexGuard<'_, ClockInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn begin_invoke(&self) {
        let mut inner = self.lock();
        inner.current = None;
        inner.invoked = Some(Instant::now());
    }

    fn mark(&self, step: u64) {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.nodes += 1;
        match inner.current {
            Some((s, _)) if s == step => {}
            Some((_, at)) => {
                inner.intervals_ns.push((now - at).as_nanos() as u64);
                inner.current = Some((step, now));
            }
            None => {
                inner.current = Some((step, now));
                if let Some(invoked) = inner.invoked.take() {
                    inner.starts_ns.push((now - invoked).as_nanos() as u64);
                }
            }
        }
    }

    /// The invoke in progress returned: the time since its last super-step started.
    fn end_invoke(&self) {
        let now = Instant::now();
        let mut inner = self.lock();
        if let Some((_, at)) = inner.current.take() {
            inner.ends_ns.push((now - at).as_nanos() as u64);
        }
    }

    /// Node starts, step intervals, start and end latencies since the last call.
    fn take(&self) -> ClockFigures {
        let mut inner = self.lock();
        let inner = &mut *inner;
        ClockFigures {
            nodes: std::mem::take(&mut inner.nodes),
            intervals_ns: std::mem::take(&mut inner.intervals_ns),
            starts_ns: std::mem::take(&mut inner.starts_ns),
            ends_ns: std::mem::take(&mut inner.ends_ns),
        }
    }
}

/// What one worker's [`StepClock`] measured.
struct ClockFigures {
    nodes: u64,
    intervals_ns: Vec<u64>,
    starts_ns: Vec<u64>,
    ends_ns: Vec<u64>,
}

/// A fresh 1 KiB string: 512 pseudo-random bytes, hex-encoded (as the LangGraph script's
/// `os.urandom(512).hex()`, a loop in C under Python), from a `SplitMix64` stream seeded
/// per process and per call, so every call differs. `const_hex` encodes with the CPU's vector
/// instructions and writes the string without a UTF-8 scan: the table-driven loop this replaced
/// took ~3.7k instructions per call, a seventh of a memory-backend node-step (callgrind).
fn fresh_blob() -> String {
    static SEED: LazyLock<u64> = LazyLock::new(|| {
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let hash = blake3::hash(format!("{}:{nanos}", std::process::id()).as_bytes());
        u64::from_le_bytes(hash.as_bytes()[..8].try_into().unwrap_or_default())
    });
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut state = SEED.wrapping_add(COUNTER.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15 << 6));
    let mut bytes = [0u8; BLOB_BYTES];
    for chunk in bytes.chunks_exact_mut(8) {
        // SplitMix64: one 64-bit word per 8 bytes.
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes());
    }
    const_hex::encode(bytes)
}

/// The input of every invoke: the LangGraph script's `{"counter": 0, "messages": [], "blob": ""}`.
fn chain_input() -> Update {
    Update::new().set("counter", 0).set("messages", json!([])).set("blob", "")
}

fn fan_input() -> Update {
    Update::new().set("counter", 0).set("results", json!([])).set("blob", "")
}

fn input_for(shape: Shape) -> Update {
    match shape {
        Shape::Chain => chain_input(),
        Shape::Fan => fan_input(),
    }
}

/// The chain: START -> n0 -> ... -> n{nodes-1} -> END.
fn chain_graph(nodes: usize, hooks: &Hooks) -> agentic_runtime::Result<Graph> {
    let name = if nodes == CHAIN_NODES { "bench-chain".to_owned() } else { format!("bench-chain-{nodes}") };
    let mut builder = GraphBuilder::new(name)
        .channel("counter", Channel::sum())
        .channel("messages", Channel::append())
        .channel("blob", Channel::last_value());
    let mut previous = START.to_owned();
    for i in 0..nodes {
        let node = format!("n{i}");
        let hooks = hooks.clone();
        builder = builder
            .node(
                node.clone(),
                node_fn(move |state, ctx| {
                    let hooks = hooks.clone();
                    async move {
                        hooks.mark(ctx.step());
                        let counter: i64 = state.get("counter")?;
                        let update = Update::new()
                            .set("counter", 1)
                            .set("messages", format!("node{i} step {counter}"))
                            .set("blob", fresh_blob());
                        hooks.count(&update);
                        Ok(update)
                    }
                }),
            )
            .edge(previous, node.clone());
        previous = node;
    }
    builder.edge(previous, END).compile()
}

/// The fan-out: `fan` -> 8 x Send("worker") -> `join` -> END.
fn fan_graph(hooks: &Hooks) -> agentic_runtime::Result<Graph> {
    let (fan, worker, join) = (hooks.clone(), hooks.clone(), hooks.clone());
    GraphBuilder::new("bench-fan")
        .channel("counter", Channel::sum())
        .channel("results", Channel::append())
        .channel("blob", Channel::last_value())
        .node(
            "fan",
            node_fn(move |_, ctx| {
                let hooks = fan.clone();
                async move {
                    hooks.mark(ctx.step());
                    Ok(Update::new().set("counter", 1))
                }
            }),
        )
        .node(
            "worker",
            node_fn(move |_, ctx| {
                let hooks = worker.clone();
                async move {
                    hooks.mark(ctx.step());
                    let arg = ctx.arg().ok_or_else(|| NodeError::fatal("worker needs its Send payload"))?;
                    let result = format!("w{}@{}", arg["i"], arg["counter"]);
                    Ok(Update::new().set("results", result))
                }
            }),
        )
        .node(
            "join",
            node_fn(move |_, ctx| {
                let hooks = join.clone();
                async move {
                    hooks.mark(ctx.step());
                    Ok(Update::new().set("counter", 1).set("blob", fresh_blob()))
                }
            }),
        )
        .conditional(
            "fan",
            |state| {
                let counter: i64 = state.get("counter")?;
                Ok((0..FAN_WIDTH).map(|i| Goto::send("worker", json!({"i": i, "counter": counter}))).collect())
            },
            ["worker"],
        )
        .edge(START, "fan")
        .edge("worker", "join")
        .edge("join", END)
        .compile()
}

fn build_graph(shape: Shape, hooks: &Hooks) -> agentic_runtime::Result<Graph> {
    match shape {
        Shape::Chain => chain_graph(CHAIN_NODES, hooks),
        Shape::Fan => fan_graph(hooks),
    }
}

/// A prefix no earlier run used, so thread ids stay fresh when tables are not truncated.
fn run_prefix() -> String {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_micros());
    format!("b{}-{nanos}", std::process::id())
}

// ---------------------------------------------------------------------------------------------
// The harness
// ---------------------------------------------------------------------------------------------

struct Bench {
    common: Common,
    pg: Option<Pg>,
    scratch: PathBuf,
    prefix: String,
}

/// One repetition's measured figures.
#[derive(Default)]
struct RepFigures {
    secs: f64,
    invokes: u64,
    nodes: u64,
    intervals_ns: Vec<u64>,
    invoke_ns: Vec<u64>,
    starts_ns: Vec<u64>,
    ends_ns: Vec<u64>,
}

impl Bench {
    async fn open(common: Common) -> anyhow::Result<Self> {
        let pg = if common.backend == Backend::Postgres { Some(Pg::open(&common.database).await?) } else { None };
        let scratch = std::env::temp_dir().join(format!("agentic-bench-{}", std::process::id()));
        Ok(Bench { common, pg, scratch, prefix: run_prefix() })
    }

    async fn close(self) {
        if let Some(pg) = self.pg {
            pg.close().await;
        }
        let _ = std::fs::remove_dir_all(&self.scratch);
    }

    fn config(&self) -> RunConfig {
        RunConfig { durability: self.common.durability.mode(), ..RunConfig::default() }
    }

    fn tags(&self) -> Value {
        Value::Object(self.common.tags.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect())
    }

    /// A fresh store for one measurement: a new memory store, a new SQLite file, or the
    /// PostgreSQL database with the runtime's tables truncated.
    async fn store(&mut self, label: &str) -> anyhow::Result<SharedCheckpointer> {
        Ok(match self.common.backend {
            Backend::Memory => Arc::new(MemoryCheckpointer::new()),
            Backend::Sqlite => Arc::new(self.sqlite(label).await?),
            Backend::Postgres => {
                let store = PostgresCheckpointer::connect(&self.common.database).await?;
                if let Some(pg) = &mut self.pg {
                    pg.truncate().await?;
                }
                Arc::new(store)
            }
        })
    }

    async fn sqlite(&self, label: &str) -> anyhow::Result<SqliteCheckpointer> {
        std::fs::create_dir_all(&self.scratch)?;
        let path = self.scratch.join(format!("{label}.db"));
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        Ok(SqliteCheckpointer::open(&path).await?)
    }

    /// Node executions and checkpoints of one invoke, measured on a memory store with the
    /// run's durability (not assumed from the graph's shape).
    async fn per_invoke(&self, shape: Shape) -> anyhow::Result<(u64, u64)> {
        let clock = Arc::new(StepClock::default());
        let hooks = Hooks { clock: Some(Arc::clone(&clock)), payload: None };
        let graph = build_graph(shape, &hooks)?.with_checkpointer(Arc::new(MemoryCheckpointer::new()));
        graph.invoke("probe", Input::Start(input_for(shape)), &self.config()).await?;
        let checkpoints = graph.history("probe", &ListFilter::default()).await?.len() as u64;
        Ok((clock.take().nodes, checkpoints))
    }

    /// `chain` and `fan`: throughput and latency, one JSON line per repetition.
    async fn load(&mut self, shape: Shape, args: LoadArgs) -> anyhow::Result<()> {
        let (nodes_per_invoke, checkpoints_per_invoke) = self.per_invoke(shape).await?;
        let backend = self.common.backend.name();
        let mut reps = Vec::new();
        if args.warmup > 0.0 {
            let secs = args.warmup.min(args.secs);
            eprintln!("[agentic-bench] {} {backend} threads={} warm-up {secs}s", shape.name(), args.threads);
            let store = self.store(&format!("{}-warmup", shape.name())).await?;
            self.run_load(shape, &store, args.threads, secs, 0, args.named_threads).await?;
        }
        for rep in 1..=args.reps {
            eprintln!("[agentic-bench] {} {backend} threads={} rep {rep}/{}", shape.name(), args.threads, args.reps);
            let store = self.store(&format!("{}-{rep}", shape.name())).await?;
            let context = self.context().await?;
            let before = self.stats().await?;
            let figures = self.run_load(shape, &store, args.threads, args.secs, rep, args.named_threads).await?;
            drop(store);
            let wal = self.wal_since(before).await?;
            let mut line = self.rep_line(shape, args.threads, rep, &figures, wal, &context);
            line["threads_named_by"] = json!(if args.named_threads { "caller" } else { "runtime" });
            line["nodes_per_invoke_measured"] = json!(nodes_per_invoke);
            line["checkpoints_per_invoke"] = json!(checkpoints_per_invoke);
            let cps = line["invokes_per_s"].as_f64().unwrap_or(0.0) * checkpoints_per_invoke as f64;
            line["checkpoints_per_s"] = json!(round2(cps));
            eprintln!(
                "[agentic-bench]   {:.0} node-steps/s, step p50 {} us p99 {} us, ms/WAL sync {}",
                line["node_steps_per_s"].as_f64().unwrap_or(0.0),
                line["step_latency"]["p50_us"],
                line["step_latency"]["p99_us"],
                line["ms_per_wal_sync"]
            );
            println!("{line}");
            reps.push(line);
        }
        if reps.len() > 1 {
            println!("{}", summary_line(&reps));
        }
        Ok(())
    }

    /// Runs `threads` workers looping invokes until `secs` have passed (each finishes the
    /// invoke in hand, as the LangGraph script's workers do).
    async fn run_load(
        &self,
        shape: Shape,
        store: &SharedCheckpointer,
        threads: usize,
        secs: f64,
        rep: usize,
        named: bool,
    ) -> anyhow::Result<RepFigures> {
        let mut workers = Vec::with_capacity(threads);
        for w in 0..threads {
            let clock = Arc::new(StepClock::default());
            let hooks = Hooks { clock: Some(Arc::clone(&clock)), payload: None };
            workers.push((build_graph(shape, &hooks)?.with_checkpointer(Arc::clone(store)), clock, w));
        }
        let config = Arc::new(self.config());
        let start = Instant::now();
        let deadline = start + Duration::from_secs_f64(secs);
        let mut handles = Vec::with_capacity(threads);
        for (graph, clock, w) in workers {
            let config = Arc::clone(&config);
            let prefix = format!("{}-{}-r{rep}-w{w}", self.prefix, shape.name());
            handles.push(tokio::spawn(async move {
                let mut invoke_ns = Vec::new();
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let thread = named.then(|| format!("{prefix}-{i}"));
                    clock.begin_invoke();
                    let t = Instant::now();
                    match &thread {
                        Some(thread) => graph.invoke(thread, Input::Start(input_for(shape)), &config).await?,
                        None => graph.invoke_new(graph.new_thread(), input_for(shape), &config).await?,
                    };
                    invoke_ns.push(t.elapsed().as_nanos() as u64);
                    clock.end_invoke();
                    i += 1;
                }
                Ok::<_, agentic_runtime::Error>((i, invoke_ns, clock.take()))
            }));
        }
        let mut figures = RepFigures::default();
        for handle in handles {
            let (invokes, invoke_ns, clock) = handle.await??;
            figures.invokes += invokes;
            figures.nodes += clock.nodes;
            figures.intervals_ns.extend(clock.intervals_ns);
            figures.invoke_ns.extend(invoke_ns);
            figures.starts_ns.extend(clock.starts_ns);
            figures.ends_ns.extend(clock.ends_ns);
        }
        figures.secs = start.elapsed().as_secs_f64();
        Ok(figures)
    }

    fn rep_line(
        &self,
        shape: Shape,
        threads: usize,
        rep: usize,
        f: &RepFigures,
        wal: Option<WalDelta>,
        context: &Value,
    ) -> Value {
        let mut invoke_latency = latency_summary(&f.invoke_ns, None);
        invoke_latency["per_node_step_p50_us"] =
            json!(invoke_latency["p50_us"].as_f64().map(|us| round2(us * f.invokes as f64 / f.nodes.max(1) as f64)));
        let steps_per_s = f.nodes as f64 / f.secs;
        let ms_per_wal_sync = wal.as_ref().and_then(|w| w.ms_per_sync);
        json!({
            "harness": "agentic",
            "case": shape.name(),
            "backend": self.common.backend.name(),
            "threads": threads,
            "durability": self.common.durability.name(),
            "rep": rep,
            "secs": round2(f.secs),
            "invokes": f.invokes,
            "node_steps": f.nodes,
            "invokes_per_s": round2(f.invokes as f64 / f.secs),
            "node_steps_per_s": round2(steps_per_s),
            "us_per_node_step": round2(1e6 / steps_per_s),
            "step_latency": latency_summary(&f.intervals_ns, Some(STEP_LATENCY_METHOD)),
            "start_latency": latency_summary(&f.starts_ns, Some(START_LATENCY_METHOD)),
            "end_latency": latency_summary(&f.ends_ns, Some(END_LATENCY_METHOD)),
            "invoke_latency": invoke_latency,
            "ms_per_wal_sync": ms_per_wal_sync,
            "wal": wal.map(|w| w.to_json(f.nodes, f.secs)),
            "context": context,
            "tags": self.tags(),
        })
    }

    /// What else ran on the machine at the start of a measurement.
    async fn context(&mut self) -> anyhow::Result<Value> {
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let mut context = json!({"loadavg": load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")});
        if let Some(pg) = &mut self.pg {
            context["other_client_sessions"] = json!(pg.other_sessions().await?);
        }
        Ok(context)
    }

    async fn stats(&mut self) -> anyhow::Result<Option<WalSnapshot>> {
        match &mut self.pg {
            Some(pg) => Ok(Some(pg.snapshot().await?)),
            None => Ok(None),
        }
    }

    /// The WAL statistics since `before`, once the run's sessions have ended and flushed theirs.
    async fn wal_since(&mut self, before: Option<WalSnapshot>) -> anyhow::Result<Option<WalDelta>> {
        let (Some(pg), Some(before)) = (&mut self.pg, before) else { return Ok(None) };
        pg.wait_idle().await?;
        let after = pg.snapshot().await?;
        Ok(Some(WalDelta::between(&before, &after, pg.wal_timing)))
    }

    /// `resume`: a thread with `invokes` x 10 node-steps of history; times loading it and
    /// continuing it by one step (a one-node graph with the same channels), and the same on a
    /// fresh thread.
    async fn resume(&mut self, args: HistoryArgs) -> anyhow::Result<()> {
        let store = self.store("resume").await?;
        let before = self.stats().await?;
        let config = self.config();
        let chain = chain_graph(CHAIN_NODES, &Hooks::default())?.with_checkpointer(Arc::clone(&store));
        let one = chain_graph(1, &Hooks::default())?.with_checkpointer(Arc::clone(&store));
        // The one-node graph takes over the long thread the chain built (LangGraph does not check).
        let one_config = RunConfig { allow_graph_change: true, ..config.clone() };
        let long = format!("{}-long", self.prefix);
        eprintln!("[agentic-bench] resume: building {} invokes on one thread", args.invokes);
        let t = Instant::now();
        for _ in 0..args.invokes {
            chain.invoke(&long, Input::Start(chain_input()), &config).await?;
        }
        let build_secs = t.elapsed().as_secs_f64();
        let history = chain.history(&long, &ListFilter::default()).await?.len();
        let snapshot = chain.get_state(&long).await?.context("the long thread has no state")?;
        let messages = snapshot.values.get::<Vec<String>>("messages").map_err(|e| anyhow::anyhow!("{e}"))?.len();
        eprintln!("[agentic-bench] resume: timing ({} each)", args.timings);
        let n = args.timings;
        let load_long = time_ms(n, || async { store.load(&long, "", None).await.map(drop) }).await?;
        let get_state_long = time_ms(n, || async { chain.get_state(&long).await.map(drop) }).await?;
        let continue_long =
            time_ms(n, || async { one.invoke(&long, Input::Start(chain_input()), &one_config).await.map(drop) })
                .await?;
        let fresh = AtomicU64::new(0);
        let continue_fresh = time_ms(n, || async {
            let thread = format!("{}-fresh-{}", self.prefix, fresh.fetch_add(1, Ordering::Relaxed));
            one.invoke(&thread, Input::Start(chain_input()), &config).await.map(drop)
        })
        .await?;
        drop((chain, one, store));
        let wal = self.wal_since(before).await?;
        let line = json!({
            "harness": "agentic",
            "case": "resume",
            "backend": self.common.backend.name(),
            "durability": self.common.durability.name(),
            "history_invokes": args.invokes,
            "history_node_steps": args.invokes * CHAIN_NODES,
            "history_checkpoints": history,
            "messages_len": messages,
            "build_secs": round2(build_secs),
            "timings": n,
            "load_long": load_long,
            "get_state_long": get_state_long,
            "continue_1step_long": continue_long,
            "continue_1step_fresh": continue_fresh,
            "what": "load_long: Checkpointer::load of the head (values materialised); get_state_long: Graph::get_state; \
                     continue_1step_*: Graph::invoke of a one-node graph on the thread = lease + load + admission \
                     commit + one node + its commit",
            "ms_per_wal_sync": wal.as_ref().and_then(|w| w.ms_per_sync),
            "tags": self.tags(),
        });
        println!("{line}");
        Ok(())
    }

    /// `storage`: one thread, `invokes` chain invokes; bytes stored against the raw payload.
    async fn storage(&mut self, args: HistoryArgs) -> anyhow::Result<()> {
        let payload = Arc::new(AtomicU64::new(0));
        let hooks = Hooks { clock: None, payload: Some(Arc::clone(&payload)) };
        let thread = format!("{}-storage", self.prefix);
        let config = self.config();
        let input_bytes = json_bytes(&chain_input());
        let (tables, backend_note) = match self.common.backend {
            Backend::Postgres => {
                let store = self.store("storage").await?;
                let graph = chain_graph(CHAIN_NODES, &hooks)?.with_checkpointer(store);
                for _ in 0..args.invokes {
                    graph.invoke(&thread, Input::Start(chain_input()), &config).await?;
                }
                drop(graph);
                let pg = self.pg.as_mut().context("postgres backend without a connection")?;
                pg.wait_idle().await?;
                (
                    pg.table_sizes().await?,
                    "rows_bytes: sum(pg_column_size(row)); stored_bytes: pg_total_relation_size (heap, TOAST, indexes, free-space and visibility maps); tables truncated before the run, so they hold this thread only",
                )
            }
            Backend::Sqlite => {
                let store = self.sqlite("storage").await?;
                let pool = store.pool().clone();
                let graph = chain_graph(CHAIN_NODES, &hooks)?.with_checkpointer(Arc::new(store));
                for _ in 0..args.invokes {
                    graph.invoke(&thread, Input::Start(chain_input()), &config).await?;
                }
                drop(graph);
                (
                    sqlite_table_sizes(&pool).await?,
                    "rows_bytes: sum of dbstat payload; stored_bytes: sum of dbstat page sizes (table and its indexes), WAL checkpointed first",
                )
            }
            Backend::Memory => bail!("storage is measured on postgres or sqlite"),
        };
        let raw = payload.load(Ordering::Relaxed) + input_bytes * args.invokes as u64;
        let rows: u64 = tables.values().map(|t| t.rows_bytes).sum();
        let stored: u64 = tables.values().map(|t| t.stored_bytes).sum();
        let line = json!({
            "harness": "agentic",
            "case": "storage",
            "backend": self.common.backend.name(),
            "durability": self.common.durability.name(),
            "invokes": args.invokes,
            "node_steps": args.invokes * CHAIN_NODES,
            "raw_payload_bytes": raw,
            "raw_payload_definition": "sum over every value written (each node's counter increment, message and \
                1 KiB blob, and each invoke's input) of the length of its JSON encoding",
            "rows_bytes": rows,
            "stored_bytes": stored,
            "ratio_rows_vs_raw": round2(rows as f64 / raw.max(1) as f64),
            "ratio_stored_vs_raw": round2(stored as f64 / raw.max(1) as f64),
            "measure": backend_note,
            "tables": tables.iter().map(|(k, v)| (k.clone(), json!({"rows": v.rows, "rows_bytes": v.rows_bytes, "stored_bytes": v.stored_bytes}))).collect::<serde_json::Map<_, _>>(),
            "tags": self.tags(),
        });
        println!("{line}");
        Ok(())
    }

    /// `rss`: `VmRSS` idle after setup (store connected, graphs built), then the peak (`VmHWM`,
    /// reset first through `/proc/self/clear_refs`) during a run of `threads` threads.
    async fn rss(&mut self, args: RssArgs) -> anyhow::Result<()> {
        let store = self.store("rss").await?;
        let idle = proc_status_kib("VmRSS");
        let idle_hwm = proc_status_kib("VmHWM");
        // Writing 5 resets the peak to the current RSS (Linux >= 4.0).
        let hwm_reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        let sampling = Arc::new(AtomicBool::new(true));
        let sampled_max = Arc::new(AtomicU64::new(0));
        let sampler = {
            let (sampling, sampled_max) = (Arc::clone(&sampling), Arc::clone(&sampled_max));
            tokio::spawn(async move {
                while sampling.load(Ordering::Relaxed) {
                    sampled_max.fetch_max(proc_status_kib("VmRSS").unwrap_or(0), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        eprintln!("[agentic-bench] rss: {} threads for {} s", args.threads, args.secs);
        let figures = self.run_load(Shape::Chain, &store, args.threads, args.secs, 0, false).await?;
        sampling.store(false, Ordering::Relaxed);
        let _ = sampler.await;
        let peak = proc_status_kib("VmHWM");
        let line = json!({
            "harness": "agentic",
            "case": "rss",
            "backend": self.common.backend.name(),
            "threads": args.threads,
            "secs": round2(figures.secs),
            "node_steps_per_s": round2(figures.nodes as f64 / figures.secs),
            "idle_vmrss_kib": idle,
            "idle_vmhwm_kib": idle_hwm,
            "peak_vmhwm_kib": peak,
            "peak_is_run_only": hwm_reset,
            "max_sampled_vmrss_kib": sampled_max.load(Ordering::Relaxed),
            "what": "idle: after the store connected and the runtime started, before any invoke; peak: VmHWM after \
                     the run (reset before it when peak_is_run_only), and the highest VmRSS sampled every 50 ms",
            "tags": self.tags(),
        });
        println!("{line}");
        Ok(())
    }

    /// `profile`: a chain run split into client CPU, PostgreSQL CPU and WAL fsync time per
    /// node-step, then a shorter run with sqlx's statement log on, counting statements (each one
    /// round trip once prepared) per node-step.
    async fn profile(&mut self, args: LoadArgs) -> anyhow::Result<()> {
        let store = self.store("profile").await?;
        // Warm up: pool connections opened, statements prepared.
        self.run_load(Shape::Chain, &store, args.threads, args.secs.min(1.0) / 2.0, 0, args.named_threads).await?;
        let before = self.stats().await?;
        let (cpu0, server0, machine0) = (process_cpu_ms(), postgres_cpu_ms(), machine_cpu());
        let figures = self.run_load(Shape::Chain, &store, args.threads, args.secs, 1, args.named_threads).await?;
        let (cpu1, server1, machine1) = (process_cpu_ms(), postgres_cpu_ms(), machine_cpu());
        drop(store);
        let wal = self.wal_since(before).await?;
        let steps = figures.nodes.max(1) as f64;
        let wall_us = figures.secs * 1e6 / steps;
        let client_us = (cpu1 - cpu0) * 1e3 / steps;
        let server_us = (self.common.backend == Backend::Postgres).then(|| (server1 - server0) * 1e3 / steps);
        let fsync_us = wal.as_ref().and_then(|w| w.sync_ms).map(|ms| ms * 1e3 / steps);
        let busy = machine1.0 - machine0.0;
        let total = machine1.1 - machine0.1;

        let store_alone = self.store_alone(&args, figures.secs).await?;
        let driver_alone = match self.common.backend {
            Backend::Postgres => self.driver_alone(&args, figures.secs).await?,
            _ => Value::Null,
        };

        // Last run: statements per step from the statement log (its own overhead is not timed).
        let statements = if self.common.backend == Backend::Postgres {
            let store = self.store("profile-statements").await?;
            self.run_load(Shape::Chain, &store, args.threads, 0.3, 0, args.named_threads).await?;
            STATEMENT_LOG.lock().unwrap_or_else(PoisonError::into_inner).clear();
            LOG_STATEMENTS.store(true, Ordering::Relaxed);
            let counted =
                self.run_load(Shape::Chain, &store, args.threads, args.secs.min(3.0), 2, args.named_threads).await;
            LOG_STATEMENTS.store(false, Ordering::Relaxed);
            let counted = counted?;
            drop(store);
            let log = std::mem::take(&mut *STATEMENT_LOG.lock().unwrap_or_else(PoisonError::into_inner));
            let steps = counted.nodes.max(1) as f64;
            let mut rows: Vec<(String, u64, f64)> = log.into_iter().map(|(k, (n, secs))| (k, n, secs)).collect();
            rows.sort_by_key(|r| std::cmp::Reverse(r.1));
            let total: u64 = rows.iter().map(|r| r.1).sum();
            json!({
                "source": "sqlx statement log (client side): one entry per statement executed, i.e. one round trip once the statement is prepared",
                "node_steps": counted.nodes,
                "invokes": counted.invokes,
                "per_node_step": round3(total as f64 / steps),
                "per_invoke": round3(total as f64 / counted.invokes.max(1) as f64),
                "by_statement": rows.iter().map(|(label, n, secs)| json!({
                    "statement": label,
                    "per_node_step": round3(*n as f64 / steps),
                    "per_invoke": round3(*n as f64 / counted.invokes.max(1) as f64),
                    "client_ms_mean": round3(secs * 1e3 / (*n).max(1) as f64),
                })).collect::<Vec<_>>(),
            })
        } else {
            Value::Null
        };
        let line = json!({
            "harness": "agentic",
            "case": "profile",
            "backend": self.common.backend.name(),
            "threads": args.threads,
            "durability": self.common.durability.name(),
            "secs": round2(figures.secs),
            "node_steps": figures.nodes,
            "node_steps_per_s": round2(steps / figures.secs),
            "per_node_step_us": {
                "wall": round2(wall_us),
                "client_cpu": round2(client_us),
                "postgres_cpu": server_us.map(round2),
                "wal_fsync": fsync_us.map(round2),
            },
            "per_node_step_note": "wall is elapsed time / node-steps (all threads together); client_cpu: this \
                process's user+system CPU; postgres_cpu: every postgres process on the machine (backends, WAL \
                writer, checkpointer; other databases' activity included); wal_fsync: pg_stat_wal.wal_sync_time. \
                With 2 cores, client and server CPU overlap in time when threads > 1",
            "machine_cpu_busy_pct": round2(100.0 * busy / total.max(1.0)),
            "client_cpu_ms_total": round2(cpu1 - cpu0),
            "wal": wal.map(|w| w.to_json(figures.nodes, figures.secs)),
            "store_alone": store_alone,
            "driver_alone": driver_alone,
            "statements": statements,
            "tags": self.tags(),
        });
        println!("{line}");
        Ok(())
    }

    /// `profile`'s store without the engine: one chain invoke's commits (its admission and its
    /// ten steps) recorded on a memory store, then replayed by `threads` tasks straight into a
    /// fresh store of the backend for `secs`, each replay on a fresh thread: the same rows,
    /// statements and round trips as the chain's, with no node run, no step applied and no value
    /// encoded. Wall and CPU per commit, as for the chain.
    async fn store_alone(&mut self, args: &LoadArgs, secs: f64) -> anyhow::Result<Value> {
        let recorder = Arc::new(Recorder::new(Arc::new(MemoryCheckpointer::new())));
        let graph = build_graph(Shape::Chain, &Hooks::default())?;
        let identity = graph.identity().clone();
        let config = self.config();
        let recording = graph.with_checkpointer(Arc::clone(&recorder) as SharedCheckpointer);
        recording.invoke("record", Input::Start(input_for(Shape::Chain)), &config).await?;
        let replay = Replay::new(recorder.take(), identity)?;
        let store = self.store("profile-store-alone").await?;
        let named = args.named_threads;
        let replay_for = |secs: f64, label: &str| {
            let deadline = Instant::now() + Duration::from_secs_f64(secs);
            let tasks: Vec<_> = (0..args.threads)
                .map(|w| {
                    let (mut replay, store) = (replay.clone(), Arc::clone(&store));
                    let (prefix, owner) = (format!("{}-{label}-w{w}", self.prefix), config.owner.clone());
                    tokio::spawn(async move { replay.until(&*store, &prefix, &owner, deadline, named).await })
                })
                .collect();
            async move {
                let mut commits = 0;
                for task in tasks {
                    commits += task.await??.commits;
                }
                anyhow::Ok(commits)
            }
        };
        eprintln!("[agentic-bench] profile: the chain's commits replayed without the engine for {secs:.1} s");
        replay_for(secs.min(1.0) / 2.0, "store-warm").await?;
        let (cpu0, server0, t) = (process_cpu_ms(), postgres_cpu_ms(), Instant::now());
        let commits = replay_for(secs, "store-alone").await?;
        let (cpu1, server1, elapsed) = (process_cpu_ms(), postgres_cpu_ms(), t.elapsed().as_secs_f64());
        Ok(per_commit_figures(
            "one chain invoke's commits (its admission, then 10 step commits; the lease and admission with the \
                first step's commit, or with --named-threads before it) replayed on fresh threads straight into the \
                store: the chain's rows, statements and round trips, without the engine \
                (no node run, no step applied, no value encoded; the store still encodes each checkpoint's body \
                and metadata, as it does for the chain)",
            commits,
            elapsed,
            cpu1 - cpu0,
            (self.common.backend == Backend::Postgres).then_some(server1 - server0),
        ))
    }

    /// `profile`'s floor on PostgreSQL: the chain's step rows as the store wrote them (read back from
    /// [`Bench::store_alone`]'s threads), inserted again through sqlx on plain connections, one per
    /// thread: one `INSERT` per commit, each committed durably, prepared and with binary parameters
    /// as the store's; no engine, no store code, no lease statement. What the driver and the server
    /// cost for one durable commit per step, which the chain and the store are measured against.
    async fn driver_alone(&mut self, args: &LoadArgs, secs: f64) -> anyhow::Result<Value> {
        type Row = (
            i64,
            Option<i64>,
            i64,
            Vec<u8>,
            String,
            Option<Vec<String>>,
            Option<Vec<Option<i64>>>,
            Option<Vec<Vec<u8>>>,
        );
        let pg = self.pg.as_mut().context("driver_alone needs PostgreSQL")?;
        // One replayed run's step rows (not its admission, source `input`: that goes with the lease).
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, parent, step, body, metadata::text, channels, bases, data FROM agentic.checkpoints
             WHERE tid = (SELECT min(tid) FROM agentic.checkpoints) AND ns = '' AND source = 'loop' ORDER BY id",
        )
        .fetch_all(&mut pg.admin)
        .await?;
        if rows.is_empty() {
            bail!("driver_alone: no step rows stored by the replay to insert again");
        }
        let rows = Arc::new(rows);
        let options = PgConnectOptions::from_str(&self.common.database)?
            .options([("plan_cache_mode", "force_generic_plan"), ("enable_seqscan", "off")]);
        let mut connections = Vec::with_capacity(args.threads);
        for _ in 0..args.threads {
            connections.push(options.connect().await?);
        }
        eprintln!("[agentic-bench] profile: the chain's step rows inserted through sqlx alone for {secs:.1} s");
        let insert_for = |secs: f64, connections: Vec<PgConnection>, first_tid: i64| {
            let deadline = Instant::now() + Duration::from_secs_f64(secs);
            let tasks: Vec<_> = connections
                .into_iter()
                .enumerate()
                .map(|(w, mut conn)| {
                    let rows = Arc::clone(&rows);
                    tokio::spawn(async move {
                        let mut commits = 0u64;
                        // Negative thread ids: no clash with the store's, which count up from 1.
                        let mut tid = first_tid - (w as i64) * 1_000_000_000;
                        while Instant::now() < deadline {
                            for (id, parent, step, body, metadata, channels, bases, data) in rows.iter() {
                                sqlx::query(DRIVER_INSERT_SQL)
                                    .bind(tid)
                                    .bind("")
                                    .bind(id)
                                    .bind(parent)
                                    .bind(step)
                                    .bind("loop")
                                    .bind(body.as_slice())
                                    .bind(metadata.as_str())
                                    .bind(channels.as_deref())
                                    .bind(bases.as_deref())
                                    .bind(data.as_deref())
                                    .execute(&mut conn)
                                    .await?;
                                commits += 1;
                            }
                            tid -= 1;
                        }
                        anyhow::Ok((commits, conn))
                    })
                })
                .collect();
            async move {
                let (mut commits, mut connections) = (0, Vec::new());
                for task in tasks {
                    let (n, conn) = task.await??;
                    commits += n;
                    connections.push(conn);
                }
                anyhow::Ok((commits, connections))
            }
        };
        let (_, connections) = insert_for(secs.min(1.0) / 2.0, connections, -1).await?;
        let (cpu0, server0, t) = (process_cpu_ms(), postgres_cpu_ms(), Instant::now());
        let (commits, connections) = insert_for(secs, connections, -500_000_000).await?;
        let (cpu1, server1, elapsed) = (process_cpu_ms(), postgres_cpu_ms(), t.elapsed().as_secs_f64());
        for conn in connections {
            let _ = conn.close().await;
        }
        Ok(per_commit_figures(
            "the chain's step rows as the store wrote them, inserted again through sqlx on plain connections \
                (one per thread): one INSERT per commit, committed durably, prepared, binary parameters; no engine, \
                no store code, no lease statement",
            commits,
            elapsed,
            cpu1 - cpu0,
            Some(server1 - server0),
        ))
    }
}

/// `profile`'s figures for commits made without the engine: `commits` in `elapsed` seconds, with
/// this process's and PostgreSQL's CPU milliseconds over the same window, per commit.
fn per_commit_figures(what: &str, commits: u64, elapsed: f64, client_ms: f64, server_ms: Option<f64>) -> Value {
    let n = commits.max(1) as f64;
    json!({
        "what": what,
        "secs": round2(elapsed),
        "commits": commits,
        "commits_per_s": round2(n / elapsed),
        "per_commit_us": {
            "wall": round2(elapsed * 1e6 / n),
            "client_cpu": round2(client_ms * 1e3 / n),
            "postgres_cpu": server_ms.map(|ms| round2(ms * 1e3 / n)),
        },
    })
}

/// [`Bench::driver_alone`]'s statement: the store's lone step commit (a checkpoint row with its
/// values), parameter for parameter.
const DRIVER_INSERT_SQL: &str = "INSERT INTO agentic.checkpoints \
    (tid, ns, id, parent, step, source, body, metadata, channels, bases, data) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10, $11)";

/// Times `f` `n` times; min and median in milliseconds.
async fn time_ms<F, Fut>(n: usize, mut f: F) -> anyhow::Result<Value>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = agentic_runtime::Result<()>>,
{
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f().await?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let median = if times.is_empty() {
        0.0
    } else if times.len() % 2 == 1 {
        times[times.len() / 2]
    } else {
        f64::midpoint(times[times.len() / 2 - 1], times[times.len() / 2])
    };
    Ok(json!({"min_ms": round3(times.first().copied().unwrap_or(0.0)), "median_ms": round3(median)}))
}

/// Mean of nanosecond samples, in microseconds.
fn mean_us(samples: &[u64]) -> Option<f64> {
    (!samples.is_empty()).then(|| round2(samples.iter().sum::<u64>() as f64 / samples.len() as f64 / 1e3))
}

/// Count, mean, median, p99 and maximum of nanosecond samples, in microseconds, with the
/// method that took them.
fn latency_summary(samples: &[u64], method: Option<&str>) -> Value {
    let mut sorted = samples.to_vec();
    let mut summary = json!({
        "samples": sorted.len(),
        "mean_us": mean_us(&sorted),
        "p50_us": percentile_us(&mut sorted, 0.50),
        "p99_us": percentile_us(&mut sorted, 0.99),
        "max_us": sorted.last().map(|&ns| round2(ns as f64 / 1e3)),
    });
    if let Some(method) = method {
        summary["method"] = json!(method);
    }
    summary
}

/// Nearest-rank percentile of nanosecond samples, in microseconds; sorts the samples.
fn percentile_us(samples: &mut [u64], q: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
    Some(round2(samples[rank - 1] as f64 / 1e3))
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Min / median / max of the repetitions' main figures.
fn summary_line(reps: &[Value]) -> Value {
    let stat = |key: &str| {
        let mut v: Vec<f64> = reps.iter().filter_map(|r| r[key].as_f64()).collect();
        v.sort_by(f64::total_cmp);
        let median = if v.is_empty() {
            0.0
        } else if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            f64::midpoint(v[v.len() / 2 - 1], v[v.len() / 2])
        };
        json!({"min": v.first(), "median": round2(median), "max": v.last()})
    };
    let first = &reps[0];
    json!({
        "harness": "agentic",
        "summary": true,
        "case": first["case"],
        "backend": first["backend"],
        "threads": first["threads"],
        "durability": first["durability"],
        "reps": reps.len(),
        "node_steps_per_s": stat("node_steps_per_s"),
        "invokes_per_s": stat("invokes_per_s"),
        "ms_per_wal_sync": reps.iter().map(|r| r["ms_per_wal_sync"].clone()).collect::<Vec<_>>(),
        "tags": first["tags"],
    })
}

// ---------------------------------------------------------------------------------------------
// /proc readings
// ---------------------------------------------------------------------------------------------

/// A `/proc/self/status` field in KiB.
fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?;
    line[field.len() + 1..].split_whitespace().next()?.parse().ok()
}

/// Clock ticks per second of /proc CPU times (`USER_HZ`, fixed at 100 in the Linux ABI).
const USER_HZ: f64 = 100.0;

/// User + system CPU milliseconds from a `/proc/<pid>/stat` text; `None` unless `comm` matches.
fn stat_cpu_ms(stat: &str, comm: Option<&str>) -> Option<f64> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    if let Some(comm) = comm
        && &stat[open + 1..close] != comm
    {
        return None;
    }
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // After the command: state is field 3 of the line, utime 14 and stime 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) * 1e3 / USER_HZ)
}

fn process_cpu_ms() -> f64 {
    std::fs::read_to_string("/proc/self/stat").ok().and_then(|s| stat_cpu_ms(&s, None)).unwrap_or(0.0)
}

/// CPU milliseconds of every live `postgres` process.
fn postgres_cpu_ms() -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0.0 };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|s| stat_cpu_ms(&s, Some("postgres")))
        .sum()
}

/// (busy, total) jiffies of the whole machine from /proc/stat.
fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else { return (0.0, 0.0) };
    let v: Vec<f64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (total - idle, total)
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL: database, statistics, table sizes
// ---------------------------------------------------------------------------------------------

/// The harness's own connection to the benchmark database.
struct Pg {
    admin: PgConnection,
    database: String,
    /// Whether `track_wal_io_timing` is on (fsync times are zero without it).
    wal_timing: bool,
    /// Whether this run switched it on (and so switches it back off at the end).
    switched_timing: bool,
}

#[derive(Clone, Copy)]
struct WalSnapshot {
    syncs: i64,
    sync_ms: f64,
    writes: i64,
    bytes: f64,
    commits: i64,
}

struct WalDelta {
    syncs: i64,
    sync_ms: Option<f64>,
    ms_per_sync: Option<f64>,
    writes: i64,
    bytes: f64,
    commits: i64,
}

impl WalDelta {
    fn between(before: &WalSnapshot, after: &WalSnapshot, timed: bool) -> Self {
        let syncs = after.syncs - before.syncs;
        let sync_ms = timed.then_some(after.sync_ms - before.sync_ms);
        WalDelta {
            syncs,
            sync_ms,
            ms_per_sync: sync_ms.filter(|_| syncs > 0).map(|ms| round3(ms / syncs as f64)),
            writes: after.writes - before.writes,
            bytes: after.bytes - before.bytes,
            commits: after.commits - before.commits,
        }
    }

    fn to_json(&self, node_steps: u64, secs: f64) -> Value {
        let steps = node_steps.max(1) as f64;
        json!({
            "syncs": self.syncs,
            "sync_ms": self.sync_ms.map(round2),
            "ms_per_wal_sync": self.ms_per_sync,
            "syncs_per_s": round2(self.syncs as f64 / secs),
            "syncs_per_node_step": round3(self.syncs as f64 / steps),
            "writes": self.writes,
            "bytes_per_node_step": round2(self.bytes / steps),
            "db_commits": self.commits,
            "db_commits_per_s": round2(self.commits as f64 / secs),
            "db_commits_per_node_step": round3(self.commits as f64 / steps),
            "scope": "pg_stat_wal is cluster-wide; db_commits (pg_stat_database.xact_commit) count this database's \
                      transactions, read-only ones included",
        })
    }
}

impl Pg {
    async fn open(url: &str) -> anyhow::Result<Self> {
        let options = PgConnectOptions::from_str(url).context("parsing the PostgreSQL URL")?;
        let database = options.get_database().unwrap_or("postgres").to_owned();
        let admin = match options.connect().await {
            Ok(conn) => conn,
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {
                eprintln!("[agentic-bench] creating database {database}");
                let mut server =
                    options.clone().database("postgres").connect().await.context("connecting to PostgreSQL")?;
                let create = format!("CREATE DATABASE \"{}\"", database.replace('"', "\"\""));
                sqlx::raw_sql(sqlx::AssertSqlSafe(create))
                    .execute(&mut server)
                    .await
                    .context("creating the database")?;
                let _ = server.close().await;
                options.connect().await.context("connecting to the benchmark database")?
            }
            Err(e) => return Err(anyhow::Error::new(e).context("connecting to PostgreSQL")),
        };
        let mut pg = Pg { admin, database, wal_timing: false, switched_timing: false };
        pg.wal_timing = pg.timing_on().await?;
        if !pg.wal_timing {
            // Two round trips: ALTER SYSTEM cannot share a transaction with another statement.
            let mut switched = sqlx::raw_sql("ALTER SYSTEM SET track_wal_io_timing = on").execute(&mut pg.admin).await;
            if switched.is_ok() {
                switched = sqlx::raw_sql("SELECT pg_reload_conf()").execute(&mut pg.admin).await;
            }
            match switched {
                Ok(_) => {
                    // The reload reaches sessions asynchronously.
                    for _ in 0..50 {
                        if pg.timing_on().await? {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    pg.wal_timing = pg.timing_on().await?;
                    pg.switched_timing = pg.wal_timing;
                    eprintln!("[agentic-bench] track_wal_io_timing switched on for this run");
                }
                Err(e) => eprintln!(
                    "[agentic-bench] track_wal_io_timing is off and could not be enabled ({e}): no fsync times"
                ),
            }
        }
        Ok(pg)
    }

    async fn timing_on(&mut self) -> anyhow::Result<bool> {
        let on: String =
            sqlx::query_scalar("SELECT current_setting('track_wal_io_timing')").fetch_one(&mut self.admin).await?;
        Ok(on == "on")
    }

    async fn close(mut self) {
        if self.switched_timing
            && sqlx::raw_sql("ALTER SYSTEM RESET track_wal_io_timing").execute(&mut self.admin).await.is_ok()
        {
            let _ = sqlx::raw_sql("SELECT pg_reload_conf()").execute(&mut self.admin).await;
        }
        let _ = self.admin.close().await;
    }

    /// Empties the runtime's tables, in databases named `bench*` only.
    async fn truncate(&mut self) -> anyhow::Result<()> {
        if !self.database.starts_with("bench") {
            eprintln!(
                "[agentic-bench] not truncating database {} (its name does not start with `bench`)",
                self.database
            );
            return Ok(());
        }
        let tables: Option<String> = sqlx::query_scalar(
            "SELECT string_agg(format('%I.%I', schemaname, tablename), ', ')
             FROM pg_tables WHERE schemaname = 'agentic'",
        )
        .fetch_one(&mut self.admin)
        .await?;
        if let Some(tables) = tables {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("TRUNCATE {tables}"))).execute(&mut self.admin).await?;
        }
        Ok(())
    }

    async fn snapshot(&mut self) -> anyhow::Result<WalSnapshot> {
        let (syncs, sync_ms, writes, bytes, commits): (i64, f64, i64, f64, i64) = sqlx::query_as(
            "SELECT w.wal_sync, w.wal_sync_time, w.wal_write, w.wal_bytes::float8, d.xact_commit
             FROM pg_stat_wal w, pg_stat_database d WHERE d.datname = current_database()",
        )
        .fetch_one(&mut self.admin)
        .await?;
        Ok(WalSnapshot { syncs, sync_ms, writes, bytes, commits })
    }

    /// Waits until no other session is connected to the database (the run's backends have
    /// exited and flushed their statistics), then [`STATS_SETTLE`].
    async fn wait_idle(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let others: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
            .fetch_one(&mut self.admin)
            .await?;
            if others == 0 || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(STATS_SETTLE).await;
        Ok(())
    }

    /// Client sessions connected to other databases (another workload sharing the server).
    async fn other_sessions(&mut self) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND datname <> current_database()",
        )
        .fetch_one(&mut self.admin)
        .await?)
    }

    /// Row bytes and stored bytes of every runtime table.
    async fn table_sizes(&mut self) -> anyhow::Result<BTreeMap<String, TableSize>> {
        let names: Vec<String> =
            sqlx::query_scalar("SELECT tablename::text FROM pg_tables WHERE schemaname = 'agentic' ORDER BY 1")
                .fetch_all(&mut self.admin)
                .await?;
        let mut sizes = BTreeMap::new();
        for name in names {
            let quoted = format!("agentic.\"{}\"", name.replace('"', "\"\""));
            let (rows, rows_bytes, stored): (i64, i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT count(*), coalesce(sum(pg_column_size(t.*)), 0)::int8, pg_total_relation_size('{}')::int8 FROM {quoted} t",
                quoted.replace('\'', "''")
            )))
            .fetch_one(&mut self.admin)
            .await?;
            sizes.insert(
                name,
                TableSize { rows: rows as u64, rows_bytes: rows_bytes as u64, stored_bytes: stored as u64 },
            );
        }
        Ok(sizes)
    }
}

struct TableSize {
    rows: u64,
    rows_bytes: u64,
    stored_bytes: u64,
}

/// Per table (its indexes included): records' payload bytes and pages' bytes, from `dbstat`.
async fn sqlite_table_sizes(pool: &sqlx::SqlitePool) -> anyhow::Result<BTreeMap<String, TableSize>> {
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(pool).await?;
    let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT m.tbl_name, sum(CASE WHEN m.type = 'table' THEN d.ncell ELSE 0 END), sum(d.payload), sum(d.pgsize)
         FROM dbstat d JOIN sqlite_master m ON m.name = d.name
         WHERE m.tbl_name NOT LIKE '\\_sqlx%' ESCAPE '\\' AND m.tbl_name NOT LIKE 'sqlite%'
         GROUP BY m.tbl_name ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .context("reading dbstat")?;
    Ok(rows
        .into_iter()
        .map(|(name, rows, payload, pages)| {
            (name, TableSize { rows: rows as u64, rows_bytes: payload as u64, stored_bytes: pages as u64 })
        })
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Statement counting (profile)
// ---------------------------------------------------------------------------------------------

/// Whether sqlx's statement events are counted.
static LOG_STATEMENTS: AtomicBool = AtomicBool::new(false);
/// Statement label -> (executions, client-observed seconds).
static STATEMENT_LOG: LazyLock<Mutex<HashMap<String, (u64, f64)>>> = LazyLock::new(Mutex::default);

/// Statements of the runtime recognised by a fragment of their text; others are named by
/// their first words.
const STATEMENT_LABELS: &[(&str, &str)] = &[
    (
        "($16, $17, $18",
        "new thread's first step: advisory lock, thread row, admission and the step's checkpoint (durable)",
    ),
    (
        "WITH ORDINALITY AS r(thread_id",
        "acquire several new threads' leases together: advisory locks, thread rows, admissions",
    ),
    ("ON CONFLICT (thread_id) DO NOTHING", "acquire a new thread's lease alone: advisory lock, thread row, admission"),
    ("WHERE t.thread_id = $1", "a new thread's take that made no row: the thread that existed"),
    ("FROM fresh", "acquire lease + admission: advisory lock, thread epoch bump, a new thread's first checkpoint"),
    ("pg_try_advisory_lock", "acquire lease: advisory lock + thread epoch bump"),
    ("WITH RECURSIVE spaces", "acquire lease: highest checkpoint id and root head"),
    (
        "folded AS ( DELETE FROM agentic.writes x WHERE",
        "commit step on the lease session, head known: checkpoint row, folded writes",
    ),
    ("VALUES ($1, $2, $3", "commit step on the lease session, head known, no pending writes: checkpoint row"),
    (
        "FROM agentic.threads t WHERE t.tid = $1",
        "commit step on the lease session: head check, checkpoint row, folded writes",
    ),
    ("RETURNING tid, ns", "commit step, fenced, heads known and no pending writes: epoch, checkpoint"),
    ("INSERT INTO agentic.checkpoints", "commit step, fenced: epoch, head check, checkpoint, values, folded writes"),
    ("WITH target AS", "load: head checkpoint"),
    ("WITH RECURSIVE chain", "load: channel values"),
    ("INSERT INTO agentic.writes", "put_writes"),
    ("JOIN agentic.writes w", "pending_writes"),
    ("pg_advisory_unlock(", "release lease: advisory unlock"),
];

fn statement_label(sql: &str) -> String {
    let flat = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    STATEMENT_LABELS
        .iter()
        .find(|(fragment, _)| flat.contains(fragment))
        .map_or_else(|| flat.chars().take(60).collect(), |(_, label)| (*label).to_owned())
}

#[derive(Default)]
struct StatementVisitor {
    summary: String,
    statement: String,
    secs: f64,
}

impl tracing::field::Visit for StatementVisitor {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        match field.name() {
            "summary" => value.clone_into(&mut self.summary),
            "db.statement" => value.clone_into(&mut self.statement),
            _ => {}
        }
    }
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        if field.name() == "elapsed_secs" {
            self.secs = value;
        }
    }
    fn record_debug(&mut self, _field: &tracing::field::Field, _value: &dyn std::fmt::Debug) {}
}

/// Counts sqlx's `sqlx::query` events while [`LOG_STATEMENTS`] is set.
struct StatementCounter;

impl<S: tracing::Subscriber> Layer<S> for StatementCounter {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: tracing_subscriber::layer::Context<'_, S>) {
        let mut visit = StatementVisitor::default();
        event.record(&mut visit);
        let sql = if visit.statement.trim().is_empty() { &visit.summary } else { &visit.statement };
        let mut log = STATEMENT_LOG.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = log.entry(statement_label(sql)).or_default();
        entry.0 += 1;
        entry.1 += visit.secs;
    }
}

/// Logs to stderr (`RUST_LOG`, default `warn`); `profile` also counts statements. Only there: a
/// layer that may want sqlx's `sqlx::query` events makes sqlx format every statement's summary
/// (~3.4k instructions per statement) to offer it, counted or not.
fn install_tracing(count_statements: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let counter = count_statements.then(|| {
        StatementCounter.with_filter(tracing_subscriber::filter::dynamic_filter_fn(|meta, _| {
            meta.target() == "sqlx::query" && LOG_STATEMENTS.load(Ordering::Relaxed)
        }))
    });
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(filter))
        .with(counter)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_blob_is_1_kib_of_lowercase_hex_and_differs_on_every_call() {
        let (a, b) = (fresh_blob(), fresh_blob());
        assert_eq!(a.len(), BLOB_BYTES * 2);
        assert!(a.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')), "{a}");
        assert_ne!(a, b);
    }
}
