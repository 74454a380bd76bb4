//! What each recovery job does, step by step, talking to the machine's master target:
//! test failover and its cleanup, failover (planned or to a point) and its commit.
use super::hook::{self, HookInput};
use super::jobs::JobRun;
use super::points::{self, MachinePoint};
use crate::node::Node;
use crate::state::model::now_ms;
use crate::state::protection::{
    MachineRecovery, ProtectedMachine, RecoveryRecord, ReplicationState, ViewRecord,
};
use crate::state::{Command, CommandResult};
use lifeboat_common::{tls, Role};
use lifeboat_proto::v1::{self, point_in_time_client::PointInTimeClient};
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Channel;

/// Longest a planned failover waits for the source's final point to be applied.
pub const FINAL_SYNC_TIMEOUT: Duration = Duration::from_secs(30 * 60);

pub type Mt = PointInTimeClient<Channel>;

/// A client of the machine's master target.
pub fn master_target(node: &Node, machine: &ProtectedMachine) -> Result<Mt, String> {
    let record = node
        .state()
        .identity(&machine.mt_id)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("master target {} is not registered", machine.mt_id))?;
    let (_, facts, _) = node.live_view(&record);
    if facts.address.is_empty() {
        return Err(format!(
            "master target {} has not reported its address yet",
            record.name
        ));
    }
    let channel = tls::mtls_channel(&node.identity, &facts.address, Role::MasterTarget)
        .map_err(|e| e.to_string())?;
    Ok(
        PointInTimeClient::new(channel)
            .max_decoding_message_size(lifeboat_proto::MAX_MESSAGE_BYTES),
    )
}

fn call_error(what: &str, status: tonic::Status) -> String {
    format!("{what}: {}", status.message())
}

/// Each disk's recovery points inside the policy's retention window (the journal may still
/// hold older ones until its segment is pruned; they are not offered).
pub async fn disk_points(
    node: &Node,
    mt: &mut Mt,
    machine: &ProtectedMachine,
) -> Result<Vec<v1::DiskPoints>, String> {
    let request = v1::DiskPointsRequest {
        disk_ids: machine.disks.iter().map(|d| d.disk_id.clone()).collect(),
    };
    let mut disks = mt
        .list_points(request)
        .await
        .map_err(|s| call_error("master target cannot list recovery points", s))?
        .into_inner()
        .disks;
    let retention_secs = node
        .state()
        .policy(&machine.policy)
        .map_err(|e| e.to_string())?
        .map_or(0, |p| p.retention_secs);
    if retention_secs > 0 {
        let retention_ms = i64::try_from(retention_secs)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000);
        let window_start = now_ms().saturating_sub(retention_ms);
        for d in &mut disks {
            d.points.retain(|p| p.time_unix_ms >= window_start);
        }
    }
    Ok(disks)
}

fn describe(point: &MachinePoint) -> String {
    let time = std::time::UNIX_EPOCH + Duration::from_millis(point.time_ms.max(0) as u64);
    format!("{} ({})", point.id, humantime::format_rfc3339_seconds(time))
}

async fn put_recovery(node: &Node, machine: &str, recovery: MachineRecovery) -> Result<(), String> {
    match node
        .write(Command::PutRecovery {
            name: machine.to_string(),
            recovery,
        })
        .await
    {
        Ok(CommandResult::Done) => Ok(()),
        Ok(other) => Err(format!("cannot record the recovery: {other:?}")),
        Err(s) => Err(format!("cannot record the recovery: {}", s.message())),
    }
}

/// Checks, before a job is started for it, that `selector` names a point of `machine` (the job
/// chooses again: retention may have moved on meanwhile). A typo is so refused at once, with
/// nothing recorded, rather than as a failed job. Returns the disks' points and the point.
pub async fn check_point(
    node: &Node,
    machine: &ProtectedMachine,
    selector: &str,
) -> Result<(Vec<v1::DiskPoints>, MachinePoint), String> {
    let mut mt = master_target(node, machine)?;
    let disks = disk_points(node, &mut mt, machine).await?;
    let point = points::choose(&machine.name, &disks, selector)?;
    Ok((disks, point))
}

fn current(node: &Node, machine: &str) -> Result<ProtectedMachine, String> {
    node.state()
        .machine(machine)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{machine} is no longer protected"))
}

/// Opens one view per disk at `point`.
async fn open_views(
    mt: &mut Mt,
    machine: &ProtectedMachine,
    point: &MachinePoint,
    prefix: &str,
    failover: bool,
) -> Result<Vec<ViewRecord>, String> {
    let mut views = Vec::new();
    for disk in &machine.disks {
        let seq = *point
            .seqs
            .get(&disk.disk_id)
            .ok_or_else(|| format!("the point has no position for disk {}", disk.name))?;
        let info = mt
            .open_view(v1::OpenViewRequest {
                view_id: format!("{prefix}-{}", disk.disk_id),
                disk_id: disk.disk_id.clone(),
                point_seq: seq,
                latest: false,
                failover,
            })
            .await
            .map_err(|s| call_error(&format!("cannot open a view of disk {}", disk.name), s))?
            .into_inner();
        views.push(ViewRecord {
            disk_id: disk.disk_id.clone(),
            disk_name: disk.name.clone(),
            view_id: info.view_id,
            nbd_uri: info.nbd_uri,
            materialized_path: String::new(),
        });
    }
    Ok(views)
}

fn view_request(view: &ViewRecord) -> v1::ViewRequest {
    v1::ViewRequest {
        view_id: view.view_id.clone(),
        disk_id: view.disk_id.clone(),
    }
}

fn list_views(views: &[ViewRecord]) -> String {
    views
        .iter()
        .map(|v| {
            if v.materialized_path.is_empty() {
                format!("{}: {}", v.disk_name, v.nbd_uri)
            } else {
                format!(
                    "{}: {} (copy: {})",
                    v.disk_name, v.nbd_uri, v.materialized_path
                )
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn run_hook(
    run: &mut JobRun,
    machine: &ProtectedMachine,
    mode: &str,
    record: &RecoveryRecord,
) -> Result<(), String> {
    let step = "Run recovery hook";
    if machine.recovery.hook.is_empty() {
        run.done(step, "no recovery hook configured").await;
        return Ok(());
    }
    run.running(step, "running", 0.0).await;
    let disks: Vec<String> = record.views.iter().map(|v| v.nbd_uri.clone()).collect();
    let point_time = humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + Duration::from_millis(record.point_time_ms.max(0) as u64),
    )
    .to_string();
    let input = HookInput {
        machine: &machine.name,
        mode,
        point: &record.point,
        point_time: &point_time,
        network: &machine.recovery.network_map,
        disks: &disks,
    };
    match hook::run("recovery hook", &machine.recovery.hook, &input).await {
        Ok(output) => {
            run.done(step, output).await;
            Ok(())
        }
        Err(e) => {
            run.running(step, e.clone(), 0.0).await;
            Err(e)
        }
    }
}

pub async fn test_failover(
    node: Arc<Node>,
    run: &mut JobRun,
    name: &str,
    selector: &str,
    materialize: bool,
) -> Result<(), String> {
    let machine = current(&node, name)?;
    let mut mt = master_target(&node, &machine)?;
    run.running("Choose recovery point", selector, 0.0).await;
    let disks = disk_points(&node, &mut mt, &machine).await?;
    let point = points::choose(name, &disks, selector)?;
    run.done("Choose recovery point", describe(&point)).await;
    run.running("Open views", "", 0.0).await;
    let views = open_views(&mut mt, &machine, &point, "test", false).await?;
    let mut record = RecoveryRecord {
        job_id: run.job.id.clone(),
        point: point.id.clone(),
        point_time_ms: point.time_ms,
        views,
        committed: false,
    };
    let mut recovery = current(&node, name)?.recovery;
    recovery.test_failover = Some(record.clone());
    put_recovery(&node, name, recovery.clone()).await?;
    run.done("Open views", list_views(&record.views)).await;
    if materialize {
        let total = record.views.len() as f64;
        // The views stay open whatever becomes of the copies: say what to do next.
        let failed = |disk: &str, s: tonic::Status| {
            format!(
                "{}. The test failover's views stay open (see `lifeboat status`): run \
                 `lifeboat test-failover cleanup {name}`, then the test failover again with \
                 --materialize",
                call_error(&format!("materializing disk {disk} failed"), s)
            )
        };
        for (i, view) in record.views.iter_mut().enumerate() {
            let mut stream = mt
                .materialize(view_request(view))
                .await
                .map_err(|s| failed(&view.disk_name, s))?
                .into_inner();
            while let Some(p) = stream
                .message()
                .await
                .map_err(|s| failed(&view.disk_name, s))?
            {
                if !p.path.is_empty() {
                    view.materialized_path = p.path;
                } else if p.total_bytes > 0 {
                    let pct = (i as f64 + p.done_bytes as f64 / p.total_bytes as f64) / total;
                    let detail = format!(
                        "{}: {} of {} bytes",
                        view.disk_name, p.done_bytes, p.total_bytes
                    );
                    run.running("Materialize", detail, pct * 100.0).await;
                }
            }
        }
        recovery.test_failover = Some(record.clone());
        put_recovery(&node, name, recovery).await?;
        run.done("Materialize", list_views(&record.views)).await;
    }
    run_hook(run, &machine, "test", &record).await
}

pub async fn cleanup_test_failover(
    node: Arc<Node>,
    run: &mut JobRun,
    name: &str,
) -> Result<(), String> {
    let machine = current(&node, name)?;
    let record = machine
        .recovery
        .test_failover
        .clone()
        .ok_or_else(|| format!("{name} has no test failover to clean up"))?;
    let mut mt = master_target(&node, &machine)?;
    run.running("Delete views", "", 0.0).await;
    for view in &record.views {
        mt.close_view(view_request(view)).await.map_err(|s| {
            call_error(
                &format!("cannot delete the view of disk {}", view.disk_name),
                s,
            )
        })?;
    }
    let mut recovery = current(&node, name)?.recovery;
    recovery.test_failover = None;
    put_recovery(&node, name, recovery).await?;
    run.done(
        "Delete views",
        format!("{} view(s) and their writes deleted", record.views.len()),
    )
    .await;
    Ok(())
}

/// Planned failover's first steps: stop writes at the source, then wait until the final
/// point it places is applied on every disk. Returns that point.
async fn final_sync(
    node: &Node,
    run: &mut JobRun,
    mt: &mut Mt,
    machine: &ProtectedMachine,
) -> Result<MachinePoint, String> {
    let mut recovery = machine.recovery.clone();
    // Writes already stopped (an earlier planned failover that failed or was cut short): the
    // final point the agent placed then still ends the source's writes, so it counts too.
    if !recovery.stop_writes {
        recovery.stop_writes_since_ms = run.job.created_at_ms;
    }
    let asked = recovery.stop_writes_since_ms;
    recovery.stop_writes = true;
    put_recovery(node, &machine.name, recovery).await?;
    run.done(
        "Stop writes at the source",
        "the agent refuses writes as soon as it hears of it (within a heartbeat)",
    )
    .await;
    let started = std::time::Instant::now();
    loop {
        // A master target that cannot be asked (restarting, a network blip) is asked again
        // until the timeout: the final point may well be on its way.
        let disks = match disk_points(node, mt, machine).await {
            Ok(disks) => disks,
            Err(e) if started.elapsed() <= FINAL_SYNC_TIMEOUT => {
                run.running(
                    "Final sync",
                    format!("{e}; asking again (for up to {FINAL_SYNC_TIMEOUT:?})"),
                    0.0,
                )
                .await;
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        if let Some(p) = points::machine_points(&disks)
            .into_iter()
            .rev()
            .find(|p| p.kind == "planned" && p.time_ms >= asked)
        {
            run.done(
                "Final sync",
                format!("everything up to {} is applied", describe(&p)),
            )
            .await;
            return Ok(p);
        }
        if started.elapsed() > FINAL_SYNC_TIMEOUT {
            return Err(format!(
                "the source's final point did not arrive within {FINAL_SYNC_TIMEOUT:?}: is the \
                 agent of {} running? Fail over to a point instead (without --planned)",
                machine.name
            ));
        }
        let pending: u64 = machine
            .disks
            .iter()
            .filter_map(|d| node.progress.get(&d.disk_id, Role::Agent))
            .map(|r| r.report.pending_bytes)
            .sum();
        let detail = format!(
            "waiting {}s for the source's final point ({pending} bytes still to apply)",
            started.elapsed().as_secs()
        );
        run.running("Final sync", detail, 0.0).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

pub async fn failover(
    node: Arc<Node>,
    run: &mut JobRun,
    name: &str,
    selector: &str,
    planned: bool,
    discard_writes: bool,
) -> Result<(), String> {
    let machine = current(&node, name)?;
    let mut mt = master_target(&node, &machine)?;
    let point = if planned {
        run.running("Stop writes at the source", "", 0.0).await;
        let p = match final_sync(&node, run, &mut mt, &machine).await {
            Ok(p) => p,
            Err(e) => return Err(resume_writes(&node, name, e).await),
        };
        run.done("Choose recovery point", describe(&p)).await;
        p
    } else {
        run.running("Choose recovery point", selector, 0.0).await;
        let disks = disk_points(&node, &mut mt, &machine).await?;
        let p = points::choose(name, &disks, selector)?;
        points::check_refailover(name, &disks, &p, discard_writes)?;
        run.done("Choose recovery point", describe(&p)).await;
        p
    };
    run.running("Fail over disks", "", 0.0).await;
    let views = match open_views(&mut mt, &machine, &point, "failover", true).await {
        Ok(views) => views,
        Err(e) if planned => return Err(resume_writes(&node, name, e).await),
        Err(e) => return Err(e),
    };
    let record = RecoveryRecord {
        job_id: run.job.id.clone(),
        point: point.id.clone(),
        point_time_ms: point.time_ms,
        views,
        committed: false,
    };
    let mut recovery = current(&node, name)?.recovery;
    // The source must not go on writing into a disk that is no longer replicated.
    recovery.stop_writes = true;
    recovery.failover = Some(record.clone());
    put_recovery(&node, name, recovery).await?;
    for disk in &machine.disks {
        let result = node
            .write(Command::SetDiskState {
                machine: name.to_string(),
                disk_id: disk.disk_id.clone(),
                state: ReplicationState::FailedOver,
                reason: format!("failed over to {}", point.id),
                at_ms: now_ms(),
            })
            .await
            .map_err(|s| s.message().to_string())?;
        if let CommandResult::Refused(why) | CommandResult::NotFound(why) = result {
            return Err(why);
        }
    }
    run.done("Fail over disks", list_views(&record.views)).await;
    run_hook(run, &machine, "failover", &record).await
}

/// A planned failover that did not happen gives the source its writes back: the primary
/// still runs, and a machine that can neither write nor fail over is an outage. Returns the
/// job's error, saying what became of the writes.
async fn resume_writes(node: &Node, name: &str, error: String) -> String {
    let Ok(machine) = current(node, name) else {
        return error;
    };
    if machine.recovery.failover.is_some() {
        return error;
    }
    let mut recovery = machine.recovery;
    recovery.stop_writes = false;
    recovery.stop_writes_since_ms = 0;
    match put_recovery(node, name, recovery).await {
        Ok(()) => format!(
            "{error}. The failover did not happen: the source takes writes again (from the \
             agent's next heartbeat); run it again once the cause is fixed"
        ),
        Err(e) => format!(
            "{error}. The source still refuses writes ({e}): run the planned failover again, \
             or fail over to a point"
        ),
    }
}

pub async fn commit(node: Arc<Node>, run: &mut JobRun, name: &str) -> Result<(), String> {
    let machine = current(&node, name)?;
    let mut record = machine
        .recovery
        .failover
        .clone()
        .ok_or_else(|| format!("{name} has not failed over"))?;
    let mut mt = master_target(&node, &machine)?;
    run.running("Commit disks", "", 0.0).await;
    for view in &record.views {
        mt.commit_failover(view_request(view))
            .await
            .map_err(|s| call_error(&format!("cannot commit disk {}", view.disk_name), s))?;
    }
    record.committed = true;
    let mut recovery = current(&node, name)?.recovery;
    recovery.failover = Some(record.clone());
    // A commit drops every view of the disks, test views included: said in the step, since
    // a drill's writes go with them.
    let drill = recovery.test_failover.take().map_or(String::new(), |t| {
        format!(
            "; the test failover that was open (point {}) is closed and its writes discarded",
            t.point
        )
    });
    put_recovery(&node, name, recovery).await?;
    run.done(
        "Commit disks",
        format!(
            "the replicas now hold {}; older points are discarded{drill}\n{}",
            record.point,
            list_views(&record.views)
        ),
    )
    .await;
    Ok(())
}
