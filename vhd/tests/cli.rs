//! The operator commands (`--features cli`), driven the way the `lifeboat` binary embeds them:
//! parsed by clap as `lifeboat vhd <subcommand>` and run with `vhd::cli::run_with_output`.

mod common;

use std::path::Path;

use clap::Parser;
use common::{have_qemu, qemu_compare_raw, random_writes, Rng};
use vhd::cli::{run_with_output, VhdCommand};
use vhd::{CreateOptions, Image};

const MIB: u64 = 1 << 20;

/// Stand-in for the `lifeboat` binary's top level.
#[derive(Parser)]
#[command(name = "lifeboat")]
struct Lifeboat {
    #[command(subcommand)]
    cmd: Top,
}

#[derive(clap::Subcommand)]
enum Top {
    /// VHD image tools.
    #[command(subcommand)]
    Vhd(VhdCommand),
}

/// Parses `lifeboat vhd <args>` and runs it, returning stdout.
fn lifeboat_vhd(args: &[&str]) -> anyhow::Result<String> {
    let argv = ["lifeboat", "vhd"].iter().chain(args).copied();
    let Top::Vhd(cmd) = Lifeboat::try_parse_from(argv)?.cmd;
    let mut out = Vec::new();
    run_with_output(cmd, &mut out)?;
    Ok(String::from_utf8(out)?)
}

fn p(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

#[test]
fn create_info_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("a.vhd");
    let out = lifeboat_vhd(&["create", p(&img), "--size", "10M"]).expect("create");
    assert!(out.contains("created dynamic image"), "{out}");
    let out = lifeboat_vhd(&["info", p(&img)]).expect("info");
    assert!(out.contains("type:           dynamic"), "{out}");
    assert!(out.contains("(10485760 bytes)"), "{out}");
    let json = lifeboat_vhd(&["info", "--json", p(&img)]).expect("info --json");
    assert!(json.contains("\"virtual_size\":10485760"), "{json}");
    assert!(json.contains("\"allocated_blocks\":0"), "{json}");
    let out = lifeboat_vhd(&["check", p(&img)]).expect("check");
    assert!(out.contains(": ok (dynamic image, 10485760 bytes"), "{out}");

    let fixed = dir.path().join("f.vhd");
    lifeboat_vhd(&["create", p(&fixed), "--size", "1M", "--type", "fixed"]).expect("fixed");
    assert_eq!(Image::open(&fixed).expect("open").size(), MIB);
    let child = dir.path().join("c.vhd");
    let out = lifeboat_vhd(&[
        "create",
        p(&child),
        "--type",
        "differencing",
        "--parent",
        p(&img),
    ])
    .expect("differencing");
    assert!(out.contains("differencing"), "{out}");
    let out = lifeboat_vhd(&["info", p(&child)]).expect("info child");
    assert!(out.contains("parent 1:"), "{out}");

    // Bad arguments and bad images are errors, not panics.
    assert!(lifeboat_vhd(&["create", p(&dir.path().join("x.vhd"))]).is_err());
    assert!(lifeboat_vhd(&["create", p(&dir.path().join("y.vhd")), "--size", "1000"]).is_err());
    assert!(
        lifeboat_vhd(&["create", p(&img), "--size", "1M"]).is_err(),
        "exists"
    );
    let mut bytes = std::fs::read(&img).expect("read");
    bytes[600] ^= 1; // dynamic header checksum
    let bad = dir.path().join("bad.vhd");
    std::fs::write(&bad, &bytes).expect("write");
    let err = lifeboat_vhd(&["check", p(&bad)]).expect_err("corrupt header");
    assert!(format!("{err:#}").contains("checksum"), "{err:#}");
}

#[test]
fn check_repair_fixes_an_interrupted_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.vhd");
    let mut img = Image::create(&path, &CreateOptions::dynamic(8 * MIB)).expect("create");
    img.write_at(b"kept", 0).expect("write");
    img.flush().expect("flush");
    img.write_at(b"lost", 5 * MIB).expect("write");
    img.drop_without_flush();
    let out = lifeboat_vhd(&["check", p(&path)]).expect("check");
    assert!(out.contains("end footer unusable"), "{out}");
    let out = lifeboat_vhd(&["check", "--repair", p(&path)]).expect("repair");
    assert!(out.contains("repaired"), "{out}");
    let out = lifeboat_vhd(&["check", p(&path)]).expect("check after repair");
    assert!(!out.contains("notice"), "{out}");
}

#[test]
fn convert_round_trips_and_copies_only_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // A sparse raw file with data in three places (one not sector-aligned at the end).
    let raw = d.join("src.raw");
    let size = 40 * MIB + 1000;
    let mut model = vec![0u8; size as usize];
    let f = std::fs::File::create(&raw).expect("create raw");
    f.set_len(size).expect("size raw");
    let mut rng = Rng::new(4);
    for off in [3 * MIB + 17, 20 * MIB, size - 3000] {
        let data = rng.bytes(3000);
        std::os::unix::fs::FileExt::write_all_at(&f, &data, off).expect("write raw");
        model[off as usize..off as usize + 3000].copy_from_slice(&data);
    }
    drop(f);

    let dynamic = d.join("out.vhd");
    let out = lifeboat_vhd(&["convert", "--no-progress", p(&raw), p(&dynamic)]).expect("convert");
    assert!(out.contains("converted"), "{out}");
    let img = Image::open(&dynamic).expect("open");
    assert_eq!(img.size(), size.div_ceil(512) * 512);
    // Only the 2 MiB blocks holding data were allocated (the last write spans two).
    assert_eq!(img.allocated_blocks(), Some(4));
    model.resize(img.size() as usize, 0);
    common::assert_image_eq(&img, &model);

    let fixed = d.join("out-fixed.vhd");
    lifeboat_vhd(&[
        "convert",
        "--no-progress",
        "--to",
        "fixed",
        p(&raw),
        p(&fixed),
    ])
    .expect("fixed");
    common::assert_image_eq(&Image::open(&fixed).expect("open"), &model);

    let back = d.join("back.raw");
    lifeboat_vhd(&[
        "convert",
        "--no-progress",
        "--to",
        "raw",
        p(&dynamic),
        p(&back),
    ])
    .expect("raw");
    assert_eq!(std::fs::read(&back).expect("read back"), model);
    if have_qemu("convert_round_trips_and_copies_only_data (qemu part)") {
        assert!(qemu_compare_raw(&dynamic, &back));
        assert!(qemu_compare_raw(&fixed, &back));
    }

    // A damaged VHD is not silently copied as raw.
    let mut bytes = std::fs::read(&fixed).expect("read");
    let n = bytes.len();
    bytes[n - 400] ^= 1;
    let damaged = d.join("damaged.vhd");
    std::fs::write(&damaged, &bytes).expect("write");
    assert!(lifeboat_vhd(&["convert", "--no-progress", p(&damaged), p(&d.join("z.vhd"))]).is_err());
}

#[test]
fn convert_flattens_a_differencing_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let base = d.join("base.vhd");
    let mut model = vec![0u8; 16 * MIB as usize];
    let mut img = Image::create(&base, &CreateOptions::dynamic(16 * MIB)).expect("base");
    random_writes(&mut img, &mut model, &mut Rng::new(1), 30);
    img.close().expect("close");
    let child = d.join("child.vhd");
    let mut img = Image::create_differencing(&child, &base).expect("child");
    random_writes(&mut img, &mut model, &mut Rng::new(2), 30);
    img.close().expect("close");
    let flat = d.join("flat.vhd");
    lifeboat_vhd(&["convert", "--no-progress", p(&child), p(&flat)]).expect("flatten");
    let img = Image::open(&flat).expect("open");
    assert_eq!(img.disk_type(), vhd::DiskType::Dynamic);
    common::assert_image_eq(&img, &model);
}
