//! A Lifeboat site across hosts for tests: each component in its own container, from the image
//! `deploy/container/build-image.sh` builds of the tests' binaries, on a private Docker network
//! where the components reach each other by name (`cs`, `ps`, `mt`, machine names). Every
//! container's data directory is a folder of the test's temporary directory, mounted at `/data`
//! and written as the test's own user. The test drives the site from the host: the `lifeboat`
//! CLI talks to the configuration server's container address, `qemu-io` to an agent's NBD export.
//! Dropping the site removes its containers, network and image (and prints the containers' logs
//! when the test failed).
use crate::{bin, bin_dir, text, wait_until};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// False (after printing why) when no Docker engine answers.
pub fn have_docker() -> bool {
    match Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
    {
        Ok(out) if out.status.success() => true,
        Ok(out) => {
            eprintln!(
                "SKIP: `docker info` failed, no Docker engine to run hosts in: {}",
                text(&out).trim()
            );
            false
        }
        Err(e) => {
            eprintln!("SKIP: docker is not installed ({e})");
            false
        }
    }
}

/// Builds the image `tag` with `deploy/container/build-image.sh` from the tests' binaries.
pub fn build_image(tag: &str) {
    bin("lifeboat"); // builds every binary once
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/container/build-image.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(tag)
        .env("BIN", bin_dir())
        .output()
        .expect("run build-image.sh");
    assert!(out.status.success(), "build-image.sh: {}", text(&out));
}

/// Runs `docker ARGS`.
pub fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("docker {args:?}: {e}"))
}

/// Runs `docker ARGS`, panicking with its output if it fails; returns its trimmed stdout.
pub fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub struct Site {
    /// Prefix of this site's container, network and image names (unique per test run).
    prefix: String,
    pub network: String,
    pub image: String,
    pub dir: PathBuf,
    user: String,
    started: Vec<String>,
}

impl Site {
    /// Builds the image from the tests' binaries and creates the network.
    pub fn new(dir: &Path) -> Site {
        let meta = std::fs::metadata(dir).expect("site directory");
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let prefix = format!("lbt{}x{nanos:x}", std::process::id());
        let image = format!("lifeboat-e2e:{prefix}");
        build_image(&image);
        let network = format!("{prefix}-net");
        docker_ok(&["network", "create", &network]);
        Site {
            prefix,
            network,
            image,
            dir: dir.to_path_buf(),
            user: format!("{}:{}", meta.uid(), meta.gid()),
            started: Vec::new(),
        }
    }

    /// The host folder mounted at `/data` in host `name`'s containers.
    pub fn data(&self, name: &str) -> PathBuf {
        let d = self.dir.join(name);
        std::fs::create_dir_all(&d).expect("create a host's data folder");
        d
    }

    fn container(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    fn run_args(&self, name: &str) -> Vec<String> {
        let volume = format!("{}:/data", self.data(name).display());
        [
            "--user",
            &self.user,
            "--network",
            &self.network,
            "--network-alias",
            name,
            "-v",
            &volume,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Runs a one-off command (`init`, `register`) as host `name`; returns its output.
    pub fn once(&self, name: &str, command: &[&str]) -> String {
        let mut args: Vec<String> = vec!["run".into(), "--rm".into()];
        args.extend(self.run_args(name));
        args.push(self.image.clone());
        args.extend(command.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        docker_ok(&refs)
    }

    /// Starts host `name` running `command` in the background.
    pub fn start(&mut self, name: &str, command: &[&str]) {
        let container = self.container(name);
        let mut args: Vec<String> = vec!["run".into(), "-d".into(), "--name".into(), container];
        args.extend(self.run_args(name));
        args.push(self.image.clone());
        args.extend(command.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        docker_ok(&refs);
        self.started.push(name.to_string());
    }

    /// The host's address on the site network, as the test (on the Docker host) reaches it.
    pub fn ip(&self, name: &str) -> String {
        let mut ip = String::new();
        wait_until(
            &format!("an address for {name}"),
            Duration::from_secs(30),
            || {
                ip = docker_ok(&[
                    "inspect",
                    "-f",
                    "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                    &self.container(name),
                ]);
                !ip.is_empty()
            },
        );
        ip
    }

    /// Writes a `lifeboat` context for the Docker host at `path`: the configuration servers
    /// `nodes` by address (their names resolve only inside the network) on port 8443, and the
    /// admin identity `init` made in host `admin_of`'s data.
    pub fn write_context(&self, path: &Path, nodes: &[&str], admin_of: &str) -> Vec<String> {
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("{}:8443", self.ip(n)))
            .collect();
        std::fs::write(
            path,
            format!(
                "cs = [\"{}\"]\nidentity_dir = \"{}\"\n",
                addresses.join("\", \""),
                self.data(admin_of).join("admin").display()
            ),
        )
        .expect("write the CLI context");
        addresses
    }

    /// Power loss of a host: SIGKILL to everything in it.
    pub fn kill(&self, name: &str) {
        docker_ok(&["kill", &self.container(name)]);
    }

    /// Boots a killed host again with the same command and data.
    pub fn restart(&self, name: &str) {
        docker_ok(&["start", &self.container(name)]);
    }

    /// Cuts a host off the network (it keeps running).
    pub fn disconnect(&self, name: &str) {
        docker_ok(&[
            "network",
            "disconnect",
            &self.network,
            &self.container(name),
        ]);
    }

    /// Puts a cut-off host back on the network under its name.
    pub fn reconnect(&self, name: &str) {
        docker_ok(&[
            "network",
            "connect",
            "--alias",
            name,
            &self.network,
            &self.container(name),
        ]);
    }

    /// Runs a command inside host `name`'s running container (the image's binaries only).
    pub fn exec(&self, name: &str, command: &[&str]) -> Output {
        let container = self.container(name);
        let mut args = vec!["exec", container.as_str()];
        args.extend(command);
        docker(&args)
    }

    pub fn logs(&self, name: &str) -> String {
        text(&docker(&["logs", &self.container(name)]))
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        for name in &self.started {
            if std::thread::panicking() {
                eprintln!("----- log of host {name} -----\n{}", self.logs(name));
            }
            let _ = docker(&["rm", "-f", "-v", &self.container(name)]);
        }
        let _ = docker(&["network", "rm", &self.network]);
        let _ = docker(&["rmi", "-f", &self.image]);
    }
}
