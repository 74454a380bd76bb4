//! A component's identity on disk: its certificate, private key, the pinned cluster CA and what
//! registration told it (id, role, configuration server addresses). Lives in `DATA/identity/`,
//! written once at registration and reused by every restart.
use crate::fsutil;
use crate::role::Role;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What registration returned, besides the certificate material.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IdentityInfo {
    pub id: String,
    pub role: Role,
    pub name: String,
    pub cs_addresses: Vec<String>,
    /// Raft node id (configuration servers only).
    #[serde(default)]
    pub node_id: u64,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval_secs: u32,
}

fn default_heartbeat() -> u32 {
    5
}

/// A complete identity: enough to open mutual-TLS connections and serve.
#[derive(Debug, Clone)]
pub struct Identity {
    pub info: IdentityInfo,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("no identity in {0}: register this component first (its `register` command)")]
    Missing(PathBuf),
    #[error("cannot read identity file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("identity file {path} is malformed: {detail}")]
    Malformed { path: PathBuf, detail: String },
    #[error("cannot write identity to {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Identity {
    /// Folder of the identity inside a data directory.
    pub fn dir(data_dir: &Path) -> PathBuf {
        data_dir.join("identity")
    }

    pub fn exists(data_dir: &Path) -> bool {
        Self::dir(data_dir).join("identity.toml").exists()
    }

    pub fn load(data_dir: &Path) -> Result<Identity, IdentityError> {
        let dir = Self::dir(data_dir);
        let info_path = dir.join("identity.toml");
        if !info_path.exists() {
            return Err(IdentityError::Missing(data_dir.to_path_buf()));
        }
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| IdentityError::Read { path, source })
        };
        let info: IdentityInfo =
            toml::from_str(&read("identity.toml")?).map_err(|e| IdentityError::Malformed {
                path: info_path.clone(),
                detail: e.to_string(),
            })?;
        Ok(Identity {
            info,
            cert_pem: read("cert.pem")?,
            key_pem: read("key.pem")?,
            ca_pem: read("ca.pem")?,
        })
    }

    /// Writes every file durably; the key and the info last-but-one and last, so an identity
    /// whose `identity.toml` exists is complete.
    pub fn save(&self, data_dir: &Path) -> Result<(), IdentityError> {
        let dir = Self::dir(data_dir);
        let err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| IdentityError::Write { path, source }
        };
        fsutil::create_private_dir(&dir).map_err(err(&dir))?;
        let info = toml::to_string(&self.info).map_err(|e| IdentityError::Malformed {
            path: dir.join("identity.toml"),
            detail: e.to_string(),
        })?;
        for (name, contents, mode) in [
            ("ca.pem", self.ca_pem.as_str(), 0o644),
            ("cert.pem", self.cert_pem.as_str(), 0o644),
            ("key.pem", self.key_pem.as_str(), 0o600),
            ("identity.toml", info.as_str(), 0o600),
        ] {
            let path = dir.join(name);
            fsutil::durable_write(&path, contents.as_bytes(), mode).map_err(err(&path))?;
        }
        Ok(())
    }

    /// Replaces the remembered configuration server addresses (heartbeats keep them current).
    pub fn update_cs_addresses(
        &mut self,
        data_dir: &Path,
        addresses: Vec<String>,
    ) -> Result<(), IdentityError> {
        if addresses.is_empty() || addresses == self.info.cs_addresses {
            return Ok(());
        }
        self.info.cs_addresses = addresses;
        self.save(data_dir)
    }
}
