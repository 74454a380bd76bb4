//! The Lifeboat mobility agent: runs on a protected machine and only makes outbound
//! connections. This crate owns its settings (including the machine's disks), what it reports,
//! and its run loop; the binary (`main.rs`) drives it through `run`.
use agent::Agent;
use lifeboat_common::component::{run_component, ComponentRun, EarlyReports, Reporter};
use lifeboat_common::service_args::RoleDefaults;
use lifeboat_common::{kept_gauges, Role};
use lifeboat_proto::v1;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub mod agent;
pub mod background;
pub mod capture;
pub mod dirty;
pub mod disk;
pub mod initial_sync;
pub mod points;
pub mod progress;
pub mod resync;
pub mod scan;
pub mod settings;
pub mod ship;
pub mod spill;
pub mod splitter;

pub use settings::{DiskArgs, DiskConfig, Settings, Tuning};

pub use settings::DEFAULT_NBD_LISTEN;

pub const DEFAULTS: RoleDefaults = RoleDefaults {
    data_dir: "/var/lib/lifeboat/mobility-agent",
    // Agents do not serve gRPC; the address is unused.
    listen: "127.0.0.1:0",
    metrics_listen: "127.0.0.1:9103",
};

/// What the agent tells the configuration server, and how it takes assignments.
struct AgentReporter<'a> {
    settings: &'a Settings,
    agent: Arc<Agent>,
}

impl Reporter for AgentReporter<'_> {
    fn facts(&self) -> v1::ComponentFacts {
        self.settings.facts()
    }

    fn disk_reports(&self) -> Vec<v1::DiskReport> {
        publish(self.agent.reports())
    }

    fn assignments(&self, assignments: Vec<v1::DiskAssignment>) {
        self.agent.assign(assignments);
    }

    fn early_reports(&self) -> Option<&EarlyReports> {
        Some(&self.agent.early_reports)
    }

    /// During a group barrier the configuration server waits for this agent's answers.
    fn heartbeat_every(&self, interval: std::time::Duration) -> std::time::Duration {
        if self.agent.in_barrier() {
            BARRIER_HEARTBEAT.min(interval)
        } else {
            interval
        }
    }
}

/// Heartbeat interval while a group barrier is under way.
const BARRIER_HEARTBEAT: std::time::Duration = std::time::Duration::from_millis(100);

/// Sets the per-disk gauges from `reports` and passes them on. A disk no longer reported (no
/// longer replicated) leaves the gauges.
fn publish(reports: Vec<v1::DiskReport>) -> Vec<v1::DiskReport> {
    let series = |value: fn(&v1::DiskReport) -> f64| {
        reports
            .iter()
            .map(|r| (vec![("disk", r.disk_id.clone())], value(r)))
            .collect()
    };
    kept_gauges::set_family("lifeboat_disk_rpo_seconds", series(|r| r.rpo_secs));
    kept_gauges::set_family(
        "lifeboat_disk_pending_bytes",
        series(|r| r.pending_bytes as f64),
    );
    reports
}

/// How often the per-disk gauges are refreshed between heartbeats (a scrape sees the RPO at
/// this resolution rather than the heartbeat interval's).
const GAUGE_REFRESH: std::time::Duration = std::time::Duration::from_millis(250);

/// Runs until `cancel` (or until the identity is revoked).
pub async fn run(settings: Settings, cancel: CancellationToken) -> anyhow::Result<()> {
    settings.prepare()?;
    metrics::describe_gauge!(
        "lifeboat_disk_rpo_seconds",
        metrics::Unit::Seconds,
        "Age of the oldest captured write not yet applied on the master target"
    );
    metrics::describe_gauge!(
        "lifeboat_disk_pending_bytes",
        metrics::Unit::Bytes,
        "Bytes captured but not yet applied on the master target"
    );
    metrics::describe_counter!(
        "lifeboat_agent_shipped_bytes_total",
        metrics::Unit::Bytes,
        "Payload bytes sent to the process server"
    );
    metrics::describe_counter!(
        "lifeboat_agent_throttled_writes_total",
        "Workload writes that waited for the shipper (flow control)"
    );
    metrics::describe_counter!(
        "lifeboat_agent_throttled_milliseconds_total",
        "Time workload writes waited for the shipper (flow control)"
    );
    metrics::describe_counter!(
        "lifeboat_agent_stream_breaks_total",
        "Times a disk's stream was given up for dirty-region tracking (a resync follows)"
    );
    metrics::describe_counter!(
        "lifeboat_agent_resync_compared_bytes_total",
        metrics::Unit::Bytes,
        "Bytes a resync or scan compared with the replica's block hashes"
    );
    metrics::describe_counter!(
        "lifeboat_agent_scans_total",
        "Scans of scan-mode disks finished"
    );
    metrics::describe_counter!(
        "lifeboat_agent_resync_shipped_bytes_total",
        metrics::Unit::Bytes,
        "Bytes a resync or scan shipped because their blocks differed"
    );
    metrics::describe_counter!(
        "lifeboat_agent_points_total",
        "Recovery points placed on nbd-mode disks, by kind"
    );
    metrics::describe_counter!(
        "lifeboat_agent_app_point_failures_total",
        "App-consistent points the policy asked for and that were not placed, by reason \
         (no_freeze_hook: the agent has none; freeze_failed: the hook failed or timed out)"
    );
    // Present from the start (at 0), so an alert rule can watch it before the first failure.
    for reason in [points::NO_HOOK, points::FREEZE_FAILED] {
        metrics::counter!("lifeboat_agent_app_point_failures_total", "reason" => reason)
            .absolute(0);
    }
    let identity = Arc::new(lifeboat_common::Identity::load(&settings.common.data_dir)?);
    background::configure(settings.tuning.replication_nice);
    let agent = Agent::new(
        identity,
        settings.tuning.clone(),
        &settings.disks,
        settings.common.data_dir.join("disks"),
        cancel.child_token(),
    );
    let listener = tokio::net::TcpListener::bind(settings.nbd_listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot serve NBD on {}: {e}", settings.nbd_listen))?;
    tracing::info!(listen = %settings.nbd_listen, "NBD exports of protected disks served here");
    if settings.disks.is_empty() {
        // `run` does not remember what `register` was given: an agent started without its
        // disks reports none, and its machine cannot be protected.
        tracing::warn!(
            "no disks configured: nothing on this machine can be protected; give each disk \
             to `run` as at register (--disk NAME=PATH or --scan-disk NAME=PATH), or list \
             them as `disks` in the config file"
        );
    }
    {
        let (agent, stop) = (agent.clone(), agent.cancel.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(GAUGE_REFRESH) => publish(agent.reports()),
                    _ = stop.cancelled() => return,
                };
            }
        });
    }
    tokio::spawn(points::run(agent.clone()));
    let nbd_task = {
        let (server, stop) = (agent.nbd.clone(), agent.cancel.clone());
        tokio::spawn(async move { server.serve(listener, stop).await })
    };
    let result = run_component(ComponentRun {
        role: Role::Agent,
        settings: settings.common.clone(),
        serve: false,
        reporter: AgentReporter {
            settings: &settings,
            agent: agent.clone(),
        },
        cancel,
        routes: tonic::service::Routes::default(),
        revocations: Default::default(),
    })
    .await;
    agent.cancel.cancel();
    let _ = nbd_task.await;
    result
}
