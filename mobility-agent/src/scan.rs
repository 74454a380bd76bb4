//! `scan` capture mode, for disks the workload writes directly (no NBD interposition): at the
//! policy's crash-consistent frequency the agent reads the whole disk, hashes its blocks, and
//! ships the blocks whose hashes differ from the last shipped state. The first scan after the
//! agent starts (or after the stream broke) compares with the replica's own hashes instead, so
//! it doubles as the initial sync and as the resync, and needs no local state to survive.
//!
//! A scan of a disk in use sees it at no single instant: its recovery point is tagged fuzzy
//! ("crash:<unix ms>:fuzzy"). With a freeze hook the disk is made still for the read — the hook
//! runs as `HOOK freeze NAME PATH` before and `HOOK thaw NAME PATH` after — and the point is
//! a plain crash-consistent one ("crash:<unix ms>"). A failing freeze is logged and the scan
//! goes on, fuzzy: replication must not stop because a hook did.
//!
//! Memory: the last shipped hashes are kept in memory, 16 bytes per 64 KiB block (256 MiB per
//! TiB of disk).
use crate::capture::now_ms;
use crate::disk::DiskAgent;
use crate::points::run_hook;
use crate::progress::Phase;
use crate::resync;
use lifeboat_common::blockhash::{BlockHash, BLOCK};
use lifeboat_proto::v1::ingest_client::IngestClient;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Bytes read and compared at a time.
const CHUNK: u64 = 8 * 1024 * 1024;
/// While more than this is queued for shipping, the scan waits.
const BUSY_QUEUE: u64 = 32 * 1024 * 1024;
/// Longest a scan keeps the disk frozen.
const MAX_FREEZE: Duration = Duration::from_secs(120);
/// Scan interval when the policy gives none.
const DEFAULT_EVERY: Duration = Duration::from_secs(300);

/// Runs scans until the disk is unprotected or the agent stops.
pub async fn run(agent: Arc<DiskAgent>) {
    // The last shipped hashes; `None`: compare with the replica.
    let mut known: Option<Vec<BlockHash>> = None;
    let mut backoff = Duration::from_secs(1);
    loop {
        let started = Instant::now();
        match scan_once(&agent, known.take()).await {
            Ok(Some(hashes)) => {
                known = Some(hashes);
                backoff = Duration::from_secs(1);
            }
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(disk = %agent.disk_id, "scan: {e:#}; retrying against the replica");
                backoff = (backoff * 2).min(Duration::from_secs(30));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => continue,
                    _ = agent.stop.cancelled() => return,
                }
            }
        }
        let every = match agent.assignment().crash_consistent_every_secs {
            0 => DEFAULT_EVERY,
            s => Duration::from_secs(s),
        };
        tokio::select! {
            _ = tokio::time::sleep(every.saturating_sub(started.elapsed())) => {}
            _ = agent.stop.cancelled() => return,
        }
    }
}

/// One scan; returns the hashes now shipped, or `None` if the agent stopped.
async fn scan_once(
    agent: &Arc<DiskAgent>,
    known: Option<Vec<BlockHash>>,
) -> anyhow::Result<Option<Vec<BlockHash>>> {
    let size = agent.capture.size;
    let mut client = crate::ship::ingest_client(agent)?;
    // A stream that broke since the last scan leaves the shipped state unknown.
    let known = if agent.capture.overflowed() {
        None
    } else {
        known
    };
    let first = known.is_none();
    if first {
        // Batches from before (a previous run, a broken stream) must be applied before the
        // replica's hashes describe it.
        if !resync::settle(agent, &mut client).await? {
            return Ok(None);
        }
        agent.capture.resume_stream()?;
        let broken = agent
            .progress
            .lock()
            .is_ok_and(|p| matches!(p.phase, Phase::ResyncRequired(_)));
        if broken {
            agent.set_phase(Phase::Resyncing);
        }
    }
    let mut frozen = match &agent.tuning.freeze_hook {
        Some(h) => run_hook(h, "freeze", agent).await,
        None => false,
    };
    let at = now_ms();
    if let Ok(mut p) = agent.progress.lock() {
        p.sync_total = size;
        p.sync_done = 0;
        p.sync_started = Some(Instant::now());
    }
    let result = read_all(agent, &mut client, known, &mut frozen).await;
    if let (Some(h), true) = (&agent.tuning.freeze_hook, frozen) {
        run_hook(h, "thaw", agent).await;
    }
    let Some((hashes, shipped)) = result? else {
        return Ok(None);
    };
    let tag = if frozen {
        format!("crash:{at}")
    } else {
        format!("crash:{at}:fuzzy")
    };
    crate::capture::tag_all(std::slice::from_ref(&agent.capture), &tag)?;
    let tag_index = agent.capture.last_index()?;
    metrics::counter!("lifeboat_agent_scans_total").increment(1);
    tracing::info!(disk = %agent.disk_id, shipped, frozen, %tag, against_replica = first, "scan finished");
    if first {
        // Like an initial sync: complete (and the disk Protected) once all of it is applied.
        crate::ship::mark_pass_end(agent)?;
    }
    // The point counts (for the RPO) once the master target has applied it.
    loop {
        if agent.capture.overflowed() {
            agent.set_phase(Phase::ResyncRequired(
                "the scan's changes could not be shipped in time; the next scan compares with the replica".into(),
            ));
            break;
        }
        if crate::disk::applied_through(agent, tag_index)? {
            agent.scan_point_ms.store(at, Ordering::Relaxed);
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = agent.stop.cancelled() => return Ok(None),
        }
    }
    Ok(Some(hashes))
}

/// Reads and compares the whole disk; returns its hashes and the bytes queued. A disk frozen
/// for longer than `MAX_FREEZE` (a slow replica, a held stream) is thawed and `frozen` cleared:
/// the workload must not stall on the scan.
async fn read_all(
    agent: &Arc<DiskAgent>,
    client: &mut IngestClient<Channel>,
    known: Option<Vec<BlockHash>>,
    frozen: &mut bool,
) -> anyhow::Result<Option<(Vec<BlockHash>, u64)>> {
    let size = agent.capture.size;
    let freeze_started = Instant::now();
    let mut hashes = Vec::with_capacity(size.div_ceil(BLOCK) as usize);
    let (mut offset, mut shipped) = (0u64, 0u64);
    while offset < size {
        if *frozen && freeze_started.elapsed() > MAX_FREEZE {
            if let Some(h) = &agent.tuning.freeze_hook {
                tracing::warn!(disk = %agent.disk_id, "the scan held the disk frozen for {MAX_FREEZE:?}: thawing; this point is fuzzy");
                run_hook(h, "thaw", agent).await;
            }
            *frozen = false;
        }
        while agent.capture.queued_bytes() > BUSY_QUEUE {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = agent.stop.cancelled() => return Ok(None),
            }
        }
        let len = CHUNK.min(size - offset);
        let first_block = (offset / BLOCK) as usize;
        let blocks = len.div_ceil(BLOCK) as usize;
        let compare: Vec<BlockHash> = match &known {
            Some(k) => k
                .get(first_block..first_block + blocks)
                .map(|s| s.to_vec())
                .unwrap_or_default(),
            None => resync::replica_hashes(agent, client, offset, len).await?,
        };
        let c = agent.capture.clone();
        let (sent, chunk_hashes) =
            tokio::task::spawn_blocking(move || c.compare_read(offset, len, &compare)).await??;
        metrics::counter!("lifeboat_agent_resync_compared_bytes_total").increment(len);
        metrics::counter!("lifeboat_agent_resync_shipped_bytes_total").increment(sent);
        if known.is_some() {
            // Changed since the previous scan (the first one is the initial sync).
            agent.capture.count_changed(sent);
        }
        hashes.extend(chunk_hashes);
        shipped += sent;
        offset += len;
        if let Ok(mut p) = agent.progress.lock() {
            p.sync_done = offset;
        }
    }
    Ok(Some((hashes, shipped)))
}
