//! Tasks across processes: a worker (another pod) runs one task of a thread's current step,
//! given the thread and the task id, and records its writes as that task's pending writes.
//! Writes are accepted only while the step is current (fenced by checkpoint id), and the first
//! report of a task wins, so a retried or late worker never applies anything twice.

use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use crate::algo;
use crate::checkpoint::{PendingWrite, StepRef, WriteKind, codec};
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::node::{Context, ContextInner, Persist};
use crate::pregel::{Interrupt, InterruptKind, interrupt_id};
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
        let step = StepRef { thread, ns: "", checkpoint: head.id };
        let stale = || Error::StaleTask { thread: thread.to_owned(), task: task_id.to_owned(), checkpoint: head.id };
        let task = algo::tasks_for("", head.id, &head.body).into_iter().find(|t| t.id == task_id).ok_or_else(stale)?;
        let writes = store_call(|| self.store.pending_writes(step)).await?;
        if writes.iter().any(|w| w.task == task.id && w.kind == WriteKind::Output) {
            return Ok(TaskReport::AlreadyReported);
        }
        let spec = self
            .inner
            .nodes
            .get(&task.node)
            .ok_or_else(|| Error::graph(&self.inner.name, format!("unknown node `{}`", task.node)))?;
        let mut resumes = std::collections::BTreeMap::new();
        for w in writes.iter().filter(|w| w.task == task.id && w.kind == WriteKind::Interrupt) {
            if let Some(r) = writes.iter().find(|r| r.kind == WriteKind::Resume && r.key == w.key) {
                let record: Value = codec::decode(&w.data)?;
                let index = record.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
                resumes.insert(index, codec::decode(&r.data)?);
            }
        }
        let journal = writes
            .iter()
            .filter(|w| w.task == task.id && w.kind == WriteKind::Journal)
            .map(|w| (w.key.clone(), w.data.clone()))
            .collect();
        let ctx = Context::new(ContextInner {
            thread: thread.to_owned(),
            ns: String::new(),
            checkpoint: head.id,
            step: head.step,
            task_id: task.id.clone(),
            node: task.node.clone(),
            arg: task.arg.clone(),
            attempt: 0.into(),
            resumes,
            journal: std::sync::Mutex::new(journal),
            journal_seen: std::sync::Mutex::default(),
            interrupts: 0.into(),
            store: Arc::clone(&self.store),
            events: None,
            persist: Persist::Now,
        });
        let values = head.values.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
        let result = runner::run_task(&self.inner, spec, &task, State::new(values), ctx).await;
        let (kind, key, data, report) = match result {
            TaskResult::Done(output) => {
                (WriteKind::Output, String::new(), codec::encode(&output)?, TaskReport::Accepted)
            }
            TaskResult::Interrupted { index, value } => {
                let id = interrupt_id(&task.id, index);
                let data = codec::encode(&serde_json::json!({"node": task.node, "index": index, "value": value}))?;
                let interrupt = Interrupt { id: id.clone(), node: task.node.clone(), value, kind: InterruptKind::Node };
                (WriteKind::Interrupt, id, data, TaskReport::Interrupted(interrupt))
            }
            TaskResult::Suspended(_) => {
                return Err(Error::InvalidState(format!(
                    "node `{}` is a subgraph; it runs in its parent's loop",
                    task.node
                )));
            }
            TaskResult::Failed(error) => {
                let data = codec::encode(&serde_json::json!({"node": task.node, "message": error.to_string()}))?;
                let write = PendingWrite { task: task.id.clone(), kind: WriteKind::Error, key: String::new(), data };
                store_call(|| self.store.put_writes(step, std::slice::from_ref(&write))).await?;
                return Err(error);
            }
        };
        let write = PendingWrite { task: task.id.clone(), kind, key, data };
        match store_call(|| self.store.put_writes(step, std::slice::from_ref(&write))).await? {
            crate::checkpoint::PutOutcome::Accepted => Ok(report),
            crate::checkpoint::PutOutcome::Duplicate => Ok(TaskReport::AlreadyReported),
        }
    }
}
