//! Group-consistent recovery points with real processes: two machines, each with its own
//! agent, in one protection group; the configuration server's barrier places one point on
//! both, and each machine's view of that point equals its source as it was at the barrier.
use lifeboat_e2e::recovery::*;
use lifeboat_e2e::workload::*;
use lifeboat_e2e::*;
use std::path::PathBuf;

#[test]
fn a_group_point_shows_every_machine_as_it_was_at_the_barrier() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let m = Machines::start(
        tmp.path(),
        &["db01", "app01"],
        &[
            "--crash-consistent-every",
            "1h",
            "--app-consistent-every",
            "0s",
        ],
    );
    let ctx = m.ctx.clone();
    let out = lifeboat(
        &ctx,
        &[
            "group",
            "create",
            "erp",
            "--machines",
            "db01,app01",
            "--every",
            "2s",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    // A group must be made of protected machines, each in one group only.
    let out = lifeboat(&ctx, &["group", "create", "other", "--machines", "db01"]);
    assert!(
        !out.status.success() && text(&out).contains("already in group erp"),
        "{}",
        text(&out)
    );

    // Both machines write; the writes stop; copies are made; a group point after that.
    for i in 0..2 {
        let uri = m.nbd(i);
        let pattern = format!("write -P {} 0 3M", 0x40 + i);
        qemu_io(&uri, &[pattern.as_str(), "write -P 0x77 20M 1M"]);
    }
    let copies: Vec<PathBuf> = m
        .sources
        .iter()
        .map(|s| {
            let to = s.with_extension("copy");
            std::fs::copy(s, &to).unwrap();
            to
        })
        .collect();
    let after = now_ms();
    let point = point_after(&ctx, "db01", "group", after);
    assert!(
        point.starts_with("group:") && point.ends_with(":erp"),
        "{point}"
    );
    // The same point is listed for the other machine.
    wait_until("the group point on app01 too", WAIT, || {
        points(&ctx, "app01")
            .iter()
            .any(|p| p["id"] == point.as_str())
    });
    // Writes after the point do not show in its views.
    for i in 0..2 {
        qemu_io(&m.nbd(i), &["write -P 0x99 1M 1M"]);
    }
    // (Points keep coming every 2 s, so the point is named; `latest-group` picks the newest.)
    for (name, copy) in ["db01", "app01"].iter().zip(&copies) {
        let out = recover(&ctx, &["test-failover", name, "--point", &point]);
        assert!(out.contains(&point), "{out}");
        assert!(
            compare_nbd(copy, &uri(&out)),
            "{name}'s view of the group point differs"
        );
        recover(&ctx, &["test-failover", "cleanup", name]);
    }
    let page = http_get(&m.agents[0].metrics, "/metrics").unwrap();
    assert!(
        metric(&page, "lifeboat_agent_points_total") >= 1.0,
        "{page}"
    );
}
