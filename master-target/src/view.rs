//! A recovery point seen through the journal: which ranges of the disk must be read from undo
//! records instead of the replica to see the disk as it was after batch `point_seq`.
//!
//! Undoing the records after the point newest first leaves, in each byte, the content of the
//! oldest record after the point that covers it; so the overlay is built by walking the
//! records forward and only filling gaps. When replication goes on while the view is open,
//! each new batch's record is added the same way before the batch is written, so the view
//! keeps showing the point. Building reads record headers only: the time it takes depends on
//! how many batches came after the point, not on the size of the disk.
use crate::journal::{Journal, RecordMeta};
use crate::rangemap::RangeMap;
use std::io;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Undo {
    /// Journal segment `n`; the position is the piece's.
    Journal(u64),
    Zero,
}

#[derive(Debug, Clone)]
pub struct PointOverlay {
    pub point_seq: u64,
    map: RangeMap<Undo>,
    /// Journal bytes read to build it (record headers only; never disk data).
    pub read_bytes: u64,
    /// The newest record it holds (records up to here are in the map).
    pub through_seq: u64,
}

impl PointOverlay {
    /// The overlay of the point after batch `point_seq`, from the journal's records.
    pub fn build(journal: &Journal, point_seq: u64) -> io::Result<PointOverlay> {
        let mut overlay = PointOverlay {
            point_seq,
            map: RangeMap::default(),
            read_bytes: 0,
            through_seq: point_seq,
        };
        overlay.catch_up(journal)?;
        Ok(overlay)
    }

    /// Adds the journal's records it does not hold yet (those of batches about to be
    /// applied, or any an earlier failure kept from it), in seq order.
    pub fn catch_up(&mut self, journal: &Journal) -> io::Result<()> {
        let newer: Vec<RecordMeta> = journal.records_after(self.through_seq).cloned().collect();
        for meta in &newer {
            let header = journal.header(meta)?;
            self.read_bytes += meta.header_len as u64;
            let mut pos = meta.data_pos();
            for e in header.extents {
                if e.zero {
                    self.map.fill(e.offset, e.len, Undo::Zero, 0);
                } else {
                    self.map
                        .fill(e.offset, e.len, Undo::Journal(meta.segment), pos);
                    pos += e.len;
                }
            }
        }
        Ok(())
    }

    /// Replaces, in `buf` (read from the replica at `offset`), what the point held.
    pub fn patch(&self, journal: &Journal, buf: &mut [u8], offset: u64) -> io::Result<()> {
        for piece in self.map.lookup(offset, buf.len() as u64) {
            let Some((source, at)) = piece.source else {
                continue;
            };
            let dst = &mut buf[(piece.offset - offset) as usize..][..piece.len as usize];
            match source {
                Undo::Zero => dst.fill(0),
                Undo::Journal(segment) => journal.read(segment, at, dst)?,
            }
        }
        Ok(())
    }

    /// Every range that differs from the replica, with where its content is.
    pub fn pieces(&self) -> impl Iterator<Item = (u64, u64, Undo, u64)> + '_ {
        self.map.iter()
    }
}
