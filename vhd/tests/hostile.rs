//! Malformed and hostile files: each defect maps to a typed error, and a property test feeds
//! arbitrary bytes and structure-aware mutations of valid images to the parser.
//!
//! `VHD_FUZZ_CASES=N` raises the number of property-test cases (default 1500 per property).

mod common;

use std::path::Path;

use common::{random_writes, Rng};
use proptest::prelude::*;
use vhd::{CreateOptions, DynamicHeader, Error, Footer, Image, MAX_CHAIN_DEPTH};

const MIB: u64 = 1 << 20;

/// A dynamic image with a few blocks, as bytes.
fn dynamic_bytes(dir: &Path) -> Vec<u8> {
    let path = dir.join("valid.vhd");
    let _ = std::fs::remove_file(&path);
    let mut img = Image::create(&path, &CreateOptions::dynamic(8 * MIB)).expect("create");
    img.write_at(&[1u8; 1000], 0).expect("write");
    img.write_at(&[2u8; 1000], 5 * MIB).expect("write");
    img.close().expect("close");
    std::fs::read(&path).expect("read")
}

/// Rewrites both footers after `f` edits the decoded footer (so checksums stay valid).
fn patch_footer(bytes: &mut [u8], f: impl Fn(&mut Footer)) {
    let mut footer = Footer::parse(bytes[..512].try_into().expect("512")).expect("footer");
    f(&mut footer);
    let enc = footer.to_bytes();
    let n = bytes.len();
    bytes[..512].copy_from_slice(&enc);
    bytes[n - 512..].copy_from_slice(&enc);
}

/// Rewrites the dynamic header at 512 after `f` edits it.
fn patch_header(bytes: &mut [u8], f: impl Fn(&mut DynamicHeader)) {
    let mut h =
        DynamicHeader::parse(bytes[512..1536].try_into().expect("1024"), 512).expect("header");
    f(&mut h);
    bytes[512..1536].copy_from_slice(&h.to_bytes());
}

fn set_bat(bytes: &mut [u8], index: usize, value: u32) {
    let at = 1536 + 4 * index;
    bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

fn open_bytes(dir: &Path, bytes: &[u8]) -> Result<Image, Error> {
    let path = dir.join("hostile.vhd");
    std::fs::write(&path, bytes).expect("write");
    Image::open(&path)
}

#[test]
fn each_defect_has_a_typed_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let valid = dynamic_bytes(d);
    let first_block = u32::from_be_bytes(valid[1536..1540].try_into().expect("4"));
    assert!(open_bytes(d, &valid).is_ok());

    type Case = (&'static str, Box<dyn Fn(&mut Vec<u8>)>, fn(&Error) -> bool);
    let cases: Vec<Case> = vec![
        (
            "both footers corrupt",
            Box::new(|b| {
                let n = b.len();
                b[100] ^= 1;
                b[n - 412] ^= 1;
            }),
            |e| {
                matches!(
                    e,
                    Error::BadChecksum {
                        structure: "footer",
                        ..
                    }
                )
            },
        ),
        ("header checksum", Box::new(|b| b[1000] ^= 1), |e| {
            matches!(
                e,
                Error::BadChecksum {
                    structure: "dynamic header",
                    ..
                }
            )
        }),
        (
            "header cookie",
            Box::new(|b| {
                patch_footer(b, |f| f.data_offset = 2048);
            }),
            |e| matches!(e, Error::BadHeaderCookie { .. }),
        ),
        (
            "header outside file",
            Box::new(|b| patch_footer(b, |f| f.data_offset = u64::MAX - 5)),
            |e| matches!(e, Error::RegionOutsideFile { .. }),
        ),
        (
            "disk type",
            Box::new(|b| {
                // Re-encode by hand: Footer cannot hold an unknown type.
                let n = b.len();
                for at in [0, n - 512] {
                    b[at + 60..at + 64].copy_from_slice(&7u32.to_be_bytes());
                    let sum = !b[at..at + 512]
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| !(64..68).contains(i))
                        .fold(0u32, |a, (_, &x)| a.wrapping_add(u32::from(x)));
                    b[at + 64..at + 68].copy_from_slice(&sum.to_be_bytes());
                }
            }),
            |e| matches!(e, Error::UnsupportedDiskType(7)),
        ),
        (
            "absurd size",
            Box::new(|b| patch_footer(b, |f| f.current_size = 1 << 50)),
            |e| matches!(e, Error::TooLarge { .. }),
        ),
        (
            "table too small",
            Box::new(|b| patch_header(b, |h| h.max_table_entries = 2)),
            |e| matches!(e, Error::TableTooSmall { .. }),
        ),
        (
            "absurd table",
            Box::new(|b| patch_header(b, |h| h.max_table_entries = u32::MAX)),
            |e| matches!(e, Error::RegionOutsideFile { .. }),
        ),
        (
            "table on the header",
            Box::new(|b| patch_header(b, |h| h.table_offset = 1024)),
            |e| matches!(e, Error::Overlap { .. }),
        ),
        (
            "block size",
            Box::new(|b| patch_header(b, |h| h.block_size = 3 << 20)),
            |e| matches!(e, Error::Unsupported(_)),
        ),
        (
            "block past the end",
            Box::new(|b| set_bat(b, 1, 0x00ff_ffff)),
            |e| matches!(e, Error::BlockOutsideFile { block: 1, .. }),
        ),
        ("block on the header", Box::new(|b| set_bat(b, 3, 1)), |e| {
            matches!(e, Error::Overlap { .. })
        }),
        (
            "block on the footer copy",
            Box::new(|b| set_bat(b, 3, 0)),
            |e| matches!(e, Error::Overlap { .. }),
        ),
        ("block on the BAT", Box::new(|b| set_bat(b, 3, 3)), |e| {
            matches!(e, Error::Overlap { .. })
        }),
        (
            "blocks overlap",
            Box::new(move |b| set_bat(b, 3, first_block + 8)),
            |e| matches!(e, Error::Overlap { .. }),
        ),
        (
            "cut into a block",
            Box::new(|b| {
                let n = b.len();
                b.truncate(n - 4096);
            }),
            |e| matches!(e, Error::Truncated { .. }),
        ),
        ("too short", Box::new(|b| b.truncate(100)), |e| {
            matches!(e, Error::NotVhd { .. })
        }),
        (
            "not a vhd",
            Box::new(|b| b.iter_mut().for_each(|x| *x = 0x5a)),
            |e| matches!(e, Error::NotVhd { .. }),
        ),
        (
            "differencing without locators",
            Box::new(|b| {
                patch_footer(b, |f| f.disk_type = vhd::DiskType::Differencing);
            }),
            |e| matches!(e, Error::ParentNotFound { .. }),
        ),
        (
            "locator outside the file",
            Box::new(|b| {
                patch_footer(b, |f| f.disk_type = vhd::DiskType::Differencing);
                patch_header(b, |h| {
                    h.locators[0].platform_code = *b"W2ru";
                    h.locators[0].data_length = 100;
                    h.locators[0].data_offset = 1 << 40;
                });
            }),
            |e| matches!(e, Error::RegionOutsideFile { .. }),
        ),
    ];
    for (name, mutate, expected) in cases {
        let mut b = valid.clone();
        mutate(&mut b);
        match open_bytes(d, &b) {
            Ok(_) => panic!("{name}: opened"),
            Err(e) => assert!(expected(&e), "{name}: unexpected error {e:?}"),
        }
    }

    // A fixed image whose footer claims more data than the file holds.
    let fixed = d.join("fixed.vhd");
    Image::create(&fixed, &CreateOptions::fixed(MIB)).expect("create");
    let mut b = std::fs::read(&fixed).expect("read");
    let mut f = Footer::parse(b[b.len() - 512..].try_into().expect("512")).expect("footer");
    f.current_size = 64 * MIB;
    let n = b.len();
    b[n - 512..].copy_from_slice(&f.to_bytes());
    assert!(matches!(open_bytes(d, &b), Err(Error::InvalidSize { .. })));
}

#[test]
fn parent_chains_are_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let a = d.join("a.vhd");
    let b = d.join("b.vhd");
    Image::create(&a, &CreateOptions::dynamic(4 * MIB))
        .expect("a")
        .close()
        .expect("close");
    Image::create_differencing(&b, &a)
        .expect("b")
        .close()
        .expect("close");

    // Missing parent.
    std::fs::rename(&a, d.join("a.moved")).expect("move");
    assert!(matches!(Image::open(&b), Err(Error::ParentNotFound { .. })));
    // A different image in the parent's place.
    Image::create(&a, &CreateOptions::dynamic(4 * MIB))
        .expect("impostor")
        .close()
        .expect("close");
    assert!(matches!(Image::open(&b), Err(Error::ParentMismatch { .. })));
    // A loop: a's place taken by a child of b (b → a → b).
    std::fs::remove_file(&a).expect("rm");
    std::fs::rename(d.join("a.moved"), &a).expect("restore");
    let loop_child = d.join("tmp.vhd");
    Image::create_differencing(&loop_child, &b)
        .expect("child of b")
        .close()
        .expect("close");
    std::fs::rename(&loop_child, &a).expect("replace a");
    assert!(
        matches!(Image::open(&b), Err(Error::ParentLoop(_))),
        "{:?}",
        Image::open(&b).err()
    );

    // Depth: a chain longer than MAX_CHAIN_DEPTH.
    let base = d.join("c0.vhd");
    Image::create(&base, &CreateOptions::dynamic(MIB))
        .expect("c0")
        .close()
        .expect("close");
    let mut prev = base;
    for i in 1..=MAX_CHAIN_DEPTH {
        let next = d.join(format!("c{i}.vhd"));
        let made = Image::create_differencing(&next, &prev);
        if i < MAX_CHAIN_DEPTH {
            made.expect("chain link").close().expect("close");
        } else {
            assert!(matches!(made, Err(Error::ParentChainTooDeep(_))));
        }
        prev = next;
    }
}

/// Runs everything a caller might do with a file: open read-only and read, open read-write,
/// write, flush, reopen. Must never panic; a file the crate accepted and wrote must reopen
/// and read back what was written.
fn exercise(dir: &Path, bytes: &[u8]) {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    // Outcome counts, printed every 10000 cases so a long run shows how deep it gets.
    static STATS: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
    let total = STATS[0].fetch_add(1, Relaxed) + 1;
    if total % 10_000 == 0 {
        eprintln!(
            "fuzz: {total} cases, {} opened, {} written and reopened",
            STATS[1].load(Relaxed),
            STATS[2].load(Relaxed)
        );
    }
    let path = dir.join("child.vhd");
    std::fs::write(&path, bytes).expect("write case");
    if let Ok(img) = Image::open(&path) {
        STATS[1].fetch_add(1, Relaxed);
        let size = img.size();
        let len = size.min(MIB);
        let mut buf = vec![0u8; len as usize];
        let _ = img.read_at(&mut buf, 0);
        let _ = img.read_at(&mut buf, size - len);
        for r in img.allocated_ranges().iter().take(16) {
            let n = (r.end - r.start).min(len) as usize;
            let _ = img.read_at(&mut buf[..n], r.start);
        }
    }
    let Ok(mut img) = Image::open_rw(&path) else {
        return;
    };
    let size = img.size();
    if size == 0 {
        return;
    }
    let data: Vec<u8> = (0..size.min(70_000)).map(|i| (i % 251) as u8 + 1).collect();
    let room = size - data.len() as u64;
    let offsets = [0, room, (room / 3 + 1).min(room)];
    for &o in &offsets {
        img.write_at(&data, o).expect("write to an accepted image");
    }
    img.close().expect("flush an accepted image");
    let img = Image::open(&path).expect("an image the crate wrote must reopen");
    let mut back = vec![0u8; data.len()];
    img.read_at(&mut back, offsets[2]).expect("read back");
    assert_eq!(back, data, "written data must read back");
    STATS[2].fetch_add(1, Relaxed);
}

/// Valid images to mutate: a dynamic image with blocks, a differencing child (its parent
/// `base.vhd` stays valid in `dir`), a fixed image.
fn corpus(dir: &Path) -> Vec<Vec<u8>> {
    let mut out = vec![dynamic_bytes(dir)];
    let base = dir.join("base.vhd");
    let mut model = vec![0u8; 2 * MIB as usize];
    let mut p =
        Image::create(&base, &CreateOptions::dynamic(2 * MIB).block_size(64 << 10)).expect("base");
    random_writes(&mut p, &mut model, &mut Rng::new(1), 20);
    p.close().expect("close");
    let child = dir.join("child-src.vhd");
    let mut c = Image::create_differencing(&child, &base).expect("child");
    random_writes(&mut c, &mut model, &mut Rng::new(2), 20);
    c.close().expect("close");
    out.push(std::fs::read(&child).expect("read"));
    let fixed = dir.join("fixed-src.vhd");
    let mut f = Image::create(&fixed, &CreateOptions::fixed(256 << 10)).expect("fixed");
    f.write_at(&[7u8; 3000], 1000).expect("write");
    f.close().expect("close");
    out.push(std::fs::read(&fixed).expect("read"));
    out
}

#[derive(Debug, Clone)]
enum Mutation {
    Byte(prop::sample::Index, u8),
    Word(prop::sample::Index, u32),
    Long(prop::sample::Index, u64),
    Truncate(prop::sample::Index),
    Extend(u16),
}

fn interesting_u32() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(1),
        Just(3),
        Just(4),
        Just(512),
        Just(0xffff_ffff),
        Just(0x7fff_ffff),
        Just(0x0020_0000),
        Just(0x0001_0000),
        any::<u32>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, v)| Mutation::Byte(i, v)),
        (any::<prop::sample::Index>(), interesting_u32()).prop_map(|(i, v)| Mutation::Word(i, v)),
        (
            any::<prop::sample::Index>(),
            prop_oneof![
                Just(0u64),
                Just(u64::MAX),
                Just(512),
                Just(1 << 41),
                any::<u64>()
            ]
        )
            .prop_map(|(i, v)| Mutation::Long(i, v)),
        any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        any::<u16>().prop_map(Mutation::Extend),
    ]
}

/// Recomputes the checksums of the footer copy, the end footer and the header at 512, so
/// that mutations get past the checksum test into the deeper checks.
fn fix_checksums(b: &mut [u8]) {
    let n = b.len();
    let fix = |b: &mut [u8], at: usize, len: usize, field: usize| {
        if at + len > b.len() {
            return;
        }
        let s = &mut b[at..at + len];
        let sum = !s
            .iter()
            .enumerate()
            .filter(|(i, _)| !(field..field + 4).contains(i))
            .fold(0u32, |a, (_, &x)| a.wrapping_add(u32::from(x)));
        s[field..field + 4].copy_from_slice(&sum.to_be_bytes());
    };
    fix(b, 0, 512, 64);
    if n >= 512 {
        fix(b, n - 512, 512, 64);
    }
    fix(b, 512, 1024, 36);
}

fn cases() -> u32 {
    std::env::var("VHD_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Arbitrary bytes, with a footer cookie planted at either end half of the time.
    #[test]
    fn arbitrary_bytes_never_panic(
        mut bytes in prop::collection::vec(any::<u8>(), 0..6000),
        plant in 0u8..4,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let n = bytes.len();
        if n >= 1536 && plant & 1 == 1 {
            bytes[..8].copy_from_slice(b"conectix");
            bytes[512..520].copy_from_slice(b"cxsparse");
        }
        if n >= 512 && plant & 2 == 2 {
            bytes[n - 512..n - 504].copy_from_slice(b"conectix");
        }
        if plant == 3 {
            fix_checksums(&mut bytes);
        }
        exercise(dir.path(), &bytes);
    }

    /// Valid images with a few structure-aware mutations, checksums usually repaired.
    #[test]
    fn mutated_images_never_panic(
        which in 0usize..3,
        mutations in prop::collection::vec(mutation(), 1..6),
        fix in prop::bool::weighted(0.8),
    ) {
        // Built once: creating images syncs files, which would dominate the run time.
        static CORPUS: std::sync::OnceLock<(tempfile::TempDir, Vec<Vec<u8>>)> =
            std::sync::OnceLock::new();
        let (dir, images) = CORPUS.get_or_init(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            let images = corpus(dir.path());
            (dir, images)
        });
        let mut bytes = images[which].clone();
        for m in &mutations {
            let n = bytes.len().max(1);
            // Most fields of interest are in the first 2 KiB or the last 512 bytes.
            let pick = |i: &prop::sample::Index, w: usize| -> Option<usize> {
                let hot = [0usize, 512, 1536, n.saturating_sub(512)];
                let base = hot[i.index(hot.len())];
                let at = (base + i.index(1024)).min(n.saturating_sub(w));
                (at + w <= bytes.len()).then_some(at)
            };
            match m {
                Mutation::Byte(i, v) => if let Some(at) = pick(i, 1) { bytes[at] = *v },
                Mutation::Word(i, v) => if let Some(at) = pick(i, 4) {
                    bytes[at..at + 4].copy_from_slice(&v.to_be_bytes())
                },
                Mutation::Long(i, v) => if let Some(at) = pick(i, 8) {
                    bytes[at..at + 8].copy_from_slice(&v.to_be_bytes())
                },
                Mutation::Truncate(i) => bytes.truncate(i.index(n)),
                Mutation::Extend(k) => bytes.extend(std::iter::repeat_n(0xab, *k as usize)),
            }
        }
        if fix {
            fix_checksums(&mut bytes);
        }
        exercise(dir.path(), &bytes);
    }
}
