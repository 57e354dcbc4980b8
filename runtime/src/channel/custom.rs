//! Custom reducers written in Rust: a fold over the step's writes.

use serde_json::Value;

use crate::error::{Error, Result};

/// A reducer written in Rust: folds each write into the current value.
pub trait CustomReducer: Send + Sync + 'static {
    /// A stable name; part of the graph's identity.
    fn name(&self) -> &str;
    /// Combines one write with the current value (`None` before the first write and without default).
    fn reduce(&self, current: Option<&Value>, write: Value) -> Result<Value, String>;
}

struct FnReducer<F> {
    name: String,
    f: F,
}

impl<F> CustomReducer for FnReducer<F>
where
    F: Fn(Option<&Value>, Value) -> Result<Value, String> + Send + Sync + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }
    fn reduce(&self, current: Option<&Value>, write: Value) -> Result<Value, String> {
        (self.f)(current, write)
    }
}

/// A custom reducer from a closure.
pub fn from_fn<F>(name: &str, f: F) -> impl CustomReducer
where
    F: Fn(Option<&Value>, Value) -> Result<Value, String> + Send + Sync + 'static,
{
    FnReducer { name: name.to_owned(), f }
}

pub(super) fn reduce(
    reducer: &dyn CustomReducer,
    name: &str,
    current: Option<Value>,
    writes: super::Writes,
) -> Result<Value> {
    let mut value = current;
    for write in writes {
        value = Some(reducer.reduce(value.as_ref(), write).map_err(|message| Error::channel(name, message))?);
    }
    Ok(value.unwrap_or(Value::Null))
}
