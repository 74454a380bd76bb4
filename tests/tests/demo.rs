//! `lifeboat demo`, README's first command: it must run on a fresh machine with nothing
//! installed, prove the replica identical to the source, stop cleanly, and run again.
use lifeboat_e2e::*;
use std::time::Duration;

#[test]
fn demo_replicates_a_disk_and_proves_the_replica() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("demo").display().to_string();
    let args = [
        "demo",
        "--data-dir",
        &data,
        "--seconds",
        "3",
        "--size-mib",
        "64",
    ];
    for round in 0..2 {
        let mut demo = Proc::start(
            "lifeboat demo",
            "lifeboat",
            &args,
            tmp.path().join(format!("demo{round}.log")),
        );
        assert_eq!(
            demo.wait(Duration::from_secs(240)),
            Some(0),
            "{}",
            demo.log_text()
        );
        let out = demo.log_text();
        assert!(
            out.contains("Replica is identical to the source (64.0 MiB compared byte for byte)"),
            "{out}"
        );
        assert!(out.contains("Done."), "{out}");
    }
}
