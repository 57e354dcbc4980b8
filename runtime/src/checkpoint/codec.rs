//! How stored payloads are encoded: MessagePack (maps with named fields). Channel values,
//! checkpoint bodies and pending writes are written on every step; MessagePack copies strings
//! as they are where JSON would scan and escape every byte, and it decodes faster too.
//! Metadata stays JSON so it can be queried in the database.

use std::cell::RefCell;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{ChannelVersion, CheckpointBody, PendingTask};
use crate::error::{Error, Result};

/// Buffers kept at most this large between encodes: a rare huge value does not pin its memory.
const SCRATCH_KEEP: usize = 64 * 1024;

thread_local! {
    /// Where payloads are encoded before being copied out at their exact size: encoding into a
    /// fresh vector grows it a dozen times for a 1 KiB value, and the kept copy would carry the
    /// spare capacity of its last doubling.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Writes into the thread's scratch buffer and hands the bytes to `take` (which copies them out
/// at their exact size). A `Serialize` impl that itself encodes finds the buffer taken and uses
/// a fresh one.
fn with_scratch<R>(write: impl FnOnce(&mut Vec<u8>) -> Result<()>, take: impl FnOnce(&[u8]) -> R) -> Result<R> {
    SCRATCH.with(|scratch| {
        let Ok(mut buf) = scratch.try_borrow_mut() else {
            let mut own = Vec::new();
            write(&mut own)?;
            return Ok(take(&own));
        };
        buf.clear();
        let taken = write(&mut buf).map(|()| take(&buf));
        if buf.capacity() > SCRATCH_KEEP {
            *buf = Vec::new();
        }
        taken
    })
}

/// Encodes a payload for storage.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    with_scratch(|buf| encode_into(buf, value), <[u8]>::to_vec)
}

/// JSON text of a value (metadata, stored as JSON for the databases to query), written in the
/// scratch buffer and copied out at its exact size: `serde_json::to_string` grows a fresh string
/// through every doubling, about seven reallocations for a step's metadata.
pub fn json_text<T: Serialize + ?Sized>(value: &T) -> Result<String> {
    let bytes = with_scratch(|buf| serde_json::to_writer(&mut *buf, value).map_err(Error::from), <[u8]>::to_vec)?;
    // serde_json writes UTF-8 only; the check is a scan of a short ASCII text.
    String::from_utf8(bytes).map_err(|e| Error::Encoding(e.to_string()))
}

/// Encodes several payloads into one shared allocation of exactly their size: `write` appends
/// them (with [`encode_into`], [`encode_body_into`] or bytes of its own) to an empty buffer.
pub fn pack(write: impl FnOnce(&mut Vec<u8>) -> Result<()>) -> Result<std::sync::Arc<[u8]>> {
    with_scratch(write, |bytes| std::sync::Arc::from(bytes))
}

/// Appends a payload's encoding (see [`encode`]).
pub fn encode_into<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) -> Result<()> {
    rmp_serde::encode::write_named(out, value).map_err(|e| Error::Encoding(e.to_string()))
}

/// Encodes a checkpoint body: the bytes [`encode`] writes for it, written field by field. A body
/// is encoded on every step; serde's generic path (and rmp's writers, each a `Write` call with
/// its error plumbing) spent more on its few dozen tokens than the step spent applying its
/// writes.
pub fn encode_body(body: &CheckpointBody) -> Result<Vec<u8>> {
    with_scratch(|buf| encode_body_into(buf, body), <[u8]>::to_vec)
}

/// Appends a checkpoint body's encoding (see [`encode_body`]).
pub fn encode_body_into(out: &mut Vec<u8>, body: &CheckpointBody) -> Result<()> {
    let mut w = Writer(out);
    w.map(2 + usize::from(!body.barriers.is_empty()) + usize::from(!body.fresh.is_empty()));
    w.str("versions");
    w.map(body.versions.len());
    for (channel, version) in &body.versions {
        w.str(channel);
        w.version(version)?;
    }
    w.str("next");
    w.array(body.next.len());
    for task in &body.next {
        match task {
            PendingTask::Pull { node } => {
                w.map(2);
                w.str("t");
                w.str("pull");
                w.str("node");
                w.str(node);
            }
            PendingTask::Push { node, arg } => {
                w.map(3);
                w.str("t");
                w.str("push");
                w.str("node");
                w.str(node);
                w.str("arg");
                w.value(arg)?;
            }
        }
    }
    if !body.barriers.is_empty() {
        w.str("barriers");
        w.map(body.barriers.len());
        for (node, done) in &body.barriers {
            w.str(node);
            w.strs(done);
        }
    }
    if !body.fresh.is_empty() {
        w.str("fresh");
        w.strs(&body.fresh);
    }
    Ok(())
}

/// Writes MessagePack as rmp-serde does for the body's types: the smallest form of each length
/// and integer, struct fields by name, fields skipped when empty left out of the map's count.
struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn version(&mut self, version: &ChannelVersion) -> Result<()> {
        let fields = 1
            + usize::from(version.d)
            + usize::from(version.i.is_some())
            + usize::from(version.segment.is_some())
            + usize::from(version.rows != 0)
            + usize::from(version.items != 0);
        self.map(fields);
        self.str("v");
        self.uint(version.v);
        if version.d {
            self.str("d");
            self.0.push(0xc3); // true
        }
        if let Some(value) = &version.i {
            self.str("i");
            self.value(value)?;
        }
        if let Some(segment) = version.segment {
            self.str("r");
            self.uint(segment);
        }
        if version.rows != 0 {
            self.str("t");
            self.uint(u64::from(version.rows));
        }
        if version.items != 0 {
            self.str("m");
            self.uint(version.items);
        }
        Ok(())
    }

    /// A JSON value, as serde writes it (small values only: rare in a body).
    fn value(&mut self, value: &serde_json::Value) -> Result<()> {
        encode_into(self.0, value)
    }

    fn strs(&mut self, items: &[String]) {
        self.array(items.len());
        for item in items {
            self.str(item);
        }
    }

    fn map(&mut self, n: usize) {
        self.len(n, 0x80, 0xde);
    }

    fn array(&mut self, n: usize) {
        self.len(n, 0x90, 0xdc);
    }

    /// A map's or array's length: fix form below 16, then 16 and 32 bits (`wide` + 1).
    fn len(&mut self, n: usize, fix: u8, wide: u8) {
        if n < 16 {
            self.0.push(fix | n as u8);
        } else if let Ok(n) = u16::try_from(n) {
            self.0.push(wide);
            self.0.extend_from_slice(&n.to_be_bytes());
        } else {
            self.0.push(wide + 1);
            self.0.extend_from_slice(&(n as u32).to_be_bytes());
        }
    }

    fn str(&mut self, s: &str) {
        let n = s.len();
        if n < 32 {
            self.0.push(0xa0 | n as u8);
        } else if let Ok(n) = u8::try_from(n) {
            self.0.extend_from_slice(&[0xd9, n]);
        } else if let Ok(n) = u16::try_from(n) {
            self.0.push(0xda);
            self.0.extend_from_slice(&n.to_be_bytes());
        } else {
            self.0.push(0xdb);
            self.0.extend_from_slice(&(n as u32).to_be_bytes());
        }
        self.0.extend_from_slice(s.as_bytes());
    }

    fn uint(&mut self, v: u64) {
        if v < 128 {
            self.0.push(v as u8);
        } else if let Ok(v) = u8::try_from(v) {
            self.0.extend_from_slice(&[0xcc, v]);
        } else if let Ok(v) = u16::try_from(v) {
            self.0.push(0xcd);
            self.0.extend_from_slice(&v.to_be_bytes());
        } else if let Ok(v) = u32::try_from(v) {
            self.0.push(0xce);
            self.0.extend_from_slice(&v.to_be_bytes());
        } else {
            self.0.push(0xcf);
            self.0.extend_from_slice(&v.to_be_bytes());
        }
    }
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
    fn a_body_written_field_by_field_is_the_bytes_serde_writes() {
        use std::collections::BTreeMap;

        use crate::checkpoint::{ChannelVersion, CheckpointBody, PendingTask};

        let version = |v: u64| ChannelVersion { v, d: false, i: None, segment: None, rows: 0, items: 0 };
        let mut bodies = vec![CheckpointBody::default()];
        let mut full = CheckpointBody::default();
        full.versions.insert("counter".into(), ChannelVersion { i: Some(json!(7)), ..version(3) });
        full.versions.insert("neg".into(), ChannelVersion { i: Some(json!(-40)), ..version(u64::MAX) });
        full.versions.insert("s".into(), ChannelVersion { i: Some(json!("é".repeat(20))), ..version(300) });
        full.versions.insert(
            "messages".into(),
            ChannelVersion { d: true, segment: Some(70_000), rows: 31, items: 5_000_000_000, ..version(1 << 40) },
        );
        full.versions.insert("x".repeat(40), version(0));
        full.next = vec![
            PendingTask::Pull { node: "n1".into() },
            PendingTask::Push { node: "worker".into(), arg: json!({"k": [1, 2.5, null, true], "s": "v"}) },
        ];
        full.barriers = BTreeMap::from([("join".into(), vec!["a".into(), "b".into()]), ("empty".into(), vec![])]);
        full.fresh = vec!["ephemeral".into()];
        bodies.push(full.clone());
        // Every integer and string size class.
        for (i, v) in
            [0, 127, 128, 255, 256, 65_535, 65_536, u64::from(u32::MAX), 1 << 32, u64::MAX].into_iter().enumerate()
        {
            full.versions.insert(
                format!("v{i}"),
                ChannelVersion { segment: Some(v), items: v, rows: u32::try_from(v).unwrap_or(u32::MAX), ..version(v) },
            );
        }
        for n in [31, 32, 255, 256, 65_535, 65_536] {
            full.fresh.push("f".repeat(n));
        }
        bodies.push(full.clone());
        for i in 0..40u64 {
            // Lengths across MessagePack's size classes (fixmap/map16, fixstr/str8, fixarray/array16).
            full.versions.insert(format!("channel-{i}"), version(i * 1000));
            full.next.push(PendingTask::Pull { node: format!("node-{i}") });
            bodies.push(full.clone());
        }
        for body in &bodies {
            let encoded = encode_body(body).unwrap();
            assert_eq!(encoded, encode(body).unwrap(), "{body:?}");
            assert_eq!(encoded.capacity(), encoded.len(), "kept at its exact size");
            let back: CheckpointBody = decode(&encode_body(body).unwrap()).unwrap();
            assert_eq!(&back, body);
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let err = decode::<Value>(&[0xc1, 0xff]).unwrap_err();
        assert!(err.to_string().contains("encoding"), "{err}");
    }
}
