//! Last value: the channel holds what was written; two writes in one super-step are a conflict.

use serde_json::Value;

use crate::error::{Error, Result};

pub(super) fn reduce(name: &str, mut writes: super::Writes) -> Result<Value> {
    match writes.len() {
        1 => Ok(writes.pop().unwrap_or(Value::Null)),
        n => Err(Error::channel(
            name,
            format!(
                "received {n} writes in one super-step; a last-value channel takes one (give it a reducer such as append)"
            ),
        )),
    }
}
