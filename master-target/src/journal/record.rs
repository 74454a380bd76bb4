//! The on-disk form of one undo record: what the replica held, before batch `seq` was applied,
//! in the ranges that batch writes.
//!
//! ```text
//! magic "LBJR" | header_len u32 LE | data_len u64 LE | header (JSON) | data | BLAKE3 (32 bytes)
//! ```
//! The hash covers everything before it, so a record cut short by a crash (or damaged later)
//! is recognised. The header lists the undo extents in order; data extents' bytes follow one
//! another in `data`, zero extents take no data.
use serde::{Deserialize, Serialize};

pub const MAGIC: &[u8; 4] = b"LBJR";
/// Magic, header length, data length.
pub const PREFIX: usize = 16;
pub const HASH: usize = 32;
/// Largest header accepted when reading (a batch has at most a few thousand extents).
pub const MAX_HEADER: usize = 16 * 1024 * 1024;

/// One range of old content.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct UndoExtent {
    pub offset: u64,
    pub len: u64,
    /// The range held zeros (no data stored).
    #[serde(default)]
    pub zero: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecordHeader {
    /// The batch this record undoes.
    pub seq: u64,
    /// Capture time of the batch's newest write.
    pub time_ms: i64,
    /// Recovery-point tags the batch carried: the points stand after this batch.
    #[serde(default)]
    pub tags: Vec<String>,
    pub extents: Vec<UndoExtent>,
}

impl RecordHeader {
    /// Bytes of data the extents need (`None` if a damaged header's lengths overflow).
    pub fn data_len(&self) -> Option<u64> {
        self.extents
            .iter()
            .filter(|e| !e.zero)
            .try_fold(0u64, |sum, e| sum.checked_add(e.len))
    }
}

/// Encodes a record; `data` holds the data extents' bytes in order. A header too large to be
/// read back is refused here rather than written.
pub fn encode(header: &RecordHeader, data: &[u8]) -> Result<Vec<u8>, String> {
    let json = serde_json::to_vec(header).expect("record header serialises");
    if json.len() > MAX_HEADER {
        return Err(format!(
            "the undo record of batch {} would have a {} byte header (limit {MAX_HEADER})",
            header.seq,
            json.len()
        ));
    }
    let mut out = Vec::with_capacity(PREFIX + json.len() + data.len() + HASH);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(data);
    let hash = blake3::hash(&out);
    out.extend_from_slice(hash.as_bytes());
    Ok(out)
}

/// The fixed prefix: header and data lengths, or why it is not a record.
pub fn parse_prefix(prefix: &[u8; PREFIX]) -> Result<(usize, u64), String> {
    if &prefix[..4] != MAGIC {
        return Err("no record magic".into());
    }
    let header_len = u32::from_le_bytes(prefix[4..8].try_into().expect("4 bytes")) as usize;
    let data_len = u64::from_le_bytes(prefix[8..16].try_into().expect("8 bytes"));
    if header_len > MAX_HEADER {
        return Err(format!("header length {header_len} is implausible"));
    }
    Ok((header_len, data_len))
}

pub fn parse_header(bytes: &[u8], data_len: u64) -> Result<RecordHeader, String> {
    let header: RecordHeader =
        serde_json::from_slice(bytes).map_err(|e| format!("unreadable header: {e}"))?;
    if header.data_len() != Some(data_len) {
        return Err(format!(
            "header lists {:?} data bytes, record holds {data_len}",
            header.data_len()
        ));
    }
    if header
        .extents
        .iter()
        .any(|e| e.len == 0 || e.offset.checked_add(e.len).is_none())
    {
        return Err("header lists an empty or overflowing extent".into());
    }
    Ok(header)
}

/// Total encoded length of a record with these lengths (saturating: a damaged length makes
/// a record longer than any file, which the reader treats as cut short).
pub fn record_len(header_len: usize, data_len: u64) -> u64 {
    ((PREFIX + header_len + HASH) as u64).saturating_add(data_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_and_parses_back() {
        let header = RecordHeader {
            seq: 7,
            time_ms: 1,
            tags: vec!["crash:1".into()],
            extents: vec![
                UndoExtent {
                    offset: 0,
                    len: 3,
                    zero: false,
                },
                UndoExtent {
                    offset: 512,
                    len: 4096,
                    zero: true,
                },
            ],
        };
        let bytes = encode(&header, b"abc").unwrap();
        let (h, d) = parse_prefix(bytes[..PREFIX].try_into().unwrap()).unwrap();
        assert_eq!(d, 3);
        assert_eq!(record_len(h, d), bytes.len() as u64);
        let back = parse_header(&bytes[PREFIX..PREFIX + h], d).unwrap();
        assert_eq!(back, header);
        let body = &bytes[..bytes.len() - HASH];
        assert_eq!(blake3::hash(body).as_bytes(), &bytes[bytes.len() - HASH..]);
    }

    #[test]
    fn refuses_garbage_prefixes() {
        assert!(parse_prefix(&[0u8; PREFIX]).is_err());
        let mut p = [0u8; PREFIX];
        p[..4].copy_from_slice(MAGIC);
        p[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_prefix(&p).is_err());
    }
}
