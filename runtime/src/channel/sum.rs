//! Sum: numbers added together; integers stay exact while every operand is an integer.

use serde_json::Value;

use super::merge::kind_of;
use crate::error::{Error, Result};

pub(super) fn reduce(name: &str, current: Option<Value>, writes: super::Writes) -> Result<Value> {
    let mut total = current.unwrap_or(Value::from(0));
    for write in writes {
        total = add(&total, &write)
            .ok_or_else(|| Error::channel(name, format!("sum channel takes numbers, got {}", kind_of(&write))))?;
    }
    Ok(total)
}

fn add(a: &Value, b: &Value) -> Option<Value> {
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64())
        && let Some(sum) = x.checked_add(y)
    {
        return Some(Value::from(sum));
    }
    let sum = a.as_f64()? + b.as_f64()?;
    serde_json::Number::from_f64(sum).map(Value::Number)
}
