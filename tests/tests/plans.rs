//! Recovery plans with real processes: groups run in order, a script runs after its group, a
//! manual step makes the plan wait until `lifeboat job resume`, a failing script makes it wait
//! until `lifeboat job retry`, and the plan's cleanup removes every test failover.
use lifeboat_e2e::recovery::*;
use lifeboat_e2e::workload::have_qemu;
use lifeboat_e2e::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn script(path: &Path, body: &str) -> String {
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.display().to_string()
}

fn job_id(output: &str) -> String {
    output
        .split_whitespace()
        .find(|w| w.starts_with("job-"))
        .unwrap_or_else(|| panic!("no job id in: {output}"))
        .trim_end_matches(':')
        .to_string()
}

fn job(ctx: &Path, id: &str) -> serde_json::Value {
    lifeboat_json(ctx, &["job", "show", id, "--json"])
}

fn step_states(job: &serde_json::Value) -> Vec<String> {
    job["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_plan_runs_groups_in_order_and_waits_for_the_operator() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let m = Machines::start(
        tmp.path(),
        &["db01", "app01"],
        &[
            "--crash-consistent-every",
            "1s",
            "--app-consistent-every",
            "0s",
        ],
    );
    let ctx = m.ctx.clone();
    let log = tmp.path().join("plan.log");
    let flag = tmp.path().join("fail");
    let check = script(
        &tmp.path().join("check-db.sh"),
        &format!("echo \"check-db $LIFEBOAT_MODE\" >> {}", log.display()),
    );
    let flaky = script(
        &tmp.path().join("smoke.sh"),
        &format!(
            "echo smoke >> {}\nif [ -e {} ]; then echo 'app not answering' >&2; exit 3; fi",
            log.display(),
            flag.display()
        ),
    );
    let out = lifeboat(
        &ctx,
        &[
            "plan",
            "create",
            "erp-plan",
            "--group",
            "1=db01",
            "--group",
            "2=app01",
            "--after",
            "1",
            &format!("script:{check}"),
            "--before",
            "2",
            "manual:Switch DNS",
            "--after",
            "2",
            &format!("script:{flaky}"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    std::fs::write(&flag, b"").unwrap();

    // Group 1 and its script run, then the plan waits at the manual step.
    let out = lifeboat(&ctx, &["plan", "test-failover", "erp-plan"]);
    assert!(out.status.success(), "{}", text(&out));
    let id = job_id(&text(&out));
    let j = job(&ctx, &id);
    assert_eq!(j["state"], "Waiting", "{j}");
    assert_eq!(
        step_states(&j),
        ["Succeeded", "Succeeded", "Waiting", "Pending", "Pending"],
        "{j}"
    );
    // `lifeboat jobs` (without --all) lists it: it waits for the operator.
    let listed = lifeboat_json(&ctx, &["jobs", "--json"]);
    assert!(
        listed["jobs"]
            .as_array()
            .is_some_and(|jobs| jobs.iter().any(|j| j["id"] == id.as_str())),
        "{listed}"
    );
    assert!(text(&out).contains("Switch DNS"), "{}", text(&out));
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "check-db test-failover\n"
    );
    assert!(text(&out).contains("nbd://"), "{}", text(&out));

    // `lifeboat jobs` names the step it waits at.
    let table = text(&lifeboat(&ctx, &["jobs"]));
    assert!(table.contains("Switch DNS"), "{table}");
    // Resumed: group 2 runs, its script fails, the plan waits with the error, and the
    // command following it says so in its exit status.
    let out = lifeboat(&ctx, &["job", "resume", &id]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("waits at a failed step") && text(&out).contains("plan script failed"),
        "{}",
        text(&out)
    );
    let j = job(&ctx, &id);
    assert_eq!(j["state"], "Waiting", "{j}");
    assert_eq!(
        step_states(&j),
        ["Succeeded", "Succeeded", "Succeeded", "Succeeded", "Failed"],
        "{j}"
    );
    assert!(j["error"].as_str().unwrap().contains("retry"), "{j}");
    // Resuming is refused for a job that is not waiting; retry after the fix succeeds.
    std::fs::remove_file(&flag).unwrap();
    let out = lifeboat(&ctx, &["job", "retry", &id]);
    assert!(out.status.success(), "{}", text(&out));
    let j = job(&ctx, &id);
    assert_eq!(j["state"], "Succeeded", "{j}");
    let out = lifeboat(&ctx, &["job", "resume", &id]);
    assert!(
        !out.status.success() && text(&out).contains("not waiting"),
        "{}",
        text(&out)
    );
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "check-db test-failover\nsmoke\nsmoke\n"
    );
    // Both machines are in test failover; the plan's cleanup ends both.
    for name in ["db01", "app01"] {
        let again = lifeboat(&ctx, &["test-failover", name]);
        assert!(
            text(&again).contains("already in a test failover"),
            "{}",
            text(&again)
        );
    }
    let out = lifeboat(&ctx, &["plan", "cleanup", "erp-plan"]);
    assert!(out.status.success(), "{}", text(&out));
    // A second cleanup has nothing to do: refused at once, no job left waiting.
    let again = lifeboat(&ctx, &["plan", "cleanup", "erp-plan"]);
    assert!(
        !again.status.success() && text(&again).contains("nothing to clean up"),
        "{}",
        text(&again)
    );
    // One machine still in a drill: the cleanup passes over the clean one.
    recover(&ctx, &["test-failover", "db01"]);
    let out = recover(&ctx, &["plan", "cleanup", "erp-plan"]);
    assert!(out.contains("app01 has no test failover"), "{out}");
    for name in ["db01", "app01"] {
        let out = recover(&ctx, &["test-failover", name]);
        assert!(out.contains("nbd://"), "{out}");
    }
    // A group number given twice is refused, not merged.
    let dup = lifeboat(
        &ctx,
        &[
            "plan", "create", "dup", "--group", "1=db01", "--group", "1=app01",
        ],
    );
    assert!(
        !dup.status.success() && text(&dup).contains("given twice"),
        "{}",
        text(&dup)
    );
    // Unprotecting a machine the plan names says what that does to the plan.
    let out = recover(&ctx, &["unprotect", "app01"]);
    assert!(
        out.contains("recovery plan erp-plan still names app01"),
        "{out}"
    );
}
