//! How stored payloads are encoded: MessagePack (maps with named fields). Channel values,
//! checkpoint bodies and pending writes are written on every step; MessagePack copies strings
//! as they are where JSON would scan and escape every byte, and it decodes faster too.
//! Metadata stays JSON so it can be queried in the database.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Encodes a payload for storage.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    rmp_serde::to_vec_named(value).map_err(|e| Error::Encoding(e.to_string()))
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
    fn garbage_is_an_error_not_a_panic() {
        let err = decode::<Value>(&[0xc1, 0xff]).unwrap_err();
        assert!(err.to_string().contains("encoding"), "{err}");
    }
}
