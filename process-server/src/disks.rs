//! The disks this process server handles: for each, its assignment from the configuration
//! server, its cache, and what the master target has applied. Assignments arrive with every
//! heartbeat; a new disk gets its cache opened and a forwarder started, a disk no longer
//! assigned is dropped with its cache (it was unprotected).
use crate::cache::{CacheKey, Cursor, DiskCache};
use crate::forward;
use crate::quota::Quota;
use lifeboat_common::assigned::Assigned;
use lifeboat_common::component::RevocationList;
use lifeboat_common::Identity;
use lifeboat_proto::v1::replica_client::ReplicaClient;
use lifeboat_proto::v1::{ChangeBatch, DiskAssignment};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
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
    /// Signalled after every append, to wake the forwarder.
    pub appended: Notify,
    pub applied: watch::Sender<Applied>,
    /// Bytes received (plain) and stored (compressed and sealed), for the compression ratio.
    pub plain_bytes: AtomicU64,
    pub stored_bytes: AtomicU64,
    /// The process server's cache quota (shared by every disk).
    pub quota: Arc<Quota>,
    /// The newest stored batches, so the forwarder need not read, decrypt and decompress them
    /// back from the cache file (see `Recent`).
    pub recent: Mutex<Recent>,
    /// A client of the disk's master target for requests outside the forwarding stream (block
    /// hashes), with the address it was made for; kept so each request does not handshake.
    pub replica_client: Mutex<Option<(String, ReplicaClient<Channel>)>>,
    /// Set once the forwarder has heard where the master target stands. Until then an empty
    /// cache cannot tell an agent where to resume (see `Ingest.Resume`).
    pub mt_status_known: std::sync::atomic::AtomicBool,
    /// Cancelled when the disk is no longer assigned here.
    pub stop: CancellationToken,
}

impl DiskEntry {
    pub fn assignment(&self) -> DiskAssignment {
        self.assignment
            .read()
            .map(|a| a.clone())
            .unwrap_or_default()
    }

    pub fn applied(&self) -> Applied {
        *self.applied.borrow()
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

/// Most payload bytes of one disk's newest batches kept in memory for forwarding.
const RECENT_BYTES: usize = 32 * 1024 * 1024;

/// A disk's newest durable batches, in seq order, bounded by `RECENT_BYTES` (the oldest are
/// dropped first: a forwarder that far behind reads the cache file until it catches up).
#[derive(Default)]
pub struct Recent {
    /// Each batch with the cache-file cursor just after it.
    batches: std::collections::VecDeque<(ChangeBatch, Cursor)>,
    bytes: usize,
}

impl Recent {
    /// Adds batches just made durable (consecutive, after everything held).
    pub fn push(&mut self, batches: Vec<(ChangeBatch, Cursor)>) {
        for b in batches {
            self.bytes += lifeboat_common::batch::payload_bytes(&b.0);
            self.batches.push_back(b);
        }
        while self.bytes > RECENT_BYTES {
            match self.batches.pop_front() {
                Some(b) => self.bytes -= lifeboat_common::batch::payload_bytes(&b.0),
                None => break,
            }
        }
    }

    /// Takes the batches that follow `sent` (up to `max_bytes`, at least one), if the next one
    /// is held, with the cache cursor after the last; drops what is older.
    pub fn take_after(
        &mut self,
        sent: u64,
        max_bytes: usize,
    ) -> (Vec<ChangeBatch>, Option<Cursor>) {
        while self.batches.front().is_some_and(|b| b.0.seq <= sent) {
            if let Some(b) = self.batches.pop_front() {
                self.bytes -= lifeboat_common::batch::payload_bytes(&b.0);
            }
        }
        let (mut out, mut cursor) = (Vec::new(), None);
        let mut size = 0;
        let mut expected = sent + 1;
        while let Some(front) = self.batches.front() {
            if front.0.seq != expected || (!out.is_empty() && size >= max_bytes) {
                break;
            }
            let Some((b, c)) = self.batches.pop_front() else {
                break;
            };
            let n = lifeboat_common::batch::payload_bytes(&b);
            self.bytes -= n;
            size += n;
            expected += 1;
            out.push(b);
            cursor = Some(c);
        }
        (out, cursor)
    }
}

pub struct Disks {
    pub cache_dir: PathBuf,
    pub quota: Arc<Quota>,
    pub key: Arc<CacheKey>,
    pub identity: Arc<Identity>,
    pub revocations: RevocationList,
    pub cancel: CancellationToken,
    disks: Assigned<DiskEntry>,
}

impl Disks {
    pub fn new(
        cache_dir: PathBuf,
        quota: Arc<Quota>,
        key: Arc<CacheKey>,
        identity: Arc<Identity>,
        revocations: RevocationList,
        cancel: CancellationToken,
    ) -> Arc<Disks> {
        Arc::new(Disks {
            cache_dir,
            quota,
            key,
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
        self.disks.follow(
            assignments,
            |id, entry| {
                entry.stop.cancel();
                let dir = self.cache_dir.join(id);
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
                let cache = match DiskCache::open(&self.cache_dir.join(&id), &id, self.key.clone())
                {
                    Ok(c) => c,
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
                    cache: Mutex::new(cache),
                    appended: Notify::new(),
                    applied,
                    plain_bytes: AtomicU64::new(0),
                    stored_bytes: AtomicU64::new(0),
                    quota: self.quota.clone(),
                    replica_client: Mutex::new(None),
                    recent: Mutex::new(Recent::default()),
                    mt_status_known: std::sync::atomic::AtomicBool::new(false),
                    stop: self.cancel.child_token(),
                });
                tracing::info!(disk = %id, "disk assigned here: forwarding to its master target");
                tokio::spawn(forward::run(self.identity.clone(), entry.clone()));
                Some(entry)
            },
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(seq: u64, len: usize) -> (ChangeBatch, Cursor) {
        let b = ChangeBatch {
            seq,
            extents: vec![lifeboat_proto::v1::Extent {
                offset: 0,
                data: vec![1; len].into(),
                zero_length: 0,
            }],
            ..Default::default()
        };
        (b, Cursor::default())
    }

    #[test]
    fn recent_batches_are_taken_in_order_and_only_when_contiguous() {
        let mut r = Recent::default();
        r.push((1..=4).map(|s| batch(s, 10)).collect());
        let (got, cursor) = r.take_after(0, 25);
        assert_eq!(got.iter().map(|b| b.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert!(cursor.is_some());
        // A forwarder that restarted after 1 finds 2 gone: it must read the file.
        assert!(r.take_after(1, 100).0.is_empty());
        assert_eq!(r.take_after(3, 100).0[0].seq, 4);
        // Over the bound, the oldest go first.
        r.push(vec![batch(5, RECENT_BYTES), batch(6, 10)]);
        assert_eq!(r.take_after(4, usize::MAX).0.len(), 0);
        assert_eq!(r.take_after(5, usize::MAX).0[0].seq, 6);
    }
}
