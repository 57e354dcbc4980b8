//! A thread seen from outside: its current state, its history newest first, updates written
//! as if a node had run, and retention (delete, prune). Running from an older checkpoint
//! (`RunConfig::checkpoint`) forks a new branch and keeps the old one.

use std::time::SystemTime;

use serde_json::{Value, json};

use crate::algo;
use crate::checkpoint::{CheckpointMeta, LeaseRequest, ListFilter, NewCheckpoint, Source, StepCommit, StepRef};
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::pregel::{Interrupt, Pending, RunConfig};
use crate::retry::store_call;
use crate::state::{State, Update};

/// A thread's state at one checkpoint.
#[derive(Debug, Clone)]
pub struct StateSnapshot {
    /// The checkpoint.
    pub checkpoint: u64,
    /// The checkpoint before it.
    pub parent: Option<u64>,
    /// Super-steps completed.
    pub step: u64,
    /// Every channel's value.
    pub values: State,
    /// Nodes of the next step (empty when the run ended).
    pub next: Vec<String>,
    /// Interrupts waiting for a resume value.
    pub interrupts: Vec<Interrupt>,
    /// Where the checkpoint came from.
    pub source: Source,
    /// Its metadata.
    pub metadata: Value,
    /// When it was committed.
    pub created_at: SystemTime,
}

impl Graph {
    /// The thread's current state (`None` for an unknown thread).
    pub async fn get_state(&self, thread: &str) -> Result<Option<StateSnapshot>> {
        self.state_at(thread, None).await
    }

    /// The thread's state at a given checkpoint.
    pub async fn state_at(&self, thread: &str, checkpoint: Option<u64>) -> Result<Option<StateSnapshot>> {
        let Some(stored) = store_call(|| self.store.load(thread, "", checkpoint)).await? else { return Ok(None) };
        let step = StepRef { thread, ns: "", checkpoint: stored.id, epoch: None };
        let interrupts = Pending::parse(store_call(|| self.store.pending_writes(step)).await?)?.open_interrupts();
        let next = algo::tasks_for("", stored.id, &stored.body).into_iter().map(|t| t.node).collect();
        Ok(Some(StateSnapshot {
            checkpoint: stored.id,
            parent: stored.parent,
            step: stored.step,
            values: State::new(stored.values.into_iter().map(|(k, v)| (k, std::sync::Arc::new(v))).collect()),
            next,
            interrupts,
            source: stored.source,
            metadata: stored.metadata,
            created_at: stored.created_at,
        }))
    }

    /// The thread's checkpoints, newest first.
    pub async fn history(&self, thread: &str, filter: &ListFilter) -> Result<Vec<CheckpointMeta>> {
        store_call(|| self.store.list(thread, "", filter)).await
    }

    /// Writes to the thread's state from outside, as if `as_node` had run (its edges then decide
    /// what runs next); without `as_node` the pending next step is kept. Returns the new checkpoint.
    pub async fn update_state(
        &self,
        thread: &str,
        update: Update,
        as_node: Option<&str>,
        config: &RunConfig,
    ) -> Result<u64> {
        let g = &self.inner;
        if let Some(node) = as_node
            && !g.nodes.contains_key(node)
        {
            return Err(Error::graph(&g.name, format!("update_state as unknown node `{node}`")));
        }
        let request = LeaseRequest {
            thread,
            owner: &config.owner,
            graph: &g.identity,
            allow_graph_change: config.allow_graph_change,
        };
        let lease = store_call(|| self.store.acquire(request.clone())).await?;
        let head = store_call(|| self.store.load(thread, "", config.checkpoint)).await?;
        let current_head = store_call(|| self.store.head(thread, "")).await?;
        let (parent, prev_body, step, values) = match head {
            Some(h) => (Some(h.id), h.body, h.step, h.values),
            None => (None, crate::checkpoint::CheckpointBody::default(), 0, std::collections::BTreeMap::default()),
        };
        let mut values = values.into_iter().map(|(k, v)| (k, std::sync::Arc::new(v))).collect();
        let snapshot = State::new(std::mem::take(&mut values));
        let mut values = snapshot.values().clone();
        let output = match as_node {
            Some(node) => algo::finish_task(g, node, &snapshot, update)?,
            None => algo::input_output(g, &snapshot, Update { goto: Vec::new(), ..update })?,
        };
        drop(snapshot);
        let id = lease.next_checkpoint_id();
        let writer = as_node.unwrap_or("update");
        let mut applied =
            algo::apply_step(g, std::borrow::Cow::Borrowed(&prev_body), &mut values, vec![(writer, output)], id, true)?;
        if as_node.is_none() {
            applied.body.next = prev_body.next.clone();
        }
        let checkpoint = NewCheckpoint {
            id,
            parent,
            expected_head: current_head,
            step,
            source: Source::Update,
            body: std::sync::Arc::new(applied.body),
            metadata: std::sync::Arc::new(json!({"as_node": as_node, "owner": lease.owner}).into()),
        };
        let commit = StepCommit { thread: thread.to_owned(), ns: String::new(), checkpoint, blobs: applied.blobs };
        store_call(|| self.store.commit(&lease, &commit)).await?;
        Ok(id)
    }

    /// Deletes a thread and all it stored.
    pub async fn delete_thread(&self, thread: &str) -> Result<()> {
        store_call(|| self.store.delete_thread(thread)).await
    }

    /// Keeps the newest `keep` checkpoints of a thread; returns how many were deleted.
    pub async fn prune(&self, thread: &str, keep: usize) -> Result<u64> {
        store_call(|| self.store.prune(thread, keep)).await
    }
}
