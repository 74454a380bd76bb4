//! `deploy/compose/two-sites.yaml` as an operator runs it with `docker-compose`: three
//! configuration server nodes across two sites, a process server and a master target at each,
//! and an agent. `up` brings everything up and every component connects; a machine protected
//! from site A to site B replicates what a real NBD client writes, identical after catch-up;
//! `up` again changes nothing (no component registers twice); the passphrase is in no log. Skips, saying why, where no
//! Docker engine or no docker-compose is there.
use lifeboat_e2e::site::{build_image, docker, docker_ok, have_docker};
use lifeboat_e2e::workload::{have_qemu, qemu_io, WAIT};
use lifeboat_e2e::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// One compose project of the two-sites file; taken down with its volumes when dropped.
struct Project {
    name: String,
    image: String,
    disks: PathBuf,
}

impl Project {
    fn compose(&self, args: &[&str]) -> Output {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/compose/two-sites.yaml");
        Command::new("docker-compose")
            .arg("-p")
            .arg(&self.name)
            .arg("-f")
            .arg(file)
            .args(args)
            .env("LIFEBOAT_IMAGE", &self.image)
            .env("LIFEBOAT_DISKS", &self.disks)
            .output()
            .expect("run docker-compose")
    }

    fn compose_ok(&self, args: &[&str]) -> String {
        let out = self.compose(args);
        assert!(
            out.status.success(),
            "docker-compose {args:?}: {}",
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// `lifeboat ARGS --json` through the file's CLI service, parsed; `None` if it failed.
    fn cli_json(&self, args: &[&str]) -> Option<serde_json::Value> {
        let mut argv = vec!["run", "--rm", "-T", "lifeboat"];
        argv.extend(args);
        argv.push("--json");
        let out = self.compose(&argv);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    fn cli(&self, args: &[&str]) -> String {
        let mut argv = vec!["run", "--rm", "-T", "lifeboat"];
        argv.extend(args);
        self.compose_ok(&argv)
    }

    /// The container of a service (docker-compose 1.x names it PROJECT_SERVICE_1).
    fn container(&self, service: &str) -> String {
        format!("{}_{service}_1", self.name)
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- logs -----\n{}",
                text(&self.compose(&["logs", "--no-color"]))
            );
        }
        let _ = self.compose(&["--profile", "cli", "down", "-v", "--remove-orphans"]);
        let _ = docker(&["rmi", "-f", &self.image]);
    }
}

fn have_compose() -> bool {
    let ok = Command::new("docker-compose")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIP: docker-compose is not installed (Debian package docker-compose)");
    }
    ok
}

/// Names of the registered components of each role, sorted.
fn components(project: &Project) -> Option<Vec<(String, String, String)>> {
    let v = project.cli_json(&["servers", "list", "--all"])?;
    let mut rows: Vec<(String, String, String)> = v["servers"]
        .as_array()?
        .iter()
        .map(|s| {
            let field = |k: &str| s[k].as_str().unwrap_or_default().to_string();
            (field("role"), field("name"), field("status"))
        })
        .collect();
    rows.sort();
    Some(rows)
}

#[test]
fn the_two_sites_compose_file_comes_up_replicates_and_comes_up_again_unchanged() {
    if !have_docker() || !have_compose() || !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let name = format!("lbc{}", std::process::id());
    let project = Project {
        image: format!("lifeboat-e2e:{name}"),
        name,
        disks: tmp.path().join("disks"),
    };
    build_image(&project.image);
    std::fs::create_dir_all(&project.disks).unwrap();
    let source = project.disks.join("web01.img");
    sparse_disk(&source, 64 << 20);
    qemu_io(&source.display().to_string(), &["write -P 0x21 0 8M"]);

    project.compose_ok(&["up", "-d"]);
    let expected_roles = [
        ("agent", "web01"),
        ("master-target", "mt-a"),
        ("master-target", "mt-b"),
        ("process-server", "ps-a"),
        ("process-server", "ps-b"),
    ];
    let mut seen = Vec::new();
    wait_until("every component connected", WAIT, || {
        seen = components(&project).unwrap_or_default();
        let connected = |role: &str, name: &str| {
            seen.iter()
                .any(|(r, n, s)| r == role && n == name && s == "Connected")
        };
        expected_roles.iter().all(|(r, n)| connected(r, n))
            && seen
                .iter()
                .filter(|(r, _, s)| r == "config-server" && s == "Connected")
                .count()
                == 3
    });
    wait_until("three voters", WAIT, || {
        project.cli_json(&["cluster", "status"]).is_some_and(|s| {
            s["members"]
                .as_array()
                .is_some_and(|m| m.iter().filter(|m| m["voter"] == true).count() == 3)
        })
    });

    // The passphrase is in cs1's volume, not in any log.
    let passphrase = project.cli(&["passphrase", "show"]);
    let passphrase = passphrase.trim();
    assert!(passphrase.len() > 10, "{passphrase}");
    let logs = text(&project.compose(&["logs", "--no-color"]));
    assert!(!logs.contains(passphrase), "the passphrase is in the logs");

    // Protect web01 from site A to site B and write through its export.
    project.cli(&["policy", "create", "gold"]);
    project.cli(&[
        "protect", "web01", "--policy", "gold", "--ps", "ps-a", "--mt", "mt-b",
    ]);
    project.cli(&["wait", "web01", "--timeout-secs", "120"]);
    let ip = docker_ok(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &project.container("web01"),
    ]);
    let url = format!("nbd://{ip}:10809/disk0");
    qemu_io(&url, &["write -P 0x42 10M 4M", "write -P 0x43 40M 1M"]);
    project.cli(&["wait", "web01", "--caught-up", "--timeout-secs", "120"]);
    let status = project.cli_json(&["status"]).expect("status");
    let disk = &status["disks"][0];
    assert_eq!(disk["process_server"], "ps-a", "{status}");
    assert_eq!(disk["master_target"], "mt-b", "{status}");
    let disk_id = disk["disk_id"].as_str().unwrap();
    let replica = tmp.path().join("replica.vhd");
    docker_ok(&[
        "cp",
        &format!(
            "{}:/data/replicas/{disk_id}/disk.vhd",
            project.container("mt-b")
        ),
        &replica.display().to_string(),
    ]);
    lifeboat_e2e::workload::assert_identical(&source, &replica);

    // Up again: every one-off step keeps what the volumes hold.
    project.compose_ok(&["up", "-d"]);
    wait_until("the same components, connected", WAIT, || {
        components(&project).is_some_and(|now| {
            now.len() == seen.len() && now.iter().all(|(_, _, s)| s == "Connected")
        })
    });
    let again = components(&project).unwrap();
    let names = |rows: &[(String, String, String)]| {
        rows.iter()
            .map(|(r, n, _)| (r.clone(), n.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&again), names(&seen), "nothing registered twice");
}
