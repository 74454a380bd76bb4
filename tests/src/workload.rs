//! Helpers for tests that replicate a disk: a real NBD client (`qemu-io`) writing through the
//! agent's export, waiting for the replica to catch up, and comparing source and replica with
//! `qemu-img compare`.
use crate::{
    lifeboat, lifeboat_json, qemu_check_vpc, servers, sparse_disk, text, wait_until, Component,
    CsNode,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const WAIT: Duration = Duration::from_secs(120);

/// False (after printing why) when qemu-utils is missing.
pub fn have_qemu() -> bool {
    if Command::new("qemu-io").arg("--version").output().is_err() {
        eprintln!("SKIP: qemu-io is not installed (Debian package qemu-utils)");
        return false;
    }
    true
}

/// Runs `qemu-io -f raw -c CMD… url`; panics if any command fails.
pub fn qemu_io<S: AsRef<str>>(url: &str, commands: &[S]) {
    if let Err(said) = try_qemu_io(url, commands) {
        panic!(
            "qemu-io {:?}: {said}",
            commands.iter().map(|c| c.as_ref()).collect::<Vec<_>>()
        );
    }
}

/// Runs `qemu-io -f raw -c CMD… url`; what it said if a command failed.
pub fn try_qemu_io<S: AsRef<str>>(url: &str, commands: &[S]) -> Result<(), String> {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.args(["-c", c.as_ref()]);
    }
    let out = cmd.arg(url).output().map_err(|e| e.to_string())?;
    let said = text(&out);
    if out.status.success() && !said.contains("failed") {
        Ok(())
    } else {
        Err(said)
    }
}

/// `count` 1 MiB writes of patterns `pattern..`, from `first_mib` every `step_mib` MiB, one
/// `qemu-io` run each on a thread, so they go on while the test acts (kills a server, cuts a
/// network). The thread returns how many of them failed.
pub fn background_writes(
    url: &str,
    pattern: u64,
    first_mib: u64,
    step_mib: u64,
    count: u64,
) -> std::thread::JoinHandle<u64> {
    let url = url.to_string();
    std::thread::spawn(move || {
        (0..count)
            .filter(|i| {
                let cmd = format!("write -P {} {}M 1M", pattern + i, first_mib + i * step_mib);
                try_qemu_io(&url, &[cmd]).is_err()
            })
            .count() as u64
    })
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The first disk of `lifeboat status --json`.
pub fn disk_status(ctx: &Path) -> serde_json::Value {
    lifeboat_json(ctx, &["status", "--json"])["disks"][0].clone()
}

/// Waits until the (only) disk is Protected with nothing pending, in a report made after
/// `since` (Unix ms): take it once the writes waited for have returned.
pub fn caught_up(ctx: &Path, since: i64) {
    // The first report received after `since` may have been put together before it (in
    // flight meanwhile); an agent sends its next report only once that one is answered, so
    // any later one was made after `since` (as `lifeboat wait` does it).
    let mut first_after = None;
    wait_until("replication caught up", WAIT, || {
        let d = disk_status(ctx);
        let at = d["last_report_unix_ms"].as_i64().unwrap_or(0);
        if at <= since {
            return false;
        }
        at > *first_after.get_or_insert(at)
            && d["pending_bytes"] == 0
            && d["rpo_secs"].as_f64() == Some(0.0)
            && d["state"] == "Protected"
    });
}

/// `qemu-img compare` of a raw source and a VHD replica must say identical.
pub fn assert_identical(source: &Path, replica: &Path) {
    qemu_check_vpc(replica);
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "vpc"])
        .arg(source)
        .arg(replica)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "source and replica differ: {}",
        text(&out)
    );
}

/// The sum of a metric's samples in a Prometheus text page (0 if absent).
pub fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split([' ', '{']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Sends signal `name` (STOP, CONT, …) to `pid`.
pub fn signal(name: &str, pid: u32) {
    let ok = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{name} {pid}");
}

/// Starts a process server, a master target and an agent, and waits until the configuration
/// server sees all three connected.
pub fn start_connected(ctx: &Path, ps: &mut Component, mt: &mut Component, agent: &mut Component) {
    ps.start();
    mt.start();
    agent.start();
    // All three: protect places disks only on connected servers, and the agent may well be
    // heard from before the process server or master target.
    for role in ["agent", "process-server", "master-target"] {
        // Any of the role's: an identity registered again leaves the revoked one listed.
        wait_until(&format!("{role} connected"), WAIT, || {
            servers(ctx, role)
                .iter()
                .any(|a| a["status"] == "Connected")
        });
    }
}

/// One protected-to-be machine and the servers for it, started and connected: a
/// configuration server, a process server, a master target whose data directory is under
/// `mt_parent` (a file system of the test's choosing), an agent for `name` with one sparse
/// disk of `mib` MiB (`disk0`), and a policy `gold`. The machine is not protected yet.
pub struct OneMachine {
    pub cs: CsNode,
    pub ctx: PathBuf,
    pub source: PathBuf,
    pub ps: Component,
    pub mt: Component,
    pub agent: Component,
}

impl OneMachine {
    pub fn start(tmp: &Path, mt_parent: &Path, name: &str, mib: u64) -> OneMachine {
        let (cs, _) = CsNode::init(tmp.join("cs"));
        let ctx = cs.context();
        let source = tmp.join(format!("{name}.img"));
        sparse_disk(&source, mib << 20);
        let mut ps = Component::register("process-server", "ps1", tmp, &cs, &[]);
        let mut mt = Component::register("master-target", "mt1", mt_parent, &cs, &[]);
        let disk_arg = format!("disk0={}", source.display());
        let mut agent =
            Component::register("mobility-agent", name, tmp, &cs, &["--disk", &disk_arg]);
        start_connected(&ctx, &mut ps, &mut mt, &mut agent);
        let out = lifeboat(&ctx, &["policy", "create", "gold"]);
        assert!(out.status.success(), "{}", text(&out));
        OneMachine {
            cs,
            ctx,
            source,
            ps,
            mt,
            agent,
        }
    }

    /// Stops the agent, the process server and the master target.
    pub fn stop(&mut self) {
        for c in [&mut self.agent, &mut self.ps, &mut self.mt] {
            c.proc().terminate();
        }
    }
}
