//! Making a node's data directory: `init` creates a new cluster (CA, passphrase, this node's
//! and the admin's identities, and the bootstrap command its first `run` proposes); `join`
//! registers a new node with an existing cluster using the passphrase.
use crate::ca::{new_identity_id, CertificateAuthority};
use crate::settings::Settings;
use crate::state::model::{now_ms, CaMaterial, ClusterMeta, IdentityRecord};
use crate::state::Command;
use lifeboat_common::identity::{Identity, IdentityInfo};
use lifeboat_common::register::{register, Registration};
use lifeboat_common::{facts, fsutil, passphrase, Role};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where `init` leaves the first command for `run` to propose.
pub fn bootstrap_file(data_dir: &Path) -> PathBuf {
    data_dir.join("private").join("bootstrap.json")
}

pub fn passphrase_file(data_dir: &Path) -> PathBuf {
    data_dir.join("private").join("connection.passphrase")
}

/// Directory of the admin identity `init` makes for the CLI.
pub fn admin_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("admin")
}

/// What the `lifeboat` CLI needs to reach the cluster as an admin.
#[derive(Debug, Serialize, Deserialize)]
pub struct CliContext {
    pub cs: Vec<String>,
    pub identity_dir: PathBuf,
}

pub struct InitOutcome {
    pub passphrase: String,
    pub cluster_id: String,
    pub admin_context: PathBuf,
}

/// Whether `data_dir` already holds a configuration server node (from `init` or `join`).
pub fn holds_node(data_dir: &Path) -> bool {
    Identity::exists(data_dir) || data_dir.join("raft").exists()
}

pub fn init(settings: &Settings) -> anyhow::Result<InitOutcome> {
    let data_dir = &settings.data_dir;
    if holds_node(data_dir) {
        anyhow::bail!(
            "{} already holds a configuration server; start it with `config-server run`",
            data_dir.display()
        );
    }
    fsutil::create_private_dir(data_dir)?;
    fsutil::create_private_dir(&data_dir.join("private"))?;
    let data_dir = &std::fs::canonicalize(data_dir)?;

    let cluster_id = hex::encode(rand::random::<[u8; 6]>());
    let ca = CertificateAuthority::generate(&cluster_id)?;
    let passphrase = passphrase::generate();
    let now = now_ms();
    let addresses = vec![settings.advertise.clone()];

    let mut records = Vec::new();
    for (role, dir, name) in [
        (
            Role::ConfigServer,
            data_dir.clone(),
            settings.advertise.clone(),
        ),
        (Role::Admin, admin_dir(data_dir), "admin".to_string()),
    ] {
        let id = new_identity_id(role);
        let (cert_pem, key_pem) = ca.issue(role, &id)?;
        let node_id = if role == Role::ConfigServer { 1 } else { 0 };
        let identity = Identity {
            info: IdentityInfo {
                id: id.clone(),
                role,
                name: name.clone(),
                cs_addresses: addresses.clone(),
                node_id,
                heartbeat_interval_secs: settings.heartbeat_interval_secs,
            },
            cert_pem,
            key_pem,
            ca_pem: ca.cert_pem().to_string(),
        };
        fsutil::create_private_dir(&dir)?;
        identity.save(&dir)?;
        records.push(IdentityRecord {
            id,
            role,
            name,
            registered_at_ms: now,
            passphrase_generation: 0,
            node_id,
            revoked: None,
            facts: Default::default(),
            last_heartbeat_ms: 0,
            signed_off: false,
        });
    }

    let context = CliContext {
        cs: addresses,
        identity_dir: admin_dir(data_dir),
    };
    let admin_context = admin_dir(data_dir).join("context.toml");
    fsutil::write_private(&admin_context, toml::to_string(&context)?.as_bytes())?;

    let command = Command::Bootstrap {
        meta: ClusterMeta {
            cluster_id: cluster_id.clone(),
            created_at_ms: now,
        },
        ca: CaMaterial {
            cert_pem: ca.cert_pem().to_string(),
            key_pem: ca.key_pem(),
        },
        passphrase: passphrase.clone(),
        identities: records,
    };
    fsutil::write_private(
        &passphrase_file(data_dir),
        format!("{passphrase}\n").as_bytes(),
    )?;
    fsutil::write_private(&bootstrap_file(data_dir), &serde_json::to_vec(&command)?)?;
    Ok(InitOutcome {
        passphrase,
        cluster_id,
        admin_context,
    })
}

/// Registers this node with an existing cluster (role config-server). Its first `run` then
/// asks the leader to add it as a learner and promote it to voter.
pub async fn join(
    settings: &Settings,
    cs: &[String],
    passphrase_path: &Path,
    name: Option<String>,
) -> anyhow::Result<Identity> {
    let data_dir = &settings.data_dir;
    if Identity::exists(data_dir) {
        anyhow::bail!(
            "{} already holds a configuration server identity; start it with `config-server run`",
            data_dir.display()
        );
    }
    let passphrase = lifeboat_common::config::read_passphrase_file(passphrase_path)?;
    fsutil::create_private_dir(data_dir)?;
    let mut facts = facts::base_facts(&settings.advertise, data_dir);
    facts.address = settings.advertise.clone();
    let identity = register(Registration {
        replaces: "",
        cs_addresses: cs,
        passphrase: &passphrase,
        role: Role::ConfigServer,
        name: &name.unwrap_or_else(|| settings.advertise.clone()),
        facts,
    })
    .await?;
    if identity.info.node_id == 0 {
        anyhow::bail!("the cluster did not assign a node id");
    }
    identity.save(data_dir)?;
    fsutil::create_private_dir(&data_dir.join("private"))?;
    fsutil::write_private(
        &passphrase_file(data_dir),
        format!("{passphrase}\n").as_bytes(),
    )?;
    Ok(identity)
}
