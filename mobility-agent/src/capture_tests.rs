use super::*;
use std::path::Path;

fn new_capture(dir: &Path, size: u64, limits: Limits) -> Arc<Capture> {
    let source = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join("disk"))
        .unwrap();
    source.set_len(size).unwrap();
    let dirty = DirtyMap::open(&dir.join("dirty.map"), size).unwrap();
    Capture::new(source, size, dirty, limits, dir.join("capture.spill"))
}

/// A write larger than an item is queued as pieces in order, each holding its part of the
/// write, whether they wait in memory or in the spill file; the source holds the whole write.
#[test]
fn a_large_write_is_queued_in_pieces_that_hold_its_bytes() {
    for spilled in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            // Past the first write's 512 bytes in memory, data goes to the spill file (and
            // the stream is given up beyond twice this much in memory).
            throttle_bytes: if spilled { 256 } else { 64 << 20 },
            ..Limits::default()
        };
        let capture = new_capture(dir.path(), 32 << 20, limits);
        capture.write(0, vec![1u8; 512]).unwrap();
        let data: Vec<u8> = (0..2 * MAX_ITEM + 5).map(|i| (i % 251) as u8).collect();
        let at = 8192u64;
        capture.write(at, data.clone()).unwrap();
        assert_eq!(capture.queued_bytes(), 512 + data.len() as u64);
        let held = capture.queue.lock().unwrap().spill.held();
        assert_eq!(held, if spilled { data.len() as u64 } else { 0 });

        let items = capture.take(u64::MAX, usize::MAX);
        assert_eq!(items.len(), 4, "the small write, then three pieces");
        assert!(items.windows(2).all(|w| w[0].index < w[1].index));
        let pieces = &items[1..];
        let mut expected_at = at;
        for (piece, part) in pieces.iter().zip(data.chunks(MAX_ITEM)) {
            assert_eq!(piece.offset, expected_at);
            assert_eq!(piece.data, part, "spilled: {spilled}");
            assert!(piece.spilled.is_none());
            expected_at += part.len() as u64;
        }
        let mut on_source = vec![0u8; data.len()];
        capture.source.read_exact_at(&mut on_source, at).unwrap();
        assert_eq!(on_source, data);
        assert_eq!(capture.queued_bytes(), 0);
    }
}
