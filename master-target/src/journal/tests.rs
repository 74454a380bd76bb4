use super::record::{RecordHeader, UndoExtent};
use super::*;

fn record(seq: u64, data: &[u8]) -> (RecordHeader, Vec<u8>) {
    (
        RecordHeader {
            seq,
            time_ms: seq as i64 * 1000,
            tags: if seq.is_multiple_of(3) {
                vec![format!("crash:{}", seq * 1000)]
            } else {
                vec![]
            },
            extents: vec![
                UndoExtent {
                    offset: seq * 4096,
                    len: data.len() as u64,
                    zero: false,
                },
                UndoExtent {
                    offset: 1 << 20,
                    len: 512,
                    zero: true,
                },
            ],
        },
        data.to_vec(),
    )
}

#[test]
fn records_survive_reopen_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::open(dir.path()).unwrap();
    j.append(&[record(1, b"one"), record(2, b"two"), record(3, b"three")])
        .unwrap();
    drop(j);
    let j = Journal::open(dir.path()).unwrap();
    assert_eq!(j.first_seq(), Some(1));
    assert_eq!(j.last_seq(), 3);
    let meta = j.records()[2].clone();
    assert_eq!(meta.tags, vec!["crash:3000".to_string()]);
    let header = j.header(&meta).unwrap();
    assert_eq!(header, record(3, b"three").0);
    let mut buf = vec![0u8; 5];
    j.read(meta.segment, meta.data_pos(), &mut buf).unwrap();
    assert_eq!(&buf, b"three");
}

#[test]
fn a_torn_tail_is_cut_at_every_length() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::open(dir.path()).unwrap();
    j.append(&[record(1, b"first record")]).unwrap();
    let kept = j.bytes();
    j.append(&[record(2, b"second record")]).unwrap();
    let full = j.bytes();
    drop(j);
    let path = Journal::segment_path(dir.path(), 1);
    let whole = std::fs::read(&path).unwrap();
    for cut in kept..full {
        std::fs::write(&path, &whole[..cut as usize]).unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.last_seq(), 1, "cut at {cut}");
        assert_eq!(j.bytes(), kept);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), kept);
    }
    // A flipped byte inside the last record is a torn record too.
    let mut bad = whole.clone();
    bad[full as usize - 40] ^= 1;
    std::fs::write(&path, &bad).unwrap();
    assert_eq!(Journal::open(dir.path()).unwrap().last_seq(), 1);
}

#[test]
fn damage_in_an_older_segment_is_an_error_not_a_silent_cut() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::open(dir.path()).unwrap();
    j.segment_bytes = 1;
    j.append(&[record(1, b"a")]).unwrap();
    j.append(&[record(2, b"b")]).unwrap();
    assert_eq!(j.segments.len(), 2);
    drop(j);
    let first = Journal::segment_path(dir.path(), 1);
    let mut bytes = std::fs::read(&first).unwrap();
    bytes[0] = b'X';
    std::fs::write(&first, &bytes).unwrap();
    let err = Journal::open(dir.path()).err().expect("damage is reported");
    assert!(err.to_string().contains("damaged"), "{err}");
}

#[test]
fn appends_must_follow_the_last_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::open(dir.path()).unwrap();
    j.append(&[record(5, b"x")]).unwrap();
    assert!(j.append(&[record(7, b"y")]).is_err());
    assert!(j.append(&[record(5, b"y")]).is_err());
    j.append(&[record(6, b"y")]).unwrap();
}

#[test]
fn pruning_removes_whole_old_segments_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::open(dir.path()).unwrap();
    // Two records per segment.
    j.append(&[record(1, b"data")]).unwrap();
    j.segment_bytes = 2 * j.bytes() + 64;
    for seq in 2..=6 {
        j.append(&[record(seq, b"data")]).unwrap();
    }
    assert_eq!(j.segments.len(), 3);
    // Segment 1 holds 1-2: pruning before 2 keeps it (record 2 is needed).
    j.prune_before(2).unwrap();
    assert_eq!(j.first_seq(), Some(1));
    j.prune_before(4).unwrap();
    assert_eq!(j.first_seq(), Some(3));
    // The last segment is never pruned.
    j.prune_before(100).unwrap();
    assert_eq!(j.first_seq(), Some(5));
    assert_eq!(j.last_seq(), 6);
    j.clear().unwrap();
    assert_eq!(j.last_seq(), 0);
    assert_eq!(j.bytes(), 0);
    assert!(Journal::open(dir.path()).unwrap().records().is_empty());
}

#[test]
fn a_record_too_large_to_read_back_is_refused_and_leaves_the_journal_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::open(dir.path()).unwrap();
    j.append(&[record(1, b"kept")]).unwrap();
    let bytes = j.bytes();
    let huge = RecordHeader {
        seq: 3,
        time_ms: 0,
        tags: vec![],
        extents: (0..600_000u64)
            .map(|i| UndoExtent {
                offset: i * 1024,
                len: 512,
                zero: true,
            })
            .collect(),
    };
    let err = j
        .append(&[record(2, b"ok"), (huge, Vec::new())])
        .unwrap_err();
    assert!(err.to_string().contains("header"), "{err}");
    // Nothing of the failed append is indexed or left in the file; the same seqs go again.
    assert_eq!(j.last_seq(), 1);
    assert_eq!(j.bytes(), bytes);
    j.append(&[record(2, b"again")]).unwrap();
    drop(j);
    let j = Journal::open(dir.path()).unwrap();
    assert_eq!(j.last_seq(), 2);
}

#[test]
fn records_after_a_seq_are_found_by_position() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::open(dir.path()).unwrap();
    j.append(&[record(5, b"a"), record(6, b"b"), record(7, b"c")])
        .unwrap();
    let after = |seq| j.records_after(seq).map(|r| r.seq).collect::<Vec<_>>();
    assert_eq!(after(0), vec![5, 6, 7]);
    assert_eq!(after(4), vec![5, 6, 7]);
    assert_eq!(after(5), vec![6, 7]);
    assert_eq!(after(7), Vec::<u64>::new());
    assert_eq!(after(100), Vec::<u64>::new());
}
