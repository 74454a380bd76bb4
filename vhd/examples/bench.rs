//! Throughput benchmark for dynamic VHDs, run by `bench/vhd.sh` (which also times
//! `qemu-img convert` on the same data).
//!
//! ```text
//! cargo run --release --features cli --example bench -- <work dir> [MiB] [disk GiB]
//! ```
//!
//! Writes, timed with a single flush (two `fdatasync`s) at the end and none per block:
//! * `seq`: `MiB` MiB written sequentially in 1 MiB calls into a new dynamic VHD;
//! * `rand`: the same amount in 64 KiB calls at random 64 KiB-aligned offsets of a
//!   `disk GiB` disk (overlaps allowed);
//! * `convert-seq` / `convert-rand`: `lifeboat vhd convert` of raw files holding the same
//!   data as the two images, i.e. the same job `qemu-img convert -O vpc` does.
//!
//! Raw copies `seq.raw` and `rand.raw` are left in the work dir (written untimed) for the
//! qemu side and for `qemu-img compare`. Each result is one line:
//! `RESULT <name> <bytes> <seconds>`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use vhd::cli::{run_with_output, InputFormat, OutputFormat, VhdCommand};
use vhd::{CreateOptions, Image};

const MIB: u64 = 1 << 20;

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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(
        args.get(1)
            .ok_or("usage: bench <work dir> [MiB] [disk GiB]")?,
    );
    let mib: u64 = args.get(2).map_or(Ok(1024), |s| s.parse())?;
    let disk_gib: u64 = args.get(3).map_or(Ok(8), |s| s.parse())?;
    let total = mib * MIB;

    // A 64 MiB pool of random bytes; each write takes a slice and stamps its index into the
    // first 8 bytes so no two writes carry the same data.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let pool: Vec<u8> = (0..64 * MIB / 8)
        .flat_map(|_| rng.next().to_le_bytes())
        .collect();
    let chunk = |i: u64, len: u64| -> Vec<u8> {
        let start = (i * 4099 * 8) % (pool.len() as u64 - len);
        let mut v = pool[start as usize..(start + len) as usize].to_vec();
        v[..8].copy_from_slice(&i.to_le_bytes());
        v
    };

    // Sequential.
    let seq_raw = File::create(dir.join("seq.raw"))?;
    seq_raw.set_len(total)?;
    let seq_data: Vec<Vec<u8>> = (0..mib).map(|i| chunk(i, MIB)).collect();
    let mut img = Image::create(dir.join("seq.vhd"), &CreateOptions::dynamic(total))?;
    let t = Instant::now();
    for (i, data) in seq_data.iter().enumerate() {
        img.write_at(data, i as u64 * MIB)?;
    }
    img.close()?;
    report("seq", total, t);
    for (i, data) in seq_data.iter().enumerate() {
        seq_raw.write_all_at(data, i as u64 * MIB)?;
    }
    seq_raw.sync_all()?;
    drop(seq_data);

    // Random 64 KiB writes.
    let disk = disk_gib << 30;
    let writes = total / (64 << 10);
    let rand_raw = File::create(dir.join("rand.raw"))?;
    rand_raw.set_len(disk)?;
    let plan: Vec<(u64, Vec<u8>)> = (0..writes)
        .map(|i| {
            (
                (rng.next() % (disk / (64 << 10))) * (64 << 10),
                chunk(i, 64 << 10),
            )
        })
        .collect();
    let mut img = Image::create(dir.join("rand.vhd"), &CreateOptions::dynamic(disk))?;
    let t = Instant::now();
    for (offset, data) in &plan {
        img.write_at(data, *offset)?;
    }
    img.close()?;
    report("rand", total, t);
    for (offset, data) in &plan {
        rand_raw.write_all_at(data, *offset)?;
    }
    rand_raw.sync_all()?;
    drop(plan);

    // The convert path, same job as qemu-img convert.
    for name in ["seq", "rand"] {
        let src = dir.join(format!("{name}.raw"));
        let dst = dir.join(format!("{name}-convert.vhd"));
        let bytes = data_bytes(&src)?;
        let t = Instant::now();
        run_with_output(
            VhdCommand::Convert {
                src,
                dst,
                from: InputFormat::Raw,
                to: OutputFormat::Dynamic,
                no_progress: true,
            },
            &mut std::io::sink(),
        )?;
        report(&format!("convert-{name}"), bytes, t);
    }
    Ok(())
}

/// Bytes of data (not holes) in a raw file, as `du` counts them.
fn data_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

fn report(name: &str, bytes: u64, started: Instant) {
    println!(
        "RESULT {name} {bytes} {:.6}",
        started.elapsed().as_secs_f64()
    );
}
