//! Shared test helpers: an in-process server on a random port, a raw protocol client, a
//! deterministic RNG and external-tool checks.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub mod probe;

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::Duration;

use nbd::protocol::*;
use nbd::{CancellationToken, Export, Server, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// True if `tool` runs; otherwise prints why `test` is skipped.
pub fn have(tool: &str, test: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIP {test}: `{tool}` is not installed (qemu-utils / libnbd-bin)");
    }
    ok
}

/// Runs a command, panicking with its output unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// xorshift64*: deterministic, dependency-free randomness for data and fuzz inputs.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    /// Random bytes, between `min` and `max - 1` of them.
    pub fn noise(&mut self, min: u64, max: u64) -> Vec<u8> {
        let n = min + self.below(max - min);
        self.bytes(n as usize)
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// A server running on its own runtime, so blocking tests can drive external clients.
pub struct TestServer {
    pub server: Server,
    pub addr: SocketAddr,
    stop: CancellationToken,
    serving: Option<tokio::task::JoinHandle<()>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl TestServer {
    pub fn start(exports: Vec<Export>) -> Self {
        Self::with_config(ServerConfig::default(), exports)
    }

    pub fn with_config(config: ServerConfig, exports: Vec<Export>) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let server = Server::new(config);
        for e in exports {
            server.add_export(e).expect("add export");
        }
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let serving = rt.spawn({
            let (server, stop) = (server.clone(), stop.clone());
            async move { server.serve(listener, stop).await }
        });
        TestServer {
            server,
            addr,
            stop,
            serving: Some(serving),
            rt: Some(rt),
        }
    }

    pub fn url(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.addr, export)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Graceful stop; true if the server finished within `timeout`.
    pub fn stop(&mut self, timeout: Duration) -> bool {
        self.stop.cancel();
        let (Some(rt), Some(serving)) = (self.rt.as_ref(), self.serving.take()) else {
            return true;
        };
        rt.block_on(async { tokio::time::timeout(timeout, serving).await.is_ok() })
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.as_ref().expect("runtime").block_on(f)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

/// A minimal NBD client speaking raw bytes, to send what real clients never would.
pub struct RawClient<S> {
    pub s: S,
}

pub type OptReply = (u32, u32, Vec<u8>); // option, reply type, data

impl RawClient<TcpStream> {
    pub async fn connect(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        RawClient { s }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawClient<S> {
    /// Reads the greeting and answers with `client_flags`; returns the handshake flags.
    pub async fn greet(&mut self, client_flags: u32) -> u16 {
        let mut g = [0u8; 18];
        read_full(&mut self.s, &mut g, "greeting").await;
        assert_eq!(&g[0..8], &NBDMAGIC.to_be_bytes());
        assert_eq!(&g[8..16], &IHAVEOPT.to_be_bytes());
        self.s
            .write_all(&client_flags.to_be_bytes())
            .await
            .expect("client flags");
        u16::from_be_bytes([g[16], g[17]])
    }

    pub async fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).await.expect("send option");
    }

    pub async fn read_option_reply(&mut self) -> OptReply {
        let mut h = [0u8; 20];
        read_full(&mut self.s, &mut h, "option reply header").await;
        assert_eq!(
            u64::from_be_bytes(h[0..8].try_into().unwrap()),
            OPTION_REPLY_MAGIC
        );
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        read_full(&mut self.s, &mut data, "option reply data").await;
        (option, kind, data)
    }

    /// Sends an option and collects replies up to and including the final one.
    pub async fn option(&mut self, option: u32, data: &[u8]) -> Vec<OptReply> {
        self.send_option(option, data).await;
        let mut replies = Vec::new();
        loop {
            let r = self.read_option_reply().await;
            assert_eq!(r.0, option, "reply for another option");
            let last = r.1 == REP_ACK || r.1 & (1 << 31) != 0;
            replies.push(r);
            if last {
                return replies;
            }
        }
    }

    /// Greets and enters transmission on `name` with NBD_OPT_GO; returns (size, flags).
    pub async fn handshake(&mut self, name: &str) -> (u64, u16) {
        self.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
        let replies = self.option(OPT_GO, &info_data(name, &[])).await;
        let last = replies.last().expect("reply");
        assert_eq!(last.1, REP_ACK, "GO {name} refused: {replies:?}");
        let info = replies
            .iter()
            .find(|r| r.1 == REP_INFO && r.2.len() == 12 && r.2[0..2] == [0, 0])
            .expect("NBD_INFO_EXPORT");
        (
            u64::from_be_bytes(info.2[2..10].try_into().unwrap()),
            u16::from_be_bytes([info.2[10], info.2[11]]),
        )
    }

    pub async fn send_request(
        &mut self,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        data: &[u8],
    ) {
        let mut m = Request {
            flags,
            kind,
            cookie,
            offset,
            len,
        }
        .encode()
        .to_vec();
        m.extend_from_slice(data);
        self.s.write_all(&m).await.expect("send request");
    }

    /// Reads a simple reply header: (error, cookie).
    pub async fn read_reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        read_full(&mut self.s, &mut h, "reply header").await;
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    pub async fn read_data(&mut self, len: usize) -> Vec<u8> {
        let mut d = vec![0u8; len];
        read_full(&mut self.s, &mut d, "read data").await;
        d
    }

    /// One request, one reply (no pipelining): returns (error, read data).
    pub async fn call(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> (u32, Vec<u8>) {
        self.send_request(kind, flags, 0xC0FFEE, offset, len, data)
            .await;
        let (error, cookie) = self.read_reply().await;
        assert_eq!(cookie, 0xC0FFEE);
        let data = if kind == CMD_READ && error == 0 {
            self.read_data(len as usize).await
        } else {
            Vec::new()
        };
        (error, data)
    }

    /// True if the server closes the connection (EOF or reset) within `timeout`, after
    /// possibly sending some bytes first.
    pub async fn closed_within(&mut self, timeout: Duration) -> bool {
        let mut buf = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.s.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
            }
        }
    }
}

/// `read_exact` that fails the test instead of hanging when the server never answers.
async fn read_full<S: AsyncRead + Unpin>(s: &mut S, buf: &mut [u8], what: &str) {
    match tokio::time::timeout(Duration::from_secs(10), s.read_exact(buf)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => panic!("reading {what}: {e}"),
        Err(_) => panic!("no {what} within 10 s"),
    }
}

/// Data of NBD_OPT_INFO / NBD_OPT_GO.
pub fn info_data(name: &str, items: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(items.len() as u16).to_be_bytes());
    for i in items {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}
