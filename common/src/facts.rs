//! Facts a component reports about itself: host name, operating system, free space.
use lifeboat_proto::v1;
use std::path::Path;

/// Version of this Lifeboat build, reported in every heartbeat.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The phase of an agent's report of a disk it is assigned but cannot capture (its source
/// moved, changed size or cannot be opened); the report's `error` says why.
pub const CANNOT_CAPTURE_PHASE: &str = "stopped";

pub fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

pub fn os() -> String {
    let uts = rustix::system::uname();
    format!(
        "{} {}",
        uts.sysname().to_string_lossy(),
        uts.release().to_string_lossy()
    )
}

/// Space a master target always leaves free on its replica file system: below it batches are
/// refused (the process server keeps them) instead of failing half-written or eating the
/// retention. Here because the configuration server's retention-space alerts judge by it too.
pub const MT_SPACE_RESERVE: u64 = 256 * 1024 * 1024;

/// (free, total) bytes of the file system holding `path`; zeros if it cannot be read.
pub fn space(path: &Path) -> (u64, u64) {
    match rustix::fs::statvfs(path) {
        Ok(s) => (
            s.f_bavail.saturating_mul(s.f_frsize),
            s.f_blocks.saturating_mul(s.f_frsize),
        ),
        Err(_) => (0, 0),
    }
}

/// Facts common to every component; callers fill in role-specific fields.
pub fn base_facts(address: &str, data_dir: &Path) -> v1::ComponentFacts {
    let (free_bytes, total_bytes) = space(data_dir);
    v1::ComponentFacts {
        version: VERSION.to_string(),
        address: address.to_string(),
        hostname: hostname(),
        os: os(),
        data_dir: data_dir.display().to_string(),
        free_bytes,
        total_bytes,
        ..Default::default()
    }
}
