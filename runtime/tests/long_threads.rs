//! Long threads on the SQL backends: an append channel written on every step of several runs,
//! in each durability mode, rebuilds exactly at every checkpoint, and the chain of rows that
//! rebuilds the head stays short (segments close every `SEGMENT_ROWS` rows).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly on unexpected errors")]

use std::sync::Arc;

use agentic_runtime::checkpoint::{Checkpointer, ListFilter, SEGMENT_ROWS};
use agentic_runtime::{
    Channel, Durability, END, Goto, Graph, GraphBuilder, Input, PostgresCheckpointer, RunConfig, START,
    SqliteCheckpointer, Update, node_fn,
};

/// Steps per run: enough for several segments in one run.
const STEPS: i64 = 75;

/// A loop that appends `"<run>:<left>"` to `log` and counts `left` down to zero.
fn countdown(store: Arc<dyn Checkpointer>) -> Graph {
    GraphBuilder::new("countdown")
        .channel("log", Channel::append())
        .channel("run", Channel::last_value())
        .channel("left", Channel::last_value())
        .node(
            "tick",
            node_fn(|state, _| async move {
                let (run, left) = (state.get::<String>("run")?, state.get::<i64>("left")?);
                Ok(Update::new().set("log", format!("{run}:{left}")).set("left", left - 1))
            }),
        )
        .conditional(
            "tick",
            |state| Ok(vec![Goto::node(if state.get::<i64>("left")? > 0 { "tick" } else { END })]),
            ["tick", END],
        )
        .edge(START, "tick")
        .compile()
        .unwrap()
        .with_checkpointer(store)
}

fn expected(runs: &[&str]) -> Vec<String> {
    runs.iter().flat_map(|run| (1..=STEPS).rev().map(move |left| format!("{run}:{left}"))).collect()
}

/// Runs three runs of [`STEPS`] appending steps on one thread per durability mode; checks every
/// stored checkpoint's `log` and returns, per mode, the thread id.
async fn three_runs_in_each_mode(store: Arc<dyn Checkpointer>) -> Vec<String> {
    let graph = countdown(Arc::clone(&store));
    let mut threads = Vec::new();
    for durability in [Durability::Sync, Durability::Async, Durability::Exit] {
        let thread = format!("long-{durability:?}");
        let config = RunConfig { durability, recursion_limit: 1_000, ..RunConfig::default() };
        for run in ["a", "b", "c"] {
            let input = Update::new().set("run", run).set("left", STEPS);
            graph.invoke(&thread, Input::Start(input), &config).await.unwrap();
        }
        let all = expected(&["a", "b", "c"]);
        // A fresh graph on the same store: the values come from the rows, not from memory.
        let head = countdown(Arc::clone(&store)).get_state(&thread).await.unwrap().unwrap();
        assert_eq!(head.values.get::<Vec<String>>("log").unwrap(), all, "{durability:?}");
        // Every checkpoint rebuilds a prefix of the log, one item longer per step.
        let history = graph.history(&thread, &ListFilter::default()).await.unwrap();
        let mut lengths = Vec::new();
        for meta in &history {
            let stored = store.load(&thread, "", Some(meta.id)).await.unwrap().unwrap();
            let log: Vec<String> = match stored.values.get("log") {
                Some(log) => serde_json::from_value(log.clone()).unwrap(),
                None => Vec::new(),
            };
            assert_eq!(log[..], all[..log.len()], "{durability:?}, checkpoint {}", meta.id);
            lengths.push(log.len());
        }
        if durability != Durability::Exit {
            lengths.sort_unstable();
            lengths.dedup();
            assert_eq!(lengths.len(), all.len() + 1, "{durability:?}: a checkpoint per length, 0 to {}", all.len());
        }
        threads.push(thread);
    }
    threads
}

/// Checks that `rows` rows rebuild a thread's `log` (of `all` stored): at most a root, a row
/// per closed segment and the open segment's deltas; with a row per step (not durability exit,
/// which stores a row per run), most rows are skipped.
fn assert_short_chain(thread: &str, rows: i64, all: i64) {
    let items = expected(&["a", "b", "c"]).len();
    let bound = 1 + items / SEGMENT_ROWS as usize + SEGMENT_ROWS as usize;
    eprintln!("{thread}: {rows} of {all} rows rebuild {items} items");
    assert!(rows >= 2 && rows as usize <= bound, "{thread}: {rows} rows rebuild {items} items");
    if !thread.ends_with("Exit") {
        assert!(all > rows * 3, "{thread}: the chain skips most rows ({rows} of {all})");
    }
}

#[tokio::test]
async fn sqlite_rebuilds_long_append_chains_from_few_rows() {
    let dir = std::env::temp_dir().join(format!("agentic-long-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("long.db");
    let store = Arc::new(SqliteCheckpointer::open(&path).await.unwrap());
    let threads = three_runs_in_each_mode(store.clone()).await;
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display())).await.unwrap();
    for thread in threads {
        let (rows, all): (i64, i64) = sqlx::query_as(
            // No forks here: the newest row of `log` is the head's.
            "WITH RECURSIVE chain(tid, version, base) AS (
                SELECT v.tid, max(v.version), v.base FROM channel_values v
                WHERE v.channel = 'log' AND v.tid = (SELECT tid FROM threads WHERE thread_id = ?1)
                UNION ALL
                SELECT v.tid, v.version, v.base FROM chain
                    JOIN channel_values v ON v.tid = chain.tid AND v.ns = '' AND v.channel = 'log' AND v.version = chain.base
             )
             SELECT (SELECT count(*) FROM chain), count(*) FROM channel_values v JOIN threads t USING (tid)
             WHERE t.thread_id = ?1 AND v.channel = 'log'",
        )
        .bind(&thread)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_short_chain(&thread, rows, all);
    }
    pool.close().await;
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

#[sqlx::test(migrations = false)]
async fn postgres_rebuilds_long_append_chains_from_few_rows(pool: sqlx::PgPool) {
    let store = Arc::new(PostgresCheckpointer::from_pool(pool.clone()).await.unwrap());
    let threads = three_runs_in_each_mode(store).await;
    for thread in threads {
        let (rows, all): (i64, i64) = sqlx::query_as(
            // No forks here: the newest row of `log` is the head's.
            // Versions are rows of `channel_values` or entries of their checkpoint's row.
            "WITH RECURSIVE v AS (
                SELECT tid, ns, channel, version, base FROM agentic.channel_values
                UNION ALL
                SELECT c.tid, c.ns, x.channel, c.id, x.base
                FROM agentic.checkpoints c, unnest(c.channels, c.bases) AS x(channel, base)
             ),
             chain(tid, version, base) AS (
                (SELECT v.tid, v.version, v.base FROM v
                 WHERE v.channel = 'log' AND v.tid = (SELECT tid FROM agentic.threads WHERE thread_id = $1)
                 ORDER BY v.version DESC LIMIT 1)
                UNION ALL
                SELECT v.tid, v.version, v.base FROM chain
                    JOIN v ON v.tid = chain.tid AND v.ns = '' AND v.channel = 'log' AND v.version = chain.base
             )
             SELECT (SELECT count(*) FROM chain), count(*) FROM v
                JOIN agentic.threads t USING (tid)
             WHERE t.thread_id = $1 AND v.channel = 'log'",
        )
        .bind(&thread)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_short_chain(&thread, rows, all);
    }
}
