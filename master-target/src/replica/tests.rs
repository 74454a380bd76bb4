//! The replica against a byte model: every point's view, after any grouping of batches, a
//! crash between journal and image, more batches while a view is open, and a failover commit.
use super::*;
use crate::views::{ViewKind, ViewSpec};
use lifeboat_proto::v1::Extent;

const SIZE: u64 = 1 << 20;

struct Rng(u64);
impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A batch of a few writes and zero-fills; applied to `model` too.
fn batch(rng: &mut Rng, seq: u64, model: &mut [u8]) -> ChangeBatch {
    let mut extents = Vec::new();
    for _ in 0..1 + rng.next(4) {
        let mut offset = rng.next(SIZE - 1);
        let mut len = 1 + rng.next((SIZE - offset).min(200_000));
        if rng.next(3) == 0 {
            // Whole sectors: what a replica writing direct sends direct when long enough.
            offset -= offset % 512;
            len = len.div_ceil(512) * 512;
        }
        if rng.next(5) == 0 {
            model[offset as usize..][..len as usize].fill(0);
            extents.push(Extent {
                offset,
                data: Default::default(),
                zero_length: len,
            });
        } else {
            let byte = (seq % 251) as u8 + 1;
            model[offset as usize..][..len as usize].fill(byte);
            extents.push(Extent {
                offset,
                data: vec![byte; len as usize].into(),
                zero_length: 0,
            });
        }
    }
    ChangeBatch {
        disk_id: "d-test".into(),
        seq,
        extents,
        tags: vec![format!("crash:{}", 1000 + seq)],
        last_write_unix_ms: 1000 + seq as i64,
        ..Default::default()
    }
}

fn read_view(r: &Replica, id: &str) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE as usize];
    r.read_view(id, &mut buf, 0).unwrap();
    buf
}

fn spec(id: &str, kind: ViewKind, point_seq: u64) -> ViewSpec {
    ViewSpec {
        view_id: id.into(),
        kind,
        point_seq,
        created_ms: 0,
    }
}

/// Opens the replica in `dir`, writing its data direct or through the page cache.
fn open(dir: &Path, direct: bool) -> Replica {
    let mut r = Replica::open_or_create(dir, "d-test", SIZE).unwrap();
    if direct {
        r.write_direct().unwrap();
    }
    r
}

#[test]
fn every_point_reads_back_as_it_was() {
    every_point_reads_back_as_it_was_when(false);
}

/// Direct writes of the replica are read back by undo records, views and reopens.
#[test]
fn every_point_reads_back_as_it_was_with_direct_writes() {
    every_point_reads_back_as_it_was_when(true);
}

fn every_point_reads_back_as_it_was_when(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut r = open(dir.path(), direct);
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut model = vec![0u8; SIZE as usize];
    let mut history = vec![model.clone()];
    let mut seq = 0;
    // Groups of 1-5 batches, as the service applies them.
    while seq < 40 {
        let n = (1 + rng.next(5)).min(40 - seq);
        let group: Vec<ChangeBatch> = (0..n)
            .map(|_| {
                seq += 1;
                let b = batch(&mut rng, seq, &mut model);
                history.push(model.clone());
                b
            })
            .collect();
        r.apply(&group).unwrap();
    }
    assert_eq!(r.points().len(), 40);
    // A view opened at each point shows it; a test view stays right while batches go on.
    r.open_view(spec("held", ViewKind::Test, 17)).unwrap();
    for point in [0, 1, 5, 17, 39, 40] {
        let id = format!("p{point}");
        r.open_view(spec(&id, ViewKind::Test, point)).unwrap();
        assert!(
            read_view(&r, &id) == history[point as usize],
            "point {point}"
        );
        r.close_view(&id).unwrap();
    }
    for _ in 0..10 {
        seq += 1;
        let b = batch(&mut rng, seq, &mut model);
        history.push(model.clone());
        r.apply(&[b]).unwrap();
    }
    assert!(read_view(&r, "held") == history[17]);
    // Writes into a view stay in it.
    r.write_view("held", 100, Some(b"private"), 7).unwrap();
    r.flush_view("held").unwrap();
    let mut expected = history[17].clone();
    expected[100..107].copy_from_slice(b"private");
    assert!(read_view(&r, "held") == expected);
    let mut replica = vec![0u8; SIZE as usize];
    r.image.read_at(&mut replica, 0).unwrap();
    assert!(replica == model);
    // Reopening (a restart) keeps the view, its writes, and the history.
    drop(r);
    let r = open(dir.path(), direct);
    assert!(read_view(&r, "held") == expected);
    assert_eq!(r.points().len(), 50);
}

#[test]
fn a_crash_after_journaling_does_not_spoil_the_history() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Replica::open_or_create(dir.path(), "d-test", SIZE).unwrap();
    let mut rng = Rng(42);
    let mut model = vec![0u8; SIZE as usize];
    let mut history = vec![model.clone()];
    let batches: Vec<ChangeBatch> = (1..=6)
        .map(|seq| {
            let b = batch(&mut rng, seq, &mut model);
            history.push(model.clone());
            b
        })
        .collect();
    r.apply(&batches[..2]).unwrap();
    // Batches 3-5 journaled, then a crash with only part of their writes in the image.
    r.journal_group(&batches[2..5]).unwrap();
    let e = &batches[3].extents[0];
    if !e.data.is_empty() {
        r.image.write_at(&e.data, e.offset).unwrap();
        r.image.flush().unwrap();
    }
    drop(r);
    let mut r = Replica::open_or_create(dir.path(), "d-test", SIZE).unwrap();
    assert_eq!(r.state().applied_seq, 2);
    assert_eq!(r.journal.last_seq(), 5);
    // The process server sends 3-6 again.
    r.apply(&batches[2..]).unwrap();
    assert_eq!(r.journal.last_seq(), 6);
    for point in 0..=6u64 {
        let id = format!("p{point}");
        r.open_view(spec(&id, ViewKind::Test, point)).unwrap();
        assert!(
            read_view(&r, &id) == history[point as usize],
            "point {point}"
        );
        r.close_view(&id).unwrap();
    }
}

#[test]
fn failover_refuses_batches_and_commit_folds_the_point_into_the_replica() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Replica::open_or_create(dir.path(), "d-test", SIZE).unwrap();
    let mut rng = Rng(7);
    let mut model = vec![0u8; SIZE as usize];
    let mut history = vec![model.clone()];
    for seq in 1..=8 {
        let b = batch(&mut rng, seq, &mut model);
        history.push(model.clone());
        r.apply(&[b]).unwrap();
    }
    r.open_view(spec("fo", ViewKind::Failover, 3)).unwrap();
    let next = batch(&mut rng, 9, &mut model.clone());
    assert!(matches!(r.apply(&[next]), Err(ReplicaError::Refused(_))));
    // A different point before the commit replaces the failover view.
    r.open_view(spec("fo", ViewKind::Failover, 5)).unwrap();
    assert_eq!(r.view_written_bytes("fo"), 0);
    r.write_view("fo", 0, Some(b"booted"), 6).unwrap();
    r.write_view("fo", 2, Some(b"ot"), 2).unwrap();
    r.flush_view("fo").unwrap();
    // Each byte counted once, however often written.
    assert_eq!(r.view_written_bytes("fo"), 6);
    let mut expected = history[5].clone();
    expected[..6].copy_from_slice(b"booted");
    assert!(read_view(&r, "fo") == expected);
    // A commit interrupted after it started is finished on reopen.
    let mut f = r.state.failover.clone().unwrap();
    f.commit_pending = true;
    r.state.failover = Some(f);
    r.save_state().unwrap();
    drop(r);
    let r = Replica::open_or_create(dir.path(), "d-test", SIZE).unwrap();
    assert!(r.state().failover.as_ref().unwrap().committed);
    assert!(r.points().is_empty());
    let mut replica = vec![0u8; SIZE as usize];
    r.image.read_at(&mut replica, 0).unwrap();
    assert!(replica == expected);
    assert!(read_view(&r, "fo") == expected);
}

#[test]
fn pruning_keeps_every_point_inside_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Replica::open_or_create(dir.path(), "d-test", SIZE).unwrap();
    r.journal.segment_bytes = 1; // one record per segment
    let mut rng = Rng(99);
    let mut model = vec![0u8; SIZE as usize];
    for seq in 1..=10 {
        let b = batch(&mut rng, seq, &mut model);
        r.apply(&[b]).unwrap();
    }
    // Points are at 1001..1010 ms; a window from 1006 keeps 6-10.
    let now = 1006 + 60_000;
    r.prune(60, now).unwrap();
    let kept: Vec<u64> = r.points().iter().map(|p| p.seq).collect();
    assert_eq!(kept, vec![6, 7, 8, 9, 10]);
    // An open view pins its point.
    r.open_view(spec("v", ViewKind::Test, 7)).unwrap();
    r.prune(1, now + 100_000).unwrap();
    assert_eq!(r.points().first().map(|p| p.seq), Some(7));
    // A copy of the view the master target was writing when it stopped is gone on reopen;
    // the view is not.
    let partial = r.view_dir_path("v").join("disk.vhd.partial");
    std::fs::write(&partial, b"half a copy").unwrap();
    drop(r);
    let r = Replica::open_or_create(dir.path(), "d-test", SIZE).unwrap();
    assert!(!partial.exists());
    assert!(r.views().any(|v| v.view_id == "v"));
}

#[test]
fn a_whole_disk_trim_of_zeros_is_one_undo_extent_and_views_have_generations() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Replica::open_or_create(dir.path(), "d-test", SIZE).unwrap();
    let trim = ChangeBatch {
        disk_id: "d-test".into(),
        seq: 1,
        extents: vec![Extent {
            offset: 0,
            data: Default::default(),
            zero_length: SIZE,
        }],
        tags: vec!["crash:1".into()],
        ..Default::default()
    };
    r.apply(&[trim]).unwrap();
    let meta = r.journal.records()[0].clone();
    assert_eq!(r.journal.header(&meta).unwrap().extents.len(), 1);
    // A failover view opened again at another point is a new generation: connections to the
    // first one are refused rather than shown another disk.
    r.open_view(ViewSpec {
        created_ms: 1,
        ..spec("fo", ViewKind::Failover, 0)
    })
    .unwrap();
    assert_eq!(r.view_generation("fo"), Some(1));
    r.open_view(ViewSpec {
        created_ms: 2,
        ..spec("fo", ViewKind::Failover, 1)
    })
    .unwrap();
    assert_eq!(r.view_generation("fo"), Some(2));
    r.commit_failover("fo").unwrap();
    assert_eq!(
        r.view_generation("fo"),
        Some(2),
        "a commit keeps serving the same opening"
    );
}

#[test]
fn the_position_survives_reopen_and_not_a_new_replica() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Replica::open_or_create(dir.path(), "d-test", SIZE).unwrap();
    let mut rng = Rng(0x0bad_cafe_f00d_d00d);
    let mut model = vec![0u8; SIZE as usize];
    for seq in 1..=6 {
        let b = batch(&mut rng, seq, &mut model);
        r.apply(&[b]).unwrap();
    }
    let expected = r.state().clone();
    assert_eq!((expected.applied_seq, expected.last_tag_seq), (6, 6));
    drop(r);
    // The groups wrote only the position file; the state file still says where it began.
    let state_file: ReplicaState =
        serde_json::from_slice(&std::fs::read(dir.path().join("state.json")).unwrap()).unwrap();
    assert_eq!(state_file.applied_seq, 0);
    let r = Replica::open_or_create(dir.path(), "d-test", SIZE).unwrap();
    assert_eq!(r.state(), &expected);
    drop(r);
    // A replica made again (its image lost) starts from nothing, whatever the old position.
    std::fs::remove_file(Replica::image_path(dir.path())).unwrap();
    let r = Replica::open_or_create(dir.path(), "d-test", SIZE).unwrap();
    assert_eq!(r.state().applied_seq, 0);
    drop(r);
    let r = Replica::open_or_create(dir.path(), "d-test", SIZE).unwrap();
    assert_eq!(
        r.state().applied_seq,
        0,
        "the old position is gone for good"
    );
}

/// An initial sync places no points: its batches leave no records (nothing could go back to
/// before them); the first tagged batch starts the journal, and every point from it on can
/// be shown, while the batches before it cannot be gone back to.
#[test]
fn batches_before_the_first_point_leave_no_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Replica::open_or_create(dir.path(), "d-test", SIZE).unwrap();
    let mut rng = Rng(11);
    let mut model = vec![0u8; SIZE as usize];
    let untagged: Vec<ChangeBatch> = (1..=4)
        .map(|seq| ChangeBatch {
            tags: Vec::new(),
            ..batch(&mut rng, seq, &mut model)
        })
        .collect();
    r.apply(&untagged[..2]).unwrap();
    r.apply(&untagged[2..]).unwrap();
    assert!(r.journal.records().is_empty());
    assert_eq!(r.journal_bytes(), 0);
    assert!(r.points().is_empty());

    let mut at_point = Vec::new();
    for seq in 5..=8 {
        let b = batch(&mut rng, seq, &mut model);
        if seq == 6 {
            at_point = model.clone();
        }
        r.apply(&[b]).unwrap();
    }
    // Batch 5 started the journal; batches 6.. are recorded after it.
    assert_eq!(r.journal.first_seq(), Some(5));
    assert_eq!(
        r.points().iter().map(|p| p.seq).collect::<Vec<_>>(),
        vec![5, 6, 7, 8]
    );
    assert!(!r.can_show(3), "before the first point there is no history");
    assert!(r.can_show(6));
    r.open_view(spec("t", ViewKind::Test, 6)).unwrap();
    assert!(read_view(&r, "t") == at_point);
    let mut latest = vec![0u8; SIZE as usize];
    r.image.read_at(&mut latest, 0).unwrap();
    assert!(latest == model);
}
