//! The benchmark harness keeps working: `agentic-bench --quick` runs each workload end to end
//! on every backend and prints well-formed JSON. No timing is asserted here; figures belong
//! to benches/compare.sh.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::process::Command;

use serde_json::Value;
use support::TestDb;

fn bench(args: &[&str]) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_agentic-bench")).args(args).output().unwrap();
    assert!(out.status.success(), "agentic-bench {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    assert!(!lines.is_empty(), "agentic-bench {args:?} printed nothing");
    lines
}

fn assert_ran(lines: &[Value], case: &str, backend: &str) {
    for line in lines {
        assert_eq!(line["case"], case);
        assert_eq!(line["backend"], backend);
        assert!(line["node_steps"].as_u64().unwrap_or(0) > 0, "no step ran: {line}");
        assert!(line["node_steps_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{line}");
        // Every invoke's first node started once: one start latency per invoke.
        assert_eq!(line["start_latency"]["samples"], line["invokes"], "{line}");
        assert!(line["start_latency"]["mean_us"].as_f64().unwrap_or(0.0) > 0.0, "{line}");
        assert!(line["invoke_latency"]["mean_us"].as_f64() >= line["start_latency"]["mean_us"].as_f64(), "{line}");
        // And one end latency per invoke: its last step's start to its return.
        assert_eq!(line["end_latency"]["samples"], line["invokes"], "{line}");
        assert!(line["invoke_latency"]["mean_us"].as_f64() >= line["end_latency"]["mean_us"].as_f64(), "{line}");
        assert!(line["step_latency"]["mean_us"].as_f64().unwrap_or(0.0) > 0.0, "{line}");
    }
}

#[test]
fn quick_runs_of_every_workload_on_memory_and_sqlite_print_json() {
    for backend in ["memory", "sqlite"] {
        for case in ["chain", "fan"] {
            assert_ran(&bench(&["--backend", backend, "--quick", case]), case, backend);
        }
    }
    let resume = bench(&["--backend", "sqlite", "--quick", "resume"]);
    assert_eq!(resume[0]["case"], "resume");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_runs_on_postgres_print_json_with_the_wal_fsync_time() {
    let db = TestDb::new("bench").await;
    for case in ["chain", "fan"] {
        let lines = bench(&["--backend", "postgres", "--database", &db.url, "--quick", case]);
        assert_ran(&lines, case, "postgres");
        assert!(lines.iter().all(|l| l.get("ms_per_wal_sync").is_some()), "{lines:?}");
        assert!(lines.iter().all(|l| l["threads_named_by"] == "runtime"), "{lines:?}");
    }
    // Threads named by the caller, as the LangGraph script names them (`invoke`).
    let named = bench(&["--backend", "postgres", "--database", &db.url, "--quick", "chain", "--named-threads"]);
    assert_ran(&named, "chain", "postgres");
    assert!(named.iter().all(|l| l["threads_named_by"] == "caller"), "{named:?}");
    // profile: the chain, its commits replayed into the store, and its step rows through bare sqlx.
    let profile = bench(&["--backend", "postgres", "--database", &db.url, "--quick", "profile"]);
    let line = &profile[0];
    assert_eq!(line["case"], "profile");
    for part in ["store_alone", "driver_alone"] {
        assert!(line[part]["commits"].as_u64().unwrap_or(0) > 0, "{part} made no commit: {line}");
        assert!(line[part]["per_commit_us"]["postgres_cpu"].as_f64().is_some(), "{line}");
    }
    db.drop_db().await;
}

/// The committed `benches/RESULTS.md` and `benches/results.json` are exactly what
/// `benches/report.py` makes of the committed raw lines (`benches/raw.jsonl`) and levers
/// (`benches/LEVERS.md`): no figure was typed in or edited by hand, and the report still renders
/// the run that is committed. Its rows carry the fields the comparison promises.
#[test]
fn committed_results_are_what_report_py_makes_of_the_committed_raw_lines() {
    let benches = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches");
    let out = std::env::temp_dir().join(format!("agentic-report-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    let (md, json) = (out.join("RESULTS.md"), out.join("results.json"));
    let status = Command::new("python3")
        .arg(benches.join("report.py"))
        .arg("--raw")
        .arg(benches.join("raw.jsonl"))
        .arg("--md")
        .arg(&md)
        .arg("--json")
        .arg(&json)
        .status()
        .expect("python3 runs benches/report.py");
    assert!(status.success(), "report.py failed: {status}");
    for (made, committed) in [(&md, "RESULTS.md"), (&json, "results.json")] {
        let made = std::fs::read_to_string(made).unwrap();
        let committed = std::fs::read_to_string(benches.join(committed)).unwrap();
        assert!(
            made == committed,
            "benches/{committed} differs from report.py's rendering of benches/raw.jsonl and LEVERS.md; render \
             it again: python3 benches/report.py --raw benches/raw.jsonl --md benches/RESULTS.md --json \
             benches/results.json"
        );
    }
    let rows: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let throughput: Vec<&Value> = rows.iter().filter(|r| r["case"] == "chain" || r["case"] == "fan").collect();
    assert!(
        throughput.iter().any(|r| r["case"] == "chain" && r["backend"] == "postgres" && r["threads"] == 1),
        "no 1-thread PostgreSQL chain row"
    );
    for row in throughput {
        for field in [
            "case",
            "backend",
            "threads",
            "ours_steps_per_s",
            "langgraph_steps_per_s",
            "pgbench_tps",
            "ratio_vs_langgraph",
            "ratio_vs_pgbench",
        ] {
            assert!(row.get(field).is_some(), "results.json row without `{field}`: {row}");
        }
    }
    std::fs::remove_dir_all(&out).unwrap();
}
