//! Continuous replication end to end with real processes: a workload (`qemu-io`, a real NBD
//! client) writes through the agent's NBD export during and after the initial sync, and after
//! catch-up `qemu-img compare` finds the source and the replica VHD identical — also after
//! kill -9 of the process server and of the master target while writes flow.
use lifeboat_e2e::workload::*;
use lifeboat_e2e::*;
use std::process::Command;
use std::time::Duration;

#[test]
fn writes_through_the_nbd_export_reach_an_identical_replica_across_crashes() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (cs, _) = CsNode::init(tmp.path().join("cs"));
    let ctx = cs.context();
    let source = tmp.path().join("web01.img");
    sparse_disk(&source, 256 << 20);
    // Data present before protection: the initial sync must carry it.
    qemu_io(
        &source.display().to_string(),
        &["write -P 0x5a 1M 40M", "write -P 0x33 200M 8M"],
    );

    let mut ps = Component::register("process-server", "ps1", tmp.path(), &cs, &[]);
    let mut mt = Component::register("master-target", "mt1", tmp.path(), &cs, &[]);
    let disk_arg = format!("disk0={}", source.display());
    let mut agent = Component::register(
        "mobility-agent",
        "web01",
        tmp.path(),
        &cs,
        &["--disk", &disk_arg],
    );
    let nbd = agent.nbd.clone();
    ps.start();
    mt.start();
    agent.start();
    wait_until("components connected", WAIT, || {
        servers(&ctx, "agent")
            .first()
            .is_some_and(|a| a["status"] == "Connected")
    });
    assert!(lifeboat(&ctx, &["policy", "create", "gold"])
        .status
        .success());
    let out = lifeboat(&ctx, &["protect", "web01", "--policy", "gold"]);
    assert!(out.status.success(), "{}", text(&out));
    let url = format!("nbd://{nbd}/disk0");

    // Writes during the initial sync (the export appears with the assignment).
    wait_until("NBD export", WAIT, || {
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read 0 512", &url])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    qemu_io(
        &url,
        &[
            "write -P 0xa1 4M 4M",
            "write -P 0xa2 100M 1M",
            "write -z 1M 64k",
        ],
    );
    let out = lifeboat(&ctx, &["jobs", "--watch"]);
    assert!(out.status.success(), "{}", text(&out));
    let status = lifeboat_json(&ctx, &["status", "--json"]);
    let disk_id = status["disks"][0]["disk_id"].as_str().unwrap().to_string();
    let replica = mt.dir.join("replicas").join(&disk_id).join("disk.vhd");

    // Writes after it, unaligned ones included.
    qemu_io(
        &url,
        &[
            "write -P 0xb1 7 1000",
            "write -P 0xb2 255M 1M",
            "write -P 0xb3 130M 3M",
            "write -z 200M 4M",
        ],
    );
    // `lifeboat wait --caught-up` returns only once these writes are on the replica.
    let out = lifeboat(
        &ctx,
        &["wait", "web01", "--caught-up", "--timeout-secs", "120"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("nothing pending"), "{}", text(&out));
    assert_identical(&source, &replica);

    // kill -9 of the process server while writes flow.
    let writer = background_writes(&url, 0x40, 10, 3, 20);
    std::thread::sleep(Duration::from_millis(300));
    ps.proc.as_mut().unwrap().kill9();
    writer.join().unwrap();
    ps.start();
    qemu_io(&url, &["write -P 0xc1 150M 2M"]);
    caught_up(&ctx, now_ms());
    assert_identical(&source, &replica);

    // kill -9 of the master target while writes flow.
    let writer = background_writes(&url, 0x60, 60, 2, 20);
    std::thread::sleep(Duration::from_millis(300));
    mt.proc.as_mut().unwrap().kill9();
    qemu_check_vpc(&replica);
    writer.join().unwrap();
    // Status and alerts say which server replication waits for.
    wait_until("status shows the master target down", WAIT, || {
        text(&lifeboat(&ctx, &["status"])).contains("mt1 (down)")
    });
    wait_until("an alert names the waiting machine", WAIT, || {
        text(&lifeboat(&ctx, &["alerts"])).contains("replication of web01 waits for it")
    });
    mt.start();
    qemu_io(&url, &["write -P 0xd1 170M 2M"]);
    caught_up(&ctx, now_ms());
    assert_identical(&source, &replica);

    // The agent and the configuration server publish the lag.
    let agent_metrics = http_get(&agent.metrics, "/metrics").unwrap();
    assert!(
        agent_metrics.contains("lifeboat_disk_rpo_seconds"),
        "{agent_metrics}"
    );
    wait_until("CS lag metrics", WAIT, || {
        http_get(&cs.metrics, "/metrics").is_ok_and(|m| {
            m.contains("lifeboat_disk_pending_bytes{machine=\"web01\",disk=\"disk0\"} 0\n")
        })
    });

    // SIGTERM with the replication streams open (agent → process server → master target):
    // each server stops cleanly (exit 0) instead of waiting for streams only clients end;
    // `terminate` gives up after 30 s. Then both come back and replication goes on.
    for server in [&mut ps, &mut mt] {
        let name = server.proc().name.clone();
        assert_eq!(server.proc().terminate(), Some(0), "{name} on SIGTERM");
    }
    ps.start();
    mt.start();
    qemu_io(&url, &["write -P 0xd2 180M 1M"]);
    caught_up(&ctx, now_ms());
    assert_identical(&source, &replica);

    // Unprotect: the master target deletes the replica and the export goes away.
    let out = lifeboat(&ctx, &["unprotect", "web01", "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_until("replica deleted", WAIT, || !replica.exists());
    wait_until("export removed", WAIT, || {
        !Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read 0 512", &url])
            .output()
            .is_ok_and(|o| o.status.success())
    });
}
