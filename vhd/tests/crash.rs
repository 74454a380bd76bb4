//! Crash safety: files cut short, torn last writes, and synthetic crash states built from the
//! documented write order.
//!
//! The synthetic states take the file after one flush (S1) and after the next (S2) and mix
//! their 512-byte sectors the way a crash could, given the order in the crate docs:
//! * before the first `fdatasync` of flush: any subset of data / new-block sectors, any file
//!   length between the two, no metadata;
//! * during step 2: all data, any subset of BAT and grown-bitmap sectors, one of them torn;
//! * during the hole punching of step 3: everything, discarded blocks partly punched.
//!
//! Every such state must open, and every virtual sector must read as its content at S1 or at
//! S2 (sectors not written in between: exactly their S1 content).

mod common;

use std::path::Path;

use common::{assert_image_eq, random_writes, write_both, Rng};
use vhd::{CreateOptions, DynamicHeader, Error, Footer, Image, Notice};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 64 << 10;

/// Reads the on-disk BAT of an image held in `bytes`: (table offset, entries, bitmap size).
fn bat_of(bytes: &[u8]) -> (u64, Vec<u32>, u64) {
    let footer = Footer::parse(bytes[..512].try_into().expect("512")).expect("footer copy");
    let at = footer.data_offset as usize;
    let header = DynamicHeader::parse(bytes[at..at + 1024].try_into().expect("1024"), at as u64)
        .expect("header");
    let t = header.table_offset as usize;
    let entries = (0..header.max_table_entries as usize)
        .map(|i| u32::from_be_bytes(bytes[t + 4 * i..t + 4 * i + 4].try_into().expect("4")))
        .collect();
    (header.table_offset, entries, header.bitmap_size())
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Class {
    /// Written before the first fdatasync of flush (data, new blocks, new footer).
    Data,
    /// BAT sectors and bitmaps of blocks referenced at S1.
    Publish,
    /// Discarded blocks, punched after the BAT is durable.
    Punch,
}

struct Scenario {
    s1: Vec<u8>,
    s2: Vec<u8>,
    /// File sector index → class, for sectors that differ between S1 and S2.
    changed: Vec<(usize, Class)>,
    model1: Vec<u8>,
    model2: Vec<u8>,
}

/// Builds S1 and S2 for a dynamic image or (with `parent`) a differencing child.
fn scenario(dir: &Path, differencing: bool, seed: u64) -> Scenario {
    let size = 4 * MIB;
    let path = dir.join(format!("s{seed}.vhd"));
    let mut rng = Rng::new(seed);
    let mut model = vec![0u8; size as usize];
    let mut img = if differencing {
        let base = dir.join(format!("base{seed}.vhd"));
        let mut parent = Image::create(
            &base,
            &CreateOptions::dynamic(size).block_size(BLOCK as u32),
        )
        .expect("parent");
        random_writes(&mut parent, &mut model, &mut rng, 60);
        parent.close().expect("close parent");
        Image::create_differencing(&path, &base).expect("child")
    } else {
        Image::create(
            &path,
            &CreateOptions::dynamic(size).block_size(BLOCK as u32),
        )
        .expect("create")
    };
    random_writes(&mut img, &mut model, &mut rng, 40);
    img.flush().expect("flush 1");
    let s1 = std::fs::read(&path).expect("read S1");
    let model1 = model.clone();
    // Discards first (see the module docs: a write followed by a discard of the same block
    // would make a legitimate intermediate state that is neither S1 nor S2).
    if !differencing {
        for _ in 0..3 {
            let b = rng.below(size / BLOCK);
            img.discard(b * BLOCK, BLOCK).expect("discard");
            model[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize].fill(0);
        }
    }
    random_writes(&mut img, &mut model, &mut rng, 40);
    // Small unaligned writes grow the bitmaps of blocks that already exist.
    for _ in 0..10 {
        let off = rng.below(size - 600);
        let len = 1 + rng.below(600) as usize;
        let data = rng.bytes(len);
        write_both(&mut img, &mut model, &data, off);
    }
    img.close().expect("flush 2");
    let s2 = std::fs::read(&path).expect("read S2");

    let (bat_at, entries1, bitmap_size) = bat_of(&s1);
    let (_, entries2, _) = bat_of(&s2);
    let bat_sectors =
        (bat_at / 512) as usize..((bat_at + 4 * entries1.len() as u64).div_ceil(512)) as usize;
    let mut class_of = vec![Class::Data; s2.len().max(s1.len()).div_ceil(512)];
    for s in bat_sectors {
        class_of[s] = Class::Publish;
    }
    for (i, &e) in entries1.iter().enumerate() {
        if e == u32::MAX {
            continue;
        }
        let first = e as usize;
        let bitmap_end = first + (bitmap_size / 512) as usize;
        if entries2[i] == e {
            for c in &mut class_of[first..bitmap_end] {
                *c = Class::Publish;
            }
        } else {
            let end = first + ((bitmap_size + BLOCK) / 512) as usize;
            for c in &mut class_of[first..end] {
                *c = Class::Punch;
            }
        }
    }
    let sector = |v: &[u8], i: usize| -> Vec<u8> {
        let mut s = vec![0u8; 512];
        let from = (i * 512).min(v.len());
        let to = (i * 512 + 512).min(v.len());
        s[..to - from].copy_from_slice(&v[from..to]);
        s
    };
    let changed = (0..class_of.len())
        .filter(|&i| sector(&s1, i) != sector(&s2, i))
        .map(|i| (i, class_of[i]))
        .collect();
    std::fs::remove_file(&path).expect("remove");
    Scenario {
        s1,
        s2,
        changed,
        model1,
        model2: model,
    }
}

/// One crash state of `sc`, per `phase` (0: before the data sync, 1: during publish, 2: during
/// punching).
fn crash_state(sc: &Scenario, phase: u64, rng: &mut Rng) -> Vec<u8> {
    let mut out = sc.s1.clone();
    let len2 = sc.s2.len();
    out.resize(len2.max(out.len()), 0);
    let copy = |out: &mut Vec<u8>, i: usize, upto: usize| {
        let from = i * 512;
        let to = (from + upto).min(len2);
        if from < to {
            out[from..to].copy_from_slice(&sc.s2[from..to]);
        }
    };
    let torn = if phase == 1 {
        let publish: Vec<usize> = sc
            .changed
            .iter()
            .filter(|c| c.1 == Class::Publish)
            .map(|c| c.0)
            .collect();
        (!publish.is_empty()).then(|| publish[rng.below(publish.len() as u64) as usize])
    } else {
        None
    };
    for &(i, class) in &sc.changed {
        let take = match (phase, class) {
            (0, Class::Data) => rng.below(2) == 0,
            (0, _) => false,
            (1, Class::Data) => true,
            (1, Class::Publish) => rng.below(2) == 0,
            (1, Class::Punch) => false,
            (_, Class::Punch) => rng.below(2) == 0,
            _ => true,
        };
        if Some(i) == torn {
            copy(&mut out, i, 4 * rng.below(128) as usize);
        } else if take {
            copy(&mut out, i, 512);
        }
    }
    let len = if phase == 0 {
        // The file length may have reached anything from S1's to S2's.
        let lo = sc.s1.len();
        match rng.below(3) {
            0 => lo,
            1 => len2,
            _ => lo + rng.below((len2.max(lo) - lo + 1) as u64) as usize,
        }
    } else {
        len2
    };
    out.truncate(len);
    out
}

/// Every sector of `img` reads as in model1 or model2.
fn assert_old_or_new(img: &Image, sc: &Scenario, what: &str) {
    let mut got = vec![0u8; sc.model1.len()];
    img.read_at(&mut got, 0).expect("read");
    for (i, ((g, a), b)) in got
        .chunks(512)
        .zip(sc.model1.chunks(512))
        .zip(sc.model2.chunks(512))
        .enumerate()
    {
        assert!(
            g == a || g == b,
            "{what}: sector {i} is neither old nor new"
        );
    }
}

fn synthetic_crash_states(differencing: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let states = std::env::var("VHD_CRASH_STATES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60u64);
    for seed in 0..4 {
        let sc = scenario(
            dir.path(),
            differencing,
            seed + 100 * u64::from(differencing),
        );
        assert!(sc.changed.iter().any(|c| c.1 == Class::Publish));
        let mut rng = Rng::new(seed);
        for n in 0..states {
            let phase = n % 3;
            let state = crash_state(&sc, phase, &mut rng);
            let path = dir.path().join("crashed.vhd");
            std::fs::write(&path, &state).expect("write state");
            let what = format!("diff={differencing} seed={seed} state={n} phase={phase}");
            let img = Image::open(&path).unwrap_or_else(|e| panic!("{what}: open failed: {e}"));
            assert_old_or_new(&img, &sc, &what);
            drop(img);
            if n % 5 == 0 {
                // Read-write open repairs; the image then takes new writes normally.
                let mut img = Image::open_rw(&path).unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_old_or_new(&img, &sc, &what);
                let mut now = vec![0u8; sc.model1.len()];
                img.read_at(&mut now, 0).expect("read");
                write_both(&mut img, &mut now, &[0xee; 3000], 2 * MIB - 1000);
                img.close().expect("close");
                let img = Image::open(&path).expect("reopen");
                assert!(img.notices().is_empty(), "{what}: {:?}", img.notices());
                assert_image_eq(&img, &now);
            }
        }
    }
}

#[test]
fn crash_states_of_a_dynamic_image_open_with_old_or_new_data() {
    synthetic_crash_states(false);
}

#[test]
fn crash_states_of_a_differencing_image_open_with_old_or_new_data() {
    synthetic_crash_states(true);
}

#[test]
fn unflushed_writes_are_invisible_and_repaired() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("d.vhd");
    let mut img = Image::create(&path, &CreateOptions::dynamic(16 * MIB)).expect("create");
    let mut model = vec![0u8; 16 * MIB as usize];
    write_both(&mut img, &mut model, &[1u8; 5000], MIB);
    img.flush().expect("flush");
    let flushed = model.clone();
    write_both(&mut img, &mut model, &[2u8; 300_000], 9 * MIB); // new block, never published
    img.drop_without_flush(); // as if the process died here

    let img = Image::open(&path).expect("open after crash");
    assert!(
        matches!(img.notices()[0], Notice::EndFooterUnusable(_)),
        "{:?}",
        img.notices()
    );
    assert!(img
        .notices()
        .iter()
        .any(|n| matches!(n, Notice::UnreferencedTail { .. })));
    assert_image_eq(&img, &flushed);
    drop(img);
    let mut img = Image::open_rw(&path).expect("open rw after crash");
    assert!(img
        .notices()
        .iter()
        .any(|n| matches!(n, Notice::Repaired { .. })));
    let mut model = flushed;
    write_both(&mut img, &mut model, &[3u8; 100], 9 * MIB + 7);
    img.close().expect("close");
    let img = Image::open(&path).expect("reopen");
    assert!(img.notices().is_empty(), "{:?}", img.notices());
    assert_image_eq(&img, &model);
}

#[test]
fn files_cut_short_open_from_the_footer_copy_or_fail_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("d.vhd");
    let mut img = Image::create(
        &path,
        &CreateOptions::dynamic(8 * MIB).block_size(BLOCK as u32),
    )
    .expect("create");
    let mut model = vec![0u8; 8 * MIB as usize];
    random_writes(&mut img, &mut model, &mut Rng::new(77), 60);
    img.close().expect("close");
    let full = std::fs::read(&path).expect("read");
    let cut_path = dir.path().join("cut.vhd");
    let mut cuts: Vec<usize> = (1..=1100).collect();
    let mut rng = Rng::new(1);
    cuts.extend((0..200).map(|_| rng.below(full.len() as u64) as usize));
    let (mut opened, mut failed) = (0, 0);
    for cut in cuts {
        let len = full.len().saturating_sub(cut);
        std::fs::write(&cut_path, &full[..len]).expect("write cut file");
        match Image::open(&cut_path) {
            Ok(img) => {
                opened += 1;
                assert!(cut <= 512, "cut {cut} into data must not open");
                assert!(matches!(img.notices()[0], Notice::EndFooterUnusable(_)));
                assert_image_eq(&img, &model);
            }
            Err(e) => {
                failed += 1;
                assert!(cut > 512, "cut {cut} of the footer only must open: {e}");
                assert!(
                    matches!(
                        e,
                        Error::Truncated { .. }
                            | Error::NotVhd { .. }
                            | Error::RegionOutsideFile { .. }
                            | Error::BlockOutsideFile { .. }
                    ),
                    "cut {cut}: {e:?}"
                );
            }
        }
    }
    assert!(
        opened >= 512 && failed > 0,
        "opened {opened}, failed {failed}"
    );
}

#[test]
fn torn_end_footer_and_fixed_images() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("d.vhd");
    let mut img = Image::create(&path, &CreateOptions::dynamic(4 * MIB)).expect("create");
    img.write_at(b"data", 0).expect("write");
    img.close().expect("close");
    let mut bytes = std::fs::read(&path).expect("read");
    let n = bytes.len();
    bytes[n - 450..].fill(0); // the last write tore the footer after its first 62 bytes
    std::fs::write(&path, &bytes).expect("write");
    let img = Image::open_rw(&path).expect("opens from the copy");
    assert!(matches!(img.notices()[0], Notice::EndFooterUnusable(_)));
    drop(img);
    assert_eq!(std::fs::read(&path).expect("read"), {
        let mut fixed = bytes.clone();
        let copy = fixed[..512].to_vec();
        fixed[n - 512..].copy_from_slice(&copy);
        fixed
    });

    // Fixed images have no footer copy: a cut or torn footer is a clean error.
    let fixed = dir.path().join("f.vhd");
    Image::create(&fixed, &CreateOptions::fixed(MIB))
        .expect("create")
        .close()
        .expect("close");
    let bytes = std::fs::read(&fixed).expect("read");
    std::fs::write(&fixed, &bytes[..bytes.len() - 100]).expect("cut");
    assert!(matches!(Image::open(&fixed), Err(Error::NotVhd { .. })));
    let mut torn = bytes.clone();
    let n = torn.len();
    torn[n - 100] ^= 0xff;
    std::fs::write(&fixed, &torn).expect("tear");
    assert!(matches!(
        Image::open(&fixed),
        Err(Error::BadChecksum { .. })
    ));
}

/// The implementation, not just the model, keeps metadata off the disk until the data is
/// durable: after `write_at` and after step 1 of flush, the on-disk BAT and the bitmaps of
/// existing blocks are byte-identical to the last flush, so a crash there shows no new block.
#[test]
fn writes_and_flush_step_one_leave_published_metadata_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    for differencing in [false, true] {
        let path = dir.path().join(format!("x{differencing}.vhd"));
        let size = 4 * MIB;
        let mut rng = Rng::new(9);
        let mut model = vec![0u8; size as usize];
        let mut img = if differencing {
            let base = dir.path().join("base.vhd");
            let mut p = Image::create(
                &base,
                &CreateOptions::dynamic(size).block_size(BLOCK as u32),
            )
            .expect("parent");
            random_writes(&mut p, &mut model, &mut rng, 30);
            p.close().expect("close");
            Image::create_differencing(&path, &base).expect("child")
        } else {
            Image::create(
                &path,
                &CreateOptions::dynamic(size).block_size(BLOCK as u32),
            )
            .expect("create")
        };
        random_writes(&mut img, &mut model, &mut rng, 30);
        img.flush().expect("flush");
        let s1 = std::fs::read(&path).expect("read");
        let flushed = model.clone();
        let (bat_at, entries, bitmap_size) = bat_of(&s1);
        let bat_range = bat_at as usize..bat_at as usize + 4 * entries.len();
        random_writes(&mut img, &mut model, &mut rng, 30);
        for step in ["write_at", "flush step 1"] {
            if step == "flush step 1" {
                img.flush_data_only().expect("step 1");
            }
            let now = std::fs::read(&path).expect("read");
            assert_eq!(
                &now[bat_range.clone()],
                &s1[bat_range.clone()],
                "{step}: BAT changed"
            );
            for &e in entries.iter().filter(|&&e| e != u32::MAX) {
                let r = e as usize * 512..e as usize * 512 + bitmap_size as usize;
                assert_eq!(
                    &now[r.clone()],
                    &s1[r],
                    "{step}: a published bitmap changed"
                );
            }
            // Blocks allocated since the flush are invisible; sectors overwritten in place in
            // existing blocks may already read new.
            let copy = dir.path().join("copy.vhd");
            std::fs::write(&copy, &now).expect("copy");
            let mut got = vec![0u8; size as usize];
            Image::open(&copy)
                .expect("open copy")
                .read_at(&mut got, 0)
                .expect("read");
            for (b, block) in got.chunks(BLOCK as usize).enumerate() {
                let old = &flushed[b * BLOCK as usize..(b + 1) * BLOCK as usize];
                let new = &model[b * BLOCK as usize..(b + 1) * BLOCK as usize];
                if entries[b] == u32::MAX {
                    assert_eq!(block, old, "{step}: unpublished block {b} is visible");
                }
                for (i, sector) in block.chunks(512).enumerate() {
                    let r = i * 512..i * 512 + 512;
                    assert!(
                        sector == &old[r.clone()] || sector == &new[r],
                        "{step}: block {b}"
                    );
                }
            }
        }
        img.close().expect("close");
        assert_image_eq(&Image::open(&path).expect("reopen"), &model);
    }
}
