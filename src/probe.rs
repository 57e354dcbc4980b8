//! The durability probe's graph: rounds of a planner that fans out to workers (Send), a join,
//! and several reducers. Every node execution is recorded in a separate `probe_executions`
//! table before the node does anything, and every node writes the id of that execution into
//! the state, so a test can prove which executions took effect.

use std::time::Duration;

use agentic_runtime::{Channel, END, Goto, Graph, GraphBuilder, NodeError, RetryPolicy, START, Update, node_fn};
use serde_json::{Value, json};
use sqlx::PgPool;

/// Shape of the probe graph.
#[derive(Debug, Clone, Copy)]
pub struct ProbeShape {
    /// Planner rounds.
    pub rounds: u64,
    /// Workers per round (Send packets).
    pub width: u64,
    /// Longest pause inside a node (milliseconds), where kills land.
    pub max_pause_ms: u64,
    /// Run the workers in other processes.
    pub remote_workers: bool,
    /// Extra pause of every node after it recorded its execution (to kill it mid-task).
    pub hold_ms: u64,
}

/// Creates the executions table.
pub async fn prepare(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS probe_executions (
            id bigserial PRIMARY KEY, thread text NOT NULL, task text NOT NULL, node text NOT NULL,
            pid integer NOT NULL, at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(pool)
    .await?;
    Ok(())
}

async fn record(pool: &PgPool, thread: &str, task: &str, node: &str) -> Result<i64, NodeError> {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO probe_executions (thread, task, node, pid) VALUES ($1, $2, $3, $4) RETURNING id",
    )
    .bind(thread)
    .bind(task)
    .bind(node)
    .bind(std::process::id() as i32)
    .fetch_one(pool)
    .await
    .map_err(|e| NodeError::retryable(format!("recording execution: {e}")))?;
    Ok(id)
}

fn pause(max_ms: u64, salt: &str) -> Duration {
    if max_ms == 0 {
        return Duration::ZERO;
    }
    let h = blake3::hash(format!("{salt}:{}", std::process::id()).as_bytes());
    Duration::from_millis(u64::from(h.as_bytes()[0]) % max_ms)
}

/// The probe graph; node executions are recorded in `executions`.
pub fn graph(shape: ProbeShape, executions: PgPool) -> Result<Graph, agentic_runtime::Error> {
    let (plan_db, work_db, join_db) = (executions.clone(), executions.clone(), executions);
    let width = shape.width;
    let max = shape.max_pause_ms;
    let hold = shape.hold_ms;
    let builder = GraphBuilder::new("durability-probe")
        .channel("round", Channel::sum())
        .channel("total", Channel::sum())
        .channel("effects", Channel::append())
        .channel("seen", Channel::merge())
        .channel("last", Channel::last_value())
        .node(
            "plan",
            node_fn(move |state, ctx| {
                let db = plan_db.clone();
                async move {
                    let exec = record(&db, ctx.thread_id(), ctx.task_id(), "plan").await?;
                    tokio::time::sleep(pause(max, ctx.task_id()) + Duration::from_millis(hold)).await;
                    let round: u64 = state.get_or("round", 0)?;
                    Ok(Update::new()
                        .set("round", 1)
                        .set("effects", json!({"task": ctx.task_id(), "exec": exec, "node": "plan"}))
                        .set("last", format!("plan {round}")))
                }
            }),
        )
        .node(
            "work",
            node_fn(move |_, ctx| {
                let db = work_db.clone();
                async move {
                    let item = ctx.arg().and_then(Value::as_u64).ok_or("work needs an item")?;
                    let exec = record(&db, ctx.thread_id(), ctx.task_id(), "work").await?;
                    tokio::time::sleep(pause(max, ctx.task_id()) + Duration::from_millis(hold)).await;
                    Ok(Update::new()
                        .set("total", item)
                        .set("effects", json!({"task": ctx.task_id(), "exec": exec, "node": "work"}))
                        .set("seen", json!({ item.to_string(): true })))
                }
            }),
        )
        .node(
            "join",
            node_fn(move |state, ctx| {
                let db = join_db.clone();
                async move {
                    let exec = record(&db, ctx.thread_id(), ctx.task_id(), "join").await?;
                    tokio::time::sleep(pause(max, ctx.task_id()) + Duration::from_millis(hold)).await;
                    let total: u64 = state.get("total")?;
                    Ok(Update::new()
                        .set("effects", json!({"task": ctx.task_id(), "exec": exec, "node": "join"}))
                        .set("last", format!("total {total}")))
                }
            }),
        )
        .edge(START, "plan")
        .conditional(
            "plan",
            move |state| {
                let round: u64 = state.get("round")?;
                Ok((0..width).map(|i| Goto::send("work", round * 100 + i)).collect())
            },
            ["work"],
        )
        .edge("work", "join")
        .conditional(
            "join",
            move |state| {
                let round: u64 = state.get("round")?;
                Ok(vec![Goto::node(if round < shape.rounds { "plan" } else { END })])
            },
            ["plan", END],
        );
    // Recording an execution fails while the database is unreachable: retry through outages.
    let retry = || RetryPolicy::attempts(30).initial_interval(Duration::from_millis(50));
    let builder = builder.retry("plan", retry()).retry("work", retry()).retry("join", retry());
    let builder = if shape.remote_workers { builder.remote("work") } else { builder };
    builder.compile()
}

/// The final state a probe run must reach, with execution ids left out.
pub fn normalized(state: &Value) -> Value {
    let mut state = state.clone();
    if let Some(effects) = state.get_mut("effects").and_then(Value::as_array_mut) {
        for effect in effects {
            if let Some(map) = effect.as_object_mut() {
                map.remove("exec");
            }
        }
    }
    state
}

/// What the executions table says about a finished thread, checked against its state:
/// every task took effect exactly once, and no task ran again after its effect committed.
#[derive(Debug, Default)]
pub struct ExecutionAudit {
    /// Tasks in the state.
    pub tasks: usize,
    /// Executions recorded.
    pub executions: usize,
    /// Executions that did not take effect (killed before their writes were stored).
    pub lost_executions: usize,
    /// Problems found; empty when the guarantees held.
    pub problems: Vec<String>,
}

/// Audits a finished thread's state against the executions table.
pub async fn audit(pool: &PgPool, thread: &str, state: &Value) -> Result<ExecutionAudit, sqlx::Error> {
    let rows: Vec<(i64, String)> =
        sqlx::query_as("SELECT id, task FROM probe_executions WHERE thread = $1 ORDER BY id")
            .bind(thread)
            .fetch_all(pool)
            .await?;
    let mut audit = ExecutionAudit { executions: rows.len(), ..Default::default() };
    let effects = state.get("effects").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut applied = std::collections::BTreeMap::new();
    for effect in &effects {
        let task = effect["task"].as_str().unwrap_or_default().to_owned();
        let exec = effect["exec"].as_i64().unwrap_or(-1);
        if applied.insert(task.clone(), exec).is_some() {
            audit.problems.push(format!("task {task} took effect twice"));
        }
    }
    audit.tasks = applied.len();
    for (task, exec) in &applied {
        let last = rows.iter().filter(|(_, t)| t == task).map(|(id, _)| *id).max();
        match last {
            Some(last) if last == *exec => {}
            Some(last) => audit
                .problems
                .push(format!("task {task} ran again (execution {last}) after execution {exec} committed")),
            None => audit.problems.push(format!("task {task} has no recorded execution")),
        }
    }
    audit.lost_executions = rows.len().saturating_sub(applied.len());
    Ok(audit)
}
