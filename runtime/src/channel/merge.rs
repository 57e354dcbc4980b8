//! Merge: a JSON object; each write's keys replace the stored ones, in write order.

use serde_json::{Map, Value};

use crate::error::{Error, Result};

pub(super) fn reduce(name: &str, current: Option<Value>, writes: super::Writes) -> Result<Value> {
    let mut merged = match current {
        Some(Value::Object(map)) => map,
        _ => Map::new(),
    };
    for write in writes {
        match write {
            Value::Object(map) => merged.extend(map),
            other => {
                return Err(Error::channel(name, format!("merge channel takes JSON objects, got {}", kind_of(&other))));
            }
        }
    }
    Ok(Value::Object(merged))
}

pub(super) fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
