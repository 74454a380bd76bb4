//! The configuration server's replicated state: what is stored (`model`, `keys`), how it
//! changes (`command`, `apply`) and how it is read (`query`), independent of Raft and of sled.
pub mod apply;
pub mod command;
pub mod groups;
pub mod keys;
pub mod kv;
pub mod model;
pub mod plans;
pub mod protection;
mod protection_apply;
pub mod query;
mod switch_apply;

pub use command::{AuditDraft, Command, CommandResult, LivenessUpdate};
pub use kv::{KvError, KvOp, KvRead};
pub use query::StateReader;
