//! Crash tests: the probe graph (fan-out, join, five reducers) runs on PostgreSQL in a real
//! process that is SIGKILLed at seeded random moments and restarted on the same thread. The
//! final state must equal an uninterrupted run's, every reducer write must apply exactly once,
//! and the executions table must show that no task of a committed step ran again. And a new run
//! on a finished thread, whose admission commits without waiting for the WAL flush, killed in
//! its first node: the next runner goes on from that admission. And a run on a thread the runtime
//! minted, killed before and after its first commit (which stores the thread).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::time::Duration;

use agentic::probe;
use rand::{RngExt, SeedableRng};
use serde_json::Value;
use support::{TestDb, finish, probe as probe_cmd, sigkill};

/// Kills per run; at least 50 in CI.
const KILLS: usize = 60;
const ROUNDS: u64 = 30;
const WIDTH: u64 = 4;
const SHAPE: [&str; 6] = ["--rounds", "30", "--width", "4", "--max-pause-ms", "40"];

async fn executions(db: &TestDb) -> i64 {
    executions_of(db, "crashed").await
}

async fn executions_of(db: &TestDb, thread: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM probe_executions WHERE thread = $1")
        .bind(thread)
        .fetch_one(&db.pool)
        .await
        .unwrap_or(0)
}

fn child_finished(child: &mut tokio::process::Child) -> bool {
    !matches!(child.try_wait(), Ok(None))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_after_sigkill_without_losing_or_repeating_writes() {
    let seed: u64 = std::env::var("CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let db = TestDb::new("crash").await;

    // The reference: one uninterrupted run.
    let reference = probe_cmd(&db, "reference", &[&SHAPE[..], &["run"]].concat()).spawn().unwrap();
    let (ok, out, err) = finish(reference, Duration::from_mins(2)).await;
    assert!(ok, "reference run failed: {err}");
    let expected: Value = serde_json::from_str(out.trim()).unwrap();

    let mut kills = 0;
    let mut restarts = 0;
    let final_state = loop {
        restarts += 1;
        let mut child = probe_cmd(&db, "crashed", &[&SHAPE[..], &["run"]].concat()).spawn().unwrap();
        if kills < KILLS {
            // Kill at a random moment after the restarted process has begun a node, so every
            // kill lands inside the run: mid-node, between a task's writes and the step's
            // commit, or mid-commit.
            let before = executions(&db).await;
            let mut finished_early = false;
            while executions(&db).await == before {
                if child_finished(&mut child) {
                    finished_early = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            if !finished_early {
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..40))).await;
            }
            sigkill(&child);
            let (ok, out, err) = finish(child, Duration::from_mins(1)).await;
            if ok {
                // It finished before the kill landed: that is the end.
                break serde_json::from_str::<Value>(out.trim()).unwrap();
            }
            assert!(!err.contains("panicked"), "probe panicked: {err}");
            kills += 1;
        } else {
            let (ok, out, err) = finish(child, Duration::from_mins(2)).await;
            assert!(ok, "final run failed: {err}");
            break serde_json::from_str::<Value>(out.trim()).unwrap();
        }
    };
    assert!(kills >= 50, "only {kills} kills landed (seed {seed}); the probe finished too early");
    assert_eq!(probe::normalized(&final_state), probe::normalized(&expected), "seed {seed}");
    // Every reducer applied each write once.
    assert_eq!(final_state["round"], Value::from(ROUNDS));
    let total: u64 = (1..=ROUNDS).flat_map(|r| (0..WIDTH).map(move |i| r * 100 + i)).sum();
    assert_eq!(final_state["total"], Value::from(total));
    assert_eq!(final_state["seen"].as_object().unwrap().len() as u64, ROUNDS * WIDTH);

    let audit = probe::audit(&db.pool, "crashed", &final_state).await.unwrap();
    assert!(audit.problems.is_empty(), "seed {seed}: {:?}", audit.problems);
    assert_eq!(audit.tasks as u64, ROUNDS * (1 + WIDTH + 1));
    eprintln!(
        "seed {seed}: {kills} kills, {restarts} starts, {} executions for {} tasks ({} lost to kills)",
        audit.executions, audit.tasks, audit.lost_executions
    );
    db.drop_db().await;
}

/// A new run on a thread whose last run finished commits its admission without waiting for the
/// WAL flush (its first step's commit flushes both). The runner is SIGKILLed inside that first
/// node, after the admission returned: the admission is still the thread's head, and the next
/// runner continues the run from it, so its round runs once and only once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_run_killed_in_its_first_node_goes_on_from_its_admission() {
    let db = TestDb::new("again").await;
    let shape = ["--rounds", "1", "--width", "2", "--max-pause-ms", "1"];
    let first = probe_cmd(&db, "again", &[&shape[..], &["run"]].concat()).spawn().unwrap();
    let (ok, out, err) = finish(first, Duration::from_mins(1)).await;
    assert!(ok, "first run failed: {err}");
    let first: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(first["round"], Value::from(1));

    let before = executions_of(&db, "again").await;
    let again = [&shape[..], &["--hold-ms", "60000", "run", "--again"]].concat();
    let mut child = probe_cmd(&db, "again", &again).spawn().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while executions_of(&db, "again").await == before {
        assert!(!child_finished(&mut child), "the new run ended before its first node");
        assert!(tokio::time::Instant::now() < deadline, "the new run's first node never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sigkill(&child);
    let (ok, _, _) = finish(child, Duration::from_mins(1)).await;
    assert!(!ok, "the run was killed inside its first node");
    let head: String = sqlx::query_scalar(
        "SELECT c.source FROM agentic.checkpoints c JOIN agentic.threads t ON t.tid = c.tid
         WHERE t.thread_id = 'again' AND c.ns = '' ORDER BY c.id DESC LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(head, "input", "the killed run's admission is the head");

    let next = probe_cmd(&db, "again", &[&shape[..], &["run"]].concat()).spawn().unwrap();
    let (ok, out, err) = finish(next, Duration::from_mins(1)).await;
    assert!(ok, "the continued run failed: {err}");
    let last: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(last["round"], Value::from(2), "the killed run's round ran, once");
    let total = first["total"].as_u64().unwrap() + 200 + 201;
    assert_eq!(last["total"], Value::from(total));
    db.drop_db().await;
}

/// The probe's thread ids with recorded executions, other than `known`.
async fn new_thread_ids(db: &TestDb, known: &[String]) -> Vec<String> {
    let ids: Vec<String> = sqlx::query_scalar("SELECT DISTINCT thread FROM probe_executions")
        .fetch_all(&db.pool)
        .await
        .unwrap_or_default();
    ids.into_iter().filter(|id| !known.contains(id)).collect()
}

/// Waits until a probe run on a minted thread has recorded `n` executions; returns its id.
async fn minted_thread_with(db: &TestDb, child: &mut tokio::process::Child, known: &[String], n: i64) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let [id] = &new_thread_ids(db, known).await[..]
            && executions_of(db, id).await >= n
        {
            return id.clone();
        }
        assert!(!child_finished(child), "the run ended before {n} executions");
        assert!(tokio::time::Instant::now() < deadline, "the run never reached {n} executions");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A run on a thread the runtime minted (`invoke_new`) stores the thread with its first step's
/// commit. SIGKILLed inside its first node, it leaves nothing (no thread: nothing to resume, and
/// nobody was told the id). SIGKILLed after that commit, the thread is there and a runner naming
/// it finishes the run: the state is an uninterrupted run's, each write applied once, no task of
/// a committed step run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_threads_run_is_stored_from_its_first_commit_on() {
    let db = TestDb::new("minted").await;
    let shape = ["--rounds", "3", "--width", "2", "--max-pause-ms", "5"];
    let reference = probe_cmd(&db, "reference", &[&shape[..], &["run"]].concat()).spawn().unwrap();
    let (ok, out, err) = finish(reference, Duration::from_mins(1)).await;
    assert!(ok, "reference run failed: {err}");
    let expected: Value = serde_json::from_str(out.trim()).unwrap();
    let mut known = vec!["reference".to_owned()];

    let holding = [&shape[..], &["--hold-ms", "60000", "run", "--new"]].concat();
    let mut child = probe_cmd(&db, "unused", &holding).spawn().unwrap();
    let killed_early = minted_thread_with(&db, &mut child, &known, 1).await;
    sigkill(&child);
    let (ok, _, _) = finish(child, Duration::from_mins(1)).await;
    assert!(!ok, "the run was killed inside its first node");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM agentic.threads WHERE thread_id = $1")
        .bind(&killed_early)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0, "nothing stored before the first step's commit");
    known.push(killed_early);

    // The first step is the planner alone; a worker's execution means that step committed.
    let slow = [&shape[..], &["--hold-ms", "200", "run", "--new"]].concat();
    let mut child = probe_cmd(&db, "unused", &slow).spawn().unwrap();
    let id = minted_thread_with(&db, &mut child, &known, 2).await;
    sigkill(&child);
    let (ok, _, _) = finish(child, Duration::from_mins(1)).await;
    assert!(!ok, "the run was killed after its first commit");
    let head: i64 = sqlx::query_scalar(
        "SELECT max(c.id) FROM agentic.checkpoints c JOIN agentic.threads t ON t.tid = c.tid
         WHERE t.thread_id = $1 AND c.ns = ''",
    )
    .bind(&id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(head >= 2, "the thread holds its admission and first step (head {head})");

    let next = probe_cmd(&db, &id, &[&shape[..], &["run"]].concat()).spawn().unwrap();
    let (ok, out, err) = finish(next, Duration::from_mins(1)).await;
    assert!(ok, "the continued run failed: {err}");
    let last: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(probe::normalized(&last), probe::normalized(&expected));
    let audit = probe::audit(&db.pool, &id, &last).await.unwrap();
    assert!(audit.problems.is_empty(), "{:?}", audit.problems);
    db.drop_db().await;
}
