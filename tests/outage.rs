//! Outage test: every PostgreSQL session of the run's database is terminated again and again
//! while the probe graph runs; the run backs off, reconnects and finishes with the state of an
//! undisturbed run.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use agentic::probe::{self, ProbeShape};
use agentic_runtime::checkpoint::PostgresCheckpointer;
use agentic_runtime::{Input, RunConfig, Update};
use support::TestDb;

const SHAPE: ProbeShape = ProbeShape { rounds: 6, width: 3, max_pause_ms: 30, remote_workers: false, hold_ms: 0 };

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_survives_terminated_connections_and_finishes_with_the_right_state() {
    let db = TestDb::new("outage").await;
    probe::prepare(&db.pool).await.unwrap();
    let store = Arc::new(PostgresCheckpointer::connect(&db.url).await.unwrap());
    let graph = probe::graph(SHAPE, db.pool.clone()).unwrap().with_checkpointer(store);
    let config = RunConfig { recursion_limit: 1000, ..RunConfig::default() };

    let reference = graph.invoke("reference", Input::Start(Update::new()), &config).await.unwrap();
    let expected = probe::normalized(&reference.state().unwrap().to_json());

    let run = {
        let graph = graph.clone();
        let config = config.clone();
        tokio::spawn(async move { graph.invoke("disturbed", Input::Start(Update::new()), &config).await })
    };
    let mut terminated = 0;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(120)).await;
        if run.is_finished() {
            break;
        }
        terminated += db.terminate_sessions().await;
    }
    let outcome = tokio::time::timeout(Duration::from_mins(2), run).await.unwrap().unwrap().unwrap();
    assert!(terminated >= 3, "only {terminated} sessions were terminated; the outage did not happen");
    let state = outcome.state().unwrap().to_json();
    assert_eq!(probe::normalized(&state), expected);
    let audit = probe::audit(&db.pool, "disturbed", &state).await.unwrap();
    assert!(audit.problems.iter().all(|p| !p.contains("twice")), "{:?}", audit.problems);
    db.drop_db().await;
}
