//! A test cluster of N nodes: each node's daemons run as real processes inside the node's
//! network namespace and a private mount namespace. The cluster writes its own
//! cluster.toml into a temp dir, starts and kills processes by PID, and on drop kills
//! every process it started, deletes its namespaces and (on failure) prints the logs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::netns::Network;

/// Where the workspace's binaries are (target/<profile>/), found from the test binary.
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("TANDEM_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>
    exe.parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (the README's test command does)",
        p.display()
    );
    p
}

#[derive(Clone, Debug)]
pub struct ResourceSpec {
    pub name: String,
    pub size: String,
    pub protocol: String,
    pub allow_two_primaries: bool,
    /// "uring" or "posix".
    pub io_engine: String,
    /// Extra `key = value` lines for the resource section.
    pub extra: String,
    /// Node indexes without a disk: diskless tiebreakers.
    pub diskless: Vec<usize>,
}

impl Default for ResourceSpec {
    fn default() -> Self {
        Self {
            name: "www".into(),
            size: "32MiB".into(),
            protocol: "C".into(),
            allow_two_primaries: true,
            io_engine: "uring".into(),
            extra: String::new(),
            diskless: Vec::new(),
        }
    }
}

pub struct ClusterBuilder {
    nodes: usize,
    resources: Vec<ResourceSpec>,
    secret: String,
    /// Per-node secret overrides (to test authentication failures).
    secret_override: BTreeMap<usize, String>,
}

impl ClusterBuilder {
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }
    pub fn resource(mut self, r: ResourceSpec) -> Self {
        self.resources = vec![r];
        self
    }
    pub fn wrong_secret_on(mut self, node: usize) -> Self {
        self.secret_override
            .insert(node, "a-different-secret".into());
        self
    }
    pub fn start(self) -> anyhow::Result<Cluster> {
        let dir = tempfile::Builder::new().prefix("tandem-test-").tempdir()?;
        let net = Network::create(self.nodes)?;
        let mut c = Cluster {
            dir,
            net,
            resources: self.resources.clone(),
            procs: Vec::new(),
            configs: Vec::new(),
            env: Vec::new(),
        };
        for i in 0..self.nodes {
            let secret = self.secret_override.get(&i).unwrap_or(&self.secret);
            let path = c.dir.path().join(format!("cluster-n{}.toml", i + 1));
            std::fs::write(&path, c.render_config(secret))?;
            c.configs.push(path);
        }
        Ok(c)
    }
}

struct Proc {
    node: usize,
    what: String,
    child: Child,
    log: PathBuf,
}

pub struct Cluster {
    dir: tempfile::TempDir,
    pub net: Network,
    pub resources: Vec<ResourceSpec>,
    procs: Vec<Proc>,
    configs: Vec<PathBuf>,
    /// Environment for processes started from now on (fault-injection knobs).
    env: Vec<(String, String)>,
}

impl Cluster {
    /// Processes started after this see `key=value` in their environment.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.push((key.to_string(), value.to_string()));
    }

    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            nodes: 2,
            resources: vec![ResourceSpec::default()],
            secret: "test-cluster-secret".into(),
            secret_override: BTreeMap::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn node_name(&self, i: usize) -> String {
        format!("n{}", i + 1)
    }

    /// The network namespace of node `i` (for `ip netns exec`).
    pub fn node_ns(&self, i: usize) -> String {
        self.net.nodes[i].ns.clone()
    }

    pub fn node_count(&self) -> usize {
        self.net.nodes.len()
    }

    pub fn config_path(&self, node: usize) -> &Path {
        &self.configs[node]
    }

    pub fn disk_path(&self, node: usize, res: &str) -> PathBuf {
        self.dir.path().join(format!("{res}-n{}.img", node + 1))
    }

    pub fn nbd_socket(&self, node: usize, res: &str) -> PathBuf {
        self.dir
            .path()
            .join(format!("run/{}/nbd-{res}.sock", self.node_name(node)))
    }

    pub fn nbd_uri(&self, node: usize, res: &str) -> String {
        format!(
            "nbd+unix:///{res}?socket={}",
            self.nbd_socket(node, res).display()
        )
    }

    fn render_config(&self, secret: &str) -> String {
        let d = self.dir.path().display();
        let mut s = format!(
            "[cluster]\nname = \"test\"\nsecret = \"{secret}\"\nstate-dir = \"{d}/state\"\nrun-dir = \"{d}/run\"\n\n"
        );
        for (i, n) in self.net.nodes.iter().enumerate() {
            s += &format!(
                "[[node]]\nname = \"n{}\"\nid = {}\naddress = \"{}\"\n\n",
                i + 1,
                i + 1,
                n.addr
            );
        }
        for r in &self.resources {
            s += &format!(
                "[[resource]]\nname = \"{}\"\nsize = \"{}\"\nprotocol = \"{}\"\nallow-two-primaries = {}\nio-engine = \"{}\"\n",
                r.name, r.size, r.protocol, r.allow_two_primaries, r.io_engine
            );
            s += &r.extra;
            if !r.extra.is_empty() && !r.extra.ends_with('\n') {
                s += "\n";
            }
            for i in (0..self.net.nodes.len()).filter(|i| !r.diskless.contains(i)) {
                s += &format!(
                    "[resource.on.n{}]\ndisk = \"{}\"\n",
                    i + 1,
                    self.disk_path(i, &r.name).display()
                );
            }
            s += "\n";
        }
        s
    }

    /// Starts a program as node `node`: in its network namespace and a private mount
    /// namespace, logging to `<dir>/logs/<node>-<what>.log`. Returns the PID.
    pub fn spawn(
        &mut self,
        node: usize,
        what: &str,
        program: &Path,
        args: &[&str],
    ) -> anyhow::Result<u32> {
        let logs = self.dir.path().join("logs");
        std::fs::create_dir_all(&logs)?;
        let log_path = logs.join(format!("{}-{what}.log", self.node_name(node)));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.net.nodes[node].ns])
            .args(["unshare", "--mount", "--propagation", "private"])
            .arg(program)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        let pid = child.id();
        self.procs.push(Proc {
            node,
            what: what.to_string(),
            child,
            log: log_path,
        });
        Ok(pid)
    }

    /// Starts tandem-replicatord on a node (resources not yet up).
    pub fn start_replicator(&mut self, node: usize) -> anyhow::Result<u32> {
        let cfg = self.configs[node].display().to_string();
        let name = self.node_name(node);
        let pid = self.spawn(
            node,
            "replicatord",
            &bin("tandem-replicatord"),
            &["--config", &cfg, "--node", &name],
        )?;
        self.wait_for(Duration::from_secs(10), || {
            Ok(self.tandemadm(node, &["status"])?.status.success())
        })
        .context("tandem-replicatord did not answer on its control socket")?;
        Ok(pid)
    }

    /// Starts tandem-lockd on a node.
    pub fn start_lockd(&mut self, node: usize) -> anyhow::Result<u32> {
        let cfg = self.configs[node].display().to_string();
        let name = self.node_name(node);
        self.spawn(
            node,
            "lockd",
            &bin("tandem-lockd"),
            &["--config", &cfg, "--node", &name],
        )
    }

    /// Runs one of our CLIs as node `node` (`--config` and `--node` given), from the
    /// test's namespace: the daemons' sockets are paths.
    fn node_tool(&self, program: &str, node: usize, args: &[&str]) -> anyhow::Result<Output> {
        Ok(Command::new(bin(program))
            .arg("--config")
            .arg(&self.configs[node])
            .arg("--node")
            .arg(self.node_name(node))
            .args(args)
            .output()?)
    }

    /// Runs tandem-lockctl for a node.
    pub fn lockctl(&self, node: usize, args: &[&str]) -> anyhow::Result<Output> {
        self.node_tool("tandem-lockctl", node, args)
    }

    /// `tandem-lockctl status --json`, or None while the daemon does not answer.
    pub fn lockctl_status(&self, node: usize) -> Option<serde_json::Value> {
        let out = self.lockctl(node, &["status", "--json"]).ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    /// Waits until `nodes` all name the same lock-manager leader; returns its id.
    /// Panics with the first node's lockd log if they do not within `timeout`.
    pub fn wait_common_leader(&self, nodes: &[usize], timeout: Duration) -> u64 {
        let mut leader = 0u64;
        self.wait_for(timeout, || {
            let seen: Vec<Option<u64>> = nodes
                .iter()
                .map(|&i| self.lockctl_status(i).and_then(|s| s["leader"].as_u64()))
                .collect();
            leader = seen[0].unwrap_or(0);
            Ok(leader != 0 && seen.iter().all(|l| *l == Some(leader)))
        })
        .unwrap_or_else(|e| panic!("no common leader: {e}\n{}", self.log(nodes[0], "lockd")));
        leader
    }

    /// Checks every node's copy of `res` against the acknowledged writes of `log` in
    /// `blocks`; panics naming the node and the first wrong block.
    pub fn check_acknowledged(
        &self,
        res: &str,
        log: &crate::oracle::WriteLog,
        blocks: std::ops::Range<u64>,
    ) {
        for i in 0..self.node_count() {
            let disk = std::fs::read(self.disk_path(i, res)).unwrap();
            if let Err(e) = log.check_image(&disk, blocks.clone()) {
                panic!("n{}: {e}", i + 1);
            }
        }
    }

    /// Runs tandemadm for a node.
    pub fn tandemadm(&self, node: usize, args: &[&str]) -> anyhow::Result<Output> {
        self.node_tool("tandemadm", node, args)
    }

    /// Runs tandemadm and fails on a non-zero exit, returning stdout.
    pub fn adm(&self, node: usize, args: &[&str]) -> anyhow::Result<String> {
        let out = self.tandemadm(node, args)?;
        if !out.status.success() {
            bail!(
                "tandemadm {} on n{} failed: {}{}",
                args.join(" "),
                node + 1,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn status_json(&self, node: usize) -> anyhow::Result<serde_json::Value> {
        let out = self.adm(node, &["status", "--json"])?;
        serde_json::from_str(&out).with_context(|| format!("status --json is not JSON: {out}"))
    }

    /// Polls `f` until it returns true or the timeout passes.
    pub fn wait_for(
        &self,
        timeout: Duration,
        mut f: impl FnMut() -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last_err = None;
        while Instant::now() < deadline {
            match f() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last_err = Some(e),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        match last_err {
            Some(e) => bail!("timed out after {timeout:?}; last error: {e:#}"),
            None => bail!("timed out after {timeout:?}"),
        }
    }

    /// Creates metadata on every node, starts the daemons, brings the resource up and
    /// makes node 0 UpToDate Primary with every peer in sync (fresh disks: no initial sync).
    pub fn bring_up_fresh(&mut self, res: &str) -> anyhow::Result<()> {
        let diskless = self
            .resources
            .iter()
            .find(|r| r.name == res)
            .map(|r| r.diskless.clone())
            .unwrap_or_default();
        for i in 0..self.node_count() {
            if !diskless.contains(&i) {
                self.adm(i, &["create-md", res])?;
            }
            self.start_replicator(i)?;
            self.adm(i, &["up", res])?;
        }
        self.wait_connected(res)?;
        self.adm(0, &["new-current-uuid", "--clear-bitmap", res])?;
        self.wait_sync_all(res, 30)?;
        self.adm(0, &["primary", res])?;
        Ok(())
    }

    /// Waits until every node sees every peer of `res` Connected.
    pub fn wait_connected(&self, res: &str) -> anyhow::Result<()> {
        let n = self.node_count();
        self.wait_for(Duration::from_secs(20), || {
            for i in 0..n {
                let out = self.adm(i, &["status", "--json", res])?;
                let st: serde_json::Value = serde_json::from_str(&out)?;
                let conns = st[0]["connections"].as_array().cloned().unwrap_or_default();
                if conns.len() != n - 1
                    || conns.iter().any(|c| c["connection-state"] != "Connected")
                {
                    return Ok(false);
                }
            }
            Ok(true)
        })
    }

    /// `tandemadm wait-sync` on every node: all UpToDate and Established.
    pub fn wait_sync_all(&self, res: &str, timeout_s: u64) -> anyhow::Result<()> {
        let t = timeout_s.to_string();
        for i in 0..self.node_count() {
            self.adm(i, &["wait-sync", res, "--timeout-s", &t])?;
        }
        Ok(())
    }

    /// SIGKILLs every process of a node.
    pub fn kill9(&mut self, node: usize) {
        for p in self.procs.iter_mut().filter(|p| p.node == node) {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    /// Sends SIGTERM to a node's processes and waits for them.
    pub fn stop(&mut self, node: usize) {
        for p in self.procs.iter_mut().filter(|p| p.node == node) {
            // SAFETY: signalling our own child by PID.
            unsafe { libc::kill(p.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = p.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    /// PID of a node's process `what` (the newest one started).
    pub fn pid_of(&self, node: usize, what: &str) -> u32 {
        self.procs
            .iter()
            .rev()
            .find(|p| p.node == node && p.what == what)
            .map(|p| p.child.id())
            .unwrap_or_else(|| panic!("n{} has no {what}", node + 1))
    }

    /// Whether a node's process `what` is still running.
    pub fn alive(&mut self, node: usize, what: &str) -> bool {
        self.procs
            .iter_mut()
            .filter(|p| p.node == node && p.what == what)
            .any(|p| matches!(p.child.try_wait(), Ok(None)))
    }

    pub fn log(&self, node: usize, what: &str) -> String {
        std::fs::read_to_string(
            self.dir
                .path()
                .join(format!("logs/{}-{what}.log", self.node_name(node))),
        )
        .unwrap_or_default()
    }

    /// Runs a shell command inside a node's network namespace.
    pub fn in_ns(&self, node: usize, script: &str) -> anyhow::Result<Output> {
        Ok(Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.net.nodes[node].ns,
                "bash",
                "-c",
                script,
            ])
            .output()?)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        if std::thread::panicking() || std::env::var_os("TANDEM_TEST_LOGS").is_some() {
            for p in &self.procs {
                let text = std::fs::read_to_string(&p.log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("----- n{} {} (last 40 lines) -----", p.node + 1, p.what);
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        // Network's own Drop deletes the namespaces; the TempDir removes files.
    }
}
