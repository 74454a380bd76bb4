//! The initial sync of an `nbd`-mode disk: one pass over the source in 1 MiB chunks, read in
//! the capture critical section so it is ordered with concurrent writes, skipping holes and
//! (on a first sync) all-zero chunks. It stops as soon as the disk leaves the InitialSync
//! phase (the stream broke or batches were lost: a whole-disk resync takes over).
use crate::disk::{DiskAgent, SYNC_CHUNK, SYNC_QUEUE_LIMIT};
use crate::progress::Phase;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Copies the disk's data once, in order with concurrent writes (see `Capture::sync_read`).
pub async fn run(agent: Arc<DiskAgent>, zeros_matter: bool) {
    let size = agent.capture.size;
    if let Ok(mut p) = agent.progress.lock() {
        p.sync_total = size;
        p.sync_done = 0;
        p.sync_started = Some(Instant::now());
    }
    tracing::info!(disk = %agent.disk_id, size, "initial sync started");
    let mut offset = 0u64;
    let still_syncing = |agent: &DiskAgent| {
        agent
            .progress
            .lock()
            .is_ok_and(|p| p.phase == Phase::InitialSync)
    };
    while offset < size {
        // Stopped, or turned into a resync (stream broken, batches lost): this copy is over.
        if agent.stop.is_cancelled() || !still_syncing(&agent) {
            return;
        }
        while agent.capture.queued_bytes() > SYNC_QUEUE_LIMIT {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = agent.stop.cancelled() => return,
            }
        }
        if !zeros_matter {
            match next_data(&agent.capture.source, offset) {
                Some(data) if data >= size => offset = size,
                Some(data) => offset = data - data % 4096,
                None => offset = size,
            }
            if offset >= size {
                break;
            }
        }
        let len = SYNC_CHUNK.min(size - offset);
        let c = agent.capture.clone();
        let read =
            tokio::task::spawn_blocking(move || c.sync_read(offset, len, zeros_matter)).await;
        match read {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::error!(disk = %agent.disk_id, "initial sync read at {offset}: {e}");
                agent.interrupt_initial_sync(&format!("initial sync cannot read the disk: {e}"));
                return;
            }
            Err(e) => {
                tracing::error!(disk = %agent.disk_id, "initial sync task: {e}");
                return;
            }
        }
        offset += len;
        if let Ok(mut p) = agent.progress.lock() {
            p.sync_done = offset;
        }
    }
    let last_index = agent.capture.last_index().unwrap_or(0);
    if let Ok(mut p) = agent.progress.lock() {
        if p.phase != Phase::InitialSync {
            return;
        }
        p.sync_done = size;
        p.sync_last_index = Some(last_index);
    }
    agent.capture.queued.notify_one();
    tracing::info!(disk = %agent.disk_id, "initial sync scan finished");
}

/// The next offset at or after `offset` holding data (SEEK_DATA), `None` if only a hole
/// follows; `Some(offset)` where holes cannot be detected (block devices).
fn next_data(file: &std::fs::File, offset: u64) -> Option<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek only reads its integer arguments; the descriptor is open for the call.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, libc::SEEK_DATA) };
    if r >= 0 {
        return Some(r as u64);
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::ENXIO) => None,
        _ => Some(offset),
    }
}
