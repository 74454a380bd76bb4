//! Moving a machine to another process server (`lifeboat switch`, DESIGN §8) with real
//! processes. Writes go on through the agent's NBD export while the machine moves; the move
//! keeps the change stream (no resync), the old process server drops its cache, and after
//! catch-up `qemu-img compare` finds the source and the replica identical. A move away from a
//! process server that is down is refused without `--force`; with it the disk is resynced and
//! converges as well.
use lifeboat_e2e::workload::*;
use lifeboat_e2e::*;
use std::time::Duration;

/// The newest job of `kind`, from `lifeboat jobs --all --json`.
fn newest_job(ctx: &std::path::Path, kind: &str) -> serde_json::Value {
    let jobs = lifeboat_json(ctx, &["jobs", "--all", "--json"]);
    jobs["jobs"]
        .as_array()
        .expect("a list of jobs")
        .iter()
        .filter(|j| j["kind"] == kind)
        .max_by_key(|j| j["created_at_unix_ms"].as_i64().unwrap_or(0))
        .cloned()
        .unwrap_or_else(|| panic!("no {kind} job in {jobs}"))
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn a_machine_moves_to_another_process_server_without_a_resync() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (cs, _) = CsNode::init(tmp.path().join("cs"));
    let ctx = cs.context();
    let source = tmp.path().join("web01.img");
    sparse_disk(&source, 64 << 20);
    qemu_io(&source.display().to_string(), &["write -P 0x11 1M 8M"]);
    let mut ps1 = Component::register("process-server", "ps1", tmp.path(), &cs, &[]);
    let mut ps2 = Component::register("process-server", "ps2", tmp.path(), &cs, &[]);
    let mut mt = Component::register("master-target", "mt1", tmp.path(), &cs, &[]);
    let disk_arg = format!("disk0={}", source.display());
    let mut agent = Component::register(
        "mobility-agent",
        "web01",
        tmp.path(),
        &cs,
        &["--disk", &disk_arg],
    );
    for c in [&mut ps1, &mut ps2, &mut mt, &mut agent] {
        c.start();
    }
    wait_until("components connected", WAIT, || {
        ["agent", "process-server", "master-target"]
            .iter()
            .all(|role| {
                servers(&ctx, role)
                    .iter()
                    .all(|s| s["status"] == "Connected")
            })
            && servers(&ctx, "process-server").len() == 2
    });
    assert!(lifeboat(&ctx, &["policy", "create", "gold"])
        .status
        .success());
    let out = lifeboat(
        &ctx,
        &["protect", "web01", "--policy", "gold", "--ps", "ps1"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = lifeboat(&ctx, &["wait", "web01", "--timeout-secs", "120"]);
    assert!(out.status.success(), "{}", text(&out));
    let disk_id = disk_status(&ctx)["disk_id"].as_str().unwrap().to_string();
    let replica = mt.dir.join("replicas").join(&disk_id).join("disk.vhd");
    let url = format!("nbd://{}/disk0", agent.nbd);
    assert!(ps1.dir.join("cache").join(&disk_id).exists());

    // Batches that only ps1 holds: the master target is down while they are written (and
    // the switch starts only once ps1 has them: still in the agent, they would simply go to
    // ps2 later, and the drain would have nothing to wait for).
    let ingested = |ps: &Component| {
        metric(
            &http_get(&ps.metrics, "/metrics").unwrap_or_default(),
            "lifeboat_ps_ingest_bytes_total",
        )
    };
    mt.proc().kill9();
    let before = ingested(&ps1);
    qemu_io(&url, &["write -P 0x21 20M 2M"]);
    wait_until("ps1 holds the write", WAIT, || {
        ingested(&ps1) >= before + 2.0 * 1048576.0
    });
    let out = lifeboat(&ctx, &["switch", "web01", "--to", "ps2"]);
    assert!(out.status.success(), "{}", text(&out));
    // The move waits for ps1 to forward them; writes go on meanwhile (the agent keeps them).
    let writer = background_writes(&url, 0x30, 24, 1, 6);
    std::thread::sleep(Duration::from_secs(3));
    let job = newest_job(&ctx, "switch");
    assert_eq!(job["state"], "Running", "{job}");
    assert_eq!(job["steps"][0]["state"], "Running", "still draining: {job}");
    assert_eq!(disk_status(&ctx)["switching_to"], "ps2");
    assert_eq!(disk_status(&ctx)["process_server"], "ps1");
    mt.start();
    let out = lifeboat(&ctx, &["jobs", "--watch"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(writer.join().unwrap(), 0, "writes failed during the move");
    let job = newest_job(&ctx, "switch");
    assert_eq!(job["state"], "Succeeded", "{job}");
    let steps = job["steps"].as_array().unwrap();
    assert!(
        steps.iter().all(|s| s["state"] == "Succeeded"),
        "every step ran: {job}"
    );
    assert!(
        !steps[2]["detail"].as_str().unwrap().contains("resync"),
        "{job}"
    );
    assert_eq!(disk_status(&ctx)["process_server"], "ps2");
    wait_until("ps1 drops the disk's cache", WAIT, || {
        !ps1.dir.join("cache").join(&disk_id).exists()
    });

    // Writes after it reach the replica through ps2.
    qemu_io(&url, &["write -P 0x41 40M 3M", "write -z 21M 64k"]);
    caught_up(&ctx, now_ms());
    assert_identical(&source, &replica);
    let agent_metrics = http_get(&agent.metrics, "/metrics").unwrap();
    assert_eq!(
        metric(&agent_metrics, "lifeboat_agent_resync_compared_bytes_total"),
        0.0,
        "the move made the agent resync: {agent_metrics}"
    );
    assert!(ingested(&ps2) > 0.0);

    // A process server that is down cannot forward what it holds: refused, unless --force.
    // What it holds: a write it acknowledged while the master target was down.
    mt.proc().kill9();
    let before = ingested(&ps2);
    qemu_io(&url, &["write -P 0x51 50M 1M"]);
    wait_until("ps2 holds the write", WAIT, || {
        ingested(&ps2) >= before + 1048576.0
    });
    ps2.proc.as_mut().unwrap().kill9();
    mt.start();
    wait_until("ps2 is seen down", WAIT, || {
        servers(&ctx, "process-server")
            .iter()
            .any(|s| s["name"] == "ps2" && s["status"] != "Connected")
    });
    wait_until("the alert says the machines can move", WAIT, || {
        text(&lifeboat(&ctx, &["alerts"])).contains("lifeboat switch")
    });
    let out = lifeboat(&ctx, &["switch", "web01", "--to", "ps1"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("--force"), "{}", text(&out));
    let out = lifeboat(
        &ctx,
        &["switch", "web01", "--to", "ps1", "--force", "--wait"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(newest_job(&ctx, "switch")["state"], "Succeeded");
    qemu_io(&url, &["write -P 0x61 60M 1M"]);
    caught_up(&ctx, now_ms());
    assert_identical(&source, &replica);
    assert_eq!(disk_status(&ctx)["process_server"], "ps1");
    // The lost write was found by comparing the regions written since the replica's
    // position (the dirty map keeps them until applied), not the whole disk.
    let compared = metric(
        &http_get(&agent.metrics, "/metrics").unwrap(),
        "lifeboat_agent_resync_compared_bytes_total",
    );
    assert!(
        compared > 0.0 && compared < (32 << 20) as f64,
        "compared {compared} bytes of a 64 MiB disk"
    );
}

/// The machines of `lifeboat status --json`, with their process server and disk ids.
fn placement(ctx: &std::path::Path) -> Vec<(String, String, String)> {
    lifeboat_json(ctx, &["status", "--json"])["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let s = |k: &str| d[k].as_str().unwrap_or_default().to_string();
            (s("machine"), s("process_server"), s("disk_id"))
        })
        .collect()
}

#[test]
fn load_balance_shows_the_moves_then_makes_them() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (cs, _) = CsNode::init(tmp.path().join("cs"));
    let ctx = cs.context();
    let mut ps1 = Component::register("process-server", "ps1", tmp.path(), &cs, &[]);
    let mut ps2 = Component::register("process-server", "ps2", tmp.path(), &cs, &[]);
    let mut mt = Component::register("master-target", "mt1", tmp.path(), &cs, &[]);
    let mut agents = Vec::new();
    let mut sources = Vec::new();
    for name in ["web01", "web02"] {
        let source = tmp.path().join(format!("{name}.img"));
        sparse_disk(&source, 32 << 20);
        let disk_arg = format!("disk0={}", source.display());
        agents.push(Component::register(
            "mobility-agent",
            name,
            tmp.path(),
            &cs,
            &["--disk", &disk_arg],
        ));
        sources.push(source);
    }
    for c in [&mut ps1, &mut ps2, &mut mt] {
        c.start();
    }
    for a in &mut agents {
        a.start();
    }
    wait_until("components connected", WAIT, || {
        let up = |role: &str, n: usize| {
            let s = servers(&ctx, role);
            s.len() == n && s.iter().all(|s| s["status"] == "Connected")
        };
        up("agent", 2) && up("process-server", 2) && up("master-target", 1)
    });
    assert!(lifeboat(&ctx, &["policy", "create", "gold"])
        .status
        .success());
    for name in ["web01", "web02"] {
        let out = lifeboat(&ctx, &["protect", name, "--policy", "gold", "--ps", "ps1"]);
        assert!(out.status.success(), "{}", text(&out));
        let out = lifeboat(&ctx, &["wait", name, "--timeout-secs", "120"]);
        assert!(out.status.success(), "{}", text(&out));
    }
    // Both machines change at about the same rate, both through ps1.
    for a in &agents {
        qemu_io(
            &format!("nbd://{}/disk0", a.nbd),
            &["write -P 0x71 1M 6M", "write -P 0x72 16M 2M"],
        );
    }
    let plan = || lifeboat_json(&ctx, &["load-balance", "--json"]);
    wait_until("a plan that moves one machine", WAIT, || {
        plan()["moves"].as_array().is_some_and(|m| m.len() == 1)
    });
    let shown = plan();
    let ps1_row = shown["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "ps1")
        .cloned()
        .unwrap();
    assert_eq!(
        (
            ps1_row["machines"].as_u64(),
            ps1_row["machines_after"].as_u64()
        ),
        (Some(2), Some(1)),
        "{shown}"
    );
    assert!(
        ps1_row["change_bytes_per_sec"].as_f64().unwrap() > 0.0,
        "{shown}"
    );
    assert_eq!(shown["moves"][0]["to"], "ps2", "{shown}");
    // Showing the plan moved nothing.
    assert!(placement(&ctx).iter().all(|(_, ps, _)| ps == "ps1"));

    let out = lifeboat(&ctx, &["load-balance", "--apply", "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    let mut on: Vec<String> = placement(&ctx).into_iter().map(|(_, ps, _)| ps).collect();
    on.sort();
    assert_eq!(on, vec!["ps1", "ps2"]);
    let out = lifeboat(&ctx, &["load-balance"]);
    assert!(text(&out).contains("Balanced"), "{}", text(&out));

    // Both replicate on, each through its process server.
    for (a, name) in agents.iter().zip(["web01", "web02"]) {
        qemu_io(&format!("nbd://{}/disk0", a.nbd), &["write -P 0x73 20M 1M"]);
        let out = lifeboat(
            &ctx,
            &["wait", name, "--caught-up", "--timeout-secs", "120"],
        );
        assert!(out.status.success(), "{}", text(&out));
    }
    for (machine, _, disk_id) in placement(&ctx) {
        let source = &sources[if machine == "web01" { 0 } else { 1 }];
        let replica = mt.dir.join("replicas").join(&disk_id).join("disk.vhd");
        assert_identical(source, &replica);
    }
}
