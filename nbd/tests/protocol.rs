//! Protocol behaviour checked byte by byte with a raw in-test client: option handling,
//! request validation, pipelining, acknowledgement timing, disconnects and graceful stop.

mod common;

use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use common::probe::{pattern, start, wait_until, TestBackend, SIZE};
use common::{info_data, RawClient};
use nbd::protocol::*;
use nbd::{Export, MemBackend, ServerConfig};
const SEC: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_option_gets_a_reply() {
    let run = start(
        ServerConfig::default(),
        vec![
            Export::new("disk0", MemBackend::from_vec(pattern())).with_description("first"),
            Export::new("b", MemBackend::new(4096)),
        ],
    )
    .await;
    let mut c = RawClient::connect(run.addr).await;
    assert_eq!(
        c.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await,
        FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
    );

    for unsupported in [0x1234, OPT_STRUCTURED_REPLY, OPT_STARTTLS, 9, 10, 11] {
        let r = c.option(unsupported, b"whatever").await;
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].1, REP_ERR_UNSUP, "option {unsupported}");
    }
    let list = c.option(OPT_LIST, &[]).await;
    let names: Vec<Vec<u8>> = list
        .iter()
        .filter(|r| r.1 == REP_SERVER)
        .map(|r| r.2.clone())
        .collect();
    assert_eq!(
        names,
        vec![b"\0\0\0\x01b".to_vec(), b"\0\0\0\x05disk0first".to_vec()]
    );
    assert_eq!(list.last().map(|r| r.1), Some(REP_ACK));
    assert_eq!(c.option(OPT_LIST, b"x").await[0].1, REP_ERR_INVALID);
    assert_eq!(
        c.option(OPT_INFO, &info_data("nope", &[])).await[0].1,
        REP_ERR_UNKNOWN
    );
    assert_eq!(
        c.option(OPT_GO, &[0, 0, 0, 9, b'd']).await[0].1,
        REP_ERR_INVALID
    );
    // Oversized option data is swallowed and refused, not fatal.
    assert_eq!(
        c.option(0x77, &vec![0u8; 100_000]).await[0].1,
        REP_ERR_TOO_BIG
    );

    let info = c
        .option(
            OPT_INFO,
            &info_data("disk0", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 99]),
        )
        .await;
    let kinds: Vec<u16> = info
        .iter()
        .filter(|r| r.1 == REP_INFO)
        .map(|r| u16::from_be_bytes([r.2[0], r.2[1]]))
        .collect();
    assert_eq!(
        kinds,
        vec![INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]
    );
    let export = &info[0].2;
    assert_eq!(
        u64::from_be_bytes(export[2..10].try_into().unwrap()),
        SIZE as u64
    );
    let flags = u16::from_be_bytes([export[10], export[11]]);
    let want = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_CAN_MULTI_CONN;
    assert_eq!(flags, want);
    assert_eq!(info[2].2[2..], *b"first");
    assert_eq!(info[3].2[2..], [0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0]);

    // Still in option haggling after all that: GO works.
    let r = c.option(OPT_GO, &info_data("disk0", &[])).await;
    assert_eq!(r.last().map(|r| r.1), Some(REP_ACK));
    let (err, data) = c.call(CMD_READ, 0, 1000, 10, &[]).await;
    assert_eq!((err, data), (0, pattern()[1000..1010].to_vec()));
    assert_eq!(run.server.stats().protocol_errors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_option_with_and_without_zeroes() {
    let run = start(
        ServerConfig::default(),
        vec![Export::new("", MemBackend::from_vec(pattern()))],
    )
    .await;
    for client_flags in [
        FLAG_C_FIXED_NEWSTYLE,
        FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES,
    ] {
        let mut c = RawClient::connect(run.addr).await;
        c.greet(client_flags).await;
        c.send_option(OPT_EXPORT_NAME, b"").await;
        let want = if client_flags & FLAG_C_NO_ZEROES != 0 {
            10
        } else {
            134
        };
        let reply = c.read_data(want).await;
        assert_eq!(
            u64::from_be_bytes(reply[0..8].try_into().unwrap()),
            SIZE as u64
        );
        assert!(reply[10..].iter().all(|&b| b == 0));
        let (err, data) = c.call(CMD_READ, 0, 5, 3, &[]).await;
        assert_eq!((err, data), (0, vec![5, 6, 7]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_violations_close_only_that_connection() {
    let run = start(
        ServerConfig::default(),
        vec![Export::new("disk0", MemBackend::new(4096))],
    )
    .await;
    let mut good = RawClient::connect(run.addr).await;
    good.handshake("disk0").await;

    let mut c = RawClient::connect(run.addr).await;
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    c.send_option(OPT_EXPORT_NAME, b"missing").await;
    assert!(c.closed_within(SEC).await, "unknown EXPORT_NAME must close");

    let mut c = RawClient::connect(run.addr).await;
    c.greet(0x8000_0000).await;
    assert!(
        c.closed_within(SEC).await,
        "unknown client flags must close"
    );

    let mut c = RawClient::connect(run.addr).await;
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    tokio::io::AsyncWriteExt::write_all(&mut c.s, b"GARBAGE!GARBAGE!")
        .await
        .expect("send");
    assert!(c.closed_within(SEC).await, "bad option magic must close");

    let mut c = RawClient::connect(run.addr).await;
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    let ack = c.option(OPT_ABORT, &[]).await;
    assert_eq!(ack[0].1, REP_ACK);
    assert!(c.closed_within(SEC).await);

    assert_eq!(good.call(CMD_WRITE, 0, 0, 4, b"live").await.0, 0);
    assert_eq!(good.call(CMD_READ, 0, 0, 4, &[]).await.1, b"live");
    assert_eq!(run.server.stats().protocol_errors, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_are_refused_without_touching_data() {
    let run = start(
        ServerConfig::default(),
        vec![Export::new("disk0", MemBackend::from_vec(pattern()))],
    )
    .await;
    let mut c = RawClient::connect(run.addr).await;
    c.handshake("disk0").await;
    let end = SIZE as u64;
    let cases: &[(u16, u16, u64, u32, u32)] = &[
        (CMD_READ, 0, end - 10, 11, EINVAL),
        (CMD_READ, 0, u64::MAX - 5, 10, EINVAL),
        (CMD_READ, 0, 0, (32 << 20) + 1, EINVAL),
        (CMD_WRITE, 0, end - 3, 4, ENOSPC),
        (CMD_WRITE, 0, u64::MAX - 1, 4, ENOSPC),
        (CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 4, EINVAL),
        (CMD_WRITE, 1 << 5, 0, 4, EINVAL),
        (CMD_TRIM, 0, end, 1, EINVAL),
        (CMD_WRITE_ZEROES, 0, end - 1, 2, ENOSPC),
        (CMD_WRITE_ZEROES, 1 << 4, 0, 2, EINVAL), // FAST_ZERO: not advertised
        (5, 0, 0, 0, EINVAL),                     // CACHE: not supported
        (99, 0, 0, 0, EINVAL),
    ];
    for &(kind, flags, offset, len, want) in cases {
        let payload = if kind == CMD_WRITE {
            vec![0xEE; len as usize]
        } else {
            Vec::new()
        };
        let (err, _) = c.call(kind, flags, offset, len, &payload).await;
        assert_eq!(
            err, want,
            "kind {kind} flags {flags:#x} offset {offset} len {len}"
        );
    }
    // Zero-length requests succeed and do nothing; FUA on a read is tolerated.
    assert_eq!(c.call(CMD_READ, 0, end, 0, &[]).await, (0, vec![]));
    assert_eq!(c.call(CMD_WRITE, 0, end, 0, &[]).await.0, 0);
    assert_eq!(
        c.call(CMD_READ, CMD_FLAG_FUA, end - 2, 2, &[]).await.1,
        pattern()[SIZE - 2..]
    );
    assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).await.0, 0);

    let (err, all) = c.call(CMD_READ, 0, 0, SIZE as u32, &[]).await;
    assert_eq!(err, 0);
    assert!(all == pattern(), "refused requests changed data");
    let stats = run.server.export("disk0").expect("export").stats();
    assert_eq!(stats.rejected, cases.len() as u64);
    assert_eq!(
        (stats.reads, stats.bytes_read, stats.flushes),
        (2, SIZE as u64 + 2, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_exports_refuse_changes() {
    let run = start(
        ServerConfig::default(),
        vec![Export::new(
            "ro",
            MemBackend::from_vec(pattern()).into_read_only(),
        )],
    )
    .await;
    let mut c = RawClient::connect(run.addr).await;
    let (_, flags) = c.handshake("ro").await;
    assert_ne!(flags & TFLAG_READ_ONLY, 0);
    assert_eq!(flags & (TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES), 0);
    assert_eq!(c.call(CMD_WRITE, 0, 0, 3, b"abc").await.0, EPERM);
    assert_eq!(c.call(CMD_TRIM, 0, 0, 3, &[]).await.0, EPERM);
    assert_eq!(c.call(CMD_WRITE_ZEROES, 0, 0, 3, &[]).await.0, EPERM);
    assert_eq!(c.call(CMD_READ, 0, 0, 3, &[]).await, (0, vec![0, 1, 2]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transmission_violations_close_the_connection() {
    let run = start(
        ServerConfig::default(),
        vec![Export::new("disk0", MemBackend::new(SIZE))],
    )
    .await;
    let mut c = RawClient::connect(run.addr).await;
    c.handshake("disk0").await;
    c.send_request(CMD_WRITE, 0, 1, 0, (32 << 20) + 1, &[])
        .await;
    assert!(c.closed_within(SEC).await, "oversized write must close");

    let mut c = RawClient::connect(run.addr).await;
    c.handshake("disk0").await;
    tokio::io::AsyncWriteExt::write_all(&mut c.s, &[0x55; 28])
        .await
        .expect("garbage");
    assert!(c.closed_within(SEC).await, "bad request magic must close");
    assert_eq!(run.server.stats().protocol_errors, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_complete_out_of_order() {
    let (backend, gate, _) = TestBackend::new(4096);
    let run = start(ServerConfig::default(), vec![Export::new("d", backend)]).await;
    let mut c = RawClient::connect(run.addr).await;
    c.handshake("d").await;
    c.send_request(CMD_READ, 0, 1, 0, 16, &[]).await; // gated
    c.send_request(CMD_WRITE, 0, 2, 8192, 4, b"fast").await;
    assert_eq!(
        c.read_reply().await,
        (0, 2),
        "the write behind a stalled read must finish first"
    );
    c.send_request(CMD_READ, 0, 3, 8192, 4, &[]).await;
    assert_eq!(c.read_reply().await, (0, 3));
    assert_eq!(c.read_data(4).await, b"fast");
    gate.add_permits(1);
    assert_eq!(c.read_reply().await, (0, 1));
    assert_eq!(c.read_data(16).await, pattern()[..16]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_acknowledged_only_after_the_backend_finishes() {
    let (backend, gate, probe) = TestBackend::new(4096);
    let run = start(ServerConfig::default(), vec![Export::new("d", backend)]).await;
    let mut c = RawClient::connect(run.addr).await;
    c.handshake("d").await;
    c.send_request(CMD_WRITE, CMD_FLAG_FUA, 7, 0, 5, b"hello")
        .await;
    let early = tokio::time::timeout(Duration::from_millis(300), c.read_reply()).await;
    assert!(
        early.is_err(),
        "write acknowledged before the backend resolved"
    );
    assert!(probe.log.lock().expect("log").is_empty());
    gate.add_permits(1);
    assert_eq!(c.read_reply().await, (0, 7));
    assert_eq!(
        *probe.log.lock().expect("log"),
        vec!["write 0 5 fua=true".to_string()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_flags_reach_the_backend() {
    let (backend, _, probe) = TestBackend::new(0);
    let run = start(ServerConfig::default(), vec![Export::new("d", backend)]).await;
    let mut c = RawClient::connect(run.addr).await;
    c.handshake("d").await;
    assert_eq!(c.call(CMD_WRITE, 0, 10, 2, b"ab").await.0, 0);
    assert_eq!(
        c.call(
            CMD_WRITE_ZEROES,
            CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
            100,
            50,
            &[]
        )
        .await
        .0,
        0
    );
    assert_eq!(c.call(CMD_WRITE_ZEROES, 0, 200, 50, &[]).await.0, 0);
    assert_eq!(c.call(CMD_TRIM, CMD_FLAG_FUA, 4096, 4096, &[]).await.0, 0);
    assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).await.0, 0);
    assert_eq!(
        *probe.log.lock().expect("log"),
        vec![
            "write 10 2 fua=false",
            "zero 100 50 no_hole=true fua=true",
            "zero 200 50 no_hole=false fua=false",
            "trim 4096 4096 fua=true",
            "flush"
        ]
    );
    let s = run.server.export("d").expect("export").stats();
    assert_eq!(
        (s.writes, s.bytes_written, s.write_zeroes, s.bytes_zeroed),
        (1, 2, 2, 100)
    );
    assert_eq!(
        (s.trims, s.bytes_trimmed, s.flushes, s.rejected),
        (1, 4096, 1, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_errors_and_panics_become_error_replies() {
    let mut exports = Vec::new();
    for (name, code) in [
        ("nospc", libc_enospc()),
        ("rofs", 30),
        ("eio", 9999),
        ("panic", -1),
    ] {
        let (mut b, _, _) = TestBackend::new(0);
        b.fail_with = Some(code);
        exports.push(Export::new(name, b));
    }
    let run = start(ServerConfig::default(), exports).await;
    for (name, want) in [
        ("nospc", ENOSPC),
        ("rofs", EPERM),
        ("eio", EIO),
        ("panic", EIO),
    ] {
        let mut c = RawClient::connect(run.addr).await;
        c.handshake(name).await;
        assert_eq!(c.call(CMD_WRITE, 0, 0, 1, b"x").await.0, want, "{name}");
        // The connection survives a failed (even panicking) request.
        assert_eq!(c.call(CMD_READ, 0, 0, 1, &[]).await.0, want, "{name}");
    }
    assert_eq!(
        run.server
            .export("eio")
            .expect("export")
            .stats()
            .backend_errors,
        2
    );
}

fn libc_enospc() -> i32 {
    28
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_requests_are_bounded_per_connection() {
    let (backend, gate, probe) = TestBackend::new(u64::MAX);
    let config = ServerConfig {
        max_in_flight_requests: 3,
        ..ServerConfig::default()
    };
    let run = start(config, vec![Export::new("d", backend)]).await;
    let mut c = RawClient::connect(run.addr).await;
    c.handshake("d").await;
    for cookie in 0..10 {
        c.send_request(CMD_READ, 0, cookie, cookie * 512, 512, &[])
            .await;
    }
    wait_until("3 requests in flight", || probe.in_flight.load(SeqCst) == 3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        probe.in_flight.load(SeqCst),
        3,
        "server should stop reading at the limit"
    );
    gate.add_permits(10);
    let mut seen = Vec::new();
    for _ in 0..10 {
        let (err, cookie) = c.read_reply().await;
        assert_eq!(err, 0);
        assert_eq!(
            c.read_data(512).await,
            pattern()[cookie as usize * 512..][..512]
        );
        seen.push(cookie);
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..10).collect::<Vec<_>>());
    assert_eq!(probe.max_in_flight.load(SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_waits_for_in_flight_requests() {
    let (backend, gate, probe) = TestBackend::new(4096);
    let run = start(ServerConfig::default(), vec![Export::new("d", backend)]).await;
    let mut c = RawClient::connect(run.addr).await;
    c.handshake("d").await;
    c.send_request(CMD_WRITE, 0, 1, 0, 3, b"end").await;
    c.send_request(CMD_DISC, 0, 2, 0, 0, &[]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    gate.add_permits(1);
    assert_eq!(c.read_reply().await, (0, 1));
    assert!(c.closed_within(SEC).await);
    assert_eq!(probe.log.lock().expect("log").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_answers_in_flight_requests_then_closes() {
    let (backend, gate, probe) = TestBackend::new(4096);
    let run = start(ServerConfig::default(), vec![Export::new("d", backend)]).await;
    let mut c = RawClient::connect(run.addr).await;
    c.handshake("d").await;
    let mut idle = RawClient::connect(run.addr).await;
    idle.greet(FLAG_C_FIXED_NEWSTYLE).await; // parked mid-handshake
    c.send_request(CMD_WRITE, 0, 9, 0, 2, b"ok").await;
    wait_until("the write to reach the backend", || {
        probe.in_flight.load(SeqCst) == 1
    })
    .await;

    run.stop.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !run.serving.is_finished(),
        "stopped before an in-flight request finished"
    );
    gate.add_permits(1);
    assert_eq!(c.read_reply().await, (0, 9));
    assert!(c.closed_within(SEC).await);
    assert!(idle.closed_within(SEC).await);
    tokio::time::timeout(SEC, run.serving)
        .await
        .expect("serve returns")
        .expect("join");
    assert!(
        tokio::net::TcpStream::connect(run.addr).await.is_err(),
        "listener still open"
    );
    assert_eq!(run.server.stats().connections_active, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_can_be_added_and_removed_while_serving() {
    let run = start(ServerConfig::default(), vec![]).await;
    let mut c = RawClient::connect(run.addr).await;
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    assert_eq!(
        c.option(OPT_GO, &info_data("late", &[])).await[0].1,
        REP_ERR_UNKNOWN
    );
    run.server
        .add_export(Export::new("late", MemBackend::new(512)))
        .expect("add");
    assert!(run
        .server
        .add_export(Export::new("late", MemBackend::new(512)))
        .is_err());
    assert!(run
        .server
        .add_export(Export::new("x".repeat(4097), MemBackend::new(512)))
        .is_err());
    assert_eq!(
        c.option(OPT_GO, &info_data("late", &[]))
            .await
            .last()
            .map(|r| r.1),
        Some(REP_ACK)
    );
    assert!(run.server.remove_export("late").is_some());
    // The open connection keeps its export.
    assert_eq!(c.call(CMD_READ, 0, 0, 512, &[]).await, (0, vec![0; 512]));
    assert!(run.server.export_names().is_empty());
}
