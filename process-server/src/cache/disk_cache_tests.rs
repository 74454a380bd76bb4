//! Tests of `disk_cache`: crash recovery, release and reuse of segments.
use super::*;
use crate::cache::spares::{is_spare, MAX_SPARES};
use lifeboat_proto::v1::Extent;

fn batch(seq: u64, fill: u8, len: usize) -> ChangeBatch {
    let mut b = ChangeBatch {
        disk_id: "d-1".into(),
        seq,
        kind: "stream".into(),
        extents: vec![Extent {
            offset: seq * 4096,
            data: vec![fill; len].into(),
            zero_length: 0,
        }],
        ..Default::default()
    };
    lifeboat_common::batch::seal(&mut b);
    b
}

impl DiskCache {
    /// Reads from the start (a fresh cursor).
    fn read_after(&self, seq: u64, max_bytes: usize) -> Result<Vec<ChangeBatch>, CacheError> {
        self.read_from(&Cursor::default(), seq, max_bytes)
            .map(|(batches, _)| batches)
    }
}

fn key() -> Arc<CacheKey> {
    Arc::new(CacheKey::from_bytes(&[7u8; 32]).unwrap())
}

fn open(dir: &Path, direct: bool) -> Result<DiskCache, CacheError> {
    DiskCache::open(dir, "d-1", key()).map(|c| c.with_direct_io(direct))
}

/// Runs a test with segments written through the page cache and with `O_DIRECT`.
fn both_ways(test: fn(bool)) {
    test(false);
    test(true);
}

#[test]
fn appended_batches_survive_reopen_in_order() {
    both_ways(appended_batches_survive_reopen_in_order_in);
}

fn appended_batches_survive_reopen_in_order_in(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path(), direct).unwrap();
    let batches: Vec<_> = (1..=10).map(|s| batch(s, s as u8, 1000)).collect();
    assert_eq!(c.append(&batches[..4], true).unwrap().0, 4);
    assert_eq!(c.append(&batches[4..], false).unwrap().0, 10);
    drop(c);
    let c = open(dir.path(), direct).unwrap();
    assert_eq!(c.durable_seq(), 10);
    assert_eq!(c.read_after(0, usize::MAX).unwrap(), batches);
    assert_eq!(c.read_after(7, usize::MAX).unwrap(), batches[7..].to_vec());
    assert_eq!(
        c.read_after(0, 2500).unwrap().len(),
        3,
        "stops at the byte budget"
    );
}

#[test]
fn a_torn_tail_is_truncated_and_appends_continue() {
    both_ways(a_torn_tail_is_truncated_and_appends_continue_in);
}

fn a_torn_tail_is_truncated_and_appends_continue_in(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path(), direct).unwrap();
    c.append(&[batch(1, 1, 5000), batch(2, 2, 5000)], true)
        .unwrap();
    // The file may end in the zero padding of a direct write: cut the records themselves.
    let (seg, len) = c.segments_after(0)[0].clone();
    drop(c);
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(len - 10).unwrap();
    assert_tail_cut_after_1_and_appends_continue(dir.path(), direct);
}

/// Reopened, the cache ends at batch 1, and a new batch 2 appended then reads back.
fn assert_tail_cut_after_1_and_appends_continue(dir: &Path, direct: bool) {
    let mut c = open(dir, direct).unwrap();
    assert_eq!(c.durable_seq(), 1);
    c.append(&[batch(2, 9, 100)], true).unwrap();
    let all = open(dir, direct)
        .unwrap()
        .read_after(0, usize::MAX)
        .unwrap();
    assert_eq!(all.iter().map(|b| b.seq).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(all[1].extents[0].data[0], 9);
}

/// A crash before the last group was synced can leave a page in the middle of its last
/// record never written back (zeros): the tail is cut there like a short one, not taken
/// for damage, which would make the whole cache unreadable.
#[test]
fn a_record_with_a_page_never_written_back_is_a_torn_tail() {
    both_ways(a_record_with_a_page_never_written_back_is_a_torn_tail_in);
}

fn a_record_with_a_page_never_written_back_is_a_torn_tail_in(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path(), direct).unwrap();
    c.append(&[batch(1, 1, 20_000)], false).unwrap();
    c.append(&[batch(2, 2, 20_000)], false).unwrap();
    let (seg, len) = c.segments_after(0)[0].clone();
    drop(c);
    // A whole page inside the second record's sealed bytes.
    let page = (len - 3 * 4096) / 4096 * 4096;
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 4096], page).unwrap();
    assert_tail_cut_after_1_and_appends_continue(dir.path(), direct);
}

/// A crash between a 4 MiB stage's direct write and the group's sync leaves the last record
/// of the stage without its end: the part of its last sector that the next write was to
/// carry reads as zeros (a reused segment) from a sector's start, often less than a page.
/// That too is a torn tail, not damage.
#[test]
fn a_record_without_its_last_sector_part_is_a_torn_tail() {
    both_ways(a_record_without_its_last_sector_part_is_a_torn_tail_in);
}

fn a_record_without_its_last_sector_part_is_a_torn_tail_in(direct: bool) {
    for extra in [0u64, 40, 300] {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(dir.path(), direct).unwrap();
        c.append(&[batch(1, 1, 20_000)], false).unwrap();
        c.append(&[batch(2, 2, 20_000 + extra as usize)], false)
            .unwrap();
        let (seg, len) = c.segments_after(0)[0].clone();
        drop(c);
        // From the last sector start at least 4 bytes before the end, to the end.
        let from = (len - 4) / 512 * 512;
        let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        let zeros = vec![0u8; (len - from) as usize];
        std::os::unix::fs::FileExt::write_all_at(&f, &zeros, from).unwrap();
        assert_tail_cut_after_1_and_appends_continue(dir.path(), direct);
    }
}

/// Groups bigger than the staging buffer, odd record sizes, and segments closed by
/// restarts (each ending in the padding of its last direct write, if writes are direct)
/// all read back whole, in order.
#[test]
fn staged_and_padded_segments_read_back_whole() {
    both_ways(staged_and_padded_segments_read_back_whole_in);
}

fn staged_and_padded_segments_read_back_whole_in(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut all = Vec::new();
    for round in 0..3u64 {
        let mut c = open(dir.path(), direct).unwrap();
        let first = round * 3 + 1;
        let group: Vec<_> = (first..first + 3)
            .map(|s| batch(s, s as u8, (3 << 20) + 777 * s as usize))
            .collect();
        assert_eq!(c.append(&group, false).unwrap().0, first + 2);
        all.extend(group);
    }
    let c = open(dir.path(), direct).unwrap();
    assert_eq!(c.durable_seq(), 9);
    assert_eq!(c.segments_after(0).len(), 3);
    assert!(c.read_after(0, usize::MAX).unwrap() == all);
}

/// A group that fills a segment and goes on in the next: both parts are durable and
/// readable at once (the closed segment is synced, not left staged).
#[test]
fn a_group_spanning_two_segments_is_whole_before_and_after_reopen() {
    both_ways(a_group_spanning_two_segments_is_whole_before_and_after_reopen_in);
}

fn a_group_spanning_two_segments_is_whole_before_and_after_reopen_in(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path(), direct).unwrap();
    let group: Vec<_> = (1..=20u64)
        .map(|s| batch(s, s as u8, (4 << 20) - 1000))
        .collect();
    assert_eq!(c.append(&group, false).unwrap().0, 20);
    assert_eq!(c.segments_after(0).len(), 2);
    assert!(c.read_after(0, usize::MAX).unwrap() == group);
    drop(c);
    let c = open(dir.path(), direct).unwrap();
    assert_eq!(c.durable_seq(), 20);
    assert!(c.read_after(0, usize::MAX).unwrap() == group);
}

#[test]
fn damaged_data_is_reported_not_skipped() {
    both_ways(damaged_data_is_reported_not_skipped_in);
}

fn damaged_data_is_reported_not_skipped_in(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path(), direct).unwrap();
    c.append(&[batch(1, 1, 5000), batch(2, 2, 5000)], false)
        .unwrap();
    let seg = c.segments_after(0)[0].0.clone();
    drop(c);
    let mut bytes = std::fs::read(&seg).unwrap();
    let middle = bytes.len() / 4;
    bytes[middle] ^= 0xff;
    std::fs::write(&seg, bytes).unwrap();
    assert!(matches!(
        open(dir.path(), direct),
        Err(CacheError::Corrupt { .. })
    ));
    // Another key cannot read it either.
    let other = Arc::new(CacheKey::from_bytes(&[8u8; 32]).unwrap());
    assert!(DiskCache::open(dir.path(), "d-1", other).is_err());
}

#[test]
fn released_segments_are_let_go() {
    both_ways(released_segments_are_let_go_in);
}

fn released_segments_are_let_go_in(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path(), direct).unwrap();
    for s in 1..=6u64 {
        c.append(&[batch(s, 0xaa, 1 << 20)], false).unwrap();
    }
    assert!(c.bytes() > 6 << 20);
    c.release_through(6).unwrap();
    assert!(c.bytes() < 1 << 20, "{}", c.bytes());
    assert!(c.read_after(6, usize::MAX).unwrap().is_empty());
    c.append(&[batch(7, 1, 10)], true).unwrap();
    assert_eq!(open(dir.path(), direct).unwrap().durable_seq(), 7);
}

fn spares_in(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| is_spare(&e.as_ref().unwrap().path()))
        .count()
}

/// A temporary directory whose file system zeroes ranges in place (spares need it); `None`,
/// with the reason printed, where it cannot (tmpfs).
fn dir_that_zeroes_in_place() -> Option<tempfile::TempDir> {
    let dir = tempfile::tempdir().unwrap();
    match zeroes_in_place(dir.path()) {
        Ok(()) => Some(dir),
        Err(e) => {
            eprintln!("skipped: the temporary directory's file system cannot zero in place ({e})");
            None
        }
    }
}

/// Whether files in `dir` can be zeroed in place (tried on a probe file, then removed, so
/// the cache finds only its own files there).
fn zeroes_in_place(dir: &Path) -> std::io::Result<()> {
    let path = dir.join("probe");
    let probe = std::fs::File::create(&path)?;
    probe.set_len(1 << 20)?;
    let zeroed = lifeboat_common::fsutil::zero_range(&probe, 1 << 20);
    std::fs::remove_file(&path)?;
    zeroed
}

/// Where zeroing in place is not possible (tmpfs), released segments are deleted and the
/// cache goes on as before.
#[test]
fn without_zeroing_in_place_released_segments_are_deleted() {
    let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
        eprintln!("skipped: no /dev/shm to stand for a file system that cannot zero in place");
        return;
    };
    if zeroes_in_place(dir.path()).is_ok() {
        eprintln!("skipped: /dev/shm zeroes in place here");
        return;
    }
    let mut c = open(dir.path(), false).unwrap();
    let first: Vec<_> = (1..=20u64).map(|s| batch(s, 1, (4 << 20) - 1000)).collect();
    c.append(&first, false).unwrap();
    c.release_through(20).unwrap();
    assert_eq!(spares_in(dir.path()), 0);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    c.append(&[batch(21, 2, 1000)], true).unwrap();
    let c = open(dir.path(), false).unwrap();
    assert_eq!(c.durable_seq(), 21);
    assert_eq!(c.read_after(20, usize::MAX).unwrap().len(), 1);
}

/// Released segments become spares that new segments reuse; a reused file, as long as
/// its old self, reads back exactly its new records, before and after a restart, and a
/// record torn in it is cut like one torn in a new file.
#[test]
fn released_segments_are_reused_and_read_back_only_their_new_records() {
    both_ways(released_segments_are_reused_and_read_back_only_their_new_records_in);
}

fn released_segments_are_reused_and_read_back_only_their_new_records_in(direct: bool) {
    let Some(dir) = dir_that_zeroes_in_place() else {
        return;
    };
    let mut c = open(dir.path(), direct).unwrap();
    let old: Vec<_> = (1..=20u64)
        .map(|s| batch(s, s as u8, (4 << 20) - 1000))
        .collect();
    c.append(&old, false).unwrap();
    c.release_through(20).unwrap();
    assert_eq!(c.segments_after(0).len(), 0);
    assert_eq!(spares_in(dir.path()), MAX_SPARES);
    assert_eq!(c.bytes(), 0);

    let new: Vec<_> = (21..=23u64).map(|s| batch(s, 0x55, 20_000)).collect();
    c.append(&new, true).unwrap();
    assert_eq!(spares_in(dir.path()), MAX_SPARES - 1);
    let (seg, len) = c.segments_after(20)[0].clone();
    let file_len = std::fs::metadata(&seg).unwrap().len();
    assert!(
        file_len > len + (4 << 20),
        "a reused file: {file_len} bytes"
    );
    assert!(c.read_after(20, usize::MAX).unwrap() == new);
    c.append(&[batch(24, 0x66, 20_000)], false).unwrap();
    drop(c);
    let c = open(dir.path(), direct).unwrap();
    assert_eq!(c.durable_seq(), 24, "the zeros after the records end them");
    assert_eq!(c.read_after(20, usize::MAX).unwrap().len(), 4);
    drop(c);

    // The last record never fully written back: a page of it still reads as zeros.
    let page = (len + 8192) / 4096 * 4096;
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 4096], page).unwrap();
    let c = open(dir.path(), direct).unwrap();
    assert_eq!(c.durable_seq(), 23);
    assert!(c.read_after(20, usize::MAX).unwrap() == new);
    assert!(
        c.bytes() < 1 << 20,
        "counts records, not the file: {}",
        c.bytes()
    );
    assert!(
        spares_in(dir.path()) == 0,
        "spares from before a restart are deleted"
    );
}

/// A reused file filled and closed, then a crash with the next segment begun: the
/// records end before the old file did, and the zeros after them mark the end, not a tear
/// (which, in a segment other than the last, would make the cache unreadable).
#[test]
fn a_reused_segment_closed_when_full_ends_where_its_records_do() {
    both_ways(a_reused_segment_closed_when_full_ends_where_its_records_do_in);
}

fn a_reused_segment_closed_when_full_ends_where_its_records_do_in(direct: bool) {
    let Some(dir) = dir_that_zeroes_in_place() else {
        return;
    };
    let mut c = open(dir.path(), direct).unwrap();
    // 11 records of 6 MiB close a segment of 66 MiB; the 12th starts the next.
    let first: Vec<_> = (1..=12u64).map(|s| batch(s, s as u8, 6 << 20)).collect();
    c.append(&first, false).unwrap();
    c.release_through(12).unwrap();
    assert_eq!(spares_in(dir.path()), 2);
    // 64 records of 1 MiB fill the reused 66 MiB file; the 65th goes on in the other
    // spare.
    let second: Vec<_> = (13..=77u64).map(|s| batch(s, s as u8, 1 << 20)).collect();
    c.append(&second, false).unwrap();
    let segments = c.segments_after(12);
    assert_eq!(segments.len(), 2);
    let file_len = std::fs::metadata(&segments[0].0).unwrap().len();
    assert!(
        file_len > segments[0].1,
        "zeros follow the records: {file_len} {segments:?}"
    );
    drop(c);
    let c = open(dir.path(), direct).unwrap();
    assert_eq!(c.durable_seq(), 77);
    assert!(c.read_after(12, usize::MAX).unwrap() == second);
}

#[test]
fn a_skip_past_what_the_master_target_holds_reads_back_after_reopen() {
    both_ways(a_skip_past_what_the_master_target_holds_reads_back_after_reopen_in);
}

/// Batches 4 to 9 went to the master target without the cache (an initial sync): the cache
/// skips them, and what follows is not taken for a damaged file when it is opened again.
fn a_skip_past_what_the_master_target_holds_reads_back_after_reopen_in(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path(), direct).unwrap();
    let before: Vec<_> = (1..=3).map(|s| batch(s, s as u8, 1000)).collect();
    c.append(&before, false).unwrap();
    c.skip_to(9).unwrap();
    c.skip_to(5).unwrap(); // never back
    assert_eq!(c.durable_seq(), 9);
    let after: Vec<_> = (10..=12).map(|s| batch(s, s as u8, 1000)).collect();
    assert_eq!(c.append(&after, false).unwrap().0, 12);
    drop(c);
    let c = open(dir.path(), direct).unwrap();
    assert_eq!(c.durable_seq(), 12);
    assert_eq!(c.read_after(9, usize::MAX).unwrap(), after);
}
