//! The Lifeboat master target: holds replica disks on the recovery site. This crate owns its
//! settings, what it reports about itself, and its run loop; the binary (`main.rs`) and
//! `lifeboat up` both drive it through `run`.
use lifeboat_common::component::{run_component, ComponentRun};
use lifeboat_common::service_args::{CommonArgs, CommonFileConfig, CommonSettings, RoleDefaults};
use lifeboat_common::{facts, Role};
use serde::Deserialize;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

pub const DEFAULTS: RoleDefaults = RoleDefaults {
    data_dir: "/var/lib/lifeboat/master-target",
    listen: "0.0.0.0:9443",
    metrics_listen: "0.0.0.0:9102",
};

/// Disk slots of a master target unless configured (the seed documents' limit).
pub const DEFAULT_DISK_SLOTS: u32 = 31;
/// Slots not available for replica disks: the retention volume's.
pub const RESERVED_SLOTS: u32 = 1;

/// The `--config` file.
#[derive(Debug, Default, Deserialize)]
struct FileConfig {
    #[serde(flatten)]
    common: CommonFileConfig,
    /// Directory of replica disks and the retention journal (default: DATA/replicas).
    replica_dir: Option<PathBuf>,
    /// Disk slots, one of them reserved for the retention volume (default: 31).
    disk_slots: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub common: CommonSettings,
    pub replica_dir: PathBuf,
    pub disk_slots: u32,
}

impl Settings {
    pub fn resolve(args: &CommonArgs) -> anyhow::Result<Settings> {
        let file: FileConfig = lifeboat_common::config::load_toml(args.config.as_deref())?;
        let common = args.resolve(&file.common, &DEFAULTS)?;
        let replica_dir = file
            .replica_dir
            .unwrap_or_else(|| common.data_dir.join("replicas"));
        let disk_slots = file.disk_slots.unwrap_or(DEFAULT_DISK_SLOTS);
        if disk_slots <= RESERVED_SLOTS {
            anyhow::bail!("disk_slots must be at least {}", RESERVED_SLOTS + 1);
        }
        Ok(Settings {
            common,
            replica_dir,
            disk_slots,
        })
    }

    pub fn prepare(&self) -> anyhow::Result<()> {
        lifeboat_common::fsutil::create_private_dir(&self.common.data_dir)?;
        lifeboat_common::fsutil::create_private_dir(&self.replica_dir)?;
        Ok(())
    }

    /// Address, free space and free disk slots, for registration and heartbeats.
    pub fn facts(&self) -> lifeboat_proto::v1::ComponentFacts {
        let mut f = facts::base_facts(&self.common.advertise, &self.replica_dir);
        f.disk_slots_total = self.disk_slots;
        // No replica disks are placed yet: every slot but the retention volume's is free.
        f.disk_slots_free = self.disk_slots - RESERVED_SLOTS;
        f
    }
}

/// Serves until `cancel` (or until the identity is revoked).
pub async fn run(settings: Settings, cancel: CancellationToken) -> anyhow::Result<()> {
    settings.prepare()?;
    run_component(ComponentRun {
        role: Role::MasterTarget,
        settings: settings.common.clone(),
        serve: true,
        reporter: || settings.facts(),
        cancel,
        routes: tonic::service::Routes::default(),
        revocations: Default::default(),
    })
    .await
}
