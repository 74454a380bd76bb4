//! Block hashes for comparing a source disk with its replica (resync, scan capture): BLAKE3 of
//! each block's bytes, truncated to 16 bytes (a 2^-64 birthday bound over a disk's blocks is
//! far below the chance of an undetected disk error). Both ends hash with this one function,
//! so a short last block and an all-zero block hash the same way everywhere.

/// Block size used for resync and scan comparisons.
pub const BLOCK: u64 = 64 * 1024;
/// Most bytes one hash request may cover.
pub const MAX_HASH_SPAN: u64 = 64 * 1024 * 1024;
pub const HASH_LEN: usize = 16;

pub type BlockHash = [u8; HASH_LEN];

pub fn hash_block(data: &[u8]) -> BlockHash {
    let full = blake3::hash(data);
    let mut out = [0u8; HASH_LEN];
    out.copy_from_slice(&full.as_bytes()[..HASH_LEN]);
    out
}

/// Hashes `data` in blocks of `block_size` (the last one may be short).
pub fn hash_blocks(data: &[u8], block_size: u64) -> Vec<BlockHash> {
    data.chunks(block_size.max(1) as usize)
        .map(hash_block)
        .collect()
}

/// Why a hash request is refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpanError {
    #[error("block size {0} is not a power of two from 4096 to 1048576")]
    BlockSize(u32),
    #[error("offset {offset} is not a multiple of the block size {block_size}")]
    Unaligned { offset: u64, block_size: u32 },
    #[error("{length} bytes at {offset} reach past the end of the {size}-byte disk or over the {MAX_HASH_SPAN}-byte limit")]
    Range { offset: u64, length: u64, size: u64 },
}

/// Checks a hash request against a disk of `size` bytes.
pub fn check_span(offset: u64, length: u64, block_size: u32, size: u64) -> Result<(), SpanError> {
    if !block_size.is_power_of_two() || !(4096..=1 << 20).contains(&block_size) {
        return Err(SpanError::BlockSize(block_size));
    }
    if !offset.is_multiple_of(block_size as u64) {
        return Err(SpanError::Unaligned { offset, block_size });
    }
    if length > MAX_HASH_SPAN || offset.checked_add(length).is_none_or(|end| end > size) {
        return Err(SpanError::Range {
            offset,
            length,
            size,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_hash_independently_and_the_last_may_be_short() {
        let mut data = vec![0u8; 2 * BLOCK as usize + 100];
        data[BLOCK as usize] = 1;
        let h = hash_blocks(&data, BLOCK);
        assert_eq!(h.len(), 3);
        assert_eq!(h[0], hash_block(&vec![0u8; BLOCK as usize]));
        assert_ne!(h[0], h[1]);
        assert_eq!(h[2], hash_block(&[0u8; 100]));
    }

    #[test]
    fn spans_are_checked() {
        assert!(check_span(0, 1 << 20, 65536, 1 << 20).is_ok());
        assert_eq!(
            check_span(0, 10, 1000, 100),
            Err(SpanError::BlockSize(1000))
        );
        assert!(matches!(
            check_span(4096, 10, 65536, 1 << 20),
            Err(SpanError::Unaligned { .. })
        ));
        assert!(matches!(
            check_span(0, (1 << 20) + 1, 65536, 1 << 20),
            Err(SpanError::Range { .. })
        ));
        assert!(matches!(
            check_span(u64::MAX - 65535, 65536 * 2, 65536, u64::MAX),
            Err(SpanError::Range { .. })
        ));
    }
}
