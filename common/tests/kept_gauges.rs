//! Gauges leave `/metrics` once nobody sets them; kept gauges stay until forgotten. Runs the
//! real exporter on a random port, with a 1 s idle time so the test does not wait a minute.
use lifeboat_common::{kept_gauges, telemetry};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn scrape(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect to the exporter");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .expect("send the request");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read the answer");
    text
}

fn series(text: &str, name: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

#[test]
fn gauges_nobody_sets_leave_and_kept_ones_stay_until_forgotten() {
    let addr = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    telemetry::install_metrics(addr, Duration::from_secs(1), Duration::from_millis(200))
        .expect("install the exporter");
    metrics::gauge!("test_once").set(7.0);
    kept_gauges::set("test_kept", 3.0);
    let disk = |d: &str| vec![("disk", d.to_string())];
    kept_gauges::set_family("test_family", vec![(disk("a"), 1.0), (disk("b"), 2.0)]);
    // The listener starts on a thread of its own: wait for the first answer.
    let started = Instant::now();
    let first = loop {
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
            let mut text = String::new();
            if s.read_to_string(&mut text).is_ok() && text.contains("test_once") {
                break text;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no metrics");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(series(&first, "test_once"), vec!["test_once 7"]);
    assert_eq!(series(&first, "test_family").len(), 2);
    assert_eq!(series(&first, "lifeboat_build_info").len(), 1);

    // Disk "b" is no longer reported.
    kept_gauges::set_family("test_family", vec![(disk("a"), 5.0)]);
    std::thread::sleep(Duration::from_millis(2500));
    let later = scrape(addr);
    assert!(
        series(&later, "test_once").is_empty(),
        "a gauge set once stays: {later}"
    );
    assert_eq!(series(&later, "test_kept"), vec!["test_kept 3"]);
    assert_eq!(
        series(&later, "test_family"),
        vec!["test_family{disk=\"a\"} 5"]
    );
    assert_eq!(series(&later, "lifeboat_build_info").len(), 1);
}
