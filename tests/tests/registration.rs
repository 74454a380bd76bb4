//! Registration of every role, refusal of bad passphrases and certificates, revocation, and
//! persistence of the registry across a configuration server restart — all with the real
//! binaries on 127.0.0.1.
use lifeboat_e2e::*;
use std::path::Path;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// Registers a component of `binary` in `dir`; returns the command's output.
fn register(
    binary: &str,
    dir: &Path,
    cs: &str,
    passphrase_file: &Path,
    extra: &[&str],
) -> std::process::Output {
    let dir = dir.display().to_string();
    let pf = passphrase_file.display().to_string();
    let listen = free_addr();
    let metrics = free_addr();
    let mut args = vec![
        "register",
        "--data-dir",
        &dir,
        "--cs",
        cs,
        "--passphrase-file",
        &pf,
        "--listen",
        &listen,
        "--metrics-listen",
        &metrics,
    ];
    // Agents and master targets serve NBD; tests run in parallel, so never on the default port.
    let nbd = free_addr();
    if binary == "mobility-agent" || binary == "master-target" {
        args.extend(["--nbd-listen", nbd.as_str()]);
    }
    args.extend_from_slice(extra);
    run(binary, &args, &[])
}

/// Starts `binary run` for a registered component in `dir`.
fn start(binary: &str, dir: &Path, extra: &[&str]) -> Proc {
    let d = dir.display().to_string();
    let listen = free_addr();
    let metrics = free_addr();
    let mut args = vec![
        "run",
        "--data-dir",
        &d,
        "--listen",
        &listen,
        "--metrics-listen",
        &metrics,
    ];
    // Agents and master targets serve NBD; tests run in parallel, so never on the default port.
    let nbd = free_addr();
    if binary == "mobility-agent" || binary == "master-target" {
        args.extend(["--nbd-listen", nbd.as_str()]);
    }
    args.extend_from_slice(extra);
    Proc::start(binary, binary, &args, dir.join("run.log"))
}

fn status_of(context: &Path, role: &str, name: &str) -> Option<String> {
    servers(context, role)
        .into_iter()
        .find(|s| s["name"] == name && s["status"] != "Revoked")
        .and_then(|s| s["status"].as_str().map(str::to_string))
}

#[test]
fn every_role_registers_heartbeats_and_is_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let (cs, init_output) = CsNode::init(tmp.path().join("cs"));
    let passphrase = std::fs::read_to_string(cs.passphrase_file()).unwrap();
    assert!(
        init_output.contains(passphrase.trim()),
        "init prints the passphrase once"
    );
    let mode = std::fs::metadata(cs.passphrase_file()).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );

    let disk = tmp.path().join("disk0.img");
    sparse_disk(&disk, 64 << 20);
    let disk_arg = format!("disk0={}", disk.display());
    let mut procs = Vec::new();
    for (binary, name, extra) in [
        ("process-server", "ps1", vec![]),
        ("master-target", "mt1", vec![]),
        ("mobility-agent", "web01", vec!["--disk", disk_arg.as_str()]),
    ] {
        let dir = tmp.path().join(name);
        let mut args = vec!["--name", name];
        args.extend(extra.iter().copied());
        let out = register(binary, &dir, &cs.addr, &cs.passphrase_file(), &args);
        assert!(out.status.success(), "{binary} register: {}", text(&out));
        assert!(dir.join("identity").join("key.pem").exists());
        // A second registration of the same directory is refused without --force.
        let again = register(binary, &dir, &cs.addr, &cs.passphrase_file(), &args);
        assert!(!again.status.success() && text(&again).contains("already registered"));
        // With --keep-existing it succeeds and keeps the identity it has.
        let key = std::fs::read(dir.join("identity").join("key.pem")).unwrap();
        let mut keep = args.clone();
        keep.push("--keep-existing");
        let kept = register(binary, &dir, &cs.addr, &cs.passphrase_file(), &keep);
        assert!(
            kept.status.success() && text(&kept).contains("Already registered"),
            "{}",
            text(&kept)
        );
        assert_eq!(
            std::fs::read(dir.join("identity").join("key.pem")).unwrap(),
            key
        );
        procs.push(start(binary, &dir, &extra));
    }

    wait_until("all components connected", WAIT, || {
        [
            ("process-server", "ps1"),
            ("master-target", "mt1"),
            ("agent", "web01"),
        ]
        .iter()
        .all(|(role, name)| status_of(&cs.context(), role, name).as_deref() == Some("Connected"))
    });
    let mt = servers(&cs.context(), "master-target").remove(0);
    assert_eq!(mt["disk_slots_total"], 31);
    assert_eq!(mt["disk_slots_free"], 30);
    let agent = servers(&cs.context(), "agent").remove(0);
    assert_eq!(agent["disks"][0]["name"], "disk0");
    assert_eq!(agent["disks"][0]["size_bytes"], 64 << 20);
    assert_eq!(agent["address"], "", "agents do not listen");
    let ps = servers(&cs.context(), "process-server").remove(0);
    assert!(ps["free_bytes"].as_u64().unwrap() > 0);
    assert_eq!(ps["version"], env!("CARGO_PKG_VERSION"));
    let node = servers(&cs.context(), "config-server").remove(0);
    assert_eq!(node["address"], cs.addr);

    // A restarted component reuses its identity.
    let before = servers(&cs.context(), "process-server")[0]["id"].clone();
    let last_heartbeat =
        || servers(&cs.context(), "process-server")[0]["last_heartbeat_unix_ms"].as_i64();
    procs[0].terminate();
    let stopped = last_heartbeat();
    procs[0] = start("process-server", &tmp.path().join("ps1"), &[]);
    wait_until("restarted process server heartbeats", WAIT, || {
        last_heartbeat() > stopped
    });
    assert_eq!(
        status_of(&cs.context(), "process-server", "ps1").as_deref(),
        Some("Connected")
    );
    assert_eq!(servers(&cs.context(), "process-server").len(), 1);
    assert_eq!(servers(&cs.context(), "process-server")[0]["id"], before);

    // Stopped components turn Disconnected after three missed heartbeats.
    procs[1].terminate();
    wait_until("master target disconnected", WAIT, || {
        status_of(&cs.context(), "master-target", "mt1").as_deref() == Some("Disconnected")
    });

    // The passphrase never appears in any log.
    let log = cs.proc.as_ref().unwrap().log_text();
    assert!(
        !log.contains(passphrase.trim()),
        "passphrase leaked into the log"
    );
    for p in &procs {
        assert!(!p.log_text().contains(passphrase.trim()));
    }
}

#[test]
fn wrong_passphrase_is_refused_audited_and_rate_limited() {
    let tmp = tempfile::tempdir().unwrap();
    let (cs, _) = CsNode::init(tmp.path().join("cs"));
    let wrong = tmp.path().join("wrong");
    std::fs::write(&wrong, "not-the-passphrase\n").unwrap();
    let dir = tmp.path().join("ps");
    let out = register("process-server", &dir, &cs.addr, &wrong, &["--name", "ps1"]);
    assert!(!out.status.success());
    let message = text(&out);
    assert!(
        message.contains(&cs.addr) && message.contains("rejected the passphrase"),
        "{message}"
    );
    assert!(
        !dir.join("identity").join("identity.toml").exists(),
        "nothing saved"
    );
    assert!(
        servers(&cs.context(), "process-server").is_empty(),
        "nothing registered"
    );

    let audit = lifeboat_json(&cs.context(), &["audit", "--json"]);
    let refused = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "registration_refused")
        .count();
    assert_eq!(refused, 1);

    // Repeated failures from one source are refused for a while, even with the right passphrase.
    for _ in 0..5 {
        register("process-server", &dir, &cs.addr, &wrong, &["--name", "ps1"]);
    }
    let limited = register(
        "process-server",
        &dir,
        &cs.addr,
        &cs.passphrase_file(),
        &["--name", "ps1"],
    );
    assert!(!limited.status.success());
    assert!(
        text(&limited).contains("too many failed"),
        "{}",
        text(&limited)
    );
    let audit = lifeboat_json(&cs.context(), &["audit", "--json"]);
    let limited = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "registration_rate_limited")
        .expect("the limit is audited");
    assert_eq!(limited["subject"], "process-server ps1");
    assert!(servers(&cs.context(), "process-server").is_empty());
}

#[test]
fn regenerating_the_passphrase_revokes_components_until_they_register_again() {
    let tmp = tempfile::tempdir().unwrap();
    let (cs, _) = CsNode::init(tmp.path().join("cs"));
    let old = tmp.path().join("old.passphrase");
    std::fs::copy(cs.passphrase_file(), &old).unwrap();
    let agent_dir = tmp.path().join("agent");
    let out = register(
        "mobility-agent",
        &agent_dir,
        &cs.addr,
        &old,
        &["--name", "db01"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let mut agent = start("mobility-agent", &agent_dir, &[]);
    wait_until("agent connected", WAIT, || {
        status_of(&cs.context(), "agent", "db01").as_deref() == Some("Connected")
    });

    let out = lifeboat(&cs.context(), &["passphrase", "regenerate", "--yes"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("1 component identities were revoked"));
    let shown = lifeboat(&cs.context(), &["passphrase", "show"]);
    let new = String::from_utf8_lossy(&shown.stdout).trim().to_string();
    assert!(text(&out).contains(&new));
    wait_until("passphrase file rewritten", WAIT, || {
        std::fs::read_to_string(cs.passphrase_file())
            .unwrap_or_default()
            .trim()
            == new
    });

    // The running agent is refused at its next heartbeat and stops, saying what to do.
    let code = agent.wait(WAIT);
    assert_ne!(code, Some(0));
    assert!(
        agent.log_text().contains("register again"),
        "{}",
        agent.log_text()
    );
    assert_eq!(servers(&cs.context(), "agent")[0]["status"], "Revoked");
    // Asked about, the machine is said to have a revoked agent, not no agent at all.
    let asked = lifeboat(&cs.context(), &["status", "db01"]);
    assert!(!asked.status.success());
    assert!(text(&asked).contains("revoked"), "{}", text(&asked));

    // The old passphrase no longer works; the new one does.
    let refused = register(
        "mobility-agent",
        &agent_dir,
        &cs.addr,
        &old,
        &["--name", "db01", "--force"],
    );
    assert!(!refused.status.success());
    // Without --name, as `passphrase regenerate` suggests: it keeps the name it had.
    let ok = register(
        "mobility-agent",
        &agent_dir,
        &cs.addr,
        &cs.passphrase_file(),
        &["--force"],
    );
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(text(&ok).contains("db01"), "{}", text(&ok));
    let _agent = start("mobility-agent", &agent_dir, &[]);
    wait_until("agent connected again", WAIT, || {
        status_of(&cs.context(), "agent", "db01").as_deref() == Some("Connected")
    });
}

#[test]
fn revoked_foreign_and_unknown_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (cs, _) = CsNode::init(tmp.path().join("cs"));
    let ps_dir = tmp.path().join("ps");
    assert!(register(
        "process-server",
        &ps_dir,
        &cs.addr,
        &cs.passphrase_file(),
        &["--name", "ps1"]
    )
    .status
    .success());
    let mut ps = start("process-server", &ps_dir, &[]);
    wait_until("ps connected", WAIT, || {
        status_of(&cs.context(), "process-server", "ps1").as_deref() == Some("Connected")
    });
    let id = servers(&cs.context(), "process-server")[0]["id"]
        .as_str()
        .unwrap()
        .to_string();

    // Unknown ids: NOT_FOUND, nothing changes.
    for command in [
        ["servers", "show", "ps-0000"],
        ["servers", "revoke", "ps-0000"],
    ] {
        let out = lifeboat(&cs.context(), &command);
        assert!(!out.status.success());
        assert!(text(&out).contains("NotFound"), "{}", text(&out));
    }

    // Revocation takes effect at the next call.
    let out = lifeboat(&cs.context(), &["servers", "revoke", &id]);
    assert!(out.status.success(), "{}", text(&out));
    assert_ne!(ps.wait(WAIT), Some(0));
    assert!(ps.log_text().contains("revoked"), "{}", ps.log_text());

    // An admin identity of another cluster is refused by this one.
    let (other, _) = CsNode::init(tmp.path().join("other"));
    let out = run(
        "lifeboat",
        &["--cs", &cs.addr, "servers", "list"],
        &[("LIFEBOAT_CONTEXT", &other.context().display().to_string())],
    );
    assert!(
        !out.status.success(),
        "foreign certificate accepted: {}",
        text(&out)
    );

    // A component certificate cannot call the admin API: build a context pointing at the
    // revoked process server's identity.
    let ctx = tmp.path().join("ps-context.toml");
    std::fs::write(
        &ctx,
        format!(
            "cs = [\"{}\"]\nidentity_dir = \"{}\"\n",
            cs.addr,
            ps_dir.display()
        ),
    )
    .unwrap();
    let out = lifeboat(&ctx, &["servers", "list"]);
    assert!(!out.status.success());
}

#[test]
fn registry_survives_a_configuration_server_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut cs, _) = CsNode::init(tmp.path().join("cs"));
    let mt_dir = tmp.path().join("mt");
    assert!(register(
        "master-target",
        &mt_dir,
        &cs.addr,
        &cs.passphrase_file(),
        &["--name", "mt1"]
    )
    .status
    .success());
    let _mt = start("master-target", &mt_dir, &[]);
    wait_until("mt connected", WAIT, || {
        status_of(&cs.context(), "master-target", "mt1").as_deref() == Some("Connected")
    });
    let before = servers(&cs.context(), "master-target");

    assert_eq!(
        cs.proc.as_mut().unwrap().terminate(),
        Some(0),
        "clean shutdown on SIGTERM"
    );
    cs.start();
    cs.wait_ready(&cs.context());
    wait_until("mt reconnected after restart", WAIT, || {
        status_of(&cs.context(), "master-target", "mt1").as_deref() == Some("Connected")
    });
    let after = servers(&cs.context(), "master-target");
    assert_eq!(before[0]["id"], after[0]["id"]);
    assert_eq!(after.len(), 1);
    let audit = lifeboat_json(&cs.context(), &["audit", "--json"]);
    assert!(audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["kind"] == "registration"));
}
