//! Every service answers the standard gRPC health check and serves Prometheus metrics that
//! `promtool check metrics` accepts (when promtool is installed: Debian package `prometheus`).
use lifeboat_common::{tls, Identity, Role};
use lifeboat_e2e::*;
use std::path::Path;
use std::time::Duration;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

const WAIT: Duration = Duration::from_secs(30);

/// gRPC health of the server at `addr` with role `role`, asked with the admin identity.
fn health(admin_dir: &Path, addr: &str, role: Role) -> i32 {
    let identity = Identity::load(admin_dir).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let channel = tls::mtls_channel(&identity, addr, role).unwrap();
        let mut client = HealthClient::new(channel);
        client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|r| r.into_inner().status)
            .unwrap_or(-1)
    })
}

fn promtool_check(name: &str, metrics: &str) {
    let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        eprintln!(
            "SKIP promtool check of {name}: promtool is not installed (Debian package prometheus)"
        );
        return;
    };
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool rejects {name} metrics: {}",
        text(&out)
    );
}

#[test]
fn services_answer_health_checks_and_serve_valid_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let (cs, _) = CsNode::init(tmp.path().join("cs"));
    let admin_dir = tmp.path().join("cs").join("admin");
    assert_eq!(
        health(&admin_dir, &cs.addr, Role::ConfigServer),
        ServingStatus::Serving as i32
    );

    let mut procs = Vec::new();
    let mut endpoints = vec![("config-server".to_string(), cs.metrics.clone(), None)];
    for (binary, role) in [
        ("process-server", Role::ProcessServer),
        ("master-target", Role::MasterTarget),
        ("mobility-agent", Role::Agent),
    ] {
        let dir = tmp.path().join(binary);
        let (listen, metrics) = (free_addr(), free_addr());
        let d = dir.display().to_string();
        let pf = cs.passphrase_file().display().to_string();
        let out = run(
            binary,
            &[
                "register",
                "--data-dir",
                &d,
                "--cs",
                &cs.addr,
                "--passphrase-file",
                &pf,
            ],
            &[],
        );
        assert!(out.status.success(), "{}", text(&out));
        let nbd = free_addr();
        let mut args = vec![
            "run",
            "--data-dir",
            &d,
            "--listen",
            &listen,
            "--metrics-listen",
            &metrics,
            "--log-format",
            "json",
        ];
        // Agents serve disks and master targets views over NBD: a free port each, not the
        // default one (something else on the machine may hold it).
        if binary == "mobility-agent" || binary == "master-target" {
            args.extend(["--nbd-listen", nbd.as_str()]);
        }
        procs.push(Proc::start(binary, binary, &args, dir.join("run.log")));
        endpoints.push((
            binary.to_string(),
            metrics,
            (role != Role::Agent).then_some((listen, role)),
        ));
    }
    for (name, _, grpc) in &endpoints {
        if let Some((listen, role)) = grpc {
            wait_until(&format!("{name} healthy"), WAIT, || {
                health(&admin_dir, listen, *role) == ServingStatus::Serving as i32
            });
        }
    }
    let mut pages = String::new();
    for (name, metrics, _) in &endpoints {
        // Heartbeats and requests must have flowed first; how soon varies with the load.
        let expected: &[&str] = if name == "config-server" {
            &[
                "lifeboat_build_info",
                "lifeboat_raft_leader 1",
                "lifeboat_raft_term",
                "lifeboat_raft_commit_index",
                "lifeboat_grpc_requests_total",
                "lifeboat_components{role=\"agent\"} 1",
            ]
        } else if name == "mobility-agent" {
            // A failure counter an alert rule can watch is there before its first failure.
            &[
                "lifeboat_build_info",
                "lifeboat_cs_connected 1",
                "lifeboat_agent_app_point_failures_total{reason=\"no_freeze_hook\"} 0",
            ]
        } else {
            &["lifeboat_build_info", "lifeboat_cs_connected 1"]
        };
        let mut body = String::new();
        wait_until(&format!("{name} metrics {expected:?}"), WAIT, || {
            body = http_get(metrics, "/metrics").unwrap_or_default();
            expected.iter().all(|m| body.contains(m))
        });
        promtool_check(name, &body);
        pages.push_str(&body);
    }
    // The shipped alerting rules read only metrics the services really publish (the
    // configuration server's `lifeboat_alerts` kinds included).
    let rules = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/lifeboat-rules.yml"),
    )
    .unwrap();
    let mut used: Vec<&str> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("lifeboat_"))
        .collect();
    used.sort();
    used.dedup();
    for metric in used {
        assert!(
            pages.contains(metric),
            "the rules read {metric}, which no service publishes"
        );
    }
    for kind in rules.split("kind=\"").skip(1) {
        let kind = &kind[..kind.find('"').unwrap()];
        let series = format!("lifeboat_alerts{{kind=\"{kind}\"}}");
        assert!(
            pages.contains(&series),
            "the rules read {series}, which is not published"
        );
    }
    // JSON logs are one JSON object per line.
    let log = procs[0].log_text();
    let first = log.lines().next().expect("some log line");
    assert!(
        serde_json::from_str::<serde_json::Value>(first).is_ok(),
        "not JSON: {first}"
    );

    // SIGTERM stops each service cleanly.
    for p in &mut procs {
        assert_eq!(
            p.terminate(),
            Some(0),
            "{} exit status\n{}",
            p.name,
            p.log_text()
        );
    }
}
