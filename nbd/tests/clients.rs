//! Real NBD clients against the server: qemu-io, qemu-img (qemu-utils) and nbdinfo, nbdcopy
//! (libnbd-bin). Every test builds the bytes it expects itself and compares the backing file
//! byte for byte. A test whose tool is missing prints why and passes.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{have, run_ok, RawClient, Rng, TestServer};
use nbd::protocol::*;
use nbd::{Export, FileBackend, MemBackend};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

fn image(dir: &Path, name: &str, data: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, data).expect("write image");
    path
}

fn p(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

fn assert_same(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    if let Some(i) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: {:#04x} != {:#04x}",
            actual[i], expected[i]
        );
    }
}

fn qemu_io(url: &str, read_only: bool, cmds: &[String]) -> std::process::Output {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    if read_only {
        cmd.arg("-r");
    }
    for c in cmds {
        cmd.args(["-c", c]);
    }
    cmd.arg(url);
    cmd.output().expect("run qemu-io")
}

#[test]
fn qemu_io_writes_land_in_the_file_byte_for_byte() {
    if !have("qemu-io", "qemu_io_writes_land_in_the_file_byte_for_byte") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 8 * MIB + 1536; // not a power of two
    let mut want = Rng::new(1).bytes(size);
    let path = image(dir.path(), "disk.img", &want);
    let server = TestServer::start(vec![Export::new(
        "disk0",
        FileBackend::open(&path).expect("open"),
    )]);
    let url = server.url("disk0");

    // (qemu-io command, range, byte it leaves there)
    let end = size - 4096;
    let writes: Vec<(String, usize, usize, u8)> = vec![
        ("write -P 0xab 0 64k".into(), 0, 64 * KIB, 0xab),
        ("write -P 0xcd 66536 3333".into(), 66536, 3333, 0xcd),
        ("write -f -P 0x11 1M 128k".into(), MIB, 128 * KIB, 0x11),
        (
            "write -P 0x5e 2097159 65529".into(),
            2 * MIB + 7,
            65529,
            0x5e,
        ),
        ("write -z 3M 256k".into(), 3 * MIB, 256 * KIB, 0),
        ("write -z -u 3584k 64k".into(), 3584 * KIB, 64 * KIB, 0),
        ("write -z -f 3712k 1000".into(), 3712 * KIB, 1000, 0),
        ("discard 4M 1M".into(), 4 * MIB, MIB, 0),
        ("aio_write -P 0x22 5M 64k".into(), 5 * MIB, 64 * KIB, 0x22),
        (
            "aio_write -P 0x33 5184k 64k".into(),
            5184 * KIB,
            64 * KIB,
            0x33,
        ),
        ("aio_write -P 0x44 6M 1M".into(), 6 * MIB, MIB, 0x44),
        ("aio_flush".into(), 0, 0, 0),
        (format!("write -P 0x77 {end} 4096"), end, 4096, 0x77),
        ("flush".into(), 0, 0, 0),
    ];
    let cmds: Vec<String> = writes.iter().map(|w| w.0.clone()).collect();
    let out = qemu_io(&url, false, &cmds);
    assert!(
        out.status.success(),
        "qemu-io writes: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    for (_, off, len, byte) in &writes {
        want[*off..off + len].fill(*byte);
    }

    // Read everything back through the export, pattern by pattern.
    let reads: Vec<String> = writes
        .iter()
        .filter(|w| w.2 > 0)
        .map(|(_, off, len, byte)| format!("read -P {byte:#x} {off} {len}"))
        .collect();
    let out = qemu_io(&url, true, &reads);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("verification failed"),
        "read-back: {text}"
    );
    // The checker can fail: a wrong pattern is reported.
    let out = qemu_io(&url, true, &["read -P 0xac 0 64k".into()]);
    assert!(!out.status.success(), "qemu-io accepted a wrong pattern");

    assert_same(
        &std::fs::read(&path).expect("read file"),
        &want,
        "backing file",
    );
    let stats = server.server.export("disk0").expect("export").stats();
    assert!(
        stats.writes == 8 && stats.write_zeroes == 3 && stats.trims == 1 && stats.flushes >= 1,
        "{stats:?}"
    );
    assert_eq!((stats.rejected, stats.backend_errors), (0, 0));
}

#[test]
fn qemu_img_compare_and_convert_through_the_export() {
    if !have(
        "qemu-img",
        "qemu_img_compare_and_convert_through_the_export",
    ) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 6 * MIB;
    let disk = Rng::new(2).bytes(size);
    let disk_path = image(dir.path(), "disk.img", &disk);
    let target_path = image(dir.path(), "target.img", &vec![0u8; size]);
    let server = TestServer::start(vec![
        Export::new("disk0", FileBackend::open(&disk_path).expect("open")),
        Export::new("target", FileBackend::open(&target_path).expect("open")),
    ]);

    run_ok(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        p(&disk_path),
        &server.url("disk0"),
    ]));
    let mut other = disk.clone();
    other[size / 2] ^= 1;
    let other_path = image(dir.path(), "other.img", &other);
    let status = Command::new("qemu-img")
        .args([
            "compare",
            "-q",
            "-f",
            "raw",
            "-F",
            "raw",
            p(&other_path),
            &server.url("disk0"),
        ])
        .status()
        .expect("qemu-img");
    assert_eq!(
        status.code(),
        Some(1),
        "compare must notice a one-bit difference"
    );

    let mut src = Rng::new(3).bytes(size);
    src[MIB..2 * MIB].fill(0); // lets qemu-img use write-zeroes for this part
    let src_path = image(dir.path(), "src.img", &src);
    run_ok(Command::new("qemu-img").args([
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        p(&src_path),
        &server.url("target"),
    ]));
    assert_same(
        &std::fs::read(&target_path).expect("read"),
        &src,
        "converted target",
    );
    run_ok(Command::new("qemu-img").args([
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        p(&src_path),
        &server.url("target"),
    ]));
}

#[test]
fn nbdinfo_reports_size_flags_and_exports() {
    if !have("nbdinfo", "nbdinfo_reports_size_flags_and_exports") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 5 * MIB + 512;
    let path = image(dir.path(), "disk.img", &vec![1u8; size]);
    let server = TestServer::start(vec![
        Export::new("disk0", FileBackend::open(&path).expect("open"))
            .with_description("protected disk"),
        Export::new("ro", FileBackend::open_read_only(&path).expect("open")),
        Export::new("scratch", MemBackend::new(4096)),
    ]);

    let out = run_ok(Command::new("nbdinfo").arg(server.url("disk0")));
    let text = String::from_utf8_lossy(&out.stdout);
    let size_line = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("export-size:"));
    assert_eq!(
        size_line.and_then(|l| l.split(' ').nth(1)),
        Some(size.to_string().as_str()),
        "{text}"
    );
    for line in [
        "description: protected disk",
        "is_read_only: false",
        "can_flush: true",
        "can_fua: true",
        "can_trim: true",
        "can_zero: true",
        "can_multi_conn: true",
        "block_size_maximum: 33554432",
    ] {
        assert!(text.contains(line), "nbdinfo lacks {line:?}:\n{text}");
    }
    let out = run_ok(Command::new("nbdinfo").arg(server.url("ro")));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("is_read_only: true") && text.contains("can_trim: false"),
        "{text}"
    );
    let out = run_ok(Command::new("nbdinfo").args(["--size", &server.url("scratch")]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "4096");

    let out = run_ok(Command::new("nbdinfo").args(["--list", &format!("nbd://{}", server.addr)]));
    let text = String::from_utf8_lossy(&out.stdout);
    for name in ["disk0", "ro", "scratch"] {
        assert!(
            text.contains(&format!("export=\"{name}\"")),
            "--list lacks {name}:\n{text}"
        );
    }

    let out = Command::new("nbdinfo")
        .arg(server.url("nope"))
        .output()
        .expect("nbdinfo");
    assert!(!out.status.success(), "unknown export accepted");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nope"),
        "unclear refusal"
    );
    // Refusing is not a protocol error, and the server carries on.
    run_ok(Command::new("nbdinfo").args(["--size", &server.url("disk0")]));
    assert_eq!(server.server.stats().protocol_errors, 0);
}

#[test]
fn nbdcopy_into_and_out_of_an_export() {
    if !have("nbdcopy", "nbdcopy_into_and_out_of_an_export") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 16 * MIB;
    let src = Rng::new(4).bytes(size);
    let src_path = image(dir.path(), "src.img", &src);
    let target_path = image(dir.path(), "target.img", &vec![0xffu8; size]);
    let server = TestServer::start(vec![Export::new(
        "t",
        FileBackend::open(&target_path).expect("open"),
    )]);

    // nbdcopy opens several connections when the export advertises multi-conn.
    run_ok(Command::new("nbdcopy").args([p(&src_path), &server.url("t")]));
    assert_same(
        &std::fs::read(&target_path).expect("read"),
        &src,
        "nbdcopy target",
    );
    let back = dir.path().join("back.img");
    run_ok(Command::new("nbdcopy").args([&server.url("t"), p(&back)]));
    assert_same(
        &std::fs::read(&back).expect("read"),
        &src,
        "nbdcopy read-back",
    );
    assert!(server.server.stats().handshakes_completed >= 2);
}

#[test]
fn concurrent_clients_write_different_regions() {
    if !have("qemu-io", "concurrent_clients_write_different_regions") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 16 * MIB;
    let path = image(dir.path(), "disk.img", &vec![0u8; size]);
    let server = TestServer::start(vec![Export::new(
        "d",
        FileBackend::open(&path).expect("open"),
    )]);
    let mut want = vec![0u8; size];

    // Two clients, each pipelining 64 writes into its own half.
    let mut children = Vec::new();
    for (client, byte) in [(0usize, 0x5au8), (1, 0xa5)] {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw"]);
        for i in 0..64 {
            let off = client * size / 2 + i * 128 * KIB;
            cmd.args(["-c", &format!("aio_write -P {byte:#x} {off} 96k")]);
            want[off..off + 96 * KIB].fill(byte);
        }
        cmd.args(["-c", "aio_flush", &server.url("d")]);
        children.push(cmd.stdout(Stdio::null()).spawn().expect("spawn qemu-io"));
    }
    for mut c in children {
        assert!(
            c.wait().expect("wait").success(),
            "a concurrent client failed"
        );
    }
    assert_same(
        &std::fs::read(&path).expect("read"),
        &want,
        "two-client image",
    );
    assert_eq!(
        server.server.export("d").expect("export").stats().writes,
        128
    );
}

#[test]
fn a_garbage_sending_client_is_dropped_while_another_keeps_working() {
    if !have(
        "qemu-io",
        "a_garbage_sending_client_is_dropped_while_another_keeps_working",
    ) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 8 * MIB;
    let path = image(dir.path(), "disk.img", &vec![0u8; size]);
    let server = TestServer::start(vec![Export::new(
        "d",
        FileBackend::open(&path).expect("open"),
    )]);

    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for i in 0..64 {
        cmd.args(["-c", &format!("write -P 0x3c {} 64k", i * 128 * KIB)]);
    }
    let worker = cmd
        .arg(server.url("d"))
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn qemu-io");

    let closed = server.block_on(async {
        let mut results = Vec::new();
        let mut rng = Rng::new(5);
        // Garbage instead of client flags + options.
        let mut c = RawClient::connect(server.addr).await;
        c.greet(FLAG_C_FIXED_NEWSTYLE).await;
        tokio::io::AsyncWriteExt::write_all(&mut c.s, &rng.bytes(4096))
            .await
            .ok();
        results.push(c.closed_within(Duration::from_secs(5)).await);
        // Garbage in place of a request header, after a proper handshake.
        let mut c = RawClient::connect(server.addr).await;
        c.handshake("d").await;
        tokio::io::AsyncWriteExt::write_all(&mut c.s, &rng.bytes(4096))
            .await
            .ok();
        results.push(c.closed_within(Duration::from_secs(5)).await);
        results
    });
    assert_eq!(
        closed,
        vec![true, true],
        "garbage clients must be disconnected"
    );
    let out = worker.wait_with_output().expect("qemu-io");
    assert!(out.status.success(), "the well-behaved client failed");

    let mut want = vec![0u8; size];
    for i in 0..64 {
        want[i * 128 * KIB..][..64 * KIB].fill(0x3c);
    }
    assert_same(
        &std::fs::read(&path).expect("read"),
        &want,
        "image after garbage clients",
    );
    assert_eq!(server.server.stats().protocol_errors, 2);
}
