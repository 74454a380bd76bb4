//! The Lifeboat process server: the replication gateway between agents and master targets.
//! This crate owns its settings, what it reports about itself, and its run loop; the binary
//! (`main.rs`) and `lifeboat up` both drive it through `run`.
pub mod cache;

use lifeboat_common::component::{run_component, ComponentRun};
use lifeboat_common::service_args::{CommonArgs, CommonFileConfig, CommonSettings, RoleDefaults};
use lifeboat_common::{facts, Role};
use serde::Deserialize;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

pub const DEFAULTS: RoleDefaults = RoleDefaults {
    data_dir: "/var/lib/lifeboat/process-server",
    listen: "0.0.0.0:9443",
    metrics_listen: "0.0.0.0:9101",
};

/// The `--config` file.
#[derive(Debug, Default, Deserialize)]
struct FileConfig {
    #[serde(flatten)]
    common: CommonFileConfig,
    /// Disk cache directory (default: DATA/cache).
    cache_dir: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub common: CommonSettings,
    pub cache_dir: PathBuf,
}

impl Settings {
    pub fn resolve(args: &CommonArgs) -> anyhow::Result<Settings> {
        let file: FileConfig = lifeboat_common::config::load_toml(args.config.as_deref())?;
        let common = args.resolve(&file.common, &DEFAULTS)?;
        let cache_dir = file
            .cache_dir
            .unwrap_or_else(|| common.data_dir.join("cache"));
        Ok(Settings { common, cache_dir })
    }

    /// Directories the process server writes, created if missing.
    pub fn prepare(&self) -> anyhow::Result<()> {
        lifeboat_common::fsutil::create_private_dir(&self.common.data_dir)?;
        lifeboat_common::fsutil::create_private_dir(&self.cache_dir)?;
        Ok(())
    }

    /// Address, cache directory and its free space, for registration and heartbeats.
    pub fn facts(&self) -> lifeboat_proto::v1::ComponentFacts {
        facts::base_facts(&self.common.advertise, &self.cache_dir)
    }
}

/// Serves until `cancel` (or until the identity is revoked).
pub async fn run(settings: Settings, cancel: CancellationToken) -> anyhow::Result<()> {
    settings.prepare()?;
    run_component(ComponentRun {
        role: Role::ProcessServer,
        settings: settings.common.clone(),
        serve: true,
        reporter: || settings.facts(),
        cancel,
    })
    .await
}
