//! `lifeboat vhd convert`: raw ↔ VHD copies that touch only allocated data.
//!
//! The source's data ranges come from the VHD's allocated blocks (parents included) or, for a
//! raw file, from `SEEK_DATA`/`SEEK_HOLE`, so sparse inputs convert in time proportional to
//! their data. Zero chunks are not written: a raw destination stays sparse and a dynamic one
//! allocates no block for them. The destination is flushed once, at the end.

use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};

use crate::wire::is_zero;
use crate::{CreateOptions, Error, Image, SECTOR_SIZE};

/// Source format of `convert`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    /// VHD if the file has a valid VHD footer, raw if it has none.
    Auto,
    /// A raw disk image.
    Raw,
    /// A VHD image of any type.
    Vhd,
}

/// Destination format of `convert`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// A (sparse) raw file.
    Raw,
    /// A dynamic VHD.
    Dynamic,
    /// A fixed VHD.
    Fixed,
}

const CHUNK: u64 = 2 << 20;

enum Source {
    Raw { file: File, len: u64 },
    Vhd(Box<Image>),
}

impl Source {
    fn open(path: &Path, format: InputFormat) -> anyhow::Result<Source> {
        let raw = || -> anyhow::Result<Source> {
            let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
            let len = file.metadata().context("stat the source")?.len();
            Ok(Source::Raw { file, len })
        };
        match format {
            InputFormat::Raw => raw(),
            InputFormat::Vhd => Ok(Source::Vhd(Box::new(
                Image::open(path).with_context(|| format!("open {}", path.display()))?,
            ))),
            // Only "no footer at all" means raw: a VHD with a damaged footer must not be
            // silently copied as raw bytes.
            InputFormat::Auto => match Image::open(path) {
                Ok(img) => Ok(Source::Vhd(Box::new(img))),
                Err(Error::NotVhd { .. }) => raw(),
                Err(e) => Err(e).with_context(|| {
                    format!(
                        "{} looks like a damaged VHD (use --from raw to copy it as raw)",
                        path.display()
                    )
                }),
            },
        }
    }

    /// Virtual size; a raw file's length is rounded up to a sector (the tail reads as zeros).
    fn size(&self) -> u64 {
        match self {
            Source::Raw { len, .. } => len.div_ceil(SECTOR_SIZE) * SECTOR_SIZE,
            Source::Vhd(img) => img.size(),
        }
    }

    fn ranges(&self) -> Vec<Range<u64>> {
        match self {
            Source::Raw { file, len } => data_extents(file, *len),
            Source::Vhd(img) => img.allocated_ranges(),
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> anyhow::Result<()> {
        match self {
            Source::Vhd(img) => img.read_at(buf, offset).context("read the source"),
            Source::Raw { file, .. } => {
                let mut done = 0;
                while done < buf.len() {
                    let n = file
                        .read_at(&mut buf[done..], offset + done as u64)
                        .context("read the source")?;
                    if n == 0 {
                        buf[done..].fill(0);
                        break;
                    }
                    done += n;
                }
                Ok(())
            }
        }
    }
}

enum Dest {
    Raw(File),
    Vhd(Box<Image>),
}

impl Dest {
    fn create(path: &Path, format: OutputFormat, size: u64) -> anyhow::Result<Dest> {
        let context = || format!("create {}", path.display());
        Ok(match format {
            OutputFormat::Raw => {
                let file = File::options()
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .with_context(context)?;
                file.set_len(size).with_context(context)?;
                Dest::Raw(file)
            }
            OutputFormat::Dynamic => {
                let img =
                    Image::create(path, &CreateOptions::dynamic(size)).with_context(context)?;
                Dest::Vhd(Box::new(img))
            }
            OutputFormat::Fixed => {
                let img = Image::create(path, &CreateOptions::fixed(size)).with_context(context)?;
                Dest::Vhd(Box::new(img))
            }
        })
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> anyhow::Result<()> {
        match self {
            Dest::Raw(f) => f.write_all_at(buf, offset).context("write the destination"),
            Dest::Vhd(img) => img.write_at(buf, offset).context("write the destination"),
        }
    }

    fn finish(self) -> anyhow::Result<()> {
        match self {
            Dest::Raw(f) => f.sync_all().context("sync the destination"),
            Dest::Vhd(img) => img.close().context("flush the destination"),
        }
    }
}

pub(super) fn convert(
    src: &Path,
    dst: &Path,
    from: InputFormat,
    to: OutputFormat,
    progress: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let source = Source::open(src, from)?;
    let size = source.size();
    if size == 0 {
        bail!("{} is empty", src.display());
    }
    let ranges = source.ranges();
    let total: u64 = ranges.iter().map(|r| r.end - r.start).sum();
    let mut dest = Dest::create(dst, to, size)?;
    let bar = if progress {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("the template is valid"),
    );
    let mut buf = vec![0u8; CHUNK as usize];
    let mut written = 0u64;
    let result = (|| -> anyhow::Result<()> {
        for r in &ranges {
            let mut pos = r.start;
            while pos < r.end {
                // Chunks end on 2 MiB boundaries so a zero chunk covers whole blocks.
                let n = (CHUNK - pos % CHUNK).min(r.end - pos);
                let chunk = &mut buf[..n as usize];
                source.read_at(chunk, pos)?;
                if !is_zero(chunk) {
                    dest.write_at(chunk, pos)?;
                    written += n;
                }
                pos += n;
                bar.inc(n);
            }
        }
        Ok(())
    })();
    bar.finish_and_clear();
    result?;
    dest.finish()?;
    writeln!(
        out,
        "converted {} → {} ({to:?}, {size} bytes): {} scanned, {} written in {:.1}s",
        src.display(),
        dst.display(),
        super::human(total),
        super::human(written),
        started.elapsed().as_secs_f64()
    )?;
    Ok(())
}

/// Data extents of a raw file via `SEEK_DATA`/`SEEK_HOLE`; the whole file where the file
/// system cannot tell.
fn data_extents(file: &File, len: u64) -> Vec<Range<u64>> {
    let whole = || -> Vec<Range<u64>> { (len > 0).then_some(0..len).into_iter().collect() };
    let fd = file.as_raw_fd();
    let seek = |offset: u64, whence: libc::c_int| -> Option<u64> {
        let off = libc::off_t::try_from(offset).ok()?;
        // SAFETY: lseek only reads its integer arguments; `file` owns the descriptor for the
        // duration of the call. It moves the file position, which positioned I/O ignores.
        let r = unsafe { libc::lseek(fd, off, whence) };
        u64::try_from(r).ok()
    };
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < len {
        let Some(data) = seek(pos, libc::SEEK_DATA) else {
            // ENXIO: no data after pos. Anything else: the file system cannot tell.
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return whole();
        };
        let Some(hole) = seek(data, libc::SEEK_HOLE) else {
            return whole();
        };
        let end = hole.min(len);
        if data < end {
            out.push(data..end);
        }
        pos = end.max(data + 1);
    }
    out
}
