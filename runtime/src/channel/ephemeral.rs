//! Ephemeral: like last value, but the engine clears it after the step that follows its write.

use serde_json::Value;

use crate::error::Result;

pub(super) fn reduce(name: &str, writes: super::Writes) -> Result<Value> {
    super::last_value::reduce(name, writes)
}
