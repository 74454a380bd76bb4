//! Helpers shared by the integration tests: deterministic data, qemu tool wrappers, and an
//! in-memory model disk to compare images against.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

use vhd::Image;

/// A small deterministic PRNG (xorshift64*), so failures reproduce.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// True when qemu-img is installed; otherwise prints why the caller skips.
pub fn have_qemu(test: &str) -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        // Written to the real stderr (not eprintln!, which the test harness captures) so
        // the reason shows in a normal `cargo test` run.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: qemu-img is not installed"
        );
    }
    ok
}

/// Runs a command and returns its output; panics with stderr if it cannot start.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

/// Runs a command that must succeed and returns its stdout.
pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// `qemu-img info` virtual size of a vpc image.
pub fn qemu_size(path: &Path) -> u64 {
    let json = run_ok("qemu-img", &["info", "-f", "vpc", "--output=json", s(path)]);
    let key = "\"virtual-size\":";
    // The top-level virtual-size is the last one printed (children come first).
    let at = json
        .rfind(key)
        .expect("virtual-size in qemu-img info output")
        + key.len();
    json[at..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|d| d.parse().ok())
        .expect("numeric virtual-size")
}

/// `qemu-img compare` of a vpc image with a raw file; true when identical.
pub fn qemu_compare_raw(vhd: &Path, raw: &Path) -> bool {
    let out = run(
        "qemu-img",
        &["compare", "-f", "vpc", "-F", "raw", s(vhd), s(raw)],
    );
    if !out.status.success() {
        eprintln!(
            "qemu-img compare: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out.status.success()
}

/// `qemu-img check -f vpc`. qemu's vpc driver implements no check (exit 63, "This image
/// format does not support checks"); that counts as a pass, any other failure does not.
pub fn qemu_check(vhd: &Path) {
    let out = run("qemu-img", &["check", "-f", "vpc", s(vhd)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let unsupported = out.status.code() == Some(63) && stderr.contains("does not support checks");
    assert!(
        out.status.success() || unsupported,
        "qemu-img check failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr
    );
}

/// Allocated extents as `qemu-img map` reports them: `(start, end)` of extents with data.
pub fn qemu_map(vhd: &Path) -> Vec<(u64, u64)> {
    let json = run_ok("qemu-img", &["map", "-f", "vpc", "--output=json", s(vhd)]);
    let mut out: Vec<(u64, u64)> = Vec::new();
    for line in json.lines() {
        let field = |name: &str| -> Option<String> {
            let key = format!("\"{name}\": ");
            let at = line.find(&key)? + key.len();
            Some(line[at..].split([',', '}']).next()?.trim().to_string())
        };
        let (Some(start), Some(len), Some(data)) = (field("start"), field("length"), field("data"))
        else {
            continue;
        };
        if data != "true" {
            continue;
        }
        let start: u64 = start.parse().expect("start");
        let len: u64 = len.parse().expect("length");
        match out.last_mut() {
            Some(last) if last.1 == start => last.1 += len,
            _ => out.push((start, start + len)),
        }
    }
    out
}

/// Writes `model` to a raw file.
pub fn write_raw(path: &Path, model: &[u8]) {
    std::fs::write(path, model).expect("write raw file");
}

/// Reads the whole image and checks it equals `model`.
pub fn assert_image_eq(img: &Image, model: &[u8]) {
    assert_eq!(img.size(), model.len() as u64);
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < img.size() {
        let n = (img.size() - pos).min(buf.len() as u64) as usize;
        img.read_at(&mut buf[..n], pos).expect("read image");
        let want = &model[pos as usize..pos as usize + n];
        if buf[..n] != *want {
            let i = buf[..n]
                .iter()
                .zip(want)
                .position(|(a, b)| a != b)
                .expect("a differing byte");
            panic!("image differs from model at byte {}", pos + i as u64);
        }
        pos += n as u64;
    }
}

/// Applies a write to the image and the model.
pub fn write_both(img: &mut Image, model: &mut [u8], data: &[u8], offset: u64) {
    img.write_at(data, offset).expect("write image");
    model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
}

/// A varied write pattern over `size` bytes: aligned and unaligned, small and multi-block,
/// zeros and data.
pub fn random_writes(img: &mut Image, model: &mut [u8], rng: &mut Rng, count: usize) {
    let size = model.len() as u64;
    for _ in 0..count {
        let len = match rng.below(4) {
            0 => 1 + rng.below(700),
            1 => 512 * (1 + rng.below(16)),
            2 => 1 + rng.below(300_000),
            _ => 65536,
        }
        .min(size);
        let offset = match rng.below(3) {
            0 => rng.below(size - len + 1) / 512 * 512,
            _ => rng.below(size - len + 1),
        };
        let data = if rng.below(6) == 0 {
            vec![0u8; len as usize]
        } else {
            rng.bytes(len as usize)
        };
        write_both(img, model, &data, offset);
    }
}
