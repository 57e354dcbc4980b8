//! State channels and their reducers: how the writes of one super-step combine into a channel's value.
//!
//! One file per reducer kind. Every reducer is a pure function of the current value and the
//! step's writes (in task-path order), so applying a step is deterministic.

mod append;
mod custom;
mod ephemeral;
mod last_value;
mod merge;
mod sum;

use std::fmt;
use std::sync::Arc;

use serde_json::Value;
use smallvec::SmallVec;

use crate::error::Result;

pub use custom::{CustomReducer, from_fn as reducer_fn};

/// One channel's writes in a super-step. Most channels get one write a step: it stays inline,
/// with no allocation of its own.
pub(crate) type Writes = SmallVec<[Value; 1]>;

/// A named channel's reducer and default.
#[derive(Clone)]
pub struct Channel {
    pub(crate) kind: ChannelKind,
    pub(crate) default: Option<Value>,
}

/// The reducer of a channel.
#[derive(Clone)]
pub enum ChannelKind {
    /// Holds the last value written; two writes in one super-step are an error.
    LastValue,
    /// A list; each write appends one item (or every item of a written list).
    Append,
    /// A JSON object; each write's keys replace the stored ones (shallow merge).
    Merge,
    /// A number; writes are added.
    Sum,
    /// Holds the value written in one step for the next step only, then is cleared.
    Ephemeral,
    /// A reducer written in Rust.
    Custom(Arc<dyn CustomReducer>),
}

impl fmt::Debug for ChannelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl ChannelKind {
    /// A stable name, part of the graph's identity hash.
    pub fn name(&self) -> &str {
        match self {
            ChannelKind::LastValue => "last_value",
            ChannelKind::Append => "append",
            ChannelKind::Merge => "merge",
            ChannelKind::Sum => "sum",
            ChannelKind::Ephemeral => "ephemeral",
            ChannelKind::Custom(reducer) => reducer.name(),
        }
    }
}

/// What a reduction changed, and how to store it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Reduced {
    /// The new value; store it whole.
    Replaced(Value),
    /// The new value is the old list plus these items; store only the items.
    Appended { value: Value, items: Vec<Value> },
}

impl Reduced {
    pub(crate) fn into_value(self) -> Value {
        match self {
            Reduced::Replaced(value) | Reduced::Appended { value, .. } => value,
        }
    }
}

impl Channel {
    /// Last value (the default): one write per super-step.
    pub fn last_value() -> Self {
        Self::of(ChannelKind::LastValue)
    }
    /// Append-only list; stored as deltas, so storage grows linearly with steps.
    pub fn append() -> Self {
        Self::of(ChannelKind::Append).with_default(Value::Array(Vec::new()))
    }
    /// Shallow-merged JSON object.
    pub fn merge() -> Self {
        Self::of(ChannelKind::Merge).with_default(Value::Object(serde_json::Map::new()))
    }
    /// Sum of numbers.
    pub fn sum() -> Self {
        Self::of(ChannelKind::Sum).with_default(Value::from(0))
    }
    /// Visible to the step after the one that wrote it, then cleared.
    pub fn ephemeral() -> Self {
        Self::of(ChannelKind::Ephemeral)
    }
    /// A reducer written in Rust.
    pub fn custom(reducer: impl CustomReducer) -> Self {
        Self::of(ChannelKind::Custom(Arc::new(reducer)))
    }
    /// The value read before anything was written.
    pub fn with_default(mut self, value: Value) -> Self {
        self.default = Some(value);
        self
    }
    fn of(kind: ChannelKind) -> Self {
        Channel { kind, default: None }
    }

    /// The reducer kind.
    pub fn kind(&self) -> &ChannelKind {
        &self.kind
    }

    /// Applies one super-step's writes (already in task-path order) to the current value.
    pub(crate) fn reduce(&self, name: &str, current: Option<Value>, writes: Writes) -> Result<Reduced> {
        let current = current.or_else(|| self.default.clone());
        match &self.kind {
            ChannelKind::LastValue => last_value::reduce(name, writes).map(Reduced::Replaced),
            ChannelKind::Ephemeral => ephemeral::reduce(name, writes).map(Reduced::Replaced),
            ChannelKind::Append => Ok(append::reduce(current, writes)),
            ChannelKind::Merge => merge::reduce(name, current, writes).map(Reduced::Replaced),
            ChannelKind::Sum => sum::reduce(name, current, writes).map(Reduced::Replaced),
            ChannelKind::Custom(reducer) => {
                custom::reduce(reducer.as_ref(), name, current, writes).map(Reduced::Replaced)
            }
        }
    }

    pub(crate) fn is_ephemeral(&self) -> bool {
        matches!(self.kind, ChannelKind::Ephemeral)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use smallvec::smallvec;

    use super::*;

    #[test]
    fn last_value_refuses_two_writes_in_one_step() {
        let err = Channel::last_value().reduce("topic", None, smallvec![json!(1), json!(2)]).unwrap_err();
        assert!(err.to_string().contains("`topic`"), "{err}");
        assert!(err.to_string().contains("2 writes"), "{err}");
    }

    #[test]
    fn append_extends_lists_and_pushes_items_and_reports_only_new_items() {
        let reduced =
            Channel::append().reduce("log", Some(json!(["a"])), smallvec![json!("b"), json!(["c", "d"])]).unwrap();
        assert_eq!(
            reduced,
            Reduced::Appended { value: json!(["a", "b", "c", "d"]), items: vec![json!("b"), json!("c"), json!("d")] }
        );
    }

    #[test]
    fn merge_replaces_keys_in_write_order() {
        let value = Channel::merge()
            .reduce("m", Some(json!({"a": 1, "b": 1})), smallvec![json!({"b": 2}), json!({"b": 3, "c": 4})])
            .unwrap()
            .into_value();
        assert_eq!(value, json!({"a": 1, "b": 3, "c": 4}));
    }

    #[test]
    fn merge_refuses_non_objects() {
        assert!(Channel::merge().reduce("m", None, smallvec![json!(3)]).is_err());
    }

    #[test]
    fn sum_keeps_integers_exact_and_accepts_floats() {
        let sum = Channel::sum();
        assert_eq!(sum.reduce("n", None, smallvec![json!(2), json!(3)]).unwrap().into_value(), json!(5));
        assert_eq!(sum.reduce("n", Some(json!(1)), smallvec![json!(0.5)]).unwrap().into_value(), json!(1.5));
        assert!(sum.reduce("n", None, smallvec![json!("x")]).is_err());
    }

    #[test]
    fn custom_reducer_folds_writes() {
        let max = Channel::custom(custom::from_fn("max", |current, write| {
            let a = current.and_then(Value::as_i64).unwrap_or(i64::MIN);
            let b = write.as_i64().ok_or("not an integer")?;
            Ok(json!(a.max(b)))
        }));
        assert_eq!(max.reduce("m", Some(json!(4)), smallvec![json!(9), json!(2)]).unwrap().into_value(), json!(9));
        let err = max.reduce("m", None, smallvec![json!("x")]).unwrap_err();
        assert!(err.to_string().contains("not an integer"));
    }
}
