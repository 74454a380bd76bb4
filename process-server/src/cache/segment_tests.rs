//! Tests of `segment`: records of every kind read back as they were appended.
use super::*;
use crate::cache::compress_probe::tests::noise;
use lifeboat_proto::v1::Extent;

fn batch(seq: u64, extents: Vec<Vec<u8>>) -> ChangeBatch {
    let mut b = ChangeBatch {
        disk_id: "d-1".into(),
        seq,
        kind: "sync".into(),
        extents: extents
            .into_iter()
            .enumerate()
            .map(|(i, data)| Extent {
                offset: (seq << 30) + (i as u64) * (1 << 20),
                data: data.into(),
                zero_length: 0,
            })
            .collect(),
        tags: vec![format!("crash:{seq}")],
        ..Default::default()
    };
    lifeboat_common::batch::seal(&mut b);
    b
}

/// The flags of each record in a segment file, in order.
fn record_flags(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let id_len = u16::from_be_bytes([bytes[24], bytes[25]]) as usize;
    let mut at = 26 + id_len;
    let mut flags = Vec::new();
    while at + RECORD_HEADER <= bytes.len() && &bytes[at..at + 4] == RECORD_MAGIC {
        flags.push(bytes[at + 12]);
        let sealed = u32::from_be_bytes(bytes[at + 17..at + 21].try_into().unwrap()) as usize;
        at += RECORD_HEADER + sealed;
    }
    flags
}

#[test]
fn records_of_every_kind_read_back_as_appended() {
    for direct in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let key = CacheKey::from_bytes(&[3u8; 32]).unwrap();
        let batches = vec![
            // Large extents of noise: sealed as they are encoded.
            batch(1, vec![noise(300_000, 1), noise(1 << 20, 2), vec![]]),
            // Large extents that shrink: compressed.
            batch(2, vec![vec![5u8; 200_000], noise(70_000, 3)]),
            // Small extents of noise, more than a probe in all: judged on the encoding.
            batch(3, (0..40).map(|i| noise(4096, 10 + i)).collect()),
            // Small and compressible.
            batch(4, vec![vec![9u8; 512]]),
            // Not compressed when compression is off, however well it would shrink.
            batch(5, vec![vec![0u8; 1 << 20]]),
        ];
        let mut writer = SegmentWriter::create(dir.path(), "d-1", 1, direct, None).unwrap();
        for b in &batches {
            writer.append(&key, b, b.seq != 5).unwrap();
        }
        writer.sync().unwrap();
        drop(writer);
        let path = dir.path().join(file_name(1));
        assert_eq!(record_flags(&path), [0, FLAG_ZSTD, 0, FLAG_ZSTD, 0]);
        let mut reader = SegmentReader::open(&path, u64::MAX).unwrap();
        for b in &batches {
            assert_eq!(reader.next_batch(&key).as_ref(), Some(b), "seq {}", b.seq);
        }
        assert!(reader.next_batch(&key).is_none());
    }
}
