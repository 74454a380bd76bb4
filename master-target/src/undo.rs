//! Undo records for a group of batches, computed before any of them touches the replica.
//!
//! The record of batch `k` must hold the disk as it was after batch `k-1`. Within a group the
//! replica file still holds the state before the group (its batches are written only once
//! their records are durable), so the old content of a range is the replica's, patched with
//! the writes of the group's earlier batches (kept in a range map over the batches' own
//! buffers). After a crash the replica may also hold some writes of batches whose records are
//! already in the journal; those batches are at the head of the resent group and are in the
//! map too, so records computed for the batches after them are still right.
use crate::journal::record::{RecordHeader, UndoExtent};
use crate::rangemap::RangeMap;
use lifeboat_proto::v1::ChangeBatch;

/// Undo extents are cut into pieces of at most this size, each stored as data or as zeros.
const PIECE: u64 = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Written {
    /// `batches[batch].extents[extent].data`
    Data {
        batch: usize,
        extent: usize,
    },
    Zero,
}

/// Records for the batches of `batches` with a seq above `journaled_through`, in order.
pub fn records(
    image: &vhd::Image,
    batches: &[ChangeBatch],
    journaled_through: u64,
) -> Result<Vec<(RecordHeader, Vec<u8>)>, vhd::Error> {
    let mut written: RangeMap<Written> = RangeMap::default();
    let mut out = Vec::new();
    for (b, batch) in batches.iter().enumerate() {
        if batch.seq > journaled_through {
            let mut header = RecordHeader {
                seq: batch.seq,
                time_ms: batch.last_write_unix_ms,
                tags: batch.tags.clone(),
                extents: Vec::new(),
            };
            let mut data = Vec::new();
            for extent in &batch.extents {
                let len = extent_len(extent);
                let mut at = extent.offset;
                let end = extent.offset + len;
                while at < end {
                    let n = (end - at).min(PIECE);
                    let zero = match read_old(image, batches, &written, at, n)? {
                        Some(old) if !vhd::is_zero(&old) => {
                            data.extend_from_slice(&old);
                            false
                        }
                        _ => true,
                    };
                    // Neighbouring pieces of one kind are one extent: a trim of a whole disk
                    // that held zeros is a single entry, not one per MiB.
                    match header.extents.last_mut() {
                        Some(last) if last.zero == zero && last.offset + last.len == at => {
                            last.len += n
                        }
                        _ => header.extents.push(UndoExtent {
                            offset: at,
                            len: n,
                            zero,
                        }),
                    }
                    at += n;
                }
            }
            out.push((header, data));
        }
        for (e, extent) in batch.extents.iter().enumerate() {
            let source = if extent.data.is_empty() {
                Written::Zero
            } else {
                Written::Data {
                    batch: b,
                    extent: e,
                }
            };
            written.insert(extent.offset, extent_len(extent), source, 0);
        }
    }
    Ok(out)
}

fn extent_len(extent: &lifeboat_proto::v1::Extent) -> u64 {
    if extent.data.is_empty() {
        extent.zero_length
    } else {
        extent.data.len() as u64
    }
}

/// The disk's content at `[offset, offset + len)` before the batch being recorded; `None`
/// when it is known to be zeros without reading (no block allocated there and no data from
/// an earlier batch of the group), as for every range an initial sync writes.
fn read_old(
    image: &vhd::Image,
    batches: &[ChangeBatch],
    written: &RangeMap<Written>,
    offset: u64,
    len: u64,
) -> Result<Option<Vec<u8>>, vhd::Error> {
    let pieces = written.lookup(offset, len);
    let earlier_data = pieces
        .iter()
        .any(|p| matches!(p.source, Some((Written::Data { .. }, _))));
    if !earlier_data && !image.may_have_data(offset, len) {
        return Ok(None);
    }
    let mut buf = vec![0u8; len as usize];
    image.read_at(&mut buf, offset)?;
    for piece in pieces {
        let Some((source, at)) = piece.source else {
            continue;
        };
        let dst = &mut buf[(piece.offset - offset) as usize..][..piece.len as usize];
        match source {
            Written::Zero => dst.fill(0),
            Written::Data { batch, extent } => {
                let data = &batches[batch].extents[extent].data;
                dst.copy_from_slice(&data[at as usize..][..piece.len as usize]);
            }
        }
    }
    Ok(Some(buf))
}
