//! Tasks across processes: the fan-out step's tasks run in separate worker processes; one is
//! SIGKILLed mid-task and retried; each task's writes apply exactly once; a worker reporting
//! a task after its step moved on is refused.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use agentic::probe::{self, ProbeShape};
use agentic_runtime::checkpoint::PostgresCheckpointer;
use agentic_runtime::{Input, RunConfig, Update};
use serde_json::Value;
use support::{TestDb, finish, probe as probe_cmd, sigkill};

const ROUNDS: u64 = 2;
const WIDTH: u64 = 3;
const SHAPE: ProbeShape =
    ProbeShape { rounds: ROUNDS, width: WIDTH, max_pause_ms: 50, remote_workers: true, hold_ms: 0 };
const ARGS: [&str; 7] = ["--rounds", "2", "--width", "3", "--max-pause-ms", "50", "--remote-workers"];

async fn wait_for_execution(db: &TestDb, task: &str) {
    for _ in 0..500 {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM probe_executions WHERE task = $1")
            .bind(task)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        if n > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the worker never started its task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_processes_finish_fan_out_tasks_exactly_once() {
    let db = TestDb::new("workers").await;
    probe::prepare(&db.pool).await.unwrap();
    let store = Arc::new(PostgresCheckpointer::connect(&db.url).await.unwrap());
    let graph = probe::graph(SHAPE, db.pool.clone()).unwrap().with_checkpointer(store);
    let config = RunConfig { recursion_limit: 100, ..RunConfig::default() };
    let owner = {
        let (graph, config) = (graph.clone(), config.clone());
        tokio::spawn(async move { graph.invoke("t", Input::Start(Update::new()), &config).await })
    };

    let mut started = BTreeSet::new();
    let mut killed_one = false;
    let mut first_round_task = None;
    let mut workers = Vec::new();
    while !owner.is_finished() {
        // Before the run is admitted there are no tasks yet.
        let tasks = graph.current_tasks("t").await.unwrap_or_default();
        for task in tasks.into_iter().filter(|t| t.node == "work") {
            if !started.insert(task.id.clone()) {
                continue;
            }
            first_round_task.get_or_insert_with(|| task.id.clone());
            let work = [&ARGS[..], &["work", "--task", &task.id]].concat();
            if !killed_one {
                // This worker holds its task for a minute after recording its execution: kill it
                // mid-task, then retry the task with a fresh worker.
                let held = [&ARGS[..], &["--hold-ms", "60000", "work", "--task", &task.id]].concat();
                let child = probe_cmd(&db, "t", &held).spawn().unwrap();
                wait_for_execution(&db, &task.id).await;
                sigkill(&child);
                let (ok, _, _) = finish(child, Duration::from_secs(30)).await;
                assert!(!ok, "the worker finished before it was killed");
                killed_one = true;
            }
            workers.push(probe_cmd(&db, "t", &work).spawn().unwrap());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for worker in workers {
        let (ok, out, err) = finish(worker, Duration::from_mins(1)).await;
        assert!(ok, "worker failed: {out} {err}");
        assert_eq!(out.trim(), "accepted");
    }
    let outcome = owner.await.unwrap().unwrap();
    let state = outcome.state().unwrap().to_json();
    assert_eq!(started.len() as u64, ROUNDS * WIDTH);
    let total: u64 = (1..=ROUNDS).flat_map(|r| (0..WIDTH).map(move |i| r * 100 + i)).sum();
    assert_eq!(state["total"], Value::from(total));
    let audit = probe::audit(&db.pool, "t", &state).await.unwrap();
    assert!(audit.problems.is_empty(), "{:?}", audit.problems);
    assert_eq!(audit.lost_executions, 1, "exactly the killed worker's execution is lost");

    // A worker that reports a task of a step that has moved on is refused.
    let first_round_task = first_round_task.unwrap();
    let late = [&ARGS[..], &["work", "--task", &first_round_task]].concat();
    let child = probe_cmd(&db, "t", &late).spawn().unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert_eq!(out.status.code(), Some(3), "late worker was not refused: {}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "stale");
    db.drop_db().await;
}
