//! Running one task: attempts with the node's retry policy (exponential backoff with jitter,
//! through `backon`), a timeout per attempt, panics caught, and the update checked and routed.
//!
//! A task alone in its step runs on the loop's own tokio task; tasks of a larger step each get a
//! tokio task of their own, so they run in parallel on a multi-threaded runtime.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use backon::{ExponentialBuilder, Retryable};
use futures::FutureExt;
use serde_json::Value;

use crate::algo::{self, Task, TaskOutput};
use crate::error::Error;
use crate::graph::{GraphInner, NodeSpec};
use crate::node::{Context, NodeError, RetryPolicy};
use crate::state::State;

/// How a task ended.
pub(crate) enum TaskResult {
    Done(TaskOutput),
    Interrupted {
        index: usize,
        value: Value,
    },
    /// A subgraph stopped at these interrupts (ids from the subgraph's own tasks).
    Suspended(Vec<crate::pregel::Interrupt>),
    Failed(Error),
}

fn backoff(policy: &RetryPolicy) -> ExponentialBuilder {
    let builder = ExponentialBuilder::default()
        .with_min_delay(policy.initial_interval)
        .with_factor(policy.backoff_factor)
        .with_max_delay(policy.max_interval)
        .with_max_times(policy.max_attempts.saturating_sub(1) as usize);
    if policy.jitter { builder.with_jitter() } else { builder }
}

/// Runs a task to its end (after retries); `alone`: the only task of its step.
pub(crate) async fn run_task(
    graph: &GraphInner,
    spec: &NodeSpec,
    task: &Task,
    state: State,
    ctx: Context,
    alone: bool,
) -> TaskResult {
    let attempts = AtomicUsize::new(0);
    let node = Arc::clone(&spec.node);
    let attempt = || {
        let n = attempts.fetch_add(1, Ordering::Relaxed) + 1;
        ctx.start_attempt(n);
        let future = node.run(state.clone(), ctx.clone());
        let timeout = spec.timeout;
        async move {
            let limited = async move {
                match timeout {
                    Some(limit) => tokio::time::timeout(limit, future)
                        .await
                        .unwrap_or_else(|_| Err(NodeError::retryable(format!("timed out after {limit:?}")))),
                    None => future.await,
                }
            };
            // Alone, the node runs right here: no spawn, no wake-up of another worker thread.
            if alone {
                return AssertUnwindSafe(limited).catch_unwind().await.unwrap_or_else(|panic| {
                    Err(NodeError::fatal(format!("node panicked: {}", panic_message(&*panic))))
                });
            }
            match tokio::spawn(limited).await {
                Ok(result) => result,
                Err(join) if join.is_panic() => {
                    Err(NodeError::fatal(format!("node panicked: {}", panic_message(&*join.into_panic()))))
                }
                Err(join) => Err(NodeError::fatal(format!("node task cancelled: {join}"))),
            }
        }
    };
    let result = attempt
        .retry(backoff(&spec.retry))
        .sleep(tokio::time::sleep)
        .when(|e| spec.retry.should_retry(e))
        .notify(|e, delay| tracing::warn!(node = %task.node, error = %e, ?delay, "node failed; retrying"))
        .await;
    match result {
        Ok(update) => match algo::finish_task(graph, &task.node, &state, update) {
            Ok(output) => TaskResult::Done(output),
            Err(e) => TaskResult::Failed(e),
        },
        Err(NodeError::Interrupt { index, value }) => TaskResult::Interrupted { index, value },
        Err(e) => TaskResult::Failed(Error::Node {
            node: task.node.clone(),
            attempts: attempts.load(Ordering::Relaxed) as u32,
            message: e.message(),
        }),
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}
