//! Recovery-point views of a replica (DESIGN §7): the replica plus the journal overlay of a
//! point plus a private write overlay. A test-failover view lives next to ongoing
//! replication; a failover view is the failed-over machine's disk until the failover is
//! committed, when the point and the private writes are folded into the replica and the
//! history is dropped.
//!
//! A view is kept in `views/<id>/` (its spec, and its private writes) and reopened with the
//! replica after a restart. Its journal overlay is rebuilt from the journal's records then.
use crate::replica::{FailoverState, Replica, ReplicaError};
use crate::view::{PointOverlay, Undo};
use crate::writes::PrivateWrites;
use lifeboat_common::fsutil;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ViewKind {
    Test,
    Failover,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ViewSpec {
    pub view_id: String,
    pub kind: ViewKind,
    pub point_seq: u64,
    pub created_ms: i64,
}

pub struct OpenView {
    pub spec: ViewSpec,
    pub overlay: PointOverlay,
    pub writes: PrivateWrites,
}

/// A view's standalone copy (`--materialize`) in its directory, and the name it is written
/// under until complete.
pub const COPY_FILE: &str = "disk.vhd";
pub const PARTIAL_COPY_FILE: &str = "disk.vhd.partial";

fn refused(message: String) -> ReplicaError {
    ReplicaError::Refused(message)
}

/// View ids become directory and export names: keep them plain.
pub fn check_view_id(id: &str) -> Result<(), ReplicaError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(refused(format!(
            "view id {id:?} must be 1-128 letters, digits, '-', '_' or '.'"
        )))
    }
}

impl Replica {
    pub fn view_dir_path(&self, id: &str) -> PathBuf {
        self.dir.join("views").join(id)
    }

    /// Reopens the views kept on disk, finishing a failover commit a crash interrupted.
    pub(crate) fn reopen_views(&mut self) -> Result<(), ReplicaError> {
        let mut specs = Vec::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.join("views")) {
            for entry in entries.flatten() {
                let path = entry.path().join("view.json");
                match std::fs::read(&path) {
                    Ok(bytes) => match serde_json::from_slice::<ViewSpec>(&bytes) {
                        Ok(spec) => specs.push(spec),
                        // Kept for the operator: it may hold a failed-over machine's writes.
                        Err(e) => tracing::error!(view = %path.display(),
                            "view spec unreadable, view not opened: {e}"),
                    },
                    // A view whose spec never became durable was never handed out.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        let _ = std::fs::remove_dir_all(entry.path());
                    }
                    Err(e) => tracing::error!(view = %path.display(),
                        "view spec unreadable, view not opened: {e}"),
                }
            }
        }
        for spec in specs {
            if !self.can_show(spec.point_seq) {
                tracing::error!(disk = %self.state.disk_id, view = %spec.view_id,
                    "the journal no longer holds this view's point; view not opened (its \
                     directory is kept)");
                continue;
            }
            let dir = self.view_dir_path(&spec.view_id);
            // A copy the master target was writing when it stopped: never handed out.
            let _ = std::fs::remove_file(dir.join(PARTIAL_COPY_FILE));
            let overlay = PointOverlay::build(&self.journal, spec.point_seq)
                .map_err(self.io_error("read the retention journal"))?;
            let writes = PrivateWrites::open(&dir).map_err(self.io_error("open a view"))?;
            self.views.insert(
                spec.view_id.clone(),
                OpenView {
                    spec,
                    overlay,
                    writes,
                },
            );
        }
        match self.state.failover.clone() {
            Some(f) if f.commit_pending => self.commit_failover(&f.view_id)?,
            Some(f) if f.committed => self.drop_history()?,
            _ => {}
        }
        Ok(())
    }

    pub fn views(&self) -> impl Iterator<Item = &ViewSpec> {
        self.views.values().map(|v| &v.spec)
    }

    /// Bytes of the disk the view's machine wrote (0 for no such view).
    pub fn view_written_bytes(&self, id: &str) -> u64 {
        self.views.get(id).map_or(0, |v| v.writes.written_bytes())
    }

    /// Opens a view of the point after batch `point_seq`. Opening the same view again is a
    /// no-op; a failover view replaces an uncommitted one (a different point was chosen).
    /// Returns the journal bytes read to build it (headers only, whatever the disk size).
    pub fn open_view(&mut self, spec: ViewSpec) -> Result<u64, ReplicaError> {
        check_view_id(&spec.view_id)?;
        if let Some(open) = self.views.get(&spec.view_id) {
            if open.spec.point_seq == spec.point_seq && open.spec.kind == spec.kind {
                return Ok(0);
            }
            if spec.kind == ViewKind::Test {
                return Err(refused(format!(
                    "view {} is already open at another point; clean it up first",
                    spec.view_id
                )));
            }
        }
        if let Some(f) = &self.state.failover {
            if f.committed {
                return Err(refused(format!(
                    "disk {} has a committed failover: it has no recovery points left",
                    self.state.disk_id
                )));
            }
        }
        if !self.can_show(spec.point_seq) {
            return Err(refused(format!(
                "disk {}: the point after batch {} is no longer (or not yet) in the replica's \
                 history; list the points again",
                self.state.disk_id, spec.point_seq
            )));
        }
        if spec.kind == ViewKind::Failover {
            if let Some(old) = self.state.failover.clone() {
                if old.view_id != spec.view_id {
                    self.close_view(&old.view_id)?;
                }
            }
            if self.views.contains_key(&spec.view_id) {
                self.remove_view(&spec.view_id)?;
            }
        }
        let dir = self.view_dir_path(&spec.view_id);
        fsutil::create_private_dir(&dir).map_err(self.io_error("create a view"))?;
        fsutil::fsync_dir(&self.dir.join("views")).map_err(self.io_error("create a view"))?;
        let writes = PrivateWrites::open(&dir).map_err(self.io_error("create a view"))?;
        let overlay = PointOverlay::build(&self.journal, spec.point_seq)
            .map_err(self.io_error("read the retention journal"))?;
        let read_bytes = overlay.read_bytes;
        // The spec is durable before the state names the view, so a restart finds both.
        let json = serde_json::to_vec(&spec).expect("view spec serialises");
        fsutil::durable_write(&dir.join("view.json"), &json, 0o600)
            .map_err(self.io_error("write a view"))?;
        if spec.kind == ViewKind::Failover {
            // From here on the replica takes no more batches.
            self.state.failover = Some(FailoverState {
                view_id: spec.view_id.clone(),
                point_seq: spec.point_seq,
                commit_pending: false,
                committed: false,
                generation: spec.created_ms,
            });
            self.save_state()?;
        }
        self.views.insert(
            spec.view_id.clone(),
            OpenView {
                spec,
                overlay,
                writes,
            },
        );
        Ok(read_bytes)
    }

    fn remove_view(&mut self, id: &str) -> Result<(), ReplicaError> {
        self.views.remove(id);
        match std::fs::remove_dir_all(self.view_dir_path(id)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io_error("delete a view")(e)),
        }
    }

    /// Deletes a view and its private writes. Closing an uncommitted failover view gives the
    /// disk back to replication.
    pub fn close_view(&mut self, id: &str) -> Result<(), ReplicaError> {
        if let Some(f) = &self.state.failover {
            if f.view_id == id {
                if f.committed {
                    return Err(refused(format!(
                        "disk {}: the failover was committed; the disk is the failed-over \
                         machine's now",
                        self.state.disk_id
                    )));
                }
                self.state.failover = None;
                self.save_state()?;
            }
        }
        self.remove_view(id)
    }

    /// Which opening of view `id` is current (its creation time): an NBD connection made to
    /// an earlier one must not be switched to another point under its client.
    pub fn view_generation(&self, id: &str) -> Option<i64> {
        if let Some(v) = self.views.get(id) {
            return Some(v.spec.created_ms);
        }
        self.state
            .failover
            .as_ref()
            .filter(|f| f.committed && f.view_id == id)
            .map(|f| f.generation)
    }

    fn committed_view(&self, id: &str) -> bool {
        self.state
            .failover
            .as_ref()
            .is_some_and(|f| f.committed && f.view_id == id)
    }

    fn view(&self, id: &str) -> Result<&OpenView, ReplicaError> {
        self.views
            .get(id)
            .ok_or_else(|| refused(format!("no view {id} on this master target")))
    }

    /// Reads the view's disk at `offset`.
    pub fn read_view(&self, id: &str, buf: &mut [u8], offset: u64) -> Result<(), ReplicaError> {
        self.image
            .read_at(buf, offset)
            .map_err(self.image_error())?;
        if self.committed_view(id) {
            return Ok(());
        }
        let view = self.view(id)?;
        view.overlay
            .patch(&self.journal, buf, offset)
            .map_err(self.io_error("read the retention journal"))?;
        view.writes
            .patch(buf, offset)
            .map_err(self.io_error("read a view's writes"))
    }

    /// Writes into the view (never into the replica, until a failover is committed).
    pub fn write_view(
        &mut self,
        id: &str,
        offset: u64,
        data: Option<&[u8]>,
        len: u64,
    ) -> Result<(), ReplicaError> {
        if self.committed_view(id) {
            let err = self.image_error();
            return match data {
                Some(d) => self.image.write_at(d, offset).map_err(err),
                None => self.image.write_zeroes(offset, len).map_err(err),
            };
        }
        let io = self.io_error("write into a view");
        let view = self
            .views
            .get_mut(id)
            .ok_or_else(|| refused(format!("no view {id} on this master target")))?;
        match data {
            Some(d) => view.writes.write(offset, d).map_err(io),
            None => view.writes.write_zeroes(offset, len).map_err(io),
        }
    }

    pub fn flush_view(&mut self, id: &str) -> Result<(), ReplicaError> {
        if self.committed_view(id) {
            return self.image.flush().map_err(self.image_error());
        }
        let io = self.io_error("flush a view");
        let view = self
            .views
            .get_mut(id)
            .ok_or_else(|| refused(format!("no view {id} on this master target")))?;
        view.writes.flush().map_err(io)
    }

    /// Folds the failover view into the replica: the point's content from the journal, then
    /// the failed-over machine's writes; flush; then the history is dropped. Redone from the
    /// start after a crash (`commit_pending`), which is safe because nothing it reads is
    /// changed before the flush.
    pub fn commit_failover(&mut self, id: &str) -> Result<(), ReplicaError> {
        let Some(mut failover) = self.state.failover.clone().filter(|f| f.view_id == id) else {
            return Err(refused(format!(
                "disk {} is not failed over through view {id}",
                self.state.disk_id
            )));
        };
        if failover.committed {
            return Ok(());
        }
        failover.commit_pending = true;
        self.state.failover = Some(failover.clone());
        self.save_state()?;
        let view = self.view(id)?;
        let mut restores: Vec<(u64, u64, Undo, u64)> = view.overlay.pieces().collect();
        restores.sort_by_key(|r| r.0);
        let writes = view.writes.ranges();
        let mut buf = Vec::new();
        for (offset, len, source, at) in restores {
            match source {
                Undo::Zero => self
                    .image
                    .write_zeroes(offset, len)
                    .map_err(self.image_error())?,
                Undo::Journal(segment) => {
                    buf.resize(len as usize, 0);
                    self.journal
                        .read(segment, at, &mut buf)
                        .map_err(self.io_error("read the retention journal"))?;
                    self.image
                        .write_at(&buf, offset)
                        .map_err(self.image_error())?;
                }
            }
        }
        for (offset, len) in writes {
            buf.resize(len as usize, 0);
            self.view(id)?
                .writes
                .read(&mut buf, offset)
                .map_err(self.io_error("read a view's writes"))?;
            self.image
                .write_at(&buf, offset)
                .map_err(self.image_error())?;
        }
        self.image.flush().map_err(self.image_error())?;
        failover.commit_pending = false;
        failover.committed = true;
        self.state.failover = Some(failover);
        self.save_state()?;
        self.drop_history()
    }

    /// After a commit: the journal and every view (the failover one included) go.
    fn drop_history(&mut self) -> Result<(), ReplicaError> {
        self.journal
            .clear()
            .map_err(self.io_error("clear the retention journal"))?;
        let ids: Vec<String> = self.views.keys().cloned().collect();
        for id in ids {
            self.remove_view(&id)?;
        }
        Ok(())
    }

    /// The ranges a materialised copy of the view must hold (everything else reads zero),
    /// sorted and merged.
    pub fn view_extent(&self, id: &str) -> Result<Vec<(u64, u64)>, ReplicaError> {
        let mut ranges: Vec<(u64, u64)> = self
            .image
            .allocated_ranges()
            .into_iter()
            .map(|r| (r.start, r.end - r.start))
            .collect();
        if !self.committed_view(id) {
            let view = self.view(id)?;
            ranges.extend(view.overlay.pieces().map(|(o, l, _, _)| (o, l)));
            ranges.extend(view.writes.ranges());
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (o, l) in ranges {
            match merged.last_mut() {
                Some((mo, ml)) if o <= *mo + *ml => *ml = (*ml).max(o + l - *mo),
                _ => merged.push((o, l)),
            }
        }
        Ok(merged)
    }
}
