//! How stored payloads are encoded: MessagePack (maps with named fields). Channel values,
//! checkpoint bodies and pending writes are written on every step; MessagePack copies strings
//! as they are where JSON would scan and escape every byte, and it decodes faster too.
//! Metadata stays JSON so it can be queried in the database.

use std::cell::RefCell;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Buffers kept at most this large between encodes: a rare huge value does not pin its memory.
const SCRATCH_KEEP: usize = 64 * 1024;

thread_local! {
    /// Where payloads are encoded before being copied out at their exact size: encoding into a
    /// fresh vector grows it a dozen times for a 1 KiB value, and the kept copy would carry the
    /// spare capacity of its last doubling.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Encodes a payload for storage.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    let encoded = SCRATCH.with(|scratch| {
        // A Serialize impl that itself encodes finds the buffer taken and uses a fresh one.
        let Ok(mut buf) = scratch.try_borrow_mut() else { return rmp_serde::to_vec_named(value) };
        buf.clear();
        let written = rmp_serde::encode::write_named(&mut *buf, value).map(|()| buf.as_slice().to_vec());
        if buf.capacity() > SCRATCH_KEEP {
            *buf = Vec::new();
        }
        written
    });
    encoded.map_err(|e| Error::Encoding(e.to_string()))
}

/// Decodes a stored payload.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    rmp_serde::from_slice(bytes).map_err(|e| Error::Encoding(e.to_string()))
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    #[test]
    fn json_values_survive_a_round_trip() {
        let value = json!({"s": "x\"y\n", "n": -3, "big": u64::MAX, "f": 1.5, "l": [null, true, {"k": []}]});
        let back: Value = decode(&encode(&value).unwrap()).unwrap();
        assert_eq!(back, value);
    }

    #[test]
    fn each_encoding_is_exactly_its_own_bytes_whatever_came_before() {
        let big = json!({"blob": "x".repeat(SCRATCH_KEEP * 2)});
        for value in [json!("a".repeat(1024)), big, json!({"n": 1}), json!([])] {
            let encoded = encode(&value).unwrap();
            assert_eq!(encoded, rmp_serde::to_vec_named(&value).unwrap());
            assert_eq!(encoded.capacity(), encoded.len(), "kept at its exact size");
        }
        SCRATCH.with(|s| assert!(s.borrow().capacity() <= SCRATCH_KEEP, "a huge value's buffer is let go"));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let err = decode::<Value>(&[0xc1, 0xff]).unwrap_err();
        assert!(err.to_string().contains("encoding"), "{err}");
    }
}
