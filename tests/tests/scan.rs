//! `scan` capture mode with real processes: another process writes the image file directly
//! (no NBD in between); the agent's periodic scans replicate the changes, and after a scan
//! that started once the writes were done the replica compares identical. A freeze hook makes
//! the scans' recovery points crash-consistent; when it fails the point is marked fuzzy.
use lifeboat_e2e::workload::*;
use lifeboat_e2e::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

const MIB: u64 = 1 << 20;

/// Start time (Unix ms) of the newest scan applied on the master target, and its tag: the
/// machine's newest recovery point, as an operator lists them.
fn last_point(ctx: &Path) -> (i64, String) {
    let out = lifeboat(ctx, &["recovery-points", "legacy01", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let tag = list["points"]
        .as_array()
        .and_then(|points| points.iter().max_by_key(|p| p["time_unix_ms"].as_i64()))
        .and_then(|p| p["id"].as_str())
        .unwrap_or("")
        .to_string();
    let at = tag
        .split(':')
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    (at, tag)
}

/// Waits until a scan that started after `since` is applied; returns its tag.
fn scanned_after(ctx: &Path, since: i64) -> String {
    let mut tag = String::new();
    wait_until("a scan started after the writes, applied", WAIT, || {
        let (at, t) = last_point(ctx);
        tag = t;
        at > since
    });
    tag
}

#[test]
fn scans_replicate_changes_made_by_another_process() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (cs, _) = CsNode::init(tmp.path().join("cs"));
    let ctx = cs.context();
    let source = tmp.path().join("legacy01.img");
    sparse_disk(&source, 128 * MIB);
    let path = source.display().to_string();
    qemu_io(&path, &["write -P 0x5a 0 20M", "write -P 0x6b 100M 3M"]);

    // The freeze hook records its calls, and fails while `fail-freeze` exists.
    let hook_log = tmp.path().join("hook.log");
    let fail = tmp.path().join("fail-freeze");
    let hook = tmp.path().join("freeze-hook.sh");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\necho \"$@\" >> {}\nif [ \"$1\" = freeze ] && [ -e {} ]; then echo cannot freeze >&2; exit 1; fi\n",
            hook_log.display(),
            fail.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();

    let mut ps = Component::register("process-server", "ps1", tmp.path(), &cs, &[]);
    let mut mt = Component::register("master-target", "mt1", tmp.path(), &cs, &[]);
    let disk_arg = format!("disk0={path}");
    let hook_arg = hook.display().to_string();
    let mut agent = Component::register(
        "mobility-agent",
        "legacy01",
        tmp.path(),
        &cs,
        &["--scan-disk", &disk_arg, "--freeze-hook", &hook_arg],
    );
    start_connected(&ctx, &mut ps, &mut mt, &mut agent);
    let policy = [
        "policy",
        "create",
        "scanned",
        "--crash-consistent-every",
        "2s",
        "--app-consistent-every",
        "1h",
    ];
    let out = lifeboat(&ctx, &policy);
    assert!(out.status.success(), "{}", text(&out));
    let out = lifeboat(&ctx, &["protect", "legacy01", "--policy", "scanned"]);
    assert!(out.status.success(), "{}", text(&out));
    // The first scan is the initial sync.
    let out = lifeboat(&ctx, &["jobs", "--watch"]);
    assert!(out.status.success(), "{}", text(&out));
    let disk_id = disk_status(&ctx)["disk_id"].as_str().unwrap().to_string();
    let replica = mt.dir.join("replicas").join(&disk_id).join("disk.vhd");
    scanned_after(&ctx, 0);
    assert_identical(&source, &replica);
    // A scan-mode disk is not exported over NBD.
    let nbd = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 512"])
        .arg(format!("nbd://{}/disk0", agent.nbd))
        .output()
        .unwrap();
    assert!(!nbd.status.success(), "scan-mode disk exported over NBD");

    // Another process changes the image directly: new data, overwrites, zeroes.
    qemu_io(
        &path,
        &[
            "write -P 0x11 50M 1M",
            "write -P 0x22 7 1000",
            "write -z 100M 1M",
            "write -P 0x33 127M 1M",
        ],
    );
    let written = now_ms();
    let tag = scanned_after(&ctx, written);
    assert_identical(&source, &replica);
    assert!(!tag.ends_with(":fuzzy"), "frozen scan tagged {tag}");
    let calls = std::fs::read_to_string(&hook_log).unwrap();
    assert!(
        calls.contains(&format!("freeze disk0 {path}"))
            && calls.contains(&format!("thaw disk0 {path}")),
        "{calls}"
    );

    // The hook fails: scans go on, their points marked fuzzy.
    std::fs::write(&fail, b"").unwrap();
    qemu_io(&path, &["write -P 0x44 60M 2M"]);
    let written = now_ms();
    let tag = scanned_after(&ctx, written);
    assert!(tag.ends_with(":fuzzy"), "unfrozen scan tagged {tag}");
    assert_identical(&source, &replica);

    // The RPO of a scanned disk is the age of its newest applied scan, never zero.
    let d = disk_status(&ctx);
    assert!(d["rpo_secs"].as_f64().unwrap_or(0.0) > 0.0, "{d}");
    assert_eq!(d["state"], "Protected", "{d}");
    assert_eq!(d["capture"], "scan", "{d}");

    // `wait --caught-up` returns once a scan begun after the wait is applied: one that read
    // every write made before it.
    qemu_io(&path, &["write -P 0x55 10M 1M"]);
    let out = lifeboat(
        &ctx,
        &["wait", "legacy01", "--caught-up", "--timeout-secs", "120"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_identical(&source, &replica);
}
