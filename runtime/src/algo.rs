//! The step algorithm, free of I/O: which tasks a checkpoint schedules, how a task's update
//! is checked and routed, and how a step's writes apply, in task-path order, so the result
//! never depends on which task finished first.

use std::borrow::Cow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::channel::{ChannelKind, Reduced, Writes};
use crate::checkpoint::{ChannelBlob, ChannelVersion, CheckpointBody, INLINE_MAX, PendingTask, SEGMENT_ROWS, codec};
use crate::error::{Error, Result};
use crate::graph::{END, GraphInner, START};
use crate::state::{Goto, State, Update, Values};

/// A task's place in its step; writes apply in this order (pulls by node name, then pushes).
/// A pull's node is its task's [`Task::node`], not copied here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum TaskPath {
    Pull,
    Push(usize),
}

/// One task of a super-step.
#[derive(Debug, Clone)]
pub(crate) struct Task {
    pub(crate) id: String,
    pub(crate) path: TaskPath,
    pub(crate) node: String,
    pub(crate) arg: Option<Value>,
}

/// A finished task's effect: its channel writes and where it routes. Persisted as the task's
/// pending write, so a task that finished is never run again within its step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct TaskOutput {
    pub(crate) writes: Vec<(String, Value)>,
    pub(crate) goto: Vec<Goto>,
}

/// The deterministic id of a task: the same in every process that computes it (ids are
/// stored: with pending writes, in metadata). The first 16 bytes of the BLAKE3 hash of
/// `ns \0 checkpoint (le) pull\0 node` (or `push\0 index (le)`), in hex.
pub(crate) fn task_id(ns: &str, checkpoint: u64, path: TaskPath, node: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let index;
    let (kind, tail): (&[u8], &[u8]) = match path {
        TaskPath::Pull => (b"pull\0", node.as_bytes()),
        TaskPath::Push(i) => {
            index = (i as u64).to_le_bytes();
            (b"push\0", &index)
        }
    };
    let parts: [&[u8]; 5] = [ns.as_bytes(), &[0], &checkpoint.to_le_bytes(), kind, tail];
    // One call on one buffer: each `update` of a hasher costs about what hashing the whole
    // short input does.
    let mut buf = [0u8; 128];
    let hash = if parts.iter().map(|p| p.len()).sum::<usize>() <= buf.len() {
        let mut at = 0;
        for part in parts {
            buf[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        blake3::hash(&buf[..at])
    } else {
        let mut hasher = blake3::Hasher::new();
        for part in parts {
            hasher.update(part);
        }
        hasher.finalize()
    };
    let mut hex = [0u8; 32];
    for (pair, byte) in hex.chunks_exact_mut(2).zip(&hash.as_bytes()[..16]) {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 15)];
    }
    // ASCII digits: a valid string as they are. `collect` over chars would push them one by one
    // (a UTF-8 encoding and a capacity check each: ~650 instructions per task).
    std::str::from_utf8(&hex).map(str::to_owned).unwrap_or_default()
}

/// The tasks a checkpoint schedules, in path order.
pub(crate) fn tasks_for(ns: &str, checkpoint: u64, body: &CheckpointBody) -> Vec<Task> {
    let mut tasks: Vec<Task> = Vec::with_capacity(body.next.len());
    let mut pushes = 0usize;
    for pending in &body.next {
        let (path, node, arg) = match pending {
            PendingTask::Pull { node } => {
                // A node pulled twice runs once. A step pulls a few nodes: a scan, not a set.
                if tasks.iter().any(|t| t.path == TaskPath::Pull && t.node == *node) {
                    continue;
                }
                (TaskPath::Pull, node.clone(), None)
            }
            PendingTask::Push { node, arg } => {
                pushes += 1;
                (TaskPath::Push(pushes - 1), node.clone(), Some(arg.clone()))
            }
        };
        tasks.push(Task { id: task_id(ns, checkpoint, path, &node), path, node, arg });
    }
    tasks.sort_by(|a, b| a.path.cmp(&b.path).then_with(|| a.node.cmp(&b.node)));
    tasks
}

/// Checks a task's update and computes where it routes: Command gotos first, then static
/// edges, then conditional edges, whose routers read the state with this task's writes applied.
/// An update that does not fit fails the task, never the store.
pub(crate) fn finish_task(graph: &GraphInner, node: &str, snapshot: &State, update: Update) -> Result<TaskOutput> {
    let invalid = |message: String| Error::InvalidUpdate { node: node.to_owned(), message };
    for (channel, _) in &update.writes {
        if !graph.channels.contains_key(channel) {
            return Err(invalid(format!("writes to unknown channel `{channel}`")));
        }
    }
    let declared = graph.routes.get(node);
    for goto in &update.goto {
        let target = goto.target();
        let known = target == END || graph.nodes.contains_key(target);
        if !known || declared.is_none_or(|d| !d.contains(target)) {
            return Err(invalid(format!("routes to `{target}`, which is not among its declared routes")));
        }
    }
    let mut goto = update.goto;
    if let Some(targets) = graph.edges.get(node) {
        goto.extend(targets.iter().map(Goto::node));
    }
    if let Some(branches) = graph.branches.get(node) {
        let fresh = if update.writes.is_empty() {
            snapshot.clone()
        } else {
            with_writes(graph, node, snapshot, &update.writes)?
        };
        for branch in branches {
            let routed = (branch.router)(&fresh).map_err(|e| invalid(format!("router failed: {e}")))?;
            for g in routed {
                if !branch.targets.contains(g.target()) {
                    return Err(invalid(format!("router chose `{}`, not one of its declared targets", g.target())));
                }
                goto.push(g);
            }
        }
    }
    let output = TaskOutput { writes: update.writes, goto };
    // Serialising the update just to measure it would cost as much as storing it: only when a
    // cheap upper bound passes the limit is the exact size computed.
    let bound: usize = output.writes.iter().map(|(c, v)| c.len() + 4 + size_bound(v)).sum();
    if bound > graph.max_update_bytes {
        let size = serde_json::to_vec(&output.writes)
            .map(|v| v.len())
            .map_err(|e| invalid(format!("not serializable: {e}")))?;
        if size > graph.max_update_bytes {
            return Err(invalid(format!("update is {size} bytes, over the limit of {} bytes", graph.max_update_bytes)));
        }
    }
    Ok(output)
}

/// An upper bound of a value's serialized JSON size (a string may escape to 6 bytes a byte).
fn size_bound(value: &Value) -> usize {
    match value {
        Value::Null | Value::Bool(_) => 5,
        Value::Number(_) => 24,
        Value::String(s) => s.len() * 6 + 2,
        Value::Array(items) => 2 + items.iter().map(|v| size_bound(v) + 1).sum::<usize>(),
        Value::Object(map) => 2 + map.iter().map(|(k, v)| k.len() * 6 + 4 + size_bound(v)).sum::<usize>(),
    }
}

/// The snapshot with one task's writes applied (what its routers see).
fn with_writes(graph: &GraphInner, node: &str, snapshot: &State, writes: &[(String, Value)]) -> Result<State> {
    let mut values = snapshot.values().clone();
    for (channel, grouped) in group(writes.iter().map(|(c, v)| (c.as_str(), v.clone())).collect()) {
        let spec = &graph.channels[channel];
        let current = values.remove(channel).map(|v| Value::clone(&v));
        let reduced = spec
            .reduce(channel, current, grouped)
            .map_err(|e| Error::InvalidUpdate { node: node.to_owned(), message: e.to_string() })?;
        values.insert(channel.to_owned(), Arc::new(reduced.into_value()));
    }
    Ok(State::new(values))
}

/// The writes by channel, channels in order, each channel's writes in the order given. A sort
/// of the few writes of a step, not a map: no tree nodes to build and free on every step; a
/// channel written once (the usual case) holds its write inline.
fn group<K: Ord>(mut writes: Vec<(K, Value)>) -> Vec<(K, Writes)> {
    writes.sort_by(|a, b| a.0.cmp(&b.0)); // stable: a channel's writes keep their order
    let mut grouped: Vec<(K, Writes)> = Vec::with_capacity(writes.len());
    for (channel, value) in writes {
        match grouped.last_mut() {
            Some((last, values)) if *last == channel => values.push(value),
            _ => grouped.push((channel, smallvec::smallvec![value])),
        }
    }
    grouped
}

/// The row of version `v` of an append channel: `items`, just appended to its stored version
/// `previous` to make `value`, as a delta on `previous`; or, when this row fills the open
/// segment and `close` is set, the segment's row (see [`close_segment`]).
fn append_row(
    channel: &str,
    v: u64,
    previous: &ChannelVersion,
    value: &Value,
    items: &[Value],
    close: bool,
) -> Result<(ChannelBlob, ChannelVersion)> {
    let (start, rows, count) = match previous.segment {
        Some(start) if previous.d => (start, previous.rows, previous.items),
        _ => (previous.v, 0, 0),
    };
    let mut version = ChannelVersion::delta(v, start, rows + 1, count + items.len() as u64);
    let segment = if close { close_segment(&mut version, value)? } else { None };
    let (base, data) = match segment {
        Some(segment) => segment,
        None => (previous.v, codec::encode(items)?),
    };
    Ok((ChannelBlob { channel: channel.to_owned(), version: v, base: Some(base), data }, version))
}

/// Closes the segment a delta version fills (its [`SEGMENT_ROWS`]th row since the segment's
/// start): returns the base and bytes of the row to store instead of the delta, every item
/// appended since the segment's start (the tail of `value`, the whole list) based on that
/// start, and makes `version` the start of the next segment. `None`: the delta stays.
pub(crate) fn close_segment(version: &mut ChannelVersion, value: &Value) -> Result<Option<(u64, Vec<u8>)>> {
    let (Some(start), Value::Array(list)) = (version.segment, value) else { return Ok(None) };
    if !version.d || version.rows < SEGMENT_ROWS {
        return Ok(None);
    }
    // More items than the list holds cannot be: keep the delta, which is right in any case.
    let Some(count) = usize::try_from(version.items).ok().filter(|&n| n <= list.len()) else { return Ok(None) };
    let data = codec::encode(&list[list.len() - count..])?;
    *version = ChannelVersion::delta(version.v, version.v, 0, 0);
    Ok(Some((start, data)))
}

/// Values whose encoding is certainly within [`INLINE_MAX`] bytes, known without encoding them:
/// null, booleans, numbers (at most 9 bytes) and strings of up to 30 bytes (one header byte).
fn obviously_small(value: &Value) -> bool {
    match value {
        Value::Null | Value::Bool(_) | Value::Number(_) => true,
        Value::String(s) => s.len() < INLINE_MAX - 1,
        Value::Array(_) | Value::Object(_) => false,
    }
}

/// A step applied: the next checkpoint's body and the channel versions it stores.
#[derive(Debug)]
pub(crate) struct Applied {
    pub(crate) body: CheckpointBody,
    pub(crate) blobs: Vec<ChannelBlob>,
}

/// Applies a step's task outputs (sorted by task path) to the channel values, producing the
/// body and blobs of checkpoint `new_id`. `close_segments` is false when the blobs are held back
/// to be written later as one delta (durability exit; see [`close_segment`]). A `prev` body
/// given owned lends its version map to the new body: no copy of its keys.
pub(crate) fn apply_step(
    graph: &GraphInner,
    prev: Cow<'_, CheckpointBody>,
    values: &mut Values,
    outputs: Vec<(&str, TaskOutput)>,
    new_id: u64,
    close_segments: bool,
) -> Result<Applied> {
    let (mut body, prev_fresh): (_, Cow<'_, [String]>) = match prev {
        Cow::Owned(prev) => (
            CheckpointBody { versions: prev.versions, barriers: prev.barriers, ..Default::default() },
            Cow::Owned(prev.fresh),
        ),
        Cow::Borrowed(prev) => (
            CheckpointBody { versions: prev.versions.clone(), barriers: prev.barriers.clone(), ..Default::default() },
            Cow::Borrowed(&prev.fresh),
        ),
    };
    // The written values move into the channels: no copy of a large value. A lone task's
    // writes are the step's: its vector is taken over, not copied.
    let mut writes: Vec<(String, Value)> = Vec::new();
    let mut routes = Vec::with_capacity(outputs.len());
    for (node, output) in outputs {
        if writes.is_empty() {
            writes = output.writes;
        } else {
            writes.extend(output.writes);
        }
        routes.push((node, output.goto));
    }
    let grouped = group(writes);
    let mut blobs = Vec::with_capacity(grouped.len());
    for (name, writes) in grouped {
        let channel = name.as_str();
        let spec = graph.channels.get(channel).ok_or_else(|| Error::channel(channel, "no such channel"))?;
        // The value is taken out of its slot and the reduced one goes back in place: the map is
        // searched once, and the slot's allocation is kept (a value still shared with a
        // snapshot is copied first, as it must be to be changed).
        let mut slot = values.get_mut(channel);
        let current = slot.as_deref_mut().map(|v| std::mem::take(Arc::make_mut(v)));
        let reduced = spec.reduce(channel, current, writes)?;
        // The version this step replaces (each channel is written once here, so the slot still
        // holds the previous body's). A delta extends a stored row, never an inline value, nor a
        // delta stored before segments existed (its chain's length is unknown: the whole value
        // starts a new one).
        let version_slot = body.versions.get_mut(channel);
        let previous = version_slot.as_deref().filter(|v| v.i.is_none() && (!v.d || v.segment.is_some()));
        let (value, blob, version) = match (reduced, previous) {
            (Reduced::Appended { value, items }, Some(previous)) => {
                let (blob, version) = append_row(channel, new_id, previous, &value, &items, close_segments)?;
                (value, Some(blob), version)
            }
            (reduced, _) => {
                let value = reduced.into_value();
                let data = if obviously_small(&value) { None } else { Some(codec::encode(&value)?) };
                match data {
                    Some(data) if data.len() > INLINE_MAX => {
                        let blob = ChannelBlob { channel: channel.to_owned(), version: new_id, base: None, data };
                        (value, Some(blob), ChannelVersion::whole(new_id))
                    }
                    _ => (value.clone(), None, ChannelVersion::inline(new_id, value)),
                }
            }
        };
        match version_slot {
            Some(version_slot) => *version_slot = version,
            None => {
                body.versions.insert(channel.to_owned(), version);
            }
        }
        if spec.is_ephemeral() {
            body.fresh.push(channel.to_owned());
        }
        match slot {
            Some(slot) => *Arc::make_mut(slot) = value,
            None => {
                values.insert(name, Arc::new(value));
            }
        }
        blobs.extend(blob);
    }
    for channel in prev_fresh.iter() {
        if !body.fresh.contains(channel) {
            values.remove(channel);
            body.versions.remove(channel);
        }
    }

    // Nodes to pull next, sorted and once each (a step usually routes to one or two).
    let mut pulls = Vec::new();
    let mut pushes = Vec::new();
    for (node, goto) in routes {
        for goto in goto {
            match goto {
                Goto::Node { node: target } if target == END => {}
                Goto::Node { node: target } => pulls.push(target),
                Goto::Send { node: target, arg } => {
                    pushes.push(PendingTask::Push { node: target, arg });
                }
            }
        }
        for (target, sources) in &graph.joins {
            if sources.contains(node) {
                let arrived = body.barriers.entry(target.clone()).or_default();
                if !arrived.iter().any(|a| a == node) {
                    arrived.push(node.to_owned());
                    arrived.sort();
                }
                if sources.iter().all(|s| arrived.contains(s)) {
                    body.barriers.remove(target);
                    pulls.push(target.clone());
                }
            }
        }
    }
    pulls.sort_unstable();
    pulls.dedup();
    body.next = pulls.into_iter().map(|node| PendingTask::Pull { node }).chain(pushes).collect();
    Ok(Applied { body, blobs })
}

/// What a subgraph changed, as writes to its parent: the new items of append channels, the
/// difference of sums, and the final value of any other channel whose value changed.
pub(crate) fn subgraph_update(parent: &GraphInner, before: &State, after: &State) -> Update {
    let mut update = Update::new();
    for (channel, spec) in &parent.channels {
        let Some(new) = after.value(channel) else { continue };
        let old = before.value(channel);
        if old == Some(new) {
            continue;
        }
        match (spec.kind(), old, new) {
            (ChannelKind::Append, Some(Value::Array(old)), Value::Array(new)) if new.starts_with(old) => {
                update = update.set(channel.clone(), Value::Array(new[old.len()..].to_vec()));
            }
            (ChannelKind::Sum, Some(old), new) => {
                if let (Some(a), Some(b)) = (old.as_i64(), new.as_i64()) {
                    update = update.set(channel.clone(), b - a);
                } else if let (Some(a), Some(b)) = (old.as_f64(), new.as_f64()) {
                    update = update.set(channel.clone(), b - a);
                }
            }
            _ => update = update.set(channel.clone(), new.clone()),
        }
    }
    update
}

/// The input of a run as a step of the virtual START node.
pub(crate) fn input_output(graph: &GraphInner, snapshot: &State, input: Update) -> Result<TaskOutput> {
    finish_task(graph, START, snapshot, input).map_err(|e| match e {
        Error::InvalidUpdate { message, .. } => Error::InvalidUpdate { node: "input".to_owned(), message },
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::json;

    use super::*;
    use crate::channel::Channel;
    use crate::graph::GraphBuilder;
    use crate::node::node_fn;

    #[test]
    fn writes_group_by_channel_in_order_and_keep_their_order_within_a_channel() {
        let writes = [("b", json!(1)), ("a", json!(2)), ("b", json!(3)), ("c", json!(4)), ("a", json!(5))];
        let grouped: Vec<(&str, Vec<Value>)> =
            group(writes.into_iter().collect()).into_iter().map(|(k, v)| (k, v.into_vec())).collect();
        assert_eq!(
            grouped,
            vec![("a", vec![json!(2), json!(5)]), ("b", vec![json!(1), json!(3)]), ("c", vec![json!(4)])]
        );
        assert!(group(Vec::<(&str, Value)>::new()).is_empty());
    }

    /// A task's output that writes `v` to the `items` channel.
    fn w(v: Value) -> TaskOutput {
        TaskOutput { writes: vec![("items".into(), v)], goto: vec![] }
    }

    fn fan_graph() -> crate::graph::Graph {
        let noop = || node_fn(|_, _| async { Ok(Update::new()) });
        GraphBuilder::new("fan")
            .channel("items", Channel::append())
            .channel("n", Channel::sum())
            .channel("flag", Channel::ephemeral())
            .node("a", noop())
            .node("b", noop())
            .node("c", noop())
            .edge(START, "a")
            .edge(START, "b")
            .join(["a", "b"], "c")
            .edge("c", END)
            .compile()
            .unwrap()
    }

    #[test]
    fn writes_apply_in_task_path_order_whatever_the_finish_order() {
        let graph = fan_graph();
        let g = &graph.inner;
        let a = TaskOutput { writes: vec![("items".into(), json!("from-a"))], goto: vec![] };
        let b = TaskOutput { writes: vec![("items".into(), json!("from-b"))], goto: vec![] };
        let apply = |outputs: Vec<(&str, TaskOutput)>| {
            let mut values = Values::new();
            apply_step(g, Cow::Owned(CheckpointBody::default()), &mut values, outputs, 7, true).unwrap();
            Value::clone(&values["items"])
        };
        // The loop sorts by task path before applying; the same sorted input gives the same result.
        assert_eq!(apply(vec![("a", a), ("b", b)]), json!(["from-a", "from-b"]));
    }

    #[test]
    fn join_waits_for_every_predecessor() {
        let graph = fan_graph();
        let g = &graph.inner;
        let out = TaskOutput { writes: vec![], goto: vec![] };
        let mut values = Values::new();
        let first =
            apply_step(g, Cow::Owned(CheckpointBody::default()), &mut values, vec![("a", out.clone())], 2, true)
                .unwrap();
        assert!(first.body.next.is_empty());
        assert_eq!(first.body.barriers["c"], vec!["a".to_owned()]);
        let second = apply_step(g, Cow::Borrowed(&first.body), &mut values, vec![("b", out.clone())], 3, true).unwrap();
        assert_eq!(second.body.next, vec![PendingTask::Pull { node: "c".into() }]);
        assert!(second.body.barriers.is_empty());
    }

    #[test]
    fn a_previous_body_lent_or_shared_makes_the_same_step() {
        let graph = fan_graph();
        let g = &graph.inner;
        let steps: Vec<Vec<(&str, TaskOutput)>> = vec![
            vec![(
                "a",
                TaskOutput {
                    writes: vec![("items".into(), json!("x".repeat(INLINE_MAX))), ("flag".into(), json!(true))],
                    goto: vec![],
                },
            )],
            vec![(
                "b",
                TaskOutput { writes: vec![("items".into(), json!("y")), ("n".into(), json!(2))], goto: vec![] },
            )],
            vec![("c", TaskOutput { writes: vec![("items".into(), json!("z"))], goto: vec![] })],
        ];
        let (mut lent_values, mut shared_values) = (Values::new(), Values::new());
        let (mut lent, mut shared) = (CheckpointBody::default(), CheckpointBody::default());
        for (id, outputs) in (1..).zip(steps) {
            let a = apply_step(g, Cow::Owned(lent), &mut lent_values, outputs.clone(), id, true).unwrap();
            let b = apply_step(g, Cow::Borrowed(&shared), &mut shared_values, outputs, id, true).unwrap();
            assert_eq!(a.body, b.body, "step {id}");
            assert_eq!(a.blobs, b.blobs, "step {id}");
            assert_eq!(lent_values, shared_values, "step {id}");
            (lent, shared) = (a.body, b.body);
        }
        assert!(lent.versions["items"].d, "the last step stored a delta");
        assert!(!lent.versions.contains_key("flag"), "the ephemeral channel is gone");
    }

    #[test]
    fn append_channels_store_deltas_after_their_first_version() {
        let graph = fan_graph();
        let g = &graph.inner;
        let mut values = Values::new();
        let big = "a".repeat(INLINE_MAX);
        let first =
            apply_step(g, Cow::Owned(CheckpointBody::default()), &mut values, vec![("x", w(json!(big)))], 1, true)
                .unwrap();
        assert_eq!(first.blobs[0].base, None);
        let second =
            apply_step(g, Cow::Borrowed(&first.body), &mut values, vec![("x", w(json!("b")))], 2, true).unwrap();
        assert_eq!(second.blobs[0].base, Some(1));
        assert_eq!(codec::decode::<Value>(&second.blobs[0].data).unwrap(), json!(["b"]));
        assert!(second.body.versions["items"].d);
        assert_eq!(*values["items"], json!([big, "b"]));
    }

    #[test]
    fn append_chains_close_a_segment_every_segment_rows_rows() {
        let graph = fan_graph();
        let g = &graph.inner;
        let mut values = Values::new();
        let mut body = CheckpointBody::default();
        let mut rows = std::collections::HashMap::new();
        // The first step stores the whole list; five segments close, seven deltas stay open.
        let steps = 1 + 5 * u64::from(SEGMENT_ROWS) + 7;
        for id in 1..=steps {
            let item = json!(format!("item {id} {}", "x".repeat(INLINE_MAX)));
            let applied = apply_step(g, Cow::Borrowed(&body), &mut values, vec![("x", w(item))], id, true).unwrap();
            for blob in applied.blobs {
                rows.insert(blob.version, (blob.base, blob.data));
            }
            body = applied.body;
            // Every version rebuilds from its chain, which skips the deltas of closed segments.
            let mut read = 0;
            let rebuilt = crate::checkpoint::materialize(&body, |_, v| {
                read += 1;
                rows.get(&v).cloned()
            })
            .unwrap();
            assert_eq!(rebuilt["items"], *values["items"], "version {id}");
            let bound = 1 + id / u64::from(SEGMENT_ROWS) + u64::from(SEGMENT_ROWS);
            assert!(read <= bound, "version {id}: {read} rows read, at most {bound}");
        }
        let version = &body.versions["items"];
        assert_eq!((version.rows, version.items), (7, 7), "7 deltas since the last segment closed");
        // Each item is stored at most twice: in its delta and in its segment's row.
        let stored: usize =
            rows.values().map(|(_, data)| codec::decode::<Vec<Value>>(data).map_or(1, |l| l.len())).sum();
        assert!(stored <= 2 * steps as usize, "{stored} items stored for {steps}");
    }

    #[test]
    fn a_delta_stored_before_segments_existed_is_followed_by_the_whole_value() {
        let graph = fan_graph();
        let g = &graph.inner;
        let mut values = Values::new();
        values.insert("items".to_owned(), Arc::new(json!(["a".repeat(INLINE_MAX), "b"])));
        let legacy = ChannelVersion { segment: None, rows: 0, items: 0, ..ChannelVersion::delta(2, 1, 1, 1) };
        let body = CheckpointBody { versions: [("items".to_owned(), legacy)].into(), ..Default::default() };
        let w = TaskOutput { writes: vec![("items".into(), json!("c"))], goto: vec![] };
        let applied = apply_step(g, Cow::Borrowed(&body), &mut values, vec![("x", w)], 3, true).unwrap();
        assert_eq!(applied.blobs[0].base, None);
        assert_eq!(applied.body.versions["items"], ChannelVersion::whole(3));
        assert_eq!(codec::decode::<Value>(&applied.blobs[0].data).unwrap(), json!(["a".repeat(INLINE_MAX), "b", "c"]));
    }

    #[test]
    fn values_judged_small_without_encoding_do_encode_within_the_inline_limit() {
        let edge = "x".repeat(INLINE_MAX - 2);
        for value in [json!(null), json!(true), json!(u64::MAX), json!(i64::MIN), json!(-1.5e300), json!(edge)] {
            assert!(obviously_small(&value), "{value}");
            assert!(codec::encode(&value).unwrap().len() <= INLINE_MAX, "{value}");
        }
        assert!(!obviously_small(&json!("x".repeat(INLINE_MAX - 1))));
        assert!(!obviously_small(&json!([])));
    }

    #[test]
    fn small_values_stay_inline_and_deltas_never_extend_them() {
        let graph = fan_graph();
        let g = &graph.inner;
        let mut values = Values::new();
        let first =
            apply_step(g, Cow::Owned(CheckpointBody::default()), &mut values, vec![("x", w(json!("a")))], 1, true)
                .unwrap();
        assert!(first.blobs.is_empty());
        assert_eq!(first.body.versions["items"].i, Some(json!(["a"])));
        // Appending to an inline value stores the whole list: inline while small, then a row.
        let second =
            apply_step(g, Cow::Borrowed(&first.body), &mut values, vec![("x", w(json!("b")))], 2, true).unwrap();
        assert_eq!(second.body.versions["items"].i, Some(json!(["a", "b"])));
        let big = "c".repeat(INLINE_MAX);
        let third =
            apply_step(g, Cow::Borrowed(&second.body), &mut values, vec![("x", w(json!(big)))], 3, true).unwrap();
        assert_eq!(third.blobs[0].base, None);
        assert_eq!(third.body.versions["items"], ChannelVersion::whole(3));
        assert_eq!(codec::decode::<Value>(&third.blobs[0].data).unwrap(), json!(["a", "b", big]));
    }

    #[test]
    fn ephemeral_values_last_one_step() {
        let graph = fan_graph();
        let g = &graph.inner;
        let mut values = Values::new();
        let set = TaskOutput { writes: vec![("flag".into(), json!(true))], goto: vec![] };
        let none = TaskOutput { writes: vec![], goto: vec![] };
        let first =
            apply_step(g, Cow::Owned(CheckpointBody::default()), &mut values, vec![("x", set)], 1, true).unwrap();
        assert_eq!(*values["flag"], json!(true));
        let second = apply_step(g, Cow::Borrowed(&first.body), &mut values, vec![("x", none)], 2, true).unwrap();
        assert!(!values.contains_key("flag"));
        assert!(!second.body.versions.contains_key("flag"));
    }

    #[test]
    fn task_ids_stay_the_ids_stored_before() {
        // The ids as first computed (one hasher update per part, the hex digest cut to 32).
        let before = |ns: &str, checkpoint: u64, path: TaskPath, node: &str| {
            let mut h = blake3::Hasher::new();
            h.update(ns.as_bytes());
            h.update(&[0]);
            h.update(&checkpoint.to_le_bytes());
            match path {
                TaskPath::Pull => {
                    h.update(b"pull\0");
                    h.update(node.as_bytes());
                }
                TaskPath::Push(index) => {
                    h.update(b"push\0");
                    h.update(&(index as u64).to_le_bytes());
                }
            }
            h.finalize().to_hex()[..32].to_owned()
        };
        let long = "x".repeat(200);
        for ns in ["", "parent:child", long.as_str()] {
            for checkpoint in [0, 7, u64::MAX] {
                for (path, node) in [
                    (TaskPath::Pull, "n1"),
                    (TaskPath::Pull, long.as_str()),
                    (TaskPath::Push(0), "w"),
                    (TaskPath::Push(9), "w"),
                ] {
                    assert_eq!(task_id(ns, checkpoint, path, node), before(ns, checkpoint, path, node));
                }
            }
        }
        assert_eq!(task_id("", 5, TaskPath::Pull, "a").len(), 32);
    }

    #[test]
    fn task_ids_are_deterministic_and_distinct() {
        let body = CheckpointBody {
            next: vec![
                PendingTask::Push { node: "w".into(), arg: json!(1) },
                PendingTask::Pull { node: "b".into() },
                PendingTask::Push { node: "w".into(), arg: json!(2) },
                PendingTask::Pull { node: "a".into() },
            ],
            ..Default::default()
        };
        let tasks = tasks_for("", 5, &body);
        let paths: Vec<_> = tasks.iter().map(|t| (t.path, t.node.as_str())).collect();
        assert_eq!(
            paths,
            vec![(TaskPath::Pull, "a"), (TaskPath::Pull, "b"), (TaskPath::Push(0), "w"), (TaskPath::Push(1), "w")]
        );
        assert_eq!(tasks_for("", 5, &body)[2].id, tasks[2].id);
        assert_ne!(tasks_for("", 6, &body)[2].id, tasks[2].id);
        let ids: BTreeSet<_> = tasks.iter().map(|t| &t.id).collect();
        assert_eq!(ids.len(), 4);
    }
}
