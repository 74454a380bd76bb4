//! `lifeboat wait`: blocks until a machine's disks reach a replication state, for scripts
//! (and benchmarks) that must not poll `lifeboat status` themselves — one connection, one
//! process, long polls: each status request is held by the configuration server until
//! something changes (see `status_wait` there), so the wait hears of the change it waits for
//! when it is applied, at a few requests per heartbeat. Against a server without long polls
//! it asks every 25 ms (at 100 ms the wait itself added 50 ms on average to what a script
//! waiting for an initial sync measured; at 25 ms, polling took 2.5% of a two-core machine's
//! CPU during a benchmark's sync).
use crate::context::{status_error, ContextArgs};
use crate::format::bytes;
use lifeboat_proto::v1::{DiskStatus, StatusRequest};
use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct WaitArgs {
    /// The machine (the name its agent registered with).
    machine: String,
    /// Also wait until nothing is pending: every write made before the wait began is applied
    /// on the master target (RPO 0). For a scan-mode disk, whose RPO is never 0: until a scan
    /// begun after the wait began is applied (it waits for the next scan).
    #[arg(long)]
    caught_up: bool,
    /// Give up after this many seconds (exit status 1).
    #[arg(long, default_value_t = 3600)]
    timeout_secs: u64,
}

/// The shortest time between two requests (and the polling period of an older server).
const POLL: Duration = Duration::from_millis(25);
/// How long one request may be held: the wait re-checks at least this often.
const HOLD: Duration = Duration::from_secs(1);

/// Which reports of a disk may speak for writes made before the wait began. A report that
/// arrives after the wait began may still have been put together before it (it was in
/// flight); the one after it cannot, since an agent sends its next heartbeat only once the
/// previous one is answered. Times are the configuration server's, so clock skew between
/// hosts does not matter.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Freshness {
    /// The last report seen when the wait began was received at this time.
    Before(i64),
    /// A first report arrived after the wait began, at this time.
    First(i64),
    /// A report put together after the wait began has arrived.
    Fresh,
}

impl Freshness {
    pub(crate) fn advance(self, last_report_ms: i64) -> Freshness {
        match self {
            Freshness::Before(t) if last_report_ms > t => Freshness::First(last_report_ms),
            Freshness::First(t) if last_report_ms > t => Freshness::Fresh,
            other => other,
        }
    }
}

/// Why a disk is not there yet (`None`: it is), with what holds replication up if something
/// does: a disk whose replication waits (its agent cannot capture it, its process server
/// cannot forward) is not there even in the state waited for. `waited`: seconds since the
/// wait began.
fn not_yet(d: &DiskStatus, caught_up: bool, freshness: Freshness, waited: f64) -> Option<String> {
    let why = match position(d, caught_up, freshness, waited) {
        Some(why) => why,
        None if d.stall.is_empty() => return None,
        None => format!("disk {} is {}", d.name, d.state),
    };
    Some(if d.stall.is_empty() {
        why
    } else {
        format!("{why}; replication waits: {}", d.stall)
    })
}

fn position(d: &DiskStatus, caught_up: bool, freshness: Freshness, waited: f64) -> Option<String> {
    if d.state != "Protected" {
        let why = if d.state_reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", d.state_reason)
        };
        return Some(format!(
            "disk {} is {}{why}, sync {:.0}%",
            d.name, d.state, d.sync_progress_pct
        ));
    }
    if !caught_up {
        return None;
    }
    if !matches!(freshness, Freshness::Fresh) {
        return Some(format!(
            "disk {} has not reported since the wait began",
            d.name
        ));
    }
    if d.capture == "scan" {
        // A scan disk's RPO is the age of the newest applied scan: younger than the wait, that
        // scan read the disk after the wait began, so it holds every write made before.
        if d.pending_bytes > 0 || d.rpo_secs >= waited {
            return Some(format!(
                "disk {} (scan mode) waits for a scan begun after the wait to be applied \
                 (newest applied scan: {:.1}s old; {} pending)",
                d.name,
                d.rpo_secs,
                bytes(d.pending_bytes)
            ));
        }
        return None;
    }
    if d.pending_bytes > 0 || d.rpo_secs > 0.0 {
        return Some(format!(
            "disk {} has {} pending (RPO {:.1}s)",
            d.name,
            bytes(d.pending_bytes),
            d.rpo_secs
        ));
    }
    None
}

pub async fn run(ctx: &ContextArgs, args: WaitArgs) -> anyhow::Result<()> {
    let mut client = ctx.protection().await?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let mut freshness: Option<HashMap<String, Freshness>> = None;
    let mut waiting: Vec<String> = vec!["no answer from the configuration server yet".into()];
    let mut version = 0;
    while Instant::now() < deadline || freshness.is_none() {
        let asked = Instant::now();
        let hold = if version == 0 {
            Duration::ZERO
        } else {
            HOLD.min(deadline.saturating_duration_since(asked))
        };
        let reply = match client
            .status(StatusRequest {
                machine: args.machine.clone(),
                wait_ms: hold.as_millis() as u32,
                after_version: version,
            })
            .await
        {
            Ok(reply) => reply.into_inner(),
            // A leader change or a restart in between: ask again until the deadline.
            Err(status) if status.code() == tonic::Code::Unavailable => {
                waiting = vec![format!("configuration server: {}", status.message())];
                // Another server may answer next, whose versions are its own.
                version = 0;
                if Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(POLL).await;
                continue;
            }
            Err(status) => return Err(status_error(status)),
        };
        let machine = reply
            .machines
            .iter()
            .find(|m| m.name == args.machine)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "machine {} is not protected; protect it with `lifeboat protect {} --policy POLICY`",
                    args.machine,
                    args.machine
                )
            })?;
        let seen = freshness.get_or_insert_with(|| {
            machine
                .disks
                .iter()
                .map(|d| (d.disk_id.clone(), Freshness::Before(d.last_report_unix_ms)))
                .collect()
        });
        waiting = machine
            .disks
            .iter()
            .filter_map(|d| {
                let f = seen
                    .get(&d.disk_id)
                    .copied()
                    .unwrap_or(Freshness::Before(i64::MIN))
                    .advance(d.last_report_unix_ms);
                seen.insert(d.disk_id.clone(), f);
                not_yet(d, args.caught_up, f, started.elapsed().as_secs_f64())
            })
            .collect();
        if machine.disks.is_empty() {
            waiting = vec!["the machine has no disks yet".into()];
        }
        // Nothing moves without the machine's agent: a machine whose agent is away is not
        // replicating, whatever state its disks were left in. Said first: it is what to fix.
        if !machine.agent_connected {
            waiting.insert(
                0,
                format!(
                    "the agent of {} is not connected (start it; `lifeboat servers list`)",
                    args.machine
                ),
            );
        }
        if waiting.is_empty() {
            let what = if args.caught_up {
                "Protected, nothing pending"
            } else {
                "Protected"
            };
            println!(
                "{}: every disk {what} (waited {:.1}s)",
                args.machine,
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if Instant::now() >= deadline {
            break;
        }
        // Not faster than polling, whatever the server does (0: it does not hold requests).
        version = reply.version;
        tokio::time::sleep(POLL.saturating_sub(asked.elapsed())).await;
    }
    anyhow::bail!(
        "gave up after {}s: {}; see `lifeboat status {}` and `lifeboat alerts`",
        args.timeout_secs,
        waiting.join("; "),
        args.machine
    )
}
