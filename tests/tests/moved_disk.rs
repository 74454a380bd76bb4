//! A protected disk is replicated from the path it was protected from, at the size it had.
//! An agent started with another path for it, or finding it resized, captures nothing for it
//! (writes through its export would otherwise go to a file the workload no longer uses, or a
//! different file would be replicated into the replica) and says so: `status`, `wait` and
//! the alerts name the disk, both paths or sizes, and what to do. Put back as protected,
//! replication goes on where it stood, without a new sync.
use lifeboat_e2e::workload::*;
use lifeboat_e2e::*;

fn stall(ctx: &std::path::Path) -> String {
    disk_status(ctx)["stall"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_disk_moved_or_resized_behind_the_agent_is_refused_loudly_until_put_back() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let OneMachine {
        cs: _cs,
        ctx,
        source,
        mut ps,
        mut mt,
        mut agent,
    } = OneMachine::start(tmp.path(), tmp.path(), "web01", 32);
    let out = lifeboat(&ctx, &["protect", "web01", "--policy", "gold", "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    let url = format!("nbd://{}/disk0", agent.nbd);
    qemu_io(&url, &["write -P 0x41 0 2M"]);
    caught_up(&ctx, now_ms());

    // The operator copies the image elsewhere and points the agent at the copy.
    agent.proc().terminate();
    let moved = tmp.path().join("web01-moved.img");
    std::fs::copy(&source, &moved).unwrap();
    let moved_arg = format!("disk0={}", moved.display());
    agent.set_extra(&["--disk", &moved_arg]);
    agent.start();
    wait_until("status to say the disk moved", WAIT, || {
        let s = stall(&ctx);
        s.contains(&source.display().to_string()) && s.contains(&moved.display().to_string())
    });
    let status = text(&lifeboat(&ctx, &["status"]));
    assert!(
        status.contains("replication waits") && status.contains("unprotect web01"),
        "{status}"
    );
    let waited = lifeboat(&ctx, &["wait", "web01", "--timeout-secs", "3"]);
    assert!(
        !waited.status.success() && text(&waited).contains("cannot capture"),
        "{}",
        text(&waited)
    );
    wait_until("a stall alert", WAIT, || {
        text(&lifeboat(&ctx, &["alerts"])).contains("cannot capture")
    });
    // Nothing is exported for the disk: no write can go astray.
    assert!(try_qemu_io(&url, &["read 0 512"]).is_err());
    assert!(agent.proc().log_text().contains("is protected from"));

    // Pointed back, but the image was resized meanwhile.
    agent.proc().terminate();
    let disk_arg = format!("disk0={}", source.display());
    agent.set_extra(&["--disk", &disk_arg]);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&source)
        .unwrap();
    file.set_len(33 << 20).unwrap();
    agent.start();
    wait_until("status to say the disk was resized", WAIT, || {
        stall(&ctx).contains("was protected at 33554432 bytes")
    });
    assert!(try_qemu_io(&url, &["read 0 512"]).is_err());

    // Put back as protected: replication goes on where it stood.
    file.set_len(32 << 20).unwrap();
    wait_until("the agent's export", WAIT, || {
        try_qemu_io(&url, &["read 0 512"]).is_ok()
    });
    wait_until("the stall to clear", WAIT, || stall(&ctx).is_empty());
    qemu_io(&url, &["write -P 0x42 4M 1M"]);
    caught_up(&ctx, now_ms());
    wait_until("the stall alert to clear", WAIT, || {
        !text(&lifeboat(&ctx, &["alerts"])).contains("cannot capture")
    });
    let d = disk_status(&ctx);
    assert_identical(
        &source,
        &mt.dir
            .join("replicas")
            .join(d["disk_id"].as_str().unwrap())
            .join("disk.vhd"),
    );
    assert!(!agent.proc().log_text().contains("initial sync started"));
    for c in [&mut agent, &mut ps, &mut mt] {
        c.proc().terminate();
    }
}
