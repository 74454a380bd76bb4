//! Whether a batch is worth compressing in the cache: zstd is tried on a 64 KiB probe of it
//! first. Already-compressed or encrypted disk data is stored as it is, which saves
//! compressing it and decompressing it again on the way to the master target.
use lifeboat_proto::v1::ChangeBatch;
use std::io;
use zstd::bulk::Compressor;

/// Bytes of a batch compressed to judge whether the rest is worth compressing.
const PROBE: usize = 64 * 1024;

/// The probe of a batch's data: from the middle of its largest extent, if that holds a
/// whole probe (else the batch is judged on its encoding, with `worth_compressing`).
pub fn probe_window(batch: &ChangeBatch) -> Option<&[u8]> {
    middle(&batch.extents.iter().max_by_key(|e| e.data.len())?.data)
}

/// The probe from the middle of `data`, if it holds one.
fn middle(data: &[u8]) -> Option<&[u8]> {
    let start = data.len().checked_sub(PROBE)? / 2;
    Some(&data[start..start + PROBE])
}

/// Whether zstd is likely to shrink an encoded batch: a probe from its middle (past the
/// framing) must shrink by at least an eighth. Small batches are always compressed (the
/// probe would be most of the batch).
pub fn worth_compressing(zstd: &mut Compressor<'static>, plain: &[u8]) -> io::Result<bool> {
    match middle(plain) {
        Some(probe) if plain.len() > PROBE => probe_shrinks(zstd, probe),
        _ => Ok(true),
    }
}

/// Whether zstd shrinks `probe` by at least an eighth.
pub fn probe_shrinks(zstd: &mut Compressor<'static>, probe: &[u8]) -> io::Result<bool> {
    Ok(zstd.compress(probe)?.len() < probe.len() - probe.len() / 8)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// xorshift64: noise zstd cannot shrink, a different one for each seed.
    pub(crate) fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn only_compressible_batches_are_compressed() {
        let mut z = Compressor::new(1).unwrap();
        assert!(worth_compressing(&mut z, &vec![0u8; 1 << 20]).unwrap());
        let noise = noise(1 << 20, 1);
        assert!(!worth_compressing(&mut z, &noise).unwrap());
        // Small batches are always compressed (the probe would be most of the batch).
        assert!(worth_compressing(&mut z, &noise[..1000]).unwrap());
    }
}
