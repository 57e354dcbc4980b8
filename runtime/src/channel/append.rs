//! Append: a list that only grows. A written list is extended item by item; any other value is pushed.
//! The reduction reports the new items so the store keeps deltas, not the whole list each step.

use serde_json::Value;

use super::Reduced;

pub(super) fn reduce(current: Option<Value>, writes: super::Writes) -> Reduced {
    let mut items = Vec::with_capacity(writes.len());
    for write in writes {
        match write {
            Value::Array(list) => items.extend(list),
            other => items.push(other),
        }
    }
    let mut value = match current {
        Some(Value::Array(list)) => list,
        Some(Value::Null) | None => Vec::new(),
        Some(other) => vec![other],
    };
    value.extend(items.iter().cloned());
    Reduced::Appended { value: Value::Array(value), items }
}
