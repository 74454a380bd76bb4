//! The Lifeboat process server: the replication gateway between agents and master targets.
//! This crate owns its settings, what it reports about itself, and its run loop; the binary
//! (`main.rs`) and `lifeboat up` both drive it through `run`.
pub mod cache;
pub mod disks;
mod forward;
mod held;
pub mod ingest;
pub mod quota;
pub mod recent;

use cache::CacheKey;
use disks::{CacheSetup, Disks};
use ingest::IngestService;
use lifeboat_common::component::{run_component, ComponentRun, Reporter, RevocationList};
use lifeboat_common::component_cli::ComponentSettings;
use lifeboat_common::service_args::{CommonArgs, CommonFileConfig, CommonSettings, RoleDefaults};
use lifeboat_common::Identity;
use lifeboat_common::{facts, kept_gauges, Role};
use lifeboat_proto::batch_intake::BatchIntake;
use lifeboat_proto::v1::{self, ingest_server::IngestServer};
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub const DEFAULTS: RoleDefaults = RoleDefaults {
    data_dir: "/var/lib/lifeboat/process-server",
    listen: "0.0.0.0:9443",
    metrics_listen: "0.0.0.0:9101",
};

/// Whether cache segments are written with `O_DIRECT` unless configured (`cache_direct_io`).
pub const DEFAULT_CACHE_DIRECT_IO: bool = true;

/// The `--config` file.
#[derive(Debug, Default, Deserialize)]
struct FileConfig {
    #[serde(flatten)]
    common: CommonFileConfig,
    /// Disk cache directory (default: DATA/cache).
    cache_dir: Option<PathBuf>,
    /// Cache quota in MiB (default: 80% of the cache file system).
    cache_quota_mib: Option<u64>,
    /// Memory for stored batches kept to forward without reading them back, over all disks,
    /// in MiB (default 1024).
    forward_memory_mib: Option<u64>,
    /// Write cache segments with O_DIRECT instead of through the page cache (default false).
    cache_direct_io: Option<bool>,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub common: CommonSettings,
    pub cache_dir: PathBuf,
    /// 0: the default share of the cache file system (see `quota`).
    pub cache_quota_mib: u64,
    /// The memory budget of `recent` (all disks).
    pub forward_memory_mib: u64,
    /// Cache segments are written with `O_DIRECT` (see `cache::segment`).
    pub cache_direct_io: bool,
}

impl ComponentSettings for Settings {
    const ROLE: Role = Role::ProcessServer;

    fn common(&self) -> &CommonSettings {
        &self.common
    }

    type Flags = lifeboat_common::component_cli::NoFlags;

    fn resolve(args: &CommonArgs, _flags: &Self::Flags) -> anyhow::Result<Settings> {
        let file: FileConfig = lifeboat_common::config::load_toml(args.config.as_deref())?;
        let common = args.resolve(&file.common, &DEFAULTS)?;
        let cache_dir = file
            .cache_dir
            .unwrap_or_else(|| common.data_dir.join("cache"));
        Ok(Settings {
            common,
            cache_dir,
            cache_quota_mib: file.cache_quota_mib.unwrap_or(0),
            forward_memory_mib: file
                .forward_memory_mib
                .unwrap_or(recent::DEFAULT_BUDGET_MIB),
            cache_direct_io: file.cache_direct_io.unwrap_or(DEFAULT_CACHE_DIRECT_IO),
        })
    }

    fn prepare(&self) -> anyhow::Result<()> {
        lifeboat_common::fsutil::create_private_dir(&self.common.data_dir)?;
        lifeboat_common::fsutil::create_private_dir(&self.cache_dir)?;
        Ok(())
    }

    /// Address, cache directory and its free space, for registration and heartbeats.
    fn facts(&self) -> lifeboat_proto::v1::ComponentFacts {
        facts::base_facts(&self.common.advertise, &self.cache_dir)
    }
}

/// What the process server tells the configuration server, and how it takes assignments.
struct PsReporter<'a> {
    settings: &'a Settings,
    disks: Arc<Disks>,
}

impl Reporter for PsReporter<'_> {
    fn facts(&self) -> v1::ComponentFacts {
        let (cache_bytes, ratio) = self.disks.cache_totals();
        let (fill_rate, drain_rate) = self.disks.cache.quota.rates();
        // Set with each heartbeat (up to minutes apart): kept fresh in between.
        kept_gauges::set("lifeboat_ps_cache_bytes", cache_bytes as f64);
        kept_gauges::set(
            "lifeboat_ps_cache_quota_bytes",
            self.disks.cache.quota.quota_bytes as f64,
        );
        kept_gauges::set("lifeboat_ps_compression_ratio", ratio);
        kept_gauges::set(
            "lifeboat_ps_forward_memory_bytes",
            self.disks.recent_budget.used() as f64,
        );
        let mut facts = self.settings.facts();
        kept_gauges::set("lifeboat_ps_cache_free_bytes", facts.free_bytes as f64);
        // What the cache may hold now: its quota, or less when its file system has less room
        // (`Quota::limit`, as admission judges) — so the configuration server's 75%/90%
        // alerts, `servers list` and load-balance do not judge by a quota the disk cannot hold.
        facts.cache_quota_bytes = self.disks.cache.quota.limit(cache_bytes, facts.free_bytes);
        facts.cache_used_bytes = cache_bytes;
        facts.cache_fill_bytes_per_sec = fill_rate;
        facts.cache_drain_bytes_per_sec = drain_rate;
        facts
    }

    fn disk_reports(&self) -> Vec<v1::DiskReport> {
        self.disks
            .all()
            .iter()
            .filter_map(|d| {
                // Read before the cache: a store takes the cache lock and then looks at this
                // flag, so if it is set the seq read below can no longer grow (see `ingest`).
                let draining = d.assignment().draining;
                // Nothing is said of a disk whose cache state is unknown (a poisoned lock):
                // "durable 0" would let a switch believe it drained.
                // Held batches count as here (see `held`): a drain is over once they are
                // applied too. Read under the cache lock, which a hold takes.
                let (seq, bytes) = d
                    .cache
                    .lock()
                    .map(|c| (d.received_seq().max(c.durable_seq()), c.bytes()))
                    .ok()?;
                // Read after the seq, so durable == applied cannot be claimed too early.
                let applied_seq = d.applied().0;
                Some(v1::DiskReport {
                    disk_id: d.disk_id.clone(),
                    phase: if draining { "draining" } else { "caching" }.into(),
                    seq,
                    durable_seq: seq,
                    applied_seq,
                    stored_bytes: bytes,
                    draining,
                    error: d.forward_stall(seq, applied_seq),
                    ..Default::default()
                })
            })
            .collect()
    }

    fn assignments(&self, assignments: Vec<v1::DiskAssignment>) {
        self.disks.assign(assignments);
    }
}

fn describe_metrics() {
    metrics::describe_gauge!(
        "lifeboat_ps_cache_bytes",
        metrics::Unit::Bytes,
        "Bytes held in the disk cache"
    );
    metrics::describe_gauge!(
        "lifeboat_ps_cache_quota_bytes",
        metrics::Unit::Bytes,
        "Most bytes the disk cache may hold"
    );
    metrics::describe_counter!(
        "lifeboat_ps_held_bytes_total",
        metrics::Unit::Bytes,
        "Payload bytes the agents read from their disks (sync, resync, scans) held for the master target instead of cached"
    );
    metrics::describe_counter!(
        "lifeboat_ps_flow_control_delays_total",
        "Incoming batch groups delayed because the cache is over 75% of its quota"
    );
    metrics::describe_counter!(
        "lifeboat_ps_cache_full_seconds_total",
        metrics::Unit::Seconds,
        "Time agent streams were held because the cache was full"
    );
    metrics::describe_gauge!(
        "lifeboat_ps_cache_free_bytes",
        metrics::Unit::Bytes,
        "Free space of the cache file system"
    );
    metrics::describe_gauge!(
        "lifeboat_ps_compression_ratio",
        "Bytes received per byte stored in the cache"
    );
    metrics::describe_counter!(
        "lifeboat_ps_ingest_bytes_total",
        metrics::Unit::Bytes,
        "Payload bytes of batches made durable in the cache"
    );
    metrics::describe_counter!(
        "lifeboat_ps_forwarded_bytes_total",
        metrics::Unit::Bytes,
        "Payload bytes sent to master targets"
    );
    metrics::describe_counter!(
        "lifeboat_ps_cache_read_back_bytes_total",
        metrics::Unit::Bytes,
        "Payload bytes forwarded from the cache file rather than from memory (after a \
         reconnect or restart, or behind what is kept in memory)"
    );
    metrics::describe_gauge!(
        "lifeboat_ps_forward_memory_bytes",
        metrics::Unit::Bytes,
        "Payload bytes of stored batches kept in memory for forwarding (all disks)"
    );
}

/// Serves until `cancel` (or until the identity is revoked).
pub async fn run(settings: Settings, cancel: CancellationToken) -> anyhow::Result<()> {
    settings.prepare()?;
    describe_metrics();
    let identity = Arc::new(Identity::load(&settings.common.data_dir)?);
    let key =
        CacheKey::load_or_create(&settings.common.data_dir.join("private").join("cache.key"))?;
    let revocations = RevocationList::default();
    let quota = quota::Quota::new(&settings.cache_dir, settings.cache_quota_mib);
    // Say where the figure comes from: by default it is a share of the whole file system,
    // which on a large disk is a number nobody recognises.
    let source = if settings.cache_quota_mib == 0 {
        "80% of the file system's size (default; set cache_quota_mib to choose)"
    } else {
        "cache_quota_mib"
    };
    tracing::info!(
        quota_bytes = quota.quota_bytes,
        "cache {}: quota {:.1} GiB, {source}",
        settings.cache_dir.display(),
        quota.quota_bytes as f64 / (1u64 << 30) as f64
    );
    // The quota is a ceiling, not a reservation: whatever else shares the file system, the
    // cache also stops FS_RESERVE short of full (`Quota::limit`). Say so when that is the
    // tighter limit, so that the operator does not plan with a figure the disk cannot hold.
    let (free, _) = lifeboat_common::facts::space(&settings.cache_dir);
    let room = quota.limit(quota::allocated_under(&settings.cache_dir), free);
    if room < quota.quota_bytes {
        tracing::warn!(
            "cache {}: room for only {:.1} GiB (what it holds, plus the file system's free \
             space less a {} MiB reserve), less than its quota: the cache holds at most that \
             much until space is freed; give it a file system of its own or set cache_quota_mib",
            settings.cache_dir.display(),
            room as f64 / (1u64 << 30) as f64,
            quota::FS_RESERVE >> 20
        );
    }
    let cache = CacheSetup {
        dir: settings.cache_dir.clone(),
        direct_io: settings.cache_direct_io,
        quota: Arc::new(quota),
        key: Arc::new(key),
    };
    let disks = Disks::new(
        cache,
        recent::Budget::new((settings.forward_memory_mib as usize).saturating_mul(1 << 20)),
        identity,
        revocations.clone(),
        cancel.child_token(),
    );
    let ingest = IngestServer::new(IngestService::new(disks.clone()))
        .max_decoding_message_size(lifeboat_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(lifeboat_proto::MAX_MESSAGE_BYTES);
    let result = run_component(ComponentRun {
        role: Role::ProcessServer,
        settings: settings.common.clone(),
        serve: true,
        reporter: PsReporter {
            settings: &settings,
            disks: disks.clone(),
        },
        cancel: cancel.clone(),
        routes: tonic::service::Routes::default().add_service(BatchIntake::new(ingest)),
        revocations,
    })
    .await;
    disks.cancel.cancel();
    result
}
