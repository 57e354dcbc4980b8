#!/usr/bin/env bash
# benches/compare.sh: Agentic's checkpointing side by side with LangGraph's and with
# PostgreSQL's own durable-commit rate (pgbench), measured interleaved in ONE run.
#
# The disk's fsync latency on these machines switches between two regimes within minutes, so
# figures taken apart are not comparable. Each comparison group (pgbench, LangGraph, ours on the
# same workload) runs back to back, bracketed by a 1-client pgbench fsync probe, and every
# measurement records PostgreSQL's WAL fsync time (pg_stat_wal, track_wal_io_timing on). The
# report compares only figures of one group taken in one fsync regime.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: benches/compare.sh [--quick] [--reps N] [--secs S] [--out DIR] [--fsync-threshold-ms MS] [--harness PATH]

Runs, interleaved, for N repetitions:
  pgbench      1 KiB single-row INSERT per transaction at 1, 16 and 64 clients
  LangGraph    benches/langgraph_bench.py: chain on PostgresSaver (1 thread), AsyncPostgresSaver
               (16 and 64 threads), fan-out on PostgresSaver, chain on InMemorySaver
  Agentic      agentic-bench: the same workloads on PostgreSQL, memory and SQLite (each invoke on
               a thread the runtime minted; at 1 thread on PostgreSQL also on threads named by
               the caller, as the LangGraph script names them)
At 1 thread on PostgreSQL, pgbench and ours alternate in 5 slices of S/5 seconds per repetition
(2 with --quick) and are compared slice by slice: the disk's fsync time drifts within seconds.
then once: resume of a 1,000-step thread, storage after 1,000 appending steps, resident memory,
and a profile of where a step's time goes. Writes RESULTS.md and results.json.

Options:
  --quick                 tiny durations (1 s per measurement, 1 repetition, 4 and 8 threads
                          instead of 16 and 64, a debug build): checks the whole harness end to
                          end (CI); writes to target/bench-quick/ unless --out
  --reps N                repetitions of every comparison group (default 3)
  --secs S                seconds per measurement (default 10)
  --out DIR               where RESULTS.md and results.json go (default: benches/)
  --fsync-threshold-ms MS a 1-client probe slower than this per WAL fsync is the slow regime
                          (default 1.0; the two regimes are about 0.1 ms and 2.6 ms)
  --harness PATH          run this agentic-bench binary instead of building one (CI passes the
                          one its test run built: building the binary alone resolves dependency
                          features without the tests' (tokio's test-util) and rebuilt tokio and
                          everything above it, 4 minutes of CI); the report names it
  -h, --help              this help

Environment: PGHOST (127.0.0.1), PGPORT (5432), PGUSER (postgres; a superuser: the script sets
track_wal_io_timing and restores it), PYTHON (python3, used to create the venv).
Creates the databases bench_agentic, bench_langgraph and bench_pgbench if missing, and the
venv benches/.venv-bench (reused while it imports LangGraph). A measurement that fails is
recorded and the run goes on; the report is still written, then the script exits with status 1.
EOF
}

QUICK=0
REPS=3
SECS=10
OUT=""
THRESHOLD=1.0
HARNESS=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --reps) REPS=$2; shift ;;
        --secs) SECS=$2; shift ;;
        --out) OUT=$2; shift ;;
        --fsync-threshold-ms) THRESHOLD=$2; shift ;;
        --harness) HARNESS=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCHES=$ROOT/benches
VENV=$BENCHES/.venv-bench
export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-postgres}
PG_BASE="postgres://$PGUSER@$PGHOST:$PGPORT"
HIST_INVOKES=100
TIMINGS=30
PROBE_SECS=1
# Unreported warm-up before each throughput measurement, on both sides alike.
WARMUP=1
# The 1-thread PostgreSQL comparison runs pgbench and ours in alternating slices (see
# compare_sliced): this many per round.
SLICES=5
MID=16
HIGH=64
if [[ $QUICK == 1 ]]; then
    REPS=1
    SECS=1
    WARMUP=0.2
    SLICES=2
    HIST_INVOKES=10
    TIMINGS=5
    # Fewer concurrent threads: the quick run checks the harness, not the scaling.
    MID=4
    HIGH=8
    OUT=${OUT:-$ROOT/target/bench-quick}
    PROFILE=dev
else
    OUT=${OUT:-$BENCHES}
    PROFILE=release
fi
WORK=$ROOT/target/bench-compare
RAW=$WORK/raw.jsonl
mkdir -p "$WORK" "$OUT"
: > "$RAW"

say() { echo "[compare $(date +%T)] $*" >&2; }
for tool in psql pgbench cargo "${PYTHON:-python3}"; do
    command -v "$tool" > /dev/null || { echo "compare.sh needs $tool on PATH" >&2; exit 1; }
done
psql -d postgres -Atqc "SELECT 1" > /dev/null || { echo "PostgreSQL is not reachable at $PG_BASE" >&2; exit 1; }

# --- PostgreSQL: fsync timing, databases ------------------------------------------------------
TIMING_WAS=$(psql -d postgres -Atqc "SHOW track_wal_io_timing")
restore_timing() {
    if [[ $TIMING_WAS == off ]]; then
        psql -d postgres -Atqc "ALTER SYSTEM RESET track_wal_io_timing" -c "SELECT pg_reload_conf()" > /dev/null || true
    fi
}
trap restore_timing EXIT
psql -d postgres -Atqc "ALTER SYSTEM SET track_wal_io_timing = on" -c "SELECT pg_reload_conf()" > /dev/null
for db in bench_agentic bench_langgraph bench_pgbench; do
    if [[ -z $(psql -d postgres -Atqc "SELECT 1 FROM pg_database WHERE datname = '$db'") ]]; then
        say "creating database $db"
        psql -d postgres -Atqc "CREATE DATABASE $db" > /dev/null
    fi
done
psql -d bench_pgbench -Atqc "CREATE TABLE IF NOT EXISTS commit_1k (
    id bigserial PRIMARY KEY, client int NOT NULL, payload bytea NOT NULL)" > /dev/null
# One durable commit of one ~1 KiB row per transaction: the ceiling for one commit per step.
cat > "$WORK/commit_1k.sql" <<'EOF'
INSERT INTO commit_1k (client, payload) VALUES (:client_id, decode(repeat(md5(random()::text), 64), 'hex'));
EOF

# --- the LangGraph venv -----------------------------------------------------------------------
lg_ready() {
    [[ -x $VENV/bin/python ]] && "$VENV/bin/python" -c \
        "import langgraph.graph, langgraph.checkpoint.postgres, psycopg, psycopg_pool" 2> /dev/null
}
if ! lg_ready; then
    say "creating $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip > /dev/null
    if ! "$VENV/bin/pip" install -q -r "$BENCHES/requirements-langgraph.txt"; then
        say "pinned versions unavailable; installing the latest"
        "$VENV/bin/pip" install -q langgraph langgraph-checkpoint-postgres 'psycopg[binary,pool]'
    fi
fi
lg_ready || { echo "the LangGraph venv at $VENV does not import langgraph" >&2; exit 1; }

# --- our harness --------------------------------------------------------------------------------
if [[ -n $HARNESS ]]; then
    [[ -x $HARNESS ]] || { echo "--harness $HARNESS: not an executable file" >&2; exit 2; }
    OURS=$(cd "$(dirname "$HARNESS")" && pwd)/$(basename "$HARNESS")
    say "using the harness binary $OURS"
elif [[ $PROFILE == release ]]; then
    say "building agentic-bench ($PROFILE)"
    (cd "$ROOT" && cargo build --release --quiet --bin agentic-bench)
    OURS=$ROOT/target/release/agentic-bench
else
    say "building agentic-bench ($PROFILE)"
    (cd "$ROOT" && cargo build --quiet --bin agentic-bench)
    OURS=$ROOT/target/debug/agentic-bench
fi

# --- runners: each appends JSON lines to $RAW; a failure is recorded and the run goes on ----------
failed() { # what, round, group
    "$VENV/bin/python" -c 'import json,sys; print(json.dumps({"harness": sys.argv[1], "failed": True,
        "tags": {"round": sys.argv[2], "group": sys.argv[3]}}))' "$1" "$2" "$3" >> "$RAW"
}

ours() { # round group args...
    local round=$1 group=$2; shift 2
    "$OURS" "$@" --tag "round=$round" --tag "group=$group" --database "$PG_BASE/bench_agentic" >> "$RAW" \
        || { say "agentic-bench $* failed"; failed agentic "$round" "$group"; }
}

lg() { # round group args...
    local round=$1 group=$2; shift 2
    "$VENV/bin/python" "$BENCHES/langgraph_bench.py" "$@" --tag "round=$round" --tag "group=$group" \
        --dsn "$PG_BASE/bench_langgraph" >> "$RAW" \
        || { say "langgraph_bench.py $* failed"; failed langgraph "$round" "$group"; }
}

wal_snap() { psql -d bench_pgbench -Atqc "SELECT wal_sync || ' ' || wal_sync_time FROM pg_stat_wal"; }

# pgbench: round group role clients secs
pgb() {
    local round=$1 group=$2 role=$3 clients=$4 secs=$5 before after out
    say "pgbench $role clients=$clients ${secs}s (round $round, $group)"
    psql -d bench_pgbench -Atqc "TRUNCATE commit_1k" -c "CHECKPOINT" > /dev/null
    before=$(wal_snap)
    # (pgbench's -d is --debug: the database is the last argument)
    if ! out=$(pgbench -n -M prepared -c "$clients" -j $((clients < 2 ? 1 : 2)) -T "$secs" \
        -f "$WORK/commit_1k.sql" bench_pgbench 2>&1); then
        say "pgbench failed: $out"
        failed pgbench "$round" "$group"
        return
    fi
    sleep 0.6 # pgbench's sessions flush their statistics as they exit
    after=$(wal_snap)
    "$VENV/bin/python" - "$round" "$group" "$role" "$clients" "$before" "$after" "$out" >> "$RAW" <<'PY'
import json, re, sys
round_, group, role, clients, before, after, out = sys.argv[1:]
s0, t0 = before.split(); s1, t1 = after.split()
syncs = int(s1) - int(s0)
tps = re.search(r"tps = ([0-9.]+)", out)
lat = re.search(r"latency average = ([0-9.]+)", out)
print(json.dumps({
    "harness": "pgbench", "case": "commit_1k", "clients": int(clients), "threads": int(clients), "role": role,
    "tps": float(tps.group(1)) if tps else None, "latency_ms": float(lat.group(1)) if lat else None,
    "ms_per_wal_sync": round((float(t1) - float(t0)) / syncs, 3) if syncs > 0 else None,
    "wal": {"syncs": syncs, "sync_ms": round(float(t1) - float(t0), 2)},
    "tags": {"round": round_, "group": group}}))
PY
}

probe() { pgb "$1" "$2" probe 1 "$PROBE_SECS"; }

# One comparison: the three measurements back to back, bracketed by fsync probes. Odd rounds
# run LangGraph, pgbench, ours; even rounds the reverse, so drift does not favour one side.
# pgbench sits next to ours: the fsync time drifts within seconds.
compare_group() { # round group clients lg-args... -- ours-args...
    local round=$1 group=$2 clients=$3; shift 3
    local lg_args=()
    while [[ $1 != -- ]]; do lg_args+=("$1"); shift; done
    shift
    probe "$round" "$group"
    if (( round % 2 == 1 )); then
        lg "$round" "$group" "${lg_args[@]}"
        pgb "$round" "$group" measure "$clients" "$SECS"
        ours "$round" "$group" "$@"
    else
        ours "$round" "$group" "$@"
        pgb "$round" "$group" measure "$clients" "$SECS"
        lg "$round" "$group" "${lg_args[@]}"
    fi
    probe "$round" "$group"
}

# The 1-thread PostgreSQL comparison, whose target (ours / pgbench) is the tightest: the WAL fsync
# time drifts within seconds, so pgbench and ours (and ours on caller-named threads) alternate in
# $SLICES slices of SECS/SLICES seconds each, every slice tagged as round R.S, the order reversed
# every other slice; the report pairs pgbench with ours within a slice. LangGraph runs once per
# round, first on odd rounds and last on even ones, between the fsync probes.
compare_sliced() { # round group -- lg-args... -- ours-args...
    local round=$1 group=$2; shift 3
    local lg_args=() ours_args=() slice_secs=$((SECS / SLICES > 0 ? SECS / SLICES : 1))
    while [[ $1 != -- ]]; do lg_args+=("$1"); shift; done
    shift
    ours_args=("$@" --secs "$slice_secs" --warmup "$WARMUP" --reps 1 --durability sync)
    probe "$round" "$group"
    if (( round % 2 == 1 )); then lg "$round" "$group" "${lg_args[@]}"; fi
    for slice in $(seq 1 "$SLICES"); do
        if (( (round + slice) % 2 == 0 )); then
            pgb "$round.$slice" "$group" measure 1 "$slice_secs"
            ours "$round.$slice" "$group" "${ours_args[@]}"
            ours "$round.$slice" "$group" "${ours_args[@]}" --named-threads
        else
            ours "$round.$slice" "$group" "${ours_args[@]}" --named-threads
            ours "$round.$slice" "$group" "${ours_args[@]}"
            pgb "$round.$slice" "$group" measure 1 "$slice_secs"
        fi
    done
    if (( round % 2 == 0 )); then lg "$round" "$group" "${lg_args[@]}"; fi
    probe "$round" "$group"
}

machine_line() { # phase
    "$VENV/bin/python" - "$1" "$QUICK" "$REPS" "$SECS" "$SLICES" "$THRESHOLD" \
        "$(psql -d postgres -Atqc "SELECT version()")" \
        "$(psql -d postgres -Atqc "SELECT string_agg(name || '=' || setting, ', ' ORDER BY name) FROM pg_settings
            WHERE name IN ('synchronous_commit', 'fsync', 'wal_sync_method', 'shared_buffers', 'max_connections',
                           'commit_delay', 'full_page_writes', 'shared_preload_libraries', 'track_wal_io_timing', 'ssl')")" \
        "$(rustc --version)" "$("$VENV/bin/python" --version)" \
        "$(git -C "$ROOT" rev-parse --short HEAD 2> /dev/null || echo unknown)" \
        "$(git -C "$ROOT" status --porcelain -- runtime migrations src 2> /dev/null | wc -l)" "$HARNESS" >> "$RAW" <<'PY'
import json, os, platform, sys, time
phase, quick, reps, secs, slices, threshold, pg, settings, rustc, python, commit, dirty, harness = sys.argv[1:]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mem = next((l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal")), "0")
print(json.dumps({"harness": "compare", "phase": phase, "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  "quick": quick == "1", "reps": int(reps), "secs": float(secs), "slices": int(slices),
                  "fsync_threshold_ms": float(threshold), "cpu": cpu, "cores": os.cpu_count(),
                  "mem_gib": round(int(mem) / 1048576, 1), "kernel": platform.release(), "postgres": pg,
                  "pg_settings": settings, "rustc": rustc, "python": python,
                  "loadavg": open("/proc/loadavg").read().split()[:3],
                  "commit": commit, "uncommitted_files": int(dirty), "harness_binary": harness or None}))
PY
}

# --- the run ------------------------------------------------------------------------------------
START_TIME=$(date +%s)
machine_line start
for round in $(seq 1 "$REPS"); do
    say "=== round $round/$REPS"
    common=(--secs "$SECS" --warmup "$WARMUP" --reps 1 --durability sync)
    compare_sliced "$round" pg1 -- chain --saver pg "${common[@]}" -- chain --backend postgres --threads 1
    compare_group "$round" "pg$MID" "$MID" chain --saver apg --threads "$MID" "${common[@]}" -- \
        chain --backend postgres --threads "$MID" "${common[@]}"
    compare_group "$round" "pg$HIGH" "$HIGH" chain --saver apg --threads "$HIGH" "${common[@]}" -- \
        chain --backend postgres --threads "$HIGH" "${common[@]}"
    compare_group "$round" fan1 1 fan --saver pg "${common[@]}" -- \
        fan --backend postgres --threads 1 "${common[@]}"
    lg "$round" mem1 chain --saver mem "${common[@]}"
    ours "$round" mem1 chain --backend memory --threads 1 "${common[@]}"
    probe "$round" sqlite1
    ours "$round" sqlite1 chain --backend sqlite --threads 1 "${common[@]}"
    probe "$round" sqlite1
done

say "=== once: resume, storage, resident memory, profile"
hist=(--invokes "$HIST_INVOKES" --durability sync)
probe 1 extras
ours 1 extras resume --backend postgres "${hist[@]}" --timings "$TIMINGS"
lg 1 extras resume "${hist[@]}" --timings "$TIMINGS"
ours 1 extras resume --backend sqlite "${hist[@]}" --timings "$TIMINGS"
ours 1 extras resume --backend memory "${hist[@]}" --timings "$TIMINGS"
ours 1 extras storage --backend postgres "${hist[@]}"
ours 1 extras storage --backend sqlite "${hist[@]}"
lg 1 extras storage "${hist[@]}"
ours 1 extras rss --backend postgres --threads "$HIGH" --secs "$SECS"
ours 1 extras profile --backend postgres --threads 1 --secs "$SECS"
ours 1 extras profile --backend postgres --threads "$HIGH" --secs "$SECS"
ours 1 extras profile --backend memory --threads 1 --secs "$SECS"
probe 1 extras
machine_line end

say "writing $OUT/RESULTS.md and $OUT/results.json ($(( $(date +%s) - START_TIME )) s)"
"$VENV/bin/python" "$BENCHES/report.py" --raw "$RAW" --md "$OUT/RESULTS.md" --json "$OUT/results.json" \
    --threshold "$THRESHOLD"
cp "$RAW" "$OUT/raw.jsonl"

# A measurement that failed was recorded and the run went on; the run itself fails, so CI's
# --quick run catches a harness that broke.
failures=$(grep -c '"failed": true' "$RAW" || true)
if [[ $failures -gt 0 ]]; then
    say "$failures measurement(s) failed; their lines in $OUT/raw.jsonl:"
    grep '"failed": true' "$RAW" >&2
    exit 1
fi
