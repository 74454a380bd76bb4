//! The Lifeboat mobility agent: runs on a protected machine and only makes outbound
//! connections. This crate owns its settings (including the machine's disks), what it reports,
//! and its run loop; the binary (`main.rs`) drives it through `run`.
use lifeboat_common::component::{run_component, ComponentRun};
use lifeboat_common::service_args::{CommonArgs, CommonFileConfig, CommonSettings, RoleDefaults};
use lifeboat_common::{facts, Role};
use lifeboat_proto::v1;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

pub const DEFAULTS: RoleDefaults = RoleDefaults {
    data_dir: "/var/lib/lifeboat/mobility-agent",
    // Agents do not serve gRPC; the address is unused.
    listen: "127.0.0.1:0",
    metrics_listen: "127.0.0.1:9103",
};

/// Disks given on the command line; they replace the config file's list.
#[derive(Debug, Clone, clap::Args)]
pub struct DiskArgs {
    /// A disk of this machine, NAME=PATH (a block device or an image file); repeatable.
    #[arg(long = "disk", value_parser = parse_disk)]
    pub disks: Vec<DiskConfig>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DiskConfig {
    pub name: String,
    pub path: PathBuf,
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
    })
}

/// The `--config` file.
#[derive(Debug, Default, Deserialize)]
struct FileConfig {
    #[serde(flatten)]
    common: CommonFileConfig,
    #[serde(default)]
    disks: Vec<DiskConfig>,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub common: CommonSettings,
    pub disks: Vec<DiskConfig>,
}

impl Settings {
    pub fn resolve(args: &CommonArgs, disks: &DiskArgs) -> anyhow::Result<Settings> {
        let file: FileConfig = lifeboat_common::config::load_toml(args.config.as_deref())?;
        let common = args.resolve(&file.common, &DEFAULTS)?;
        let disks = if disks.disks.is_empty() {
            file.disks
        } else {
            disks.disks.clone()
        };
        for disk in &disks {
            disk_size(&disk.path).map_err(|e| {
                anyhow::anyhow!("disk {} ({}): {e}", disk.name, disk.path.display())
            })?;
        }
        Ok(Settings { common, disks })
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
fn disk_size(path: &Path) -> std::io::Result<u64> {
    use std::io::Seek;
    std::fs::File::open(path)?.seek(std::io::SeekFrom::End(0))
}

/// Runs until `cancel` (or until the identity is revoked).
pub async fn run(settings: Settings, cancel: CancellationToken) -> anyhow::Result<()> {
    settings.prepare()?;
    run_component(ComponentRun {
        role: Role::Agent,
        settings: settings.common.clone(),
        serve: false,
        reporter: || settings.facts(),
        cancel,
        routes: tonic::service::Routes::default(),
        revocations: Default::default(),
    })
    .await
}
