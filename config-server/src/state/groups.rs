//! Protection groups (DESIGN §7): machines recovered together, whose group-consistent points
//! come from one barrier across all their agents (see `crate::groups`). The record holds the
//! barrier under way, so every node answers heartbeats with its phase.
use super::command::CommandResult;
use super::keys;
use super::kv::{KvError, KvRead, Overlay};
use super::query::StateReader;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProtectionGroup {
    pub name: String,
    pub machines: Vec<String>,
    /// A group-consistent point this often.
    pub every_secs: u64,
    pub created_at_ms: i64,
    /// When the last barrier ended (placed or abandoned).
    #[serde(default)]
    pub last_point_ms: i64,
    #[serde(default)]
    pub barrier: Option<Barrier>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Barrier {
    /// Unix ms when it started; the point's time and part of its tag.
    pub id: i64,
    pub phase: BarrierPhase,
    pub phase_since_ms: i64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum BarrierPhase {
    Prepare,
    Hold,
    Tag,
    Abort,
}

impl BarrierPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            BarrierPhase::Prepare => "prepare",
            BarrierPhase::Hold => "hold",
            BarrierPhase::Tag => "tag",
            BarrierPhase::Abort => "abort",
        }
    }
}

impl ProtectionGroup {
    /// What an agent of the group is told: `phase:id:group`, or nothing.
    pub fn barrier_signal(&self) -> String {
        self.barrier
            .as_ref()
            .map(|b| format!("{}:{}:{}", b.phase.as_str(), b.id, self.name))
            .unwrap_or_default()
    }
}

type Tx<'a, K> = Overlay<'a, K>;

pub(super) fn create_group(
    tx: &mut Tx<'_, impl KvRead>,
    group: &ProtectionGroup,
) -> Result<CommandResult, KvError> {
    let reader = StateReader(&*tx);
    if reader.group(&group.name)?.is_some() {
        return Ok(CommandResult::Refused(format!(
            "group {} exists",
            group.name
        )));
    }
    for name in &group.machines {
        if reader.machine(name)?.is_none() {
            return Ok(CommandResult::NotFound(format!(
                "{name} is not protected; protect it before adding it to a group"
            )));
        }
        if let Some(other) = reader
            .groups()?
            .into_iter()
            .find(|g| g.machines.contains(name))
        {
            return Ok(CommandResult::Refused(format!(
                "{name} is already in group {}",
                other.name
            )));
        }
    }
    tx.writes.put(keys::group(&group.name), group);
    Ok(CommandResult::Done)
}

pub(super) fn delete_group(
    tx: &mut Tx<'_, impl KvRead>,
    name: &str,
) -> Result<CommandResult, KvError> {
    if StateReader(&*tx).group(name)?.is_none() {
        return Ok(CommandResult::NotFound(format!("no group {name}")));
    }
    tx.writes.delete(keys::group(name));
    Ok(CommandResult::Done)
}

pub(super) fn put_barrier(
    tx: &mut Tx<'_, impl KvRead>,
    name: &str,
    barrier: &Option<Barrier>,
    last_point_ms: Option<i64>,
) -> Result<CommandResult, KvError> {
    let Some(mut group) = StateReader(&*tx).group(name)? else {
        return Ok(CommandResult::NotFound(format!("no group {name}")));
    };
    group.barrier = barrier.clone();
    if let Some(at) = last_point_ms {
        group.last_point_ms = at;
    }
    tx.writes.put(keys::group(name), &group);
    Ok(CommandResult::Done)
}
