//! Recovery points, test failover and failover with real processes: views of points are
//! bit-identical (`qemu-img compare` over NBD) to copies of the source the test made at those
//! instants; writes into a test view stay out of the replica while replication goes on; an
//! unplanned failover shows the chosen point and runs the hook with the right arguments; a
//! commit folds the point into the replica; a planned failover loses nothing.
use lifeboat_e2e::recovery::*;
use lifeboat_e2e::workload::*;
use lifeboat_e2e::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;
const MACHINE: &str = "db01";

/// Fields drop in order: the processes (whose logs are printed when a test fails) before
/// the directory that holds the logs.
struct Site {
    cs: CsNode,
    ctx: PathBuf,
    _ps: Component,
    mt: Component,
    agent: Component,
    source: PathBuf,
    hook_log: PathBuf,
    tmp: tempfile::TempDir,
}

/// Whether the source's NBD export accepts a write (a fenced source refuses it).
fn takes_a_write(nbd: &str) -> bool {
    Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x99 0 4k"])
        .arg(nbd)
        .output()
        .unwrap()
        .status
        .success()
}

impl Site {
    fn nbd(&self) -> String {
        format!("nbd://{}/disk0", self.agent.nbd)
    }

    fn replica(&self) -> PathBuf {
        let disk_id = disk_status(&self.ctx)["disk_id"]
            .as_str()
            .unwrap()
            .to_string();
        self.mt.dir.join("replicas").join(disk_id).join("disk.vhd")
    }

    fn copy(&self, name: &str) -> PathBuf {
        let to = self.tmp.path().join(name);
        std::fs::copy(&self.source, &to).unwrap();
        to
    }
}

/// A protected machine with one 64 MiB nbd disk, a freeze hook, and a recovery hook that
/// records its arguments; points every second (app every 2 s).
fn site() -> Site {
    let tmp = tempfile::tempdir().unwrap();
    let (cs, _) = CsNode::init(tmp.path().join("cs"));
    let ctx = cs.context();
    let source = tmp.path().join("db01-disk0.img");
    sparse_disk(&source, 64 * MIB);
    let freeze_log = tmp.path().join("freeze.log");
    let freeze = hook_script(tmp.path(), &freeze_log, "freeze.sh");
    let hook_log = tmp.path().join("recovery-hook.log");
    let recovery_hook = hook_script(tmp.path(), &hook_log, "recover.sh");
    let mut ps = Component::register("process-server", "ps1", tmp.path(), &cs, &[]);
    let mut mt = Component::register("master-target", "mt1", tmp.path(), &cs, &[]);
    let disk_arg = format!("disk0={}", source.display());
    let freeze_arg = freeze.display().to_string();
    let mut agent = Component::register(
        "mobility-agent",
        MACHINE,
        tmp.path(),
        &cs,
        &["--disk", &disk_arg, "--freeze-hook", &freeze_arg],
    );
    start_connected(&ctx, &mut ps, &mut mt, &mut agent);
    for role in ["process-server", "master-target"] {
        wait_until(&format!("{role} connected"), WAIT, || {
            servers(&ctx, role)
                .first()
                .is_some_and(|s| s["status"] == "Connected")
        });
    }
    let out = lifeboat(
        &ctx,
        &[
            "policy",
            "create",
            "drill",
            "--crash-consistent-every",
            "1s",
            "--app-consistent-every",
            "2s",
            "--retention",
            "1h",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let hook = format!(
        "{} {{mode}} {{machine}} --net {{network}} {{disks}}",
        recovery_hook.display()
    );
    let out = lifeboat(
        &ctx,
        &[
            "protect",
            MACHINE,
            "--policy",
            "drill",
            "--recovery-hook",
            &hook,
            "--network-map",
            "lan=recovery-lan",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = lifeboat(&ctx, &["jobs", "--watch"]);
    assert!(out.status.success(), "{}", text(&out));
    Site {
        tmp,
        cs,
        ctx,
        _ps: ps,
        mt,
        agent,
        source,
        hook_log,
    }
}

#[test]
fn views_of_points_match_the_source_at_those_instants_and_failover_uses_them() {
    if !have_qemu() {
        return;
    }
    let mut s = site();
    let ctx = s.ctx.clone();
    let nbd = s.nbd();
    // A, then an app-consistent point; B, then a point; C.
    qemu_io(&nbd, &["write -P 0xa1 0 4M", "write -P 0xa2 10M 1M"]);
    let after_a = now_ms();
    let copy_a = s.copy("a.img");
    let point_a = point_after(&ctx, MACHINE, "app", after_a);
    qemu_io(
        &nbd,
        &[
            "write -P 0xb1 2M 4M",
            "write -z 10M 512K",
            "write -P 0xb2 30M 3M",
        ],
    );
    let after_b = now_ms();
    let copy_b = s.copy("b.img");
    let point_b = point_after(&ctx, MACHINE, "", after_b);
    qemu_io(&nbd, &["write -P 0xc1 1M 1M", "write -P 0xc2 60M 4M"]);
    let copy_c = s.copy("c.img");
    let replica = s.replica();
    replica_equals(&copy_c, &replica);
    let freezes = std::fs::read_to_string(s.tmp.path().join("freeze.log")).unwrap();
    assert!(
        freezes.contains(&format!("freeze disk0 {}", s.source.display())),
        "{freezes}"
    );

    // A point that does not exist is refused before any job is made.
    let jobs_before = lifeboat_json(&ctx, &["jobs", "--all", "--json"])["jobs"]
        .as_array()
        .map_or(0, |j| j.len());
    let refused = lifeboat(&ctx, &["test-failover", MACHINE, "--point", "bogus"]);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains("recovery-points"),
        "{}",
        text(&refused)
    );
    let jobs_after = lifeboat_json(&ctx, &["jobs", "--all", "--json"])["jobs"]
        .as_array()
        .map_or(0, |j| j.len());
    assert_eq!(jobs_before, jobs_after);

    for (point, copy) in [
        (&point_a, &copy_a),
        (&point_b, &copy_b),
        (&"latest".to_string(), &copy_c),
    ] {
        let out = recover(&ctx, &["test-failover", MACHINE, "--point", point]);
        assert!(
            compare_nbd(copy, &uri(&out)),
            "view of {point} differs from the source then"
        );
        recover(&ctx, &["test-failover", "cleanup", MACHINE]);
    }

    // A drill while replication goes on: writes into the view stay in it.
    let out = recover(
        &ctx,
        &[
            "test-failover",
            MACHINE,
            "--point",
            &point_b,
            "--materialize",
        ],
    );
    let view = uri(&out);
    let hook = std::fs::read_to_string(&s.hook_log).unwrap();
    assert!(
        hook.contains(&format!("test {MACHINE} --net lan=recovery-lan {view}")),
        "{hook}"
    );
    assert!(hook.contains("mode=test"), "{hook}");
    // When the point was captured, as the hook sees it: this year's RFC 3339 time.
    assert!(hook.contains("point_time=20"), "{hook}");
    let copy = out
        .split_whitespace()
        .find(|w| w.ends_with("disk.vhd)"))
        .map(|w| w.trim_end_matches(')').to_string())
        .unwrap_or_else(|| panic!("no materialised copy in: {out}"));
    assert!(Path::new(&copy).is_absolute(), "{copy}");
    assert_identical(&copy_b, Path::new(&copy));
    qemu_io(&view, &["write -P 0xee 0 1M"]);
    assert!(
        !compare_nbd(&copy_b, &view),
        "a write into the view did not show in it"
    );
    qemu_io(&nbd, &["write -P 0xd1 40M 2M"]);
    replica_equals(&s.source, &replica);
    // Status tells of the drill standing and how to end it.
    let status = text(&lifeboat(&ctx, &["status"]));
    assert!(
        status.contains(&format!("test failover running at point {point_b}"))
            && status.contains(&view)
            && status.contains(&format!("lifeboat test-failover cleanup {MACHINE}")),
        "{status}"
    );
    assert_eq!(
        disk_status(&ctx)["test_failover"]["point"],
        point_b.as_str()
    );
    recover(&ctx, &["test-failover", "cleanup", MACHINE]);
    assert!(disk_status(&ctx)["test_failover"].is_null());
    assert!(
        !Path::new(&copy).exists(),
        "cleanup left the materialised copy"
    );

    let page = http_get(&s.mt.metrics, "/metrics").unwrap();
    assert!(
        metric(&page, "lifeboat_mt_recovery_points") >= 3.0,
        "{page}"
    );
    assert!(metric(&page, "lifeboat_mt_journal_bytes") > 0.0, "{page}");

    // Unplanned failover to B: the view shows B, the hook ran, commit makes B the replica.
    let out = recover(&ctx, &["failover", MACHINE, "--point", &point_b]);
    let failed_over = uri(&out);
    assert!(compare_nbd(&copy_b, &failed_over));
    let hook = std::fs::read_to_string(&s.hook_log).unwrap();
    assert!(
        hook.contains(&format!(
            "failover {MACHINE} --net lan=recovery-lan {failed_over}"
        )),
        "{hook}"
    );
    assert_eq!(disk_status(&ctx)["state"], "FailedOver");
    let status = text(&lifeboat(&ctx, &["status"]));
    assert!(
        status.contains(&format!("lifeboat failover commit {MACHINE}")),
        "{status}"
    );
    // The source is fenced: it must not take writes that are no longer replicated.
    wait_until("source refuses writes", WAIT, || !takes_a_write(&nbd));
    let listed = text(&lifeboat(&ctx, &["recovery-points", MACHINE]));
    assert!(
        listed.contains(&format!("failed over to {point_b}")),
        "{listed}"
    );
    // The recovered machine writes; failing over to another point would discard that, so it
    // takes an explicit flag, and a refusal changes nothing. The same point keeps the writes.
    qemu_io(&failed_over, &["write -P 0x77 5M 1M"]);
    let refused = lifeboat(&ctx, &["failover", MACHINE, "--point", &point_a]);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains("1.0 MiB") && text(&refused).contains("--discard-writes"),
        "{}",
        text(&refused)
    );
    recover(&ctx, &["failover", MACHINE, "--point", &point_b]);
    assert!(
        !compare_nbd(&copy_b, &failed_over),
        "failing over again to the same point lost the recovered machine's write"
    );
    let out = recover(
        &ctx,
        &["failover", MACHINE, "--point", &point_a, "--discard-writes"],
    );
    assert!(compare_nbd(&copy_a, &uri(&out)));
    // Nothing written at A: back to B without the flag.
    recover(&ctx, &["failover", MACHINE, "--point", &point_b]);
    assert!(compare_nbd(&copy_b, &failed_over));
    recover(&ctx, &["failover", "commit", MACHINE]);
    assert_identical(&copy_b, &replica);
    assert!(
        compare_nbd(&copy_b, &failed_over),
        "the committed disk is no longer served"
    );
    // Committed: no points left to list, and a second commit says there is nothing to do.
    let refused = lifeboat(&ctx, &["recovery-points", MACHINE]);
    assert!(
        !refused.status.success() && text(&refused).contains("committed"),
        "{}",
        text(&refused)
    );
    let again = lifeboat(&ctx, &["failover", "commit", MACHINE]);
    assert!(
        !again.status.success() && text(&again).contains("already committed"),
        "{}",
        text(&again)
    );
    // The committed disks are the recovered machine's: unprotecting would delete them, so it
    // takes an explicit flag, and a refusal changes nothing.
    let refused = lifeboat(&ctx, &["unprotect", MACHINE]);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains("--delete-recovered-disks"),
        "{}",
        text(&refused)
    );
    // Protecting it again says the same, not that it is "already protected".
    let refused = lifeboat(&ctx, &["protect", MACHINE, "--policy", "drill"]);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains("failed over")
            && text(&refused).contains("--delete-recovered-disks"),
        "{}",
        text(&refused)
    );
    assert!(
        compare_nbd(&copy_b, &failed_over),
        "a refused unprotect left the recovered disk served"
    );
    recover(
        &ctx,
        &["unprotect", MACHINE, "--delete-recovered-disks", "--wait"],
    );
    s.agent.proc().terminate();
}

/// Kills the master target, then starts `lifeboat failover MACHINE --planned` in the
/// background (its output piped): the final sync waits for the master target.
fn planned_failover_with_the_master_target_away(s: &mut Site) -> std::process::Child {
    s.mt.proc().kill9();
    Command::new(bin("lifeboat"))
        .args(["failover", MACHINE, "--planned"])
        .env("LIFEBOAT_CONTEXT", &s.ctx)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_planned_failover_loses_nothing() {
    if !have_qemu() {
        return;
    }
    let mut s = site();
    let ctx = s.ctx.clone();
    let nbd = s.nbd();
    qemu_io(&nbd, &["write -P 0x31 0 8M", "write -P 0x32 20M 5M"]);
    // The master target is away when the planned failover starts: the final sync asks it
    // again until it is back (rather than failing with the source's writes stopped), and
    // meanwhile status says the source refuses writes.
    let failover = planned_failover_with_the_master_target_away(&mut s);
    wait_until("status to say the source refuses writes", WAIT, || {
        text(&lifeboat(&ctx, &["status"])).contains("refuses writes for a planned failover")
    });
    wait_until(
        "the final sync to ask the master target again",
        WAIT,
        || text(&lifeboat(&ctx, &["jobs", "--json"])).contains("asking again"),
    );
    s.mt.start();
    let done = failover.wait_with_output().unwrap();
    let out = text(&done);
    assert!(done.status.success(), "{out}");
    assert!(out.contains("planned:"), "{out}");
    // Nothing can be written at the source any more, and the failed-over disk is the source.
    assert!(
        !takes_a_write(&nbd),
        "the source took a write after a planned failover"
    );
    let copy = s.copy("final.img");
    assert!(
        compare_nbd(&copy, &uri(&out)),
        "the planned failover lost data"
    );
    // The master target going away now stops the recovered machine's disks, not replication:
    // the alert says so.
    s.mt.proc().kill9();
    let mut alerts = String::new();
    wait_until("the master-target-down alert", WAIT, || {
        alerts = text(&lifeboat(&ctx, &["alerts"]));
        alerts.contains("failed-over machine(s) db01 run from its disks")
    });
    assert!(!alerts.contains("replication of db01 waits"), "{alerts}");
    s.agent.proc().terminate();
}

/// A planned failover cut short by a configuration server crash: its job says it was
/// interrupted (not "Running" for ever), and running the failover again takes the final
/// point the agent placed the first time, instead of waiting for one that never comes.
#[test]
fn an_interrupted_planned_failover_ends_its_job_and_runs_again() {
    if !have_qemu() {
        return;
    }
    let mut s = site();
    let ctx = s.ctx.clone();
    let nbd = s.nbd();
    qemu_io(&nbd, &["write -P 0x41 0 6M"]);
    // The master target is away, so the final sync waits; the configuration server dies.
    let mut failover = planned_failover_with_the_master_target_away(&mut s);
    wait_until("the final sync to wait", WAIT, || {
        text(&lifeboat(&ctx, &["jobs", "--json"])).contains("asking again")
    });
    s.cs.proc.as_mut().unwrap().kill9();
    let _ = failover.kill();
    let _ = failover.wait();
    s.cs.start();
    wait_until("the interrupted job to be failed", WAIT, || {
        let jobs = lifeboat(&ctx, &["jobs", "--all", "--json"]);
        let jobs: serde_json::Value = serde_json::from_slice(&jobs.stdout).unwrap_or_default();
        jobs["jobs"].as_array().is_some_and(|list| {
            list.iter().any(|j| {
                j["kind"] == "failover"
                    && j["state"] == "Failed"
                    && j["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("interrupted"))
            })
        })
    });
    // The source still refuses writes (nothing has resumed them), and a second planned
    // failover completes with what was written before the first.
    assert!(!takes_a_write(&nbd), "the fenced source took a write");
    s.mt.start();
    let out = recover(&ctx, &["failover", MACHINE, "--planned"]);
    assert!(out.contains("planned:"), "{out}");
    let copy = s.copy("final.img");
    assert!(
        compare_nbd(&copy, &uri(&out)),
        "the second planned failover lost data"
    );
    s.agent.proc().terminate();
}
