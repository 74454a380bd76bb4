//! Presentation helpers: tables, ages, byte sizes, role names.
use comfy_table::{presets::NOTHING, ContentArrangement, Table};
use lifeboat_common::Role;

pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.iter().copied());
    t
}

/// "12s ago", "3m ago", "never".
pub fn age(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return "never".into();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let secs = ((now - unix_ms).max(0) / 1000) as u64;
    let d = std::time::Duration::from_secs(secs);
    format!(
        "{} ago",
        humantime::format_duration(d)
            .to_string()
            .split(' ')
            .next()
            .unwrap_or("0s")
    )
}

/// RFC 3339 time of a Unix-milliseconds timestamp.
pub fn time(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return "-".into();
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// An RPO in seconds to a tenth, for a disk with `pending_bytes` waiting: with a backlog it is
/// never shown as 0 (a write captured 40 ms ago is not on the replica yet), but as `<0.1`.
pub fn rpo(secs: f64, pending_bytes: u64) -> String {
    if pending_bytes > 0 && secs < 0.05 {
        "<0.1".into()
    } else {
        format!("{secs:.1}")
    }
}

/// The RPO column of `status`: the figure in seconds, marked when over the policy's
/// threshold; `-` where there is no RPO to speak of — a failed-over disk no longer
/// replicates, and no replica is usable before the initial sync ends (SYNC and ETA say how
/// far that is; the figure would be the age of the oldest unapplied read, 0.0 at the start).
pub fn rpo_cell(state: &str, secs: f64, pending_bytes: u64, over_threshold: bool) -> String {
    if matches!(state, "FailedOver" | "Enabling" | "InitialSync") {
        return "-".into();
    }
    let mark = if over_threshold {
        " (over threshold!)"
    } else {
        ""
    };
    format!("{}s{mark}", rpo(secs, pending_bytes))
}

pub fn role_name(proto_role: i32) -> &'static str {
    Role::from_proto(proto_role)
        .map(Role::as_str)
        .unwrap_or("unknown")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_rpo_beside_a_backlog_is_never_zero() {
        assert_eq!(rpo(0.0, 0), "0.0");
        assert_eq!(rpo(0.04, 576 << 10), "<0.1");
        assert_eq!(rpo(0.06, 576 << 10), "0.1");
        assert_eq!(rpo(12.34, 1), "12.3");
    }

    #[test]
    fn no_rpo_before_the_initial_sync_ends_or_after_failover() {
        assert_eq!(rpo_cell("InitialSync", 0.0, 1 << 20, false), "-");
        assert_eq!(rpo_cell("FailedOver", 0.0, 0, false), "-");
        assert_eq!(rpo_cell("Enabling", 0.0, 0, false), "-");
        assert_eq!(rpo_cell("Protected", 0.0, 0, false), "0.0s");
        assert_eq!(
            rpo_cell("Resync", 930.0, 1, true),
            "930.0s (over threshold!)"
        );
    }

    #[test]
    fn sizes_read_naturally() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }
}
