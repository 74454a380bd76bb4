//! Harness for end-to-end tests: builds the real binaries once, starts them on 127.0.0.1 with
//! random ports and temporary directories, and drives them with the `lifeboat` CLI. Every
//! process's output goes to a log file in its directory and is printed when a test fails.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

pub mod recovery;
pub mod site;
pub mod workload;

static BUILD: Once = Once::new();

/// Directory holding the workspace's binaries (the profile the tests were built with).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf()
}

/// Path of a workspace binary, building all binaries first (once per test process) so the
/// tests never run stale ones.
pub fn bin(name: &str) -> PathBuf {
    BUILD.call_once(|| {
        let release = bin_dir().ends_with("release");
        let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cargo.args(["build", "--workspace", "--bins", "--quiet"]);
        if release {
            cargo.arg("--release");
        }
        let status = cargo.status().expect("run cargo build");
        assert!(status.success(), "cargo build --bins failed");
    });
    let path = bin_dir().join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// A port nothing listens on, for a component under test to bind. Taken below the kernel's
/// ephemeral range (32768 and up by default), so the components' own outgoing connections
/// cannot take it before the component binds it, and never handed out twice in one test
/// process (two `bind(0)`s in a row can get the same port once the first is closed).
pub fn free_port() -> u16 {
    use std::collections::BTreeSet;
    use std::sync::Mutex;
    static TAKEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
    // Where to start differs per process, so test binaries run side by side rarely meet.
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(1)
        ^ ((std::process::id() as u64) << 20)
        | 1;
    for _ in 0..100_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = 20_000 + (x % 12_000) as u16;
        if !taken.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.insert(port);
            return port;
        }
    }
    panic!("no free port between 20000 and 32000 on 127.0.0.1");
}

/// Creates `path` as a sparse file of `bytes` bytes: a protected machine's disk.
pub fn sparse_disk(path: &Path, bytes: u64) {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(bytes))
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
}

pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// Polls `check` until it returns true or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A started binary. Killed (SIGKILL) when dropped; its log is printed if the test panicked.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn start(name: &str, binary: &str, args: &[&str], log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).expect("create log file");
        let err = out.try_clone().expect("clone log file");
        let child = Command::new(bin(binary))
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {binary}: {e}"));
        Proc {
            name: name.to_string(),
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status();
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        self.signal("-TERM");
        self.wait(Duration::from_secs(30))
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status.code();
            }
            if start.elapsed() > timeout {
                panic!(
                    "{} did not exit within {timeout:?}\n{}",
                    self.name,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- log of {} -----\n{}", self.name, self.log_text());
        }
        self.kill9();
    }
}

/// Runs a binary to completion.
pub fn run(binary: &str, args: &[&str], envs: &[(&str, &str)]) -> Output {
    Command::new(bin(binary))
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {binary}: {e}"))
}

pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Plain HTTP GET of a path on a local address (for /metrics).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default())
}

/// A configuration server node under test.
pub struct CsNode {
    pub dir: PathBuf,
    pub addr: String,
    pub metrics: String,
    pub proc: Option<Proc>,
}

impl CsNode {
    fn args(&self) -> Vec<String> {
        vec![
            "--data-dir".into(),
            self.dir.display().to_string(),
            "--listen".into(),
            self.addr.clone(),
            "--metrics-listen".into(),
            self.metrics.clone(),
            "--heartbeat-interval-secs".into(),
            "1".into(),
        ]
    }

    /// `config-server init` in `dir`, then `run`. Returns the node and init's output.
    pub fn init(dir: PathBuf) -> (CsNode, String) {
        let mut node = CsNode {
            dir,
            addr: free_addr(),
            metrics: free_addr(),
            proc: None,
        };
        let mut args = vec!["init".to_string()];
        args.extend(node.args());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run("config-server", &argv, &[]);
        assert!(out.status.success(), "init failed: {}", text(&out));
        node.start();
        node.wait_ready(&node.context());
        (node, text(&out))
    }

    /// Waits until this node answers admin calls and knows a bootstrapped leader.
    pub fn wait_ready(&self, context: &Path) {
        wait_until(
            "configuration server ready",
            Duration::from_secs(60),
            || {
                let out = run(
                    "lifeboat",
                    &["--cs", &self.addr, "cluster", "status", "--json"],
                    &[("LIFEBOAT_CONTEXT", &context.display().to_string())],
                );
                out.status.success()
                    && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                        .map(|v| v["leader_id"].as_u64().unwrap_or(0) != 0 && v["cluster_id"] != "")
                        .unwrap_or(false)
            },
        );
    }

    /// `config-server join` of a new node in `dir` against `cs`.
    pub fn join(dir: PathBuf, cs: &str, passphrase_file: &Path) -> CsNode {
        std::fs::create_dir_all(&dir).expect("node dir");
        let node = CsNode {
            dir,
            addr: free_addr(),
            metrics: free_addr(),
            proc: None,
        };
        let mut args = vec![
            "join".to_string(),
            "--cs".into(),
            cs.to_string(),
            "--passphrase-file".into(),
            passphrase_file.display().to_string(),
        ];
        args.extend(node.args());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = node.dir.join("node.log");
        let proc = Proc::start(
            &format!("config-server {}", node.addr),
            "config-server",
            &argv,
            log,
        );
        CsNode {
            proc: Some(proc),
            ..node
        }
    }

    pub fn start(&mut self) {
        let mut args = vec!["run".to_string()];
        args.extend(self.args());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = self
            .dir
            .join(format!("node-{}.log", Instant::now().elapsed().as_nanos()));
        self.proc = Some(Proc::start(
            &format!("config-server {}", self.addr),
            "config-server",
            &argv,
            log,
        ));
    }

    pub fn passphrase_file(&self) -> PathBuf {
        self.dir.join("private").join("connection.passphrase")
    }

    pub fn context(&self) -> PathBuf {
        self.dir.join("admin").join("context.toml")
    }
}

/// Runs `lifeboat` with the admin context of `cs` (and optional extra CS addresses).
pub fn lifeboat(context: &Path, args: &[&str]) -> Output {
    run(
        "lifeboat",
        args,
        &[("LIFEBOAT_CONTEXT", &context.display().to_string())],
    )
}

/// `lifeboat ... --json` parsed; panics with the output if the command failed.
pub fn lifeboat_json(context: &Path, args: &[&str]) -> serde_json::Value {
    let out = lifeboat(context, args);
    assert!(
        out.status.success(),
        "lifeboat {args:?} failed: {}",
        text(&out)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("lifeboat {args:?}: not JSON ({e}): {}", text(&out)))
}

/// Servers of a role from `lifeboat servers list --all --json`.
pub fn servers(context: &Path, role: &str) -> Vec<serde_json::Value> {
    let v = lifeboat_json(context, &["servers", "list", "--all", "--json"]);
    v["servers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|s| s["role"] == role)
        .collect()
}

/// Checks a VHD with qemu: `qemu-img check -f vpc` (qemu's vpc driver implements no check and
/// answers exit 63 "does not support checks", which counts as a pass) and `qemu-img info -f
/// vpc`, which parses the footer, header and BAT as qemu does. Returns false, saying why, when
/// qemu-img is not installed.
pub fn qemu_check_vpc(path: &Path) -> bool {
    let Ok(check) = Command::new("qemu-img")
        .args(["check", "-f", "vpc"])
        .arg(path)
        .output()
    else {
        eprintln!("SKIP qemu-img checks: qemu-img is not installed (Debian package qemu-utils)");
        return false;
    };
    let stderr = String::from_utf8_lossy(&check.stderr);
    let unsupported = check.status.code() == Some(63) && stderr.contains("does not support checks");
    assert!(
        check.status.success() || unsupported,
        "qemu-img check {}: {}",
        path.display(),
        text(&check)
    );
    let info = Command::new("qemu-img")
        .args(["info", "-f", "vpc"])
        .arg(path)
        .output()
        .expect("qemu-img info");
    assert!(
        info.status.success(),
        "qemu-img info {}: {}",
        path.display(),
        text(&info)
    );
    true
}

/// A process server, master target or agent under test: registered with a configuration
/// server, then started (and restarted) with the same data directory and addresses.
pub struct Component {
    pub binary: &'static str,
    pub dir: PathBuf,
    pub listen: String,
    pub metrics: String,
    /// The agent's or master target's NBD address (a free port: tests run in parallel).
    pub nbd: String,
    extra: Vec<String>,
    pub proc: Option<Proc>,
}

impl Component {
    /// Registers `binary` as `name` in `tmp/name`; `extra` flags (e.g. `--disk`) are given to
    /// both `register` and `run`. Panics if registration fails.
    pub fn register(
        binary: &'static str,
        name: &str,
        tmp: &Path,
        cs: &CsNode,
        extra: &[&str],
    ) -> Component {
        let c = Component::new(binary, name, tmp, extra);
        let out = c.run_register(cs, &["--name", name]);
        assert!(out.status.success(), "{binary} register: {}", text(&out));
        c
    }

    /// As `register`, returning what `register` printed however it ended.
    pub fn register_result(
        binary: &'static str,
        name: &str,
        tmp: &Path,
        cs: &CsNode,
        extra: &[&str],
    ) -> Output {
        Component::new(binary, name, tmp, extra).run_register(cs, &["--name", name])
    }

    fn new(binary: &'static str, name: &str, tmp: &Path, extra: &[&str]) -> Component {
        Component {
            binary,
            dir: tmp.join(name),
            listen: free_addr(),
            metrics: free_addr(),
            nbd: free_addr(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            proc: None,
        }
    }

    fn run_register(&self, cs: &CsNode, more: &[&str]) -> Output {
        let mut args = vec![
            "register".to_string(),
            "--cs".into(),
            cs.addr.clone(),
            "--passphrase-file".into(),
            cs.passphrase_file().display().to_string(),
        ];
        args.extend(more.iter().map(|s| s.to_string()));
        args.extend(self.flags());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        run(self.binary, &argv, &[])
    }

    /// Registers it again with `register --force` in the same data directory (after a
    /// passphrase change, say): the new identity replaces the old one. Returns the output.
    pub fn register_again(&self, cs: &CsNode) -> Output {
        self.run_register(cs, &["--force"])
    }

    fn flags(&self) -> Vec<String> {
        let mut f = vec![
            "--data-dir".to_string(),
            self.dir.display().to_string(),
            "--listen".into(),
            self.listen.clone(),
            "--metrics-listen".into(),
            self.metrics.clone(),
        ];
        // Agents serve their disks and master targets their views over NBD.
        if self.binary == "mobility-agent" || self.binary == "master-target" {
            f.extend(["--nbd-listen".to_string(), self.nbd.clone()]);
        }
        f.extend(self.extra.iter().cloned());
        f
    }

    /// Replaces the flags given to `run` (and `register`) besides the standard ones: the
    /// next `start` runs with these.
    pub fn set_extra(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
    }

    /// Starts (or restarts) `run`, logging to a new file in its directory.
    pub fn start(&mut self) {
        let mut args = vec!["run".to_string()];
        args.extend(self.flags());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = self.dir.join(format!("run-{}.log", free_port()));
        self.proc = Some(Proc::start(self.binary, self.binary, &argv, log));
    }

    /// The running process.
    pub fn proc(&mut self) -> &mut Proc {
        self.proc.as_mut().expect("component started")
    }
}
