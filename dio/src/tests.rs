use super::*;
use std::os::unix::fs::FileExt;

fn aligned(buf: &AlignedBuf) -> bool {
    buf.is_empty() || buf.as_slice().as_ptr() as usize % MEM_ALIGN == 0
}

#[test]
fn the_buffer_stays_aligned_and_keeps_its_content_as_it_grows_and_shrinks() {
    let mut buf = AlignedBuf::new();
    let mut model = Vec::new();
    for i in 0..200u32 {
        let piece: Vec<u8> = (0..(i * 37 % 5000)).map(|j| (i + j) as u8).collect();
        buf.extend_from_slice(&piece);
        model.extend_from_slice(&piece);
        assert!(aligned(&buf));
        assert_eq!(buf.as_slice(), model.as_slice());
        if i % 7 == 0 {
            let n = model.len() * 2 / 3;
            buf.truncate(n);
            model.truncate(n);
            assert!(aligned(&buf));
            assert_eq!(buf.as_slice(), model.as_slice());
        }
    }
    buf.pad_to(4096);
    assert_eq!(buf.len() % 4096, 0);
    assert!(buf.as_slice()[model.len()..].iter().all(|&b| b == 0));
    assert_eq!(&buf.as_slice()[..model.len()], model.as_slice());
    buf.truncate(10);
    assert_eq!(buf.as_slice(), &model[..10]);
}

#[test]
fn grow_hands_out_room_after_the_content_and_keeps_what_is_written_there() {
    let mut buf = AlignedBuf::new();
    buf.extend_from_slice(b"head");
    buf.grow(3).copy_from_slice(b"abc");
    assert_eq!(buf.as_slice(), b"headabc");
    buf.truncate(4);
    // Room handed out again after a truncate may hold old bytes; the length is what counts.
    let room = buf.grow(5000);
    assert_eq!(room.len(), 5000);
    room.fill(7);
    assert!(aligned(&buf));
    assert_eq!(&buf.as_slice()[..4], b"head");
    assert!(buf.as_slice()[4..].iter().all(|&b| b == 7));
    assert_eq!(buf.len(), 5004);
}

/// A new, empty file `f` in `dir`, open for direct writes where they are possible.
fn new_file(dir: &Path) -> DirectFile {
    let path = dir.join("f");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    DirectFile::new(file, &path)
}

/// Like [`new_file`], for tests of direct writes alone: `None` (saying so) where `dir` takes
/// none.
fn direct_file(dir: &Path) -> Option<DirectFile> {
    let out = new_file(dir);
    if out.alignment().is_none() {
        eprintln!("skipped: {} takes no direct writes", dir.display());
        return None;
    }
    Some(out)
}

/// After an fdatasync, the file reads back as `model` (a shorter file, as zeros past its end).
fn assert_reads_back(out: &DirectFile, model: &[u8]) {
    out.file().sync_data().unwrap();
    let mut back = vec![0u8; model.len()];
    let n = out.file().read_at(&mut back, 0).unwrap();
    assert!(back[..n] == model[..n] && model[n..].iter().all(|&b| b == 0));
}

/// `write_at` takes data anywhere in memory: direct through its staging buffer when offset and
/// length fit, buffered otherwise, and each lands where it should.
#[test]
fn copied_writes_from_unaligned_memory_read_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut out = new_file(dir.path());
    let mut model = vec![0u8; 3 << 20];
    // One byte in: the data is not aligned in memory.
    let source: Vec<u8> = (0..(2 << 20) + 1)
        .map(|i| (i * 13 + i / 512) as u8)
        .collect();
    let writes: [(usize, usize); 6] = [
        (0, 2 << 20),                 // whole blocks
        (512 * 3, 512 * 5),           // sectors, short: buffered
        (100, 5000),                  // unaligned: buffered
        ((2 << 20) + 512, 513),       // odd length: buffered
        (4096, 1 << 20),              // over earlier writes
        (512 * 7, MIN_COPIED_DIRECT), // the shortest that goes direct
    ];
    for (at, len) in writes {
        let data = &source[1..1 + len];
        out.write_at(data, at as u64).unwrap();
        model[at..at + len].copy_from_slice(data);
    }
    assert_reads_back(&out, &model);
}

/// Parts land one after the other, whether they go out as one direct write (a sector and a
/// large piece) or buffered (too short, or not aligned).
#[test]
fn parts_are_written_back_to_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut out = new_file(dir.path());
    let mut model = vec![0u8; 5 << 20];
    let head: Vec<u8> = (0..512u32).map(|i| (i * 7) as u8).collect();
    let body: Vec<u8> = (0..(1u32 << 20) + 1)
        .map(|i| (i * 13 + i / 512) as u8)
        .collect();
    let writes: [(usize, &[u8], &[u8]); 4] = [
        (0, &head, &body[1..]), // one direct write, from unaligned memory
        ((2 << 20) + 512, &head, &body[..512]), // short: buffered
        (3 << 20, &head[..100], &body[1..]), // odd head length: buffered
        ((1 << 20) + 4096, &[], &body[1..]), // an empty part
    ];
    for (at, a, b) in writes {
        out.write_parts_at(&[a, b], at as u64).unwrap();
        model[at..at + a.len()].copy_from_slice(a);
        model[at + a.len()..at + a.len() + b.len()].copy_from_slice(b);
    }
    assert_reads_back(&out, &model);
}

/// Every kind of write lands where it should, direct or not, on the file system the tests
/// run on and on tmpfs (which refuses O_DIRECT) when the machine has one.
#[test]
fn aligned_and_unaligned_writes_read_back_exactly() {
    let mut dirs = vec![tempfile::tempdir().unwrap()];
    if Path::new("/dev/shm").is_dir() {
        if let Ok(d) = tempfile::tempdir_in("/dev/shm") {
            dirs.push(d);
        }
    }
    for dir in dirs {
        let mut out = new_file(dir.path());
        out.file().set_len(3 << 20).unwrap();
        let mut model = vec![0u8; 3 << 20];
        let writes: [(usize, usize); 5] = [
            (0, 2 << 20),   // aligned
            (4096, 8192),   // aligned
            (100, 5000),    // unaligned: buffered
            (1 << 20, 513), // aligned start, odd length
            ((2 << 20) + 512, 4096 * 3),
        ];
        for (n, (at, len)) in writes.into_iter().enumerate() {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + n) as u8).collect();
            let mut staged = AlignedBuf::new();
            staged.extend_from_slice(&data);
            let spare = out.submit_aligned(staged, at as u64).unwrap();
            assert!(spare.is_empty());
            model[at..at + len].copy_from_slice(&data);
        }
        let mut staged = AlignedBuf::new();
        staged.extend_from_slice(&[9u8; 1000]);
        staged.pad_to(4096);
        model[8192..8192 + 4096].copy_from_slice(staged.as_slice());
        out.submit_aligned(staged, 8192).unwrap();
        out.sync_data().unwrap();
        let mut back = vec![0u8; model.len()];
        out.file().read_exact_at(&mut back, 0).unwrap();
        assert!(back == model, "content differs in {}", dir.path().display());
    }
}

/// Gathered writes reach the file only at `end_gather`, joined where they continue each
/// other, and in the order they were made where they overlap writes that were not gathered
/// (a later buffered write over gathered bytes wins, and so does a later gathered write).
#[test]
fn gathered_writes_land_in_order_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut out) = direct_file(dir.path()) else {
        return;
    };
    let mut model = vec![0u8; 24 << 20];
    let data: Vec<u8> = (0..(4u32 << 20) + 1)
        .map(|i| (i * 31 + i / 4096) as u8)
        .collect();
    let mb = 1 << 20;
    out.gather();
    let write = |out: &mut DirectFile, model: &mut [u8], at: usize, len: usize, salt: u8| {
        let piece: Vec<u8> = data[1..1 + len].iter().map(|b| b ^ salt).collect();
        out.write_at(&piece, at as u64).unwrap();
        model[at..at + len].copy_from_slice(&piece);
    };
    write(&mut out, &mut model, 0, mb, 1); // starts a run
    write(&mut out, &mut model, mb, mb, 2); // continues it
    write(&mut out, &mut model, 2 * mb, mb, 3); // continues it

    // Held back so far: nothing is in the file yet.
    let mut first = vec![0u8; 4096];
    let n = out.file().read_at(&mut first, 0).unwrap();
    assert!(
        n == 0 || first[..n].iter().all(|&b| b == 0),
        "written early"
    );
    write(&mut out, &mut model, 100, 5000, 4); // buffered, over the run: writes the run first
    write(&mut out, &mut model, 8 * mb, 4 * mb, 5); // a new run
    write(&mut out, &mut model, 12 * mb, 4 * mb, 6); // continues it: GATHER_MAX held now
    write(&mut out, &mut model, 16 * mb, mb, 7); // continues it, but past GATHER_MAX
    assert_eq!(GATHER_MAX, 8 * mb);
    // So the full run went out, and this piece starts the next.
    out.wait().unwrap();
    let mut run = vec![0u8; 8 * mb];
    out.file().read_exact_at(&mut run, 8 * mb as u64).unwrap();
    assert!(
        run == model[8 * mb..16 * mb],
        "a run longer than GATHER_MAX"
    );
    write(&mut out, &mut model, 16 * mb + 4096, mb, 8); // over the held piece, not continuing it
    write(&mut out, &mut model, 20 * mb, 4 * mb, 9);
    out.end_gather().unwrap();
    assert_reads_back(&out, &model);
    // Not gathering any more: a write goes out at once.
    write(&mut out, &mut model, 0, mb, 10);
    out.file().read_exact_at(&mut first, 0).unwrap();
    assert_eq!(first, model[..4096]);
}

/// Gathered bytes a careless owner never wrote out are written when the file is dropped.
#[test]
fn gathered_bytes_are_written_on_drop() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut out) = direct_file(dir.path()) else {
        return;
    };
    let piece = vec![5u8; 1 << 20];
    out.gather();
    out.write_at(&piece, 0).unwrap();
    drop(out);
    let back = std::fs::read(dir.path().join("f")).unwrap();
    assert_eq!(back, piece);
}

/// Many writes in flight at once, some over others still in flight, land as if made one
/// after the other: the last write of each byte wins.
#[test]
fn writes_in_flight_land_in_the_order_they_were_made() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut out) = direct_file(dir.path()) else {
        return;
    };
    let mb = 1usize << 20;
    let mut model = vec![0u8; 8 * mb];
    let mut seed = 7u64;
    for n in 0..64u8 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let at = (seed >> 33) as usize % 7 * mb + (seed >> 20) as usize % 4 * 4096;
        let len = mb / 4 * (1 + n as usize % 4);
        let mut buf = AlignedBuf::new();
        buf.extend_from_slice(&vec![n; len]);
        let spare = out.submit_aligned(buf, at as u64).unwrap();
        assert!(spare.is_empty());
        model[at..at + len].fill(n);
    }
    // A buffered write over bytes in flight lands after them.
    out.write_at(&[0xee; 100], 3 * mb as u64 + 1).unwrap();
    model[3 * mb + 1..3 * mb + 101].fill(0xee);
    out.wait().unwrap();
    assert_reads_back(&out, &model);
}

/// A write that fails in flight is reported by the next wait, once, and the writes after it
/// still land.
#[test]
fn a_write_failing_in_flight_is_reported_by_the_next_wait() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut out) = direct_file(dir.path()) else {
        return;
    };
    // The writer threads write through this descriptor: read-only, every write fails (EBADF).
    let (good, align) = out.direct.take().unwrap();
    let read_only = File::open(dir.path().join("f")).unwrap();
    out.direct = Some((Arc::new(read_only), align));
    let mut buf = AlignedBuf::new();
    buf.extend_from_slice(&[1u8; 1 << 20]);
    out.submit_aligned(buf, 0).unwrap();
    let e = out.wait().unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(rustix::io::Errno::BADF.raw_os_error())
    );
    out.wait().unwrap();
    out.direct = Some((good, align));
    let mut buf = AlignedBuf::new();
    buf.extend_from_slice(&[2u8; 1 << 20]);
    out.submit_aligned(buf, 0).unwrap();
    out.wait().unwrap();
    assert_reads_back(&out, &[2u8; 1 << 20]);
}
