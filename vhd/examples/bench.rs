//! Throughput benchmark for dynamic VHDs, driven by `bench/vhd.sh` (which also times
//! `qemu-img convert` on the same data and repeats every measurement).
//!
//! ```text
//! cargo run --release --features cli --example bench -- <mode> <work dir> [MiB] [disk GiB]
//! ```
//!
//! Modes (each syncs the system first, so earlier dirty data is not flushed on its clock, and
//! times its work including exactly one flush at the end, none per block):
//! * `prepare`: writes `seq.raw` (`MiB` MiB of data) and `rand.raw` (the same amount in 64 KiB
//!   pieces at random 64 KiB-aligned offsets of a `disk GiB` disk), untimed;
//! * `seq`: the `seq.raw` data written through the API in 1 MiB calls into `seq.vhd`;
//! * `rand`: the `rand.raw` writes replayed through the API in 64 KiB calls into `rand.vhd`;
//! * `convert-seq`, `convert-rand`: `lifeboat vhd convert` of the raw files into
//!   `*-convert.vhd`, the same job as `qemu-img convert -O vpc`.
//!
//! Prints `RESULT <mode> <bytes> <seconds> <flush seconds>`; bytes are the data written (for
//! the convert modes: the data in the raw file).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use vhd::cli::{run_with_output, InputFormat, OutputFormat, VhdCommand};
use vhd::{CreateOptions, Image};

const MIB: u64 = 1 << 20;
const PIECE: u64 = 64 << 10;

/// xorshift64: cheap, deterministic data that does not compress to zeros.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The benchmark's data, regenerated identically by every mode.
struct Workload {
    pool: Vec<u8>,
    total: u64,
    disk: u64,
}

impl Workload {
    fn new(mib: u64, disk_gib: u64) -> Workload {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let pool = (0..64 * MIB / 8)
            .flat_map(|_| rng.next().to_le_bytes())
            .collect();
        Workload {
            pool,
            total: mib * MIB,
            disk: disk_gib << 30,
        }
    }

    /// Write `i` of `len` bytes: a slice of the pool with `i` stamped into its first bytes,
    /// so no two writes carry the same data.
    fn piece(&self, i: u64, len: u64) -> Vec<u8> {
        let start = (i * 4099 * 8) % (self.pool.len() as u64 - len);
        let mut v = self.pool[start as usize..(start + len) as usize].to_vec();
        v[..8].copy_from_slice(&i.to_le_bytes());
        v
    }

    fn sequential(&self) -> Vec<(u64, Vec<u8>)> {
        (0..self.total / MIB)
            .map(|i| (i * MIB, self.piece(i, MIB)))
            .collect()
    }

    fn random(&self) -> Vec<(u64, Vec<u8>)> {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        (0..self.total / PIECE)
            .map(|i| {
                (
                    (rng.next() % (self.disk / PIECE)) * PIECE,
                    self.piece(i, PIECE),
                )
            })
            .collect()
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: bench prepare|seq|rand|convert-seq|convert-rand <dir> [MiB] [disk GiB]";
    let mode = args.get(1).ok_or(usage)?.as_str();
    let dir = PathBuf::from(args.get(2).ok_or(usage)?);
    let mib: u64 = args.get(3).map_or(Ok(1024), |s| s.parse())?;
    let disk_gib: u64 = args.get(4).map_or(Ok(8), |s| s.parse())?;
    let work = Workload::new(mib, disk_gib);
    match mode {
        "prepare" => {
            write_raw(&dir.join("seq.raw"), work.total, &work.sequential())?;
            write_raw(&dir.join("rand.raw"), work.disk, &work.random())?;
        }
        "seq" => api_writes(&dir.join("seq.vhd"), mode, work.total, &work.sequential())?,
        "rand" => api_writes(&dir.join("rand.vhd"), mode, work.disk, &work.random())?,
        "convert-seq" | "convert-rand" => {
            let name = &mode["convert-".len()..];
            let src = dir.join(format!("{name}.raw"));
            let dst = dir.join(format!("{name}-convert.vhd"));
            remove(&dst)?;
            let bytes = data_bytes(&src)?;
            sync();
            let t = Instant::now();
            let cmd = VhdCommand::Convert {
                src,
                dst,
                from: InputFormat::Raw,
                to: OutputFormat::Dynamic,
                no_progress: true,
            };
            run_with_output(cmd, &mut std::io::sink())?;
            report(mode, bytes, t, None);
        }
        _ => return Err(usage.into()),
    }
    Ok(())
}

fn api_writes(
    path: &Path,
    mode: &str,
    disk: u64,
    writes: &[(u64, Vec<u8>)],
) -> Result<(), Box<dyn std::error::Error>> {
    remove(path)?;
    let bytes = writes.iter().map(|(_, d)| d.len() as u64).sum();
    sync();
    let t = Instant::now();
    let mut img = Image::create(path, &CreateOptions::dynamic(disk))?;
    for (offset, data) in writes {
        img.write_at(data, *offset)?;
    }
    let f = Instant::now();
    img.close()?;
    report(mode, bytes, t, Some(f));
    Ok(())
}

fn write_raw(path: &Path, len: u64, writes: &[(u64, Vec<u8>)]) -> std::io::Result<()> {
    remove(path)?;
    let f = File::create(path)?;
    f.set_len(len)?;
    for (offset, data) in writes {
        f.write_all_at(data, *offset)?;
    }
    f.sync_all()
}

fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Bytes of data (not holes) in a raw file, as `du` counts them.
fn data_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

/// Writes back all dirty data system-wide, so the timed run pays only for its own.
fn sync() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

fn report(mode: &str, bytes: u64, started: Instant, flush: Option<Instant>) {
    println!(
        "RESULT {mode} {bytes} {:.6} {:.6}",
        started.elapsed().as_secs_f64(),
        flush.map_or(0.0, |f| f.elapsed().as_secs_f64())
    );
}
