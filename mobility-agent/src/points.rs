//! Recovery points of a machine's `nbd` disks (DESIGN §7). In `nbd` mode every prefix of the
//! stream is crash-consistent, so a point is just a tag placed in the capture queues:
//! - `crash:<ms>` at the policy's crash-consistent interval;
//! - `app:<ms>` at the app-consistent interval, with the freeze hook run as
//!   `HOOK freeze NAME PATH` for every disk before and `HOOK thaw NAME PATH` after (no point
//!   when a freeze fails: an app-consistent point that is not is worse than none);
//! - `planned:<ms>` once the configuration server asks for a planned failover: writes are
//!   refused from then on, and the tag marks the end of everything the machine wrote.
//!
//! - `group:<id>:<group>` through the configuration server's barrier across every agent of a
//!   protection group (see the config server's `groups`): told `prepare`, the agent answers
//!   `prepared`; told `hold`, it holds new writes on all its disks and answers `held`; told
//!   `tag`, it tags, releases and answers `tagged`. Writes are never held longer than
//!   `HOLD_MAX`, whatever the configuration server does.
//!
//! One tag goes on all of the machine's disks at one instant (`capture::tag_all`), and only
//! while every disk streams: during an initial sync or a resync the replica is not a state
//! the disk was ever in, so a point then would be a lie. (Scan-mode disks tag their own
//! scans.)
use crate::agent::Agent;
use crate::capture::{self, now_ms};
use crate::disk::DiskAgent;
use crate::progress::Phase;
use crate::settings::CaptureMode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::Command;

/// How often due points and barrier signals are checked.
const TICK: Duration = Duration::from_millis(50);
/// Longest writes are held for a group barrier.
const HOLD_MAX: Duration = Duration::from_secs(5);
/// Longest a freeze or thaw hook may run.
const HOOK_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Schedule {
    last_crash: Option<Instant>,
    last_app: Option<Instant>,
    /// The planned-failover tag was placed (writes stay stopped until the request goes).
    planned_tagged: bool,
    writes_stopped: bool,
    /// The group barrier held here: its id and when the hold ends at the latest.
    holding: Option<(String, Instant)>,
    /// The last barrier this agent finished (tagged or gave up), so it is not held twice.
    finished: String,
}

/// Places the machine's points until the agent stops.
pub async fn run(agent: Arc<Agent>) {
    let mut schedule = Schedule::default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = agent.cancel.cancelled() => return,
        }
        let disks: Vec<Arc<DiskAgent>> = agent
            .disks()
            .into_iter()
            .filter(|d| d.mode == CaptureMode::Nbd)
            .collect();
        if disks.is_empty() {
            continue;
        }
        if let Err(e) = barrier(&agent, &disks, &mut schedule) {
            tracing::warn!("group barrier: {e:#}");
        }
        if let Err(e) = tick(&disks, &mut schedule).await {
            tracing::warn!("recovery point not placed: {e:#}");
        }
    }
}

/// Follows the group barrier the configuration server signals (`phase:id:group`).
fn barrier(agent: &Agent, disks: &[Arc<DiskAgent>], s: &mut Schedule) -> anyhow::Result<()> {
    let signal = disks
        .iter()
        .map(|d| d.assignment().barrier)
        .find(|b| !b.is_empty())
        .unwrap_or_default();
    let mut parts = signal.splitn(3, ':');
    let (phase, id, group) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let captures: Vec<_> = disks.iter().map(|d| d.capture.clone()).collect();
    let release = |s: &mut Schedule| -> anyhow::Result<()> {
        for c in &captures {
            c.hold_writes(None)?;
        }
        if let Some((id, _)) = s.holding.take() {
            s.finished = id;
        }
        Ok(())
    };
    // A hold that outlived HOLD_MAX ends here, whatever the signal says.
    if let Some((held, until)) = s.holding.clone() {
        if Instant::now() >= until || held != id {
            release(s)?;
            metrics::counter!("lifeboat_agent_barrier_aborts_total").increment(1);
            tracing::warn!(barrier = %held, "group barrier: writes released without a point");
            answer(agent, format!("aborted:{held}"));
            return Ok(());
        }
    }
    match phase {
        "prepare" if streaming(disks) && !s.writes_stopped => {
            answer(agent, format!("prepared:{id}"))
        }
        "hold" if s.holding.is_none() && s.finished != id => {
            let until = Instant::now() + HOLD_MAX;
            for c in &captures {
                c.hold_writes(Some(until))?;
            }
            s.holding = Some((id.to_string(), until));
            answer(agent, format!("held:{id}"));
        }
        "tag" if s.holding.as_ref().is_some_and(|(h, _)| h == id) => {
            let tagged = capture::tag_all(&captures, &format!("group:{id}:{group}"));
            release(s)?;
            tagged?;
            metrics::counter!("lifeboat_agent_points_total", "kind" => "group").increment(1);
            answer(agent, format!("tagged:{id}"));
        }
        "abort" => {
            if s.holding.is_some() {
                release(s)?;
            }
            answer(agent, format!("aborted:{id}"));
        }
        "" => {
            if s.holding.is_some() {
                release(s)?;
            }
            answer(agent, String::new());
        }
        _ => {}
    }
    Ok(())
}

fn answer(agent: &Agent, text: String) {
    if let Ok(mut a) = agent.barrier_answer.lock() {
        *a = text;
    }
}

fn streaming(disks: &[Arc<DiskAgent>]) -> bool {
    disks.iter().all(|d| {
        !d.capture.overflowed()
            && d.progress
                .lock()
                .map(|p| p.phase == Phase::Streaming)
                .unwrap_or(false)
    })
}

async fn tick(disks: &[Arc<DiskAgent>], s: &mut Schedule) -> anyhow::Result<()> {
    if s.holding.is_some() {
        // A group barrier holds writes: no freeze hook now (its flush would wait on the hold).
        return Ok(());
    }
    let captures: Vec<_> = disks.iter().map(|d| d.capture.clone()).collect();
    let assignments: Vec<_> = disks.iter().map(|d| d.assignment()).collect();
    let stop = assignments.iter().any(|a| a.stop_writes);
    if stop != s.writes_stopped {
        for c in &captures {
            c.stop_writes(stop)?;
        }
        s.writes_stopped = stop;
        s.planned_tagged = false;
        tracing::info!(
            stopped = stop,
            "{}",
            if stop {
                "failover: writes refused from now on"
            } else {
                "writes accepted again"
            }
        );
    }
    if stop {
        if !s.planned_tagged && streaming(disks) {
            capture::tag_all(&captures, &format!("planned:{}", now_ms()))?;
            s.planned_tagged = true;
            tracing::info!("failover: final point placed after the last write (a planned failover waits for it)");
        }
        return Ok(());
    }
    if !streaming(disks) {
        return Ok(());
    }
    let every = |secs: u64| (secs > 0).then(|| Duration::from_secs(secs));
    let due = |last: Option<Instant>, every: Duration| last.is_none_or(|t| t.elapsed() >= every);
    let app_every = assignments
        .iter()
        .filter_map(|a| every(a.app_consistent_every_secs))
        .min();
    if let Some(app_every) = app_every {
        if due(s.last_app, app_every) {
            s.last_app = Some(Instant::now());
            let hook = disks[0].tuning.freeze_hook.clone();
            if app_point(disks, &captures, hook.as_deref()).await? {
                s.last_crash = Some(Instant::now()); // an app point is a crash point too
                return Ok(());
            }
        }
    }
    let crash_every = assignments
        .iter()
        .filter_map(|a| every(a.crash_consistent_every_secs))
        .min();
    if let Some(crash_every) = crash_every {
        if due(s.last_crash, crash_every) {
            s.last_crash = Some(Instant::now());
            capture::tag_all(&captures, &format!("crash:{}", now_ms()))?;
            metrics::counter!("lifeboat_agent_points_total", "kind" => "crash").increment(1);
        }
    }
    Ok(())
}

/// `reason` of `lifeboat_agent_app_point_failures_total`: the agent has no freeze hook.
pub const NO_HOOK: &str = "no_freeze_hook";
/// `reason` of `lifeboat_agent_app_point_failures_total`: the hook failed or timed out.
pub const FREEZE_FAILED: &str = "freeze_failed";

/// Freeze, tag, thaw. Returns whether the app-consistent point was placed.
async fn app_point(
    disks: &[Arc<DiskAgent>],
    captures: &[Arc<capture::Capture>],
    hook: Option<&std::path::Path>,
) -> anyhow::Result<bool> {
    let Some(hook) = hook else {
        // Without a hook the application is not asked to make its data consistent: the
        // point is crash-consistent and is tagged so. The operator hears of it now, not when
        // a recovery asks for an app point and there is none.
        metrics::counter!("lifeboat_agent_app_point_failures_total", "reason" => NO_HOOK)
            .increment(1);
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                "the policy asks for app-consistent points, but this agent has no freeze hook: \
                 none are made (only crash-consistent ones); give the agent --freeze-hook \
                 HOOK, or set the policy's --app-consistent-every to 0"
            )
        });
        return Ok(false);
    };
    let mut frozen = Vec::new();
    let mut ok = true;
    for d in disks {
        if run_hook(hook, "freeze", d).await {
            frozen.push(d.clone());
        } else {
            ok = false;
            break;
        }
    }
    if ok {
        capture::tag_all(captures, &format!("app:{}", now_ms()))?;
        metrics::counter!("lifeboat_agent_points_total", "kind" => "app").increment(1);
    } else {
        metrics::counter!("lifeboat_agent_app_point_failures_total", "reason" => FREEZE_FAILED)
            .increment(1);
    }
    for d in frozen.iter().rev() {
        run_hook(hook, "thaw", d).await;
    }
    Ok(ok)
}

/// Runs `HOOK ACTION NAME PATH`; true if it succeeded in time.
pub async fn run_hook(hook: &std::path::Path, action: &str, disk: &DiskAgent) -> bool {
    let a = disk.assignment();
    let run = Command::new(hook)
        .arg(action)
        .arg(&a.disk_name)
        .arg(&a.source_path)
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(HOOK_TIMEOUT, run).await {
        Ok(Ok(out)) if out.status.success() => true,
        Ok(Ok(out)) => {
            tracing::warn!(disk = %disk.disk_id, hook = %hook.display(), action,
                "hook failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
            false
        }
        Ok(Err(e)) => {
            tracing::warn!(disk = %disk.disk_id, hook = %hook.display(), action, "cannot run hook: {e}");
            false
        }
        Err(_) => {
            tracing::warn!(disk = %disk.disk_id, hook = %hook.display(), action,
                "hook did not finish within {HOOK_TIMEOUT:?}");
            false
        }
    }
}
