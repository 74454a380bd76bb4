//! Validation of a sparse image's file layout on open.
//!
//! A hostile or damaged file can point the BAT or a block anywhere. Before any block is read or
//! written, this module checks that the footer copy, dynamic header, BAT, parent locator data
//! and every allocated block lie inside the file and that no two of them overlap, and it
//! computes where the next block may be appended. A block that starts inside the file but ends
//! past it means the file was cut short ([`Error::Truncated`]); one that starts past the end is
//! a bad pointer ([`Error::BlockOutsideFile`]).

use std::fmt;

use crate::bat::Bat;
use crate::error::{Error, Result};
use crate::wire::round_up_sector;
use crate::FOOTER_SIZE;

/// What occupies a region of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    FooterCopy,
    Header,
    Bat,
    Locator(usize),
    Block(u64),
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::FooterCopy => f.write_str("footer copy"),
            Kind::Header => f.write_str("dynamic header"),
            Kind::Bat => f.write_str("block allocation table"),
            Kind::Locator(i) => write!(f, "parent locator {i} data"),
            Kind::Block(b) => write!(f, "block {b}"),
        }
    }
}

/// A byte range of the file and what it holds.
#[derive(Debug, Clone, Copy)]
struct Region {
    start: u64,
    end: u64,
    kind: Kind,
}

impl Region {
    fn describe(&self) -> String {
        format!("{} ({}..{})", self.kind, self.start, self.end)
    }
}

/// The metadata regions of a sparse image, as the footer and dynamic header declare them.
pub(crate) struct Metadata {
    /// Offset of the dynamic header.
    pub header_offset: u64,
    /// Offset of the BAT.
    pub bat_offset: u64,
    /// Bytes the BAT occupies: all `max_table_entries`, padded to a sector.
    pub bat_bytes: u64,
    /// `(locator index, data offset, data length)` of the parent locators in use.
    pub locators: Vec<(usize, u64, u64)>,
}

/// Checks that `start..start + len` (named `kind`) ends within `limit`.
pub(crate) fn check_in_file(kind: Kind, start: u64, len: u64, limit: u64) -> Result<()> {
    match start.checked_add(len) {
        Some(end) if end <= limit => Ok(()),
        end => Err(Error::RegionOutsideFile {
            region: kind.to_string(),
            offset: start,
            end: end.unwrap_or(u64::MAX),
            file_len: limit,
        }),
    }
}

/// Validates the layout and returns the offset where the next block can be appended (the end
/// of the last region, rounded up to a sector).
///
/// `limit` is the end of the space regions may use: the file length, less the end footer when
/// that footer is valid. `span` is bitmap size plus block size.
pub(crate) fn check(meta: &Metadata, bat: &Bat, span: u64, limit: u64) -> Result<u64> {
    let mut regions = Vec::with_capacity(3 + meta.locators.len() + bat.len());
    let mut push_meta = |kind: Kind, start: u64, len: u64| -> Result<()> {
        check_in_file(kind, start, len, limit)?;
        regions.push(Region {
            start,
            end: start + len,
            kind,
        });
        Ok(())
    };
    push_meta(Kind::FooterCopy, 0, FOOTER_SIZE)?;
    push_meta(
        Kind::Header,
        meta.header_offset,
        crate::dynamic_header::HEADER_SIZE,
    )?;
    push_meta(Kind::Bat, meta.bat_offset, meta.bat_bytes)?;
    for &(i, offset, len) in &meta.locators {
        push_meta(Kind::Locator(i), offset, round_up_sector(len).max(1))?;
    }
    for (block, start) in bat.allocated() {
        // start is a sector number × 512 ≤ 2^41, span ≤ 2^29: no overflow.
        let end = start + span;
        if start >= limit {
            return Err(Error::BlockOutsideFile {
                block,
                offset: start,
                file_len: limit,
            });
        }
        if end > limit {
            return Err(Error::Truncated {
                block,
                needed: end,
                file_len: limit,
            });
        }
        regions.push(Region {
            start,
            end,
            kind: Kind::Block(block),
        });
    }
    regions.sort_unstable_by_key(|r| (r.start, r.end));
    let mut furthest: Option<Region> = None;
    for r in &regions {
        if let Some(prev) = furthest {
            if r.start < prev.end {
                return Err(Error::Overlap {
                    first: prev.describe(),
                    second: r.describe(),
                });
            }
        }
        if furthest.is_none_or(|p| r.end > p.end) {
            furthest = Some(*r);
        }
    }
    Ok(round_up_sector(furthest.map_or(0, |r| r.end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Metadata {
        Metadata {
            header_offset: 512,
            bat_offset: 1536,
            bat_bytes: 512,
            locators: vec![],
        }
    }

    #[test]
    fn accepts_a_normal_layout() {
        let mut bat = Bat::empty(1536, 4);
        bat.set(0, 4);
        bat.set(2, 4 + 9);
        assert_eq!(
            check(&meta(), &bat, 9 * 512, 100_000).expect("valid"),
            (4 + 18) * 512
        );
    }

    #[test]
    fn rejects_overlaps_and_outside() {
        let mut bat = Bat::empty(1536, 4);
        bat.set(0, 3); // on top of the BAT
        assert!(matches!(
            check(&meta(), &bat, 9 * 512, 100_000),
            Err(Error::Overlap { .. })
        ));
        let mut bat = Bat::empty(1536, 4);
        bat.set(0, 10);
        bat.set(1, 12); // inside block 0
        assert!(matches!(
            check(&meta(), &bat, 9 * 512, 100_000),
            Err(Error::Overlap { .. })
        ));
        let mut bat = Bat::empty(1536, 4);
        bat.set(1, 1000);
        assert!(matches!(
            check(&meta(), &bat, 9 * 512, 100_000),
            Err(Error::BlockOutsideFile { block: 1, .. })
        ));
        let mut bat = Bat::empty(1536, 4);
        bat.set(1, 190);
        assert!(matches!(
            check(&meta(), &bat, 9 * 512, 100_000),
            Err(Error::Truncated { block: 1, .. })
        ));
        let mut m = meta();
        m.bat_offset = u64::MAX - 10;
        assert!(matches!(
            check(&m, &Bat::empty(0, 1), 512, 100_000),
            Err(Error::RegionOutsideFile { .. })
        ));
    }
}
