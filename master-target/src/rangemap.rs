//! A map from disk byte ranges to where their content lives, used for every overlay on the
//! master target: the retention journal's undo data seen from a recovery point, a view's
//! private writes, and the batches of one group while their undo data is computed.
//!
//! Each piece says "bytes `[start, end)` of the disk are bytes `[at, at + len)` of `source`".
//! `insert` overwrites whatever was there (newest wins); `fill` only covers the gaps (oldest
//! wins), which is how undo records combine when walking forward from a recovery point.
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece<S> {
    end: u64,
    source: S,
    at: u64,
}

/// One piece of a lookup: `len` bytes at disk offset `offset`, found in `source` at `at`, or
/// in none of the map's sources (`None`: read them from underneath).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found<S> {
    pub offset: u64,
    pub len: u64,
    pub source: Option<(S, u64)>,
}

#[derive(Debug, Clone)]
pub struct RangeMap<S> {
    pieces: BTreeMap<u64, Piece<S>>,
}

impl<S> Default for RangeMap<S> {
    fn default() -> Self {
        RangeMap {
            pieces: BTreeMap::new(),
        }
    }
}

impl<S: Copy + PartialEq> RangeMap<S> {
    /// Bytes covered.
    #[cfg(test)]
    pub fn covered(&self) -> u64 {
        self.pieces.iter().map(|(s, p)| p.end - s).sum()
    }

    /// Every piece as (disk offset, length, source, position in source).
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, S, u64)> + '_ {
        self.pieces
            .iter()
            .map(|(&s, p)| (s, p.end - s, p.source, p.at))
    }

    /// Splits any piece that straddles `pos`, so `pos` starts a piece or lies in a gap.
    fn split_at(&mut self, pos: u64) {
        let Some((&start, &piece)) = self.pieces.range(..pos).next_back() else {
            return;
        };
        if piece.end <= pos {
            return;
        }
        self.pieces.insert(start, Piece { end: pos, ..piece });
        self.pieces.insert(
            pos,
            Piece {
                end: piece.end,
                source: piece.source,
                at: piece.at + (pos - start),
            },
        );
    }

    /// Maps `[offset, offset + len)` to `source` at `at`, replacing what was mapped there.
    pub fn insert(&mut self, offset: u64, len: u64, source: S, at: u64) {
        if len == 0 {
            return;
        }
        let end = offset + len;
        self.split_at(offset);
        self.split_at(end);
        let inside: Vec<u64> = self.pieces.range(offset..end).map(|(&s, _)| s).collect();
        for s in inside {
            self.pieces.remove(&s);
        }
        self.pieces.insert(offset, Piece { end, source, at });
    }

    /// Maps the parts of `[offset, offset + len)` that nothing covers yet to `source` (at the
    /// matching position from `at`); covered parts keep their mapping.
    pub fn fill(&mut self, offset: u64, len: u64, source: S, at: u64) {
        let gaps: Vec<(u64, u64)> = self
            .lookup(offset, len)
            .into_iter()
            .filter(|f| f.source.is_none())
            .map(|f| (f.offset, f.len))
            .collect();
        for (gap, gap_len) in gaps {
            self.pieces.insert(
                gap,
                Piece {
                    end: gap + gap_len,
                    source,
                    at: at + (gap - offset),
                },
            );
        }
    }

    /// `[offset, offset + len)` cut into mapped pieces and gaps, in order.
    pub fn lookup(&self, offset: u64, len: u64) -> Vec<Found<S>> {
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        // A piece starting before `offset` may reach into the range.
        let first = self
            .pieces
            .range(..offset)
            .next_back()
            .filter(|(_, p)| p.end > offset)
            .map(|(&s, p)| (s, *p));
        let rest = self.pieces.range(offset..end).map(|(&s, p)| (s, *p));
        for (start, piece) in first.into_iter().chain(rest) {
            if start > pos {
                out.push(Found {
                    offset: pos,
                    len: start - pos,
                    source: None,
                });
                pos = start;
            }
            let piece_end = piece.end.min(end);
            out.push(Found {
                offset: pos,
                len: piece_end - pos,
                source: Some((piece.source, piece.at + (pos - start))),
            });
            pos = piece_end;
        }
        if pos < end {
            out.push(Found {
                offset: pos,
                len: end - pos,
                source: None,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-per-position model: the source id (or 0 for a gap) and position in it.
    fn model(map: &RangeMap<u8>, size: u64) -> Vec<(u8, u64)> {
        let mut out = Vec::new();
        for f in map.lookup(0, size) {
            for i in 0..f.len {
                out.push(match f.source {
                    Some((s, at)) => (s, at + i),
                    None => (0, 0),
                });
            }
        }
        out
    }

    #[test]
    fn insert_overwrites_and_fill_only_covers_gaps() {
        let mut map = RangeMap::default();
        map.insert(10, 10, 1u8, 100);
        map.insert(15, 10, 2, 200);
        map.fill(0, 40, 3, 0);
        let m = model(&map, 40);
        assert_eq!(m[9], (3, 9));
        assert_eq!(m[10], (1, 100));
        assert_eq!(m[14], (1, 104));
        assert_eq!(m[15], (2, 200));
        assert_eq!(m[24], (2, 209));
        assert_eq!(m[25], (3, 25));
        assert_eq!(map.covered(), 40);
    }

    #[test]
    fn matches_a_byte_model_under_random_operations() {
        // A small deterministic generator: no dependency needed for a test this size.
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _round in 0..200 {
            let size = 64;
            let mut map = RangeMap::default();
            let mut bytes = vec![(0u8, 0u64); size as usize];
            for op in 0..30 {
                let offset = next(size);
                let len = next(size - offset) + 1;
                let source = (op % 250) as u8 + 1;
                let at = next(1000);
                let fill = next(2) == 0;
                if fill {
                    map.fill(offset, len, source, at);
                } else {
                    map.insert(offset, len, source, at);
                }
                for i in 0..len {
                    let b = &mut bytes[(offset + i) as usize];
                    if !fill || b.0 == 0 {
                        *b = (source, at + i);
                    }
                }
                assert_eq!(model(&map, size), bytes);
                let covered = bytes.iter().filter(|b| b.0 != 0).count() as u64;
                assert_eq!(map.covered(), covered);
            }
        }
    }
}
