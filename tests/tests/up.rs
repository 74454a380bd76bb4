//! `lifeboat up`: one command runs a configuration server, process server and master target on
//! one host, registers them on the first run, stops cleanly, and resumes on the next run.
use lifeboat_e2e::*;
use std::path::Path;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn start_up(tmp: &Path, ports: &[String; 5], log: &str) -> Proc {
    let data = tmp.join("lb").display().to_string();
    Proc::start(
        "lifeboat up",
        "lifeboat",
        &[
            "--context",
            &tmp.join("context.toml").display().to_string(),
            "up",
            "--data-dir",
            &data,
            "--cs-listen",
            &ports[0],
            "--ps-listen",
            &ports[1],
            "--mt-listen",
            &ports[2],
            "--mt-nbd-listen",
            &ports[4],
            "--metrics-listen",
            &ports[3],
        ],
        tmp.join(log),
    )
}

fn connected(context: &Path) -> Vec<(String, String)> {
    let out = lifeboat(context, &["servers", "list", "--json"]);
    if !out.status.success() {
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["servers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "Connected")
        .map(|s| {
            (
                s["role"].as_str().unwrap().to_string(),
                s["id"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn up_runs_the_stack_stops_on_signal_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let context = tmp.path().join("context.toml");
    let ports = [
        free_addr(),
        free_addr(),
        free_addr(),
        free_addr(),
        free_addr(),
    ];
    let mut up = start_up(tmp.path(), &ports, "up1.log");
    // "Lifeboat is up" is printed once the process server and master target are connected,
    // so a machine can be protected right away.
    wait_until("lifeboat up ready", WAIT, || {
        up.log_text().contains("Lifeboat is up")
    });
    assert_eq!(connected(&context).len(), 3, "{}", up.log_text());
    let first = connected(&context);
    let output = up.log_text();
    assert!(output.contains("Connection passphrase"), "{output}");
    assert!(
        output.contains(&ports[1]) && output.contains("passphrase file"),
        "{output}"
    );

    // Ctrl-C (SIGINT) stops everything cleanly.
    let _ = std::process::Command::new("kill")
        .args(["-INT", &up.pid().to_string()])
        .status();
    assert_eq!(up.wait(WAIT), Some(0), "{}", up.log_text());
    assert!(up.log_text().contains("Lifeboat stopped"));

    // The next run resumes: same identities, no new cluster, no new passphrase.
    let mut up = start_up(tmp.path(), &ports, "up2.log");
    wait_until("services connected after resume", WAIT, || {
        connected(&context).len() == 3
    });
    let mut again = connected(&context);
    let mut before = first.clone();
    again.sort();
    before.sort();
    assert_eq!(before, again, "the same identities are reused");
    // `up` prints its banner once it has seen the services connect, which may be just after
    // this test saw them.
    wait_until("the resumed banner", WAIT, || {
        up.log_text().contains("(resumed)")
    });
    assert!(!up.log_text().contains("Connection passphrase"));
    // A new passphrase revokes the process server and master target: `up` registers them
    // again and keeps running (it once stopped everything here).
    let out = lifeboat(&context, &["passphrase", "regenerate", "--yes"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_until("new identities connected", WAIT, || {
        let now = connected(&context);
        now.len() == 3 && now.iter().filter(|c| !before.contains(c)).count() == 2
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(connected(&context).len(), 3, "{}", up.log_text());
    assert!(
        !up.log_text().contains("Lifeboat stopped"),
        "{}",
        up.log_text()
    );
    assert_eq!(up.terminate(), Some(0));

    // Started again at another configuration-server address, it refuses at once (its
    // components would dial the old one for ever), naming the address to use.
    let mut moved = ports.clone();
    moved[0] = free_addr();
    let mut up = start_up(tmp.path(), &moved, "up3.log");
    // Exits, and not with success (a hang would show as no exit code).
    let code = up.wait(Duration::from_secs(20));
    assert!(
        matches!(code, Some(c) if c != 0),
        "exit {code:?}: {}",
        up.log_text()
    );
    assert!(
        up.log_text().contains(&format!("--cs-listen {}", ports[0])),
        "{}",
        up.log_text()
    );
}
