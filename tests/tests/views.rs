//! Opening a view does not depend on the disk's size: a 1 GiB and an 8 GiB disk with the same
//! writes open their views of a point by reading journal record headers only (the master
//! target counts the bytes), and each view shows the point exactly (checked with `qemu-io`
//! reads of every written range and of the untouched end of the big disk).
use lifeboat_e2e::recovery::*;
use lifeboat_e2e::workload::*;
use lifeboat_e2e::*;

#[test]
fn views_of_a_1_gib_and_an_8_gib_disk_open_alike() {
    if !have_qemu() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let m = Machines::start_sized(
        tmp.path(),
        &["small", "big"],
        &[1024, 8192],
        &[
            "--crash-consistent-every",
            "1s",
            "--app-consistent-every",
            "0s",
        ],
    );
    let ctx = m.ctx.clone();
    let before: Vec<String> = (0..16)
        .map(|i| format!("write -P {} {}M 1M", 0x20 + i, i * 60))
        .collect();
    let after: Vec<String> = (0..16)
        .map(|i| format!("write -P 0xee {}M 512K", i * 60))
        .collect();
    let mut points = Vec::new();
    for (i, name) in ["small", "big"].iter().enumerate() {
        qemu_io(&m.nbd(i), &before);
        points.push(point_after(&ctx, name, "crash", now_ms()));
        qemu_io(&m.nbd(i), &after);
    }
    for (i, name) in ["small", "big"].iter().enumerate() {
        // Everything written is applied before the view is opened, so it all comes from the journal.
        replica_equals_when_caught_up(&ctx, name);
        let started = std::time::Instant::now();
        let out = recover(&ctx, &["test-failover", name, "--point", &points[i]]);
        eprintln!(
            "{name}: test failover in {:?} (CLI, including job polling)",
            started.elapsed()
        );
        let view = uri(&out);
        let mut reads: Vec<String> = (0..16)
            .map(|j| format!("read -P {} {}M 1M", 0x20 + j, j * 60))
            .collect();
        if *name == "big" {
            reads.push("read -P 0 8191M 1M".into());
        }
        qemu_io(&view, &reads);
    }
    let page = http_get(&m.mt.metrics, "/metrics").unwrap();
    let read = metric(&page, "lifeboat_mt_view_open_read_bytes_total");
    assert!(
        read > 0.0 && read < (1 << 20) as f64,
        "opening two views read {read} bytes"
    );
}

/// Waits until the machine's status shows nothing pending.
fn replica_equals_when_caught_up(ctx: &std::path::Path, machine: &str) {
    wait_until("nothing pending", WAIT, || {
        let v = lifeboat_json(ctx, &["status", machine, "--json"]);
        v["disks"][0]["pending_bytes"] == 0
    });
}
