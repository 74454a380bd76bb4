//! The files under `deploy/` as the tools that consume them see them: `systemd-analyze verify`
//! accepts every unit (pointed at the binaries just built, since it checks that `ExecStart`
//! can run), `systemd-sysusers` and `systemd-tmpfiles` create the account and the state
//! directories in a scratch root, each example configuration is read by its component, and
//! `promtool` accepts the Prometheus configuration, passes the alerting rules' unit tests and
//! parses every query of the Grafana dashboard, and those name only metrics the code publishes.
//! Steps whose tool is missing are skipped with the reason printed.
use lifeboat_e2e::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn have(tool: &str) -> bool {
    let found = Command::new(tool).arg("--version").output().is_ok();
    if !found {
        eprintln!("SKIP: {tool} is not installed (Debian package systemd)");
    }
    found
}

const UNITS: [&str; 4] = [
    "lifeboat-config-server.service",
    "lifeboat-process-server.service",
    "lifeboat-master-target.service",
    "lifeboat-mobility-agent.service",
];

#[test]
fn systemd_analyze_verify_accepts_every_unit() {
    if !have("systemd-analyze") {
        return;
    }
    bin("lifeboat"); // builds the binaries the units start
    let tmp = tempfile::tempdir().unwrap();
    for unit in UNITS {
        let shipped = std::fs::read_to_string(deploy_dir().join("systemd").join(unit)).unwrap();
        assert!(shipped.contains("ExecStart=/usr/local/bin/"), "{unit}");
        let here = shipped.replace(
            "ExecStart=/usr/local/bin/",
            &format!("ExecStart={}/", bin_dir().display()),
        );
        let path = tmp.path().join(unit);
        std::fs::write(&path, here).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .unwrap();
        // verify prints nothing for a clean unit; any line is a finding.
        assert!(
            out.status.success() && text(&out).trim().is_empty(),
            "systemd-analyze verify {unit}: {}",
            text(&out)
        );
    }
    // And it does find faults: a misspelt setting and a missing binary are reported.
    let broken = tmp.path().join("lifeboat-broken.service");
    std::fs::write(
        &broken,
        "[Service]\nExecStart=/nonexistent/process-server run\nRestartSecs=5\n",
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&broken)
        .output()
        .unwrap();
    let said = text(&out);
    assert!(
        said.contains("RestartSecs") && said.contains("/nonexistent"),
        "{said}"
    );
}

#[test]
fn sysusers_and_tmpfiles_make_the_account_and_state_directories() {
    if !have("systemd-sysusers") || !have("systemd-tmpfiles") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    let root_arg = format!("--root={}", root.path().display());
    let sysusers = deploy_dir().join("systemd/lifeboat.sysusers");
    let out = Command::new("systemd-sysusers")
        .arg(&root_arg)
        .arg(&sysusers)
        .output()
        .unwrap();
    assert!(out.status.success(), "systemd-sysusers: {}", text(&out));
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let line = passwd
        .lines()
        .find(|l| l.starts_with("lifeboat:"))
        .unwrap_or_else(|| panic!("no lifeboat account in {passwd}"));
    let uid: u32 = line.split(':').nth(2).unwrap().parse().unwrap();
    assert!(uid > 0 && uid < 1000, "a system account: {line}");

    let tmpfiles = deploy_dir().join("systemd/lifeboat.tmpfiles");
    let out = Command::new("systemd-tmpfiles")
        .arg(&root_arg)
        .arg("--create")
        .arg(&tmpfiles)
        .output()
        .unwrap();
    assert!(out.status.success(), "systemd-tmpfiles: {}", text(&out));
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    for (dir, owner) in [
        ("config-server", uid),
        ("process-server", uid),
        ("master-target", uid),
        ("mobility-agent", 0),
    ] {
        let meta = std::fs::metadata(root.path().join("var/lib/lifeboat").join(dir)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o700, "{dir}");
        if running_as_root() {
            assert_eq!(meta.uid(), owner, "{dir}");
        }
    }
}

/// Whether the tests run as root (only root can give files to another owner).
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    let probe = tempfile::tempfile().unwrap();
    probe.metadata().unwrap().uid() == 0
}

#[test]
fn every_example_configuration_is_read_by_its_component() {
    let tmp = tempfile::tempdir().unwrap();
    for component in [
        "config-server",
        "process-server",
        "master-target",
        "mobility-agent",
    ] {
        let example = deploy_dir().join(format!("config/{component}.toml"));
        let data = tmp.path().join(component).display().to_string();
        let out = run(
            component,
            &[
                "run",
                "--config",
                &example.display().to_string(),
                "--data-dir",
                &data,
            ],
            &[],
        );
        let said = text(&out);
        // The file was read and its settings taken: what stops the run is the missing
        // identity (or, for the agent, the example's disk if this machine has none there).
        assert!(!out.status.success(), "{component}: {said}");
        assert!(
            said.contains("identity in") || said.contains("(/dev/vdb)"),
            "{component} did not get past its configuration file: {said}"
        );
    }
    // A file with a setting of the wrong type is refused before anything else.
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "listen = 9443\n").unwrap();
    let out = run(
        "process-server",
        &["run", "--config", &bad.display().to_string()],
        &[],
    );
    assert!(!out.status.success());
    assert!(!text(&out).contains("identity in"), "{}", text(&out));
}

#[test]
fn promtool_accepts_the_prometheus_files_and_passes_the_rules_tests() {
    if Command::new("promtool").arg("--version").output().is_err() {
        eprintln!("SKIP: promtool is not installed (Debian package prometheus)");
        return;
    }
    let dir = deploy_dir().join("prometheus");
    for args in [
        &["check", "config", "prometheus.yml"][..],
        &["check", "rules", "lifeboat-rules.yml"],
        &["test", "rules", "lifeboat-rules.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "promtool {args:?}: {}", text(&out));
    }
}

/// Every `expr` of the dashboard, as written.
fn dashboard_queries() -> Vec<String> {
    let text =
        std::fs::read_to_string(deploy_dir().join("grafana/lifeboat-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let queries: Vec<String> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    assert!(queries.len() >= panels.len(), "every panel has a query");
    queries
}

#[test]
fn promtool_parses_every_dashboard_query() {
    if Command::new("promtool").arg("--version").output().is_err() {
        eprintln!("SKIP: promtool is not installed (Debian package prometheus)");
        return;
    }
    // promtool checks PromQL inside rule files: one recording rule per query.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in dashboard_queries().iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard_query_{i}\n        expr: {}\n",
            serde_json::to_string(q).unwrap()
        ));
    }
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("dashboard-rules.yml");
    std::fs::write(&path, rules).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "promtool: {}", text(&out));
}

/// Metric names the code publishes: every `"lifeboat_…"` string literal in the workspace.
fn published_metrics() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut names = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            // Sources only: tests mention metric names too, and do not publish them.
            let skip =
                ["target", "tests", "fuzz"].contains(&name.as_str()) || name.starts_with('.');
            if path.is_dir() && !skip {
                dirs.push(path);
            } else if name.ends_with(".rs") {
                let code = std::fs::read_to_string(&path).unwrap_or_default();
                for piece in code.split("\"lifeboat_").skip(1) {
                    let end = piece.find('"').unwrap_or(0);
                    names.push(format!("lifeboat_{}", &piece[..end]));
                }
            }
        }
    }
    names
}

#[test]
fn the_rules_and_the_dashboard_read_only_metrics_the_code_publishes() {
    let published = published_metrics();
    let rules =
        std::fs::read_to_string(deploy_dir().join("prometheus/lifeboat-rules.yml")).unwrap();
    let mut text = dashboard_queries().join("\n");
    text.push_str(&rules);
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if !word.starts_with("lifeboat_") {
            continue;
        }
        // A histogram is published under its name and read through its series.
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| word.strip_suffix(s))
            .filter(|b| published.iter().any(|p| p == b))
            .unwrap_or(word);
        assert!(
            published.iter().any(|p| p == base),
            "{word} is read by deploy/ but published nowhere in the code"
        );
    }
}
