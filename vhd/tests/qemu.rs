//! Validation against qemu 10 (`qemu-img`, `qemu-io`): images written by the crate are read
//! by qemu, and images written by qemu are read by the crate, compared byte for byte.
//! Each test prints a reason and passes when qemu-img is not installed.

mod common;

use std::path::Path;

use common::{
    assert_image_eq, have_qemu, qemu_check, qemu_compare_raw, qemu_map, qemu_size, random_writes,
    run_ok, write_raw, Rng,
};
use vhd::{CreateOptions, DiskType, Image, MAX_DISK_SIZE};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn p(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

#[test]
fn qemu_reports_exactly_the_created_size() {
    if !have_qemu("qemu_reports_exactly_the_created_size") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let sizes = [
        512,
        MIB,
        10 * MIB, // not a CHS multiple: qemu would round to 10514432 for its own images
        10 * MIB + 512,
        2 * GIB, // qemu-img create makes this 2147991552
        127 * GIB + 3 * 512,
        65535 * 16 * 255 * 512, // exactly the maximum CHS geometry
        300 * GIB,
        MAX_DISK_SIZE,
    ];
    for (i, &size) in sizes.iter().enumerate() {
        for opts in [CreateOptions::dynamic(size), CreateOptions::fixed(size)] {
            let path = dir.path().join(format!("{i}-{size}.vhd"));
            let _ = std::fs::remove_file(&path);
            let img = Image::create(&path, &opts).expect("create");
            drop(img);
            assert_eq!(qemu_size(&path), size, "size {size} {opts:?}");
            qemu_check(&path);
            std::fs::remove_file(&path).expect("remove");
        }
    }
}

#[test]
fn crate_written_images_match_raw_in_qemu() {
    if !have_qemu("crate_written_images_match_raw_in_qemu") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 37 * MIB + 1024;
    let layouts = [
        ("dyn.vhd", CreateOptions::dynamic(size)),
        ("fixed.vhd", CreateOptions::fixed(size)),
        (
            "dyn64k.vhd",
            CreateOptions::dynamic(size).block_size(64 << 10),
        ),
        // Data written with O_DIRECT where the file system takes it.
        ("dyn-direct.vhd", CreateOptions::dynamic(size)),
        // The same, gathered into large writes (`Image::gathered`).
        ("dyn-direct-gathered.vhd", CreateOptions::dynamic(size)),
    ];
    for (name, opts) in layouts {
        let path = dir.path().join(name);
        let raw = dir.path().join(format!("{name}.raw"));
        let mut img = Image::create(&path, &opts).expect("create");
        let mut model = vec![0u8; size as usize];
        if name.contains("direct") {
            img.write_direct().expect("direct writes");
            // New blocks whose first write starts at their beginning: each one's bitmap goes
            // out in the same write as that data, not with the flush.
            let bs = img.block_size().expect("block size");
            let mut rng = Rng::new(7);
            let half = (bs / 2) as usize;
            common::write_both(&mut img, &mut model, &rng.bytes(half), bs);
            common::write_both(&mut img, &mut model, &rng.bytes(bs as usize), 2 * bs);
            common::write_both(&mut img, &mut model, &rng.bytes(half), bs + half as u64);
        }
        if name.contains("gathered") {
            // A stream of 1 MiB pieces over new blocks (one run of writes in the file), then
            // the varied pattern over it and around, all in one gathering.
            img.gathered(|img| {
                let mut rng = Rng::new(5);
                for at in (8 * MIB..20 * MIB).step_by(MIB as usize) {
                    common::write_both(img, &mut model, &rng.bytes(MIB as usize), at);
                }
                random_writes(img, &mut model, &mut Rng::new(98), 400);
                Ok(())
            })
            .expect("gathered writes");
        }
        random_writes(&mut img, &mut model, &mut Rng::new(99), 400);
        // A recognisable pattern at both ends and a discarded block.
        let ends = vec![0xa5u8; 4096];
        common::write_both(&mut img, &mut model, &ends, 0);
        common::write_both(&mut img, &mut model, &ends, size - 4096);
        if img.disk_type() == DiskType::Dynamic {
            let bs = img.block_size().expect("block size");
            img.discard(4 * bs, bs).expect("discard");
            model[(4 * bs) as usize..(5 * bs) as usize].fill(0);
        }
        let ranges = img.allocated_ranges();
        img.close().expect("close");
        write_raw(&raw, &model);
        qemu_check(&path);
        assert!(qemu_compare_raw(&path, &raw), "{name} differs in qemu");
        // qemu reads through the BAT alone; this crate, reopened, also trusts the bitmaps.
        common::assert_image_eq(&Image::open(&path).expect("reopen"), &model);
        if opts != CreateOptions::fixed(size) {
            let ours: Vec<(u64, u64)> = ranges.iter().map(|r| (r.start, r.end)).collect();
            assert_eq!(
                qemu_map(&path),
                ours,
                "{name}: qemu-img map vs allocated_ranges"
            );
        }
    }
}

#[test]
fn qemu_can_write_into_crate_images_and_back() {
    if !have_qemu("qemu_can_write_into_crate_images_and_back") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("d.vhd");
    let size = 20 * MIB;
    let mut img = Image::create(&path, &CreateOptions::dynamic(size)).expect("create");
    let mut model = vec![0u8; size as usize];
    random_writes(&mut img, &mut model, &mut Rng::new(7), 50);
    img.close().expect("close");
    // qemu appends its own blocks after ours and rewrites the footer.
    run_ok(
        "qemu-io",
        &[
            "-f",
            "vpc",
            "-c",
            "write -P 0x5a 17M 100k",
            "-c",
            "write -P 0x11 1000 3000",
            p(&path),
        ],
    );
    model[17 * MIB as usize..17 * MIB as usize + 100 * 1024].fill(0x5a);
    model[1000..4000].fill(0x11);
    let mut img = Image::open_rw(&path).expect("reopen after qemu");
    assert!(img.notices().is_empty(), "{:?}", img.notices());
    assert_image_eq(&img, &model);
    common::write_both(&mut img, &mut model, &[0x77; 5000], 19 * MIB);
    img.close().expect("close");
    let raw = dir.path().join("d.raw");
    write_raw(&raw, &model);
    assert!(qemu_compare_raw(&path, &raw));
}

/// qemu-made images (dynamic and fixed, CHS-rounded and `force_size`) open with qemu's size
/// and read the same bytes qemu reads.
#[test]
fn qemu_made_images_read_identically() {
    if !have_qemu("qemu_made_images_read_identically") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, (subformat, size, force)) in [
        ("dynamic", "10M", false),
        ("fixed", "10M", false),
        ("dynamic", "10M", true),
        ("fixed", "10M", true),
        ("dynamic", "2G", false),
        ("dynamic", "130G", false),
    ]
    .into_iter()
    .enumerate()
    {
        let path = dir.path().join(format!("q{i}.vhd"));
        let opts = format!(
            "subformat={subformat}{}",
            if force { ",force_size=on" } else { "" }
        );
        run_ok(
            "qemu-img",
            &["create", "-q", "-f", "vpc", "-o", &opts, p(&path), size],
        );
        run_ok(
            "qemu-io",
            &[
                "-f",
                "vpc",
                "-c",
                "write -P 0xc3 0 1537",
                "-c",
                "write -P 0x3c 4M 2M",
                "-c",
                "write -P 0x99 9M 4096",
                p(&path),
            ],
        );
        let expected = qemu_size(&path);
        let img = Image::open(&path).expect("open qemu image");
        assert_eq!(img.size(), expected, "{opts} {size}");
        if !force && size == "2G" {
            assert_eq!(expected, 2_147_991_552, "qemu's CHS round-up");
        }
        let raw = dir.path().join(format!("q{i}.raw"));
        run_ok(
            "qemu-img",
            &["convert", "-f", "vpc", "-O", "raw", p(&path), p(&raw)],
        );
        // Stream the comparison: the 130G image must not be read into memory. qemu wrote
        // only below 12 MiB, so past that both must be zeros.
        let raw_file = std::fs::File::open(&raw).expect("open raw");
        let tail = img.size().saturating_sub(4 * MIB);
        for start in (0..(16 * MIB).min(tail))
            .step_by(MIB as usize)
            .chain([tail])
        {
            let n = (img.size() - start).min(if start == tail { 4 * MIB } else { MIB });
            let mut want = vec![0u8; n as usize];
            std::os::unix::fs::FileExt::read_exact_at(&raw_file, &mut want, start)
                .expect("read raw");
            let mut got = vec![0u8; n as usize];
            img.read_at(&mut got, start).expect("read image");
            assert!(got == want, "{opts} {size}: differs in {start}+{n}");
        }
        let ours: Vec<(u64, u64)> = img
            .allocated_ranges()
            .iter()
            .map(|r| (r.start, r.end))
            .collect();
        if subformat == "dynamic" {
            assert_eq!(qemu_map(&path), ours, "{opts} {size}: allocation");
        }
        std::fs::remove_file(&raw).expect("remove raw");
    }
}

/// `qemu-img convert -O vpc` of a raw file (fixed and dynamic) reads back as the raw file.
#[test]
fn qemu_converted_images_read_identically() {
    if !have_qemu("qemu_converted_images_read_identically") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = Rng::new(1234);
    let mut model = vec![0u8; (24 * MIB + 3 * 512) as usize];
    for _ in 0..40 {
        let off = rng.below(model.len() as u64 - 70_000) as usize;
        rng.fill(&mut model[off..off + 70_000]);
    }
    let raw = dir.path().join("src.raw");
    write_raw(&raw, &model);
    for subformat in ["dynamic", "fixed"] {
        for force in [false, true] {
            let path = dir.path().join(format!("{subformat}{force}.vhd"));
            let opts = format!(
                "subformat={subformat},force_size={}",
                if force { "on" } else { "off" }
            );
            run_ok(
                "qemu-img",
                &[
                    "convert",
                    "-f",
                    "raw",
                    "-O",
                    "vpc",
                    "-o",
                    &opts,
                    p(&raw),
                    p(&path),
                ],
            );
            let img = Image::open(&path).expect("open converted image");
            assert_eq!(img.size(), qemu_size(&path));
            assert!(img.size() >= model.len() as u64);
            let mut padded = model.clone();
            padded.resize(img.size() as usize, 0);
            assert_image_eq(&img, &padded);
        }
    }
}

/// qemu has no differencing VHD support (it opens them as plain dynamic images), so a
/// differencing chain is checked by flattening it with the crate and comparing in qemu.
#[test]
fn differencing_chain_flattens_to_what_qemu_sees() {
    if !have_qemu("differencing_chain_flattens_to_what_qemu_sees") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.vhd");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vpc",
            "-o",
            "force_size=on",
            p(&base),
            "12M",
        ],
    );
    run_ok(
        "qemu-io",
        &["-f", "vpc", "-c", "write -P 0x42 0 12M", p(&base)],
    );
    let mut model = vec![0x42u8; 12 * MIB as usize];
    let child_path = dir.path().join("child.vhd");
    let mut child = Image::create_differencing(&child_path, &base).expect("child");
    random_writes(&mut child, &mut model, &mut Rng::new(5), 100);
    child.close().expect("close");
    let child = Image::open(&child_path).expect("open");
    // Flatten through allocated_ranges only, as `lifeboat vhd convert` does.
    let flat = dir.path().join("flat.vhd");
    let mut out = Image::create(&flat, &CreateOptions::dynamic(child.size())).expect("flat");
    let mut buf = vec![0u8; MIB as usize];
    for r in child.allocated_ranges() {
        let mut pos = r.start;
        while pos < r.end {
            let n = (r.end - pos).min(MIB) as usize;
            child.read_at(&mut buf[..n], pos).expect("read");
            out.write_at(&buf[..n], pos).expect("write");
            pos += n as u64;
        }
    }
    out.close().expect("close");
    let raw = dir.path().join("flat.raw");
    write_raw(&raw, &model);
    assert!(qemu_compare_raw(&flat, &raw));
    qemu_check(&child_path);
    assert_eq!(qemu_size(&child_path), 12 * MIB);
}
