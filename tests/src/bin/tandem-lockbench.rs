//! tandem-lockbench: the lock manager's benchmarks (issue 4's targets) on 3 `tandem-lockd`
//! nodes in network namespaces, run by `tandem-lockctl bench` from the leader's node and
//! from a follower, printed beside the fdatasync latency of the disk holding the Raft
//! logs (measured in the same run). Not part of the test suite's pass/fail.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use tandem_tests::Cluster;

#[derive(Parser)]
#[command(
    name = "tandem-lockbench",
    about = "Lock manager benchmark: 3 nodes in namespaces, client on the leader and on a follower"
)]
struct Args {
    /// Seconds per throughput benchmark.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Clients of the distinct-resources benchmark.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Nodes (3 or 5).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut c = Cluster::builder().nodes(args.nodes).start()?;
    for i in 0..args.nodes {
        c.start_lockd(i)?;
    }
    let mut leader = 0u64;
    c.wait_for(Duration::from_secs(30), || {
        let seen: Vec<Option<u64>> = (0..args.nodes)
            .map(|i| c.lockctl_status(i).and_then(|s| s["leader"].as_u64()))
            .collect();
        leader = seen[0].unwrap_or(0);
        Ok(leader != 0 && seen.iter().all(|l| *l == Some(leader)))
    })
    .context("no leader elected")?;
    let on_leader = (leader - 1) as usize;
    let follower = (on_leader + 1) % args.nodes;
    println!(
        "tandem-lockd, {} nodes in network namespaces; targets: p50 <= 1000 us, >= 20000 pairs/s, >= 1000 hand-offs/s",
        args.nodes
    );
    println!(
        "{:<24} {:>21} {:>12} {:>12} {:>16} {:>14}",
        "client on",
        "fsync p50 wal/append",
        "pair p50",
        "pair p99",
        "pairs/s (N cl.)",
        "hand-offs/s"
    );
    for (what, node) in [("leader", on_leader), ("follower", follower)] {
        let out = c.lockctl(
            node,
            &[
                "bench",
                "--json",
                "--clients",
                &args.clients.to_string(),
                "--seconds",
                &args.seconds.to_string(),
            ],
        )?;
        if !out.status.success() {
            bail!(
                "bench on n{} failed: {}",
                node + 1,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let r: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        println!(
            "{:<24} {:>7} / {:>6} us {:>9} us {:>9} us {:>10.0} ({:>2}) {:>14.0}",
            format!("{what} (n{})", node + 1),
            r["fsync_p50_us"],
            r["fsync_append_p50_us"],
            r["single_p50_us"],
            r["single_p99_us"],
            r["parallel_pairs_per_s"].as_f64().unwrap_or(0.0),
            r["parallel_clients"],
            r["contended_handoffs_per_s"].as_f64().unwrap_or(0.0),
        );
    }
    Ok(())
}
