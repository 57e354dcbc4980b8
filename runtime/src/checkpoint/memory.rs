//! In-memory checkpointer for tests and ephemeral runs: the same semantics as the databases,
//! nothing survives the process. Leases are released when the [`Lease`] is dropped.
//!
//! Checkpoint bodies and metadata are kept encoded, as the databases keep them: a decoded body
//! and metadata hold maps whose nodes take kilobytes per checkpoint, and a store that keeps every
//! checkpoint spends more time having the kernel zero that memory than encoding it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;
use serde_json::Value;

use super::{
    CheckpointMeta, Checkpointer, GraphIdentity, Lease, LeaseRequest, ListFilter, PendingWrite, PutOutcome, StepCommit,
    StepRef, StoredCheckpoint, ThreadInfo, blobs_in_use, materialize, stale_task,
};
use crate::FastMap;
use crate::checkpoint::{CheckpointBody, NewCheckpoint, Source, codec};
use crate::error::{Error, Result};

/// Keeps checkpoints in process memory.
#[derive(Clone, Default)]
pub struct MemoryCheckpointer {
    inner: Arc<Mutex<Store>>,
}

#[derive(Default)]
struct Store {
    threads: FastMap<String, ThreadRec>,
}

struct ThreadRec {
    graph: GraphIdentity,
    epoch: u64,
    owner: Option<String>,
    held: bool,
    heads: FastMap<String, u64>,
    checkpoints: BTreeMap<(String, u64), Kept>,
    /// namespace -> channel -> version -> blob
    blobs: FastMap<String, FastMap<String, BTreeMap<u64, StoredBlob>>>,
    writes: BTreeMap<(String, u64), Vec<PendingWrite>>,
}

/// A stored channel version: the version it extends (for a delta) and its bytes.
type StoredBlob = (Option<u64>, Vec<u8>);

/// A stored checkpoint, body and metadata encoded.
struct Kept {
    parent: Option<u64>,
    step: u64,
    source: Source,
    body: Vec<u8>,
    metadata: Vec<u8>,
    at: SystemTime,
}

impl Kept {
    fn new(ckpt: &NewCheckpoint) -> Result<Self> {
        Ok(Kept {
            parent: ckpt.parent,
            step: ckpt.step,
            source: ckpt.source,
            body: codec::encode(&*ckpt.body)?,
            metadata: codec::encode(&*ckpt.metadata)?,
            at: SystemTime::now(),
        })
    }

    fn body(&self) -> Result<CheckpointBody> {
        codec::decode(&self.body)
    }

    fn metadata(&self) -> Result<Value> {
        codec::decode(&self.metadata)
    }
}

struct Release {
    store: Arc<Mutex<Store>>,
    thread: String,
    epoch: u64,
}

impl Drop for Release {
    fn drop(&mut self) {
        let mut store = lock(&self.store);
        if let Some(rec) = store.threads.get_mut(&self.thread)
            && rec.epoch == self.epoch
        {
            rec.held = false;
        }
    }
}

fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    // A panic while holding the lock leaves maps that are still consistent (every mutation is a
    // single insert or remove), so a poisoned lock is safe to keep using.
    store.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl MemoryCheckpointer {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn with_thread<T>(&self, thread: &str, f: impl FnOnce(&mut ThreadRec) -> Result<T>) -> Result<Option<T>> {
        let mut store = lock(&self.inner);
        store.threads.get_mut(thread).map(f).transpose()
    }
}

#[async_trait]
impl Checkpointer for MemoryCheckpointer {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn acquire(&self, request: LeaseRequest<'_>) -> Result<Lease> {
        let mut store = lock(&self.inner);
        let rec = store.threads.entry(request.thread.to_owned()).or_insert_with(|| ThreadRec {
            graph: request.graph.clone(),
            epoch: 0,
            owner: None,
            held: false,
            heads: FastMap::default(),
            checkpoints: BTreeMap::new(),
            blobs: FastMap::default(),
            writes: BTreeMap::new(),
        });
        if rec.held {
            return Err(Error::LeaseHeld {
                thread: request.thread.to_owned(),
                owner: rec.owner.clone().unwrap_or_default(),
                until: "held until its runner drops it".to_owned(),
            });
        }
        if rec.graph != *request.graph {
            if !request.allow_graph_change {
                return Err(Error::GraphMismatch {
                    thread: request.thread.to_owned(),
                    stored: rec.graph.to_string(),
                    requested: request.graph.to_string(),
                });
            }
            rec.graph = request.graph.clone();
        }
        rec.epoch += 1;
        rec.held = true;
        rec.owner = Some(request.owner.to_owned());
        let max_seq = rec.checkpoints.keys().map(|(_, id)| *id).max().unwrap_or(0);
        let guard = Release { store: Arc::clone(&self.inner), thread: request.thread.to_owned(), epoch: rec.epoch };
        Ok(Lease::new(request.thread, request.owner, rec.epoch, max_seq, Some(Box::new(guard))))
    }

    async fn thread(&self, thread: &str) -> Result<Option<ThreadInfo>> {
        self.with_thread(thread, |rec| {
            Ok(ThreadInfo {
                thread: thread.to_owned(),
                graph: rec.graph.clone(),
                epoch: rec.epoch,
                owner: rec.owner.clone(),
            })
        })
    }

    async fn commit(&self, lease: &Lease, commit: &StepCommit) -> Result<()> {
        let outcome = self.with_thread(&commit.thread, |rec| {
            if rec.epoch != lease.epoch {
                return Err(Error::LeaseLost { thread: commit.thread.clone(), epoch: lease.epoch });
            }
            let ckpt = &commit.checkpoint;
            let key = (commit.ns.clone(), ckpt.id);
            let head = rec.heads.get(&commit.ns).copied();
            if rec.checkpoints.contains_key(&key) && head == Some(ckpt.id) {
                return Ok(()); // a retry of a commit that went through
            }
            if head != ckpt.expected_head {
                return Err(Error::HeadMoved {
                    thread: commit.thread.clone(),
                    ns: commit.ns.clone(),
                    expected: ckpt.expected_head,
                    found: head,
                });
            }
            let kept = Kept::new(ckpt)?; // before anything changes: an encoding error stores nothing
            for blob in &commit.blobs {
                let ns = match rec.blobs.get_mut(&commit.ns) {
                    Some(ns) => ns,
                    None => rec.blobs.entry(commit.ns.clone()).or_default(),
                };
                let versions = match ns.get_mut(&blob.channel) {
                    Some(versions) => versions,
                    None => ns.entry(blob.channel.clone()).or_default(),
                };
                versions.insert(blob.version, (blob.base, blob.data.clone()));
            }
            rec.checkpoints.insert(key, kept);
            rec.heads.insert(commit.ns.clone(), ckpt.id);
            if let Some(parent) = ckpt.parent {
                rec.writes.remove(&(commit.ns.clone(), parent));
            }
            Ok(())
        })?;
        outcome.ok_or_else(|| Error::NotFound(format!("thread `{}`", commit.thread)))
    }

    async fn head(&self, thread: &str, ns: &str) -> Result<Option<u64>> {
        Ok(self.with_thread(thread, |rec| Ok(rec.heads.get(ns).copied()))?.flatten())
    }

    async fn load(&self, thread: &str, ns: &str, id: Option<u64>) -> Result<Option<StoredCheckpoint>> {
        let found = self.with_thread(thread, |rec| {
            let Some(id) = id.or_else(|| rec.heads.get(ns).copied()) else { return Ok(None) };
            let Some(kept) = rec.checkpoints.get(&(ns.to_owned(), id)) else { return Ok(None) };
            let blobs = rec.blobs.get(ns);
            let body = kept.body()?;
            let values = materialize(&body, |channel, v| blobs?.get(channel)?.get(&v).cloned())?;
            Ok(Some(StoredCheckpoint {
                id,
                ns: ns.to_owned(),
                parent: kept.parent,
                step: kept.step,
                source: kept.source,
                body,
                values,
                metadata: kept.metadata()?,
                created_at: kept.at,
            }))
        })?;
        Ok(found.flatten())
    }

    async fn list(&self, thread: &str, ns: &str, filter: &ListFilter) -> Result<Vec<CheckpointMeta>> {
        let found = self.with_thread(thread, |rec| {
            rec.checkpoints
                .iter()
                .rev()
                .filter(|((n, id), c)| n == ns && filter.admits(*id, c.source))
                .take(filter.limit.unwrap_or(usize::MAX))
                .map(|((n, id), c)| {
                    Ok(CheckpointMeta {
                        id: *id,
                        ns: n.clone(),
                        parent: c.parent,
                        step: c.step,
                        source: c.source,
                        metadata: c.metadata()?,
                    })
                })
                .collect()
        })?;
        Ok(found.unwrap_or_default())
    }

    async fn put_writes(&self, step: StepRef<'_>, writes: &[PendingWrite]) -> Result<PutOutcome> {
        let outcome = self.with_thread(step.thread, |rec| {
            if rec.heads.get(step.ns) != Some(&step.checkpoint) {
                return Err(stale_task(step, writes));
            }
            let stored = rec.writes.entry((step.ns.to_owned(), step.checkpoint)).or_default();
            let mut outcome = PutOutcome::Accepted;
            for write in writes {
                if stored.iter().any(|w| w.task == write.task && w.kind == write.kind && w.key == write.key) {
                    outcome = PutOutcome::Duplicate;
                } else {
                    stored.push(write.clone());
                }
            }
            Ok(outcome)
        })?;
        outcome.ok_or_else(|| stale_task(step, writes))
    }

    async fn pending_writes(&self, step: StepRef<'_>) -> Result<Vec<PendingWrite>> {
        let found = self.with_thread(step.thread, |rec| {
            Ok(rec.writes.get(&(step.ns.to_owned(), step.checkpoint)).cloned().unwrap_or_default())
        })?;
        Ok(found.unwrap_or_default())
    }

    async fn delete_thread(&self, thread: &str) -> Result<()> {
        lock(&self.inner).threads.remove(thread);
        Ok(())
    }

    async fn prune(&self, thread: &str, keep: usize) -> Result<u64> {
        let deleted = self.with_thread(thread, |rec| {
            let mut by_ns: BTreeMap<String, Vec<u64>> = BTreeMap::new();
            for (ns, id) in rec.checkpoints.keys() {
                by_ns.entry(ns.clone()).or_default().push(*id);
            }
            let mut doomed = Vec::new();
            for (ns, mut ids) in by_ns {
                ids.sort_unstable();
                let cut = ids.len().saturating_sub(keep);
                doomed.extend(ids[..cut].iter().map(|id| (ns.clone(), *id)));
            }
            for key in &doomed {
                rec.checkpoints.remove(key);
                rec.writes.remove(key);
            }
            let mut used = std::collections::BTreeSet::new();
            for ((ns, _), kept) in &rec.checkpoints {
                let blobs = rec.blobs.get(ns);
                let base_of = |c: &str, v: u64| blobs?.get(c)?.get(&v).and_then(|b| b.0);
                for (channel, v) in blobs_in_use([&kept.body()?], base_of) {
                    used.insert((ns.clone(), channel, v));
                }
            }
            for (ns, channels) in &mut rec.blobs {
                for (channel, versions) in channels.iter_mut() {
                    versions.retain(|v, _| used.contains(&(ns.clone(), channel.clone(), *v)));
                }
            }
            Ok(doomed.len() as u64)
        })?;
        Ok(deleted.unwrap_or(0))
    }
}
