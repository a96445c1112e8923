//! Network fault injection for namespace tests: packet loss in the kernel (nftables
//! `numgen random` drops on the node's link, both directions; TCP then retransmits and
//! delivers segments out of order), and delay with per-connection jitter through
//! `tandem-faultproxy`, to which an nftables `redirect` sends every TCP connection the
//! node opens to another node. (This kernel has no `sch_netem`; nftables and a proxy
//! give the same three faults: delay, loss and reordering.)
//!
//! Apply before the daemons connect: connections opened earlier are not redirected.
//! The rules live in the node's namespace and vanish with it; the proxy is one of the
//! node's processes, killed with the others.

use std::time::Duration;

use anyhow::{bail, Context};

use crate::{bin, Cluster};

/// Port of the fault proxy inside each node's namespace.
const PROXY_PORT: u16 = 17_999;

#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// Fixed one-way delay per connection direction, milliseconds.
    pub delay_ms: u64,
    /// Extra random delay, uniform in 0..=jitter, milliseconds (per chunk, per connection).
    pub jitter_ms: u64,
    /// Packets dropped on the node's link, per thousand, each direction.
    pub loss_per_mille: u32,
}

impl Cluster {
    /// Makes node `node`'s network slow, jittery and lossy (see the module comment).
    pub fn impair_network(&mut self, node: usize, f: Faults) -> anyhow::Result<()> {
        let own = self.net.nodes[node].addr;
        let subnet = format!(
            "{}.{}.{}.0/24",
            own.octets()[0],
            own.octets()[1],
            own.octets()[2]
        );
        let mut rules = String::from("table ip tandemfault {\n");
        if f.delay_ms > 0 || f.jitter_ms > 0 {
            let seed = (node as u64 + 1) * 1_000_003;
            let args = [
                "--port".to_string(),
                PROXY_PORT.to_string(),
                "--delay-ms".into(),
                f.delay_ms.to_string(),
                "--jitter-ms".into(),
                f.jitter_ms.to_string(),
                "--seed".into(),
                seed.to_string(),
            ];
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.spawn(node, "faultproxy", &bin("tandem-faultproxy"), &args)?;
            self.wait_for(Duration::from_secs(10), || {
                let out = self.in_ns(node, &format!("ss -Hltn 'sport = :{PROXY_PORT}'"))?;
                Ok(!String::from_utf8_lossy(&out.stdout).trim().is_empty())
            })
            .context("the fault proxy did not start listening")?;
            rules += &format!(
                "  chain delay {{\n    type nat hook output priority -100; policy accept;\n    \
                 meta mark 0x7a7a return\n    \
                 ip daddr {subnet} ip daddr != {own} meta l4proto tcp redirect to :{PROXY_PORT}\n  }}\n"
            );
        }
        if f.loss_per_mille > 0 {
            let n = f.loss_per_mille;
            rules += &format!(
                "  chain loss_out {{\n    type filter hook output priority 0; policy accept;\n    \
                 oifname \"eth0\" numgen random mod 1000 < {n} counter drop\n  }}\n  \
                 chain loss_in {{\n    type filter hook input priority 0; policy accept;\n    \
                 iifname \"eth0\" numgen random mod 1000 < {n} counter drop\n  }}\n"
            );
        }
        rules += "}\n";
        let out = self.in_ns(node, &format!("nft -f - <<'EOF'\n{rules}EOF"))?;
        if !out.status.success() {
            bail!(
                "nft on n{}: {} (is nftables installed?)\n{rules}",
                node + 1,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Removes a node's packet loss and stops redirecting new connections to the proxy
    /// (connections already proxied keep their delay until they close).
    pub fn restore_network(&self, node: usize) -> anyhow::Result<()> {
        let out = self.in_ns(node, "nft delete table ip tandemfault")?;
        if !out.status.success() {
            bail!(
                "nft on n{}: {}",
                node + 1,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Packets the loss rules of a node dropped so far (both directions).
    pub fn dropped_packets(&self, node: usize) -> u64 {
        let Ok(out) = self.in_ns(node, "nft list table ip tandemfault") else {
            return 0;
        };
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("drop"))
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                let i = w.iter().position(|x| *x == "packets")?;
                w.get(i + 1)?.parse::<u64>().ok()
            })
            .sum()
    }
}
