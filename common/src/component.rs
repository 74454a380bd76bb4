//! What process servers, master targets and agents share: the `register` command, the
//! heartbeat loop that keeps the configuration server informed, and the revocation list the
//! heartbeat brings back so that servers refuse revoked callers within one interval.
use crate::assignment_watch::Latest;
use crate::identity::Identity;
use crate::register::{register, Registration};
use crate::role::Role;
use crate::tls;
use lifeboat_proto::v1::{self, component_client::ComponentClient};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Flags of every component's `register` command.
#[derive(Debug, Clone, clap::Args)]
pub struct RegisterArgs {
    /// Configuration server address(es), host:port; repeat or comma-separate for a cluster.
    #[arg(long = "cs", required = true, value_delimiter = ',')]
    pub cs: Vec<String>,
    /// File holding the connection passphrase (from `config-server init`).
    #[arg(long)]
    pub passphrase_file: PathBuf,
    /// Name of this component, unique for its role (default: with --force, the name of the
    /// identity it replaces; else the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Register again even if this data directory already has an identity.
    #[arg(long, conflicts_with = "keep_existing")]
    pub force: bool,
    /// If this data directory already has an identity of this role, keep it and succeed
    /// without registering (for provisioning that runs the same steps on every start).
    #[arg(long)]
    pub keep_existing: bool,
}

/// What `register` did.
pub enum Registered {
    /// A new identity; with `--force`, the one it replaced in the data directory.
    New(Identity, Option<Identity>),
    /// `--keep-existing` and the data directory already had this identity.
    Kept(Identity),
}

impl Registered {
    pub fn identity(&self) -> &Identity {
        match self {
            Registered::New(i, _) | Registered::Kept(i) => i,
        }
    }

    /// Tells the operator what `register` did: `what` names the component ("machine",
    /// "process-server"), `next` the step after a new registration. The configuration server
    /// retires an identity when another registers under its name, but one `--force` replaced
    /// under another name stays registered (and shows as down) until revoked: said on stderr.
    pub fn report(&self, what: &str, next: &str) {
        match self {
            Registered::New(new, replaced) => {
                if let Some(old) = replaced.as_ref().filter(|o| o.info.name != new.info.name) {
                    eprintln!(
                        "note: the identity this replaces, {} {} ({}), stays registered under \
                         its name: `lifeboat servers revoke {}` removes it",
                        old.info.role, old.info.name, old.info.id, old.info.id
                    );
                }
                println!(
                    "Registered {what} {} as {}; {next}",
                    new.info.name, new.info.id
                );
            }
            Registered::Kept(kept) => println!(
                "Already registered as {what} {} ({}); kept",
                kept.info.name, kept.info.id
            ),
        }
    }
}

/// Registers and saves the identity in `data_dir`. Refuses to overwrite an identity unless
/// `force`, so a mistyped command cannot orphan a registered component; with `keep_existing`
/// an identity of the same role is kept instead.
pub async fn register_command(
    role: Role,
    args: &RegisterArgs,
    data_dir: &Path,
    facts: v1::ComponentFacts,
) -> anyhow::Result<Registered> {
    if Identity::exists(data_dir) && !args.force {
        let existing = Identity::load(data_dir)?;
        if args.keep_existing && existing.info.role == role {
            return Ok(Registered::Kept(existing));
        }
        anyhow::bail!(
            "{} is already registered as {} {} ({}); pass --force to register again",
            data_dir.display(),
            existing.info.role,
            existing.info.name,
            existing.info.id
        );
    }
    let replaced = Identity::load(data_dir)
        .ok()
        .filter(|old| old.info.role == role);
    let passphrase = crate::config::read_passphrase_file(&args.passphrase_file)?;
    // `--force` again (after a passphrase change, say) keeps the name it replaces.
    let name = args
        .name
        .clone()
        .or_else(|| replaced.as_ref().map(|old| old.info.name.clone()))
        .unwrap_or_else(crate::facts::hostname);
    crate::fsutil::create_private_dir(data_dir)?;
    let identity = register(Registration {
        cs_addresses: &args.cs,
        passphrase: &passphrase,
        role,
        name: &name,
        facts,
        replaces: replaced.as_ref().map_or("", |old| old.info.id.as_str()),
    })
    .await?;
    identity.save(data_dir)?;
    Ok(Registered::New(identity, replaced))
}

/// Identities the configuration server reports as revoked.
#[derive(Debug, Clone, Default)]
pub struct RevocationList(Arc<RwLock<HashSet<String>>>);

impl RevocationList {
    pub fn is_revoked(&self, id: &str) -> bool {
        self.0.read().map(|set| set.contains(id)).unwrap_or(true)
    }

    fn replace(&self, ids: Vec<String>) {
        if let Ok(mut set) = self.0.write() {
            *set = ids.into_iter().collect();
        }
    }
}

/// What a component tells the configuration server with each heartbeat, and what it does
/// with the disks it is told to handle. A plain closure returning facts is a reporter with no
/// disks.
pub trait Reporter: Send + Sync {
    fn facts(&self) -> v1::ComponentFacts;
    /// Progress of the disks this component handles.
    fn disk_reports(&self) -> Vec<v1::DiskReport> {
        Vec::new()
    }
    /// The disks this component must handle now (the full list, every heartbeat).
    fn assignments(&self, _assignments: Vec<v1::DiskAssignment>) {}
    /// Time to the next heartbeat, given the configured interval (an agent in a group
    /// barrier answers sooner).
    fn heartbeat_every(&self, interval: Duration) -> Duration {
        interval
    }
    /// What makes the next heartbeat go out before the end of the interval.
    fn early_reports(&self) -> Option<&EarlyReports> {
        None
    }
}

/// Reasons for a component to heartbeat before its interval is up.
#[derive(Debug, Default)]
pub struct EarlyReports {
    /// Something the configuration server acts on (a disk finished its initial sync, say):
    /// reported at once.
    pub now: tokio::sync::Notify,
    /// A change in the figures (a disk's backlog started or cleared): reported at most once
    /// per `EARLY_REPORT_GAP`.
    pub soon: tokio::sync::Notify,
}

impl<F: Fn() -> v1::ComponentFacts + Send + Sync> Reporter for F {
    fn facts(&self) -> v1::ComponentFacts {
        self()
    }
}

/// Why the heartbeat loop ended.
#[derive(Debug, thiserror::Error)]
pub enum HeartbeatStop {
    #[error("the configuration server no longer accepts this identity ({0}); register again with the current passphrase (`register --force`)")]
    Revoked(String),
}

/// Sends a heartbeat every interval until cancelled, and meanwhile follows assignment
/// changes as they happen (`assignment_watch`). Returns `Err` only when the identity has been
/// revoked: then continuing is pointless and the operator must act.
pub async fn heartbeat_loop(
    identity: Identity,
    data_dir: PathBuf,
    reporter: &impl Reporter,
    revocations: RevocationList,
    cancel: CancellationToken,
) -> Result<(), HeartbeatStop> {
    let latest = Latest::default();
    let watcher = identity.clone();
    // The configuration servers' addresses as heartbeat replies update them, for the long-poll.
    let (addresses, followed) = watch::channel(identity.info.cs_addresses.clone());
    let reconnected = tokio::sync::Notify::new();
    let follow =
        crate::assignment_watch::follow(&watcher, &followed, reporter, &latest, &reconnected);
    let links = Links {
        latest: &latest,
        addresses: &addresses,
        reconnected: &reconnected,
    };
    let beats = heartbeats(identity, data_dir, reporter, revocations, cancel, links);
    tokio::select! {
        result = beats => result,
        () = follow => Ok(()),
    }
}

/// What the heartbeats share with the assignment long-poll.
struct Links<'a> {
    /// The newest assignment list handed over (by either path).
    latest: &'a Latest,
    /// The configuration servers' addresses, updated from heartbeat replies.
    addresses: &'a watch::Sender<Vec<String>>,
    /// Notified when the long-poll connects again after a failure.
    reconnected: &'a tokio::sync::Notify,
}

/// First wait before a failed heartbeat is sent again.
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Least time between a heartbeat and the next one sent early for `EarlyReports::soon`: an
/// agent asks at every backlog start and catch-up, which under small steady writes can be
/// many times a second.
const EARLY_REPORT_GAP: Duration = Duration::from_secs(1);
/// Heartbeats sent `EARLY_REPORT_GAP` apart after one sent early for `EarlyReports::soon`.
const FOLLOW_UPS: u8 = 2;

/// The reporter's disk reports. They take each disk's lock, which a store or an apply holds
/// through its fsync (milliseconds, more on a slow disk): on a multi-threaded runtime the
/// worker hands its other tasks over first, so they do not wait behind the disk.
fn disk_reports(reporter: &impl Reporter) -> Vec<v1::DiskReport> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(|| reporter.disk_reports()),
        _ => reporter.disk_reports(),
    }
}

/// A heartbeat: the component's facts and disk reports; `signing_off` for its last.
fn heartbeat_request(reporter: &impl Reporter, signing_off: bool) -> v1::HeartbeatRequest {
    v1::HeartbeatRequest {
        facts: Some(reporter.facts()),
        disks: disk_reports(reporter),
        signing_off,
    }
}

async fn heartbeats(
    mut identity: Identity,
    data_dir: PathBuf,
    reporter: &impl Reporter,
    revocations: RevocationList,
    cancel: CancellationToken,
    links: Links<'_>,
) -> Result<(), HeartbeatStop> {
    let Links {
        latest,
        addresses,
        reconnected,
    } = links;
    let mut connection: Option<(String, Channel)> = None;
    let mut interval = Duration::from_secs(identity.info.heartbeat_interval_secs.max(1) as u64);
    let mut was_connected = None;
    let mut retry = RETRY_FIRST;
    // Set after a heartbeat sent early for `EarlyReports::soon`: two more follow, a gap apart,
    // so whoever began waiting just after the change hears of it without waiting out the
    // interval (`lifeboat wait --caught-up` trusts the second report that arrives after it
    // began: the first may have been put together before).
    let mut follow_ups = 0u8;
    loop {
        let request = heartbeat_request(reporter, false);
        let result = send_one(&identity, &mut connection, request).await;
        let connected = match result {
            Ok(response) => {
                interval = Duration::from_secs(response.heartbeat_interval_secs.max(1) as u64);
                revocations.replace(response.revoked_identity_ids);
                latest.offer(response.applied_index, response.assignments, reporter);
                if let Err(e) = identity.update_cs_addresses(&data_dir, response.cs_addresses) {
                    tracing::warn!("cannot save configuration server addresses: {e}");
                }
                if *addresses.borrow() != identity.info.cs_addresses {
                    addresses.send_replace(identity.info.cs_addresses.clone());
                }
                true
            }
            Err(status) if status.code() == tonic::Code::Unauthenticated => {
                return Err(HeartbeatStop::Revoked(status.message().to_string()));
            }
            Err(status) => {
                connection = None;
                if was_connected != Some(false) {
                    tracing::warn!("heartbeat failed: {}", status.message());
                }
                false
            }
        };
        if was_connected != Some(connected) && connected {
            tracing::info!("connected to the configuration server");
        }
        was_connected = Some(connected);
        crate::kept_gauges::set("lifeboat_cs_connected", if connected { 1.0 } else { 0.0 });
        let sent_at = tokio::time::Instant::now();
        // Resolves to whether the early heartbeat is for `soon` (figures) rather than `now`.
        let nudged = async {
            let Some(early) = reporter.early_reports() else {
                return std::future::pending().await;
            };
            let soon = async {
                early.soon.notified().await;
                tokio::time::sleep_until(sent_at + EARLY_REPORT_GAP).await;
            };
            tokio::select! {
                _ = early.now.notified() => false,
                _ = soon => true,
            }
        };
        // After a failure, try again soon (another configuration server may answer: the
        // cluster lost the node this one talked to), backing off up to the interval.
        let wait = if connected {
            retry = RETRY_FIRST;
            let every = reporter.heartbeat_every(interval);
            if follow_ups > 0 {
                follow_ups -= 1;
                every.min(EARLY_REPORT_GAP)
            } else {
                every
            }
        } else {
            let wait = retry.min(interval);
            retry = (retry * 2).min(interval);
            wait
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            for_figures = nudged => if for_figures { follow_ups = FOLLOW_UPS },
            _ = reconnected.notified() => {}
            _ = cancel.cancelled() => {
                if connected {
                    sign_off(&identity, &mut connection, reporter).await;
                }
                return Ok(());
            }
        }
    }
}

/// Longest a stopping component waits for the configuration server to take its last
/// heartbeat: stopping must not hang on an unreachable one.
const SIGN_OFF_TIMEOUT: Duration = Duration::from_secs(2);

/// Tells the configuration server this component is stopping cleanly, with its last disk
/// reports, so operators see it disconnected at once rather than after three missed
/// heartbeats (an agent stopped cleanly otherwise showed its machine Protected for ~15 s).
async fn sign_off(
    identity: &Identity,
    connection: &mut Option<(String, Channel)>,
    reporter: &impl Reporter,
) {
    let request = heartbeat_request(reporter, true);
    match tokio::time::timeout(SIGN_OFF_TIMEOUT, send_one(identity, connection, request)).await {
        Ok(Ok(_)) => tracing::info!("signed off at the configuration server"),
        Ok(Err(status)) => tracing::debug!("cannot sign off: {}", status.message()),
        Err(_) => tracing::debug!("cannot sign off: no answer within {SIGN_OFF_TIMEOUT:?}"),
    }
}

async fn send_one(
    identity: &Identity,
    connection: &mut Option<(String, Channel)>,
    request: v1::HeartbeatRequest,
) -> Result<v1::HeartbeatResponse, tonic::Status> {
    if connection.is_none() {
        let found =
            tls::mtls_connect_any(identity, &identity.info.cs_addresses, Role::ConfigServer)
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        *connection = Some(found);
    }
    let Some((_, channel)) = connection.as_ref() else {
        return Err(tonic::Status::unavailable("not connected"));
    };
    let mut client = ComponentClient::new(channel.clone());
    client.heartbeat(request).await.map(|r| r.into_inner())
}

/// How a component runs: its role, settings, whether it serves gRPC, and its facts.
pub struct ComponentRun<F> {
    pub role: Role,
    pub settings: crate::service_args::CommonSettings,
    /// Process servers and master targets serve; agents only call out.
    pub serve: bool,
    pub reporter: F,
    pub cancel: CancellationToken,
    /// The component's own gRPC services (served with health when `serve`).
    pub routes: tonic::service::Routes,
    /// Filled from heartbeats; the component's services consult it.
    pub revocations: RevocationList,
}

/// Runs a registered component until `cancel`: optional gRPC server (TLS, health) and
/// heartbeats. Logging and metrics are the caller's (one per process, and `lifeboat up` runs
/// several components in one). Shutdown order: stop heartbeats, stop accepting calls, return.
pub async fn run_component<F>(run: ComponentRun<F>) -> anyhow::Result<()>
where
    F: Reporter,
{
    let settings = &run.settings;
    let identity = Identity::load(&settings.data_dir)?;
    if identity.info.role != run.role {
        anyhow::bail!(
            "{} holds a {} identity, not a {}'s",
            settings.data_dir.display(),
            identity.info.role,
            run.role
        );
    }
    let cancel = run.cancel.clone();
    // The server stops with the process, or when heartbeats end on revocation.
    let server_stop = cancel.child_token();
    let server = if run.serve {
        let (bound, incoming) = crate::serve::bind(settings.listen, &identity).await?;
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let router = crate::serve::grpc_server()
            .add_routes(run.routes)
            .add_service(health_service);
        let server_cancel = server_stop.clone();
        tracing::info!(id = %identity.info.id, listen = %bound, "{} serving", run.role);
        Some(tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(incoming, server_cancel.cancelled_owned())
                .await
        }))
    } else {
        tracing::info!(id = %identity.info.id, "{} running", run.role);
        None
    };
    let result = heartbeat_loop(
        identity,
        settings.data_dir.clone(),
        &run.reporter,
        run.revocations.clone(),
        cancel.clone(),
    )
    .await;
    server_stop.cancel();
    if let Some(server) = server {
        crate::serve::stop_server(server).await?;
    }
    tracing::info!("stopped");
    result.map_err(Into::into)
}

/// `main` of every Lifeboat binary: a multi-threaded runtime, errors printed as one line of
/// context chain, exit status 1 on failure.
pub fn main_with<Fut>(future: Fut) -> std::process::ExitCode
where
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    crate::allocator::tune();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(future) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
