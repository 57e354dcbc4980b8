//! Tasks across processes: a worker (another pod) runs one task of a thread's current step,
//! given the thread and the task id, and records its writes as that task's pending writes.
//! Writes are accepted only while the step is current (fenced by checkpoint id), and the first
//! report of a task wins, so a retried or late worker never applies anything twice.

use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use crate::algo;
use crate::checkpoint::{PutOutcome, StepRef};
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::node::Persist;
use crate::pregel::{Interrupt, InterruptKind, Pending, TaskScope, interrupt_id, result_writes};
use crate::retry::store_call;
use crate::runner::{self, TaskResult};
use crate::state::State;

/// What a worker's task came to.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskReport {
    /// Its writes were recorded; the step's owner will apply them.
    Accepted,
    /// The task had been reported already (by an earlier attempt); nothing more was recorded.
    AlreadyReported,
    /// The task waits for human input.
    Interrupted(Interrupt),
}

/// A task of the current step, as handed to a worker.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskInfo {
    /// The task id.
    pub id: String,
    /// The node.
    pub node: String,
    /// The Send payload, if any.
    pub arg: Option<Value>,
    /// The checkpoint the step starts from.
    pub checkpoint: u64,
}

impl Graph {
    /// The tasks of the thread's current step.
    pub async fn current_tasks(&self, thread: &str) -> Result<Vec<TaskInfo>> {
        let Some(head) = store_call(|| self.store.load(thread, "", None)).await? else {
            return Err(Error::NotFound(format!("thread `{thread}`")));
        };
        Ok(algo::tasks_for("", head.id, &head.body)
            .into_iter()
            .map(|t| TaskInfo { id: t.id, node: t.node, arg: t.arg, checkpoint: head.id })
            .collect())
    }

    /// Runs one task of the thread's current step here and records its writes.
    /// Fails with [`Error::StaleTask`] when the step has moved on.
    pub async fn run_task(&self, thread: &str, task_id: &str) -> Result<TaskReport> {
        let Some(head) = store_call(|| self.store.load(thread, "", None)).await? else {
            return Err(Error::NotFound(format!("thread `{thread}`")));
        };
        let step = StepRef { thread, ns: "", checkpoint: head.id, epoch: None };
        let stale = || Error::StaleTask { thread: thread.to_owned(), task: task_id.to_owned(), checkpoint: head.id };
        let task = algo::tasks_for("", head.id, &head.body).into_iter().find(|t| t.id == task_id).ok_or_else(stale)?;
        let pending = Pending::parse(store_call(|| self.store.pending_writes(step)).await?)?;
        if pending.outputs.contains_key(&task.id) {
            return Ok(TaskReport::AlreadyReported);
        }
        let spec = self
            .inner
            .nodes
            .get(&task.node)
            .ok_or_else(|| Error::graph(&self.inner.name, format!("unknown node `{}`", task.node)))?;
        let scope = TaskScope {
            thread,
            ns: "",
            checkpoint: head.id,
            epoch: None,
            step: head.step,
            store: &self.store,
            events: None,
            persist: Persist::Now,
        };
        let ctx = pending.context(&scope, &task);
        let values = head.values.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
        let result = runner::run_task(&self.inner, spec, &task, State::new(values), ctx, true).await;
        let report = match &result {
            TaskResult::Done(_) => TaskReport::Accepted,
            TaskResult::Interrupted { index, value } => TaskReport::Interrupted(Interrupt {
                id: interrupt_id(&task.id, *index),
                node: task.node.clone(),
                value: value.clone(),
                kind: InterruptKind::Node,
            }),
            TaskResult::Suspended(_) => {
                return Err(Error::InvalidState(format!(
                    "node `{}` is a subgraph; it runs in its parent's loop",
                    task.node
                )));
            }
            TaskResult::Failed(_) => TaskReport::AlreadyReported,
        };
        let writes = result_writes(&task, &result, true)?;
        let outcome = store_call(|| self.store.put_writes(step, &writes)).await?;
        match (result, outcome) {
            (TaskResult::Failed(error), _) => Err(error),
            (_, PutOutcome::Accepted) => Ok(report),
            (_, PutOutcome::Duplicate) => Ok(TaskReport::AlreadyReported),
        }
    }
}
