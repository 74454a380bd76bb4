//! The disks this process server handles: for each, its assignment from the configuration
//! server, its cache, and what the master target has applied. Assignments arrive with every
//! heartbeat; a new disk gets its cache opened and a forwarder started, a disk no longer
//! assigned is dropped with its cache (it was unprotected, or its machine moved to another
//! process server: after this one drained it, or with `--force` while this one was down).
use crate::cache::{CacheKey, DiskCache};
use crate::forward;
use crate::quota::Quota;
use crate::recent::{Budget, Recent};
use lifeboat_common::assigned::Assigned;
use lifeboat_common::component::RevocationList;
use lifeboat_common::Identity;
use lifeboat_proto::v1::replica_client::ReplicaClient;
use lifeboat_proto::v1::DiskAssignment;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// What the master target has durably applied: (seq, capture time of its newest write).
pub type Applied = (u64, i64);

pub struct DiskEntry {
    pub disk_id: String,
    pub assignment: RwLock<DiskAssignment>,
    pub cache: Mutex<DiskCache>,
    /// The cache's size on disk, readable without its lock (`DiskCache::bytes_counter`).
    pub cache_bytes: Arc<AtomicU64>,
    /// The cache's durable seq, readable without its lock (`DiskCache::durable_counter`):
    /// see [`DiskEntry::durable_seq`].
    cache_durable: Arc<AtomicU64>,
    /// The connection (the agent's address) of the disk's latest `Ingest.Resume` with
    /// `take_stream`: only push streams on it may store. A restarted agent numbers its batches on from where it
    /// resumed, with contents the old process never had, so a batch of the old process's
    /// stream stored after that resume (read late from a dead connection) would take a seq
    /// the new process uses, and the new batch would be dropped as a replay. Set and checked
    /// under the cache lock. `None` until the first resume (after a process-server start).
    pub stream_owner: lifeboat_common::stream_owner::StreamOwner,
    /// The highest seq received and held in memory without the cache (initial-sync batches,
    /// see `ingest`); 0 if none since the process started. Raised under the cache lock.
    pub held_through: AtomicU64,
    /// Signalled after every append, to wake the forwarder.
    pub appended: Notify,
    pub applied: watch::Sender<Applied>,
    /// Bytes received (plain) and stored (compressed and sealed), for the compression ratio.
    pub plain_bytes: AtomicU64,
    pub stored_bytes: AtomicU64,
    /// The process server's cache quota (shared by every disk).
    pub quota: Arc<Quota>,
    /// The newest stored batches, so the forwarder need not read, decrypt and decompress them
    /// back from the cache file (see `recent`).
    pub recent: Mutex<Recent>,
    /// A client of the disk's master target for requests outside the forwarding stream (block
    /// hashes), with the address it was made for; kept so each request does not handshake.
    pub replica_client: Mutex<Option<(String, ReplicaClient<Channel>)>>,
    /// Set once the forwarder has heard where the master target stands. Until then an empty
    /// cache cannot tell an agent where to resume (see `Ingest.Resume`).
    pub mt_status_known: watch::Sender<bool>,
    /// Why forwarding fails, and since when: set when a forwarding session fails, cleared
    /// by progress (an acknowledgement, or nothing left to send). Reported with the disk
    /// (`forward_stall`) so the operator learns why replication waits.
    pub forward_error: Mutex<Option<(String, Instant)>>,
    /// Cancelled when the disk is no longer assigned here.
    pub stop: CancellationToken,
}

/// How long forwarding must have failed before the process server reports it: a master
/// target restarting, or a connection broken once, is not worth an alert.
const REPORT_STALL_AFTER: Duration = Duration::from_secs(10);

impl DiskEntry {
    pub fn assignment(&self) -> DiskAssignment {
        self.assignment
            .read()
            .map(|a| a.clone())
            .unwrap_or_default()
    }

    /// The highest seq durable in the cache, without waiting for its lock (a group commit
    /// holds it through its fdatasync). Where the answer must not grow after it is read (a
    /// switch's drain report), read it under the lock instead.
    pub fn durable_seq(&self) -> u64 {
        self.cache_durable.load(Ordering::Acquire)
    }

    /// The highest seq received: durable in the cache, or held in memory until applied.
    /// The next batch of the disk's stream follows it.
    pub fn received_seq(&self) -> u64 {
        self.durable_seq()
            .max(self.held_through.load(Ordering::Acquire))
    }

    pub fn applied(&self) -> Applied {
        *self.applied.borrow()
    }

    /// Notes a failed forwarding session (keeping when the failures began).
    pub fn forward_failed(&self, error: String) {
        if let Ok(mut slot) = self.forward_error.lock() {
            let since = slot.take().map_or_else(Instant::now, |(_, since)| since);
            *slot = Some((error, since));
        }
    }

    /// Forwarding moves (or has nothing to move): whatever failed before is over.
    pub fn forward_ok(&self) {
        if let Ok(mut slot) = self.forward_error.lock() {
            *slot = None;
        }
    }

    /// Why batches cached here have not reached the master target for a while, if they have
    /// not: `cached_seq` is the newest batch the cache holds, `applied_seq` the master
    /// target's.
    pub fn forward_stall(&self, cached_seq: u64, applied_seq: u64) -> String {
        let Ok(slot) = self.forward_error.lock() else {
            return String::new();
        };
        match slot.as_ref() {
            Some((error, since))
                if cached_seq > applied_seq && since.elapsed() >= REPORT_STALL_AFTER =>
            {
                format!(
                    "the process server cannot forward to the master target (for {}s): {error}",
                    since.elapsed().as_secs()
                )
            }
            _ => String::new(),
        }
    }

    /// A client of the disk's master target, made once per address.
    pub fn replica_client(&self, identity: &Identity) -> anyhow::Result<ReplicaClient<Channel>> {
        let assignment = self.assignment();
        let mut cached = self
            .replica_client
            .lock()
            .map_err(|_| anyhow::anyhow!("client cache poisoned"))?;
        if let Some((address, client)) = cached.as_ref() {
            if *address == assignment.master_target_address {
                return Ok(client.clone());
            }
        }
        let client = forward::replica_client(identity, &assignment)?;
        *cached = Some((assignment.master_target_address.clone(), client.clone()));
        Ok(client)
    }
}

/// Where and how the disks' caches are kept.
pub struct CacheSetup {
    pub dir: PathBuf,
    /// Segments written with `O_DIRECT` (the `cache_direct_io` setting).
    pub direct_io: bool,
    pub quota: Arc<Quota>,
    /// Seals every cached batch.
    pub key: Arc<CacheKey>,
}

pub struct Disks {
    pub cache: CacheSetup,
    /// Memory for the batches every disk keeps for its forwarder.
    pub recent_budget: Arc<Budget>,
    pub identity: Arc<Identity>,
    pub revocations: RevocationList,
    pub cancel: CancellationToken,
    disks: Assigned<DiskEntry>,
}

impl Disks {
    pub fn new(
        cache: CacheSetup,
        recent_budget: Arc<Budget>,
        identity: Arc<Identity>,
        revocations: RevocationList,
        cancel: CancellationToken,
    ) -> Arc<Disks> {
        Arc::new(Disks {
            cache,
            recent_budget,
            identity,
            revocations,
            cancel,
            disks: Assigned::default(),
        })
    }

    pub fn get(&self, disk_id: &str) -> Option<Arc<DiskEntry>> {
        self.disks.get(disk_id)
    }

    pub fn all(&self) -> Vec<Arc<DiskEntry>> {
        self.disks.all()
    }

    /// Applies the configuration server's list of assigned disks.
    pub fn assign(self: &Arc<Self>, assignments: Vec<DiskAssignment>) {
        self.drop_stale_caches(&assignments);
        self.disks.follow(
            assignments,
            |id, entry| {
                entry.stop.cancel();
                let dir = self.cache.dir.join(id);
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    tracing::warn!(disk = %id, "cannot remove cache {}: {e}", dir.display());
                }
                tracing::info!(disk = %id, "disk no longer assigned here: cache dropped");
            },
            |entry, assignment| {
                if let Ok(mut a) = entry.assignment.write() {
                    *a = assignment;
                }
            },
            |assignment| {
                let id = assignment.disk_id.clone();
                let cache =
                    match DiskCache::open(&self.cache.dir.join(&id), &id, self.cache.key.clone()) {
                        Ok(c) => c.with_direct_io(self.cache.direct_io),
                        Err(e) => {
                            tracing::error!(disk = %id, "cannot open cache: {e}");
                            return None;
                        }
                    };
                let (applied, _) = watch::channel((0, 0));
                let entry = Arc::new(DiskEntry {
                    disk_id: id.clone(),
                    assignment: RwLock::new(assignment),
                    cache_bytes: cache.bytes_counter(),
                    cache_durable: cache.durable_counter(),
                    held_through: AtomicU64::new(0),
                    cache: Mutex::new(cache),
                    stream_owner: Default::default(),
                    appended: Notify::new(),
                    applied,
                    plain_bytes: AtomicU64::new(0),
                    stored_bytes: AtomicU64::new(0),
                    quota: self.cache.quota.clone(),
                    replica_client: Mutex::new(None),
                    recent: Mutex::new(Recent::new(self.recent_budget.clone())),
                    mt_status_known: watch::Sender::new(false),
                    forward_error: Mutex::new(None),
                    stop: self.cancel.child_token(),
                });
                tracing::info!(disk = %id, "disk assigned here: forwarding to its master target");
                tokio::spawn(forward::run(self.identity.clone(), entry.clone()));
                Some(entry)
            },
        );
    }

    /// Deletes the caches of disks not assigned here that no entry holds: left by a process
    /// server that was down while its machines were unprotected or moved elsewhere with
    /// `--force`. Kept, such a cache could come back into use if a machine were moved here
    /// again, holding batches under seqs the agent has since used for other writes.
    fn drop_stale_caches(&self, assignments: &[DiskAssignment]) {
        let Ok(entries) = std::fs::read_dir(&self.cache.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale = name.starts_with("d-")
                && !assignments.iter().any(|a| a.disk_id == name)
                && self.get(&name).is_none();
            if stale {
                match std::fs::remove_dir_all(entry.path()) {
                    Ok(()) => {
                        tracing::info!(disk = %name, "cache of a disk no longer assigned here deleted")
                    }
                    Err(e) => {
                        tracing::warn!(disk = %name, "cannot delete the cache of a disk no longer assigned here: {e}")
                    }
                }
            }
        }
    }

    /// Bytes the cache holds now, over all disks (no cache lock taken).
    pub fn cache_used(&self) -> u64 {
        self.all()
            .iter()
            .map(|d| d.cache_bytes.load(Ordering::Relaxed))
            .sum()
    }

    /// Total cache bytes and the compression ratio so far.
    pub fn cache_totals(&self) -> (u64, f64) {
        let mut bytes = 0;
        let (mut plain, mut stored) = (0u64, 0u64);
        for d in self.all() {
            bytes += d.cache_bytes.load(Ordering::Relaxed);
            plain += d.plain_bytes.load(Ordering::Relaxed);
            stored += d.stored_bytes.load(Ordering::Relaxed);
        }
        let ratio = if stored == 0 {
            1.0
        } else {
            plain as f64 / stored as f64
        };
        (bytes, ratio)
    }
}
