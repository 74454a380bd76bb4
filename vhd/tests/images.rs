//! Functional tests of the crate alone: create, open, read and write at any offset,
//! differencing fall-through, zero-write elision, discard, allocated ranges, limits.

mod common;

use common::{assert_image_eq, random_writes, write_both, Rng};
use std::path::Path;
use vhd::{CreateOptions, DiskType, Error, Image, MAX_DISK_SIZE};

const MIB: u64 = 1 << 20;

#[test]
fn fixed_and_dynamic_random_io_roundtrip() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, opts) in [
        ("fixed.vhd", CreateOptions::fixed(9 * MIB + 512)),
        ("dynamic.vhd", CreateOptions::dynamic(9 * MIB + 512)),
        (
            "small-blocks.vhd",
            CreateOptions::dynamic(9 * MIB + 512).block_size(64 << 10),
        ),
    ] {
        let path = dir.path().join(name);
        let mut img = Image::create(&path, &opts).expect("create");
        let mut model = vec![0u8; img.size() as usize];
        let mut rng = Rng::new(name.len() as u64);
        random_writes(&mut img, &mut model, &mut rng, 300);
        flush_write_more_and_reopen(img, &mut model, &mut rng, &path);
    }
}

/// Direct data writes (where the file system takes them) and buffered ones, mixed at every
/// alignment and with overwrites of each other's ranges, read back as one model: before and
/// after a flush, and from a fresh open.
#[test]
fn direct_writes_read_back_like_buffered_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("direct.vhd");
    let mut img = Image::create(&path, &CreateOptions::dynamic(9 * MIB + 512)).expect("create");
    let mut model = vec![0u8; img.size() as usize];
    let mut rng = Rng::new(11);
    random_writes(&mut img, &mut model, &mut rng, 100);
    img.flush().expect("flush");
    let direct = img.write_direct().expect("direct writes");
    println!("direct writes in use: {direct}");
    random_writes(&mut img, &mut model, &mut rng, 300);
    // Whole blocks and long sector-aligned pieces go direct; short ones through the cache.
    write_both(&mut img, &mut model, &vec![0x5a; 2 * MIB as usize], 4 * MIB);
    write_both(&mut img, &mut model, &vec![0xc3; 512 * 513], 6 * MIB + 512);
    write_both(&mut img, &mut model, &vec![0x3c; 512 * 9], 6 * MIB + 4096);
    flush_write_more_and_reopen(img, &mut model, &mut rng, &path);
    // Read-only and fixed images have nothing to write direct.
    let mut fixed =
        Image::create(dir.path().join("f.vhd"), &CreateOptions::fixed(MIB)).expect("create");
    assert!(!fixed.write_direct().expect("fixed"));
    let mut ro = Image::open(&path).expect("open");
    assert!(!ro.write_direct().expect("read-only"));
}

#[test]
fn unallocated_reads_zero_and_zero_writes_do_not_allocate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("d.vhd");
    let mut img = Image::create(&path, &CreateOptions::dynamic(16 * MIB)).expect("create");
    let len_before = img.file_len();
    img.write_at(&vec![0u8; 5 * MIB as usize], MIB)
        .expect("zeros");
    img.write_at(&[0u8; 3], 7).expect("zeros");
    assert_eq!(img.allocated_blocks(), Some(0));
    assert_eq!(img.file_len(), len_before);
    let mut buf = vec![1u8; 4096];
    img.read_at(&mut buf, 10 * MIB).expect("read");
    assert!(buf.iter().all(|&b| b == 0));
    // Zeros into an allocated block are real writes.
    img.write_at(&[9u8; 10], 3 * MIB).expect("write");
    img.write_at(&[0u8; 5], 3 * MIB + 2).expect("zero write");
    let mut b = [0u8; 10];
    img.read_at(&mut b, 3 * MIB).expect("read");
    assert_eq!(b, [9, 9, 0, 0, 0, 0, 0, 9, 9, 9]);
    assert_eq!(img.allocated_blocks(), Some(1));
    assert_eq!(img.allocated_ranges(), vec![2 * MIB..4 * MIB]);
}

#[test]
fn out_of_bounds_and_read_only_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("d.vhd");
    let mut img = Image::create(&path, &CreateOptions::dynamic(4 * MIB)).expect("create");
    assert!(matches!(
        img.write_at(&[1], 4 * MIB),
        Err(Error::OutOfBounds { .. })
    ));
    assert!(matches!(
        img.read_at(&mut [0u8; 2], 4 * MIB - 1),
        Err(Error::OutOfBounds { .. })
    ));
    assert!(matches!(
        img.read_at(&mut [0u8; 2], u64::MAX),
        Err(Error::OutOfBounds { .. })
    ));
    img.close().expect("close");
    let mut ro = Image::open(&path).expect("open");
    assert!(matches!(ro.write_at(&[1], 0), Err(Error::ReadOnly)));
    assert!(matches!(ro.discard(0, MIB), Err(Error::ReadOnly)));
    ro.flush().expect("flush of a read-only image is a no-op");
}

#[test]
fn creation_arguments_are_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = |n: &str| dir.path().join(n);
    assert!(matches!(
        Image::create(p("a"), &CreateOptions::dynamic(1000)),
        Err(Error::InvalidSize { .. })
    ));
    assert!(matches!(
        Image::create(p("b"), &CreateOptions::dynamic(0)),
        Err(Error::InvalidSize { .. })
    ));
    assert!(matches!(
        Image::create(p("c"), &CreateOptions::dynamic(MAX_DISK_SIZE + 512)),
        Err(Error::TooLarge { .. })
    ));
    assert!(matches!(
        Image::create(p("d"), &CreateOptions::dynamic(MIB).block_size(3 << 20)),
        Err(Error::InvalidArgument(_))
    ));
    Image::create(p("e"), &CreateOptions::dynamic(MIB)).expect("create");
    assert!(matches!(
        Image::create(p("e"), &CreateOptions::dynamic(MIB)),
        Err(Error::Io { .. })
    ));
}

#[test]
fn largest_disk_works_at_both_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, opts) in [
        CreateOptions::dynamic(MAX_DISK_SIZE),
        CreateOptions::fixed(MAX_DISK_SIZE),
    ]
    .iter()
    .enumerate()
    {
        let path = dir.path().join(format!("{i}.vhd"));
        let mut img = Image::create(&path, opts).expect("create 2040 GiB");
        assert_eq!(img.size(), MAX_DISK_SIZE);
        img.write_at(b"first", 0).expect("write start");
        img.write_at(b"last!", MAX_DISK_SIZE - 5)
            .expect("write end");
        img.close().expect("close");
        let img = Image::open(&path).expect("reopen");
        let mut b = [0u8; 5];
        img.read_at(&mut b, MAX_DISK_SIZE - 5).expect("read end");
        assert_eq!(&b, b"last!");
        img.read_at(&mut b, 0).expect("read start");
        assert_eq!(&b, b"first");
    }
}

#[test]
fn discard_unmaps_whole_blocks_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("d.vhd");
    let size = 10 * MIB + 512; // the last block is partial
    let mut img = Image::create(&path, &CreateOptions::dynamic(size)).expect("create");
    let mut model = vec![0u8; size as usize];
    let data = Rng::new(5).bytes(size as usize);
    write_both(&mut img, &mut model, &data, 0);
    img.flush().expect("flush");
    assert_eq!(img.allocated_blocks(), Some(6));
    // 1 MiB..5 MiB covers block 1 (2..4 MiB) wholly, blocks 0 and 2 partly.
    assert_eq!(img.discard(MIB, 4 * MIB).expect("discard"), 2 * MIB);
    model[2 * MIB as usize..4 * MIB as usize].fill(0);
    // Reaching the end of the disk discards the partial last block.
    assert_eq!(img.discard(9 * MIB, size - 9 * MIB).expect("discard"), 512);
    model[10 * MIB as usize..].fill(0);
    assert_image_eq(&img, &model);
    img.flush().expect("flush");
    drop(img);
    let img = Image::open(&path).expect("reopen");
    assert_eq!(img.allocated_blocks(), Some(4));
    assert_image_eq(&img, &model);
    let blocks = std::fs::metadata(&path).expect("stat");
    use std::os::unix::fs::MetadataExt;
    // Hole punching returned the discarded blocks' space (4 blocks of 2 MiB stay).
    assert!(
        blocks.blocks() * 512 < 9 * MIB,
        "{} bytes used",
        blocks.blocks() * 512
    );

    // write_zeroes: whole blocks unmapped, edges zeroed in place.
    let mut img = Image::open_rw(&path).expect("open rw");
    img.write_zeroes(MIB / 2, 6 * MIB).expect("write_zeroes");
    model[MIB as usize / 2..MIB as usize / 2 + 6 * MIB as usize].fill(0);
    assert_image_eq(&img, &model);
    assert_eq!(img.allocated_ranges(), vec![0..2 * MIB, 6 * MIB..10 * MIB]);
}

#[test]
fn differencing_reads_fall_through_and_writes_stay_in_child() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.vhd");
    let size = 8 * MIB;
    let mut parent = Image::create(&base, &CreateOptions::dynamic(size).block_size(64 << 10))
        .expect("create parent");
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng::new(11);
    random_writes(&mut parent, &mut model, &mut rng, 100);
    parent.close().expect("close parent");
    let parent_model = model.clone();

    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).expect("mkdir");
    let child_path = sub.join("child.vhd");
    let mut child = Image::create_differencing(&child_path, &base).expect("create child");
    assert_eq!(child.disk_type(), DiskType::Differencing);
    assert_eq!(child.block_size(), Some(64 << 10));
    assert_image_eq(&child, &model);
    // Unaligned writes into never-written sectors must merge the parent's bytes.
    for (off, len) in [(100u64, 10usize), (65536 * 3 + 511, 2), (777_777, 70_000)] {
        let data = rng.bytes(len);
        write_both(&mut child, &mut model, &data, off);
    }
    random_writes(&mut child, &mut model, &mut rng, 200);
    // Zeros over a region where the parent has data must be stored.
    let zeros = vec![0u8; 200_000];
    write_both(&mut child, &mut model, &zeros, MIB);
    assert_image_eq(&child, &model);
    child.close().expect("close child");

    let child = Image::open(&child_path).expect("reopen child");
    assert_image_eq(&child, &model);
    let parent = child.parent().expect("parent");
    assert_eq!(
        parent.path().canonicalize().expect("parent path"),
        base.canonicalize().expect("base path")
    );
    assert_image_eq(parent, &parent_model);

    // A grandchild sees both layers; moving the whole set keeps relative locators working.
    let gc_path = dir.path().join("gc.vhd");
    let mut gc = Image::create_differencing(&gc_path, &child_path).expect("grandchild");
    write_both(&mut gc, &mut model, b"top", 5);
    gc.close().expect("close");
    let moved = tempfile::tempdir().expect("tempdir");
    std::fs::rename(dir.path(), moved.path().join("moved")).expect("move the set");
    let gc = Image::open(moved.path().join("moved/gc.vhd")).expect("open moved grandchild");
    assert_image_eq(&gc, &model);
}

#[test]
fn allocated_ranges_cover_all_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.vhd");
    let mut parent = Image::create(&base, &CreateOptions::dynamic(32 * MIB)).expect("create");
    parent.write_at(b"x", 0).expect("write");
    parent.write_at(b"y", 20 * MIB).expect("write");
    parent.close().expect("close");
    let mut child = Image::create_differencing(dir.path().join("c.vhd"), &base).expect("child");
    child.write_at(b"z", 2 * MIB + 5).expect("write");
    child.write_at(b"w", 31 * MIB).expect("write");
    assert_eq!(
        child.allocated_ranges(),
        vec![0..4 * MIB, 20 * MIB..22 * MIB, 30 * MIB..32 * MIB]
    );
    let fixed = Image::create(dir.path().join("f.vhd"), &CreateOptions::fixed(MIB)).expect("f");
    assert_eq!(fixed.allocated_ranges(), vec![0..MIB]);
}

#[test]
fn unflushed_image_is_flushed_on_drop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("d.vhd");
    let mut img = Image::create(&path, &CreateOptions::dynamic(8 * MIB)).expect("create");
    img.write_at(b"kept by drop", 3 * MIB).expect("write");
    drop(img);
    let img = Image::open(&path).expect("reopen");
    assert!(img.notices().is_empty(), "{:?}", img.notices());
    let mut b = [0u8; 12];
    img.read_at(&mut b, 3 * MIB).expect("read");
    assert_eq!(&b, b"kept by drop");
}

#[test]
fn concurrent_readers_share_an_image() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("d.vhd");
    let mut img = Image::create(&path, &CreateOptions::dynamic(16 * MIB)).expect("create");
    let mut model = vec![0u8; 16 * MIB as usize];
    random_writes(&mut img, &mut model, &mut Rng::new(3), 100);
    img.close().expect("close");
    let img = std::sync::Arc::new(std::sync::RwLock::new(Image::open(&path).expect("open")));
    let model = std::sync::Arc::new(model);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (img, model) = (img.clone(), model.clone());
            std::thread::spawn(move || {
                assert_image_eq(&img.read().expect("lock"), &model);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("reader thread");
    }
    assert!(img.read().expect("lock").notices().is_empty());
}

/// Checks `img` against `model`, flushes, writes more, closes, and checks a fresh open of
/// `path` (which must notice nothing) against the model.
fn flush_write_more_and_reopen(mut img: Image, model: &mut [u8], rng: &mut Rng, path: &Path) {
    assert_image_eq(&img, model);
    img.flush().expect("flush");
    random_writes(&mut img, model, rng, 50);
    img.close().expect("close");
    let img = Image::open(path).expect("reopen");
    assert!(
        img.notices().is_empty(),
        "{}: {:?}",
        path.display(),
        img.notices()
    );
    assert_image_eq(&img, model);
}

/// A gathered write that fails (the disk refused it) drops what was held, a new block's
/// bitmap among it. The writer retries, as the master target does, and the image must read
/// back right after the flush and a reopen: the bitmap is written again at the flush.
#[test]
fn a_failed_gathered_write_costs_no_bitmap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("g.vhd");
    let mut img = Image::create(&path, &CreateOptions::dynamic(8 * MIB)).expect("create");
    if !img.write_direct().expect("direct writes") {
        println!("skipped: {} takes no direct writes", dir.path().display());
        return;
    }
    let mut model = vec![0u8; img.size() as usize];
    let data = Rng::new(3).bytes(MIB as usize);
    img.fail_direct_writes(1);
    let failed = img.gathered(|img| img.write_at(&data, 0));
    assert!(failed.is_err(), "the injected failure reaches the caller");
    // The retry: block 0 is allocated now, so only its data is written.
    img.gathered(|img| img.write_at(&data, 0)).expect("retry");
    model[..MIB as usize].copy_from_slice(&data);
    img.close().expect("close");
    assert_image_eq(&Image::open(&path).expect("reopen"), &model);
}
