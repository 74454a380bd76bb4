//! A master target whose file system is full: it refuses the batches with an error that says
//! what to do and applies nothing of them, the process server keeps them, `status` and
//! `alerts` say why replication waits (and the sync's progress counts only what is applied),
//! and once space is added everything converges to a replica identical to the source.
//!
//! The master target's data directory is on a tmpfs of its own, grown in place during the
//! test: mounting takes root, so the test prints SKIP without it.
use lifeboat_e2e::workload::*;
use lifeboat_e2e::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, mib: u64) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).unwrap();
        let size = format!("size={mib}m");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &size, "tmpfs"])
            .arg(path)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs(path.to_path_buf())),
            Ok(o) => {
                eprintln!(
                    "SKIP: cannot mount a tmpfs (needs root): {}",
                    text(&o).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIP: cannot run mount: {e}");
                None
            }
        }
    }

    fn resize(&self, mib: u64) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={mib}m")])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount {}", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_master_target_refuses_batches_says_why_and_converges_once_it_has_room() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // Less than the 256 MiB the master target keeps free: it can apply nothing.
    let Some(fs) = Tmpfs::mount(&tmp.path().join("mt-fs"), 200) else {
        return;
    };
    let mut m = OneMachine::start(tmp.path(), &fs.0, "web01", 128);
    let ctx = m.ctx.clone();
    qemu_io(
        &m.source.display().to_string(),
        &["write -P 0x5a 0 24M", "write -P 0x33 100M 8M"],
    );
    let out = lifeboat(&ctx, &["protect", "web01", "--policy", "gold"]);
    assert!(out.status.success(), "{}", text(&out));

    // Status says why replication waits, and so do the alerts.
    let mut status = String::new();
    wait_until("status to say why replication waits", WAIT, || {
        status = text(&lifeboat(&ctx, &["status"]));
        status.contains("replication waits") && status.contains("out of space")
    });
    assert!(status.contains("add space"), "{status}");
    let mut alerts = String::new();
    wait_until("the alerts", WAIT, || {
        alerts = text(&lifeboat(&ctx, &["alerts"]));
        alerts.contains("out of space") && alerts.contains("master target mt1")
    });
    // `wait` gives up saying the same.
    let waited = lifeboat(&ctx, &["wait", "web01", "--timeout-secs", "2"]);
    assert!(
        !waited.status.success() && text(&waited).contains("replication waits"),
        "{}",
        text(&waited)
    );
    // Read to the end but nothing applied: the sync is not done, nor said to be.
    let d = disk_status(&ctx);
    assert_eq!(d["state"], "InitialSync", "{d}");
    assert!(d["sync_progress_pct"].as_f64().unwrap() < 100.0, "{d}");
    assert!(d["pending_bytes"].as_u64().unwrap() > 0, "{d}");
    let page = http_get(&m.mt.metrics, "/metrics").unwrap();
    assert_eq!(
        metric(&page, "lifeboat_mt_apply_bytes_total"),
        0.0,
        "{page}"
    );

    // Room: everything the process server kept is applied, and the warnings go.
    fs.resize(1024);
    let out = lifeboat(
        &ctx,
        &["wait", "web01", "--caught-up", "--timeout-secs", "120"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let disk_id = disk_status(&ctx)["disk_id"].as_str().unwrap().to_string();
    assert_identical(
        &m.source,
        &m.mt.dir.join("replicas").join(&disk_id).join("disk.vhd"),
    );
    wait_until("the alerts to clear", WAIT, || {
        !text(&lifeboat(&ctx, &["alerts"])).contains("out of space")
    });
    assert!(!text(&lifeboat(&ctx, &["status"])).contains("replication waits"));
    m.stop();
}
