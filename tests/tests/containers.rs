//! Replication across hosts: the configuration server, process server, master target and a
//! protected machine's agent each run in their own container (the image of
//! `deploy/container/build-image.sh`, from scratch plus the binaries) on a private network,
//! finding each other by name. A real NBD client writes through the agent's export from the
//! Docker host; the process server's host loses power while writes flow and boots again; the
//! master target's host is cut off the network, during which the reported RPO grows, and comes
//! back. After each, `qemu-img compare` finds the replica VHD identical to the source.
//! Skips, saying why, where no Docker engine answers.
use lifeboat_e2e::site::{have_docker, Site};
use lifeboat_e2e::workload::*;
use lifeboat_e2e::*;
use std::path::Path;
use std::process::Command;

/// `count` 1 MiB writes of patterns from `pattern`, every other MiB from `first_mib`.
fn write_mibs(url: &str, pattern: u64, first_mib: u64, count: u64) {
    let cmds: Vec<String> = (0..count)
        .map(|i| format!("write -P {} {}M 1M", pattern + i, first_mib + 2 * i))
        .collect();
    qemu_io(url, &cmds);
}

fn status_of(ctx: &Path, role: &str) -> String {
    servers(ctx, role)
        .first()
        .and_then(|s| s["status"].as_str().map(str::to_string))
        .unwrap_or_default()
}

#[test]
fn a_machine_replicates_across_hosts_through_host_loss_and_a_network_cut() {
    if !have_docker() || !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut site = Site::new(tmp.path());

    // Configuration server: one node, reached by the others as cs:8443.
    let cs_args = [
        "--data-dir",
        "/data",
        "--listen",
        "0.0.0.0:8443",
        "--advertise",
        "cs:8443",
        "--heartbeat-interval-secs",
        "1",
    ];
    let mut init = vec!["config-server", "init"];
    init.extend(cs_args);
    site.once("cs", &init);
    let mut run_cs = vec!["config-server", "run"];
    run_cs.extend(cs_args);
    site.start("cs", &run_cs);
    let ctx = tmp.path().join("context.toml");
    site.write_context(&ctx, &["cs"], "cs");
    wait_until("the configuration server", WAIT, || {
        lifeboat(&ctx, &["cluster", "status"]).status.success()
    });
    let passphrase = site.data("cs").join("private/connection.passphrase");

    // The other hosts register with the passphrase, then serve under their names.
    let source = site.data("web01").join("disk0.img");
    sparse_disk(&source, 128 << 20);
    qemu_io(&source.display().to_string(), &["write -P 0x5a 4M 24M"]);
    let hosts: [(&str, &str, &[&str]); 3] = [
        (
            "ps",
            "process-server",
            &["--listen", "0.0.0.0:9443", "--advertise", "ps:9443"],
        ),
        (
            "mt",
            "master-target",
            &["--listen", "0.0.0.0:9444", "--advertise", "mt:9444"],
        ),
        (
            "web01",
            "mobility-agent",
            &[
                "--disk",
                "disk0=/data/disk0.img",
                "--nbd-listen",
                "0.0.0.0:10809",
            ],
        ),
    ];
    for (name, binary, flags) in hosts {
        std::fs::copy(&passphrase, site.data(name).join("passphrase")).unwrap();
        let mut register = vec![binary, "register", "--data-dir", "/data", "--cs", "cs:8443"];
        register.extend(["--passphrase-file", "/data/passphrase", "--name", name]);
        if binary == "mobility-agent" {
            register.extend(&flags[..2]);
        }
        site.once(name, &register);
        std::fs::remove_file(site.data(name).join("passphrase")).unwrap();
        let mut run = vec![binary, "run", "--data-dir", "/data"];
        run.extend(flags);
        site.start(name, &run);
    }
    wait_until("every host connected", WAIT, || {
        ["process-server", "master-target", "agent"]
            .iter()
            .all(|role| status_of(&ctx, role) == "Connected")
    });

    // Protect; the workload writes through the export during the initial sync.
    assert!(lifeboat(&ctx, &["policy", "create", "gold"])
        .status
        .success());
    let out = lifeboat(&ctx, &["protect", "web01", "--policy", "gold"]);
    assert!(out.status.success(), "{}", text(&out));
    let url = format!("nbd://{}:10809/disk0", site.ip("web01"));
    wait_until("the agent's NBD export", WAIT, || {
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read 0 512", &url])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    write_mibs(&url, 1, 40, 8);
    caught_up(&ctx, now_ms());
    let disk_id = disk_status(&ctx)["disk_id"].as_str().unwrap().to_string();
    let replica = site.data("mt").join(format!("replicas/{disk_id}/disk.vhd"));
    assert_identical(&source, &replica);

    // The process server's host loses power while writes flow; the configuration server sees
    // it go; it boots again and replication converges.
    let writes = background_writes(&url, 20, 60, 2, 12);
    std::thread::sleep(std::time::Duration::from_millis(300));
    site.kill("ps");
    wait_until("the process server seen disconnected", WAIT, || {
        status_of(&ctx, "process-server") == "Disconnected"
    });
    assert_eq!(
        writes.join().unwrap(),
        0,
        "writes through the export failed"
    );
    site.restart("ps");
    caught_up(&ctx, now_ms());
    assert_identical(&source, &replica);

    // The master target's host is cut off: the backlog waits in the process server's cache
    // and the RPO reported for the disk grows; back on the network, it drains.
    site.disconnect("mt");
    let cut = now_ms();
    write_mibs(&url, 40, 90, 10);
    wait_until("the RPO to show the cut", WAIT, || {
        let d = disk_status(&ctx);
        d["last_report_unix_ms"].as_i64().unwrap_or(0) > cut + 2000
            && d["rpo_secs"].as_f64().unwrap_or(0.0) >= 2.0
            && d["pending_bytes"].as_u64().unwrap_or(0) >= 10 << 20
    });
    wait_until("the master target seen disconnected", WAIT, || {
        status_of(&ctx, "master-target") == "Disconnected"
    });
    site.reconnect("mt");
    caught_up(&ctx, now_ms());
    assert_identical(&source, &replica);
}

/// `lifeboat --cs ADDR ARGS --json` from the Docker host, parsed; `None` if it failed.
fn cli_json(ctx: &Path, addr: &str, args: &[&str]) -> Option<serde_json::Value> {
    let mut argv = vec!["--cs", addr];
    argv.extend(args);
    argv.push("--json");
    let out = run(
        "lifeboat",
        &argv,
        &[("LIFEBOAT_CONTEXT", &ctx.display().to_string())],
    );
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn as_refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn policy_names(ctx: &Path, addr: &str) -> Option<Vec<String>> {
    let v = cli_json(ctx, addr, &["policy", "list"])?;
    let mut names: Vec<String> = v["policies"]
        .as_array()?
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect();
    names.sort();
    Some(names)
}

#[test]
fn a_configuration_server_leader_cut_off_from_its_peers_loses_no_acknowledged_write() {
    if !have_docker() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut site = Site::new(tmp.path());
    let node_args = |name: &str| {
        vec![
            "--data-dir".to_string(),
            "/data".into(),
            "--listen".into(),
            "0.0.0.0:8443".into(),
            "--advertise".into(),
            format!("{name}:8443"),
            "--heartbeat-interval-secs".into(),
            "1".into(),
        ]
    };
    let mut init = vec!["config-server".to_string(), "init".into()];
    init.extend(node_args("cs1"));
    site.once("cs1", &as_refs(&init));
    let mut first = vec!["config-server".to_string(), "run".into()];
    first.extend(node_args("cs1"));
    site.start("cs1", &as_refs(&first));
    let passphrase = site.data("cs1").join("private/connection.passphrase");
    for name in ["cs2", "cs3"] {
        std::fs::copy(&passphrase, site.data(name).join("passphrase")).unwrap();
        let mut join = vec!["config-server".to_string(), "join".into()];
        join.extend(["--cs".into(), "cs1:8443".into()]);
        join.extend(["--passphrase-file".into(), "/data/passphrase".into()]);
        join.extend(node_args(name));
        site.start(name, &as_refs(&join));
    }
    // The admin identity, on the host and inside every node (to ask a node that is cut off).
    let admin = site.data("cs1").join("admin");
    for name in ["cs2", "cs3"] {
        let to = site.data(name).join("admin/identity");
        std::fs::create_dir_all(&to).unwrap();
        for f in std::fs::read_dir(admin.join("identity")).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
        }
        std::fs::copy(
            admin.join("context.toml"),
            to.parent().unwrap().join("context.toml"),
        )
        .unwrap();
    }
    let ctx = tmp.path().join("context.toml");
    let ip = site.write_context(&ctx, &["cs1", "cs2", "cs3"], "cs1");
    wait_until("three voters", WAIT, || {
        cli_json(&ctx, &ip[0], &["cluster", "status"]).is_some_and(|s| {
            s["members"]
                .as_array()
                .is_some_and(|m| m.iter().filter(|m| m["voter"] == true).count() == 3)
        })
    });
    let mut expected = vec!["before".to_string()];
    assert!(lifeboat(&ctx, &["policy", "create", "before"])
        .status
        .success());

    // Cut the leader off from both peers; it keeps running.
    let status = cli_json(&ctx, &ip[0], &["cluster", "status"]).unwrap();
    let old_term = status["term"].as_u64().unwrap();
    let leader = status["leader_address"]
        .as_str()
        .unwrap()
        .trim_end_matches(":8443")
        .to_string();
    let rest: Vec<usize> = (0..3)
        .filter(|i| format!("cs{}", i + 1) != leader)
        .collect();
    site.disconnect(&leader);

    // The majority elects a new leader and takes writes.
    wait_until("a new leader among the other two", WAIT, || {
        cli_json(&ctx, &ip[rest[0]], &["cluster", "status"]).is_some_and(|s| {
            s["term"].as_u64().unwrap_or(0) > old_term
                && s["leader_address"]
                    .as_str()
                    .is_some_and(|l| !l.starts_with(&leader))
        })
    });
    let out = lifeboat(&ctx, &["--cs", &ip[rest[1]], "policy", "create", "during"]);
    assert!(
        out.status.success(),
        "a write during the cut: {}",
        text(&out)
    );
    expected.push("during".into());

    // The node cut off cannot commit: a write sent to it is not acknowledged.
    let isolated = site.exec(
        &leader,
        &[
            "lifeboat",
            "--context",
            "/data/admin/context.toml",
            "--cs",
            "127.0.0.1:8443",
            "policy",
            "create",
            "isolated",
        ],
    );
    assert!(
        !isolated.status.success(),
        "a write to a leader without a majority was acknowledged: {}",
        text(&isolated)
    );
    assert!(
        text(&isolated).contains("no answer from the configuration server"),
        "{}",
        text(&isolated)
    );

    // Healed: the old leader follows the new one, and every node holds exactly the
    // acknowledged writes (the unacknowledged one is gone from its log).
    site.reconnect(&leader);
    expected.sort();
    for addr in &ip {
        wait_until("every node agrees", WAIT, || {
            policy_names(&ctx, addr).is_some_and(|names| {
                names
                    .iter()
                    .filter(|n| !n.ends_with("-failback"))
                    .eq(expected.iter())
            })
        });
    }
}
