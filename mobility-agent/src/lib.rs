//! The Lifeboat mobility agent: runs on a protected machine and only makes outbound
//! connections. This crate owns its settings (including the machine's disks), what it reports,
//! and its run loop; the binary (`main.rs`) drives it through `run`.
use agent::Agent;
use lifeboat_common::component::{run_component, ComponentRun, Reporter};
use lifeboat_common::service_args::{CommonArgs, CommonFileConfig, CommonSettings, RoleDefaults};
use lifeboat_common::{facts, Role};
use lifeboat_proto::v1;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub mod agent;
pub mod capture;
pub mod dirty;
pub mod disk;
pub mod progress;

/// Where the agent serves its NBD exports unless configured.
pub const DEFAULT_NBD_LISTEN: &str = "127.0.0.1:10809";

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
    /// Where protected disks are exported over NBD for the workload to write through.
    #[arg(long)]
    pub nbd_listen: Option<SocketAddr>,
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
    /// NBD listen address of the write splitter (default 127.0.0.1:10809).
    nbd_listen: Option<SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub common: CommonSettings,
    pub disks: Vec<DiskConfig>,
    pub nbd_listen: SocketAddr,
}

impl Settings {
    pub fn resolve(args: &CommonArgs, disks: &DiskArgs) -> anyhow::Result<Settings> {
        let args_nbd = disks.nbd_listen;
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
        let nbd_listen = match disks_args_nbd(args_nbd, file.nbd_listen) {
            Some(a) => a,
            None => DEFAULT_NBD_LISTEN.parse()?,
        };
        Ok(Settings {
            common,
            disks,
            nbd_listen,
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

fn disks_args_nbd(flag: Option<SocketAddr>, file: Option<SocketAddr>) -> Option<SocketAddr> {
    flag.or(file)
}

/// Size of an image file or block device (seeking to the end works for both).
fn disk_size(path: &Path) -> std::io::Result<u64> {
    use std::io::Seek;
    std::fs::File::open(path)?.seek(std::io::SeekFrom::End(0))
}

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
        let reports = self.agent.reports();
        for r in &reports {
            metrics::gauge!("lifeboat_disk_rpo_seconds", "disk" => r.disk_id.clone())
                .set(r.rpo_secs);
            metrics::gauge!("lifeboat_disk_pending_bytes", "disk" => r.disk_id.clone())
                .set(r.pending_bytes as f64);
        }
        reports
    }

    fn assignments(&self, assignments: Vec<v1::DiskAssignment>) {
        self.agent.assign(assignments);
    }
}

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
        "lifeboat_agent_throttled_seconds_total",
        metrics::Unit::Seconds,
        "Time workload writes waited for the shipper (flow control)"
    );
    let identity = Arc::new(lifeboat_common::Identity::load(&settings.common.data_dir)?);
    let agent = Agent::new(
        identity,
        settings.common.data_dir.join("disks"),
        cancel.child_token(),
    );
    let listener = tokio::net::TcpListener::bind(settings.nbd_listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot serve NBD on {}: {e}", settings.nbd_listen))?;
    tracing::info!(listen = %settings.nbd_listen, "NBD exports of protected disks served here");
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
