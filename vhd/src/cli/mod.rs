//! `lifeboat vhd info|check|create|convert`: operator commands over VHD images.
//!
//! The `lifeboat` binary embeds [`VhdCommand`] as a subcommand and calls [`run`]. Everything
//! here is a thin layer over the library; output is plain text (or JSON for `info --json`)
//! on the writer given to [`run_with_output`], progress bars on stderr.

mod convert;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::{CreateOptions, DiskType, Image, Notice};

pub use convert::{InputFormat, OutputFormat};

/// `lifeboat vhd <subcommand>`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum VhdCommand {
    /// Show an image's type, sizes, geometry, allocation and parent chain.
    Info {
        /// The image.
        path: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Validate an image (footers, header, block table, layout, parent chain) and read all of
    /// its allocated data; exits non-zero when the image is unusable.
    Check {
        /// The image.
        path: PathBuf,
        /// Open read-write so that leftovers of an interrupted write are repaired.
        #[arg(long)]
        repair: bool,
        /// Only check the structure; do not read the data.
        #[arg(long)]
        quick: bool,
    },
    /// Create a fixed, dynamic or differencing image.
    Create {
        /// The new image (must not exist).
        path: PathBuf,
        /// Virtual size: bytes, or with a K/M/G/T suffix (binary units); a multiple of 512.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Image type.
        #[arg(long = "type", value_enum, default_value_t = Kind::Dynamic)]
        kind: Kind,
        /// Parent image (differencing only; the size is the parent's).
        #[arg(long)]
        parent: Option<PathBuf>,
        /// Block size of a dynamic image (default 2M).
        #[arg(long, value_parser = parse_size)]
        block_size: Option<u64>,
    },
    /// Convert raw ↔ VHD (or VHD → VHD, which flattens a differencing chain), copying only
    /// allocated data.
    Convert {
        /// Source image or raw file.
        src: PathBuf,
        /// Destination (must not exist).
        dst: PathBuf,
        /// Source format; `auto` treats a file with a VHD footer as VHD.
        #[arg(long, value_enum, default_value_t = InputFormat::Auto)]
        from: InputFormat,
        /// Destination format.
        #[arg(long, value_enum, default_value_t = OutputFormat::Dynamic)]
        to: OutputFormat,
        /// No progress bar.
        #[arg(long)]
        no_progress: bool,
    },
}

/// Image types for `create`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Fully provisioned: data followed by the footer.
    Fixed,
    /// Sparse, grows as blocks are written.
    Dynamic,
    /// Sparse, on top of a parent image.
    Differencing,
}

/// Runs a command, printing to stdout.
pub fn run(cmd: VhdCommand) -> anyhow::Result<()> {
    run_with_output(cmd, &mut std::io::stdout().lock())
}

/// Runs a command, printing to `out`.
pub fn run_with_output(cmd: VhdCommand, out: &mut dyn Write) -> anyhow::Result<()> {
    match cmd {
        VhdCommand::Info { path, json } => info(&path, json, out),
        VhdCommand::Check {
            path,
            repair,
            quick,
        } => check(&path, repair, quick, out),
        VhdCommand::Create {
            path,
            size,
            kind,
            parent,
            block_size,
        } => create(&path, size, kind, parent.as_deref(), block_size, out),
        VhdCommand::Convert {
            src,
            dst,
            from,
            to,
            no_progress,
        } => convert::convert(&src, &dst, from, to, !no_progress, out),
    }
}

/// Parses `4096`, `64K`, `10M`, `2G`, `1T` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size suffix in {s:?} (use K, M, G or T)")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a size"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn create(
    path: &Path,
    size: Option<u64>,
    kind: Kind,
    parent: Option<&Path>,
    block_size: Option<u64>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let img = match (kind, size, parent) {
        (Kind::Differencing, None, Some(parent)) => Image::create_differencing(path, parent)
            .with_context(|| format!("create differencing image {}", path.display()))?,
        (Kind::Differencing, _, _) => bail!("a differencing image needs --parent and no --size"),
        (_, _, Some(_)) => bail!("--parent is only for --type differencing"),
        (_, None, None) => bail!("--size is required"),
        (Kind::Fixed | Kind::Dynamic, Some(size), None) => {
            let mut opts = if kind == Kind::Fixed {
                CreateOptions::fixed(size)
            } else {
                CreateOptions::dynamic(size)
            };
            if let Some(bs) = block_size {
                opts = opts.block_size(u32::try_from(bs).context("block size too large")?);
            }
            Image::create(path, &opts).with_context(|| format!("create {}", path.display()))?
        }
    };
    writeln!(
        out,
        "created {} image {} ({} bytes)",
        img.disk_type(),
        path.display(),
        img.size()
    )?;
    img.close().context("close the new image")?;
    Ok(())
}

fn check(path: &Path, repair: bool, quick: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let img = if repair {
        Image::open_rw(path)
    } else {
        Image::open(path)
    }
    .with_context(|| format!("{}: unusable", path.display()))?;
    for n in img.notices() {
        writeln!(out, "notice: {}", describe_notice(n))?;
    }
    let mut chain = 1;
    let mut p = img.parent();
    while let Some(parent) = p {
        for n in parent.notices() {
            writeln!(
                out,
                "notice ({}): {}",
                parent.path().display(),
                describe_notice(n)
            )?;
        }
        chain += 1;
        p = parent.parent();
    }
    let mut read = 0u64;
    if !quick {
        let mut buf = vec![0u8; 1 << 20];
        for r in img.allocated_ranges() {
            let mut pos = r.start;
            while pos < r.end {
                let n = (r.end - pos).min(buf.len() as u64);
                img.read_at(&mut buf[..n as usize], pos)
                    .with_context(|| format!("read at {pos}"))?;
                pos += n;
                read += n;
            }
        }
    }
    writeln!(
        out,
        "{}: ok ({} image, {} bytes, chain of {chain}{})",
        path.display(),
        img.disk_type(),
        img.size(),
        if quick {
            String::new()
        } else {
            format!(", {read} allocated bytes read")
        }
    )?;
    img.close().context("close")?;
    Ok(())
}

fn describe_notice(n: &Notice) -> String {
    match n {
        Notice::EndFooterUnusable(why) => {
            format!("end footer unusable ({why}); used the copy at offset 0")
        }
        Notice::FooterCopyUnusable(why) => format!("footer copy at offset 0 unusable ({why})"),
        Notice::UnreferencedTail { offset, len } => format!(
            "{len} bytes at offset {offset} are not referenced (an interrupted write); \
             `check --repair` removes them"
        ),
        Notice::Repaired { file_len } => format!("repaired: file is now {file_len} bytes"),
    }
}

fn info(path: &Path, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let img = Image::open(path).with_context(|| format!("open {}", path.display()))?;
    let f = img.footer();
    let file_len = std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .len();
    let allocated: u64 = img.allocated_ranges().iter().map(|r| r.end - r.start).sum();
    let creator = String::from_utf8_lossy(&f.creator_app).into_owned();
    let mut parents = Vec::new();
    let mut p = img.parent();
    while let Some(parent) = p {
        parents.push((parent.path().display().to_string(), parent.footer().uuid));
        p = parent.parent();
    }
    if json {
        let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        let parents_json: Vec<String> = parents
            .iter()
            .map(|(p, u)| format!("{{\"path\":\"{}\",\"uuid\":\"{u}\"}}", esc(p)))
            .collect();
        writeln!(
            out,
            "{{\"path\":\"{}\",\"type\":\"{}\",\"virtual_size\":{},\"file_size\":{file_len},\
             \"allocated_bytes\":{allocated},\"block_size\":{},\"allocated_blocks\":{},\
             \"uuid\":\"{}\",\"creator\":\"{}\",\"timestamp\":{},\"geometry\":[{},{},{}],\
             \"parents\":[{}]}}",
            esc(&path.display().to_string()),
            img.disk_type(),
            img.size(),
            img.block_size().map_or("null".into(), |b| b.to_string()),
            img.allocated_blocks()
                .map_or("null".into(), |b| b.to_string()),
            f.uuid,
            esc(creator.trim_end_matches('\0')),
            f.timestamp,
            f.geometry.cylinders,
            f.geometry.heads,
            f.geometry.sectors_per_track,
            parents_json.join(",")
        )?;
        return Ok(());
    }
    writeln!(out, "image:          {}", path.display())?;
    writeln!(out, "type:           {}", img.disk_type())?;
    writeln!(
        out,
        "virtual size:   {} ({} bytes)",
        human(img.size()),
        img.size()
    )?;
    writeln!(
        out,
        "file size:      {} ({file_len} bytes)",
        human(file_len)
    )?;
    writeln!(
        out,
        "allocated:      {} ({allocated} bytes)",
        human(allocated)
    )?;
    if let (Some(bs), Some(n)) = (img.block_size(), img.allocated_blocks()) {
        writeln!(out, "block size:     {}, {n} blocks allocated", human(bs))?;
    }
    writeln!(out, "uuid:           {}", f.uuid)?;
    writeln!(
        out,
        "creator:        {creator:?} version {:#010x}, created {}",
        f.creator_version,
        vhd_time(f.timestamp)
    )?;
    writeln!(
        out,
        "geometry:       {}/{}/{} (C/H/S, {} bytes)",
        f.geometry.cylinders,
        f.geometry.heads,
        f.geometry.sectors_per_track,
        f.geometry.capacity()
    )?;
    if img.disk_type() == DiskType::Differencing {
        for (i, (p, u)) in parents.iter().enumerate() {
            writeln!(out, "parent {}:       {p} ({u})", i + 1)?;
        }
    }
    for n in img.notices() {
        writeln!(out, "notice:         {}", describe_notice(n))?;
    }
    Ok(())
}

/// Binary-unit rendering: `1.5 GiB`.
pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A VHD timestamp (seconds since 2000-01-01 UTC) as `YYYY-MM-DD hh:mm:ss UTC`.
fn vhd_time(ts: u32) -> String {
    let secs = u64::from(ts) + 946_684_800;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("10m"), Ok(10 << 20));
        assert_eq!(parse_size("2040G"), Ok(2040 << 30));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn times_render() {
        assert_eq!(vhd_time(0), "2000-01-01 00:00:00 UTC");
        assert_eq!(vhd_time(86_400 * 366 + 3661), "2001-01-01 01:01:01 UTC");
    }
}
