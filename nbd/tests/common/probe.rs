//! In-process servers on random ports and a steerable backend for protocol tests.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use nbd::{Backend, CancellationToken, Export, MemBackend, Server, ServerConfig};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

pub const SIZE: usize = 1 << 20;

pub struct Running {
    pub server: Server,
    pub addr: SocketAddr,
    pub stop: CancellationToken,
    pub serving: JoinHandle<()>,
}

pub async fn start(config: ServerConfig, exports: Vec<Export>) -> Running {
    let server = Server::new(config);
    for e in exports {
        server.add_export(e).expect("add export");
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let serving = tokio::spawn({
        let (server, stop) = (server.clone(), stop.clone());
        async move { server.serve(listener, stop).await }
    });
    Running {
        server,
        addr,
        stop,
        serving,
    }
}

pub fn pattern() -> Vec<u8> {
    (0..SIZE).map(|i| (i % 251) as u8).collect()
}

/// Observes and steers backend calls: requests below `gate_below` wait for a gate permit.
#[derive(Default)]
pub struct Probe {
    pub log: Mutex<Vec<String>>,
    pub in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
}

pub struct TestBackend {
    mem: MemBackend,
    gate: Arc<Semaphore>,
    gate_below: u64,
    probe: Arc<Probe>,
    pub fail_with: Option<i32>,
}

impl TestBackend {
    pub fn new(gate_below: u64) -> (Self, Arc<Semaphore>, Arc<Probe>) {
        let gate = Arc::new(Semaphore::new(0));
        let probe = Arc::new(Probe::default());
        let b = TestBackend {
            mem: MemBackend::from_vec(pattern()),
            gate: Arc::clone(&gate),
            gate_below,
            probe: Arc::clone(&probe),
            fail_with: None,
        };
        (b, gate, probe)
    }

    async fn enter(&self, what: String, offset: u64) -> io::Result<()> {
        let now = self.probe.in_flight.fetch_add(1, SeqCst) + 1;
        self.probe.max_in_flight.fetch_max(now, SeqCst);
        if offset < self.gate_below {
            self.gate.acquire().await.expect("gate").forget();
        }
        self.probe.log.lock().expect("log").push(what);
        self.probe.in_flight.fetch_sub(1, SeqCst);
        match self.fail_with {
            Some(-1) => panic!("backend panics on purpose"),
            Some(code) => Err(io::Error::from_raw_os_error(code)),
            None => Ok(()),
        }
    }
}

impl Backend for TestBackend {
    fn size(&self) -> u64 {
        self.mem.size()
    }
    async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        self.enter(format!("read {offset} {len}"), offset).await?;
        self.mem.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        self.enter(format!("write {offset} {} fua={fua}", data.len()), offset)
            .await?;
        self.mem.write(offset, data, fua).await
    }
    async fn flush(&self) -> io::Result<()> {
        self.enter("flush".into(), u64::MAX).await
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> io::Result<()> {
        self.enter(format!("trim {offset} {len} fua={fua}"), offset)
            .await?;
        self.mem.trim(offset, len, fua).await
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
    ) -> io::Result<()> {
        self.enter(
            format!("zero {offset} {len} no_hole={no_hole} fua={fua}"),
            offset,
        )
        .await?;
        self.mem.write_zeroes(offset, len, no_hole, fua).await
    }
}

/// Polls `cond` until it holds; panics after five seconds.
pub async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
