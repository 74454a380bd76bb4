//! One replica disk: a dynamic VHD and the sequence number of the last change batch applied
//! to it. Applying is crash-safe: the batches' writes go into the image, `flush` makes them
//! durable (see the `vhd` crate's write order), and only then is the applied sequence number
//! written (temp file, fsync, rename). A crash in between leaves the marker behind the data;
//! the process server still holds those batches and sends them again, and re-applying a batch
//! is a plain overwrite, so the replica converges.
use lifeboat_common::{blockhash, fsutil};
use lifeboat_proto::v1::ChangeBatch;
use serde::{Deserialize, Serialize};
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
}

/// What `state.json` records.
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
}

pub struct Replica {
    dir: PathBuf,
    image: vhd::Image,
    state: ReplicaState,
}

/// VHD sizes are whole sectors.
fn image_size(size: u64) -> u64 {
    size.div_ceil(512) * 512
}

impl Replica {
    pub fn image_path(dir: &Path) -> PathBuf {
        dir.join("disk.vhd")
    }

    fn state_path(dir: &Path) -> PathBuf {
        dir.join("state.json")
    }

    /// Opens the replica in `dir`, creating an empty one of `size_bytes` if there is none.
    pub fn open_or_create(
        dir: &Path,
        disk_id: &str,
        size_bytes: u64,
    ) -> Result<Replica, ReplicaError> {
        let io = |context| {
            let disk = disk_id.to_string();
            move |source| ReplicaError::Io {
                disk,
                context,
                source,
            }
        };
        let image_err = |source| ReplicaError::Image {
            disk: disk_id.to_string(),
            source,
        };
        fsutil::create_private_dir(dir).map_err(io("create the replica directory"))?;
        let state_path = Self::state_path(dir);
        let image_path = Self::image_path(dir);
        if state_path.exists() && image_path.exists() {
            let text = std::fs::read(&state_path).map_err(io("read the state file"))?;
            let state: ReplicaState =
                serde_json::from_slice(&text).map_err(|e| ReplicaError::State {
                    disk: disk_id.into(),
                    detail: e.to_string(),
                })?;
            let image = vhd::Image::open_rw(&image_path).map_err(image_err)?;
            return Ok(Replica {
                dir: dir.to_path_buf(),
                image,
                state,
            });
        }
        // A crash during creation may leave an image without a state file: start over.
        let _ = std::fs::remove_file(&image_path);
        let image = vhd::Image::create(
            &image_path,
            &vhd::CreateOptions::dynamic(image_size(size_bytes)),
        )
        .map_err(image_err)?;
        let state = ReplicaState {
            disk_id: disk_id.into(),
            size_bytes,
            applied_seq: 0,
            applied_write_unix_ms: 0,
            last_tag: String::new(),
            last_tag_seq: 0,
        };
        let replica = Replica {
            dir: dir.to_path_buf(),
            image,
            state,
        };
        replica.save_state()?;
        Ok(replica)
    }

    pub fn state(&self) -> &ReplicaState {
        &self.state
    }

    /// Bytes the image file takes.
    pub fn file_bytes(&self) -> u64 {
        self.image.file_len()
    }

    fn save_state(&self) -> Result<(), ReplicaError> {
        let bytes = serde_json::to_vec(&self.state).expect("replica state serialises");
        fsutil::durable_write(&Self::state_path(&self.dir), &bytes, 0o600).map_err(|source| {
            ReplicaError::Io {
                disk: self.state.disk_id.clone(),
                context: "write the state file",
                source,
            }
        })
    }

    /// Applies batches that directly follow `applied_seq` (checked by the caller), makes them
    /// durable, then records the new position.
    pub fn apply(&mut self, batches: &[ChangeBatch]) -> Result<u64, ReplicaError> {
        let Some(last) = batches.last() else {
            return Ok(self.state.applied_seq);
        };
        let image_err = |source| ReplicaError::Image {
            disk: self.state.disk_id.clone(),
            source,
        };
        for batch in batches {
            for extent in &batch.extents {
                if extent.data.is_empty() {
                    self.image
                        .write_zeroes(extent.offset, extent.zero_length)
                        .map_err(image_err)?;
                } else {
                    self.image
                        .write_at(&extent.data, extent.offset)
                        .map_err(image_err)?;
                }
            }
        }
        self.image.flush().map_err(image_err)?;
        if let Some(tagged) = batches.iter().rev().find(|b| !b.tags.is_empty()) {
            self.state.last_tag = tagged.tags.last().cloned().unwrap_or_default();
            self.state.last_tag_seq = tagged.seq;
        }
        self.state.applied_seq = last.seq;
        self.state.applied_write_unix_ms = batches
            .iter()
            .map(|b| b.last_write_unix_ms)
            .max()
            .unwrap_or(0)
            .max(self.state.applied_write_unix_ms);
        self.save_state()?;
        Ok(self.state.applied_seq)
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
            .map_err(|source| ReplicaError::Image {
                disk: self.state.disk_id.clone(),
                source,
            })?;
        Ok(blockhash::hash_blocks(&data, block_size))
    }
}
