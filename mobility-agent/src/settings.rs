//! The agent's settings: its disks (with how each is captured), the NBD listen address, and
//! the replication tuning (capture queue, flow-control patience, resync floor). Flags override
//! the `--config` file.
use crate::capture::Limits;
use crate::DEFAULTS;
use lifeboat_common::facts;
use lifeboat_common::service_args::{CommonArgs, CommonFileConfig, CommonSettings};
use lifeboat_proto::v1;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the agent serves its NBD exports unless configured.
pub const DEFAULT_NBD_LISTEN: &str = "127.0.0.1:10809";
/// Default lowest resync rate, MiB/s.
pub const DEFAULT_RESYNC_FLOOR_MIB: u64 = 16;

/// Disks given on the command line; they replace the config file's list.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DiskArgs {
    /// A disk of this machine, NAME=PATH (a block device or an image file), captured in `nbd`
    /// mode: the workload writes through the agent's NBD export. Repeatable.
    #[arg(long = "disk", value_parser = parse_disk)]
    pub disks: Vec<DiskConfig>,
    /// A disk captured in `scan` mode, NAME=PATH: written by others directly; the agent
    /// compares block hashes at the policy's crash-consistent frequency. Repeatable.
    #[arg(long = "scan-disk", value_parser = parse_scan_disk)]
    pub scan_disks: Vec<DiskConfig>,
    /// Where protected disks are exported over NBD for the workload to write through.
    #[arg(long)]
    pub nbd_listen: Option<SocketAddr>,
    /// Command run as `CMD freeze DISK PATH` and `CMD thaw DISK PATH` around the policy's
    /// app-consistent points (nbd mode: without it there are none) and around each scan
    /// (scan mode: its recovery points are then not fuzzy).
    #[arg(long)]
    pub freeze_hook: Option<PathBuf>,
    /// Captured bytes (MiB) a disk may queue before workload writes wait for replication.
    #[arg(long)]
    pub capture_queue_mib: Option<u64>,
    /// Captured bytes (MiB) a disk may hold in its spill file once its queue's memory is full,
    /// before workload writes wait (0: no spill file).
    #[arg(long)]
    pub spill_mib: Option<u64>,
    /// Seconds a workload write may wait for room before the agent falls back to dirty-region
    /// tracking (and a resync).
    #[arg(long)]
    pub throttle_wait_secs: Option<u64>,
    /// Lowest resync rate (MiB/s), kept even while workload writes are busy.
    #[arg(long)]
    pub resync_floor_mib: Option<u64>,
    /// Nice value (0-19) of the agent's replication threads, so the workload's writes come
    /// first on a busy machine; 0 runs them at the workload's priority.
    #[arg(long)]
    pub replication_nice: Option<i32>,
}

/// How a disk's writes are captured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureMode {
    #[default]
    Nbd,
    Scan,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DiskConfig {
    pub name: String,
    pub path: PathBuf,
    #[serde(default)]
    pub mode: CaptureMode,
}

/// Replication tuning of every disk.
#[derive(Debug, Clone)]
pub struct Tuning {
    pub limits: Limits,
    pub resync_floor_bytes_per_sec: u64,
    pub freeze_hook: Option<PathBuf>,
    /// Nice value of the replication threads (see `background`).
    pub replication_nice: i32,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            limits: Limits::default(),
            resync_floor_bytes_per_sec: DEFAULT_RESYNC_FLOOR_MIB << 20,
            freeze_hook: None,
            replication_nice: crate::background::DEFAULT_NICE,
        }
    }
}

fn parse_disk(text: &str) -> Result<DiskConfig, String> {
    let (name, path) = text
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=PATH, got {text:?}"))?;
    if name.is_empty() || path.is_empty() {
        return Err(format!("expected NAME=PATH, got {text:?}"));
    }
    Ok(DiskConfig {
        name: name.to_string(),
        path: PathBuf::from(path),
        mode: CaptureMode::Nbd,
    })
}

fn parse_scan_disk(text: &str) -> Result<DiskConfig, String> {
    let mut disk = parse_disk(text)?;
    disk.mode = CaptureMode::Scan;
    Ok(disk)
}

/// The `--config` file.
#[derive(Debug, Default, Deserialize)]
struct FileConfig {
    #[serde(flatten)]
    common: CommonFileConfig,
    #[serde(default)]
    disks: Vec<DiskConfig>,
    /// NBD listen address of the write splitter (default 127.0.0.1:10809).
    nbd_listen: Option<SocketAddr>,
    freeze_hook: Option<PathBuf>,
    capture_queue_mib: Option<u64>,
    spill_mib: Option<u64>,
    throttle_wait_secs: Option<u64>,
    resync_floor_mib: Option<u64>,
    replication_nice: Option<i32>,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub common: CommonSettings,
    pub disks: Vec<DiskConfig>,
    pub nbd_listen: SocketAddr,
    pub tuning: Tuning,
}

impl Settings {
    pub fn resolve(args: &CommonArgs, disks: &DiskArgs) -> anyhow::Result<Settings> {
        let flags = disks;
        let file: FileConfig = lifeboat_common::config::load_toml(args.config.as_deref())?;
        let common = args.resolve(&file.common, &DEFAULTS)?;
        let disks: Vec<DiskConfig> = if flags.disks.is_empty() && flags.scan_disks.is_empty() {
            file.disks
        } else {
            flags
                .disks
                .iter()
                .chain(&flags.scan_disks)
                .cloned()
                .collect()
        };
        for (i, disk) in disks.iter().enumerate() {
            if disks[..i].iter().any(|d| d.name == disk.name) {
                anyhow::bail!("disk name {} is given twice", disk.name);
            }
        }
        for disk in &disks {
            disk_size(&disk.path).map_err(|e| {
                anyhow::anyhow!("disk {} ({}): {e}", disk.name, disk.path.display())
            })?;
        }
        let nbd_listen = match flags.nbd_listen.or(file.nbd_listen) {
            Some(a) => a,
            None => DEFAULT_NBD_LISTEN.parse()?,
        };
        let defaults = Limits::default();
        let limits = Limits {
            throttle_bytes: flags
                .capture_queue_mib
                .or(file.capture_queue_mib)
                .map(|m| m.max(1) << 20)
                .unwrap_or(defaults.throttle_bytes),
            spill_bytes: flags
                .spill_mib
                .or(file.spill_mib)
                .map(|m| m << 20)
                .unwrap_or(defaults.spill_bytes),
            throttle_wait: flags
                .throttle_wait_secs
                .or(file.throttle_wait_secs)
                .map(Duration::from_secs)
                .unwrap_or(defaults.throttle_wait),
        };
        let floor = flags
            .resync_floor_mib
            .or(file.resync_floor_mib)
            .unwrap_or(DEFAULT_RESYNC_FLOOR_MIB);
        Ok(Settings {
            common,
            disks,
            nbd_listen,
            tuning: Tuning {
                limits,
                resync_floor_bytes_per_sec: floor.max(1) << 20,
                freeze_hook: flags.freeze_hook.clone().or(file.freeze_hook),
                replication_nice: match flags.replication_nice.or(file.replication_nice) {
                    Some(n) if !(0..=19).contains(&n) => {
                        anyhow::bail!("replication_nice must be 0-19, got {n}")
                    }
                    Some(n) => n,
                    None => crate::background::DEFAULT_NICE,
                },
            },
        })
    }

    pub fn prepare(&self) -> anyhow::Result<()> {
        lifeboat_common::fsutil::create_private_dir(&self.common.data_dir)?;
        Ok(())
    }

    /// Host name, operating system and disks with their sizes.
    pub fn facts(&self) -> v1::ComponentFacts {
        let mut f = facts::base_facts("", &self.common.data_dir);
        f.disks = self
            .disks
            .iter()
            .map(|d| v1::DiskFacts {
                name: d.name.clone(),
                path: d.path.display().to_string(),
                size_bytes: disk_size(&d.path).unwrap_or(0),
            })
            .collect();
        f
    }
}

/// Size of an image file or block device (seeking to the end works for both).
pub(crate) fn disk_size(path: &Path) -> std::io::Result<u64> {
    use std::io::Seek;
    std::fs::File::open(path)?.seek(std::io::SeekFrom::End(0))
}
