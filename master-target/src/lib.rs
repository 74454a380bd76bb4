//! The Lifeboat master target: holds replica disks on the recovery site. This crate owns its
//! settings, what it reports about itself, and its run loop; the binary (`main.rs`) and
//! `lifeboat up` both drive it through `run`.
pub mod replica;
pub mod replicas;
pub mod service;

use lifeboat_common::component::{run_component, ComponentRun, Reporter, RevocationList};
use lifeboat_common::component_cli::ComponentSettings;
use lifeboat_common::service_args::{CommonArgs, CommonFileConfig, CommonSettings, RoleDefaults};
use lifeboat_common::{facts, Role};
use lifeboat_proto::v1::{self, replica_server::ReplicaServer};
use replicas::Replicas;
use serde::Deserialize;
use service::ReplicaService;
use std::path::PathBuf;
use std::sync::Arc;
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

impl ComponentSettings for Settings {
    const ROLE: Role = Role::MasterTarget;

    fn common(&self) -> &CommonSettings {
        &self.common
    }

    fn resolve(args: &CommonArgs) -> anyhow::Result<Settings> {
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

    fn prepare(&self) -> anyhow::Result<()> {
        lifeboat_common::fsutil::create_private_dir(&self.common.data_dir)?;
        lifeboat_common::fsutil::create_private_dir(&self.replica_dir)?;
        Ok(())
    }

    /// Address, free space and free disk slots, for registration and heartbeats.
    fn facts(&self) -> lifeboat_proto::v1::ComponentFacts {
        let mut f = facts::base_facts(&self.common.advertise, &self.replica_dir);
        f.disk_slots_total = self.disk_slots;
        // No replica disks are placed yet: every slot but the retention volume's is free.
        f.disk_slots_free = self.disk_slots - RESERVED_SLOTS;
        f
    }
}

/// What the master target tells the configuration server, and how it takes assignments.
struct MtReporter<'a> {
    settings: &'a Settings,
    replicas: Arc<Replicas>,
}

impl Reporter for MtReporter<'_> {
    fn facts(&self) -> v1::ComponentFacts {
        let mut facts = self.settings.facts();
        let used = self.replicas.count() as u32;
        facts.disk_slots_free = facts.disk_slots_free.saturating_sub(used);
        metrics::gauge!("lifeboat_mt_disk_slots_free").set(facts.disk_slots_free as f64);
        facts
    }

    fn disk_reports(&self) -> Vec<v1::DiskReport> {
        self.replicas
            .all()
            .iter()
            .filter_map(|r| {
                let replica = r.replica.lock().ok()?;
                let state = replica.state();
                Some(v1::DiskReport {
                    disk_id: r.disk_id.clone(),
                    phase: "applying".into(),
                    seq: state.applied_seq,
                    applied_seq: state.applied_seq,
                    durable_seq: state.applied_seq,
                    stored_bytes: replica.file_bytes(),
                    ..Default::default()
                })
            })
            .collect()
    }

    fn assignments(&self, assignments: Vec<v1::DiskAssignment>) {
        self.replicas.assign(assignments);
    }
}

/// Serves until `cancel` (or until the identity is revoked).
pub async fn run(settings: Settings, cancel: CancellationToken) -> anyhow::Result<()> {
    settings.prepare()?;
    metrics::describe_counter!(
        "lifeboat_mt_apply_bytes_total",
        metrics::Unit::Bytes,
        "Bytes applied to replica disks"
    );
    metrics::describe_histogram!(
        "lifeboat_mt_apply_seconds",
        metrics::Unit::Seconds,
        "Time to apply and flush a group of batches"
    );
    metrics::describe_gauge!(
        "lifeboat_mt_disk_slots_free",
        "Disk slots not holding a replica (retention slot excluded)"
    );
    let revocations = RevocationList::default();
    let replicas = Replicas::new(settings.replica_dir.clone(), revocations.clone());
    let service = ReplicaServer::new(ReplicaService::new(replicas.clone()))
        .max_decoding_message_size(lifeboat_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(lifeboat_proto::MAX_MESSAGE_BYTES);
    run_component(ComponentRun {
        role: Role::MasterTarget,
        settings: settings.common.clone(),
        serve: true,
        reporter: MtReporter {
            settings: &settings,
            replicas,
        },
        cancel,
        routes: tonic::service::Routes::default().add_service(service),
        revocations,
    })
    .await
}
