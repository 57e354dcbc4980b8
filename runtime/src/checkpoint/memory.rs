//! In-memory checkpointer for tests and ephemeral runs: the same semantics as the databases,
//! nothing survives the process. Leases are released when the [`Lease`] is dropped.
//!
//! Checkpoint bodies and metadata are kept encoded, as the databases keep them: a decoded body
//! and metadata hold maps whose nodes take kilobytes per checkpoint, and a store that keeps every
//! checkpoint spends more time having the kernel zero that memory than encoding it. A commit's
//! body, metadata and channel values share one allocation of their exact total size (one size
//! class rounding and one allocation per commit, where each payload took its own).
//!
//! The maps of a thread are what the store keeps besides the packs, and a store that keeps every
//! checkpoint pays for each byte again as fresh memory: their entries are kept small (an optional
//! id in 8 bytes, a time in microseconds), so a B-tree leaf of eleven checkpoints fits the
//! allocator's next smaller size class. A channel version a commit stores under its own
//! checkpoint's id (every step's) is framed in that commit's pack and found through the
//! checkpoint: no map of versions per channel. Only other versions (a held-back step's, written
//! by a later commit) and versions a prune keeps past their checkpoint have entries of their own.

use std::collections::BTreeMap;
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

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
    /// One per checkpoint namespace, in order of first commit: the root graph's and a few
    /// subgraphs', found by a scan.
    spaces: Vec<Space>,
}

/// A namespace's checkpoints, channel versions and pending writes, keyed by id.
struct Space {
    ns: String,
    head: u64,
    checkpoints: BTreeMap<u64, Kept>,
    /// channel -> version -> blob, for the versions not framed in the pack of the checkpoint of
    /// their id (see [`Kept`]).
    blobs: FastMap<String, BTreeMap<u64, StoredBlob>>,
    writes: BTreeMap<u64, Vec<PendingWrite>>,
}

impl ThreadRec {
    fn space(&self, ns: &str) -> Option<&Space> {
        self.spaces.iter().find(|s| same(&s.ns, ns))
    }

    fn space_mut(&mut self, ns: &str) -> Option<&mut Space> {
        self.spaces.iter_mut().find(|s| same(&s.ns, ns))
    }

    fn head(&self, ns: &str) -> Option<u64> {
        self.space(ns).map(|s| s.head)
    }
}

impl Space {
    /// Version `v` of `channel`: its base (for a delta) and its bytes.
    fn blob(&self, channel: &str, v: u64) -> Option<(Option<u64>, &[u8])> {
        if let Some(found) = self.checkpoints.get(&v).and_then(|kept| kept.framed(channel)) {
            return Some(found);
        }
        self.blobs.get(channel)?.get(&v).map(|b| (b.base.get(), b.bytes()))
    }
}

/// Whether two namespaces are the same. The root namespace is the empty string, and comparing
/// two empty strings calls `memcmp` with a length of zero on dangling pointers, which on AMD
/// processors (glibc's AVX-512 `memcmp`, a masked load of an unmapped address) takes a
/// microcode assist of hundreds of cycles: a tenth of a memory-backend step here.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && (a.is_empty() || a == b)
}

/// An optional checkpoint id in 8 bytes (an `Option<u64>` takes 16): the id plus one, with
/// `None` in the zero niche.
#[derive(Clone, Copy)]
struct OptId(Option<NonZeroU64>);

impl OptId {
    fn new(id: Option<u64>) -> Result<Self> {
        match id {
            None => Ok(OptId(None)),
            Some(id) => match id.checked_add(1).and_then(NonZeroU64::new) {
                Some(stored) => Ok(OptId(Some(stored))),
                None => Err(Error::InvalidState(format!("checkpoint id {id} is out of range"))),
            },
        }
    }

    fn get(self) -> Option<u64> {
        self.0.map(|stored| stored.get() - 1)
    }

    /// The 8 bytes it is framed with in a pack.
    fn to_bytes(self) -> [u8; 8] {
        self.0.map_or(0, NonZeroU64::get).to_le_bytes()
    }

    fn from_bytes(bytes: [u8; 8]) -> Self {
        OptId(NonZeroU64::new(u64::from_le_bytes(bytes)))
    }
}

/// A stored channel version: the version it extends (for a delta), and its bytes in the pack
/// of the commit that stored it (which a kept version keeps alive after a prune).
struct StoredBlob {
    base: OptId,
    pack: Arc<[u8]>,
    at: u32,
    len: u32,
}

impl StoredBlob {
    fn bytes(&self) -> &[u8] {
        &self.pack[self.at as usize..][..self.len as usize]
    }
}

/// A stored checkpoint: its pack starts with the encoded body, then the metadata, then the
/// commit's channel versions whose version is this checkpoint's id, each framed as
/// `[name length: u8][name][base: 8 bytes, an OptId][length: u32 LE][bytes]` (`framed_len`
/// bytes in all), then the bytes of its other versions, which [`Space::blobs`] points at.
struct Kept {
    parent: OptId,
    step: u64,
    source: Source,
    /// Microseconds since the Unix epoch (as the databases keep it).
    created_us: u64,
    pack: Arc<[u8]>,
    body_len: u32,
    metadata_len: u32,
    framed_len: u32,
}

/// Whether a commit's blob is framed in its pack: stored under the commit's own checkpoint id,
/// with a name that fits the frame's length byte.
fn is_framed(id: u64, blob: &super::ChannelBlob) -> bool {
    blob.version == id && u8::try_from(blob.channel.len()).is_ok()
}

impl Kept {
    /// Encodes a commit; returns the checkpoint and the stored form of each blob that is not
    /// framed in its pack (see [`Kept`]), with its index in `blobs`.
    fn pack(ckpt: &NewCheckpoint, blobs: &[super::ChannelBlob]) -> Result<(Self, Vec<(usize, StoredBlob)>)> {
        let (mut body_len, mut metadata_len, mut framed_len) = (0, 0, 0);
        let pack = codec::pack(|buf| {
            codec::encode_body_into(buf, &ckpt.body)?;
            body_len = buf.len();
            codec::encode_into(buf, &*ckpt.metadata)?;
            metadata_len = buf.len() - body_len;
            for blob in blobs.iter().filter(|b| is_framed(ckpt.id, b)) {
                let len = u32::try_from(blob.data.len())
                    .map_err(|_| Error::Encoding("a channel value's encoding exceeds 4 GiB".into()))?;
                buf.push(blob.channel.len() as u8);
                buf.extend_from_slice(blob.channel.as_bytes());
                buf.extend_from_slice(&OptId::new(blob.base)?.to_bytes());
                buf.extend_from_slice(&len.to_le_bytes());
                buf.extend_from_slice(&blob.data);
            }
            framed_len = buf.len() - body_len - metadata_len;
            for blob in blobs.iter().filter(|b| !is_framed(ckpt.id, b)) {
                buf.extend_from_slice(&blob.data);
            }
            Ok(())
        })?;
        if u32::try_from(pack.len()).is_err() {
            return Err(Error::Encoding("a commit's encoded payloads exceed 4 GiB".into()));
        }
        // Every offset fits in 32 bits: the whole pack does.
        let (body_len, metadata_len, framed_len) = (body_len as u32, metadata_len as u32, framed_len as u32);
        let mut next = body_len + metadata_len + framed_len;
        let mut stored = Vec::new();
        for (i, blob) in blobs.iter().enumerate().filter(|(_, b)| !is_framed(ckpt.id, b)) {
            let (at, len) = (next, blob.data.len() as u32);
            next += len;
            stored.push((i, StoredBlob { base: OptId::new(blob.base)?, pack: Arc::clone(&pack), at, len }));
        }
        let since_epoch = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let kept = Kept {
            parent: OptId::new(ckpt.parent)?,
            step: ckpt.step,
            source: ckpt.source,
            created_us: u64::try_from(since_epoch.as_micros()).unwrap_or(u64::MAX),
            pack,
            body_len,
            metadata_len,
            framed_len,
        };
        Ok((kept, stored))
    }

    /// The version of `channel` framed in this pack (see [`Kept`]): its base and its bytes.
    fn framed(&self, channel: &str) -> Option<(Option<u64>, &[u8])> {
        let start = (self.body_len + self.metadata_len) as usize;
        let mut rest = self.pack.get(start..start + self.framed_len as usize)?;
        while let Some((&name_len, tail)) = rest.split_first() {
            let (name, tail) = tail.split_at_checked(usize::from(name_len))?;
            let (base, tail) = tail.split_first_chunk::<8>()?;
            let (len, tail) = tail.split_first_chunk::<4>()?;
            let (bytes, tail) = tail.split_at_checked(u32::from_le_bytes(*len) as usize)?;
            if name == channel.as_bytes() {
                return Some((OptId::from_bytes(*base).get(), bytes));
            }
            rest = tail;
        }
        None
    }

    fn body(&self) -> Result<CheckpointBody> {
        codec::decode(&self.pack[..self.body_len as usize])
    }

    fn metadata(&self) -> Result<Value> {
        codec::decode(&self.pack[self.body_len as usize..][..self.metadata_len as usize])
    }

    fn created_at(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_micros(self.created_us)
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
            spaces: Vec::new(),
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
        let max_seq = rec.spaces.iter().filter_map(|s| s.checkpoints.keys().next_back()).max().copied().unwrap_or(0);
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
            let at = rec.spaces.iter().position(|s| same(&s.ns, &commit.ns));
            let head = at.map(|i| rec.spaces[i].head);
            if head == Some(ckpt.id) && at.is_some_and(|i| rec.spaces[i].checkpoints.contains_key(&ckpt.id)) {
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
            // Before anything changes: an encoding error stores nothing.
            let (kept, stored) = Kept::pack(ckpt, &commit.blobs)?;
            let at = at.unwrap_or_else(|| {
                // Most threads have one namespace: room for just it (a push would make room for four).
                rec.spaces.reserve_exact(1);
                rec.spaces.push(Space {
                    ns: commit.ns.clone(),
                    head: ckpt.id,
                    checkpoints: BTreeMap::new(),
                    blobs: FastMap::default(),
                    writes: BTreeMap::new(),
                });
                rec.spaces.len() - 1
            });
            let space = &mut rec.spaces[at];
            for (i, stored) in stored {
                let blob = &commit.blobs[i];
                let versions = match space.blobs.get_mut(&blob.channel) {
                    Some(versions) => versions,
                    None => space.blobs.entry(blob.channel.clone()).or_default(),
                };
                versions.insert(blob.version, stored);
            }
            space.checkpoints.insert(ckpt.id, kept);
            space.head = ckpt.id;
            if let Some(parent) = ckpt.parent {
                space.writes.remove(&parent);
            }
            Ok(())
        })?;
        outcome.ok_or_else(|| Error::NotFound(format!("thread `{}`", commit.thread)))
    }

    async fn flush(&self, _lease: &Lease) -> Result<()> {
        Ok(()) // a commit is as durable as this store gets once it returns
    }

    async fn head(&self, thread: &str, ns: &str) -> Result<Option<u64>> {
        Ok(self.with_thread(thread, |rec| Ok(rec.head(ns)))?.flatten())
    }

    async fn load(&self, thread: &str, ns: &str, id: Option<u64>) -> Result<Option<StoredCheckpoint>> {
        let found = self.with_thread(thread, |rec| {
            let Some(space) = rec.space(ns) else { return Ok(None) };
            let Some(kept) = space.checkpoints.get(&id.unwrap_or(space.head)) else { return Ok(None) };
            let body = kept.body()?;
            let values = materialize(&body, |channel, v| space.blob(channel, v).map(|(base, b)| (base, b.to_vec())))?;
            Ok(Some(StoredCheckpoint {
                id: id.unwrap_or(space.head),
                ns: ns.to_owned(),
                parent: kept.parent.get(),
                step: kept.step,
                source: kept.source,
                body,
                values,
                metadata: kept.metadata()?,
                created_at: kept.created_at(),
            }))
        })?;
        Ok(found.flatten())
    }

    async fn list(&self, thread: &str, ns: &str, filter: &ListFilter) -> Result<Vec<CheckpointMeta>> {
        let found = self.with_thread(thread, |rec| {
            let Some(space) = rec.space(ns) else { return Ok(Vec::new()) };
            space
                .checkpoints
                .iter()
                .rev()
                .filter(|(id, c)| filter.admits(**id, c.source))
                .take(filter.limit.unwrap_or(usize::MAX))
                .map(|(id, c)| {
                    Ok(CheckpointMeta {
                        id: *id,
                        ns: space.ns.clone(),
                        parent: c.parent.get(),
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
            if let Some(epoch) = step.epoch.filter(|&e| e != rec.epoch) {
                return Err(Error::LeaseLost { thread: step.thread.to_owned(), epoch });
            }
            let Some(space) = rec.space_mut(step.ns).filter(|s| s.head == step.checkpoint) else {
                return Err(stale_task(step, writes));
            };
            let stored = space.writes.entry(step.checkpoint).or_default();
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
            Ok(rec.space(step.ns).and_then(|s| s.writes.get(&step.checkpoint)).cloned().unwrap_or_default())
        })?;
        Ok(found.unwrap_or_default())
    }

    async fn delete_thread(&self, thread: &str) -> Result<()> {
        lock(&self.inner).threads.remove(thread);
        Ok(())
    }

    async fn prune(&self, thread: &str, keep: usize) -> Result<u64> {
        let deleted = self.with_thread(thread, |rec| {
            let mut deleted = 0;
            for space in &mut rec.spaces {
                let cut = space.checkpoints.len().saturating_sub(keep);
                let doomed: Vec<u64> = space.checkpoints.keys().take(cut).copied().collect();
                // The versions the kept checkpoints need, found while every pack is there.
                let mut used = std::collections::BTreeSet::new();
                let base_of = |c: &str, v: u64| space.blob(c, v).and_then(|(base, _)| base);
                for kept in space.checkpoints.values().skip(cut) {
                    used.extend(blobs_in_use([&kept.body()?], base_of));
                }
                // A needed version framed in a doomed checkpoint's pack moves out of it, into an
                // allocation of its own.
                for (channel, v) in &used {
                    let Some(kept) = doomed.binary_search(v).ok().and_then(|_| space.checkpoints.get(v)) else {
                        continue;
                    };
                    if let Some((base, bytes)) = kept.framed(channel) {
                        let blob = StoredBlob {
                            base: OptId::new(base)?,
                            pack: Arc::from(bytes),
                            at: 0,
                            len: bytes.len() as u32,
                        };
                        space.blobs.entry(channel.clone()).or_default().insert(*v, blob);
                    }
                }
                for id in &doomed {
                    space.checkpoints.remove(id);
                    space.writes.remove(id);
                }
                deleted += doomed.len() as u64;
                // A version kept past its commit's checkpoint moves out of that commit's pack,
                // which would otherwise keep the pruned body and values alive.
                let live: std::collections::HashSet<*const u8> =
                    space.checkpoints.values().map(|k| k.pack.as_ptr()).collect();
                for (channel, versions) in &mut space.blobs {
                    versions.retain(|v, _| used.contains(&(channel.clone(), *v)));
                    for blob in versions.values_mut() {
                        if !live.contains(&blob.pack.as_ptr()) && blob.pack.len() != blob.len as usize {
                            blob.pack = Arc::from(blob.bytes());
                            blob.at = 0;
                        }
                    }
                }
                space.blobs.retain(|_, versions| !versions.is_empty());
            }
            Ok(deleted)
        })?;
        Ok(deleted.unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::checkpoint::{ChannelBlob, ChannelVersion, GraphIdentity, LeaseRequest};

    /// Checkpoint `id` after `id - 1`, writing each `(channel, value)` whole.
    fn commit(id: u64, versions: &mut BTreeMap<String, ChannelVersion>, writes: &[(&str, &Value)]) -> StepCommit {
        let mut blobs = Vec::new();
        for (channel, value) in writes {
            versions.insert((*channel).to_owned(), ChannelVersion::whole(id));
            let data = codec::encode(value).unwrap();
            blobs.push(ChannelBlob { channel: (*channel).to_owned(), version: id, base: None, data });
        }
        let body = CheckpointBody { versions: versions.clone(), ..CheckpointBody::default() };
        let checkpoint = NewCheckpoint {
            id,
            parent: (id > 1).then(|| id - 1),
            expected_head: (id > 1).then(|| id - 1),
            step: id,
            source: Source::Loop,
            body: Arc::new(body),
            metadata: Arc::new(json!({}).into()),
        };
        StepCommit { thread: "t".to_owned(), ns: String::new(), checkpoint, blobs }
    }

    /// A store holding the lease of thread `t`.
    async fn leased() -> (MemoryCheckpointer, Lease) {
        let store = MemoryCheckpointer::default();
        let graph = GraphIdentity { name: "g".to_owned(), hash: "h".to_owned() };
        let request = LeaseRequest { thread: "t", owner: "me", graph: &graph, allow_graph_change: false };
        let lease = store.acquire(request).await.unwrap();
        (store, lease)
    }

    /// What a thread keeps per checkpoint and per version besides the packs: with `Option<u64>`
    /// and `SystemTime` fields a B-tree leaf of eleven took the next larger size class.
    #[test]
    fn kept_entries_stay_small() {
        assert!(std::mem::size_of::<Kept>() <= 56, "Kept: {} bytes", std::mem::size_of::<Kept>());
        assert!(std::mem::size_of::<StoredBlob>() <= 32, "StoredBlob: {} bytes", std::mem::size_of::<StoredBlob>());
    }

    #[test]
    fn optional_ids_round_trip_and_the_one_without_room_is_refused() {
        for id in [None, Some(0), Some(1), Some(u64::MAX - 1)] {
            assert_eq!(OptId::new(id).unwrap().get(), id);
        }
        let err = OptId::new(Some(u64::MAX)).err().unwrap();
        assert!(err.to_string().contains("out of range"), "{err}");
    }

    /// A commit's payloads share one allocation; a version that outlives its checkpoint in a
    /// prune gets one of its own, so the pruned body and values are freed.
    #[tokio::test]
    async fn a_version_kept_by_a_prune_lets_its_pruned_commit_go() {
        let (store, lease) = leased().await;
        let (once, big) = (json!("written once, at checkpoint 1"), json!("x".repeat(1000)));
        let mut versions = BTreeMap::new();
        store.commit(&lease, &commit(1, &mut versions, &[("once", &once), ("big", &big)])).await.unwrap();
        for id in 2..=4 {
            store.commit(&lease, &commit(id, &mut versions, &[("big", &json!(id))])).await.unwrap();
        }
        {
            let guard = lock(&store.inner);
            let space = &guard.threads["t"].spaces[0];
            let first = &space.checkpoints[&1];
            assert!(first.framed("once").is_some() && first.framed("big").is_some(), "in the commit's pack");
            assert!(first.framed("other").is_none());
            assert!(space.blobs.is_empty(), "no entries of their own");
        }

        assert_eq!(store.prune("t", 1).await.unwrap(), 3);

        {
            let guard = lock(&store.inner);
            let space = &guard.threads["t"].spaces[0];
            let kept = &space.blobs["once"][&1];
            assert_eq!(kept.pack.len(), kept.len as usize, "its own allocation, exactly its bytes");
            assert_eq!(kept.bytes(), codec::encode(&once).unwrap());
            assert!(!space.blobs.contains_key("big"), "version 1 of big is needed by no kept checkpoint");
            assert!(space.checkpoints[&4].framed("big").is_some());
        }
        let head = store.load("t", "", None).await.unwrap().unwrap();
        assert_eq!(head.values["once"], once);
        assert_eq!(head.values["big"], json!(4));
        // A second prune leaves it as it is.
        store.prune("t", 1).await.unwrap();
        assert_eq!(store.load("t", "", None).await.unwrap().unwrap().values["once"], once);
    }

    /// A version stored by a later commit than the checkpoint of its id (a held-back step's) has
    /// an entry of its own, found by a load and kept by a prune.
    #[tokio::test]
    async fn a_version_committed_under_another_checkpoint_id_is_found_and_pruned_right() {
        let (store, lease) = leased().await;
        let mut versions = BTreeMap::new();
        store.commit(&lease, &commit(1, &mut versions, &[("a", &json!("one"))])).await.unwrap();
        let mut late = commit(2, &mut versions, &[("a", &json!("two"))]);
        let kept_back = json!("held back since checkpoint 1");
        late.blobs.push(ChannelBlob {
            channel: "held".to_owned(),
            version: 1,
            base: None,
            data: codec::encode(&kept_back).unwrap(),
        });
        let mut body = (*late.checkpoint.body).clone();
        body.versions.insert("held".to_owned(), ChannelVersion::whole(1));
        late.checkpoint.body = Arc::new(body);
        store.commit(&lease, &late).await.unwrap();
        {
            let guard = lock(&store.inner);
            let space = &guard.threads["t"].spaces[0];
            assert!(space.checkpoints[&1].framed("held").is_none());
            assert!(Arc::ptr_eq(&space.blobs["held"][&1].pack, &space.checkpoints[&2].pack));
        }
        let head = store.load("t", "", None).await.unwrap().unwrap();
        assert_eq!((&head.values["a"], &head.values["held"]), (&json!("two"), &kept_back));
        assert_eq!(store.load("t", "", Some(1)).await.unwrap().unwrap().values["a"], json!("one"));
        assert_eq!(store.prune("t", 1).await.unwrap(), 1);
        let head = store.load("t", "", None).await.unwrap().unwrap();
        assert_eq!((&head.values["a"], &head.values["held"]), (&json!("two"), &kept_back));
    }
}
