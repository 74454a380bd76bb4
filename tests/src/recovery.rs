//! Helpers of the recovery tests: hooks that record their calls, recovery points, recovery
//! commands and comparisons of views (over NBD) and replicas with copies of the source.
use crate::workload::WAIT;
use crate::{lifeboat, lifeboat_json, servers, sparse_disk, text, wait_until, Component, CsNode};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A hook script that appends its arguments, `mode=$LIFEBOAT_MODE` and
/// `point_time=$LIFEBOAT_POINT_TIME` to `log`.
pub fn hook_script(dir: &Path, log: &Path, name: &str) -> PathBuf {
    let hook = dir.join(name);
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\necho \"$@\" >> {}\necho \"mode=$LIFEBOAT_MODE\" >> {}\n\
             echo \"point_time=$LIFEBOAT_POINT_TIME\" >> {}\n",
            log.display(),
            log.display(),
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    hook
}

/// The recovery points of `machine`, oldest first.
pub fn points(ctx: &Path, machine: &str) -> Vec<serde_json::Value> {
    lifeboat_json(ctx, &["recovery-points", machine, "--json"])["points"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Waits for a point of `kind` (any kind if empty) taken after `since`; returns its id.
pub fn point_after(ctx: &Path, machine: &str, kind: &str, since: i64) -> String {
    let mut id = String::new();
    wait_until(&format!("a {kind} point after the writes"), WAIT, || {
        let found = points(ctx, machine).into_iter().rev().find(|p| {
            p["time_unix_ms"].as_i64().unwrap_or(0) > since
                && (kind.is_empty() || p["kind"] == kind)
        });
        if let Some(p) = found {
            id = p["id"].as_str().unwrap().to_string();
        }
        !id.is_empty()
    });
    id
}

/// Runs a recovery command; returns its output (the job's steps).
pub fn recover(ctx: &Path, args: &[&str]) -> String {
    let out = lifeboat(ctx, args);
    assert!(out.status.success(), "lifeboat {args:?}: {}", text(&out));
    text(&out)
}

/// The NBD URI the output shows for disk0.
pub fn uri(output: &str) -> String {
    output
        .split_whitespace()
        .find(|w| w.starts_with("nbd://"))
        .unwrap_or_else(|| panic!("no NBD URI in: {output}"))
        .to_string()
}

/// Waits until everything written to the source is in the replica. (Not `caught_up`: with a
/// point every second something is nearly always in flight, so a report with nothing
/// pending may take long to come.)
pub fn replica_equals(source: &Path, replica: &Path) {
    wait_until("replica equal to the source", WAIT, || {
        Command::new("qemu-img")
            .args(["compare", "-q", "-f", "raw", "-F", "vpc"])
            .arg(source)
            .arg(replica)
            .status()
            .unwrap()
            .success()
    });
}

pub fn compare_nbd(copy: &Path, uri: &str) -> bool {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(copy)
        .arg(uri)
        .output()
        .unwrap();
    out.status.success()
}

/// A configuration server, a process server, a master target and one agent per machine,
/// each machine with one disk (32 MiB unless sized) in nbd mode, all protected with policy
/// `erp`.
pub struct Machines {
    pub agents: Vec<Component>,
    pub sources: Vec<PathBuf>,
    _ps: Component,
    pub mt: Component,
    pub ctx: PathBuf,
    _cs: CsNode,
}

impl Machines {
    pub fn start(tmp: &Path, names: &[&str], policy: &[&str]) -> Machines {
        let sizes: Vec<u64> = names.iter().map(|_| 32).collect();
        Machines::start_sized(tmp, names, &sizes, policy)
    }

    /// As `start`, with each machine's disk size in MiB.
    pub fn start_sized(tmp: &Path, names: &[&str], sizes_mib: &[u64], policy: &[&str]) -> Machines {
        let (cs, _) = CsNode::init(tmp.join("cs"));
        let ctx = cs.context();
        let mut ps = Component::register("process-server", "ps1", tmp, &cs, &[]);
        let mut mt = Component::register("master-target", "mt1", tmp, &cs, &[]);
        ps.start();
        mt.start();
        let mut agents = Vec::new();
        let mut sources = Vec::new();
        for (name, mib) in names.iter().zip(sizes_mib) {
            let source = tmp.join(format!("{name}.img"));
            sparse_disk(&source, mib << 20);
            let disk = format!("disk0={}", source.display());
            let mut agent =
                Component::register("mobility-agent", name, tmp, &cs, &["--disk", &disk]);
            agent.start();
            agents.push(agent);
            sources.push(source);
        }
        wait_until("every component connected", WAIT, || {
            ["process-server", "master-target", "agent"]
                .iter()
                .all(|role| {
                    let list = servers(&ctx, role);
                    !list.is_empty() && list.iter().all(|s| s["status"] == "Connected")
                })
                && servers(&ctx, "agent").len() == names.len()
        });
        let mut create = vec!["policy", "create", "erp"];
        create.extend_from_slice(policy);
        let out = lifeboat(&ctx, &create);
        assert!(out.status.success(), "{}", text(&out));
        for name in names {
            let out = lifeboat(&ctx, &["protect", name, "--policy", "erp"]);
            assert!(out.status.success(), "{}", text(&out));
        }
        let out = lifeboat(&ctx, &["jobs", "--watch"]);
        assert!(out.status.success(), "{}", text(&out));
        Machines {
            agents,
            sources,
            _ps: ps,
            mt,
            ctx,
            _cs: cs,
        }
    }

    pub fn nbd(&self, i: usize) -> String {
        format!("nbd://{}/disk0", self.agents[i].nbd)
    }
}
