//! Components registered again keep their work. After `passphrase regenerate` every component
//! is revoked and registers again (`register --force` in its data directory): the protected
//! machine moves to the new identities, so the master target keeps its replica and replication
//! goes on without a new sync. Another component under a live one's name is refused, and the
//! running one goes on.
use lifeboat_e2e::workload::*;
use lifeboat_e2e::*;

#[test]
fn registering_again_after_a_passphrase_change_keeps_the_machine_protected() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let OneMachine {
        cs,
        ctx,
        source,
        mut ps,
        mut mt,
        mut agent,
    } = OneMachine::start(tmp.path(), tmp.path(), "web01", 64);
    let disk_arg = format!("disk0={}", source.display());
    assert!(
        lifeboat(&ctx, &["protect", "web01", "--policy", "gold", "--wait"])
            .status
            .success()
    );
    let url = format!("nbd://{}/disk0", agent.nbd);
    qemu_io(&url, &["write -P 0x61 0 4M"]);
    caught_up(&ctx, now_ms());

    // A second agent under the machine's name is refused; the machine's agent goes on.
    let other = Component::register_result(
        "mobility-agent",
        "web01",
        &tmp.path().join("elsewhere"),
        &cs,
        &["--disk", &disk_arg],
    );
    assert!(
        !other.status.success() && text(&other).contains("already registered"),
        "{}",
        text(&other)
    );
    qemu_io(&url, &["write -P 0x62 8M 1M"]);

    let out = lifeboat(&ctx, &["passphrase", "regenerate", "--yes"]);
    assert!(out.status.success(), "{}", text(&out));
    for c in [&mut agent, &mut ps, &mut mt] {
        assert!(c.proc().wait(WAIT).is_some(), "{} kept running", c.binary);
    }
    for c in [&ps, &mt, &agent] {
        let out = c.register_again(&cs);
        assert!(out.status.success(), "{}: {}", c.binary, text(&out));
    }
    start_connected(&ctx, &mut ps, &mut mt, &mut agent);
    // Still protected by the same servers, and replicating: no new sync.
    let d = disk_status(&ctx);
    assert_eq!(d["state"], "Protected", "{d}");
    assert_eq!(d["master_target"], "mt1", "{d}");
    wait_until("the agent's export", WAIT, || {
        try_qemu_io(&url, &["read 0 512"]).is_ok()
    });
    qemu_io(&url, &["write -P 0x63 20M 2M"]);
    caught_up(&ctx, now_ms());
    let disk_id = d["disk_id"].as_str().unwrap();
    assert_identical(
        &source,
        &mt.dir.join("replicas").join(disk_id).join("disk.vhd"),
    );
    let log = mt.proc().log_text();
    assert!(!log.contains("deleted"), "{log}");
    assert!(!agent.proc().log_text().contains("initial sync started"));
    for c in [&mut agent, &mut ps, &mut mt] {
        c.proc().terminate();
    }
}
