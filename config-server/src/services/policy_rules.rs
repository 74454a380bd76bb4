//! The rules a replication policy must follow as an operator writes it (names, durations and
//! how they relate), checked before any policy reaches Raft.
use crate::state::model::now_ms;
use crate::state::protection::Policy;
use lifeboat_proto::v1;
use tonic::Status;

/// Longest duration a policy may give (3650 days, said so in its error): longer is a typo.
const MAX_POLICY_SECS: u64 = 10 * 365 * 86_400;

/// Checks a policy as the operator wrote it.
pub fn policy_from_spec(spec: v1::PolicySpec) -> Result<Policy, Status> {
    if spec.name.is_empty()
        || spec.name.len() > 64
        || !spec
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(Status::invalid_argument(
            "policy names are 1-64 letters, digits, '-' or '_'",
        ));
    }
    // (what, value, whether 0 is allowed: app-consistent points are optional)
    for (what, secs, optional) in [
        ("the RPO threshold", spec.rpo_threshold_secs, false),
        ("the retention window", spec.retention_secs, false),
        (
            "the crash-consistent frequency",
            spec.crash_consistent_every_secs,
            false,
        ),
        (
            "the app-consistent frequency",
            spec.app_consistent_every_secs,
            true,
        ),
    ] {
        if secs == 0 && !optional {
            return Err(Status::invalid_argument(format!(
                "{what} must be at least one second"
            )));
        }
        if secs > MAX_POLICY_SECS {
            return Err(Status::invalid_argument(format!(
                "{what} of {} is longer than a policy may say: at most 3650 days (10 years)",
                secs_text(secs)
            )));
        }
    }
    let retention = secs_text(spec.retention_secs);
    for (what, every) in [
        ("crash-consistent", spec.crash_consistent_every_secs),
        ("app-consistent", spec.app_consistent_every_secs),
    ] {
        if every > spec.retention_secs {
            return Err(Status::invalid_argument(format!(
                "{what} points every {} would not fit the retention window of {retention}: \
                 take them at least once per window, or keep points longer",
                secs_text(every)
            )));
        }
    }
    Ok(Policy {
        name: spec.name,
        rpo_threshold_secs: spec.rpo_threshold_secs,
        retention_secs: spec.retention_secs,
        app_consistent_every_secs: spec.app_consistent_every_secs,
        crash_consistent_every_secs: spec.crash_consistent_every_secs,
        compression: spec.compression,
        failback_of: None,
        created_at_ms: now_ms(),
    })
}

/// A whole number of seconds as an operator writes it (`90m`, `1day 2h`).
fn secs_text(secs: u64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rpo: u64, retention: u64, crash: u64, app: u64) -> v1::PolicySpec {
        v1::PolicySpec {
            name: "gold".into(),
            rpo_threshold_secs: rpo,
            retention_secs: retention,
            crash_consistent_every_secs: crash,
            app_consistent_every_secs: app,
            ..Default::default()
        }
    }

    fn refusal(s: v1::PolicySpec) -> String {
        policy_from_spec(s)
            .err()
            .map(|e| e.message().to_string())
            .unwrap_or_default()
    }

    #[test]
    fn durations_are_checked_one_by_one_and_against_the_window() {
        assert!(policy_from_spec(spec(900, 86_400, 300, 3_600)).is_ok());
        assert!(refusal(spec(0, 86_400, 300, 0)).contains("at least one second"));
        assert!(refusal(spec(900, MAX_POLICY_SECS + 1, 300, 0)).contains("at most 3650 days"));
        assert!(refusal(spec(900, 3_600, 300, 7_200)).contains("would not fit"));
        let mut bad = spec(900, 86_400, 300, 0);
        bad.name = "no spaces".into();
        assert!(refusal(bad).contains("policy names"));
    }
}
