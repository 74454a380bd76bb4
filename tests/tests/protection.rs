//! The replication control plane with real processes: policies and their failback twins,
//! protecting a registered machine (placement, job, initial state), refusals that change
//! nothing, and unprotecting (the master target frees the disk slots).
use lifeboat_e2e::*;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

fn start_component(
    binary: &'static str,
    name: &str,
    tmp: &Path,
    cs: &CsNode,
    extra: &[&str],
) -> Component {
    let mut c = Component::register(binary, name, tmp, cs, extra);
    c.start();
    c
}

fn ok(context: &Path, args: &[&str]) -> String {
    let out = lifeboat(context, args);
    assert!(out.status.success(), "lifeboat {args:?}: {}", text(&out));
    text(&out)
}

fn fails(context: &Path, args: &[&str], expect: &str) {
    let out = lifeboat(context, args);
    assert!(
        !out.status.success(),
        "lifeboat {args:?} should fail: {}",
        text(&out)
    );
    assert!(
        text(&out).contains(expect),
        "lifeboat {args:?}: expected {expect:?} in {}",
        text(&out)
    );
}

#[test]
fn policies_protect_status_jobs_and_unprotect() {
    let tmp = tempfile::tempdir().unwrap();
    let (cs, _) = CsNode::init(tmp.path().join("cs"));
    let ctx = cs.context();
    let disk0 = tmp.path().join("disk0.img");
    let disk1 = tmp.path().join("disk1.img");
    sparse_disk(&disk0, 32 << 20);
    sparse_disk(&disk1, 16 << 20);
    let d0 = format!("disk0={}", disk0.display());
    let d1 = format!("disk1={}", disk1.display());
    let mut ps = start_component("process-server", "ps1", tmp.path(), &cs, &[]);
    let _mt = start_component("master-target", "mt1", tmp.path(), &cs, &[]);
    let mut agent = start_component(
        "mobility-agent",
        "web01",
        tmp.path(),
        &cs,
        &["--disk", &d0, "--disk", &d1],
    );
    let _bare = start_component("mobility-agent", "bare", tmp.path(), &cs, &[]);
    wait_until("components connected", WAIT, || {
        servers(&ctx, "agent")
            .iter()
            .chain(servers(&ctx, "master-target").iter())
            .filter(|s| s["status"] == "Connected")
            .count()
            == 3
    });
    // A component is found by the name operators know it by, as by its id.
    let shown = lifeboat_json(&ctx, &["servers", "show", "ps1", "--json"]);
    assert_eq!(shown["name"], "ps1", "{shown}");
    let by_id = shown["id"].as_str().unwrap().to_string();
    assert_eq!(
        lifeboat_json(&ctx, &["servers", "show", &by_id, "--json"])["name"],
        "ps1"
    );
    fails(
        &ctx,
        &["servers", "show", "nosuch"],
        "no server with id or name",
    );
    // An empty master target shows every replica slot free; the retention volume's apart.
    let listed = ok(&ctx, &["servers", "list"]);
    assert!(
        listed.contains("30/30 disk slots free (1 more for the retention volume)"),
        "{listed}"
    );

    // Policies come in pairs.
    ok(
        &ctx,
        &[
            "policy",
            "create",
            "gold",
            "--rpo-threshold",
            "15m",
            "--retention",
            "24h",
            "--app-consistent-every",
            "60m",
            "--crash-consistent-every",
            "5m",
        ],
    );
    let list = lifeboat_json(&ctx, &["policy", "list", "--json"]);
    let names: Vec<&str> = list["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["gold", "gold-failback"]);
    let twin = lifeboat_json(&ctx, &["policy", "show", "gold-failback", "--json"]);
    assert_eq!(twin["failback_of"], "gold");
    assert_eq!(twin["rpo_threshold_secs"], 900);
    fails(&ctx, &["policy", "create", "gold"], "already exists");
    fails(&ctx, &["policy", "create", "x-failback"], "reserved");
    fails(
        &ctx,
        &[
            "policy",
            "create",
            "bad",
            "--retention",
            "1m",
            "--crash-consistent-every",
            "5m",
        ],
        "retention",
    );
    // An update changes what it names and nothing else.
    ok(
        &ctx,
        &[
            "policy",
            "update",
            "gold",
            "--crash-consistent-every",
            "10m",
        ],
    );
    ok(
        &ctx,
        &[
            "policy",
            "update",
            "gold",
            "--rpo-threshold",
            "10m",
            "--no-compression",
        ],
    );
    let shown = ok(&ctx, &["policy", "show", "gold"]);
    assert!(
        shown.contains("Failback twin:           gold-failback"),
        "{shown}"
    );
    let shown = ok(&ctx, &["policy", "show", "gold-failback"]);
    assert!(shown.contains("Failback twin of:        gold"), "{shown}");
    let gold = lifeboat_json(&ctx, &["policy", "show", "gold", "--json"]);
    assert_eq!(gold["rpo_threshold_secs"], 600);
    assert_eq!(gold["crash_consistent_every_secs"], 600);
    assert_eq!(gold["retention_secs"], 86400);
    assert_eq!(gold["app_consistent_every_secs"], 3600);
    assert_eq!(gold["compression"], false);
    ok(&ctx, &["policy", "update", "gold", "--compression"]);
    assert_eq!(
        lifeboat_json(&ctx, &["policy", "show", "gold", "--json"])["compression"],
        true
    );
    fails(
        &ctx,
        &["policy", "update", "gold", "--rpo-threshold", "500ms"],
        "whole seconds",
    );
    fails(
        &ctx,
        &["policy", "update", "gold", "--retention", "banana"],
        "write it like",
    );
    fails(
        &ctx,
        &["policy", "update", "gold", "--retention", "99999999999h"],
        "at most 3650 days",
    );
    fails(
        &ctx,
        &["policy", "update", "nosuch", "--retention", "1h"],
        "no policy \"nosuch\"",
    );
    fails(
        &ctx,
        &["policy", "update", "gold"],
        "required arguments were not provided",
    );
    fails(&ctx, &["audit", "--since", "15M"], "M means months");
    assert_eq!(
        lifeboat_json(&ctx, &["policy", "show", "gold", "--json"])["rpo_threshold_secs"],
        600,
        "refused updates change nothing"
    );

    // Refusals change nothing.
    fails(
        &ctx,
        &["protect", "nosuch", "--policy", "gold"],
        "no registered agent",
    );
    fails(
        &ctx,
        &["protect", "web01", "--policy", "nosuch"],
        "no policy",
    );
    fails(
        &ctx,
        &["protect", "bare", "--policy", "gold"],
        "reports no disks",
    );
    // Registered with its disk, never started (protected below).
    let idle_disk = tmp.path().join("idle.img");
    sparse_disk(&idle_disk, 4 << 20);
    let idle_disk = format!("disk0={}", idle_disk.display());
    let _idle = Component::register(
        "mobility-agent",
        "idle01",
        tmp.path(),
        &cs,
        &["--disk", &idle_disk],
    );
    fails(
        &ctx,
        &["protect", "web01", "--policy", "gold", "--mt", "nosuch"],
        "no registered master-target",
    );
    assert!(lifeboat_json(&ctx, &["status", "--json"])["disks"]
        .as_array()
        .unwrap()
        .is_empty());

    // Protect: both disks on one master target, a job, replication under way (Enabling
    // until the components hear of it, which with their long-polls is at once).
    // The failback twin is for replication back after a failover, never chosen by hand.
    fails(
        &ctx,
        &["protect", "web01", "--policy", "gold-failback"],
        "failback twin of gold",
    );
    let out = ok(&ctx, &["protect", "web01", "--policy", "gold"]);
    assert!(
        out.contains("process server ps1, master target mt1"),
        "{out}"
    );
    fails(
        &ctx,
        &["protect", "web01", "--policy", "gold"],
        "already protected",
    );
    let status = lifeboat_json(&ctx, &["status", "--json"]);
    let disks = status["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2);
    for d in disks {
        let state = d["state"].as_str().unwrap();
        assert!(
            ["Enabling", "InitialSync", "Protected"].contains(&state),
            "{state}"
        );
        assert_eq!(d["master_target"], "mt1");
        assert_eq!(d["process_server"], "ps1");
        assert_eq!(d["rpo_threshold_secs"], 600);
    }
    // All jobs: small disks may already be Protected, their job done.
    let jobs: Value = lifeboat_json(&ctx, &["jobs", "--all", "--json"]);
    let job = &jobs["jobs"][0];
    assert_eq!(job["kind"], "protect", "{jobs}");
    assert_eq!(job["target"], "web01");
    assert_eq!(job["steps"][0]["state"], "Succeeded");
    fails(&ctx, &["policy", "delete", "gold"], "used by machine web01");
    // A protected machine moves to another policy without stopping replication.
    ok(
        &ctx,
        &["policy", "create", "silver", "--rpo-threshold", "1h"],
    );
    let out = ok(&ctx, &["policy", "assign", "silver", "web01"]);
    assert!(out.contains("web01 now uses policy silver"), "{out}");
    let status = lifeboat_json(&ctx, &["status", "web01", "--json"]);
    for d in status["disks"].as_array().unwrap() {
        assert_eq!(d["policy"], "silver", "{status}");
        assert_eq!(d["rpo_threshold_secs"], 3600, "{status}");
    }
    fails(&ctx, &["policy", "assign", "nosuch", "web01"], "no policy");
    fails(
        &ctx,
        &["policy", "assign", "silver-failback", "web01"],
        "failback twin of silver",
    );
    fails(
        &ctx,
        &["policy", "assign", "gold", "db99"],
        "no machine named db99",
    );
    ok(&ctx, &["policy", "delete", "gold"]);
    ok(&ctx, &["policy", "create", "gold"]);
    ok(&ctx, &["policy", "assign", "gold", "web01"]);
    ok(&ctx, &["policy", "delete", "silver"]);
    // `wait` returns once the (small) disks are synced; caught up is judged only on reports
    // sent after it began, so with no time to wait it gives up and says why.
    let out = ok(&ctx, &["wait", "web01", "--timeout-secs", "60"]);
    assert!(out.contains("every disk Protected"), "{out}");
    fails(
        &ctx,
        &["wait", "web01", "--caught-up", "--timeout-secs", "0"],
        "has not reported since the wait began",
    );
    fails(&ctx, &["wait", "nosuch"], "no machine named nosuch");
    // A machine whose agent is away replicates nothing, whatever state its disks were left
    // in: `wait` does not report it Protected, and says what to fix. An agent stopped
    // cleanly signs off with its last heartbeat: it shows Disconnected at once, not after
    // three missed heartbeats.
    assert_eq!(agent.proc().terminate(), Some(0));
    let agents = servers(&ctx, "agent");
    let web01 = agents.iter().find(|s| s["name"] == "web01").unwrap();
    assert_eq!(web01["status"], "Disconnected", "{web01}");
    fails(
        &ctx,
        &["wait", "web01", "--timeout-secs", "1"],
        "the agent of web01 is not connected",
    );
    agent.start();
    let out = ok(&ctx, &["wait", "web01", "--timeout-secs", "60"]);
    assert!(out.contains("every disk Protected"), "{out}");
    fails(
        &ctx,
        &["status", "nosuch"],
        "no agent of that name is registered",
    );
    fails(&ctx, &["job", "show", "job-nope"], "NotFound");

    // The master target's free slots account for the placed disks.
    let mt = &servers(&ctx, "master-target")[0];
    assert_eq!(mt["disk_slots_total"], 31);

    // Unprotect: the job finishes once the master target has heartbeated without the disks.
    let out = ok(&ctx, &["unprotect", "web01", "--wait"]);
    assert!(out.contains("disabled"), "{out}");
    let all = lifeboat_json(&ctx, &["jobs", "--all", "--json"]);
    let unprotect = all["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["kind"] == "unprotect")
        .unwrap()
        .clone();
    assert_eq!(unprotect["state"], "Succeeded");
    assert!(lifeboat_json(&ctx, &["status", "--json"])["disks"]
        .as_array()
        .unwrap()
        .is_empty());
    fails(&ctx, &["unprotect", "web01"], "not protected");

    // A machine may be protected before its agent first runs (it registered its disks);
    // the protect job says what it waits for.
    ok(&ctx, &["protect", "idle01", "--policy", "gold"]);
    wait_until("the protect job to say what it waits for", WAIT, || {
        lifeboat_json(&ctx, &["jobs", "--json"])["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| {
                j["kind"] == "protect"
                    && j.to_string()
                        .contains("waiting for the agent of idle01 to connect")
            })
    });
    ok(&ctx, &["unprotect", "idle01", "--wait"]);
    ok(&ctx, &["policy", "delete", "gold"]);
    assert!(
        lifeboat_json(&ctx, &["policy", "list", "--json"])["policies"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // A component that stops heartbeating raises an alert, audited; it clears when it is back.
    assert_eq!(ps.proc().terminate(), Some(0));
    let alert_about_ps = |ctx: &Path| {
        lifeboat_json(ctx, &["alerts", "--json"])["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["subject"] == "process server ps1" && a["severity"] == "critical")
    };
    wait_until("process server down alert", WAIT, || alert_about_ps(&ctx));
    let alerts = lifeboat_json(&ctx, &["alerts", "--json"]);
    assert!(
        alerts.to_string().contains("(signed off: a clean stop)"),
        "a clean stop is told apart from a lost heartbeat: {alerts}"
    );
    ps.start();
    wait_until("alert cleared", WAIT, || !alert_about_ps(&ctx));
    let audit = lifeboat_json(&ctx, &["audit", "--json"]);
    let kinds: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"alert_raised") && kinds.contains(&"alert_cleared"),
        "{kinds:?}"
    );
}
