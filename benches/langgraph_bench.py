#!/usr/bin/env python3
"""LangGraph's side of benches/compare.sh: the same workloads as `agentic-bench`, run on
LangGraph with its in-memory and PostgreSQL checkpointers, one JSON line per measurement.

Cases (CASE --saver SAVER):
  chain    START -> n0 .. n9 -> END; State{counter, messages (operator.add), blob}; each node
           sets counter+1, appends one message, replaces blob with a fresh 1 KiB hex string.
           Every invoke uses a fresh thread_id.
  fan      fan -> 8 x Send("worker") (each appends to a reducer list) -> join -> END.
  resume   a thread with 1,000 node-steps of history (100 chain invokes on one thread): time
           loading it and continuing it by one step (a 1-node graph with the same State).
  storage  100 chain invokes on one thread: bytes in LangGraph's tables vs the raw payload.

Savers: mem (InMemorySaver), pg (PostgresSaver on one connection, sync API), apg
(AsyncPostgresSaver on an AsyncConnectionPool of --threads connections, --threads asyncio
workers sharing the saver).

PostgreSQL figures carry the WAL fsync count and time of their own repetition (pg_stat_wal; run
with track_wal_io_timing on, as compare.sh does), read once the run's sessions have ended.
"""
import argparse
import asyncio
import json
import operator
import os
import statistics
import sys
import time
from typing import Annotated, TypedDict

from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Send

CHAIN_NODES = 10
FAN_WIDTH = 8
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/bench_langgraph"
# pg_stat_wal is read this long after the run's sessions have ended (they flush on exit).
STATS_SETTLE_S = 0.6
LG_TABLES = ("checkpoints", "checkpoint_blobs", "checkpoint_writes")


def log(msg):
    print(f"[langgraph_bench] {msg}", file=sys.stderr, flush=True)


class Hooks:
    """Counts node executions; optionally sums the JSON bytes of the values written."""

    def __init__(self, count_payload=False):
        self.nodes = 0
        self.payload = 0 if count_payload else None

    def wrote(self, *values):
        self.nodes += 1
        if self.payload is not None:
            self.payload += sum(json_len(v) for v in values)


def json_len(value):
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def blob():
    return os.urandom(512).hex()


class ChainState(TypedDict):
    counter: int
    messages: Annotated[list[str], operator.add]
    blob: str


class FanState(TypedDict):
    counter: int
    results: Annotated[list[str], operator.add]
    blob: str


def chain_builder(hooks, nodes=CHAIN_NODES):
    builder = StateGraph(ChainState)
    previous = START
    for i in range(nodes):
        def node(state, i=i):
            message = f"node{i} step {state['counter']}"
            update = {"counter": state["counter"] + 1, "messages": [message], "blob": blob()}
            hooks.wrote(update["counter"], message, update["blob"])
            return update
        builder.add_node(f"n{i}", node)
        builder.add_edge(previous, f"n{i}")
        previous = f"n{i}"
    builder.add_edge(previous, END)
    return builder


def fan_builder(hooks):
    builder = StateGraph(FanState)

    def fan(state):
        hooks.wrote(state["counter"] + 1)
        return {"counter": state["counter"] + 1}

    def route(state):
        return [Send("worker", {"i": i, "counter": state["counter"]}) for i in range(FAN_WIDTH)]

    def worker(arg):
        result = f"w{arg['i']}@{arg['counter']}"
        hooks.wrote(result)
        return {"results": [result]}

    def join(state):
        update = {"counter": state["counter"] + 1, "blob": blob()}
        hooks.wrote(update["counter"], update["blob"])
        return update

    builder.add_node("fan", fan)
    builder.add_node("worker", worker)
    builder.add_node("join", join)
    builder.add_edge(START, "fan")
    builder.add_conditional_edges("fan", route, ["worker"])
    builder.add_edge("worker", "join")
    builder.add_edge("join", END)
    return builder


def initial(case):
    if case == "fan":
        return {"counter": 0, "results": [], "blob": ""}
    return {"counter": 0, "messages": [], "blob": ""}


def builder_for(case, hooks):
    return fan_builder(hooks) if case == "fan" else chain_builder(hooks)


def per_invoke(case, durability):
    """Node executions and checkpoints of one invoke, measured on an InMemorySaver."""
    hooks = Hooks()
    graph = builder_for(case, hooks).compile(checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "probe"}}
    graph.invoke(initial(case), config, durability=durability)
    return hooks.nodes, sum(1 for _ in graph.get_state_history(config))


# --- PostgreSQL --------------------------------------------------------------------------------

def pg_connect(dsn, **kw):
    import psycopg
    return psycopg.connect(dsn, autocommit=True, **kw)


def pg_setup(dsn):
    from psycopg.rows import dict_row
    from langgraph.checkpoint.postgres import PostgresSaver
    with pg_connect(dsn, prepare_threshold=0, row_factory=dict_row) as conn:
        PostgresSaver(conn).setup()


def pg_truncate(dsn):
    with pg_connect(dsn) as conn:
        conn.execute("TRUNCATE " + ", ".join(LG_TABLES))


def wal_snapshot(dsn):
    with pg_connect(dsn) as conn:
        row = conn.execute(
            "SELECT w.wal_sync, w.wal_sync_time, w.wal_write, w.wal_bytes::float8, d.xact_commit, "
            "current_setting('track_wal_io_timing') = 'on' "
            "FROM pg_stat_wal w, pg_stat_database d WHERE d.datname = current_database()").fetchone()
        return {"syncs": row[0], "sync_ms": row[1], "writes": row[2], "bytes": row[3], "commits": row[4],
                "timed": row[5]}


def wait_idle(dsn):
    with pg_connect(dsn) as conn:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            others = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                  "AND pid <> pg_backend_pid()").fetchone()[0]
            if others == 0:
                break
            time.sleep(0.02)
    time.sleep(STATS_SETTLE_S)


def wal_delta(dsn, before, node_steps, secs):
    wait_idle(dsn)
    after = wal_snapshot(dsn)
    syncs = after["syncs"] - before["syncs"]
    sync_ms = after["sync_ms"] - before["sync_ms"] if after["timed"] else None
    ms_per_sync = round(sync_ms / syncs, 3) if sync_ms is not None and syncs > 0 else None
    steps = max(node_steps, 1)
    return ms_per_sync, {
        "syncs": syncs, "sync_ms": None if sync_ms is None else round(sync_ms, 2), "ms_per_wal_sync": ms_per_sync,
        "syncs_per_s": round(syncs / secs, 2), "syncs_per_node_step": round(syncs / steps, 3),
        "writes": after["writes"] - before["writes"],
        "bytes_per_node_step": round((after["bytes"] - before["bytes"]) / steps, 2),
        "db_commits": after["commits"] - before["commits"],
        "db_commits_per_s": round((after["commits"] - before["commits"]) / secs, 2),
        "db_commits_per_node_step": round((after["commits"] - before["commits"]) / steps, 3),
    }


# --- throughput ----------------------------------------------------------------------------------

def loop_sync(graph, case, secs, durability, prefix):
    latencies = []
    start = time.perf_counter()
    deadline = start + secs
    i = 0
    while True:
        t = time.perf_counter()
        graph.invoke(initial(case), {"configurable": {"thread_id": f"{prefix}-{i}"}}, durability=durability)
        latencies.append(time.perf_counter() - t)
        i += 1
        if time.perf_counter() >= deadline:
            return i, time.perf_counter() - start, latencies


async def loop_async(graph, case, threads, secs, durability, prefix):
    latencies = []
    counts = [0] * threads
    start = time.perf_counter()
    deadline = start + secs

    async def worker(w):
        i = 0
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            await graph.ainvoke(initial(case), {"configurable": {"thread_id": f"{prefix}-w{w}-{i}"}},
                                durability=durability)
            latencies.append(time.perf_counter() - t)
            i += 1
        counts[w] = i

    await asyncio.gather(*(worker(w) for w in range(threads)))
    return sum(counts), time.perf_counter() - start, latencies


def percentile_us(values, q):
    if not values:
        return None
    values = sorted(values)
    rank = min(max(int(-(-q * len(values) // 1)), 1), len(values))
    return round(values[rank - 1] * 1e6, 2)


def throughput(a):
    nodes_per_invoke, ckpts = per_invoke(a.case, a.durability)
    backend = "memory" if a.saver == "mem" else "postgres"
    if backend == "postgres":
        pg_setup(a.dsn)
    # Rep 0 warms up (imports, allocator, pool, prepared statements) and is not reported.
    for rep in range(0 if a.warmup > 0 else 1, a.reps + 1):
        run_secs = min(a.warmup, a.secs) if rep == 0 else a.secs
        log(f"{a.case} {a.saver} threads={a.threads} " + (f"rep {rep}/{a.reps}" if rep else f"warm-up {run_secs}s"))
        hooks = Hooks()
        prefix = f"lg{os.getpid()}-{rep}-{time.time_ns()}"
        before = None
        if backend == "postgres":
            pg_truncate(a.dsn)
            before = wal_snapshot(a.dsn)
        if a.saver == "mem":
            graph = builder_for(a.case, hooks).compile(checkpointer=InMemorySaver())
            invokes, secs, lat = loop_sync(graph, a.case, run_secs, a.durability, prefix)
        elif a.saver == "pg":
            from psycopg.rows import dict_row
            from langgraph.checkpoint.postgres import PostgresSaver
            with pg_connect(a.dsn, prepare_threshold=0, row_factory=dict_row) as conn:
                graph = builder_for(a.case, hooks).compile(checkpointer=PostgresSaver(conn))
                invokes, secs, lat = loop_sync(graph, a.case, run_secs, a.durability, prefix)
        else:
            invokes, secs, lat = asyncio.run(run_apg(a, hooks, prefix, run_secs))
        if rep == 0:
            continue
        steps = hooks.nodes
        ms_per_sync, wal = (wal_delta(a.dsn, before, steps, secs) if before is not None else (None, None))
        inv_s = invokes / secs
        line = {
            "harness": "langgraph", "case": a.case, "backend": backend, "saver": a.saver, "threads": a.threads,
            "durability": a.durability, "rep": rep, "secs": round(secs, 2), "invokes": invokes,
            "node_steps": steps, "invokes_per_s": round(inv_s, 2), "node_steps_per_s": round(steps / secs, 2),
            "us_per_node_step": round(secs * 1e6 / max(steps, 1), 2),
            "nodes_per_invoke_measured": nodes_per_invoke, "checkpoints_per_invoke": ckpts,
            "checkpoints_per_s": round(inv_s * ckpts, 2),
            "invoke_latency": {"samples": len(lat), "p50_us": percentile_us(lat, 0.5),
                               "p99_us": percentile_us(lat, 0.99)},
            "ms_per_wal_sync": ms_per_sync, "wal": wal, "tags": a.tags,
            "versions": versions(),
        }
        log(f"  {line['node_steps_per_s']:.0f} node-steps/s, ms/WAL sync {ms_per_sync}")
        print(json.dumps(line), flush=True)


async def run_apg(a, hooks, prefix, secs):
    from psycopg.rows import dict_row
    from psycopg_pool import AsyncConnectionPool
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
    async with AsyncConnectionPool(a.dsn, min_size=a.threads, max_size=a.threads, open=False,
                                   kwargs={"autocommit": True, "prepare_threshold": 0,
                                           "row_factory": dict_row}) as pool:
        await pool.wait()
        graph = builder_for(a.case, hooks).compile(checkpointer=AsyncPostgresSaver(pool))
        return await loop_async(graph, a.case, a.threads, secs, a.durability, prefix)


def versions():
    from importlib.metadata import version
    out = {}
    for pkg in ("langgraph", "langgraph-checkpoint", "langgraph-checkpoint-postgres", "psycopg"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - a missing package is reported as null
            out[pkg] = None
    return out


# --- resume and storage --------------------------------------------------------------------------

def timed_ms(fn, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return {"min_ms": round(times[0], 3), "median_ms": round(statistics.median(times), 3)}


def resume(a):
    from psycopg.rows import dict_row
    from langgraph.checkpoint.postgres import PostgresSaver
    pg_setup(a.dsn)
    pg_truncate(a.dsn)
    before = wal_snapshot(a.dsn)
    hooks = Hooks()
    out = {"harness": "langgraph", "case": "resume", "backend": "postgres", "saver": "pg",
           "durability": a.durability, "history_invokes": a.invokes, "history_node_steps": a.invokes * CHAIN_NODES,
           "timings": a.timings, "tags": a.tags, "versions": versions()}
    with pg_connect(a.dsn, prepare_threshold=0, row_factory=dict_row) as conn:
        saver = PostgresSaver(conn)
        chain = chain_builder(hooks).compile(checkpointer=saver)
        one = chain_builder(hooks, nodes=1).compile(checkpointer=saver)
        config = {"configurable": {"thread_id": f"long-{os.getpid()}"}}
        log(f"resume: building {a.invokes} invokes on one thread")
        t = time.perf_counter()
        for _ in range(a.invokes):
            chain.invoke(initial("chain"), config, durability=a.durability)
        out["build_secs"] = round(time.perf_counter() - t, 2)
        out["history_checkpoints"] = sum(1 for _ in saver.list(config))
        out["messages_len"] = len(chain.get_state(config).values["messages"])
        out["load_long"] = timed_ms(lambda: saver.get_tuple(config), a.timings)
        out["get_state_long"] = timed_ms(lambda: chain.get_state(config), a.timings)
        out["continue_1step_long"] = timed_ms(
            lambda: one.invoke(initial("chain"), config, durability=a.durability), a.timings)
        fresh = iter(range(10**9))
        out["continue_1step_fresh"] = timed_ms(
            lambda: one.invoke(initial("chain"), {"configurable": {"thread_id": f"fresh-{os.getpid()}-{next(fresh)}"}},
                               durability=a.durability), a.timings)
    out["ms_per_wal_sync"], _ = wal_delta(a.dsn, before, 1, 1)
    # The same long thread on the in-memory saver.
    mem = InMemorySaver()
    chain = chain_builder(hooks).compile(checkpointer=mem)
    one = chain_builder(hooks, nodes=1).compile(checkpointer=mem)
    for _ in range(a.invokes):
        chain.invoke(initial("chain"), config, durability=a.durability)
    out["memory_get_state_long"] = timed_ms(lambda: chain.get_state(config), a.timings)
    out["memory_continue_1step_long"] = timed_ms(
        lambda: one.invoke(initial("chain"), config, durability=a.durability), a.timings)
    out["what"] = ("load_long: PostgresSaver.get_tuple of the latest checkpoint; get_state_long: graph.get_state; "
                   "continue_1step_*: invoke of a 1-node graph (same State) on the thread = load + one node + "
                   "its checkpoints")
    print(json.dumps(out), flush=True)


def storage(a):
    from psycopg.rows import dict_row
    from langgraph.checkpoint.postgres import PostgresSaver
    pg_setup(a.dsn)
    pg_truncate(a.dsn)
    hooks = Hooks(count_payload=True)
    init = initial("chain")
    with pg_connect(a.dsn, prepare_threshold=0, row_factory=dict_row) as conn:
        graph = chain_builder(hooks).compile(checkpointer=PostgresSaver(conn))
        config = {"configurable": {"thread_id": f"storage-{os.getpid()}"}}
        for _ in range(a.invokes):
            graph.invoke(init, config, durability=a.durability)
    raw = hooks.payload + a.invokes * sum(json_len(v) for v in init.values())
    tables = {}
    with pg_connect(a.dsn) as conn:
        for t in LG_TABLES:
            rows, row_bytes, stored = conn.execute(
                f"SELECT count(*), coalesce(sum(pg_column_size(x.*)), 0)::int8, pg_total_relation_size('{t}') "
                f"FROM {t} x").fetchone()
            tables[t] = {"rows": rows, "rows_bytes": row_bytes, "stored_bytes": stored}
    rows_bytes = sum(t["rows_bytes"] for t in tables.values())
    stored = sum(t["stored_bytes"] for t in tables.values())
    print(json.dumps({
        "harness": "langgraph", "case": "storage", "backend": "postgres", "saver": "pg",
        "durability": a.durability, "invokes": a.invokes, "node_steps": a.invokes * CHAIN_NODES,
        "raw_payload_bytes": raw,
        "raw_payload_definition": "sum over every value written (each node's counter, message and 1 KiB blob, and "
                                  "each invoke's input) of the length of its JSON encoding",
        "rows_bytes": rows_bytes, "stored_bytes": stored,
        "ratio_rows_vs_raw": round(rows_bytes / max(raw, 1), 2), "ratio_stored_vs_raw": round(stored / max(raw, 1), 2),
        "measure": "rows_bytes: sum(pg_column_size(row)); stored_bytes: pg_total_relation_size; tables truncated "
                   "before the run, so they hold this thread only",
        "tables": tables, "tags": a.tags, "versions": versions()}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", choices=["chain", "fan", "resume", "storage"])
    ap.add_argument("--saver", choices=["mem", "pg", "apg"], default="pg")
    ap.add_argument("--threads", type=int, default=1, help="concurrent workers (apg only)")
    ap.add_argument("--secs", type=float, default=10.0, help="seconds per repetition")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of unreported warm-up before the reps")
    ap.add_argument("--durability", choices=["sync", "async", "exit"], default="sync")
    ap.add_argument("--invokes", type=int, default=100, help="chain invokes on the one thread (resume, storage)")
    ap.add_argument("--timings", type=int, default=30, help="timings per operation (resume)")
    ap.add_argument("--dsn", default=os.environ.get("BENCH_LANGGRAPH_DSN", DEFAULT_DSN))
    ap.add_argument("--tag", action="append", default=[], help="KEY=VALUE copied into every JSON line")
    a = ap.parse_args()
    a.tags = dict(t.split("=", 1) for t in a.tag)
    if a.saver != "apg" and a.threads != 1:
        ap.error("--threads > 1 needs --saver apg")
    if a.case == "resume":
        resume(a)
    elif a.case == "storage":
        storage(a)
    else:
        throughput(a)


if __name__ == "__main__":
    main()
