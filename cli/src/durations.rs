//! Durations on the command line (`15m`, `2h 30m`, `90s`, `1day`, `0`), read the same way by
//! every command: whole seconds, and an upper-case `M` refused (humantime reads it as months,
//! which in an RPO, an interval or a `--since` is a typo for minutes).

/// A duration in whole seconds.
pub fn whole_seconds(text: &str) -> Result<u64, String> {
    if text.contains('M') {
        return Err(format!(
            "{text:?}: M means months; write minutes as m (15m), months as month (1month)"
        ));
    }
    let d = humantime::parse_duration(text)
        .map_err(|_| format!("not a duration; write it like 90s, 15m, 2h or 1day ({text:?})"))?;
    if d.subsec_nanos() != 0 {
        return Err(format!(
            "durations count whole seconds; {text} is not a whole number of them"
        ));
    }
    Ok(d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::whole_seconds;

    #[test]
    fn durations_are_whole_seconds_and_m_is_minutes() {
        assert_eq!(whole_seconds("15m"), Ok(900));
        assert_eq!(whole_seconds("2h 30m"), Ok(9000));
        assert_eq!(whole_seconds("0"), Ok(0));
        assert!(whole_seconds("10M").unwrap_err().contains("months"));
        assert!(whole_seconds("1.5s").is_err());
        assert!(whole_seconds("soon").is_err());
    }
}
