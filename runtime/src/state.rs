//! What nodes see and return: a read-only [`State`] snapshot and the [`Update`] a node writes.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::node::NodeError;

/// Channel values as the engine holds them: shared, so a snapshot costs no copy of large values.
pub(crate) type Values = BTreeMap<String, Arc<Value>>;

/// A read-only snapshot of the graph's channels, as of the start of the super-step.
#[derive(Debug, Clone, Default)]
pub struct State {
    values: Arc<Values>,
}

impl State {
    pub(crate) fn new(values: Values) -> Self {
        State { values: Arc::new(values) }
    }

    /// A snapshot of values the engine holds: no copy of the map.
    pub(crate) fn shared(values: &Arc<Values>) -> Self {
        State { values: Arc::clone(values) }
    }

    pub(crate) fn values(&self) -> &Values {
        &self.values
    }

    /// The raw JSON value of a channel, if it has one.
    pub fn value(&self, channel: &str) -> Option<&Value> {
        self.values.get(channel).map(AsRef::as_ref)
    }

    /// A channel's value, deserialised; an error names the channel when it is missing or of another type.
    pub fn get<T: DeserializeOwned>(&self, channel: &str) -> Result<T, NodeError> {
        let value = self.value(channel).ok_or_else(|| NodeError::fatal(format!("channel `{channel}` has no value")))?;
        T::deserialize(value).map_err(|e| NodeError::fatal(format!("channel `{channel}`: {e}")))
    }

    /// A channel's value deserialised, or `default` when it has none.
    pub fn get_or<T: DeserializeOwned>(&self, channel: &str, default: T) -> Result<T, NodeError> {
        match self.value(channel) {
            None | Some(Value::Null) => Ok(default),
            Some(value) => T::deserialize(value).map_err(|e| NodeError::fatal(format!("channel `{channel}`: {e}"))),
        }
    }

    /// The whole state deserialised into a struct whose fields are channels.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, NodeError> {
        T::deserialize(self.to_json()).map_err(|e| NodeError::fatal(format!("state: {e}")))
    }

    /// The whole state as one JSON object.
    pub fn to_json(&self) -> Value {
        Value::Object(self.values.iter().map(|(k, v)| (k.clone(), Value::clone(v))).collect::<Map<_, _>>())
    }
}

/// Where a node or router sends control next.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Goto {
    /// Run this node in the next super-step (END ends this branch).
    Node {
        /// The node.
        node: String,
    },
    /// Run this node in the next super-step with its own payload (fan-out).
    Send {
        /// The node.
        node: String,
        /// Its payload, read with `Context::arg`.
        arg: Value,
    },
}

impl Goto {
    /// A node to run next.
    pub fn node(node: impl Into<String>) -> Self {
        Goto::Node { node: node.into() }
    }
    /// A Send packet: `node` runs with its own `arg`.
    pub fn send(node: impl Into<String>, arg: impl Into<Value>) -> Self {
        Goto::Send { node: node.into(), arg: arg.into() }
    }
    pub(crate) fn target(&self) -> &str {
        match self {
            Goto::Node { node } | Goto::Send { node, .. } => node,
        }
    }
}

/// What a node returns: writes to channels, and optionally where to go next (a Command).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Update {
    pub(crate) writes: Vec<(String, Value)>,
    pub(crate) goto: Vec<Goto>,
}

impl Update {
    /// No writes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes `value` to `channel` (the channel's reducer combines it).
    pub fn set(mut self, channel: impl Into<String>, value: impl Into<Value>) -> Self {
        self.writes.push((channel.into(), value.into()));
        self
    }

    /// Writes a serialisable value to `channel`.
    pub fn set_typed<T: Serialize>(self, channel: impl Into<String>, value: &T) -> Result<Self, NodeError> {
        let value =
            serde_json::to_value(value).map_err(|e| NodeError::fatal(format!("update not serializable: {e}")))?;
        Ok(self.set(channel, value))
    }

    /// One write per field of a struct (or key of a map).
    pub fn from_struct<T: Serialize>(value: &T) -> Result<Self, NodeError> {
        match serde_json::to_value(value) {
            Ok(Value::Object(map)) => Ok(Update { writes: map.into_iter().collect(), goto: Vec::new() }),
            Ok(_) => Err(NodeError::fatal("update must serialize to a JSON object of channels")),
            Err(e) => Err(NodeError::fatal(format!("update not serializable: {e}"))),
        }
    }

    /// Routes to `node` next, besides the node's edges (Command goto).
    pub fn goto(mut self, node: impl Into<String>) -> Self {
        self.goto.push(Goto::node(node));
        self
    }

    /// Sends a packet: `node` runs next with `arg` as its own input.
    pub fn send(mut self, node: impl Into<String>, arg: impl Into<Value>) -> Self {
        self.goto.push(Goto::send(node, arg));
        self
    }

    /// The writes, in order.
    pub fn writes(&self) -> &[(String, Value)] {
        &self.writes
    }
}
