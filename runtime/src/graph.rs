//! Building and compiling graphs: channels, nodes, static and conditional edges, joins,
//! Command routes; checked when compiled (unknown nodes, unreachable nodes, no path to END).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use petgraph::Direction;
use petgraph::graphmap::DiGraphMap;
use petgraph::visit::{Dfs, Reversed};

use crate::channel::Channel;
use crate::checkpoint::{GraphIdentity, MemoryCheckpointer, SharedCheckpointer};
use crate::error::{Error, Result};
use crate::node::{Node, NodeError, RetryPolicy, Router};
use crate::state::{Goto, State};

/// The virtual node every run starts from.
pub const START: &str = "__start__";
/// The virtual node that ends a branch of the run.
pub const END: &str = "__end__";

/// Default largest serialized update one task may write (bytes).
pub const DEFAULT_MAX_UPDATE_BYTES: usize = 16 * 1024 * 1024;

pub(crate) struct NodeSpec {
    pub(crate) node: Arc<dyn Node>,
    pub(crate) retry: RetryPolicy,
    pub(crate) timeout: Option<Duration>,
    pub(crate) remote: bool,
    /// A compiled graph run as this node, checkpointed in its own namespace.
    pub(crate) subgraph: Option<Graph>,
}

pub(crate) struct Branch {
    pub(crate) router: Router,
    pub(crate) targets: BTreeSet<String>,
}

/// Builds a [`Graph`].
pub struct GraphBuilder {
    name: String,
    version: String,
    channels: BTreeMap<String, Channel>,
    nodes: BTreeMap<String, NodeSpec>,
    edges: BTreeSet<(String, String)>,
    joins: Vec<(BTreeSet<String>, String)>,
    branches: BTreeMap<String, Vec<Branch>>,
    routes: BTreeMap<String, BTreeSet<String>>,
    interrupt_before: BTreeSet<String>,
    interrupt_after: BTreeSet<String>,
    max_update_bytes: usize,
    problems: Vec<String>,
}

/// A compiled graph: immutable, cheap to clone, run with a checkpointer.
#[derive(Clone)]
pub struct Graph {
    pub(crate) inner: Arc<GraphInner>,
    pub(crate) store: SharedCheckpointer,
}

pub(crate) struct GraphInner {
    pub(crate) name: String,
    pub(crate) identity: GraphIdentity,
    pub(crate) channels: BTreeMap<String, Channel>,
    pub(crate) nodes: BTreeMap<String, NodeSpec>,
    /// Static edges by source (START included), join edges excluded.
    pub(crate) edges: BTreeMap<String, Vec<String>>,
    /// Join target -> the nodes it waits for.
    pub(crate) joins: BTreeMap<String, BTreeSet<String>>,
    pub(crate) branches: BTreeMap<String, Vec<Branch>>,
    pub(crate) routes: BTreeMap<String, BTreeSet<String>>,
    pub(crate) interrupt_before: BTreeSet<String>,
    pub(crate) interrupt_after: BTreeSet<String>,
    pub(crate) max_update_bytes: usize,
}

impl GraphBuilder {
    /// A new graph named `name` (recorded with every thread it runs).
    pub fn new(name: impl Into<String>) -> Self {
        GraphBuilder {
            name: name.into(),
            version: String::new(),
            channels: BTreeMap::new(),
            nodes: BTreeMap::new(),
            edges: BTreeSet::new(),
            joins: Vec::new(),
            branches: BTreeMap::new(),
            routes: BTreeMap::new(),
            interrupt_before: BTreeSet::new(),
            interrupt_after: BTreeSet::new(),
            max_update_bytes: DEFAULT_MAX_UPDATE_BYTES,
            problems: Vec::new(),
        }
    }

    /// A version string folded into the graph's identity: bump it when node code changes meaning.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Declares a state channel.
    pub fn channel(mut self, name: impl Into<String>, channel: Channel) -> Self {
        let name = name.into();
        if self.channels.insert(name.clone(), channel).is_some() {
            self.problems.push(format!("channel `{name}` is declared twice"));
        }
        self
    }

    /// Adds a node.
    pub fn node(self, name: impl Into<String>, node: impl Node) -> Self {
        let name = name.into();
        self.add_node(name, Arc::new(node), None)
    }

    /// Adds a compiled graph as a node. It reads the parent's channels of the same names,
    /// runs with its own checkpoints (a namespace of the parent's thread, under the parent's
    /// lease), and writes back what it changed; its interrupts stop the parent and resume
    /// into it where it stopped.
    pub fn subgraph(self, name: impl Into<String>, graph: Graph) -> Self {
        let placeholder: Arc<dyn Node> = Arc::new(crate::node::node_fn(|_, _| async {
            Err(NodeError::fatal("a subgraph node is run by its parent's loop, not as a worker task"))
        }));
        self.add_node(name.into(), placeholder, Some(graph))
    }

    fn add_node(mut self, name: String, node: Arc<dyn Node>, subgraph: Option<Graph>) -> Self {
        if name == START || name == END {
            self.problems.push(format!("`{name}` is reserved and cannot be a node"));
        }
        if self.nodes.contains_key(&name) {
            self.problems.push(format!("node `{name}` is added twice"));
        }
        let spec = NodeSpec { node, retry: RetryPolicy::none(), timeout: None, remote: false, subgraph };
        self.nodes.insert(name, spec);
        self
    }

    fn with_node(mut self, name: &str, what: &str, f: impl FnOnce(&mut NodeSpec)) -> Self {
        match self.nodes.get_mut(name) {
            Some(spec) => f(spec),
            None => self.problems.push(format!("{what} for unknown node `{name}` (add the node first)")),
        }
        self
    }

    /// Sets a node's retry policy.
    pub fn retry(self, node: &str, policy: RetryPolicy) -> Self {
        self.with_node(node, "retry policy", |spec| spec.retry = policy)
    }

    /// Sets a node's timeout (per attempt).
    pub fn timeout(self, node: &str, timeout: Duration) -> Self {
        self.with_node(node, "timeout", |spec| spec.timeout = Some(timeout))
    }

    /// Marks a node's tasks as run by worker processes ([`Graph::run_task`]): the step's owner
    /// waits for their writes instead of running them.
    pub fn remote(self, node: &str) -> Self {
        self.with_node(node, "remote marker", |spec| spec.remote = true)
    }

    /// A static edge: `to` runs after `from` (START and END allowed).
    pub fn edge(mut self, from: impl Into<String>, to: impl Into<String>) -> Self {
        self.edges.insert((from.into(), to.into()));
        self
    }

    /// A join: `to` runs once every node in `from` has finished.
    pub fn join<I, S>(mut self, from: I, to: impl Into<String>) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.joins.push((from.into_iter().map(Into::into).collect(), to.into()));
        self
    }

    /// A conditional edge: after `from`, `router` picks among `targets` (node names or END),
    /// or returns Send packets to them.
    pub fn conditional<I, S, F>(mut self, from: impl Into<String>, router: F, targets: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
        F: Fn(&State) -> std::result::Result<Vec<Goto>, NodeError> + Send + Sync + 'static,
    {
        let branch = Branch { router: Arc::new(router), targets: targets.into_iter().map(Into::into).collect() };
        self.branches.entry(from.into()).or_default().push(branch);
        self
    }

    /// Declares where a node may route with a Command (`Update::goto` / `Update::send`).
    pub fn routes<I, S>(mut self, node: impl Into<String>, targets: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.routes.entry(node.into()).or_default().extend(targets.into_iter().map(Into::into));
        self
    }

    /// Stops the run before these nodes run (human review); resume continues.
    pub fn interrupt_before<I: IntoIterator<Item = S>, S: Into<String>>(mut self, nodes: I) -> Self {
        self.interrupt_before.extend(nodes.into_iter().map(Into::into));
        self
    }

    /// Stops the run after these nodes ran; resume continues.
    pub fn interrupt_after<I: IntoIterator<Item = S>, S: Into<String>>(mut self, nodes: I) -> Self {
        self.interrupt_after.extend(nodes.into_iter().map(Into::into));
        self
    }

    /// Largest serialized update one task may write; a larger one fails the task.
    pub fn max_update_bytes(mut self, bytes: usize) -> Self {
        self.max_update_bytes = bytes;
        self
    }

    /// Checks the graph and freezes it.
    pub fn compile(self) -> Result<Graph> {
        if let Err(message) = self.check() {
            return Err(Error::graph(&self.name, message));
        }
        let identity = GraphIdentity { name: self.name.clone(), hash: self.structure_hash() };
        let mut edges: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (from, to) in self.edges {
            edges.entry(from).or_default().push(to);
        }
        let mut joins: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (sources, target) in self.joins {
            joins.entry(target).or_default().extend(sources);
        }
        Ok(Graph {
            inner: Arc::new(GraphInner {
                name: self.name,
                identity,
                channels: self.channels,
                nodes: self.nodes,
                edges,
                joins,
                branches: self.branches,
                routes: self.routes,
                interrupt_before: self.interrupt_before,
                interrupt_after: self.interrupt_after,
                max_update_bytes: self.max_update_bytes,
            }),
            store: Arc::new(MemoryCheckpointer::new()),
        })
    }

    /// What is wrong with the graph, if anything.
    fn check(&self) -> std::result::Result<(), String> {
        let fail = Err;
        if let Some(problem) = self.problems.first() {
            return fail(problem.clone());
        }
        if self.nodes.is_empty() {
            return fail("has no nodes".to_owned());
        }
        let is_node = |n: &str| self.nodes.contains_key(n);
        let mut flow: DiGraphMap<&str, ()> = DiGraphMap::new();
        flow.add_node(START);
        flow.add_node(END);
        for n in self.nodes.keys() {
            flow.add_node(n);
        }
        for (from, to) in &self.edges {
            if from == END {
                return fail(format!("edge `{from} -> {to}` leaves END"));
            }
            if to == START {
                return fail(format!("edge `{from} -> {to}` enters START"));
            }
            for end in [from, to] {
                if end != START && end != END && !is_node(end) {
                    return fail(format!("edge `{from} -> {to}`: unknown node `{end}`"));
                }
            }
            flow.add_edge(from, to, ());
        }
        for (sources, target) in &self.joins {
            if sources.is_empty() {
                return fail(format!("join into `{target}` waits for no node"));
            }
            for n in sources.iter().chain(std::iter::once(target)) {
                if !is_node(n) {
                    return fail(format!("join into `{target}`: unknown node `{n}`"));
                }
                flow.add_edge(n, target, ());
            }
        }
        for (from, branches) in &self.branches {
            if from != START && !is_node(from) {
                return fail(format!("conditional edge from unknown node `{from}`"));
            }
            for branch in branches {
                if branch.targets.is_empty() {
                    return fail(format!("conditional edge from `{from}` declares no targets"));
                }
                for to in &branch.targets {
                    if to != END && !is_node(to) {
                        return fail(format!("conditional edge from `{from}`: unknown target `{to}`"));
                    }
                    flow.add_edge(from, to, ());
                }
            }
        }
        for (from, targets) in &self.routes {
            if !is_node(from) {
                return fail(format!("routes of unknown node `{from}`"));
            }
            for to in targets {
                if to != END && !is_node(to) {
                    return fail(format!("node `{from}` routes to unknown node `{to}`"));
                }
                flow.add_edge(from, to, ());
            }
        }
        for n in self.interrupt_before.iter().chain(&self.interrupt_after) {
            if !is_node(n) {
                return fail(format!("interrupt set on unknown node `{n}`"));
            }
        }
        if flow.neighbors_directed(START, Direction::Outgoing).next().is_none() {
            return fail("has no entry point: add an edge from START".to_owned());
        }
        let mut reached = BTreeSet::new();
        let mut dfs = Dfs::new(&flow, START);
        while let Some(n) = dfs.next(&flow) {
            reached.insert(n);
        }
        if let Some(n) = self.nodes.keys().find(|n| !reached.contains(n.as_str())) {
            return fail(format!("node `{n}` is unreachable from START"));
        }
        let reversed = Reversed(&flow);
        let mut to_end = BTreeSet::new();
        let mut dfs = Dfs::new(reversed, END);
        while let Some(n) = dfs.next(reversed) {
            to_end.insert(n);
        }
        if let Some(n) = self.nodes.keys().find(|n| !to_end.contains(n.as_str())) {
            return fail(format!(
                "node `{n}` has no path to END (add an edge from it, or declare its Command targets with `routes`)"
            ));
        }

        Ok(())
    }

    /// Hash of everything structural: a thread made by one structure is not resumed by another.
    fn structure_hash(&self) -> String {
        let mut h = blake3::Hasher::new();
        let mut put = |s: &str| {
            h.update(s.as_bytes());
            h.update(&[0]);
        };
        put(&self.name);
        put(&self.version);
        for (name, channel) in &self.channels {
            put("channel");
            put(name);
            put(channel.kind().name());
        }
        for (name, spec) in &self.nodes {
            put("node");
            put(name);
            if let Some(child) = &spec.subgraph {
                put("subgraph");
                put(&child.inner.identity.hash);
            }
        }
        for (from, to) in &self.edges {
            put("edge");
            put(from);
            put(to);
        }
        for (sources, target) in &self.joins {
            put("join");
            put(target);
            for s in sources {
                put(s);
            }
        }
        for (from, branches) in &self.branches {
            for branch in branches {
                put("branch");
                put(from);
                for t in &branch.targets {
                    put(t);
                }
            }
        }
        for (from, targets) in &self.routes {
            put("routes");
            put(from);
            for t in targets {
                put(t);
            }
        }
        h.finalize().to_hex()[..16].to_owned()
    }
}

impl Graph {
    /// Uses `store` for checkpoints (the default is a fresh in-memory store).
    pub fn with_checkpointer(mut self, store: SharedCheckpointer) -> Self {
        self.store = store;
        self
    }

    /// The checkpoint store in use.
    pub fn checkpointer(&self) -> &SharedCheckpointer {
        &self.store
    }

    /// The graph's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The graph's identity (name and structure hash).
    pub fn identity(&self) -> &GraphIdentity {
        &self.inner.identity
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::node_fn;
    use crate::state::Update;

    fn noop() -> impl Node {
        node_fn(|_, _| async { Ok(Update::new()) })
    }

    fn compile_error(builder: GraphBuilder) -> String {
        match builder.compile() {
            Ok(_) => panic!("graph compiled but should not"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn unknown_edge_target_is_named() {
        let err = compile_error(GraphBuilder::new("g").node("a", noop()).edge(START, "a").edge("a", "b"));
        assert!(err.contains("edge `a -> b`: unknown node `b`"), "{err}");
    }

    #[test]
    fn unreachable_node_is_named() {
        let err = compile_error(
            GraphBuilder::new("g")
                .node("a", noop())
                .node("lost", noop())
                .edge(START, "a")
                .edge("a", END)
                .edge("lost", END),
        );
        assert!(err.contains("`lost` is unreachable"), "{err}");
    }

    #[test]
    fn node_without_path_to_end_is_named() {
        let err = compile_error(
            GraphBuilder::new("g").node("a", noop()).node("b", noop()).edge(START, "a").edge("a", "b").edge("a", END),
        );
        assert!(err.contains("`b` has no path to END"), "{err}");
    }

    #[test]
    fn missing_entry_point_is_reported() {
        let err = compile_error(GraphBuilder::new("g").node("a", noop()).edge("a", END));
        assert!(err.contains("no entry point"), "{err}");
    }

    #[test]
    fn identity_changes_with_structure_only() {
        let build = |extra_entry: bool| {
            let builder = GraphBuilder::new("g").node("a", noop()).node("b", noop()).edge(START, "a").edge("a", "b");
            let builder = if extra_entry { builder.edge(START, "b") } else { builder };
            builder.edge("b", END).compile().unwrap()
        };
        assert_eq!(build(false).identity(), build(false).identity());
        assert_ne!(build(false).identity(), build(true).identity());
    }
}
