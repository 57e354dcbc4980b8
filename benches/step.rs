//! Criterion: the engine's own cost per super-step, on the memory store (no I/O), and how it
//! depends on the size of the state a step does not touch (100 B, 10 KiB, 1 MiB): a step should
//! never copy state it does not change.
//!
//! - `step_memory/invoke_one_node`: a whole invoke of a one-node graph on a fresh thread (lease,
//!   load, admission checkpoint, the node, its checkpoint).
//! - `step_memory/loop/<size>`: one node looping 100 super-steps per invoke on a thread whose
//!   state also holds an untouched string of `<size>`; throughput is in steps, so criterion's
//!   time per element is the time per step.
//! - `step_memory/write/<size>`: the same loop, the node writing a fresh string of `<size>` on
//!   every step: what a step that changes a large value costs (it should move, not copy, it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentic_runtime::{
    Channel, END, Goto, Graph, GraphBuilder, Input, MemoryCheckpointer, RunConfig, START, Update, node_fn,
};
use criterion::{BenchmarkId, Criterion, Throughput};

/// Super-steps per invoke in the loop benchmark.
const LOOP_STEPS: u64 = 100;
/// State sizes besides the looping counter.
const SIZES: [(&str, usize); 3] = [("100B", 100), ("10KiB", 10 * 1024), ("1MiB", 1024 * 1024)];

fn fail<T, E: std::fmt::Display>(result: Result<T, E>) -> T {
    match result {
        Ok(value) => value,
        Err(e) => panic!("benchmark setup failed: {e}"),
    }
}

fn one_node() -> agentic_runtime::Result<Graph> {
    GraphBuilder::new("bench-one-node")
        .channel("n", Channel::sum())
        .node("tick", node_fn(|_, _| async { Ok(Update::new().set("n", 1)) }))
        .edge(START, "tick")
        .edge("tick", END)
        .compile()
}

/// `tick` adds one to `n` and loops to itself until `n` is a multiple of [`LOOP_STEPS`]; with
/// `write`, it also writes a fresh `payload` of that many bytes on every step.
fn looping(write: Option<usize>) -> agentic_runtime::Result<Graph> {
    let payload = write.map(|size| Arc::new("y".repeat(size)));
    GraphBuilder::new("bench-loop")
        .channel("n", Channel::sum())
        .channel("payload", Channel::last_value())
        .node(
            "tick",
            node_fn(move |_, _| {
                let payload = payload.clone();
                async move {
                    let update = Update::new().set("n", 1);
                    Ok(match payload {
                        Some(payload) => update.set("payload", payload.as_str()),
                        None => update,
                    })
                }
            }),
        )
        .conditional(
            "tick",
            |state| {
                let n: u64 = state.get("n")?;
                Ok(vec![Goto::node(if n.is_multiple_of(LOOP_STEPS) { END } else { "tick" })])
            },
            ["tick", END],
        )
        .edge(START, "tick")
        .compile()
}

/// Times `iters` invokes of `graph` on `thread`; between them (untimed) the thread is pruned to
/// its head, which keeps the store's size constant across iterations.
fn time_invokes(rt: &tokio::runtime::Runtime, graph: &Graph, thread: &str, config: &RunConfig, iters: u64) -> Duration {
    rt.block_on(async {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let t = Instant::now();
            fail(graph.invoke(thread, Input::Start(Update::new()), config).await);
            total += t.elapsed();
            fail(graph.prune(thread, 1).await);
        }
        total
    })
}

fn bench_steps(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    let mut group = c.benchmark_group("step_memory");
    group.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));

    let graph = fail(one_node()).with_checkpointer(Arc::new(MemoryCheckpointer::new()));
    let config = RunConfig::default();
    group.throughput(Throughput::Elements(1));
    group.bench_function("invoke_one_node", |b| {
        let mut n = 0u64;
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    n += 1;
                    let thread = format!("one-{n}");
                    let t = Instant::now();
                    fail(graph.invoke(&thread, Input::Start(Update::new()), &config).await);
                    total += t.elapsed();
                    fail(graph.delete_thread(&thread).await);
                }
                total
            })
        });
    });

    let config = RunConfig { recursion_limit: LOOP_STEPS + 5, ..RunConfig::default() };
    group.throughput(Throughput::Elements(LOOP_STEPS));
    for (label, size) in SIZES {
        let graph = fail(looping(None)).with_checkpointer(Arc::new(MemoryCheckpointer::new()));
        let thread = format!("loop-{label}");
        let payload = "x".repeat(size);
        fail(rt.block_on(graph.invoke(&thread, Input::Start(Update::new().set("payload", payload)), &config)));
        group.bench_with_input(BenchmarkId::new("loop", label), &size, |b, _| {
            b.iter_custom(|iters| time_invokes(rt, &graph, &thread, &config, iters));
        });
    }
    for (label, size) in SIZES {
        let graph = fail(looping(Some(size))).with_checkpointer(Arc::new(MemoryCheckpointer::new()));
        let thread = format!("write-{label}");
        group.bench_with_input(BenchmarkId::new("write", label), &size, |b, _| {
            b.iter_custom(|iters| time_invokes(rt, &graph, &thread, &config, iters));
        });
    }
    group.finish();
}

fn main() {
    let rt = fail(tokio::runtime::Builder::new_multi_thread().enable_all().build());
    let mut c = Criterion::default().configure_from_args();
    bench_steps(&mut c, &rt);
    c.final_summary();
}
