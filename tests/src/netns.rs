//! Network namespaces for test nodes: one "hub" namespace holding a bridge, and one
//! namespace per node joined to it by a veth pair, with private addresses that exist only
//! inside namespaces this process created. Every namespace name carries the creating PID,
//! so namespaces leaked by a killed test run are swept by the next run.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context};

static COUNTER: AtomicU32 = AtomicU32::new(0);
const PREFIX: &str = "tnd";

/// Runs a command and fails with its stderr if it does not succeed.
pub fn run(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {cmd} (is it installed?)"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A bridge namespace plus one namespace per node.
pub struct Network {
    pub tag: String,
    pub hub: String,
    pub nodes: Vec<NodeNet>,
}

pub struct NodeNet {
    pub ns: String,
    pub addr: Ipv4Addr,
    /// The veth end inside the hub; setting it down cuts this node off.
    pub hub_if: String,
}

fn require_root() -> anyhow::Result<()> {
    // SAFETY: plain getter.
    if unsafe { libc::geteuid() } != 0 {
        bail!("namespace tests need root (they create network and mount namespaces)");
    }
    Ok(())
}

/// Deletes namespaces left behind by test processes that no longer exist.
pub fn sweep_stale() {
    let Ok(list) = run("ip", &["netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        if let Ok(pid) = pid.parse::<u32>() {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = run("ip", &["netns", "del", name]);
            }
        }
    }
}

impl Network {
    pub fn create(nodes: usize) -> anyhow::Result<Self> {
        require_root()?;
        sweep_stale();
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{pid}c{n}");
        let hub = format!("{PREFIX}{tag}hub");
        let mut net = Network {
            tag: tag.clone(),
            hub: hub.clone(),
            nodes: Vec::new(),
        };
        // From here on, Drop cleans up whatever was created.
        run("ip", &["netns", "add", &hub])?;
        run("ip", &["-n", &hub, "link", "set", "lo", "up"])?;
        run("ip", &["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        run("ip", &["-n", &hub, "link", "set", "br0", "up"])?;
        // veth names are limited to 15 bytes: use a short hash of the tag.
        let short = format!("{:06x}", (pid.wrapping_mul(2654435761) ^ n) & 0xffffff);
        for i in 1..=nodes {
            let ns = format!("{PREFIX}{tag}n{i}");
            let addr = Ipv4Addr::new(10, 213, 0, i as u8);
            let a = format!("tv{short}{i}a");
            let b = format!("tv{short}{i}b");
            run("ip", &["netns", "add", &ns])?;
            net.nodes.push(NodeNet {
                ns: ns.clone(),
                addr,
                hub_if: b.clone(),
            });
            run(
                "ip",
                &["link", "add", &a, "type", "veth", "peer", "name", &b],
            )?;
            run("ip", &["link", "set", &a, "netns", &ns])?;
            run("ip", &["link", "set", &b, "netns", &hub])?;
            run("ip", &["-n", &ns, "link", "set", &a, "name", "eth0"])?;
            run(
                "ip",
                &[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{addr}/24"),
                    "dev",
                    "eth0",
                ],
            )?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            run("ip", &["-n", &hub, "link", "set", &b, "master", "br0"])?;
            run("ip", &["-n", &hub, "link", "set", &b, "up"])?;
        }
        Ok(net)
    }

    /// Cuts a node off the network (its link to the bridge goes down).
    pub fn cut(&self, node: usize) -> anyhow::Result<()> {
        run(
            "ip",
            &[
                "-n",
                &self.hub,
                "link",
                "set",
                &self.nodes[node].hub_if,
                "down",
            ],
        )
        .map(|_| ())
    }

    pub fn heal(&self, node: usize) -> anyhow::Result<()> {
        run(
            "ip",
            &[
                "-n",
                &self.hub,
                "link",
                "set",
                &self.nodes[node].hub_if,
                "up",
            ],
        )
        .map(|_| ())
    }
}

impl Network {
    /// Cuts only the link between nodes `a` and `b` (each drops packets to the other);
    /// both keep talking to everyone else. Non-transitive partitions need this.
    pub fn cut_link(&self, a: usize, b: usize) -> anyhow::Result<()> {
        self.link_route(a, b, "add")?;
        self.link_route(b, a, "add")
    }

    pub fn heal_link(&self, a: usize, b: usize) -> anyhow::Result<()> {
        self.link_route(a, b, "del")?;
        self.link_route(b, a, "del")
    }

    fn link_route(&self, from: usize, to: usize, op: &str) -> anyhow::Result<()> {
        let dst = format!("{}/32", self.nodes[to].addr);
        run(
            "ip",
            &["-n", &self.nodes[from].ns, "route", op, "blackhole", &dst],
        )
        .map(|_| ())
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for n in &self.nodes {
            let _ = run("ip", &["netns", "del", &n.ns]);
        }
        let _ = run("ip", &["netns", "del", &self.hub]);
    }
}
