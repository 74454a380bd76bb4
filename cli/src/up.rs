//! `lifeboat up`: a whole Lifeboat on one host — configuration server (single node), process
//! server and master target in one process, sharing one data directory. The first run
//! initialises the cluster and registers the two components; later runs resume. A component
//! whose identity is revoked (passphrase regenerated) registers again with the new passphrase.
use crate::context::{self, ContextArgs};
use lifeboat_common::component::{register_command, HeartbeatStop, RegisterArgs};
use lifeboat_common::component_cli::ComponentSettings;
use lifeboat_common::service_args::CommonSettings;
use lifeboat_common::telemetry::{self, LogFormat};
use lifeboat_common::{tls, Identity, Role};
use lifeboat_config_server::init::{self as cs_init, CliContext};
use lifeboat_config_server::settings::Settings as CsSettings;
use lifeboat_proto::v1::{admin_client::AdminClient, Empty, ListServersRequest, ServerInfo};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Data directory for all three services.
    #[arg(long, default_value = "./lifeboat-data")]
    pub data_dir: PathBuf,
    /// Configuration server gRPC address.
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub cs_listen: SocketAddr,
    /// Process server gRPC address.
    #[arg(long, default_value = "127.0.0.1:9443")]
    pub ps_listen: SocketAddr,
    /// Process server cache quota in MiB (default: 80% of its file system).
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    pub ps_cache_quota_mib: u64,
    /// Master target gRPC address.
    #[arg(long, default_value = "127.0.0.1:9444")]
    pub mt_listen: SocketAddr,
    /// Master target NBD address of recovery-point views (test failover, failover).
    #[arg(long, default_value = "127.0.0.1:10810")]
    pub mt_nbd_listen: String,
    /// Prometheus metrics of all three services.
    #[arg(long, default_value = "127.0.0.1:9100")]
    pub metrics_listen: SocketAddr,
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Seconds between component heartbeats.
    #[arg(long, default_value_t = 5)]
    pub heartbeat_interval_secs: u32,
}

fn common(
    data_dir: &Path,
    listen: SocketAddr,
    metrics: SocketAddr,
    log_format: LogFormat,
) -> CommonSettings {
    CommonSettings {
        data_dir: data_dir.to_path_buf(),
        listen,
        advertise: listen.to_string(),
        metrics_listen: metrics,
        log_format,
    }
}

/// A running stack: configuration server, process server and master target in this process.
pub struct Stack {
    /// Cancelled to stop the components (and by SIGTERM/Ctrl-C when started by `run`).
    pub cancel: CancellationToken,
    cs_cancel: CancellationToken,
    cs_task: tokio::task::JoinHandle<anyhow::Result<()>>,
    ps_task: tokio::task::JoinHandle<anyhow::Result<()>>,
    mt_task: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub first_run: bool,
    pub cs_address: String,
    pub cs_data_dir: PathBuf,
    pub ps_data_dir: PathBuf,
    pub mt_data_dir: PathBuf,
    pub passphrase_file: PathBuf,
    pub context_path: PathBuf,
    /// The passphrase, on the first run only (it is printed once).
    pub new_passphrase: Option<(String, String)>,
}

impl Stack {
    /// Initialises (first run) or resumes the stack in `args.data_dir` and starts it; returns
    /// once the configuration server is ready and the process server and master target have
    /// connected to it.
    pub async fn start(
        args: &UpArgs,
        ctx: &ContextArgs,
        cancel: CancellationToken,
    ) -> anyhow::Result<Stack> {
        lifeboat_common::fsutil::create_private_dir(&args.data_dir)?;
        let data_dir = std::fs::canonicalize(&args.data_dir)?;
        let cs_settings = CsSettings {
            data_dir: data_dir.join("config-server"),
            listen: args.cs_listen,
            advertise: args.cs_listen.to_string(),
            metrics_listen: args.metrics_listen,
            heartbeat_interval_secs: args.heartbeat_interval_secs,
            log_format: args.log_format,
        };
        let first_run = !Identity::exists(&cs_settings.data_dir);
        if !first_run {
            refuse_moved_address(&data_dir, &cs_settings.advertise)?;
        }
        let new_passphrase = if first_run {
            let outcome = cs_init::init(&cs_settings)?;
            Some((outcome.cluster_id, outcome.passphrase))
        } else {
            None
        };
        let cs_cancel = CancellationToken::new();
        let cs_task = tokio::spawn(lifeboat_config_server::server::run(
            cs_settings.clone(),
            cs_cancel.clone(),
        ));
        let admin_dir = cs_init::admin_dir(&cs_settings.data_dir);
        let cs_addresses = vec![cs_settings.advertise.clone()];
        let mut admin =
            match wait_until_ready(&admin_dir, &cs_addresses, Duration::from_secs(60)).await {
                Ok(admin) => admin,
                Err(e) => {
                    cs_cancel.cancel();
                    let _ = cs_task.await;
                    return Err(e);
                }
            };
        let ps = lifeboat_process_server::Settings {
            common: common(
                &data_dir.join("process-server"),
                args.ps_listen,
                args.metrics_listen,
                args.log_format,
            ),
            cache_dir: data_dir.join("process-server").join("cache"),
            cache_quota_mib: args.ps_cache_quota_mib,
            forward_memory_mib: lifeboat_process_server::recent::DEFAULT_BUDGET_MIB,
            cache_direct_io: lifeboat_process_server::DEFAULT_CACHE_DIRECT_IO,
        };
        let mt = lifeboat_master_target::Settings {
            common: common(
                &data_dir.join("master-target"),
                args.mt_listen,
                args.metrics_listen,
                args.log_format,
            ),
            replica_dir: data_dir.join("master-target").join("replicas"),
            disk_slots: lifeboat_master_target::DEFAULT_DISK_SLOTS,
            nbd_listen: args.mt_nbd_listen.clone(),
            nbd_advertise: args.mt_nbd_listen.clone(),
            replica_direct_io: lifeboat_master_target::DEFAULT_REPLICA_DIRECT_IO,
        };
        let passphrase_file = cs_init::passphrase_file(&cs_settings.data_dir);
        let register = RegisterArgs {
            cs: cs_addresses.clone(),
            passphrase_file: passphrase_file.clone(),
            name: None,
            force: true,
            keep_existing: false,
        };
        let context_path = ctx.path();
        context::save(
            &context_path,
            &CliContext {
                cs: cs_addresses.clone(),
                identity_dir: admin_dir.clone(),
            },
        )?;
        let ps_task = {
            let (facts, dir, settings) = (ps.facts(), ps.common.data_dir.clone(), ps.clone());
            let run = move |token| {
                let settings = settings.clone();
                async move { lifeboat_process_server::run(settings, token).await }
            };
            tokio::spawn(supervise(
                Role::ProcessServer,
                dir,
                register.clone(),
                cancel.clone(),
                run,
                facts,
            ))
        };
        let mt_task = {
            let (facts, dir, settings) = (mt.facts(), mt.common.data_dir.clone(), mt.clone());
            let run = move |token| {
                let settings = settings.clone();
                async move { lifeboat_master_target::run(settings, token).await }
            };
            tokio::spawn(supervise(
                Role::MasterTarget,
                dir,
                register.clone(),
                cancel.clone(),
                run,
                facts,
            ))
        };
        let stack = Stack {
            cancel,
            cs_cancel,
            cs_task,
            ps_task,
            mt_task,
            first_run,
            cs_address: cs_settings.advertise.clone(),
            cs_data_dir: cs_settings.data_dir.clone(),
            ps_data_dir: ps.common.data_dir.clone(),
            mt_data_dir: mt.common.data_dir.clone(),
            passphrase_file,
            context_path,
            new_passphrase,
        };
        if let Err(e) = stack
            .wait_connected(&mut admin, Duration::from_secs(60))
            .await
        {
            // A component that failed to start says why better than the timeout does.
            return Err(match stack.stop().await {
                Err(failed) => failed,
                Ok(()) => e,
            });
        }
        Ok(stack)
    }

    /// Waits until the process server and the master target have registered and heartbeated,
    /// so that machines can be protected as soon as `start` returns (placement only chooses
    /// connected components). Returns early on cancellation.
    async fn wait_connected(
        &self,
        admin: &mut AdminClient<Channel>,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        wait_for_servers(admin, timeout, |servers| {
            if self.cancel.is_cancelled() {
                return Ok(Vec::new());
            }
            let mut missing = Vec::new();
            for (name, dir, task) in [
                ("the process server", &self.ps_data_dir, &self.ps_task),
                ("the master target", &self.mt_data_dir, &self.mt_task),
            ] {
                if task.is_finished() {
                    anyhow::bail!("{name} stopped while starting");
                }
                // Its identity exists once it has registered.
                let connected = Identity::load(dir).is_ok_and(|component| {
                    servers
                        .iter()
                        .any(|s| s.id == component.info.id && s.connected)
                });
                if !connected {
                    missing.push(name.to_string());
                }
            }
            Ok(missing)
        })
        .await
    }

    /// Resolves on Ctrl-C/SIGTERM (or `cancel`), or when a component fails for good.
    pub async fn wait(&self) {
        tokio::select! {
            _ = self.cancel.cancelled() => {}
            _ = component_finished(&self.ps_task) => {}
            _ = component_finished(&self.mt_task) => {}
        }
    }

    /// Ordered shutdown: components first (they talk to the CS), then the configuration server.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.cancel.cancel();
        let outcome = joined(self.ps_task.await)
            .map_err(|e| e.context("process server failed"))
            .and(joined(self.mt_task.await).map_err(|e| e.context("master target failed")));
        self.cs_cancel.cancel();
        self.cs_task.await??;
        outcome
    }
}

pub async fn run(args: UpArgs, ctx: &ContextArgs) -> anyhow::Result<()> {
    telemetry::init_logging(args.log_format);
    telemetry::init_metrics(args.metrics_listen)?;
    let stack = Stack::start(&args, ctx, lifeboat_common::shutdown::on_signal()).await?;
    if let Some((cluster, passphrase)) = &stack.new_passphrase {
        println!(
            "Created Lifeboat cluster {cluster} in {}",
            args.data_dir.display()
        );
        println!();
        println!("Connection passphrase (shown once; kept in the file below):");
        println!();
        println!("    {passphrase}");
        println!();
    }
    println!(
        "Lifeboat is up{}:",
        if stack.first_run { "" } else { " (resumed)" }
    );
    println!(
        "  configuration server  {}   data {}",
        stack.cs_address,
        stack.cs_data_dir.display()
    );
    println!(
        "  process server        {}   data {}",
        args.ps_listen,
        stack.ps_data_dir.display()
    );
    println!(
        "  master target         {}   data {}",
        args.mt_listen,
        stack.mt_data_dir.display()
    );
    println!(
        "  metrics               http://{}/metrics",
        args.metrics_listen
    );
    println!(
        "  passphrase file       {}",
        stack.passphrase_file.display()
    );
    println!("  CLI context           {}", stack.context_path.display());
    println!();
    println!("Try `lifeboat servers list` or `lifeboat cluster status`. Ctrl-C stops everything.");
    stack.wait().await;
    let outcome = stack.stop().await;
    println!(
        "Lifeboat stopped; run `lifeboat up --data-dir {}` to resume.",
        args.data_dir.display()
    );
    outcome
}

/// Resolves when a component task has finished (its result is collected at shutdown).
async fn component_finished(task: &tokio::task::JoinHandle<anyhow::Result<()>>) {
    while !task.is_finished() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn joined(result: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    result.map_err(anyhow::Error::from).and_then(|r| r)
}

/// Runs a component, registering it first if it has no identity and again after revocation.
async fn supervise<F, Fut>(
    role: Role,
    data_dir: PathBuf,
    register: RegisterArgs,
    cancel: CancellationToken,
    run: F,
    facts: lifeboat_proto::v1::ComponentFacts,
) -> anyhow::Result<()>
where
    F: Fn(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    loop {
        if !Identity::exists(&data_dir) {
            lifeboat_common::fsutil::create_private_dir(&data_dir)?;
            let registered = register_command(role, &register, &data_dir, facts.clone()).await?;
            tracing::info!(id = %registered.identity().info.id, "{role} registered");
        }
        // A token of its own per run: a component may cancel what it was given when it
        // ends, and the next run (after registering again) must not start cancelled.
        match run(cancel.child_token()).await {
            Ok(()) => return Ok(()),
            Err(e) if e.downcast_ref::<HeartbeatStop>().is_some() => {
                tracing::warn!("{role}: {e}; registering again with the current passphrase");
                let registered =
                    register_command(role, &register, &data_dir, facts.clone()).await?;
                tracing::info!(id = %registered.identity().info.id, "{role} registered again");
            }
            Err(e) => return Err(e),
        }
    }
}

/// Waits until the configuration server answers with a leader and an initialised state;
/// returns the admin client that asked.
async fn wait_until_ready(
    admin_dir: &Path,
    addresses: &[String],
    timeout: Duration,
) -> anyhow::Result<AdminClient<Channel>> {
    let identity = Identity::load(admin_dir)?;
    let started = Instant::now();
    loop {
        if let Ok((_, channel)) =
            tls::mtls_connect_any(&identity, addresses, Role::ConfigServer).await
        {
            let mut admin = AdminClient::new(channel);
            if let Ok(status) = admin.cluster_status(Empty {}).await {
                let status = status.into_inner();
                if status.leader_id != 0 && !status.cluster_id.is_empty() {
                    return Ok(admin);
                }
            }
        }
        if started.elapsed() > timeout {
            anyhow::bail!(
                "the configuration server did not become ready within {}s",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Lists the registered servers every 200 ms until `missing` names none of what it waits
/// for; fails after `timeout`, naming what is still missing, or as soon as `missing` fails.
pub(crate) async fn wait_for_servers(
    admin: &mut AdminClient<Channel>,
    timeout: Duration,
    mut missing: impl FnMut(&[ServerInfo]) -> anyhow::Result<Vec<String>>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let servers = admin
            .list_servers(ListServersRequest::default())
            .await
            .map_err(context::status_error)?
            .into_inner()
            .servers;
        let missing = missing(&servers)?;
        if missing.is_empty() {
            return Ok(());
        }
        if started.elapsed() > timeout {
            anyhow::bail!(
                "{} did not report to the configuration server within {} s; see \
                 `lifeboat servers list` and the logs",
                missing.join(" and "),
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A stack started again with another `--cs-listen`: its process server and master target
/// (and any agents) know the configuration server by the address it was set up with, and
/// would dial it there for ever. Said at once rather than after a minute of waiting.
fn refuse_moved_address(data_dir: &std::path::Path, address: &str) -> anyhow::Result<()> {
    let Ok(ps) = Identity::load(&data_dir.join("process-server")) else {
        return Ok(());
    };
    let known = &ps.info.cs_addresses;
    if known.is_empty() || known.iter().any(|a| a == address) {
        return Ok(());
    }
    anyhow::bail!(
        "{} was set up with its configuration server at {}, and its process server, master \
         target and agents dial it there: start it with `--cs-listen {}` (a new address \
         needs a new --data-dir)",
        data_dir.display(),
        known.join(", "),
        known[0]
    )
}
