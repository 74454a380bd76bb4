//! One replica disk: a dynamic VHD, its retention journal, the recovery-point views open on
//! it, and the sequence number of the last change batch applied.
//!
//! Applying a group of batches is crash-safe in three steps (DESIGN §6): the group's undo
//! records are computed (see `undo`) and appended to the journal, which fsyncs; only then are
//! the batches written into the image and `flush`ed (see the `vhd` crate's write order); only
//! then is the applied sequence number written (in place, one fdatasync: see `position`).
//! A crash in between leaves the marker behind the data and the journal ahead of it; the
//! process server still holds those batches and sends them again, re-applying a batch is a
//! plain overwrite, and records already journaled are not written twice — so the replica
//! converges and its history stays right.
mod position;

use crate::journal::Journal;
use crate::views::OpenView;
use lifeboat_common::{blockhash, fsutil};
use lifeboat_proto::v1::ChangeBatch;
use position::{Position, PositionFile};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("replica {disk}: {source}")]
    Image { disk: String, source: vhd::Error },
    #[error("replica {disk}: {context}: {source}")]
    Io {
        disk: String,
        context: &'static str,
        source: std::io::Error,
    },
    #[error("replica {disk}: state file is unreadable: {detail}")]
    State { disk: String, detail: String },
    /// The request cannot be done in the replica's current state (failed over, unknown
    /// point or view, ...); the message says what to do.
    #[error("{0}")]
    Refused(String),
}

/// What `state.json` records; the position fields (applied seq and time, last tag) are
/// newer in the position file when it is ahead (see `position`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ReplicaState {
    pub disk_id: String,
    pub size_bytes: u64,
    pub applied_seq: u64,
    /// Capture time of the newest write applied (0: none).
    pub applied_write_unix_ms: i64,
    /// The newest recovery-point tag applied (e.g. "crash:1700000000000:fuzzy") and the seq of
    /// its batch; recovery points themselves are the retention journal's business.
    #[serde(default)]
    pub last_tag: String,
    #[serde(default)]
    pub last_tag_seq: u64,
    /// Set once the disk failed over: replication into it is refused.
    #[serde(default)]
    pub failover: Option<FailoverState>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FailoverState {
    /// The view the failed-over machine runs on (its export keeps this name after commit).
    pub view_id: String,
    pub point_seq: u64,
    /// A commit was started: on restart it is finished before anything else.
    #[serde(default)]
    pub commit_pending: bool,
    /// The replica is the failed-over disk itself; the history is gone.
    #[serde(default)]
    pub committed: bool,
    /// Creation time of the failover view (its export keeps serving the same connections
    /// after the commit).
    #[serde(default)]
    pub generation: i64,
}

pub struct Replica {
    pub(crate) dir: PathBuf,
    pub(crate) image: vhd::Image,
    pub(crate) state: ReplicaState,
    pub(crate) journal: Journal,
    pub(crate) views: BTreeMap<String, OpenView>,
    position: PositionFile,
}

/// VHD sizes are whole sectors.
fn image_size(size: u64) -> u64 {
    size.div_ceil(512) * 512
}

/// One recovery point a replica can show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Point {
    pub seq: u64,
    pub tag: String,
    pub time_ms: i64,
}

/// The time a tag names (`kind:<unix ms>[:...]`), if it names one.
pub fn tag_time(tag: &str) -> Option<i64> {
    tag.split(':').nth(1)?.parse().ok()
}

/// An I/O error of disk `disk` while doing `context`.
fn io_err(disk: &str, context: &'static str) -> impl Fn(std::io::Error) -> ReplicaError {
    let disk = disk.to_string();
    move |source| ReplicaError::Io {
        disk: disk.clone(),
        context,
        source,
    }
}

/// Takes the position file's position into `state` when it is ahead of it.
fn overlay(state: &mut ReplicaState, newest: Option<Position>) {
    if let Some(p) = newest.filter(|p| p.applied_seq > state.applied_seq) {
        state.applied_seq = p.applied_seq;
        state.applied_write_unix_ms = p.applied_write_unix_ms;
        state.last_tag = p.last_tag;
        state.last_tag_seq = p.last_tag_seq;
    }
}

impl Replica {
    pub fn image_path(dir: &Path) -> PathBuf {
        dir.join("disk.vhd")
    }

    fn state_path(dir: &Path) -> PathBuf {
        dir.join("state.json")
    }

    pub(crate) fn io_error(
        &self,
        context: &'static str,
    ) -> impl Fn(std::io::Error) -> ReplicaError {
        io_err(&self.state.disk_id, context)
    }

    pub(crate) fn image_error(&self) -> impl Fn(vhd::Error) -> ReplicaError {
        let disk = self.state.disk_id.clone();
        move |source| ReplicaError::Image {
            disk: disk.clone(),
            source,
        }
    }

    /// Opens the replica in `dir`, creating an empty one of `size_bytes` if there is none.
    pub fn open_or_create(
        dir: &Path,
        disk_id: &str,
        size_bytes: u64,
    ) -> Result<Replica, ReplicaError> {
        let io = |context| io_err(disk_id, context);
        let image_err = |source| ReplicaError::Image {
            disk: disk_id.to_string(),
            source,
        };
        fsutil::create_private_dir(dir).map_err(io("create the replica directory"))?;
        let state_path = Self::state_path(dir);
        let image_path = Self::image_path(dir);
        let journal = Journal::open(&dir.join("journal")).map_err(io("open the journal"))?;
        if state_path.exists() && image_path.exists() {
            let mut state = Self::read_state_file(dir, disk_id)?;
            let (position, newest) =
                PositionFile::open(dir).map_err(io("open the position file"))?;
            overlay(&mut state, newest);
            let image = vhd::Image::open_rw(&image_path).map_err(image_err)?;
            let mut replica = Replica {
                dir: dir.to_path_buf(),
                image,
                state,
                journal,
                views: BTreeMap::new(),
                position,
            };
            replica.reopen_views()?;
            return Ok(replica);
        }
        // A crash during creation may leave an image without a state file, or a state file
        // without its image: start over. Nothing of an earlier replica of this disk may
        // outlive it: its state file goes first (durably, so a crash from here on starts over
        // again), and its position file is replaced by an empty one.
        if state_path.exists() {
            std::fs::remove_file(&state_path).map_err(io("remove the old state file"))?;
            fsutil::fsync_dir(dir).map_err(io("remove the old state file"))?;
        }
        let _ = std::fs::remove_file(&image_path);
        let position = PositionFile::create(dir).map_err(io("create the position file"))?;
        let image = vhd::Image::create(
            &image_path,
            &vhd::CreateOptions::dynamic(image_size(size_bytes)),
        )
        .map_err(image_err)?;
        let state = ReplicaState {
            disk_id: disk_id.into(),
            size_bytes,
            ..Default::default()
        };
        let mut replica = Replica {
            dir: dir.to_path_buf(),
            image,
            state,
            journal,
            views: BTreeMap::new(),
            position,
        };
        // Records of an earlier replica of this disk describe another history.
        replica.journal.clear().map_err(io("clear the journal"))?;
        replica.save_state()?;
        Ok(replica)
    }

    /// Writes the image's data with `O_DIRECT` from now on, where the file system takes it
    /// (the `replica_direct_io` setting; see `vhd::Image::write_direct`). Returns whether
    /// direct writes are in use.
    ///
    /// A master target streams every replicated byte into its replicas and reads little of
    /// it back: through the page cache each byte costs a copy into a fresh page, its
    /// write-back and its reclaim (the pages are dropped after each flush anyway). Direct,
    /// it costs one copy into an aligned buffer, and the disk reads from there. Each direct
    /// write waits for its I/O, so a group's writes no longer overlap each other; on the
    /// benchmark's virtual disk that was no slower and saved a quarter of the master
    /// target's CPU.
    pub fn write_direct(&mut self) -> Result<bool, ReplicaError> {
        self.image.write_direct().map_err(self.image_error())
    }

    pub fn state(&self) -> &ReplicaState {
        &self.state
    }

    /// Bytes the image file takes.
    pub fn file_bytes(&self) -> u64 {
        self.image.file_len()
    }

    /// Bytes the retention journal takes.
    pub fn journal_bytes(&self) -> u64 {
        self.journal.bytes()
    }

    fn read_state_file(dir: &Path, disk_id: &str) -> Result<ReplicaState, ReplicaError> {
        let text =
            std::fs::read(Self::state_path(dir)).map_err(io_err(disk_id, "read the state file"))?;
        serde_json::from_slice(&text).map_err(|e| ReplicaError::State {
            disk: disk_id.into(),
            detail: e.to_string(),
        })
    }

    /// Makes `state`'s position durable after a group: in the position file, or in
    /// `state.json` when the last tag is too long for a slot.
    fn save_position(&mut self, state: &ReplicaState) -> Result<(), ReplicaError> {
        let position = Position {
            applied_seq: state.applied_seq,
            applied_write_unix_ms: state.applied_write_unix_ms,
            last_tag: state.last_tag.clone(),
            last_tag_seq: state.last_tag_seq,
        };
        let err = self.io_error("write the position file");
        if !self.position.save(&position).map_err(err)? {
            self.write_state(state)?;
        }
        Ok(())
    }

    pub(crate) fn save_state(&self) -> Result<(), ReplicaError> {
        self.write_state(&self.state)
    }

    fn write_state(&self, state: &ReplicaState) -> Result<(), ReplicaError> {
        let bytes = serde_json::to_vec(state).expect("replica state serialises");
        fsutil::durable_write(&Self::state_path(&self.dir), &bytes, 0o600)
            .map_err(self.io_error("write the state file"))
    }

    /// Applies batches that directly follow `applied_seq` (checked by the caller), makes them
    /// durable, then records the new position.
    pub fn apply(&mut self, batches: &[ChangeBatch]) -> Result<u64, ReplicaError> {
        let Some(last) = batches.last() else {
            return Ok(self.state.applied_seq);
        };
        if self.state.failover.is_some() {
            return Err(ReplicaError::Refused(format!(
                "disk {} failed over: the replica takes no more batches until it is \
                 reprotected",
                self.state.disk_id
            )));
        }
        self.journal_group(batches)?;
        let image_err = self.image_error();
        // Gathered: an initial sync's or a sequential workload's extents land one after the
        // other in the blocks they allocate, and go to the disk in large writes.
        self.image
            .gathered(|image| {
                for batch in batches {
                    for extent in &batch.extents {
                        if extent.data.is_empty() {
                            image.write_zeroes(extent.offset, extent.zero_length)?;
                        } else {
                            image.write_at(&extent.data, extent.offset)?;
                        }
                    }
                }
                Ok(())
            })
            .map_err(&image_err)?;
        self.image.flush().map_err(&image_err)?;
        // Replicas of many disks stream through a master target; keeping what was just
        // written cached would push out everything else (the data just written, metadata, and
        // old data read for undo records). The cost: undo records of ranges overwritten later,
        // and views, read the replica from disk.
        self.image.drop_cached_pages();
        // The new position is taken only once durable: a replica whose position could not be
        // written must not report it (the process server would release those batches).
        let mut state = self.state.clone();
        if let Some(tagged) = batches.iter().rev().find(|b| !b.tags.is_empty()) {
            state.last_tag = tagged.tags.last().cloned().unwrap_or_default();
            state.last_tag_seq = tagged.seq;
        }
        state.applied_seq = last.seq;
        state.applied_write_unix_ms = batches
            .iter()
            .map(|b| b.last_write_unix_ms)
            .max()
            .unwrap_or(0)
            .max(state.applied_write_unix_ms);
        self.save_position(&state)?;
        self.state = state;
        Ok(self.state.applied_seq)
    }

    /// Makes the group's undo records durable (those not journaled before a crash) and shows
    /// them to open views, before the image is touched.
    fn journal_group(&mut self, batches: &[ChangeBatch]) -> Result<(), ReplicaError> {
        // Records serve only points after them. Until a tagged batch arrives (an initial sync
        // or resync places none) there is no point to go back to: writing records of zeros
        // and waiting for their fsync would only slow the sync down. The first tagged batch
        // starts the journal, and from then on every batch is recorded.
        if self.journal.records().is_empty()
            && self.views.is_empty()
            && batches.iter().all(|b| b.tags.is_empty())
        {
            return Ok(());
        }
        let first = batches[0].seq;
        let journaled = self.journal.last_seq();
        if !self.journal.records().is_empty() && first > journaled + 1 {
            // Batches were applied without records (a journal cleared by hand): the history
            // before them cannot be rebuilt, and neither can any open view.
            tracing::warn!(disk = %self.state.disk_id, journaled, first,
                "retention journal does not reach this batch; older recovery points and open views dropped");
            let ids: Vec<String> = self.views.keys().cloned().collect();
            for id in ids {
                self.close_view(&id)?;
            }
            self.journal
                .clear()
                .map_err(self.io_error("clear the journal"))?;
        }
        let records = crate::undo::records(&self.image, batches, self.journal.last_seq())
            .map_err(self.image_error())?;
        if !records.is_empty() {
            self.journal
                .append(&records)
                .map_err(self.io_error("append to the retention journal"))?;
        }
        // Every open view takes the records it lacks before the image changes.
        for view in self.views.values_mut() {
            view.overlay
                .catch_up(&self.journal)
                .map_err(|source| ReplicaError::Io {
                    disk: self.state.disk_id.clone(),
                    context: "read the retention journal",
                    source,
                })?;
        }
        Ok(())
    }

    /// The recovery points this replica can show now, oldest first: every tagged batch from
    /// the oldest journaled one up to the applied position.
    pub fn points(&self) -> Vec<Point> {
        self.journal
            .tagged()
            .filter(|r| r.seq <= self.state.applied_seq)
            .flat_map(|r| {
                r.tags.iter().map(move |tag| Point {
                    seq: r.seq,
                    tag: tag.clone(),
                    time_ms: tag_time(tag).unwrap_or(r.time_ms),
                })
            })
            .collect()
    }

    /// Whether the disk as it was after batch `seq` can be rebuilt.
    pub fn can_show(&self, seq: u64) -> bool {
        if seq == self.state.applied_seq {
            return true;
        }
        seq < self.state.applied_seq
            && self.journal.first_seq().is_some_and(|f| f <= seq + 1)
            && self.journal.last_seq() >= self.state.applied_seq
    }

    /// Drops journal segments no point inside the retention window (and no open view) needs.
    /// Returns the bytes freed.
    pub fn prune(&mut self, retention_secs: u64, now_ms: i64) -> Result<u64, ReplicaError> {
        if self.state.failover.is_some() {
            return Ok(0); // the history is kept as it was until the failover is committed
        }
        let retention_ms = i64::try_from(retention_secs)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000);
        let window_start = now_ms.saturating_sub(retention_ms);
        let oldest_kept = self
            .points()
            .into_iter()
            .find(|p| p.time_ms >= window_start)
            .map(|p| p.seq)
            .unwrap_or(self.state.applied_seq);
        let pinned = self.views.values().map(|v| v.overlay.point_seq).min();
        let keep_from = pinned.map_or(oldest_kept, |p| p.min(oldest_kept));
        self.journal
            .prune_before(keep_from)
            .map_err(self.io_error("prune the retention journal"))
    }
}

impl Replica {
    /// Hashes `length` bytes at `offset` in blocks of `block_size` (bounds checked by the
    /// caller with `blockhash::check_span`).
    pub fn hashes(
        &self,
        offset: u64,
        length: u64,
        block_size: u64,
    ) -> Result<Vec<blockhash::BlockHash>, ReplicaError> {
        let mut data = vec![0u8; length as usize];
        self.image
            .read_at(&mut data, offset)
            .map_err(self.image_error())?;
        Ok(blockhash::hash_blocks(&data, block_size))
    }
}

#[cfg(test)]
mod tests;
