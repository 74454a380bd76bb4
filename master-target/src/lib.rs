//! The Lifeboat master target: holds replica disks on the recovery site, their retention
//! journals and recovery-point views. This crate owns its settings, what it reports about
//! itself, and its run loop; the binary (`main.rs`) and `lifeboat up` both drive it through
//! `run`.
pub mod exports;
pub mod journal;
pub mod pit;
pub mod rangemap;
pub mod replica;
pub mod replicas;
pub mod service;
pub mod undo;
pub mod view;
pub mod views;
pub mod writes;

use lifeboat_common::component::{run_component, ComponentRun, Reporter, RevocationList};
use lifeboat_common::component_cli::ComponentSettings;
use lifeboat_common::service_args::{CommonArgs, CommonFileConfig, CommonSettings, RoleDefaults};
use lifeboat_common::{facts, kept_gauges, Role};
use lifeboat_proto::batch_intake::BatchIntake;
use lifeboat_proto::v1::{
    self, point_in_time_server::PointInTimeServer, replica_server::ReplicaServer,
};
use replicas::Replicas;
use serde::Deserialize;
use service::ReplicaService;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub const DEFAULTS: RoleDefaults = RoleDefaults {
    data_dir: "/var/lib/lifeboat/master-target",
    listen: "0.0.0.0:9444",
    metrics_listen: "0.0.0.0:9102",
};

/// Where views are exported over NBD unless configured.
pub const DEFAULT_NBD_LISTEN: &str = "127.0.0.1:10810";

/// Disk slots of a master target unless configured (the seed documents' limit).
pub const DEFAULT_DISK_SLOTS: u32 = 31;
/// Whether replica data bypasses the page cache unless configured (`replica_direct_io`).
pub const DEFAULT_REPLICA_DIRECT_IO: bool = false;
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
    /// NBD listen address of recovery-point views (default: 127.0.0.1:10810).
    nbd_listen: Option<String>,
    /// `host:port` put in views' NBD URIs (default: the advertised host, nbd_listen's port).
    nbd_advertise: Option<String>,
    /// Write replica data with O_DIRECT where the file system allows (default: false).
    replica_direct_io: Option<bool>,
}

/// Flags of `master-target register|run` beyond the common ones; they override the file.
#[derive(Debug, Default, clap::Args)]
pub struct MtArgs {
    /// NBD listen address of recovery-point views [default: 127.0.0.1:10810]
    #[arg(long)]
    pub nbd_listen: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub common: CommonSettings,
    pub replica_dir: PathBuf,
    pub disk_slots: u32,
    pub nbd_listen: String,
    pub nbd_advertise: String,
    /// Replica data bypasses the page cache (see `Replica::write_direct`).
    pub replica_direct_io: bool,
}

/// The address clients reach views at: the NBD port on the advertised host, unless the NBD
/// server listens on one specific address.
fn nbd_advertise(listen: &str, advertise: &str) -> String {
    let (listen_host, port) = listen.rsplit_once(':').unwrap_or((listen, "10810"));
    let host = if listen_host == "0.0.0.0" || listen_host == "[::]" {
        advertise.rsplit_once(':').map_or(advertise, |(h, _)| h)
    } else {
        listen_host
    };
    format!("{host}:{port}")
}

impl ComponentSettings for Settings {
    const ROLE: Role = Role::MasterTarget;

    fn common(&self) -> &CommonSettings {
        &self.common
    }

    type Flags = MtArgs;

    fn resolve(args: &CommonArgs, mt: &MtArgs) -> anyhow::Result<Settings> {
        let file: FileConfig = lifeboat_common::config::load_toml(args.config.as_deref())?;
        let common = args.resolve(&file.common, &DEFAULTS)?;
        let replica_dir = file
            .replica_dir
            .unwrap_or_else(|| common.data_dir.join("replicas"));
        let disk_slots = file.disk_slots.unwrap_or(DEFAULT_DISK_SLOTS);
        if disk_slots <= RESERVED_SLOTS {
            anyhow::bail!("disk_slots must be at least {}", RESERVED_SLOTS + 1);
        }
        let nbd_listen = mt
            .nbd_listen
            .clone()
            .or(file.nbd_listen)
            .unwrap_or_else(|| DEFAULT_NBD_LISTEN.to_string());
        let nbd_advertise = file
            .nbd_advertise
            .unwrap_or_else(|| nbd_advertise(&nbd_listen, &common.advertise));
        Ok(Settings {
            common,
            replica_dir,
            disk_slots,
            nbd_listen,
            nbd_advertise,
            replica_direct_io: file.replica_direct_io.unwrap_or(DEFAULT_REPLICA_DIRECT_IO),
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
        // Set with each heartbeat (up to minutes apart): kept fresh in between.
        lifeboat_common::kept_gauges::set(
            "lifeboat_mt_disk_slots_free",
            facts.disk_slots_free as f64,
        );
        facts
    }

    fn disk_reports(&self) -> Vec<v1::DiskReport> {
        self.replicas
            .all()
            .iter()
            .filter_map(|r| {
                let replica = r.replica.lock().ok()?;
                let state = replica.state();
                let points = replica.points();
                Some(v1::DiskReport {
                    disk_id: r.disk_id.clone(),
                    phase: if state.failover.is_some() {
                        "failed over".into()
                    } else {
                        "applying".into()
                    },
                    seq: state.applied_seq,
                    applied_seq: state.applied_seq,
                    durable_seq: state.applied_seq,
                    stored_bytes: replica.file_bytes(),
                    journal_bytes: replica.journal_bytes(),
                    points: points.len() as u32,
                    oldest_point_unix_ms: points.first().map_or(0, |p| p.time_ms),
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
    // Its own token, cancelled below to stop its tasks when it ends (revoked, say): the
    // caller's may be shared — `lifeboat up` runs the process server on it too, and this one
    // again after registering it anew.
    let cancel = cancel.child_token();
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
    describe_retention_metrics();
    let revocations = RevocationList::default();
    let nbd_listener = tokio::net::TcpListener::bind(&settings.nbd_listen)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen for NBD on {}: {e}; set nbd_listen to a free address",
                settings.nbd_listen
            )
        })?;
    let exports = exports::Exports {
        server: nbd::Server::new(nbd::ServerConfig::default()),
        advertise: settings.nbd_advertise.clone(),
    };
    let replicas = Replicas::new(
        settings.replica_dir.clone(),
        settings.replica_direct_io,
        revocations.clone(),
        exports,
    );
    let service = ReplicaServer::new(ReplicaService::new(replicas.clone()))
        .max_decoding_message_size(lifeboat_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(lifeboat_proto::MAX_MESSAGE_BYTES);
    let pit = PointInTimeServer::new(pit::PitService::new(replicas.clone()));
    let nbd_task = {
        let (server, token) = (replicas.exports.server.clone(), cancel.clone());
        tokio::spawn(async move { server.serve(nbd_listener, token).await })
    };
    let maintenance = tokio::spawn(maintain(replicas.clone(), cancel.clone()));
    let result = run_component(ComponentRun {
        role: Role::MasterTarget,
        settings: settings.common.clone(),
        serve: true,
        reporter: MtReporter {
            settings: &settings,
            replicas,
        },
        cancel: cancel.clone(),
        routes: tonic::service::Routes::default()
            .add_service(BatchIntake::new(service))
            .add_service(pit),
        revocations,
    })
    .await;
    cancel.cancel();
    let _ = nbd_task.await;
    let _ = maintenance.await;
    result
}

fn describe_retention_metrics() {
    metrics::describe_gauge!(
        "lifeboat_mt_journal_bytes",
        metrics::Unit::Bytes,
        "Bytes held by a disk's retention journal"
    );
    metrics::describe_gauge!(
        "lifeboat_mt_recovery_points",
        "Recovery points a disk's replica can show"
    );
    metrics::describe_gauge!(
        "lifeboat_mt_oldest_point_age_seconds",
        metrics::Unit::Seconds,
        "Age of a disk's oldest recovery point"
    );
    metrics::describe_counter!(
        "lifeboat_mt_view_open_read_bytes_total",
        metrics::Unit::Bytes,
        "Journal bytes read to open views (record headers; never disk data)"
    );
    metrics::describe_histogram!(
        "lifeboat_mt_view_open_seconds",
        metrics::Unit::Seconds,
        "Time to open a recovery-point view"
    );
    metrics::describe_counter!(
        "lifeboat_mt_journal_pruned_bytes_total",
        metrics::Unit::Bytes,
        "Retention journal bytes dropped past the policy window"
    );
}

/// How often retention is pruned and its gauges refreshed.
const MAINTENANCE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Retention gauges of one replica: journal bytes, recovery points, oldest point's age (s).
type RetentionFigures = (f64, f64, f64);

/// Prunes every journal past its policy's retention window and publishes retention gauges.
/// They are kept gauges (refreshed between rounds, however long a round waits for a replica's
/// lock); a deleted replica's gauges go with the next round.
async fn maintain(replicas: Arc<Replicas>, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(MAINTENANCE_EVERY) => {}
            _ = cancel.cancelled() => return,
        }
        let r = replicas.clone();
        let last = tokio::task::spawn_blocking(move || maintain_once(&r))
            .await
            .unwrap_or_default();
        let family = |pick: fn(&RetentionFigures) -> f64| {
            last.iter()
                .map(|(disk, f)| (vec![("disk", disk.clone())], pick(f)))
                .collect()
        };
        kept_gauges::set_family("lifeboat_mt_journal_bytes", family(|f| f.0));
        kept_gauges::set_family("lifeboat_mt_recovery_points", family(|f| f.1));
        kept_gauges::set_family("lifeboat_mt_oldest_point_age_seconds", family(|f| f.2));
    }
}

/// One maintenance round: prunes and returns every replica's retention figures.
fn maintain_once(replicas: &Replicas) -> HashMap<String, RetentionFigures> {
    let now = lifeboat_common::now_ms();
    let mut figures = HashMap::new();
    for entry in replicas.all() {
        let retention = entry.assignment().retention_secs;
        // A poisoned replica (a panic while it was being written) has no figures to show.
        let Ok(mut replica) = entry.replica.lock() else {
            continue;
        };
        if retention > 0 {
            match replica.prune(retention, now) {
                Ok(0) => {}
                Ok(freed) => {
                    metrics::counter!("lifeboat_mt_journal_pruned_bytes_total",
                        "disk" => entry.disk_id.clone())
                    .increment(freed);
                    tracing::info!(disk = %entry.disk_id, freed, "retention journal pruned");
                }
                Err(e) => tracing::warn!(disk = %entry.disk_id, "cannot prune: {e}"),
            }
        }
        let points = replica.points();
        let age = points
            .first()
            .map_or(0.0, |p| (now - p.time_ms).max(0) as f64 / 1000.0);
        figures.insert(
            entry.disk_id.clone(),
            (replica.journal_bytes() as f64, points.len() as f64, age),
        );
    }
    figures
}
