//! Split brain: two runners (separate connection pools, as two pods) on one thread. Exactly
//! one progresses; the other is refused with the lease error; a runner whose lease was taken
//! over cannot commit; the checkpoint chain never forks.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use agentic_runtime::checkpoint::{ListFilter, PostgresCheckpointer};
use agentic_runtime::{Channel, END, Error, Graph, GraphBuilder, Input, RunConfig, START, Update, node_fn};
use support::TestDb;

fn slow_chain(store: Arc<PostgresCheckpointer>) -> Graph {
    let slow = |name: &'static str| {
        node_fn(move |_, _| async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            Ok(Update::new().set("log", name).set("n", 1))
        })
    };
    GraphBuilder::new("slow-chain")
        .channel("log", Channel::append())
        .channel("n", Channel::sum())
        .node("a", slow("a"))
        .node("b", slow("b"))
        .node("c", slow("c"))
        .edge(START, "a")
        .edge("a", "b")
        .edge("b", "c")
        .edge("c", END)
        .compile()
        .unwrap()
        .with_checkpointer(store)
}

async fn wait_for_head(graph: &Graph, thread: &str) {
    for _ in 0..200 {
        if graph.get_state(thread).await.unwrap().is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the first runner never admitted its run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_runner_is_refused_and_a_deposed_runner_cannot_commit() {
    let db = TestDb::new("split").await;
    let pod_a = slow_chain(Arc::new(PostgresCheckpointer::connect(&db.url).await.unwrap()));
    let pod_b = slow_chain(Arc::new(PostgresCheckpointer::connect(&db.url).await.unwrap()));
    let config_a = RunConfig { owner: "pod-a".into(), ..RunConfig::default() };
    let config_b = RunConfig { owner: "pod-b".into(), ..RunConfig::default() };

    let run_a = {
        let (graph, config) = (pod_a.clone(), config_a.clone());
        tokio::spawn(async move { graph.invoke("t", Input::Start(Update::new()), &config).await })
    };
    wait_for_head(&pod_b, "t").await;

    // While A holds the lease, B is refused with a clear error naming A.
    let refused = pod_b.invoke("t", Input::Continue, &config_b).await.unwrap_err();
    match &refused {
        Error::LeaseHeld { owner, .. } => assert_eq!(owner, "pod-a"),
        other => panic!("expected LeaseHeld, got {other}"),
    }
    assert!(refused.to_string().contains("leased by `pod-a`"), "{refused}");

    // A's database session dies (a network partition; the call waits until it is gone): B takes
    // over at once, and A, still
    // running its node, is fenced off when it tries to commit.
    let killed: Vec<(bool,)> =
        sqlx::query_as("SELECT pg_terminate_backend(l.pid, 5000) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND a.datname = $1")
            .bind(&db.name)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(killed.len(), 1, "A's lease session was not found");
    let outcome_b = pod_b.invoke("t", Input::Continue, &config_b).await.unwrap();
    let outcome_a = run_a.await.unwrap();
    match outcome_a {
        Err(Error::LeaseLost { thread, .. }) => assert_eq!(thread, "t"),
        other => panic!("the deposed runner was not fenced: {other:?}"),
    }
    let state = outcome_b.state().unwrap();
    assert_eq!(state.get::<Vec<String>>("log").unwrap(), ["a", "b", "c"]);
    assert_eq!(state.get::<i64>("n").unwrap(), 3);

    // The chain is linear: every checkpoint but the first has a distinct parent, the one before it.
    let history = pod_b.history("t", &ListFilter::default()).await.unwrap();
    let parents: Vec<Option<u64>> = history.iter().map(|c| c.parent).collect();
    let distinct: BTreeSet<_> = parents.iter().collect();
    assert_eq!(distinct.len(), parents.len(), "two checkpoints share a parent: the chain forked");
    for pair in history.windows(2) {
        assert_eq!(pair[0].parent, Some(pair[1].id), "history is not one chain: {history:?}");
    }
    assert_eq!(history.len(), 4);
    db.drop_db().await;
}
