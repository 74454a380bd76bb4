//! Change batches: the unit of replication (DESIGN §6). This module owns their checksum and
//! the checks every receiver applies before a batch may change anything: a checksum that
//! matches, extents inside the disk, sane sizes. A batch failing them is refused whole.
use lifeboat_proto::v1::{ChangeBatch, Extent};

/// Largest batch (payload bytes) a sender builds and a receiver accepts.
pub const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
/// Most extents in one batch.
pub const MAX_EXTENTS: usize = 65_536;

pub const KIND_STREAM: &str = "stream";
pub const KIND_SYNC: &str = "sync";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("batch {seq} of disk {disk}: checksum mismatch (corrupted in transit or storage)")]
    Checksum { disk: String, seq: u64 },
    #[error("batch {seq} of disk {disk}: {detail}")]
    Malformed {
        disk: String,
        seq: u64,
        detail: String,
    },
}

/// CRC-64/NVME (see [`crate::crc`]) over a canonical, length-prefixed encoding of every
/// field but the checksum, big-endian.
///
/// It catches accidental corruption between the agent's read of the source and the master
/// target's write (a bug or bad memory in a process on the way). It need not resist a
/// forger: every hop is already authenticated by an AEAD (TLS on the wire, AES-GCM in the
/// process server's cache). The agent computes it and both the process server and the master
/// target verify every byte, so its speed matters.
pub fn checksum(batch: &ChangeBatch) -> [u8; 8] {
    let mut h = crate::crc::Crc64::new();
    canonical_fields(batch, |bytes| h.update(bytes));
    h.finish().to_be_bytes()
}

/// Feeds `sink` every field but the checksum, each preceded by its length (so the same bytes
/// split differently between fields never read the same).
fn canonical_fields(batch: &ChangeBatch, mut sink: impl FnMut(&[u8])) {
    let mut field = |bytes: &[u8]| {
        sink(&(bytes.len() as u64).to_be_bytes());
        sink(bytes);
    };
    field(batch.disk_id.as_bytes());
    field(&batch.seq.to_be_bytes());
    field(batch.kind.as_bytes());
    field(&batch.first_write_unix_ms.to_be_bytes());
    field(&batch.last_write_unix_ms.to_be_bytes());
    field(&(batch.tags.len() as u64).to_be_bytes());
    for tag in &batch.tags {
        field(tag.as_bytes());
    }
    field(&(batch.extents.len() as u64).to_be_bytes());
    for e in &batch.extents {
        field(&e.offset.to_be_bytes());
        field(&e.zero_length.to_be_bytes());
        field(&e.data);
    }
}

/// The checksum of releases before CRC-64: BLAKE3 over the same canonical encoding (32 bytes).
/// Still accepted, so batches a process server cached before an upgrade are forwarded and
/// applied rather than refused; nothing computes it for new batches.
fn legacy_blake3(batch: &ChangeBatch) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    canonical_fields(batch, |bytes| {
        h.update(bytes);
    });
    *h.finalize().as_bytes()
}

/// Whether the batch's checksum (current or legacy) matches its content.
fn checksum_matches(batch: &ChangeBatch) -> bool {
    match batch.checksum.len() {
        32 => batch.checksum.as_slice() == legacy_blake3(batch).as_slice(),
        _ => batch.checksum.as_slice() == checksum(batch).as_slice(),
    }
}

/// Fills in the checksum (senders call this last).
pub fn seal(batch: &mut ChangeBatch) {
    batch.checksum = checksum(batch).to_vec();
}

/// Total bytes the batch writes (data and zero-fills).
pub fn covered_bytes(batch: &ChangeBatch) -> u64 {
    batch
        .extents
        .iter()
        .map(|e| {
            if e.data.is_empty() {
                e.zero_length
            } else {
                e.data.len() as u64
            }
        })
        .sum()
}

/// Payload bytes carried (what counts against size limits and caches).
pub fn payload_bytes(batch: &ChangeBatch) -> usize {
    batch.extents.iter().map(|e| e.data.len()).sum()
}

impl BatchError {
    /// The gRPC status a receiver refuses the batch with.
    pub fn status(self) -> tonic::Status {
        match self {
            BatchError::Checksum { .. } => tonic::Status::data_loss(self.to_string()),
            BatchError::Malformed { .. } => tonic::Status::invalid_argument(self.to_string()),
        }
    }
}

/// The first of the two checks a receiver makes before a batch may change anything: the
/// checksum, which costs a pass over every byte. Receivers run it as batches arrive
/// (`group`), beside the storing of the previous group; then [`verify_fields`].
pub fn verify_checksum(batch: &ChangeBatch) -> Result<(), BatchError> {
    if checksum_matches(batch) {
        return Ok(());
    }
    Err(BatchError::Checksum {
        disk: batch.disk_id.clone(),
        seq: batch.seq,
    })
}

/// The second check, for a batch whose checksum was checked: sequence number, kind, sizes,
/// extents inside a disk of `disk_size` bytes.
pub fn verify_fields(batch: &ChangeBatch, disk_size: u64) -> Result<(), BatchError> {
    let malformed = |detail: String| BatchError::Malformed {
        disk: batch.disk_id.clone(),
        seq: batch.seq,
        detail,
    };
    if batch.seq == 0 {
        return Err(malformed("sequence numbers start at 1".into()));
    }
    if batch.kind != KIND_STREAM && batch.kind != KIND_SYNC {
        return Err(malformed(format!("unknown kind {:?}", batch.kind)));
    }
    if batch.extents.len() > MAX_EXTENTS {
        return Err(malformed(format!(
            "{} extents (at most {MAX_EXTENTS})",
            batch.extents.len()
        )));
    }
    if payload_bytes(batch) > MAX_BATCH_BYTES {
        return Err(malformed(format!(
            "{} payload bytes (at most {MAX_BATCH_BYTES})",
            payload_bytes(batch)
        )));
    }
    for e in &batch.extents {
        check_extent(e, disk_size).map_err(malformed)?;
    }
    Ok(())
}

fn check_extent(e: &Extent, disk_size: u64) -> Result<(), String> {
    let len = match (e.data.is_empty(), e.zero_length) {
        (false, 0) => e.data.len() as u64,
        (true, n) if n > 0 => n,
        (true, _) => return Err(format!("empty extent at {}", e.offset)),
        (false, _) => {
            return Err(format!(
                "extent at {} has both data and a zero length",
                e.offset
            ))
        }
    };
    match e.offset.checked_add(len) {
        Some(end) if end <= disk_size => Ok(()),
        _ => Err(format!(
            "extent {}+{len} is outside the {disk_size}-byte disk",
            e.offset
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both checks, in a receiver's order.
    fn verify(batch: &ChangeBatch, disk_size: u64) -> Result<(), BatchError> {
        verify_checksum(batch)?;
        verify_fields(batch, disk_size)
    }

    fn batch() -> ChangeBatch {
        let mut b = ChangeBatch {
            disk_id: "d-1".into(),
            seq: 7,
            kind: KIND_STREAM.into(),
            extents: vec![
                Extent {
                    offset: 0,
                    data: vec![1; 4096].into(),
                    zero_length: 0,
                },
                Extent {
                    offset: 8192,
                    data: Default::default(),
                    zero_length: 4096,
                },
            ],
            tags: vec!["crash:1".into()],
            first_write_unix_ms: 1,
            last_write_unix_ms: 2,
            checksum: vec![],
        };
        seal(&mut b);
        b
    }

    fn checksum_refused(b: &ChangeBatch) -> bool {
        matches!(verify(b, 1 << 20), Err(BatchError::Checksum { .. }))
    }

    #[test]
    fn sealed_batches_verify() {
        let b = batch();
        verify(&b, 1 << 20).unwrap();
        assert_eq!(covered_bytes(&b), 8192);
        assert_eq!(payload_bytes(&b), 4096);
    }

    #[test]
    fn any_change_breaks_the_checksum() {
        let mut b = batch();
        let mut flipped = b.extents[0].data.to_vec();
        flipped[100] ^= 1;
        b.extents[0].data = flipped.into();
        assert!(checksum_refused(&b));
        let mut b = batch();
        b.seq += 1;
        assert!(checksum_refused(&b));
        let mut b = batch();
        b.tags.clear();
        assert!(checksum_refused(&b));
    }

    #[test]
    fn the_checksum_is_eight_bytes() {
        assert_eq!(batch().checksum.len(), 8);
    }

    #[test]
    fn moving_bytes_between_fields_breaks_the_checksum() {
        // Adjacent fields with the same bytes split differently: only the length prefixes
        // tell them apart.
        let mut a = batch();
        a.tags = vec!["ab".into(), "c".into()];
        seal(&mut a);
        let mut b = batch();
        b.tags = vec!["a".into(), "bc".into()];
        seal(&mut b);
        assert_ne!(a.checksum, b.checksum);
    }

    #[test]
    fn batches_sealed_with_the_legacy_blake3_checksum_still_verify() {
        let mut b = batch();
        b.checksum = legacy_blake3(&b).to_vec();
        verify(&b, 1 << 20).unwrap();
        let mut flipped = b.extents[0].data.to_vec();
        flipped[7] ^= 1;
        b.extents[0].data = flipped.into();
        assert!(checksum_refused(&b));
    }

    #[test]
    fn extents_outside_the_disk_are_refused() {
        let b = batch();
        assert!(matches!(
            verify(&b, 10_000),
            Err(BatchError::Malformed { .. })
        ));
        let mut b = batch();
        b.extents[0].offset = u64::MAX - 10;
        seal(&mut b);
        assert!(matches!(
            verify(&b, u64::MAX),
            Err(BatchError::Malformed { .. })
        ));
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder_and_checks() {
        use prost::Message;
        // Deterministic pseudo-random inputs; the decoder is prost, the checks are ours.
        let mut state = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let valid = batch().encode_to_vec();
        for i in 0..20_000 {
            let mut bytes = if i % 2 == 0 {
                valid.clone()
            } else {
                vec![0u8; (next() % 512) as usize]
            };
            let flips = 1 + next() % 8;
            for _ in 0..flips {
                if bytes.is_empty() {
                    break;
                }
                let at = (next() as usize) % bytes.len();
                bytes[at] = next() as u8;
            }
            if let Ok(b) = ChangeBatch::decode(bytes.as_slice()) {
                let _ = verify(&b, 1 << 30);
            }
        }
    }
}
