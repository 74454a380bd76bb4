//! Change batches for the tests of `batch_stream` and `batch_intake`.
use crate::v1::{ChangeBatch, Extent};
use prost::Message;

/// A batch with every field set, around `extents`.
pub fn batch(seq: u64, extents: Vec<Extent>) -> ChangeBatch {
    ChangeBatch {
        disk_id: "d-0123456789ab".into(),
        seq,
        extents,
        tags: vec!["crash:1".into(), "group:g".into()],
        first_write_unix_ms: 1_796_000_000_000,
        last_write_unix_ms: 1_796_000_000_123,
        kind: "stream".into(),
        checksum: vec![7; 8],
    }
}

/// An extent of `len` patterned bytes (and `zero_length` zeros after them).
pub fn extent(offset: u64, len: usize, zero_length: u64) -> Extent {
    Extent {
        offset,
        data: (0..len)
            .map(|i| (i * 31 % 251) as u8)
            .collect::<Vec<u8>>()
            .into(),
        zero_length,
    }
}

/// `batch` as one gRPC message: uncompressed flag, length, prost's encoding.
pub fn framed(batch: &ChangeBatch) -> Vec<u8> {
    let plain = batch.encode_to_vec();
    let mut out = vec![0u8];
    out.extend_from_slice(&(plain.len() as u32).to_be_bytes());
    out.extend_from_slice(&plain);
    out
}
