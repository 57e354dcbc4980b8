#!/usr/bin/env python3
"""Turns the JSON lines of one benches/compare.sh run into RESULTS.md and results.json.

Every figure comes from the raw lines; nothing is typed in. A comparison uses the three
measurements of one group taken back to back in one round (pgbench, LangGraph, ours), and only
when that group's fsync probes agree on the regime: ratios are computed within a round, then the
median over the rounds of one regime is reported.
"""
import argparse
import json
import os
import statistics
from collections import defaultdict

# case, backend, threads, group, which LangGraph measurement, pgbench clients (--quick runs 4
# and 8 threads instead of 16 and 64), and who named the threads in our harness: the runtime
# (`invoke_new`, the default) or the caller (`invoke` on ids as the LangGraph script's,
# `--named-threads`; measured in the 1-thread PostgreSQL group only)
ROWS = [
    ("chain", "postgres", 1, "pg1", {"case": "chain", "saver": "pg", "threads": 1}, 1),
    ("chain", "postgres", 1, "pg1", {"case": "chain", "saver": "pg", "threads": 1}, 1, "caller"),
    ("chain", "postgres", 4, "pg4", {"case": "chain", "saver": "apg", "threads": 4}, 4),
    ("chain", "postgres", 8, "pg8", {"case": "chain", "saver": "apg", "threads": 8}, 8),
    ("chain", "postgres", 16, "pg16", {"case": "chain", "saver": "apg", "threads": 16}, 16),
    ("chain", "postgres", 64, "pg64", {"case": "chain", "saver": "apg", "threads": 64}, 64),
    ("fan", "postgres", 1, "fan1", {"case": "fan", "saver": "pg", "threads": 1}, 1),
    ("chain", "sqlite", 1, "sqlite1", None, None),
    ("chain", "memory", 1, "mem1", {"case": "chain", "saver": "mem", "threads": 1}, None),
]
LG_NAMES = {"pg": "PostgresSaver", "apg": "AsyncPostgresSaver (one saver, pool of N)", "mem": "InMemorySaver"}


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(x, digits=0):
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    return f"{x:,.{digits}f}"


def ratio(a, b):
    return a / b if a is not None and b else None


def load(path):
    lines = []
    with open(path) as f:
        for raw in f:
            raw = raw.strip()
            if raw.startswith("{"):
                lines.append(json.loads(raw))
    return lines


def tag(line, key):
    return (line.get("tags") or {}).get(key)


def parent_round(rnd):
    """The round of a slice `R.S` (compare.sh's compare_sliced); a round is its own parent."""
    return rnd.split(".")[0]


class Run:
    def __init__(self, lines, threshold=None):
        """`threshold`: ms per WAL fsync between the regimes; by default the one compare.sh ran
        with (its machine line), else 1.0."""
        self.lines = lines
        self.machine = [l for l in lines if l.get("harness") == "compare"]
        recorded = [m["fsync_threshold_ms"] for m in self.machine if m.get("fsync_threshold_ms") is not None]
        self.threshold = threshold if threshold is not None else (recorded[0] if recorded else 1.0)
        self.failed = [l for l in lines if l.get("failed")]
        self.measures = [l for l in lines if not l.get("failed") and not l.get("summary")]

    def find(self, group, rnd, **match):
        for l in self.measures:
            if tag(l, "group") == group and tag(l, "round") == rnd and all(l.get(k) == v for k, v in match.items()):
                return l
        return None

    def probes(self, group, rnd):
        return [l for l in self.measures if l.get("harness") == "pgbench" and l.get("role") == "probe"
                and tag(l, "group") == group and tag(l, "round") == rnd]

    def regime(self, group, rnd):
        """fast / slow when every probe of the group-round agrees, else switched. A slice (round
        `R.S`, see compare.sh's compare_sliced) also needs its own measurements to agree."""
        if group == "mem1":
            return "no fsync"
        ms = [p.get("ms_per_wal_sync") for p in self.probes(group, parent_round(rnd))]
        if parent_round(rnd) != rnd and ms:
            ms += [l.get("ms_per_wal_sync") for l in self.measures
                   if tag(l, "group") == group and tag(l, "round") == rnd and l.get("harness") in ("agentic", "pgbench")]
        if not ms or any(m is None for m in ms):
            return "unknown"
        if all(m < self.threshold for m in ms):
            return "fast"
        if all(m >= self.threshold for m in ms):
            return "slow"
        return "switched"

    def rounds(self):
        return sorted({tag(l, "round") for l in self.measures if tag(l, "round") is not None},
                      key=lambda r: tuple(int(x) for x in r.split(".")))

    def sliced(self, group):
        return any(tag(l, "group") == group and parent_round(tag(l, "round") or "") != tag(l, "round")
                   for l in self.measures)

    def cells(self):
        """One entry per (row, round): the three measurements and the round's regime."""
        out = []
        for case, backend, threads, group, lg_match, pgb_clients, *named in ROWS:
            named = named[0] if named else "runtime"
            sliced = self.sliced(group)
            for rnd in self.rounds():
                if sliced and parent_round(rnd) == rnd:
                    continue  # a sliced group's round holds LangGraph's run; its slices are compared
                ours = self.find(group, rnd, harness="agentic", case=case, backend=backend, threads=threads,
                                 threads_named_by=named)
                # A slice is compared with its round's LangGraph run.
                lg = (self.find(group, rnd, harness="langgraph", **lg_match)
                      or self.find(group, parent_round(rnd), harness="langgraph", **lg_match)) if lg_match else None
                pgb = (self.find(group, rnd, harness="pgbench", role="measure", clients=pgb_clients)
                       if pgb_clients else None)
                if not (ours or lg or pgb):
                    continue
                out.append({"row": (case, backend, threads, group, named), "round": rnd, "regime": self.regime(group, rnd),
                            "ours": ours, "lg": lg, "pgb": pgb,
                            "probes": [p.get("ms_per_wal_sync") for p in self.probes(group, rnd)]})
        return out

    def table(self):
        """Rows of results.json: per (row, regime), medians over the rounds of that regime."""
        def start_mean(line):
            return ((line or {}).get("start_latency") or {}).get("mean_us")

        def step_after_start(line):
            # Mean µs per node-step once a run has started: invoke time less its start, per node.
            invoke = ((line or {}).get("invoke_latency") or {}).get("mean_us")
            start, nodes = start_mean(line), (line or {}).get("nodes_per_invoke_measured")
            return None if None in (invoke, start) or not nodes else (invoke - start) / nodes

        def us_per_commit(pgb):
            tps = (pgb or {}).get("tps")
            return 1e6 / tps if tps else None

        by = defaultdict(list)
        for cell in self.cells():
            by[(cell["row"], cell["regime"])].append(cell)
        rows = []
        order = {(r[3], (r[6:] or ("runtime",))[0]): i for i, r in enumerate(ROWS)}
        for (row, regime), cells in sorted(by.items(), key=lambda kv: (order[kv[0][0][3:]], kv[0][1])):
            case, backend, threads, group, named = row
            steps = lambda c, k: (c[k] or {}).get("node_steps_per_s")
            ours = [steps(c, "ours") for c in cells]
            lgs = [steps(c, "lg") for c in cells]
            tps = [(c["pgb"] or {}).get("tps") for c in cells]
            comparable = regime not in ("switched", "unknown")
            rows.append({
                "case": case, "backend": backend, "threads": threads, "threads_named_by": named,
                "fsync_regime": regime,
                "rounds": len(cells),
                "ours_steps_per_s": median(ours),
                "langgraph_steps_per_s": median(lgs),
                "pgbench_tps": median(tps),
                "ratio_vs_langgraph": median([ratio(c_o, c_l) for c_o, c_l in zip(ours, lgs)]) if comparable else None,
                "ratio_vs_pgbench": median([ratio(c_o, c_p) for c_o, c_p in zip(ours, tps)]) if comparable else None,
                "ratio_vs_pgbench_rounds": [round(r, 3) for r in (ratio(c_o, c_p) for c_o, c_p in zip(ours, tps))
                                            if r is not None] if comparable else [],
                "ms_per_wal_sync": median([(c["ours"] or {}).get("ms_per_wal_sync") for c in cells]),
                "ms_per_wal_sync_langgraph": median([(c["lg"] or {}).get("ms_per_wal_sync") for c in cells]),
                "ms_per_wal_sync_pgbench": median([(c["pgb"] or {}).get("ms_per_wal_sync") for c in cells]),
                "ours_step_p50_us": median([((c["ours"] or {}).get("step_latency") or {}).get("p50_us") for c in cells]),
                "ours_step_p99_us": median([((c["ours"] or {}).get("step_latency") or {}).get("p99_us") for c in cells]),
                "ours_checkpoints_per_s": median([(c["ours"] or {}).get("checkpoints_per_s") for c in cells]),
                "ours_start_mean_us": median([start_mean(c["ours"]) for c in cells]),
                "ratio_vs_pgbench_after_start": median([ratio(us_per_commit(c["pgb"]), step_after_start(c["ours"]))
                                                        for c in cells]) if comparable else None,
                "langgraph_saver": (cells[0]["lg"] or {}).get("saver"),
            })
        for r in rows:
            for k, v in list(r.items()):
                if isinstance(v, float):
                    r[k] = round(v, 3 if k.startswith(("ratio", "ms_")) else 2)
        return rows

    def extra(self, harness, case, backend=None, threads=None):
        for l in self.measures:
            if l.get("harness") == harness and l.get("case") == case and (backend is None or l.get("backend") == backend) \
                    and (threads is None or l.get("threads") == threads):
                return l
        return None


def render(run, rows):
    md = []
    start = next((m for m in run.machine if m.get("phase") == "start"), {})
    end = next((m for m in run.machine if m.get("phase") == "end"), {})
    lg_versions = next((l.get("versions") for l in run.measures if l.get("harness") == "langgraph"), {}) or {}
    md.append("# Checkpoint benchmarks: Agentic vs LangGraph vs PostgreSQL's commit rate\n")
    md.append("Generated by `benches/compare.sh` (`benches/report.py` over the run's raw lines, kept in "
              "`raw.jsonl` beside this file). Every figure below was measured in that one run; nothing is typed in.\n")
    md.append("## Machine and run\n")
    md.append(f"- Run: {start.get('time', '?')} to {end.get('time', '?')}; {start.get('reps')} round(s) of "
              f"{start.get('secs')} s per measurement{' (--quick)' if start.get('quick') else ''}; load average at start "
              f"{' '.join(start.get('loadavg', []))}, at end {' '.join(end.get('loadavg', []))}.")
    md.append(f"- {start.get('cores')} vCPU ({start.get('cpu')}), {start.get('mem_gib')} GiB RAM, kernel "
              f"{start.get('kernel')}; client and PostgreSQL share the cores.")
    md.append(f"- {start.get('postgres', '?').split(' on ')[0]}; {start.get('pg_settings')}.")
    if "ssl=on" in (start.get("pg_settings") or ""):
        md.append("- TLS: the server has ssl=on and sqlx, psycopg and pgbench (libpq) all default to sslmode=prefer, "
                  "so every client encrypts on loopback alike.")
    if start.get("commit"):
        built = (f"the harness binary given: {start['harness_binary']}" if start.get("harness_binary")
                 else "the harness is built from the work tree")
        md.append(f"- Code: commit {start['commit']}, with {start.get('uncommitted_files', 0)} uncommitted file(s) under "
                  f"runtime/, migrations/ and src/ when the run started ({built}).")
    md.append(f"- {start.get('rustc')}; {start.get('python')}, "
              + ", ".join(f"{k} {v}" for k, v in lg_versions.items()) + ".")
    others = [((l.get("context") or {}).get("other_client_sessions")) for l in run.measures if l.get("harness") == "agentic"]
    others = [o for o in others if o is not None]
    if others:
        md.append(f"- Client sessions of other databases seen at the start of our measurements: max {max(others)} "
                  "(another workload on the server would share its fsyncs and CPU).")
    md.append("")
    md.append("### fsync regime\n")
    md.append(f"The disk's fsync latency switches between two regimes (about 0.1 ms and 2.6 ms per fdatasync). Each "
              f"comparison group (pgbench, LangGraph and ours on one workload, back to back) is bracketed by a 1-second "
              f"1-client pgbench probe; the group-round is *fast* when both probes measured under "
              f"{run.threshold} ms per WAL fsync, *slow* when both were above, *switched* otherwise (not compared). "
              f"`ms per WAL sync` is `pg_stat_wal.wal_sync_time / wal_sync` over the measurement itself "
              f"(track_wal_io_timing on); it grows with concurrency in either regime (larger group flushes).\n")
    if start.get("slices"):
        sliced = [l.get("ms_per_wal_sync") for l in run.measures if tag(l, "group") == "pg1"
                  and parent_round(tag(l, "round") or "") != tag(l, "round") and l.get("ms_per_wal_sync") is not None]
        drift = f"{fmt(min(sliced), 2)} to {fmt(max(sliced), 2)} ms per sync over this run's slices" if sliced else "?"
        md.append(f"The 1-thread PostgreSQL group, whose target is the tightest, runs pgbench and ours in "
                  f"{start['slices']} alternating slices per round ({max(1, int(start.get('secs', 0) // start['slices']))} s "
                  f"each; round R.S below), because the fsync time also drifts within the fast regime ({drift}). "
                  f"A slice is compared when the round's probes and the slice's own "
                  f"measurements (pgbench's and ours) agree on the regime; its rows count slices, and LangGraph's "
                  f"figure is its round's one run.\n")
    counts = defaultdict(int)
    for c in run.cells():
        if c["row"][3] != "mem1":
            counts[c["regime"]] += 1
    md.append("Group-rounds by regime: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ".\n")

    md.append("## Throughput (node-steps per second)\n")
    md.append("A node-step is one node execution (the chain: 10 per invoke; the fan-out: fan + 8 workers + join = 10). "
              "Every invoke runs on a new thread: ours on one the runtime minted (`invoke_new`: its lease and "
              "admission go with its first step's commit), except the row marked as named by the caller (`invoke` on "
              "a fresh id, as the LangGraph script names its threads: the lease statement runs before the first "
              "node); durability sync (each step's checkpoint committed before the next "
              "step). Both harnesses run an unreported warm-up (1 s; 0.2 s with `--quick`) of the same workload "
              "in the same process before the measurement. pgbench: one 1 KiB row INSERTed per transaction, "
              "`-M prepared`, as many clients as threads. "
              "Figures are medians over the rounds of the regime; ratios are medians of per-round ratios.\n")
    md.append("| case | backend | threads | fsync regime | rounds | ours steps/s | LangGraph steps/s | pgbench tps "
              "| ours / LangGraph | ours / pgbench | ms per WAL sync (ours / LangGraph / pgbench) "
              "| ours step latency p50 / p99 (µs) |")
    md.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lg = fmt(r["langgraph_steps_per_s"])
        if r["langgraph_saver"]:
            lg += f" ({r['langgraph_saver']})"
        ms = " / ".join(fmt(r[k], 2) for k in ("ms_per_wal_sync", "ms_per_wal_sync_langgraph", "ms_per_wal_sync_pgbench"))
        named = " (threads named by the caller)" if r["threads_named_by"] == "caller" else ""
        md.append(f"| {r['case']}{named} | {r['backend']} | {r['threads']} | {r['fsync_regime']} | {r['rounds']} "
                  f"| {fmt(r['ours_steps_per_s'])} | {lg} | {fmt(r['pgbench_tps'])} "
                  f"| {fmt(r['ratio_vs_langgraph'], 2)} | {fmt(r['ratio_vs_pgbench'], 2)} | {ms} "
                  f"| {fmt(r['ours_step_p50_us'], 1)} / {fmt(r['ours_step_p99_us'], 1)} |")
    md.append("")
    md.append("LangGraph savers: pg = `PostgresSaver` on one connection; apg = one `AsyncPostgresSaver` shared by N "
              "asyncio workers over an `AsyncConnectionPool` of N; mem = `InMemorySaver`. Ours: one checkpointer "
              "shared by N tokio tasks. Step latency: " + next(
                  (l["step_latency"]["method"] for l in run.measures if l.get("step_latency")), "–") + ".\n")

    md.append("## Targets (issue 3)\n")
    md.append("| target | regime | measured | met? |")
    md.append("|---|---|---|---|")

    def rows_for(case, backend, threads, named="runtime"):
        return [r for r in rows if (r["case"], r["backend"], r["threads"], r["threads_named_by"])
                == (case, backend, threads, named) and r["fsync_regime"] not in ("switched", "unknown")]

    def regime_ms(r):
        # "fast" spans every fsync time under the threshold: say which this run had (pgbench's,
        # one client: one fsync per commit).
        ms = r.get("ms_per_wal_sync_pgbench")
        return r["fsync_regime"] if ms is None else f"{r['fsync_regime']} ({fmt(ms, 2)} ms per WAL sync)"

    def verdict(ok):
        return "–" if ok is None else ("yes" if ok else "**no**")

    for r in rows_for("chain", "postgres", 1):
        x = r["ratio_vs_pgbench"]
        rounds = r.get("ratio_vs_pgbench_rounds") or []
        spread = f"; rounds {fmt(min(rounds), 2)} to {fmt(max(rounds), 2)}" if len(rounds) > 1 else ""
        after = r.get("ratio_vs_pgbench_after_start")
        split = (f"; a run's start (before its first node) {fmt(r['ours_start_mean_us'], 0)} µs "
                 f"per invoke of 10 node-steps, its steps alone {fmt(after, 2)} ×") if after is not None else ""
        md.append(f"| PostgreSQL, 1 thread: ≥ 0.9 × pgbench 1 client | {regime_ms(r)} | {fmt(x, 2)} × "
                  f"({fmt(r['ours_steps_per_s'])} vs {fmt(r['pgbench_tps'])}{spread}{split}) "
                  f"| {verdict(None if x is None else x >= 0.9)} |")
    for r in rows_for("chain", "postgres", 1, "caller"):
        x = r["ratio_vs_pgbench"]
        rounds = r.get("ratio_vs_pgbench_rounds") or []
        spread = f"; rounds {fmt(min(rounds), 2)} to {fmt(max(rounds), 2)}" if len(rounds) > 1 else ""
        md.append(f"| the same, threads named by the caller (`invoke`: a lease statement before each run's first "
                  f"node; not a target row) | {regime_ms(r)} | {fmt(x, 2)} × ({fmt(r['ours_steps_per_s'])} vs "
                  f"{fmt(r['pgbench_tps'])}{spread}; start {fmt(r['ours_start_mean_us'], 0)} µs per invoke) | – |")
    for r in rows_for("chain", "postgres", 64):
        a, b = r["ratio_vs_langgraph"], r["ratio_vs_pgbench"]
        ok = None if a is None or b is None else (a >= 20 and b >= 1)
        md.append(f"| PostgreSQL, 64 threads: ≥ 20 × LangGraph and ≥ pgbench 64 clients | {r['fsync_regime']} | "
                  f"{fmt(a, 2)} × LangGraph, {fmt(b, 2)} × pgbench ({fmt(r['ours_steps_per_s'])} steps/s) | {verdict(ok)} |")
    for r in rows_for("chain", "memory", 1):
        a = r["ratio_vs_langgraph"]
        ours_us = 1e6 / r["ours_steps_per_s"] if r["ours_steps_per_s"] else None
        lg_us = 1e6 / r["langgraph_steps_per_s"] if r["langgraph_steps_per_s"] else None
        md.append(f"| memory, 1 thread: per-step time ≤ 1/100 of LangGraph's | no fsync | {fmt(ours_us, 1)} µs vs "
                  f"{fmt(lg_us, 1)} µs ({fmt(a, 1)} × faster) | {verdict(None if a is None else a >= 100)} |")
    resume = run.extra("agentic", "resume", "postgres")
    if resume:
        m = resume["continue_1step_long"]["median_ms"]
        md.append(f"| resume a {resume['history_node_steps']:,}-step thread (load + one step, PostgreSQL): ≤ 5 ms | "
                  f"{regime_of(resume.get('ms_per_wal_sync'), run.threshold)} | median {fmt(m, 2)} ms "
                  f"(min {fmt(resume['continue_1step_long']['min_ms'], 2)}) | {verdict(m <= 5)} |")
    storage = run.extra("agentic", "storage", "postgres")
    if storage:
        x = storage["ratio_stored_vs_raw"]
        md.append(f"| storage after {storage['node_steps']:,} appending steps (PostgreSQL): ≤ 2 × raw payload | – | "
                  f"{fmt(x, 2)} × on disk ({fmt(storage['stored_bytes'])} B), {fmt(storage['ratio_rows_vs_raw'], 2)} × "
                  f"in rows, raw {fmt(storage['raw_payload_bytes'])} B | {verdict(x <= 2)} |")
    md.append("")

    md.append("## Resume a long thread\n")
    md.append("A thread built by chain invokes on one thread (10 node-steps each), then timed: loading the head, "
              "`get_state`, and continuing it by one step with a one-node graph of the same channels (lease, load, "
              "admission checkpoint, the node, its checkpoint), and the same continue on a fresh thread. "
              "ms min / median.\n")
    md.append("| runtime | backend | history (node-steps / checkpoints / messages) | load | get_state | continue 1 step, long "
              "| continue 1 step, fresh | ms per WAL sync |")
    md.append("|---|---|---|---|---|---|---|---|")
    for harness, backend in (("agentic", "postgres"), ("langgraph", "postgres"), ("agentic", "sqlite"),
                             ("agentic", "memory")):
        l = run.extra(harness, "resume", backend)
        if not l:
            continue
        mm = lambda k: f"{fmt(l[k]['min_ms'], 2)} / {fmt(l[k]['median_ms'], 2)}" if l.get(k) else "–"
        md.append(f"| {'ours' if harness == 'agentic' else 'LangGraph'} | {backend} | {l['history_node_steps']:,} / "
                  f"{l.get('history_checkpoints')} / {l.get('messages_len')} | {mm('load_long')} | {mm('get_state_long')} "
                  f"| {mm('continue_1step_long')} | {mm('continue_1step_fresh')} | {fmt(l.get('ms_per_wal_sync'), 2)} |")
        if harness == "langgraph" and l.get("memory_continue_1step_long"):
            md.append(f"| LangGraph | memory | same | – | {fmt(l['memory_get_state_long']['min_ms'], 2)} / "
                      f"{fmt(l['memory_get_state_long']['median_ms'], 2)} | "
                      f"{fmt(l['memory_continue_1step_long']['min_ms'], 2)} / "
                      f"{fmt(l['memory_continue_1step_long']['median_ms'], 2)} | – | – |")
    md.append("")

    md.append("## Storage after appending steps on one thread\n")
    st = run.extra("agentic", "storage", "postgres") or run.extra("langgraph", "storage")
    if st:
        md.append(f"Raw payload: {st['raw_payload_definition']}. Rows: Σ pg_column_size(row) (SQLite: dbstat "
                  "payload); on disk: pg_total_relation_size, i.e. heap, TOAST and indexes (SQLite: dbstat pages). "
                  "Tables truncated before the run.\n")
    md.append("| runtime | backend | node-steps | raw payload (B) | rows (B) | on disk (B) | rows / raw | on disk / raw | per table: rows, row bytes, on-disk bytes |")
    md.append("|---|---|---|---|---|---|---|---|---|")
    for harness, backend in (("agentic", "postgres"), ("langgraph", "postgres"), ("agentic", "sqlite")):
        l = run.extra(harness, "storage", backend)
        if not l:
            continue
        per = "; ".join(f"{k}: {v['rows']}, {v['rows_bytes']:,}, {v['stored_bytes']:,}" for k, v in l["tables"].items())
        md.append(f"| {'ours' if harness == 'agentic' else 'LangGraph'} | {backend} | {l['node_steps']:,} "
                  f"| {l['raw_payload_bytes']:,} | {l['rows_bytes']:,} | {l['stored_bytes']:,} "
                  f"| {fmt(l['ratio_rows_vs_raw'], 2)} | {fmt(l['ratio_stored_vs_raw'], 2)} | {per} |")
    md.append("")

    rss = run.extra("agentic", "rss")
    if rss:
        md.append("## Resident memory\n")
        md.append(f"`agentic-bench rss` on {rss['backend']}: idle after setup (store connected, runtime started) "
                  f"**{fmt(rss['idle_vmrss_kib'] / 1024, 1)} MiB** VmRSS; peak during {rss['threads']} threads for "
                  f"{fmt(rss['secs'], 1)} s: **{fmt((rss['peak_vmhwm_kib'] or 0) / 1024, 1)} MiB** VmHWM "
                  f"({'reset before the run' if rss['peak_is_run_only'] else 'since process start'}), highest sampled "
                  f"VmRSS {fmt(rss['max_sampled_vmrss_kib'] / 1024, 1)} MiB, at {fmt(rss['node_steps_per_s'])} node-steps/s.\n")

    md.append("## Where the time goes\n")
    md.append("`agentic-bench profile`: a chain run (fresh thread per invoke, durability sync), its wall time per "
              "node-step split into this process's CPU, every PostgreSQL process's CPU and the WAL fsync time; then "
              "the same commits without the engine (one chain invoke's admission and step commits, recorded, then "
              "replayed on fresh threads straight into the store for as long: the same rows, statements and round "
              "trips, with no node run, no step applied, no value encoded; the store still encodes each "
              "checkpoint's body and metadata), which splits a step between the engine and the store; on "
              "PostgreSQL, the floor under both: the chain's step rows as stored, inserted again through sqlx alone "
              "(plain connections, one per thread, one durable INSERT per commit: no engine, no store code, no lease "
              "statement); then a shorter run with sqlx's statement log on, counting the statements (one round trip "
              "each once prepared) per node-step, with their mean client-observed latency.\n")
    for p in [l for l in run.measures if l.get("harness") == "agentic" and l.get("case") == "profile"]:
        s = p["per_node_step_us"]
        wal = p.get("wal") or {}
        md.append(f"### {p['backend']}, {p['threads']} thread(s): {fmt(p['node_steps_per_s'])} node-steps/s\n")
        alone = p.get("store_alone") or {}
        a = alone.get("per_commit_us") or {}
        driver = p.get("driver_alone") or {}
        d = driver.get("per_commit_us") or {}
        # The driver's column only where it was measured (PostgreSQL).
        dcol = (lambda cell: f" {cell} |") if driver else (lambda cell: "")
        md.append("| per node-step, µs | chain (engine and store) | its commits alone (store, no engine) |"
                  + dcol("its step rows alone (sqlx, no store, no lease)"))
        md.append("|---|---|---|" + ("---|" if driver else ""))
        md.append(f"| wall (elapsed / node-steps) | {fmt(s['wall'], 1)} | {fmt(a.get('wall'), 1)} |"
                  + dcol(fmt(d.get('wall'), 1)))
        md.append(f"| client CPU (this process) | {fmt(s['client_cpu'], 1)} | {fmt(a.get('client_cpu'), 1)} |"
                  + dcol(fmt(d.get('client_cpu'), 1)))
        if s.get("postgres_cpu") is not None:
            md.append(f"| PostgreSQL CPU (all its processes) | {fmt(s['postgres_cpu'], 1)} | "
                      f"{fmt(a.get('postgres_cpu'), 1)} |" + dcol(fmt(d.get('postgres_cpu'), 1)))
        if s.get("wal_fsync") is not None:
            md.append(f"| WAL fsync ({fmt(wal.get('syncs_per_node_step'), 3)} fsyncs/step × "
                      f"{fmt(wal.get('ms_per_wal_sync'), 3)} ms) | {fmt(s['wal_fsync'], 1)} | – |" + dcol("–"))
        md.append(f"| machine CPU busy during the run | {fmt(p['machine_cpu_busy_pct'], 1)} % of "
                  f"{start.get('cores', '?')} cores | – |" + dcol("–"))
        md.append(f"| steps (commits) per second | {fmt(p['node_steps_per_s'])} | {fmt(alone.get('commits_per_s'))} |"
                  + dcol(fmt(driver.get('commits_per_s'))))
        md.append("")
        if wal:
            md.append(f"Commits (pg_stat_database, read-only included): {fmt(wal.get('db_commits_per_node_step'), 3)} per "
                      f"node-step; WAL {fmt(wal.get('bytes_per_node_step'))} bytes per node-step.\n")
        stm = p.get("statements")
        if stm:
            md.append(f"Statements: **{fmt(stm['per_node_step'], 3)} per node-step**, {fmt(stm['per_invoke'], 2)} per "
                      f"invoke ({stm['invokes']} invokes counted).\n")
            md.append("| statement | per node-step | per invoke | mean client-observed ms |")
            md.append("|---|---|---|---|")
            for b in stm["by_statement"]:
                md.append(f"| {b['statement']} | {fmt(b['per_node_step'], 3)} | {fmt(b['per_invoke'], 2)} "
                          f"| {fmt(b['client_ms_mean'], 3)} |")
            md.append("")

    levers = os.path.join(os.path.dirname(os.path.abspath(__file__)), "LEVERS.md")
    if os.path.exists(levers):
        md.append("## Levers\n")
        with open(levers) as f:
            md.append(f.read())

    if run.failed:
        md.append("## Failed measurements\n")
        for f in run.failed:
            md.append(f"- {f['harness']} (round {tag(f, 'round')}, group {tag(f, 'group')}): see the run's stderr")
        md.append("")

    md.append("## Every measurement\n")
    md.append("| round | group | regime | probes ms/sync | runtime | figure | ms per WAL sync |")
    md.append("|---|---|---|---|---|---|---|")
    for c in run.cells():
        probes = ", ".join(fmt(p, 2) for p in c["probes"]) or "–"
        for who, key in (("pgbench", "pgb"), ("LangGraph", "lg"), ("ours", "ours")):
            l = c[key]
            if c["row"][4] == "caller":
                # The group's pgbench and LangGraph lines are listed with its first row.
                l, who = (l, "ours, threads named by the caller") if key == "ours" else (None, who)
            if not l:
                continue
            fig = f"{fmt(l['tps'])} tps" if key == "pgb" else f"{fmt(l['node_steps_per_s'])} steps/s"
            md.append(f"| {c['round']} | {c['row'][3]} | {c['regime']} | {probes} | {who} | {fig} | "
                      f"{fmt(l.get('ms_per_wal_sync'), 3)} |")
    md.append("")
    md.append("## Rerun\n")
    md.append("```bash\nbenches/compare.sh            # full run (about 15 minutes with 3 rounds of 10 s)\n"
              "benches/compare.sh --quick    # seconds per measurement, writes target/bench-quick/\n"
              "cargo run --release --bin agentic-bench -- --help\n"
              "cargo bench                   # criterion: step overhead, checkpoint put/get per backend\n```\n")
    return "\n".join(md) + "\n"


def regime_of(ms, threshold):
    if ms is None:
        return "–"
    return "fast" if ms < threshold else "slow"


def extras_json(run):
    out = []
    for harness in ("agentic", "langgraph"):
        for backend in ("postgres", "sqlite", "memory"):
            l = run.extra(harness, "resume", backend)
            if l:
                out.append({"case": "resume", "backend": backend, "runtime": harness,
                            "history_node_steps": l["history_node_steps"],
                            "continue_1step_long_median_ms": l["continue_1step_long"]["median_ms"],
                            "load_long_median_ms": l["load_long"]["median_ms"],
                            "ms_per_wal_sync": l.get("ms_per_wal_sync")})
            l = run.extra(harness, "storage", backend)
            if l:
                out.append({"case": "storage", "backend": backend, "runtime": harness, "node_steps": l["node_steps"],
                            "raw_payload_bytes": l["raw_payload_bytes"], "rows_bytes": l["rows_bytes"],
                            "stored_bytes": l["stored_bytes"], "ratio_stored_vs_raw": l["ratio_stored_vs_raw"]})
    rss = run.extra("agentic", "rss")
    if rss:
        out.append({"case": "rss", "backend": rss["backend"], "runtime": "agentic", "threads": rss["threads"],
                    "idle_vmrss_kib": rss["idle_vmrss_kib"], "peak_vmhwm_kib": rss["peak_vmhwm_kib"]})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--raw", required=True)
    ap.add_argument("--md", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--threshold", type=float, default=None,
                    help="ms per WAL fsync that splits the fast and slow regimes (default: the one "
                         "compare.sh ran with, as its machine line records it; else 1.0)")
    a = ap.parse_args()
    run = Run(load(a.raw), a.threshold)
    rows = run.table()
    with open(a.md, "w") as f:
        f.write(render(run, rows))
    with open(a.json, "w") as f:
        json.dump(rows + extras_json(run), f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
