//! Replication that survives, with real processes: kill -9 of the agent under writes is
//! followed by a resync that ships only the blocks that differ, and a process server with a
//! tiny cache quota slows its agent, lets it fall back to dirty-region tracking, and recovers
//! through a resync — each ending in a `qemu-img compare` that finds the replica identical.
use lifeboat_e2e::workload::*;
use lifeboat_e2e::*;
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;

struct Setup {
    tmp: tempfile::TempDir,
    cs: CsNode,
    ps: Component,
    mt: Component,
    agent: Component,
    source: std::path::PathBuf,
    url: String,
}

impl Setup {
    /// A stack with one protected machine whose `size`-byte disk holds 0x5a in its first
    /// `data` bytes; returns once the initial sync is done.
    fn protected(
        size: u64,
        data: u64,
        ps_config: &str,
        agent_flags: &[&str],
        policy_flags: &[&str],
    ) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let (cs, _) = CsNode::init(tmp.path().join("cs"));
        let ctx = cs.context();
        let source = tmp.path().join("db01.img");
        sparse_disk(&source, size);
        qemu_io(
            &source.display().to_string(),
            &[format!("write -P 0x5a 0 {data}")],
        );
        let ps_args: Vec<String> = if ps_config.is_empty() {
            Vec::new()
        } else {
            let path = tmp.path().join("ps.toml");
            std::fs::write(&path, ps_config).unwrap();
            vec!["--config".into(), path.display().to_string()]
        };
        let ps_args: Vec<&str> = ps_args.iter().map(String::as_str).collect();
        let mut ps = Component::register("process-server", "ps1", tmp.path(), &cs, &ps_args);
        let mut mt = Component::register("master-target", "mt1", tmp.path(), &cs, &[]);
        let disk_arg = format!("disk0={}", source.display());
        let mut flags = vec!["--disk", &disk_arg];
        flags.extend(agent_flags);
        let mut agent = Component::register("mobility-agent", "db01", tmp.path(), &cs, &flags);
        start_connected(&ctx, &mut ps, &mut mt, &mut agent);
        let mut policy = vec!["policy", "create", "gold", "--rpo-threshold", "15m"];
        policy.extend(policy_flags);
        assert!(lifeboat(&ctx, &policy).status.success());
        let out = lifeboat(&ctx, &["protect", "db01", "--policy", "gold"]);
        assert!(out.status.success(), "{}", text(&out));
        let out = lifeboat(&ctx, &["jobs", "--watch"]);
        assert!(out.status.success(), "{}", text(&out));
        let url = format!("nbd://{}/disk0", agent.nbd);
        Setup {
            tmp,
            cs,
            ps,
            mt,
            agent,
            source,
            url,
        }
    }

    fn replica(&self) -> std::path::PathBuf {
        let disk_id = disk_status(&self.cs.context())["disk_id"]
            .as_str()
            .unwrap()
            .to_string();
        self.mt.dir.join("replicas").join(disk_id).join("disk.vhd")
    }
}

#[test]
fn agent_killed_under_writes_resyncs_only_what_differs() {
    if !have_qemu() {
        return;
    }
    let size = 512 * MIB;
    let mut s = Setup::protected(size, 200 * MIB, "", &[], &[]);
    let ctx = s.cs.context();
    let replica = s.replica();

    // kill -9 while a writer is busy and the process server is paused, so nothing the writer
    // sends becomes durable downstream: the agent's dirty map is all that remembers it.
    let ps_pid = s.ps.proc().pid();
    signal("STOP", ps_pid);
    let url = s.url.clone();
    let writer = std::thread::spawn(move || {
        for i in 0..24u64 {
            let cmd = format!("write -P {} {}M 1M", 0x10 + i, 10 + i * 13);
            let _ = Command::new("qemu-io")
                .args(["-f", "raw", "-c", &cmd, &url])
                .output();
        }
    });
    std::thread::sleep(Duration::from_millis(1500));
    s.agent.proc().kill9();
    writer.join().unwrap();
    signal("CONT", ps_pid);

    s.agent.start();
    wait_until("ResyncRequired or Resyncing reported", WAIT, || {
        let d = disk_status(&ctx);
        d["state"] == "ResyncRequired" || d["state"] == "Resyncing" || {
            // A fast resync may finish between two looks: the agent's log shows it ran.
            s.agent.proc().log_text().contains("resync started")
        }
    });
    // Writes continue during the resync.
    qemu_io(&s.url, &["write -P 0x99 400M 1M"]);
    let t = now_ms();
    caught_up(&ctx, t);
    assert_identical(&s.source, &replica);

    let page = http_get(&s.agent.metrics, "/metrics").unwrap();
    let compared = metric(&page, "lifeboat_agent_resync_compared_bytes_total");
    let shipped = metric(&page, "lifeboat_agent_shipped_bytes_total");
    assert!(compared > 0.0, "the resync compared nothing:\n{page}");
    assert!(
        compared < (size / 2) as f64,
        "the resync compared {compared} bytes of a {size}-byte disk"
    );
    assert!(
        shipped < (size / 8) as f64,
        "after the restart the agent shipped {shipped} bytes of a {size}-byte disk"
    );
    let log = s.agent.proc().log_text();
    assert!(log.contains("resync complete"), "{log}");

    // The disk is written while the agent is stopped (nothing captures it): the operator asks
    // for a full resync, which compares every block and ships only what changed.
    assert_eq!(s.agent.proc().terminate(), Some(0));
    qemu_io(
        &s.source.display().to_string(),
        &["write -P 0x7e 450M 640k", "write -z 20M 64k"],
    );
    let out = run(
        "mobility-agent",
        &[
            "mark-for-resync",
            "--data-dir",
            &s.agent.dir.display().to_string(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    s.agent.start();
    wait_until("full resync finished", WAIT, || {
        s.agent.proc().log_text().contains("resync complete")
    });
    let t = now_ms();
    caught_up(&ctx, t);
    assert_identical(&s.source, &replica);
    let page = http_get(&s.agent.metrics, "/metrics").unwrap();
    assert_eq!(
        metric(&page, "lifeboat_agent_resync_compared_bytes_total"),
        size as f64,
        "a full resync compares the whole disk"
    );
    let shipped = metric(&page, "lifeboat_agent_resync_shipped_bytes_total");
    assert!(
        shipped >= (640 << 10) as f64 && shipped <= (4 << 20) as f64,
        "the full resync shipped {shipped} bytes for 704 KiB of changes"
    );
    let history = lifeboat(&ctx, &["status", "db01"]);
    assert!(history.status.success(), "{}", text(&history));
    drop(s.tmp);
}

#[test]
fn a_full_process_server_cache_slows_the_agent_then_recovers_through_a_resync() {
    if !have_qemu() {
        return;
    }
    let size = 256 * MIB;
    let mut s = Setup::protected(
        size,
        16 * MIB,
        // Buffered writes here (direct is the default, and every other test's): this test
        // reads the most back from the cache file.
        "cache_quota_mib = 24\ncache_direct_io = false\n",
        &[
            "--capture-queue-mib",
            "8",
            "--spill-mib",
            "16",
            "--throttle-wait-secs",
            "2",
        ],
        // Patterns compress to nothing; stored as they are they fill the cache.
        &["--no-compression"],
    );
    let ctx = s.cs.context();
    let replica = s.replica();

    // The master target stops taking data (as if its link stalled): the cache fills.
    let mt_pid = s.mt.proc().pid();
    signal("STOP", mt_pid);
    burst(&s.url, 160);
    wait_until("ResyncRequired", WAIT, || {
        disk_status(&ctx)["state"] == "ResyncRequired"
    });
    let d = disk_status(&ctx);
    assert!(
        d["state_reason"]
            .as_str()
            .unwrap_or("")
            .contains("could not keep up"),
        "{d}"
    );
    wait_until("cache alert", WAIT, || {
        let alerts = lifeboat(&ctx, &["alerts", "--json"]);
        let a = text(&alerts);
        a.contains("quota") && a.contains("process server ps1")
    });
    let agent_page = http_get(&s.agent.metrics, "/metrics").unwrap();
    assert!(
        metric(&agent_page, "lifeboat_agent_throttled_writes_total") >= 1.0,
        "flow control never made a write wait:\n{agent_page}"
    );
    assert!(metric(&agent_page, "lifeboat_agent_stream_breaks_total") >= 1.0);

    // The link comes back: the cache drains, the resync runs, the disk is Protected again.
    signal("CONT", mt_pid);
    let t = now_ms();
    caught_up(&ctx, t);
    assert_identical(&s.source, &replica);
    let ps_page = http_get(&s.ps.metrics, "/metrics").unwrap();
    assert!(
        metric(&ps_page, "lifeboat_ps_cache_full_seconds_total")
            + metric(&ps_page, "lifeboat_ps_flow_control_delays_total")
            >= 1.0,
        "the process server never held or slowed a stream:\n{ps_page}"
    );
    wait_until("cache alerts cleared", WAIT, || {
        !text(&lifeboat(&ctx, &["alerts", "--json"])).contains("quota")
    });
}

#[test]
fn a_burst_beyond_the_capture_queue_spills_to_disk_and_ships_without_a_resync() {
    if !have_qemu() {
        return;
    }
    let size = 256 * MIB;
    let mut s = Setup::protected(
        size,
        16 * MIB,
        "",
        &["--capture-queue-mib", "8", "--throttle-wait-secs", "2"],
        &["--no-compression"],
    );
    let ctx = s.cs.context();
    let replica = s.replica();

    // The process server stalls: the agent keeps 64 MiB unacknowledged, then 8 MiB in
    // memory, and the rest of the burst goes to its spill file instead of making the
    // workload wait (and, after 2 s, breaking the stream).
    let ps_pid = s.ps.proc().pid();
    signal("STOP", ps_pid);
    burst(&s.url, 128);
    let agent_page = http_get(&s.agent.metrics, "/metrics").unwrap();
    signal("CONT", ps_pid);
    assert!(
        metric(&agent_page, "lifeboat_agent_spilled_bytes_total") >= (16 * MIB) as f64,
        "the burst was not spilled:\n{agent_page}"
    );
    let t = now_ms();
    caught_up(&ctx, t);
    assert_identical(&s.source, &replica);
    let agent_page = http_get(&s.agent.metrics, "/metrics").unwrap();
    assert_eq!(
        metric(&agent_page, "lifeboat_agent_stream_breaks_total"),
        0.0,
        "the stream broke:\n{agent_page}"
    );
    assert_eq!(
        metric(&agent_page, "lifeboat_agent_resync_compared_bytes_total"),
        0.0,
        "a resync ran"
    );
    assert!(
        spill_files(&s.agent.dir).is_empty(),
        "the spill file kept data after everything shipped"
    );
}

/// `mib` patterned 1 MiB writes from 32 MiB on, through the export at `url`.
fn burst(url: &str, mib: u64) {
    let commands: Vec<String> = (0..mib)
        .map(|i| format!("write -P {} {}M 1M", 0x20 + i % 200, 32 + i))
        .collect();
    qemu_io(url, &commands);
}

/// Spill files under an agent's data directory that still hold data.
fn spill_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().is_some_and(|n| n == "capture.spill")
                && std::fs::metadata(&path).is_ok_and(|m| m.len() > 0)
            {
                found.push(path);
            }
        }
    }
    found
}
